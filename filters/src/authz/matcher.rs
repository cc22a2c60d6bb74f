//! Istio's value matching for AuthorizationPolicy fields: exact, prefix `abc*`, suffix `*abc`, and `*` (any
//! non-empty value); request principals split `iss/sub`; path templates `{*}` / `{**}`.

/// One value of a string field, as Istio compiles it to an Envoy `StringMatcher`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    /// `*`: present and non-empty (Envoy regex `.+`).
    Any,
    Exact(String),
    /// `abc*`
    Prefix(String),
    /// `*abc`
    Suffix(String),
}

impl StringMatch {
    /// Istio's order: `*` first, then a leading `*` (suffix), then a trailing `*` (prefix); so `*a*` is the
    /// suffix `a*`, literally.
    pub fn parse(v: &str) -> StringMatch {
        if v == "*" {
            StringMatch::Any
        } else if let Some(rest) = v.strip_prefix('*') {
            StringMatch::Suffix(rest.to_string())
        } else if let Some(rest) = v.strip_suffix('*') {
            StringMatch::Prefix(rest.to_string())
        } else {
            StringMatch::Exact(v.to_string())
        }
    }

    /// The same match on lower-cased text (hosts compare ignoring case).
    pub fn parse_lowercase(v: &str) -> StringMatch {
        StringMatch::parse(&v.to_ascii_lowercase())
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Any => !s.is_empty(),
            StringMatch::Exact(e) => s == e,
            StringMatch::Prefix(p) => s.starts_with(p.as_str()),
            StringMatch::Suffix(x) => s.ends_with(x.as_str()),
        }
    }
}

/// A `requestPrincipals` value: Istio splits it at the last `/` and matches `iss` and `sub` separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalMatch {
    pub iss: StringMatch,
    pub sub: StringMatch,
}

impl PrincipalMatch {
    pub fn parse(value: &str) -> PrincipalMatch {
        let split = value.rfind('/').map(|i| (&value[..i], &value[i + 1..]));
        let exact = |s: &str| StringMatch::Exact(s.to_string());
        let (iss, sub) = if value == "*" {
            (StringMatch::Any, StringMatch::Any)
        } else if let Some(rest) = value.strip_prefix('*') {
            match split {
                Some((iss, sub)) => {
                    let iss = if iss == "*" {
                        StringMatch::Any
                    } else {
                        StringMatch::Suffix(iss[1..].to_string())
                    };
                    (iss, exact(sub))
                }
                None => (StringMatch::Any, StringMatch::Suffix(rest.to_string())),
            }
        } else if let Some(rest) = value.strip_suffix('*') {
            match split {
                Some((iss, sub)) => {
                    let sub = if sub == "*" {
                        StringMatch::Any
                    } else {
                        StringMatch::Prefix(sub[..sub.len() - 1].to_string())
                    };
                    (exact(iss), sub)
                }
                None => (StringMatch::Prefix(rest.to_string()), StringMatch::Any),
            }
        } else {
            match split {
                Some((iss, sub)) => (exact(iss), exact(sub)),
                None => (exact(value), exact("")),
            }
        };
        PrincipalMatch { iss, sub }
    }

    /// `sub` absent matches nothing but an exact empty subject would need a claim: absent fails every matcher.
    pub fn matches(&self, iss: &str, sub: Option<&str>) -> bool {
        self.iss.matches(iss) && sub.is_some_and(|s| self.sub.matches(s))
    }
}

/// A `paths` value: a string match, or an Envoy URI template when it uses `{*}` / `{**}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Glob(StringMatch),
    Template(Vec<Segment>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{*}`: exactly one non-empty segment.
    One,
    /// `{**}`: the rest of the path (one or more segments, possibly empty), only last.
    Rest,
}

impl PathMatch {
    /// Err explains why a template is malformed.
    pub fn parse(v: &str) -> Result<PathMatch, String> {
        if !(v.contains("{*}") || v.contains("{**}")) {
            return Ok(PathMatch::Glob(StringMatch::parse(v)));
        }
        if !v.starts_with('/') {
            return Err("a path template must start with /".into());
        }
        let parts: Vec<&str> = v[1..].split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            segments.push(match *p {
                "{*}" => Segment::One,
                "{**}" if i + 1 == parts.len() => Segment::Rest,
                "{**}" => return Err("{**} must be the last segment of a path template".into()),
                lit if lit.contains(['{', '}', '*']) => {
                    return Err(format!("{lit:?}: template operators must be whole path segments"));
                }
                lit => Segment::Literal(lit.to_string()),
            });
        }
        Ok(PathMatch::Template(segments))
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Glob(m) => m.matches(path),
            PathMatch::Template(segments) => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let mut parts = rest.split('/');
                for seg in segments {
                    match seg {
                        Segment::Rest => return parts.next().is_some(),
                        Segment::One => {
                            if parts.next().is_none_or(str::is_empty) {
                                return false;
                            }
                        }
                        Segment::Literal(l) => {
                            if parts.next() != Some(l.as_str()) {
                                return false;
                            }
                        }
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_match() {
        assert!(StringMatch::parse("*").matches("x"));
        assert!(!StringMatch::parse("*").matches(""));
        assert!(StringMatch::parse("/admin*").matches("/administrator"));
        assert!(StringMatch::parse("*.svc").matches("a.svc"));
        assert!(StringMatch::parse("GET").matches("GET"));
        assert!(!StringMatch::parse("GET").matches("get"));
        assert_eq!(StringMatch::parse("*a*"), StringMatch::Suffix("a*".into()));
    }

    #[test]
    fn request_principal_match() {
        let m = |p: &str, iss: &str, sub: Option<&str>| PrincipalMatch::parse(p).matches(iss, sub);
        assert!(m("*", "https://i", Some("a")));
        assert!(!m("*", "https://i", None));
        assert!(m("https://i/alice", "https://i", Some("alice")));
        assert!(!m("https://i/alice", "https://i", Some("bob")));
        assert!(!m("https://i/alice", "https://i/alice", Some("")));
        assert!(m("https://i/*", "https://i", Some("zed")));
        assert!(m("https://i/al*", "https://i", Some("alice")));
        assert!(m("*/alice", "https://x", Some("alice")));
        assert!(m("*i/alice", "https://i", Some("alice")));
        assert!(!m("*i/alice", "https://j", Some("alice")));
        assert!(m("*lice", "any", Some("alice")));
        assert!(m("https:*", "https://i", Some("bob")));
    }

    #[test]
    fn path_template() {
        let t = |p: &str| PathMatch::parse(p).unwrap();
        assert!(t("/api/{*}/x").matches("/api/v1/x"));
        assert!(!t("/api/{*}/x").matches("/api//x"));
        assert!(!t("/api/{*}/x").matches("/api/a/b/x"));
        assert!(t("/api/{**}").matches("/api/a/b/c"));
        assert!(t("/api/{**}").matches("/api/"));
        assert!(!t("/api/{**}").matches("/api"));
        assert!(PathMatch::parse("/api/{**}/x").is_err());
        assert!(PathMatch::parse("/api/a{*}").is_err());
        assert!(PathMatch::parse("api/{*}").is_err());
    }
}
