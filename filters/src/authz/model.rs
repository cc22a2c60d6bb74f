//! The compiled AuthorizationPolicy and how one rule matches a request.
//!
//! Matching follows Istio's translation to Envoy RBAC: a rule matches when any `from` matches (or there is none),
//! any `to` matches (or there is none) and every `when` matches. Inside a source/operation every set field must
//! match; a field with values needs the attribute present and equal to one of them, a `not` field needs it absent
//! or equal to none of them (Envoy's `not_id` over a matcher that fails on a missing attribute).
//!
//! On an opaque TCP stream the HTTP-only fields (request principals, hosts, methods, paths, headers, JWT claims)
//! cannot be evaluated. Istio then drops every ALLOW rule that uses one (it can never allow) and ignores those
//! fields in DENY and AUDIT rules (they become wider); [`Rule::matches`] does the same through [`Mode`].

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderName;
use serde_json::Value;

use super::cidr::Cidr;
use super::eval::AuthzRequest;
use super::matcher::{PathMatch, PrincipalMatch, StringMatch};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    /// Delegated to the ext_authz provider named `provider` (see [`super::custom`]). Where no check can be made
    /// (an opaque TCP stream), a matching CUSTOM policy denies (fail closed).
    Custom {
        provider: String,
    },
}

#[derive(Debug, Clone)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    pub dry_run: bool,
}

impl AuthorizationPolicy {
    /// Whether some rule matches (the policy "applies" to the request).
    pub fn matches(&self, req: &AuthzRequest<'_>) -> Option<usize> {
        let mode = match self.action {
            Action::Allow => Mode::Allow,
            _ => Mode::DenyOrAudit,
        };
        self.rules.iter().position(|r| r.matches(req, mode))
    }
}

/// How HTTP-only fields count when the request is an opaque stream (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Allow,
    DenyOrAudit,
}

#[derive(Debug, Clone, Default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    pub fn matches(&self, req: &AuthzRequest<'_>, mode: Mode) -> bool {
        if req.http.is_none() && mode == Mode::Allow && self.uses_http() {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(req)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(req)))
            && self.when.iter().all(|c| c.matches(req))
    }

    fn uses_http(&self) -> bool {
        self.from
            .iter()
            .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
            || self.to.iter().any(Operation::uses_http)
            || self.when.iter().any(|c| c.key.http_only())
    }
}

/// One `values` / `notValues` pair. `attr` is `None` when the request lacks the attribute.
fn field<M, A: Copy>(values: &[M], not_values: &[M], attr: Option<A>, matches: impl Fn(&M, A) -> bool) -> bool {
    let hit = |list: &[M]| attr.is_some_and(|a| list.iter().any(|m| matches(m, a)));
    (values.is_empty() || hit(values)) && (not_values.is_empty() || !hit(not_values))
}

#[derive(Debug, Clone, Default)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub request_principals: Vec<PrincipalMatch>,
    pub not_request_principals: Vec<PrincipalMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
    pub remote_ip_blocks: Vec<Cidr>,
    pub not_remote_ip_blocks: Vec<Cidr>,
}

impl Source {
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.ip_blocks.is_empty()
            && self.not_ip_blocks.is_empty()
            && self.remote_ip_blocks.is_empty()
            && self.not_remote_ip_blocks.is_empty()
    }

    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let string = |m: &StringMatch, s: &str| m.matches(s);
        let cidr = |c: &Cidr, ip: IpAddr| c.contains(ip);
        field(&self.principals, &self.not_principals, req.peer, string)
            && field(&self.namespaces, &self.not_namespaces, req.source_namespace(), string)
            && field(&self.ip_blocks, &self.not_ip_blocks, req.source_ip, cidr)
            && field(&self.remote_ip_blocks, &self.not_remote_ip_blocks, req.remote_ip, cidr)
            && (req.http.is_none()
                || field(
                    &self.request_principals,
                    &self.not_request_principals,
                    req.auth(),
                    |m: &PrincipalMatch, a| m.matches(&a.issuer, a.subject.as_deref()),
                ))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Operation {
    /// Lower-cased patterns: hosts match ignoring case.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<PathMatch>,
    pub not_paths: Vec<PathMatch>,
}

impl Operation {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.ports.is_empty()
            && self.not_ports.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
    }

    fn uses_http(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }

    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let port = req.destination.map(|d| d.port());
        if !field(&self.ports, &self.not_ports, port, |p: &u16, port| *p == port) {
            return false;
        }
        let Some(http) = &req.http else {
            // Opaque stream: the HTTP-only fields are ignored (Mode::Allow rules never get here).
            return true;
        };
        let string = |m: &StringMatch, s: &str| m.matches(s);
        field(&self.hosts, &self.not_hosts, Some(http.host_lower), string)
            && field(
                &self.methods,
                &self.not_methods,
                Some(http.method),
                |m: &StringMatch, s| {
                    // `*` on a method means "any method" (Envoy's present match), not "non-empty".
                    matches!(m, StringMatch::Any) || m.matches(s)
                },
            )
            && field(&self.paths, &self.not_paths, Some(http.path), |m: &PathMatch, p| {
                m.matches(p)
            })
    }
}

/// A `when` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    RequestHeader(HeaderName),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    /// `request.auth.claims[a][b]`: the path into the payload.
    RequestClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConditionError {
    #[error("experimental.envoy.filters.* conditions (Envoy dynamic metadata) are not supported by this waypoint")]
    EnvoyMetadata,
    #[error("unknown condition key {0:?}")]
    UnknownKey(String),
    #[error("expecting {0}[<NAME>], found {1:?}")]
    Brackets(&'static str, String),
    #[error("{0:?} is not a valid header name")]
    HeaderName(String),
    #[error("at least one of values or notValues must be set")]
    NoValues,
    #[error("{0}")]
    Value(String),
}

impl ConditionKey {
    pub fn parse(key: &str) -> Result<ConditionKey, ConditionError> {
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "request.auth.principal" => ConditionKey::RequestPrincipal,
            "request.auth.audiences" => ConditionKey::RequestAudiences,
            "request.auth.presenter" => ConditionKey::RequestPresenter,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            k if k.starts_with("experimental.envoy.filters.") => return Err(ConditionError::EnvoyMetadata),
            k if k.starts_with("request.headers") => {
                let name = in_brackets(&k["request.headers".len()..])
                    .ok_or_else(|| ConditionError::Brackets("request.headers", k.to_string()))?;
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| ConditionError::HeaderName(name.to_string()))?;
                ConditionKey::RequestHeader(name)
            }
            k if k.starts_with("request.auth.claims") => {
                let path = nested_brackets(&k["request.auth.claims".len()..])
                    .ok_or_else(|| ConditionError::Brackets("request.auth.claims", k.to_string()))?;
                ConditionKey::RequestClaims(path)
            }
            k => return Err(ConditionError::UnknownKey(k.to_string())),
        })
    }

    pub fn http_only(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::RequestPrincipal
                | ConditionKey::RequestAudiences
                | ConditionKey::RequestPresenter
                | ConditionKey::RequestClaims(_)
        )
    }
}

fn in_brackets(s: &str) -> Option<&str> {
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    (!inner.is_empty()).then_some(inner)
}

/// `[a][b]` → `["a", "b"]`; `[a]` → `["a"]`.
fn nested_brackets(s: &str) -> Option<Vec<String>> {
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    let parts: Vec<String> = inner.split("][").map(str::to_string).collect();
    parts
        .iter()
        .all(|p| !p.is_empty() && !p.contains(['[', ']']))
        .then_some(parts)
}

/// The values of a condition, typed by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Values {
    Strings(Vec<StringMatch>),
    Principals(Vec<PrincipalMatch>),
    Ips(Vec<Cidr>),
    Ports(Vec<u16>),
}

impl Values {
    fn parse(key: &ConditionKey, raw: &[String]) -> Result<Values, ConditionError> {
        Ok(match key {
            ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => Values::Ips(
                raw.iter()
                    .map(|v| {
                        v.parse()
                            .map_err(|e: super::cidr::CidrError| ConditionError::Value(e.to_string()))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            ConditionKey::DestinationPort => Values::Ports(
                raw.iter()
                    .map(|v| {
                        v.parse::<u16>()
                            .map_err(|_| ConditionError::Value(format!("{v:?} is not a port (0-65535)")))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            ConditionKey::RequestPrincipal => {
                Values::Principals(raw.iter().map(|v| PrincipalMatch::parse(v)).collect())
            }
            _ => Values::Strings(raw.iter().map(|v| StringMatch::parse(v)).collect()),
        })
    }

    fn is_empty(&self) -> bool {
        match self {
            Values::Strings(v) => v.is_empty(),
            Values::Principals(v) => v.is_empty(),
            Values::Ips(v) => v.is_empty(),
            Values::Ports(v) => v.is_empty(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Values,
    pub not_values: Values,
}

impl Condition {
    pub fn parse(key: &str, values: &[String], not_values: &[String]) -> Result<Condition, ConditionError> {
        let key = ConditionKey::parse(key)?;
        if values.is_empty() && not_values.is_empty() {
            return Err(ConditionError::NoValues);
        }
        Ok(Condition {
            values: Values::parse(&key, values)?,
            not_values: Values::parse(&key, not_values)?,
            key,
        })
    }

    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        if self.key.http_only() && req.http.is_none() {
            // Only DENY/AUDIT rules get here on an opaque stream: the condition is ignored (Istio).
            return true;
        }
        let hit = |values: &Values| self.hit(values, req);
        (self.values.is_empty() || hit(&self.values)) && (self.not_values.is_empty() || !hit(&self.not_values))
    }

    /// Whether the request's attribute is present and matches one of `values`.
    fn hit(&self, values: &Values, req: &AuthzRequest<'_>) -> bool {
        match (&self.key, values) {
            (ConditionKey::SourceIp, Values::Ips(list)) => {
                req.source_ip.is_some_and(|ip| list.iter().any(|c| c.contains(ip)))
            }
            (ConditionKey::RemoteIp, Values::Ips(list)) => {
                req.remote_ip.is_some_and(|ip| list.iter().any(|c| c.contains(ip)))
            }
            (ConditionKey::DestinationIp, Values::Ips(list)) => {
                req.destination.is_some_and(|d| list.iter().any(|c| c.contains(d.ip())))
            }
            (ConditionKey::DestinationPort, Values::Ports(list)) => {
                req.destination.is_some_and(|d| list.contains(&d.port()))
            }
            (ConditionKey::SourceNamespace, Values::Strings(list)) => any_str(list, req.source_namespace()),
            (ConditionKey::SourcePrincipal, Values::Strings(list)) => any_str(list, req.peer),
            (ConditionKey::ConnectionSni, Values::Strings(list)) => any_str(list, req.sni),
            (ConditionKey::RequestPrincipal, Values::Principals(list)) => req
                .auth()
                .is_some_and(|a| list.iter().any(|m| m.matches(&a.issuer, a.subject.as_deref()))),
            (ConditionKey::RequestAudiences, Values::Strings(list)) => req
                .auth()
                .is_some_and(|a| a.audiences.iter().any(|aud| list.iter().any(|m| m.matches(aud)))),
            (ConditionKey::RequestPresenter, Values::Strings(list)) => {
                any_str(list, req.auth().and_then(|a| a.presenter.as_deref()))
            }
            (ConditionKey::RequestClaims(path), Values::Strings(list)) => req
                .auth()
                .and_then(|a| a.claim(path))
                .is_some_and(|v| claim_matches(path, v, list)),
            (ConditionKey::RequestHeader(name), Values::Strings(list)) => {
                req.http.as_ref().is_some_and(|h| header_matches(h.headers, name, list))
            }
            _ => false,
        }
    }
}

fn any_str(list: &[StringMatch], attr: Option<&str>) -> bool {
    attr.is_some_and(|s| list.iter().any(|m| m.matches(s)))
}

/// A claim matches when it is a string that matches, or a list with a string element that matches. `scope` and
/// `permission` are space-delimited lists (Istio configures Envoy to split them).
fn claim_matches(path: &[String], value: &Value, list: &[StringMatch]) -> bool {
    match value {
        Value::String(s) => {
            let spaced = path.len() == 1 && matches!(path[0].as_str(), "scope" | "permission");
            list.iter().any(|m| m.matches(s))
                || (spaced && s.split(' ').any(|part| list.iter().any(|m| m.matches(part))))
        }
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .any(|s| list.iter().any(|m| m.matches(s))),
        _ => false,
    }
}

/// Envoy joins repeated headers with `,`; Istio's matcher accepts the value as a whole or as any one element.
fn header_matches(headers: &http::HeaderMap, name: &HeaderName, list: &[StringMatch]) -> bool {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return false;
    };
    // One value (the usual case) is matched in place; repeated headers are joined as Envoy joins them.
    let whole: Cow<'_, str> = match values.next() {
        None => String::from_utf8_lossy(first.as_bytes()),
        Some(second) => {
            let all = [first, second].into_iter().chain(values);
            Cow::Owned(
                all.map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .collect::<Vec<_>>()
                    .join(","),
            )
        }
    };
    list.iter().any(|m| match m {
        // `*` is a presence match for headers (an empty value counts).
        StringMatch::Any => true,
        m => m.matches(&whole) || whole.split(',').any(|part| m.matches(part)),
    })
}
