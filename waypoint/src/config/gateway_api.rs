//! Gateway API (v1) objects the waypoint reads — Gateway, HTTPRoute, GRPCRoute, ReferenceGrant, Namespace —
//! and their translation into the compiled route model of `waypoint-filters`.
//!
//! Attachment follows the spec: a route with a `Service` parentRef (GAMMA) applies to traffic addressed to that
//! Service (all ports, or the one `port`); a route in another namespace than the Service is a *consumer* route
//! and applies only to clients from its own namespace, replacing the producer routes for them. A route with a
//! `Gateway` parentRef attaches to the listeners it selects (`sectionName`, `port`) when the listener's
//! `allowedRoutes` admits the route's namespace and the hostnames intersect. Cross-namespace backendRefs need a
//! ReferenceGrant; a ref that does not resolve stays in the rule and answers 500 when chosen.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use waypoint_filters::route::{
    BackendId, CorsPolicy, Filter, GrpcMethodMatch, HeaderMatch, HeaderModifier, Mirror, PathMatch, PathModifier,
    QueryMatch, Redirect, RetryPolicy, Rewrite, Route, RouteKind, RouteMatch, Rule, StringMatch, Timeouts,
    WeightedBackend,
};

use super::duration;
use super::k8s::ObjectMeta;

// ------------------------------------------------------------------------------------------------ objects

#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: Option<String>,
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayAddress {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    #[serde(default)]
    pub hostname: Option<String>,
    pub port: i64,
    pub protocol: String,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RouteNamespaces {
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpPathMatch {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ValueMatch {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    pub request_redirect: Option<RedirectFilter>,
    #[serde(default)]
    pub url_rewrite: Option<RewriteFilter>,
    #[serde(default)]
    pub request_mirror: Option<MirrorFilter>,
    #[serde(default)]
    pub cors: Option<CorsFilter>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HeaderFilter {
    #[serde(default)]
    pub set: Vec<NameValue>,
    #[serde(default)]
    pub add: Vec<NameValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifierSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedirectFilter {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub status_code: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RewriteFilter {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorFilter {
    pub backend_ref: BackendObjectRef,
    #[serde(default)]
    pub percent: Option<i64>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Fraction {
    pub numerator: i64,
    #[serde(default)]
    pub denominator: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsFilter {
    #[serde(default)]
    pub allow_origins: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    #[serde(default)]
    pub max_age: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BackendObjectRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpBackendRef {
    #[serde(flatten)]
    pub target: BackendObjectRef,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<i64>,
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GrpcRoute {
    pub metadata: ObjectMeta,
    pub spec: GrpcRouteSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodSpec>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GrpcMethodSpec {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceGrant {
    pub metadata: ObjectMeta,
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GrantFrom {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GrantTo {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
}

// ------------------------------------------------------------------------------------------------ translation

/// A problem in one field of one route; the loader turns it into a `ConfigError` naming the document.
#[derive(Debug, Clone)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn ferr(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Resolves a backend reference (namespace, service name, service port) to the snapshot's backend table.
pub trait BackendResolver {
    fn backend(&self, namespace: &str, name: &str, port: Option<u16>) -> Option<BackendId>;

    /// One DestinationRule subset of a Service port (`port` as in [`BackendResolver::backend`]); `None` when
    /// no applying DestinationRule defines the subset.
    fn subset(&self, _namespace: &str, _name: &str, _port: Option<u16>, _subset: &str) -> Option<BackendId> {
        None
    }
}

/// Who may reference whom across namespaces.
#[derive(Default)]
pub struct Grants {
    /// (target namespace, from kind, from namespace) → allowed Service names (`None` = all).
    entries: Vec<(String, String, String, Option<String>)>,
}

impl Grants {
    pub fn add(&mut self, grant: &ReferenceGrant) {
        let ns = grant.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        for from in &grant.spec.from {
            for to in &grant.spec.to {
                if to.group.is_empty() && to.kind == "Service" {
                    self.entries
                        .push((ns.clone(), from.kind.clone(), from.namespace.clone(), to.name.clone()));
                }
            }
        }
    }

    fn allows(&self, from_kind: &str, from_ns: &str, to_ns: &str, to_name: &str) -> bool {
        from_ns == to_ns
            || self.entries.iter().any(|(ns, kind, fns, name)| {
                ns == to_ns && kind == from_kind && fns == from_ns && name.as_deref().is_none_or(|n| n == to_name)
            })
    }
}

pub struct TranslateCx<'a> {
    pub resolver: &'a dyn BackendResolver,
    pub grants: &'a Grants,
}

fn string_match(kind: Option<&str>, value: &str, field: &str) -> Result<StringMatch, FieldError> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(StringMatch::Exact(value.to_string())),
        "RegularExpression" => Ok(StringMatch::Regex(anchored(value, field)?)),
        other => Err(ferr(field, format!("unsupported match type {other:?}"))),
    }
}

fn anchored(pattern: &str, field: &str) -> Result<regex::Regex, FieldError> {
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| ferr(field, format!("invalid regular expression: {e}")))
}

pub(crate) fn header_name(name: &str, field: &str) -> Result<HeaderName, FieldError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| ferr(field, format!("{name:?} is not a valid header name")))
}

fn header_matches(list: &[ValueMatch], field: &str) -> Result<Vec<HeaderMatch>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            let f = format!("{field}[{i}]");
            Ok(HeaderMatch {
                name: header_name(&h.name, &format!("{f}.name"))?,
                value: string_match(h.kind.as_deref(), &h.value, &format!("{f}.value"))?,
                invert: false,
            })
        })
        .collect()
}

fn path_match(p: &HttpPathMatch, field: &str) -> Result<PathMatch, FieldError> {
    let value = p.value.clone().unwrap_or_else(|| "/".into());
    match p.kind.as_deref().unwrap_or("PathPrefix") {
        "Exact" => {
            if !value.starts_with('/') {
                return Err(ferr(format!("{field}.value"), "must start with /"));
            }
            Ok(PathMatch::Exact(value))
        }
        "PathPrefix" => {
            if !value.starts_with('/') {
                return Err(ferr(format!("{field}.value"), "must start with /"));
            }
            let trimmed = value.trim_end_matches('/');
            Ok(PathMatch::Prefix(if trimmed.is_empty() {
                "/".into()
            } else {
                trimmed.to_string()
            }))
        }
        "RegularExpression" => Ok(PathMatch::Regex(anchored(&value, &format!("{field}.value"))?)),
        other => Err(ferr(
            format!("{field}.type"),
            format!("unsupported path match type {other:?}"),
        )),
    }
}

fn header_modifier(h: &HeaderFilter, field: &str) -> Result<HeaderModifier, FieldError> {
    let pairs = |list: &[NameValue], what: &str| -> Result<Vec<(HeaderName, HeaderValue)>, FieldError> {
        list.iter()
            .enumerate()
            .map(|(i, nv)| {
                let f = format!("{field}.{what}[{i}]");
                let name = header_name(&nv.name, &format!("{f}.name"))?;
                let value = HeaderValue::from_str(&nv.value)
                    .map_err(|_| ferr(format!("{f}.value"), "not a valid header value"))?;
                Ok((name, value))
            })
            .collect()
    };
    Ok(HeaderModifier {
        set: pairs(&h.set, "set")?,
        add: pairs(&h.add, "add")?,
        remove: h
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| header_name(n, &format!("{field}.remove[{i}]")))
            .collect::<Result<_, _>>()?,
    })
}

fn path_modifier(p: &PathModifierSpec, field: &str) -> Result<PathModifier, FieldError> {
    match p.kind.as_str() {
        "ReplaceFullPath" => Ok(PathModifier::ReplaceFullPath(
            p.replace_full_path
                .clone()
                .ok_or_else(|| ferr(format!("{field}.replaceFullPath"), "required"))?,
        )),
        "ReplacePrefixMatch" => Ok(PathModifier::ReplacePrefixMatch(
            p.replace_prefix_match
                .clone()
                .ok_or_else(|| ferr(format!("{field}.replacePrefixMatch"), "required"))?,
        )),
        other => Err(ferr(
            format!("{field}.type"),
            format!("unsupported path modifier {other:?}"),
        )),
    }
}

fn port(p: i64, field: &str) -> Result<u16, FieldError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ferr(field, format!("must be a port 1-65535, got {p}")))
}

impl TranslateCx<'_> {
    fn resolve(&self, from_kind: &str, route_ns: &str, r: &BackendObjectRef) -> Option<BackendId> {
        let group = r.group.as_deref().unwrap_or("");
        let kind = r.kind.as_deref().unwrap_or("Service");
        if !(group.is_empty() || group == "core") || kind != "Service" {
            return None;
        }
        let ns = r.namespace.as_deref().unwrap_or(route_ns);
        if !self.grants.allows(from_kind, route_ns, ns, &r.name) {
            tracing::warn!(route_namespace = route_ns, backend = %format!("{ns}/{}", r.name), "cross-namespace backendRef without a ReferenceGrant; it answers 500");
            return None;
        }
        self.resolver
            .backend(ns, &r.name, r.port.and_then(|p| u16::try_from(p).ok()))
    }

    fn filters(
        &self,
        from_kind: &str,
        route_ns: &str,
        list: &[HttpRouteFilter],
        field: &str,
    ) -> Result<Vec<Filter>, FieldError> {
        let mut out = Vec::new();
        for (i, f) in list.iter().enumerate() {
            let field = format!("{field}[{i}]");
            let missing = |what: &str| ferr(format!("{field}.{what}"), format!("required for type {}", f.kind));
            out.push(match f.kind.as_str() {
                "RequestHeaderModifier" => Filter::RequestHeaders(header_modifier(
                    f.request_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("requestHeaderModifier"))?,
                    &format!("{field}.requestHeaderModifier"),
                )?),
                "ResponseHeaderModifier" => Filter::ResponseHeaders(header_modifier(
                    f.response_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("responseHeaderModifier"))?,
                    &format!("{field}.responseHeaderModifier"),
                )?),
                "RequestRedirect" => {
                    let r = f.request_redirect.as_ref().ok_or_else(|| missing("requestRedirect"))?;
                    let status = match r.status_code.unwrap_or(302) {
                        s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                        s => {
                            return Err(ferr(
                                format!("{field}.requestRedirect.statusCode"),
                                format!("{s} is not a redirect status"),
                            ));
                        }
                    };
                    Filter::Redirect(Redirect {
                        scheme: r.scheme.clone(),
                        hostname: r.hostname.clone(),
                        port: r
                            .port
                            .map(|p| port(p, &format!("{field}.requestRedirect.port")))
                            .transpose()?,
                        path: r
                            .path
                            .as_ref()
                            .map(|p| path_modifier(p, &format!("{field}.requestRedirect.path")))
                            .transpose()?,
                        status,
                    })
                }
                "URLRewrite" => {
                    let r = f.url_rewrite.as_ref().ok_or_else(|| missing("urlRewrite"))?;
                    Filter::Rewrite(Rewrite {
                        hostname: r.hostname.clone(),
                        path: r
                            .path
                            .as_ref()
                            .map(|p| path_modifier(p, &format!("{field}.urlRewrite.path")))
                            .transpose()?,
                    })
                }
                "RequestMirror" => {
                    let m = f.request_mirror.as_ref().ok_or_else(|| missing("requestMirror"))?;
                    let (numerator, denominator) = match (&m.fraction, m.percent) {
                        (Some(fr), _) => (fr.numerator, fr.denominator.unwrap_or(100)),
                        (None, Some(p)) => (p, 100),
                        (None, None) => (100, 100),
                    };
                    if denominator <= 0 || numerator < 0 || numerator > denominator {
                        return Err(ferr(
                            format!("{field}.requestMirror"),
                            "mirror share must be between 0 and 100%",
                        ));
                    }
                    Filter::Mirror(Mirror {
                        backend: self.resolve(from_kind, route_ns, &m.backend_ref),
                        numerator: numerator as u32,
                        denominator: denominator as u32,
                    })
                }
                "CORS" => {
                    let c = f.cors.as_ref().ok_or_else(|| missing("cors"))?;
                    Filter::Cors(Arc::new(CorsPolicy {
                        allow_origins: c.allow_origins.clone(),
                        allow_methods: c.allow_methods.clone(),
                        allow_headers: c.allow_headers.clone(),
                        expose_headers: c.expose_headers.clone(),
                        allow_credentials: c.allow_credentials.unwrap_or(false),
                        max_age: c.max_age.and_then(|m| u64::try_from(m).ok()),
                    }))
                }
                other => {
                    return Err(ferr(
                        format!("{field}.type"),
                        format!("unsupported filter type {other:?}"),
                    ));
                }
            });
        }
        Ok(out)
    }

    fn backends(
        &self,
        from_kind: &str,
        route_ns: &str,
        refs: &[HttpBackendRef],
        field: &str,
    ) -> Result<Vec<WeightedBackend>, FieldError> {
        refs.iter()
            .enumerate()
            .map(|(i, b)| {
                let field = format!("{field}[{i}]");
                let weight = b.weight.unwrap_or(1);
                if !(0..=1_000_000).contains(&weight) {
                    return Err(ferr(format!("{field}.weight"), "must be between 0 and 1000000"));
                }
                Ok(WeightedBackend {
                    backend: self.resolve(from_kind, route_ns, &b.target),
                    weight: weight as u32,
                    filters: self.filters(from_kind, route_ns, &b.filters, &format!("{field}.filters"))?,
                })
            })
            .collect()
    }

    pub fn http_route(&self, r: &HttpRoute, source_order: usize) -> Result<Route, FieldError> {
        let ns = r.metadata.namespace.as_deref().unwrap_or("default");
        let mut rules = Vec::new();
        for (ri, rule) in r.spec.rules.iter().enumerate() {
            let field = format!("spec.rules[{ri}]");
            let mut matches = Vec::new();
            for (mi, m) in rule.matches.iter().enumerate() {
                let mf = format!("{field}.matches[{mi}]");
                matches.push(RouteMatch {
                    path: m
                        .path
                        .as_ref()
                        .map(|p| path_match(p, &format!("{mf}.path")))
                        .transpose()?,
                    method: m
                        .method
                        .as_ref()
                        .map(|s| {
                            Method::from_bytes(s.as_bytes()).map_err(|_| ferr(format!("{mf}.method"), "invalid method"))
                        })
                        .transpose()?,
                    headers: header_matches(&m.headers, &format!("{mf}.headers"))?,
                    query: m
                        .query_params
                        .iter()
                        .enumerate()
                        .map(|(qi, q)| {
                            Ok(QueryMatch {
                                name: q.name.clone(),
                                value: string_match(
                                    q.kind.as_deref(),
                                    &q.value,
                                    &format!("{mf}.queryParams[{qi}].value"),
                                )?,
                            })
                        })
                        .collect::<Result<_, FieldError>>()?,
                    grpc: None,
                });
            }
            let timeouts = match &rule.timeouts {
                None => Timeouts::default(),
                Some(t) => Timeouts {
                    request: timeout(t.request.as_deref(), &format!("{field}.timeouts.request"))?,
                    backend_request: timeout(
                        t.backend_request.as_deref(),
                        &format!("{field}.timeouts.backendRequest"),
                    )?,
                },
            };
            let retry = rule
                .retry
                .as_ref()
                .map(|rt| -> Result<RetryPolicy, FieldError> {
                    let attempts = rt.attempts.unwrap_or(1);
                    if !(0..=100).contains(&attempts) {
                        return Err(ferr(format!("{field}.retry.attempts"), "must be between 0 and 100"));
                    }
                    let codes = rt
                        .codes
                        .iter()
                        .map(|c| u16::try_from(*c).ok().filter(|c| (400..600).contains(c)))
                        .collect::<Option<Vec<u16>>>()
                        .ok_or_else(|| ferr(format!("{field}.retry.codes"), "codes must be 4xx or 5xx"))?;
                    Ok(RetryPolicy {
                        // Gateway API counts retries; the model counts attempts.
                        attempts: attempts as u32 + 1,
                        codes,
                        on_connect_failure: true,
                        on_reset: true,
                        backoff: rt
                            .backoff
                            .as_deref()
                            .map(|b| {
                                duration::parse(b).map_err(|e| ferr(format!("{field}.retry.backoff"), e.to_string()))
                            })
                            .transpose()?,
                        // Gateway API retries any backend failure, refused streams included.
                        on_refused_stream: true,
                        remote_localities: false,
                    })
                })
                .transpose()?;
            rules.push(Arc::new(Rule {
                name: rule.name.clone(),
                matches,
                filters: self.filters("HTTPRoute", ns, &rule.filters, &format!("{field}.filters"))?,
                backends: self.backends("HTTPRoute", ns, &rule.backend_refs, &format!("{field}.backendRefs"))?,
                timeouts,
                retry,
                direct_response: None,
                fault: None,
            }));
        }
        Ok(Route {
            kind: RouteKind::Http,
            namespace: ns.to_string(),
            name: r.metadata.name.clone(),
            creation_timestamp: r.metadata.creation_timestamp.clone(),
            source_order,
            hostnames: r.spec.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
            rules,
        })
    }

    pub fn grpc_route(&self, r: &GrpcRoute, source_order: usize) -> Result<Route, FieldError> {
        let ns = r.metadata.namespace.as_deref().unwrap_or("default");
        let mut rules = Vec::new();
        for (ri, rule) in r.spec.rules.iter().enumerate() {
            let field = format!("spec.rules[{ri}]");
            let mut matches = Vec::new();
            for (mi, m) in rule.matches.iter().enumerate() {
                let mf = format!("{field}.matches[{mi}]");
                let grpc = m
                    .method
                    .as_ref()
                    .map(|gm| -> Result<GrpcMethodMatch, FieldError> {
                        let kind = gm.kind.as_deref();
                        if gm.service.is_none() && gm.method.is_none() {
                            return Err(ferr(format!("{mf}.method"), "one of service or method is required"));
                        }
                        Ok(GrpcMethodMatch {
                            service: gm
                                .service
                                .as_deref()
                                .map(|s| string_match(kind, s, &format!("{mf}.method.service")))
                                .transpose()?,
                            method: gm
                                .method
                                .as_deref()
                                .map(|s| string_match(kind, s, &format!("{mf}.method.method")))
                                .transpose()?,
                        })
                    })
                    .transpose()?;
                matches.push(RouteMatch {
                    path: None,
                    method: None,
                    headers: header_matches(&m.headers, &format!("{mf}.headers"))?,
                    query: Vec::new(),
                    grpc,
                });
            }
            rules.push(Arc::new(Rule {
                name: rule.name.clone(),
                matches,
                filters: self.filters("GRPCRoute", ns, &rule.filters, &format!("{field}.filters"))?,
                backends: self.backends("GRPCRoute", ns, &rule.backend_refs, &format!("{field}.backendRefs"))?,
                timeouts: Timeouts::default(),
                retry: None,
                direct_response: None,
                fault: None,
            }));
        }
        Ok(Route {
            kind: RouteKind::Grpc,
            namespace: ns.to_string(),
            name: r.metadata.name.clone(),
            creation_timestamp: r.metadata.creation_timestamp.clone(),
            source_order,
            hostnames: r.spec.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
            rules,
        })
    }
}

/// Gateway API: a zero duration disables the timeout.
fn timeout(v: Option<&str>, field: &str) -> Result<Option<std::time::Duration>, FieldError> {
    match v {
        None => Ok(None),
        Some(s) => {
            let d = duration::parse(s).map_err(|e| ferr(field, e.to_string()))?;
            Ok((!d.is_zero()).then_some(d))
        }
    }
}

/// Does `listener_host` (a listener's hostname, possibly `*.x`) admit a route hostname (possibly wildcard)?
pub fn hostnames_intersect(listener_host: &str, route_host: &str) -> bool {
    fn wildcard_covers(pattern: &str, host: &str) -> bool {
        match pattern.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => pattern == host,
        }
    }
    let (l, r) = (listener_host.to_ascii_lowercase(), route_host.to_ascii_lowercase());
    l == r || wildcard_covers(&l, &r) || wildcard_covers(&r, &l)
}

/// Which listeners of `gateway` a parentRef selects, given the route's namespace and the namespaces' labels.
pub fn selected_listeners<'g>(
    gateway: &'g Gateway,
    parent: &ParentRef,
    route_ns: &str,
    namespace_labels: &HashMap<String, BTreeMap<String, String>>,
) -> Vec<&'g Listener> {
    let gw_ns = gateway.metadata.namespace.as_deref().unwrap_or("default");
    gateway
        .spec
        .listeners
        .iter()
        .filter(|l| parent.section_name.as_deref().is_none_or(|s| s == l.name))
        .filter(|l| parent.port.is_none_or(|p| p == l.port))
        .filter(|l| {
            let from = l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref());
            match from.and_then(|n| n.from.as_deref()).unwrap_or("Same") {
                "All" => true,
                "Selector" => {
                    let want = from.and_then(|n| n.selector.as_ref()).map(|s| &s.match_labels);
                    let have = namespace_labels.get(route_ns);
                    match (want, have) {
                        (Some(want), Some(have)) => want.iter().all(|(k, v)| have.get(k) == Some(v)),
                        (Some(want), None) => want.is_empty(),
                        (None, _) => true,
                    }
                }
                _ => route_ns == gw_ns,
            }
        })
        .collect()
}

/// The route hostnames effective on a listener: the route's own, narrowed by the listener's hostname.
/// `None` = the route does not attach to this listener (no hostname in common).
pub fn effective_hostnames(listener: &Listener, route_hostnames: &[String]) -> Option<Vec<String>> {
    match (&listener.hostname, route_hostnames.is_empty()) {
        (None, _) => Some(route_hostnames.to_vec()),
        (Some(l), true) => Some(vec![l.to_ascii_lowercase()]),
        (Some(l), false) => {
            let kept: Vec<String> = route_hostnames
                .iter()
                .filter(|h| hostnames_intersect(l, h))
                .cloned()
                .collect();
            (!kept.is_empty()).then_some(kept)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_intersection() {
        assert!(hostnames_intersect("*.example.com", "foo.example.com"));
        assert!(hostnames_intersect("foo.example.com", "*.example.com"));
        assert!(!hostnames_intersect("*.example.com", "example.com"));
        assert!(hostnames_intersect("a.b", "A.B"));
        assert!(!hostnames_intersect("a.b", "c.b"));
    }

    #[test]
    fn grants_allow_same_namespace_and_granted_refs_only() {
        let mut g = Grants::default();
        let grant: ReferenceGrant = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "g", "namespace": "backend"},
            "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "web"}],
                     "to": [{"group": "", "kind": "Service", "name": "api"}]}
        }))
        .unwrap();
        g.add(&grant);
        assert!(g.allows("HTTPRoute", "x", "x", "anything"));
        assert!(g.allows("HTTPRoute", "web", "backend", "api"));
        assert!(!g.allows("HTTPRoute", "web", "backend", "db"));
        assert!(!g.allows("GRPCRoute", "web", "backend", "api"));
        assert!(!g.allows("HTTPRoute", "other", "backend", "api"));
    }
}
