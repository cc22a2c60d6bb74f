//! One compiled `RouteMatch`: the conditions of the model, prepared once when the table is built (regexes
//! anchored, prefixes normalised, hostnames lower-cased) so that evaluating them allocates nothing.
//!
//! Choices the specs leave open, made here:
//! - A header sent on several lines is matched as its values joined with `,` (what Envoy does), for every kind
//!   of value match. Only a regex match against such a repeated header allocates (to build the joined value).
//! - Query strings are split on `&`, then on the first `=`; names and values are percent-decoded (`%XX`; a `%`
//!   not followed by two hex digits stays literal; `+` is not turned into a space, as in Envoy). The first
//!   occurrence of a name counts. Names are case-sensitive. A regex match on a value with `%` escapes
//!   allocates the decoded value.
//! - Prefix matching is segment-wise for Gateway API routes and a plain string prefix for VirtualService routes
//!   (Istio `uri.prefix` semantics: `/foo` matches `/foobar`).

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

use super::model::{GrpcMethodMatch, HeaderMatch, PathMatch, QueryMatch, RouteKind, RouteMatch, StringMatch};
use super::table::RequestView;

#[derive(Debug)]
pub(crate) enum PathCond {
    /// No path condition: behaves as `PathPrefix /`.
    Any,
    Exact(Box<str>),
    ExactIgnoreCase(Box<str>),
    /// Segment-wise (Gateway API). Stored without a trailing slash; `/` is stored as the empty string.
    Segments(Box<str>),
    SegmentsIgnoreCase(Box<str>),
    /// Plain string prefix (VirtualService).
    Plain(Box<str>),
    PlainIgnoreCase(Box<str>),
    Regex(Regex),
}

#[derive(Debug)]
pub(crate) enum ValueCond {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(Regex),
    Present,
}

#[derive(Debug)]
pub(crate) struct HeaderCond {
    name: HeaderName,
    value: ValueCond,
    invert: bool,
}

#[derive(Debug)]
pub(crate) struct QueryCond {
    name: Box<str>,
    value: ValueCond,
}

#[derive(Debug)]
pub(crate) struct GrpcCond {
    service: Option<ValueCond>,
    method: Option<ValueCond>,
}

/// All conditions of one match, ANDed.
#[derive(Debug)]
pub(crate) struct Conditions {
    pub(crate) path: PathCond,
    method: Option<Method>,
    headers: Box<[HeaderCond]>,
    query: Box<[QueryCond]>,
    grpc: Option<GrpcCond>,
}

impl Conditions {
    pub(crate) fn compile(m: &RouteMatch, kind: RouteKind) -> Conditions {
        Conditions {
            path: m.path.as_ref().map_or(PathCond::Any, |p| PathCond::compile(p, kind)),
            method: m.method.clone(),
            headers: m.headers.iter().map(HeaderCond::compile).collect(),
            query: m.query.iter().map(QueryCond::compile).collect(),
            grpc: m.grpc.as_ref().map(GrpcCond::compile),
        }
    }

    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
        // Cheapest and most selective checks first.
        if let Some(method) = &self.method
            && method != req.method
        {
            return false;
        }
        if !self.path.matches(req.path) {
            return false;
        }
        if let Some(grpc) = &self.grpc
            && !grpc.matches(req.path)
        {
            return false;
        }
        if !self.headers.iter().all(|h| h.matches(req.headers)) {
            return false;
        }
        self.query.is_empty() || self.query.iter().all(|q| q.matches(req.query.unwrap_or("")))
    }

    /// For `ReplacePrefixMatch`: how the match would be replaced (the configured prefix as the layers see it).
    pub(crate) fn matched_prefix(&self) -> Option<&str> {
        match &self.path {
            PathCond::Any => Some("/"),
            PathCond::Segments(p) | PathCond::SegmentsIgnoreCase(p) => Some(if p.is_empty() { "/" } else { p }),
            PathCond::Plain(p) | PathCond::PlainIgnoreCase(p) => Some(p),
            // Replacing the "prefix" of an exact match replaces the whole path (Envoy's prefix_rewrite does too).
            PathCond::Exact(p) | PathCond::ExactIgnoreCase(p) => Some(p),
            PathCond::Regex(_) => None,
        }
    }

    pub(crate) fn has_method(&self) -> bool {
        self.method.is_some()
    }

    pub(crate) fn header_count(&self) -> usize {
        self.headers.len()
    }

    pub(crate) fn query_count(&self) -> usize {
        self.query.len()
    }
}

/// Wraps a regex so it must match the whole input. Done once at build time; if the wrapped form cannot be
/// compiled (size limits), the original is kept and checked for a match spanning the whole input instead.
fn anchored(re: &Regex) -> Regex {
    Regex::new(&format!("^(?:{})$", re.as_str())).unwrap_or_else(|_| re.clone())
}

fn full_match(re: &Regex, s: &str) -> bool {
    re.find(s).is_some_and(|m| m.start() == 0 && m.end() == s.len())
}

impl PathCond {
    fn compile(p: &PathMatch, kind: RouteKind) -> PathCond {
        let segments = kind != RouteKind::VirtualService;
        match p {
            PathMatch::Exact(s) => PathCond::Exact(s.as_str().into()),
            PathMatch::ExactIgnoreCase(s) => PathCond::ExactIgnoreCase(s.as_str().into()),
            PathMatch::Prefix(s) if segments => PathCond::Segments(s.trim_end_matches('/').into()),
            PathMatch::PrefixIgnoreCase(s) if segments => PathCond::SegmentsIgnoreCase(s.trim_end_matches('/').into()),
            PathMatch::Prefix(s) => PathCond::Plain(s.as_str().into()),
            PathMatch::PrefixIgnoreCase(s) => PathCond::PlainIgnoreCase(s.as_str().into()),
            PathMatch::Regex(re) => PathCond::Regex(anchored(re)),
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathCond::Any => true,
            PathCond::Exact(p) => path == &**p,
            PathCond::ExactIgnoreCase(p) => path.eq_ignore_ascii_case(p),
            PathCond::Segments(p) => segment_prefix(path, p, false),
            PathCond::SegmentsIgnoreCase(p) => segment_prefix(path, p, true),
            PathCond::Plain(p) => path.starts_with(&**p),
            PathCond::PlainIgnoreCase(p) => {
                path.len() >= p.len() && path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            PathCond::Regex(re) => full_match(re, path),
        }
    }
}

/// `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`; the empty prefix (`/`) matches every path.
fn segment_prefix(path: &str, prefix: &str, ignore_case: bool) -> bool {
    let (path, prefix) = (path.as_bytes(), prefix.as_bytes());
    if path.len() < prefix.len() {
        return false;
    }
    let head = &path[..prefix.len()];
    let same = if ignore_case {
        head.eq_ignore_ascii_case(prefix)
    } else {
        head == prefix
    };
    same && (path.len() == prefix.len() || path[prefix.len()] == b'/')
}

impl ValueCond {
    fn compile(m: &StringMatch) -> ValueCond {
        match m {
            StringMatch::Exact(s) => ValueCond::Exact(s.as_str().into()),
            StringMatch::Prefix(s) => ValueCond::Prefix(s.as_str().into()),
            StringMatch::Regex(re) => ValueCond::Regex(anchored(re)),
            StringMatch::Present => ValueCond::Present,
        }
    }

    /// Matches a value given as a byte sequence (a joined header, a decoded query value) without collecting it;
    /// `text` builds the string a regex needs, only when a regex is asked.
    fn matches_bytes<'a, I, F>(&self, mut bytes: I, text: F) -> bool
    where
        I: Iterator<Item = u8>,
        F: FnOnce() -> Option<Cow<'a, str>>,
    {
        match self {
            ValueCond::Present => true,
            ValueCond::Exact(expected) => bytes.eq(expected.bytes()),
            ValueCond::Prefix(prefix) => prefix.bytes().all(|b| bytes.next() == Some(b)),
            ValueCond::Regex(re) => text().is_some_and(|t| full_match(re, &t)),
        }
    }

    fn matches_str(&self, value: &str) -> bool {
        match self {
            ValueCond::Present => true,
            ValueCond::Exact(expected) => value == &**expected,
            ValueCond::Prefix(prefix) => value.starts_with(&**prefix),
            ValueCond::Regex(re) => full_match(re, value),
        }
    }

    /// Specificity for gRPC precedence: (class, characters); lower class first, then more characters.
    pub(crate) fn specificity(cond: Option<&ValueCond>) -> (u8, usize) {
        match cond {
            Some(ValueCond::Exact(s)) => (0, s.len()),
            Some(ValueCond::Regex(re)) => (1, re.as_str().len()),
            Some(ValueCond::Prefix(s)) => (2, s.len()),
            Some(ValueCond::Present) => (3, 0),
            None => (4, 0),
        }
    }
}

impl HeaderCond {
    fn compile(h: &HeaderMatch) -> HeaderCond {
        HeaderCond {
            name: h.name.clone(),
            value: ValueCond::compile(&h.value),
            invert: h.invert,
        }
    }

    fn matches(&self, headers: &HeaderMap) -> bool {
        let values = headers.get_all(&self.name);
        let mut iter = values.iter();
        let found = match (iter.next(), iter.next()) {
            (None, _) => false,
            (Some(only), None) => {
                let bytes = only.as_bytes();
                self.value.matches_bytes(bytes.iter().copied(), || {
                    std::str::from_utf8(bytes).ok().map(Cow::Borrowed)
                })
            }
            (Some(_), Some(_)) => {
                let joined = values
                    .iter()
                    .enumerate()
                    .flat_map(|(i, v)| (i > 0).then_some(b',').into_iter().chain(v.as_bytes().iter().copied()));
                self.value.matches_bytes(joined, || {
                    let parts: Option<Vec<&str>> =
                        values.iter().map(|v| std::str::from_utf8(v.as_bytes()).ok()).collect();
                    parts.map(|p| Cow::Owned(p.join(",")))
                })
            }
        };
        found != self.invert
    }
}

impl QueryCond {
    fn compile(q: &QueryMatch) -> QueryCond {
        QueryCond {
            name: q.name.as_str().into(),
            value: ValueCond::compile(&q.value),
        }
    }

    fn matches(&self, query: &str) -> bool {
        match first_param(query, &self.name) {
            None => false,
            Some(raw) => self
                .value
                .matches_bytes(percent_decoded(raw), || match raw.contains('%') {
                    false => Some(Cow::Borrowed(raw)),
                    true => String::from_utf8(percent_decoded(raw).collect()).ok().map(Cow::Owned),
                }),
        }
    }
}

/// The raw value of the first parameter whose decoded name is `name` (`""` for a bare `name`).
fn first_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        percent_decoded(raw_name).eq(name.bytes()).then_some(raw_value)
    })
}

/// `%XX` decoding as a byte iterator, so comparisons need no buffer.
pub(crate) fn percent_decoded(raw: &str) -> impl Iterator<Item = u8> + '_ {
    let bytes = raw.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *bytes.get(i)?;
        if b == b'%'
            && let (Some(hi), Some(lo)) = (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex))
        {
            i += 3;
            return Some(hi << 4 | lo);
        }
        i += 1;
        Some(b)
    })
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

impl GrpcCond {
    fn compile(g: &GrpcMethodMatch) -> GrpcCond {
        GrpcCond {
            service: g.service.as_ref().map(ValueCond::compile),
            method: g.method.as_ref().map(ValueCond::compile),
        }
    }

    /// The request path must be `/<service>/<method>` when a service or method is named.
    fn matches(&self, path: &str) -> bool {
        if self.service.is_none() && self.method.is_none() {
            return true;
        }
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return false;
        };
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return false;
        }
        self.service.as_ref().is_none_or(|s| s.matches_str(service))
            && self.method.as_ref().is_none_or(|m| m.matches_str(method))
    }

    pub(crate) fn service(&self) -> Option<&ValueCond> {
        self.service.as_ref()
    }

    pub(crate) fn method(&self) -> Option<&ValueCond> {
        self.method.as_ref()
    }
}

impl Conditions {
    pub(crate) fn grpc(&self) -> Option<&GrpcCond> {
        self.grpc.as_ref()
    }
}

/// A route hostname, lower-cased: exact, or `*.suffix` (one or more labels before the suffix).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum HostPattern {
    Exact(Box<str>),
    /// The suffix including its leading dot (`.example.com`).
    Wildcard(Box<str>),
    /// A bare `*`: any host.
    Any,
}

impl HostPattern {
    pub(crate) fn compile(hostname: &str) -> HostPattern {
        let lower = hostname.trim_end_matches('.').to_ascii_lowercase();
        if lower == "*" {
            HostPattern::Any
        } else if let Some(suffix) = lower.strip_prefix('*') {
            HostPattern::Wildcard(suffix.into())
        } else {
            HostPattern::Exact(lower.into())
        }
    }

    pub(crate) fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostPattern::Any, _) => true,
            (_, None) => false,
            (HostPattern::Exact(h), Some(host)) => host == &**h,
            (HostPattern::Wildcard(suffix), Some(host)) => host.len() > suffix.len() && host.ends_with(&**suffix),
        }
    }

    /// Gateway API: a matching non-wildcard hostname beats any wildcard; then more characters win.
    pub(crate) fn specificity(&self) -> (u8, usize) {
        match self {
            HostPattern::Exact(h) => (2, h.len()),
            HostPattern::Wildcard(s) => (1, s.len() + 1),
            HostPattern::Any => (0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn view<'a>(path: &'a str, query: Option<&'a str>, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method: &Method::GET,
            path,
            query,
            host: None,
            headers,
        }
    }

    fn path_match(p: PathMatch, kind: RouteKind, path: &str) -> bool {
        Conditions::compile(
            &RouteMatch {
                path: Some(p),
                ..Default::default()
            },
            kind,
        )
        .matches(&view(path, None, &HeaderMap::new()))
    }

    #[test]
    fn segment_wise_prefix() {
        let foo = || PathMatch::Prefix("/foo".into());
        for (path, want) in [
            ("/foo", true),
            ("/foo/", true),
            ("/foo/bar", true),
            ("/foobar", false),
            ("/fo", false),
        ] {
            assert_eq!(path_match(foo(), RouteKind::Http, path), want, "{path}");
        }
        // A configured trailing slash is ignored (Gateway API).
        let foo_slash = || PathMatch::Prefix("/foo/".into());
        for (path, want) in [("/foo", true), ("/foo/", true), ("/foo/x", true), ("/foox", false)] {
            assert_eq!(path_match(foo_slash(), RouteKind::Http, path), want, "{path}");
        }
        for path in ["/", "/x", "/x/y"] {
            assert!(path_match(PathMatch::Prefix("/".into()), RouteKind::Http, path));
        }
        assert!(path_match(
            PathMatch::PrefixIgnoreCase("/Foo".into()),
            RouteKind::Http,
            "/fOO/bar"
        ));
        assert!(!path_match(
            PathMatch::PrefixIgnoreCase("/Foo".into()),
            RouteKind::Http,
            "/fOObar"
        ));
    }

    #[test]
    fn virtual_service_prefix_is_plain() {
        assert!(path_match(
            PathMatch::Prefix("/foo".into()),
            RouteKind::VirtualService,
            "/foobar"
        ));
        assert!(!path_match(
            PathMatch::Prefix("/foo/".into()),
            RouteKind::VirtualService,
            "/foo"
        ));
        assert!(path_match(
            PathMatch::PrefixIgnoreCase("/FOO".into()),
            RouteKind::VirtualService,
            "/foobar"
        ));
    }

    #[test]
    fn exact_is_byte_exact() {
        assert!(path_match(PathMatch::Exact("/one".into()), RouteKind::Http, "/one"));
        for path in ["/one/", "/One", "/one/x", "/"] {
            assert!(
                !path_match(PathMatch::Exact("/one".into()), RouteKind::Http, path),
                "{path}"
            );
        }
        assert!(path_match(
            PathMatch::ExactIgnoreCase("/one".into()),
            RouteKind::Http,
            "/ONE"
        ));
    }

    #[test]
    fn regex_is_anchored() {
        let re = || PathMatch::Regex(Regex::new("/v[0-9]+").unwrap());
        assert!(path_match(re(), RouteKind::Http, "/v12"));
        assert!(!path_match(re(), RouteKind::Http, "/v12/x"));
        assert!(!path_match(re(), RouteKind::Http, "/x/v12"));
        // Leftmost-first alternation would stop at "a"; anchoring must still find the full match.
        assert!(path_match(
            PathMatch::Regex(Regex::new("/a|/ab").unwrap()),
            RouteKind::Http,
            "/ab"
        ));
    }

    fn query_match(name: &str, value: StringMatch, query: Option<&str>) -> bool {
        let m = RouteMatch {
            query: vec![QueryMatch {
                name: name.into(),
                value,
            }],
            ..Default::default()
        };
        Conditions::compile(&m, RouteKind::Http).matches(&view("/", query, &HeaderMap::new()))
    }

    #[test]
    fn query_params_are_decoded_and_first_wins() {
        let exact = |v: &str| StringMatch::Exact(v.into());
        assert!(query_match("animal", exact("whale"), Some("animal=whale")));
        assert!(query_match("animal", exact("whale"), Some("x=1&animal=whale&y")));
        assert!(!query_match("animal", exact("whale"), Some("animal=whaledolphin")));
        assert!(!query_match("animal", exact("whale"), Some("ANIMAL=whale")));
        assert!(!query_match("animal", exact("whale"), None));
        assert!(query_match("a b", exact("c&d"), Some("a%20b=c%26d")));
        assert!(query_match("k", exact("100%"), Some("k=100%")));
        assert!(query_match("k", exact("a+b"), Some("k=a+b")));
        assert!(query_match("k", exact(""), Some("k")));
        // First occurrence only.
        assert!(query_match("k", exact("1"), Some("k=1&k=2")));
        assert!(!query_match("k", exact("2"), Some("k=1&k=2")));
        let re = || StringMatch::Regex(Regex::new("[a-z]+ [a-z]+").unwrap());
        assert!(query_match("k", re(), Some("k=ab%20cd")));
        assert!(!query_match("k", re(), Some("k=ab%20cd1")));
    }

    fn header_match(value: StringMatch, invert: bool, headers: &[(&'static str, &'static str)]) -> bool {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(*n, HeaderValue::from_static(v));
        }
        let h = HeaderMatch {
            name: HeaderName::from_static("version"),
            value,
            invert,
        };
        Conditions::compile(
            &RouteMatch {
                headers: vec![h],
                ..Default::default()
            },
            RouteKind::Http,
        )
        .matches(&view("/", None, &map))
    }

    #[test]
    fn headers() {
        let exact = |v: &str| StringMatch::Exact(v.into());
        assert!(header_match(exact("one"), false, &[("version", "one")]));
        assert!(!header_match(exact("one"), false, &[("version", "One")]));
        assert!(!header_match(exact("one"), false, &[]));
        assert!(header_match(
            exact("one,two"),
            false,
            &[("version", "one"), ("version", "two")]
        ));
        assert!(!header_match(
            exact("one"),
            false,
            &[("version", "one"), ("version", "two")]
        ));
        assert!(header_match(
            StringMatch::Prefix("on".into()),
            false,
            &[("version", "one")]
        ));
        assert!(header_match(StringMatch::Present, false, &[("version", "")]));
        assert!(!header_match(StringMatch::Present, false, &[]));
        let re = || StringMatch::Regex(Regex::new("o.e").unwrap());
        assert!(header_match(re(), false, &[("version", "one")]));
        assert!(!header_match(re(), false, &[("version", "ones")]));
        let re2 = || StringMatch::Regex(Regex::new("one,t.o").unwrap());
        assert!(header_match(re2(), false, &[("version", "one"), ("version", "two")]));
        // invert: absent or different both match.
        assert!(header_match(exact("one"), true, &[]));
        assert!(header_match(exact("one"), true, &[("version", "two")]));
        assert!(!header_match(exact("one"), true, &[("version", "one")]));
    }

    fn grpc_match(service: Option<StringMatch>, method: Option<StringMatch>, path: &str) -> bool {
        let m = RouteMatch {
            grpc: Some(GrpcMethodMatch { service, method }),
            ..Default::default()
        };
        Conditions::compile(&m, RouteKind::Grpc).matches(&view(path, None, &HeaderMap::new()))
    }

    #[test]
    fn grpc_service_and_method() {
        let exact = |v: &str| Some(StringMatch::Exact(v.into()));
        assert!(grpc_match(exact("pkg.Echo"), exact("Call"), "/pkg.Echo/Call"));
        assert!(!grpc_match(exact("pkg.Echo"), exact("Call"), "/pkg.Echo/Other"));
        assert!(grpc_match(exact("pkg.Echo"), None, "/pkg.Echo/Other"));
        assert!(!grpc_match(exact("pkg.Echo"), None, "/pkg.EchoX/Call"));
        assert!(grpc_match(None, exact("Call"), "/any.Service/Call"));
        assert!(!grpc_match(exact("pkg.Echo"), None, "/pkg.Echo"));
        assert!(!grpc_match(exact("pkg.Echo"), None, "/pkg.Echo/a/b"));
        let re = Some(StringMatch::Regex(Regex::new(r"pkg\..*").unwrap()));
        assert!(grpc_match(re.clone(), None, "/pkg.Echo/Call"));
        assert!(!grpc_match(re, None, "/xpkg.Echo/Call"));
        assert!(grpc_match(None, None, "/whatever"));
    }

    #[test]
    fn hostname_wildcards() {
        let w = HostPattern::compile("*.Example.com");
        assert!(w.matches(Some("a.example.com")));
        assert!(w.matches(Some("a.b.example.com")));
        assert!(!w.matches(Some("example.com")));
        assert!(!w.matches(Some(".example.com")));
        assert!(!w.matches(Some("aexample.com")));
        assert!(!w.matches(None));
        let e = HostPattern::compile("Foo.example.com");
        assert!(e.matches(Some("foo.example.com")));
        assert!(!e.matches(Some("bar.example.com")));
        assert!(HostPattern::compile("*").matches(None));
    }
}
