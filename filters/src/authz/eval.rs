//! Evaluating the policies of one service against a request, in Istio's order:
//! CUSTOM → DENY → ALLOW (AUDIT only records; dry-run policies are evaluated on the side and never enforced).
//!
//! 1. A matching CUSTOM policy sends the request to its ext_authz provider ([`super::custom`]); the layer asks
//!    [`AuthzPolicies::custom_match`] first and then [`AuthzPolicies::evaluate_after_custom`]. Where no check
//!    can be made ([`AuthzPolicies::evaluate`]: opaque TCP streams, no client), a matching CUSTOM policy denies.
//! 2. A matching DENY policy denies.
//! 3. No ALLOW policy: allow. Some ALLOW policy: allow only when one matches. An ALLOW policy without rules
//!    matches nothing, so its mere presence denies everything; `rules: [{}]` matches everything.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderMap;

use super::model::{Action, AuthorizationPolicy};
use crate::jwt::RequestAuth;

/// What the policies see of a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthzRequest<'a> {
    /// The peer's SPIFFE identity without `spiffe://` (`td/ns/x/sa/y`), from the HBONE mTLS connection.
    pub peer: Option<&'a str>,
    /// The connection's source address (the HBONE peer).
    pub source_ip: Option<IpAddr>,
    /// The original client (from `x-forwarded-for` per trusted hops; the source address otherwise).
    pub remote_ip: Option<IpAddr>,
    /// The address the client asked for (CONNECT authority: service VIP and *service* port).
    pub destination: Option<SocketAddr>,
    pub sni: Option<&'a str>,
    /// `None` for an opaque TCP stream.
    pub http: Option<HttpAttributes<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct HttpAttributes<'a> {
    /// Host (authority as sent, with port if any), lower-cased.
    pub host_lower: &'a str,
    pub method: &'a str,
    /// Path without the query, normalised per [`PathNormalization`].
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub auth: Option<&'a RequestAuth>,
}

impl<'a> AuthzRequest<'a> {
    /// The namespace in the peer identity (`…/ns/<namespace>/…`), as Istio's `.*/ns/<ns>/.*` regex reads it.
    pub fn source_namespace(&self) -> Option<&'a str> {
        let peer = self.peer?;
        let start = peer.find("/ns/")? + 4;
        let rest = &peer[start..];
        let end = rest.find('/')?;
        Some(&rest[..end])
    }

    pub fn auth(&self) -> Option<&'a RequestAuth> {
        self.http.and_then(|h| h.auth)
    }
}

/// Istio's `meshConfig.pathNormalization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathNormalization {
    None,
    /// RFC 3986 normalisation: decode unreserved `%XX`, remove `.` / `..` segments, `\` → `/` (Istio default).
    #[default]
    Base,
    /// Base, then `//` → `/`.
    MergeSlashes,
    /// `%2F` / `%5C` decoded too, then MergeSlashes.
    DecodeAndMergeSlashes,
}

/// How the layer derives what it passes to the policies.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthzSettings {
    /// Envoy's `xff_num_trusted_hops`: 0 = `remote.ip` is the connection source; N = the Nth `x-forwarded-for`
    /// address from the right.
    pub xff_num_trusted_hops: u32,
    pub path_normalization: PathNormalization,
}

/// `namespace/name` of a policy, for logs and metrics.
pub type PolicyId = Arc<str>;

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The policy that decided (the matching CUSTOM/DENY/ALLOW policy), if one did.
    pub policy: Option<PolicyId>,
    /// A matching AUDIT policy.
    pub audited_by: Option<PolicyId>,
    /// What dry-run policies would have decided, when there are any.
    pub dry_run: Option<DryRun>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No DENY matched and there is no ALLOW policy.
    NoAllowPolicy,
    AllowMatched,
    DenyMatched,
    /// A CUSTOM policy matched and its check refused the request (or could not be made, failing closed).
    CustomMatched,
    /// There are ALLOW policies and none matched.
    NoAllowMatched,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    pub allowed: bool,
    pub policy: Option<PolicyId>,
}

struct Entry {
    id: PolicyId,
    policy: AuthorizationPolicy,
}

/// All policies that apply to one service, split by action; built once per config snapshot.
#[derive(Default)]
pub struct AuthzPolicies {
    custom: Vec<Entry>,
    deny: Vec<Entry>,
    allow: Vec<Entry>,
    audit: Vec<Entry>,
    dry_deny: Vec<Entry>,
    dry_allow: Vec<Entry>,
    pub settings: AuthzSettings,
}

impl std::fmt::Debug for AuthzPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = |v: &[Entry]| v.iter().map(|e| e.id.to_string()).collect::<Vec<_>>();
        f.debug_struct("AuthzPolicies")
            .field("custom", &ids(&self.custom))
            .field("deny", &ids(&self.deny))
            .field("allow", &ids(&self.allow))
            .field("audit", &ids(&self.audit))
            .field("dry_deny", &ids(&self.dry_deny))
            .field("dry_allow", &ids(&self.dry_allow))
            .field("settings", &self.settings)
            .finish()
    }
}

impl AuthzPolicies {
    pub fn new(policies: impl IntoIterator<Item = AuthorizationPolicy>) -> AuthzPolicies {
        let mut out = AuthzPolicies::default();
        for policy in policies {
            let entry = Entry {
                id: format!("{}/{}", policy.namespace, policy.name).into(),
                policy,
            };
            let list = match (&entry.policy.action, entry.policy.dry_run) {
                (Action::Allow, false) => &mut out.allow,
                (Action::Allow, true) => &mut out.dry_allow,
                (Action::Deny | Action::Custom { .. }, true) => &mut out.dry_deny,
                (Action::Deny, false) => &mut out.deny,
                (Action::Custom { .. }, false) => &mut out.custom,
                // An AUDIT policy decides nothing, so dry-run changes nothing for it.
                (Action::Audit, _) => &mut out.audit,
            };
            list.push(entry);
        }
        out
    }

    pub fn with_settings(mut self, settings: AuthzSettings) -> AuthzPolicies {
        self.settings = settings;
        self
    }

    /// Number of policies, every action and dry-run included.
    pub fn len(&self) -> usize {
        self.custom.len()
            + self.deny.len()
            + self.allow.len()
            + self.audit.len()
            + self.dry_deny.len()
            + self.dry_allow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.custom.is_empty()
            && self.deny.is_empty()
            && self.allow.is_empty()
            && self.audit.is_empty()
            && self.dry_deny.is_empty()
            && self.dry_allow.is_empty()
    }

    /// Whether any ALLOW/DENY/CUSTOM policy is enforced (an opaque tunnel must be re-checked when this changes).
    pub fn enforces(&self) -> bool {
        !(self.custom.is_empty() && self.deny.is_empty() && self.allow.is_empty())
    }

    fn first_match(list: &[Entry], req: &AuthzRequest<'_>) -> Option<PolicyId> {
        list.iter()
            .find(|e| e.policy.matches(req).is_some())
            .map(|e| e.id.clone())
    }

    /// Whether there is an enforced CUSTOM policy (the waypoint then provides an ext_authz client).
    pub fn has_custom(&self) -> bool {
        !self.custom.is_empty()
    }

    /// The first enforced CUSTOM policy that matches, and its provider: the request must be checked by it.
    pub fn custom_match(&self, req: &AuthzRequest<'_>) -> Option<(PolicyId, &str)> {
        self.custom.iter().find(|e| e.policy.matches(req).is_some()).map(|e| {
            let provider = match &e.policy.action {
                Action::Custom { provider } => provider.as_str(),
                _ => "",
            };
            (e.id.clone(), provider)
        })
    }

    /// The full decision; a matching CUSTOM policy denies (fail closed: nobody was asked).
    pub fn evaluate(&self, req: &AuthzRequest<'_>) -> Decision {
        self.evaluate_inner(req, true)
    }

    /// DENY → ALLOW (with AUDIT and dry-run), for a request the ext_authz server allowed or no CUSTOM matched.
    pub fn evaluate_after_custom(&self, req: &AuthzRequest<'_>) -> Decision {
        self.evaluate_inner(req, false)
    }

    fn evaluate_inner(&self, req: &AuthzRequest<'_>, custom: bool) -> Decision {
        let audited_by = Self::first_match(&self.audit, req);
        let dry_run = (!self.dry_deny.is_empty() || !self.dry_allow.is_empty()).then(|| {
            if let Some(p) = Self::first_match(&self.dry_deny, req) {
                DryRun {
                    allowed: false,
                    policy: Some(p),
                }
            } else if self.dry_allow.is_empty() {
                DryRun {
                    allowed: true,
                    policy: None,
                }
            } else {
                let p = Self::first_match(&self.dry_allow, req);
                DryRun {
                    allowed: p.is_some(),
                    policy: p,
                }
            }
        });
        let custom = if custom {
            Self::first_match(&self.custom, req)
        } else {
            None
        };
        let (allowed, reason, policy) = if let Some(p) = custom {
            (false, Reason::CustomMatched, Some(p))
        } else if let Some(p) = Self::first_match(&self.deny, req) {
            (false, Reason::DenyMatched, Some(p))
        } else if self.allow.is_empty() {
            (true, Reason::NoAllowPolicy, None)
        } else if let Some(p) = Self::first_match(&self.allow, req) {
            (true, Reason::AllowMatched, Some(p))
        } else {
            (false, Reason::NoAllowMatched, None)
        };
        Decision {
            allowed,
            reason,
            policy,
            audited_by,
            dry_run,
        }
    }
}

/// The original client per `x-forwarded-for` and the trusted hop count; `source` when the header is absent or
/// shorter than the hop count (Envoy falls back to the connection's address).
pub fn remote_ip(headers: &HeaderMap, source: Option<IpAddr>, trusted_hops: u32) -> Option<IpAddr> {
    if trusted_hops == 0 {
        return source;
    }
    let mut entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if entries.is_empty() {
        // RFC 7239 `forwarded: for=<addr>;…, for=…` (what ztunnel writes) when there is no XFF: the same hop
        // arithmetic over its `for=` elements.
        entries = headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    k.eq_ignore_ascii_case("for").then(|| v.trim().trim_matches('"'))
                })
            })
            .collect();
    }
    let index = entries.len().checked_sub(trusted_hops as usize);
    index
        .and_then(|i| entries.get(i))
        .and_then(|s| parse_forwarded_ip(s))
        .or(source)
}

fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    // `[v6]:port`, `v4:port`
    let host = s.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(h, _)| h);
    host.or_else(|| s.rsplit_once(':').map(|(h, _)| h))?.parse().ok()
}

fn unhex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Normalises a request path (no query) for matching and forwarding, as Envoy does before its filters run.
pub fn normalize_path(path: &str, mode: PathNormalization) -> Cow<'_, str> {
    if mode == PathNormalization::None {
        return Cow::Borrowed(path);
    }
    let needs = path.contains(['%', '\\'])
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..")
        || (mode != PathNormalization::Base && path.contains("//"));
    if !needs {
        return Cow::Borrowed(path);
    }
    // Percent-decoding: unreserved characters always; `/` and `\` only with DecodeAndMergeSlashes; other escapes
    // are kept, with upper-case hex.
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(unhex),
                bytes.get(i + 2).copied().and_then(unhex),
            )
        {
            let c = h * 16 + l;
            let unreserved = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~');
            let slash = matches!(c, b'/' | b'\\') && mode == PathNormalization::DecodeAndMergeSlashes;
            if unreserved || slash {
                decoded.push(c);
            } else {
                decoded.push(b'%');
                decoded.push(bytes[i + 1].to_ascii_uppercase());
                decoded.push(bytes[i + 2].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        decoded.push(if b == b'\\' { b'/' } else { b });
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            "" if mode != PathNormalization::Base && i != last => {}
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing_slash || result.is_empty() {
        result.push('/');
    }
    Cow::Owned(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_normalization() {
        let n = |p: &str, m| normalize_path(p, m).into_owned();
        use PathNormalization::*;
        assert_eq!(n("/a/b", Base), "/a/b");
        assert_eq!(n("/a/../admin", Base), "/admin");
        assert_eq!(n("/a/./b/", Base), "/a/b/");
        assert_eq!(n("/a/..", Base), "/");
        assert_eq!(n("/../..", Base), "/");
        assert_eq!(n("/%61dmin", Base), "/admin");
        assert_eq!(n("/a%2fb", Base), "/a%2Fb");
        assert_eq!(n("/a\\..\\admin", Base), "/admin");
        assert_eq!(n("//admin", Base), "//admin");
        assert_eq!(n("//admin//x", MergeSlashes), "/admin/x");
        assert_eq!(n("/a%2F%2Fadmin", DecodeAndMergeSlashes), "/a/admin");
        assert_eq!(n("/a/../admin", None), "/a/../admin");
        assert_eq!(n("/%2e%2e/admin", Base), "/admin");
        assert_eq!(n("/x/", MergeSlashes), "/x/");
    }

    #[test]
    fn remote_ip_from_xff() {
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(remote_ip(&h, Some(src), 1), Some(src));
        h.append("x-forwarded-for", "1.1.1.1, 2.2.2.2".parse().unwrap());
        h.append("x-forwarded-for", "3.3.3.3".parse().unwrap());
        assert_eq!(remote_ip(&h, Some(src), 0), Some(src));
        assert_eq!(remote_ip(&h, Some(src), 1), "3.3.3.3".parse().ok());
        assert_eq!(remote_ip(&h, Some(src), 3), "1.1.1.1".parse().ok());
        assert_eq!(remote_ip(&h, Some(src), 4), Some(src));
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(remote_ip(&h, Option::None, 1), "2001:db8::1".parse().ok());
    }

    #[test]
    fn namespace_from_peer() {
        let r = AuthzRequest {
            peer: Some("cluster.local/ns/front/sa/default"),
            ..Default::default()
        };
        assert_eq!(r.source_namespace(), Some("front"));
        let r = AuthzRequest {
            peer: Some("weird"),
            ..Default::default()
        };
        assert_eq!(r.source_namespace(), Option::None);
    }

    #[test]
    fn remote_ip_from_forwarded_when_no_xff() {
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            http::HeaderValue::from_static("for=\"10.1.2.3:4567\";host=a.b, for=192.168.0.9"),
        );
        let src = Some("127.0.0.1".parse().unwrap());
        assert_eq!(remote_ip(&h, src, 1), Some("192.168.0.9".parse().unwrap()));
        assert_eq!(remote_ip(&h, src, 2), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(remote_ip(&h, src, 0), src);
        h.insert("x-forwarded-for", http::HeaderValue::from_static("172.16.0.1"));
        assert_eq!(
            remote_ip(&h, src, 1),
            Some("172.16.0.1".parse().unwrap()),
            "XFF wins when present"
        );
    }
}
