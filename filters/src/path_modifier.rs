//! The path a redirect or rewrite produces (Gateway API `HTTPPathModifier`, Istio `uri` / `uriRegexRewrite`).
//!
//! `ReplacePrefixMatch` follows the Gateway API table: the matched prefix is replaced segment-wise, a trailing
//! slash of the replacement never doubles the separator, and an empty result becomes `/`
//! (`/foo` + `/foo/bar` → `/xyz` + `/bar`; `/foo` + `/foo` with replacement `/` → `/`). For a VirtualService
//! route it is Envoy's plain `prefix_rewrite`: replacement + the rest of the path.

use std::borrow::Cow;

use crate::route::{Matched, PathModifier, RouteKind};

pub fn modified_path<'p>(modifier: &PathModifier, path: &'p str, matched: &Matched) -> Cow<'p, str> {
    match modifier {
        PathModifier::ReplaceFullPath(full) => Cow::Owned(full.clone()),
        PathModifier::RegexReplace(re, replacement) => re.replace_all(path, replacement.as_str()),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let Some(prefix) = matched.matched_prefix.as_deref() else {
                // A regex match has no prefix to replace: leave the path alone.
                return Cow::Borrowed(path);
            };
            if matched.route.kind == RouteKind::VirtualService {
                let rest = path.get(prefix.len()..).unwrap_or("");
                return Cow::Owned(format!("{replacement}{rest}"));
            }
            let prefix = prefix.trim_end_matches('/');
            let rest = path.get(prefix.len()..).unwrap_or("");
            let joined = format!("{}{rest}", replacement.trim_end_matches('/'));
            Cow::Owned(if joined.is_empty() { "/".to_owned() } else { joined })
        }
    }
}

/// `path` plus the request's query, if it had one.
pub fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Route, Rule};
    use regex::Regex;
    use std::sync::Arc;

    fn matched(kind: RouteKind, prefix: Option<&str>) -> Matched {
        Matched {
            route: Arc::new(Route {
                kind,
                namespace: "ns".into(),
                name: "r".into(),
                creation_timestamp: None,
                source_order: 0,
                hostnames: vec![],
                rules: vec![],
            }),
            rule: Arc::new(Rule::default()),
            matched_prefix: prefix.map(Arc::from),
            rule_index: 0,
            match_index: 0,
        }
    }

    #[test]
    fn replace_prefix_follows_the_gateway_api_table() {
        let cases = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            // Conformance: HTTPRouteRewritePath / HTTPRouteRedirectPath.
            ("/prefix/one/two", "/prefix/one", "/one", "/one/two"),
            ("/strip-prefix/three", "/strip-prefix", "/", "/three"),
            ("/strip-prefix", "/strip-prefix", "/", "/"),
            (
                "/original-prefix/lemon",
                "/original-prefix",
                "/replacement-prefix",
                "/replacement-prefix/lemon",
            ),
            ("/anything", "/", "/v2", "/v2/anything"),
        ];
        for (path, prefix, replacement, want) in cases {
            let m = matched(RouteKind::Http, Some(prefix));
            let got = modified_path(&PathModifier::ReplacePrefixMatch(replacement.into()), path, &m);
            assert_eq!(got, want, "{path} {prefix} {replacement}");
        }
    }

    #[test]
    fn virtual_service_prefix_rewrite_is_plain() {
        let m = matched(RouteKind::VirtualService, Some("/foo"));
        assert_eq!(
            modified_path(&PathModifier::ReplacePrefixMatch("/bar".into()), "/foobaz", &m),
            "/barbaz"
        );
    }

    #[test]
    fn full_path_and_regex() {
        let m = matched(RouteKind::Http, Some("/full"));
        assert_eq!(
            modified_path(&PathModifier::ReplaceFullPath("/one".into()), "/full/x", &m),
            "/one"
        );
        let re = PathModifier::RegexReplace(Regex::new("^/service/([^/]+)(/.*)$").unwrap(), "$2/instance/$1".into());
        assert_eq!(modified_path(&re, "/service/foo/v1/api", &m), "/v1/api/instance/foo");
        let none = matched(RouteKind::Http, None);
        assert_eq!(
            modified_path(&PathModifier::ReplacePrefixMatch("/x".into()), "/re", &none),
            "/re"
        );
    }
}
