//! Istio `VirtualService` (networking.istio.io) HTTP routes for services bound to the waypoint, translated into
//! the same compiled route model as Gateway API routes (kind `VirtualService`: first match wins, in order).
//!
//! Supported per http route: `match` (uri exact/prefix/regex, `ignoreUriCase`, headers, `withoutHeaders`,
//! queryParams, method, port), `route` destinations with weights and per-destination headers, `redirect`,
//! `rewrite` (uri, authority, `uriRegexRewrite`), `headers` (request/response set/add/remove), `timeout`,
//! `retries` (attempts, perTryTimeout, retryOn), `mirror`/`mirrors` with percentage, `corsPolicy`,
//! `directResponse`. `fault` and destination `subset`s need DestinationRule/fault support that is not built
//! yet: a route using them is reported, and a subset destination answers 500 rather than silently ignoring it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use waypoint_filters::route::{
    CorsPolicy, DirectResponse, Filter, HeaderMatch, HeaderModifier, Mirror, PathMatch, PathModifier, QueryMatch,
    Redirect, RetryPolicy, Rewrite, Route, RouteKind, RouteMatch, Rule, StringMatch, Timeouts, WeightedBackend,
};

use super::duration;
use super::gateway_api::{BackendResolver, FieldError, ferr};
use super::k8s::ObjectMeta;

#[derive(Debug, Clone, Deserialize)]
pub struct VirtualService {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VsSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct VsSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<MatchRequest>,
    #[serde(default)]
    pub route: Vec<Destination>,
    #[serde(default)]
    pub redirect: Option<VsRedirect>,
    #[serde(default)]
    pub direct_response: Option<VsDirectResponse>,
    #[serde(default)]
    pub rewrite: Option<VsRewrite>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<VsRetries>,
    #[serde(default)]
    pub fault: Option<serde_json::Value>,
    #[serde(default)]
    pub mirror: Option<DestinationRef>,
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    #[serde(default)]
    pub mirrors: Vec<MirrorPolicy>,
    #[serde(default)]
    pub cors_policy: Option<VsCors>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchRequest {
    #[serde(default)]
    pub uri: Option<StringSpec>,
    #[serde(default)]
    pub method: Option<StringSpec>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringSpec>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringSpec>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringSpec>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub source_labels: Option<BTreeMap<String, String>>,
}

/// Istio `StringMatch`: one of exact / prefix / regex (an empty object matches presence).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StringSpec {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Destination {
    pub destination: DestinationRef,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DestinationRef {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Percent {
    pub value: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MirrorPolicy {
    pub destination: DestinationRef,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRedirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub redirect_code: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VsDirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: Option<VsBody>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VsBody {
    #[serde(default)]
    pub string: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRetries {
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsCors {
    #[serde(default)]
    pub allow_origins: Vec<StringSpec>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub max_age: Option<String>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOps>,
    #[serde(default)]
    pub response: Option<HeaderOps>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

impl VirtualService {
    /// Does this VirtualService apply to mesh traffic (no `gateways`, or `mesh` among them)?
    pub fn applies_to_mesh(&self) -> bool {
        self.spec.gateways.is_empty() || self.spec.gateways.iter().any(|g| g == "mesh")
    }

    /// Services (namespace, name) named by `hosts`: a short name is relative to the VirtualService's namespace,
    /// `name.ns`, `name.ns.svc` and `name.ns.svc.<cluster domain>` are absolute.
    pub fn host_services(&self, cluster_domain: &str) -> Vec<(String, String)> {
        let own = self.metadata.namespace.as_deref().unwrap_or("default");
        self.spec
            .hosts
            .iter()
            .filter_map(|h| split_host(h, own, cluster_domain))
            .collect()
    }
}

fn split_host(host: &str, own_ns: &str, cluster_domain: &str) -> Option<(String, String)> {
    let host = host.trim_end_matches('.');
    let host = host.strip_suffix(&format!(".{cluster_domain}")).unwrap_or(host);
    let host = host.strip_suffix(".svc").unwrap_or(host);
    match host.split('.').collect::<Vec<_>>().as_slice() {
        [name] if !name.contains('*') => Some((own_ns.to_string(), name.to_string())),
        [name, ns] => Some((ns.to_string(), name.to_string())),
        _ => None,
    }
}

fn string_match(s: &StringSpec, field: &str) -> Result<StringMatch, FieldError> {
    Ok(match (&s.exact, &s.prefix, &s.regex) {
        (Some(e), None, None) => StringMatch::Exact(e.clone()),
        (None, Some(p), None) => StringMatch::Prefix(p.clone()),
        (None, None, Some(r)) => StringMatch::Regex(
            regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| ferr(field, format!("invalid regex: {e}")))?,
        ),
        (None, None, None) => StringMatch::Present,
        _ => return Err(ferr(field, "exactly one of exact, prefix or regex")),
    })
}

fn header_ops(ops: &HeaderOps, field: &str) -> Result<HeaderModifier, FieldError> {
    let pair = |k: &String, v: &String, what: &str| -> Result<(HeaderName, HeaderValue), FieldError> {
        let f = format!("{field}.{what}.{k}");
        Ok((
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| ferr(&f, "invalid header name"))?,
            HeaderValue::from_str(v).map_err(|_| ferr(&f, "invalid header value"))?,
        ))
    };
    Ok(HeaderModifier {
        set: ops
            .set
            .iter()
            .map(|(k, v)| pair(k, v, "set"))
            .collect::<Result<_, _>>()?,
        add: ops
            .add
            .iter()
            .map(|(k, v)| pair(k, v, "add"))
            .collect::<Result<_, _>>()?,
        remove: ops
            .remove
            .iter()
            .map(|k| {
                HeaderName::from_bytes(k.as_bytes()).map_err(|_| ferr(format!("{field}.remove"), "invalid header name"))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn header_filters(h: &Option<Headers>, field: &str) -> Result<Vec<Filter>, FieldError> {
    let mut out = Vec::new();
    if let Some(h) = h {
        if let Some(r) = &h.request {
            out.push(Filter::RequestHeaders(header_ops(r, &format!("{field}.request"))?));
        }
        if let Some(r) = &h.response {
            out.push(Filter::ResponseHeaders(header_ops(r, &format!("{field}.response"))?));
        }
    }
    Ok(out)
}

fn dur(v: &Option<String>, field: &str) -> Result<Option<Duration>, FieldError> {
    v.as_deref()
        .map(|s| duration::parse(s).map_err(|e| ferr(field, e.to_string())))
        .transpose()
        .map(|d| d.filter(|d| !d.is_zero()))
}

/// Istio's retry defaults when a route says nothing: 2 retries on connect failures, refused streams and 503.
fn default_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        codes: vec![503],
        on_connect_failure: true,
        on_reset: false,
        on_refused_stream: true,
        backoff: None,
        remote_localities: false,
    }
}

fn retry(r: &VsRetries, field: &str) -> Result<Option<RetryPolicy>, FieldError> {
    let attempts = r.attempts.unwrap_or(2);
    if !(0..=100).contains(&attempts) {
        return Err(ferr(format!("{field}.attempts"), "must be between 0 and 100"));
    }
    if attempts == 0 {
        return Ok(None);
    }
    let mut policy = RetryPolicy {
        attempts: attempts as u32 + 1,
        ..Default::default()
    };
    let retry_on = r
        .retry_on
        .as_deref()
        .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes");
    for cond in retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match cond {
            "5xx" => policy.codes.extend(500..600),
            "gateway-error" => policy.codes.extend([502, 503, 504]),
            "connect-failure" | "refused-stream" => policy.on_connect_failure = true,
            "reset" => policy.on_reset = true,
            "retriable-4xx" => policy.codes.push(409),
            "retriable-status-codes" => policy.codes.push(503),
            // gRPC status conditions and envoy-ratelimited have no HTTP-status equivalent here; Envoy maps
            // `unavailable` to gRPC 14, which arrives as HTTP 200 + trailer, so it cannot be acted on per status.
            "unavailable" | "cancelled" | "deadline-exceeded" | "resource-exhausted" | "internal"
            | "envoy-ratelimited" => {}
            code => match code.parse::<u16>() {
                Ok(c) if (100..600).contains(&c) => policy.codes.push(c),
                _ => {
                    return Err(ferr(
                        format!("{field}.retryOn"),
                        format!("unknown retry condition {code:?}"),
                    ));
                }
            },
        }
    }
    policy.codes.sort_unstable();
    policy.codes.dedup();
    Ok(Some(policy))
}

/// Translate one VirtualService for one service port. `resolve_dest` maps a destination (host, port) to a
/// backend; `port` is the service port the route table is for (the default destination port).
pub fn translate(
    vs: &VirtualService,
    port: u16,
    cluster_domain: &str,
    resolver: &dyn BackendResolver,
    source_order: usize,
) -> Result<Route, FieldError> {
    let own_ns = vs.metadata.namespace.as_deref().unwrap_or("default");
    let resolve = |d: &DestinationRef, field: &str| -> Result<Option<waypoint_filters::route::BackendId>, FieldError> {
        let (ns, name) = split_host(&d.host, own_ns, cluster_domain)
            .ok_or_else(|| ferr(format!("{field}.host"), format!("{:?} is not a service host", d.host)))?;
        if d.subset.is_some() {
            tracing::warn!(virtual_service = %vs.metadata.name, host = %d.host, "destination subsets need DestinationRule support, not built yet; this destination answers 500");
            return Ok(None);
        }
        let p = d.port.as_ref().map(|p| p.number);
        Ok(resolver
            .backend(&ns, &name, p)
            .or_else(|| p.is_none().then(|| resolver.backend(&ns, &name, Some(port))).flatten()))
    };
    let mut rules = Vec::new();
    for (i, h) in vs.spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        if h.fault.is_some() {
            tracing::warn!(virtual_service = %vs.metadata.name, "fault injection is not supported yet; the fault is not applied");
        }
        let mut matches = Vec::new();
        let mut any_prefix = false;
        for (mi, m) in h.matches.iter().enumerate() {
            let mf = format!("{field}.match[{mi}]");
            if m.port.is_some_and(|p| p != port) {
                continue;
            }
            if m.source_labels.is_some() {
                // Source labels would need the client's pod labels (workload discovery); never match rather than
                // apply a route meant for other clients.
                tracing::warn!(virtual_service = %vs.metadata.name, "sourceLabels matches are not supported; that match never applies");
                continue;
            }
            let path = match &m.uri {
                None => None,
                Some(u) => Some(match (string_match(u, &format!("{mf}.uri"))?, m.ignore_uri_case) {
                    (StringMatch::Exact(e), false) => PathMatch::Exact(e),
                    (StringMatch::Exact(e), true) => PathMatch::ExactIgnoreCase(e.to_ascii_lowercase()),
                    (StringMatch::Prefix(p), ic) => {
                        any_prefix = true;
                        if ic {
                            PathMatch::PrefixIgnoreCase(p.to_ascii_lowercase())
                        } else {
                            PathMatch::Prefix(p)
                        }
                    }
                    (StringMatch::Regex(r), _) => PathMatch::Regex(r),
                    (StringMatch::Present, _) => PathMatch::Prefix("/".into()),
                }),
            };
            let method = match &m.method {
                None => None,
                Some(StringSpec { exact: Some(e), .. }) => {
                    Some(Method::from_bytes(e.as_bytes()).map_err(|_| ferr(format!("{mf}.method"), "invalid method"))?)
                }
                Some(_) => return Err(ferr(format!("{mf}.method"), "only exact method matches are supported")),
            };
            let mut headers = Vec::new();
            for (hs, invert) in [(&m.headers, false), (&m.without_headers, true)] {
                for (k, v) in hs {
                    headers.push(HeaderMatch {
                        name: HeaderName::from_bytes(k.as_bytes())
                            .map_err(|_| ferr(format!("{mf}.headers.{k}"), "invalid header name"))?,
                        value: string_match(v, &format!("{mf}.headers.{k}"))?,
                        invert,
                    });
                }
            }
            let query = m
                .query_params
                .iter()
                .map(|(k, v)| {
                    Ok(QueryMatch {
                        name: k.clone(),
                        value: string_match(v, &format!("{mf}.queryParams.{k}"))?,
                    })
                })
                .collect::<Result<_, FieldError>>()?;
            matches.push(RouteMatch {
                path,
                method,
                headers,
                query,
                grpc: None,
            });
        }
        if !h.matches.is_empty() && matches.is_empty() {
            // Every match was for another port (or unsupported): the rule does not exist for this port.
            continue;
        }
        if h.matches.is_empty() {
            any_prefix = true;
            matches.push(RouteMatch {
                path: Some(PathMatch::Prefix("/".into())),
                ..Default::default()
            });
        }
        let mut filters = header_filters(&h.headers, &format!("{field}.headers"))?;
        if let Some(c) = &h.cors_policy {
            let origins = c
                .allow_origins
                .iter()
                .map(|o| match (&o.exact, &o.prefix) {
                    (Some(e), _) => e.clone(),
                    (None, Some(p)) => format!("{p}*"),
                    _ => "*".into(),
                })
                .collect();
            let max_age = dur(&c.max_age, &format!("{field}.corsPolicy.maxAge"))?.map(|d| d.as_secs());
            filters.push(Filter::Cors(Arc::new(CorsPolicy {
                allow_origins: origins,
                allow_methods: c.allow_methods.clone(),
                allow_headers: c.allow_headers.clone(),
                expose_headers: c.expose_headers.clone(),
                allow_credentials: c.allow_credentials.unwrap_or(false),
                max_age,
            })));
        }
        if let Some(r) = &h.redirect {
            filters.push(Filter::Redirect(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.authority.clone(),
                port: r.port,
                path: r.uri.clone().map(PathModifier::ReplaceFullPath),
                status: r.redirect_code.unwrap_or(301),
            }));
        }
        if let Some(rw) = &h.rewrite {
            let path = match (&rw.uri, &rw.uri_regex_rewrite) {
                (Some(u), None) if any_prefix => Some(PathModifier::ReplacePrefixMatch(u.clone())),
                (Some(u), None) => Some(PathModifier::ReplaceFullPath(u.clone())),
                (None, Some(rr)) => Some(PathModifier::RegexReplace(
                    regex::Regex::new(&rr.pattern).map_err(|e| {
                        ferr(
                            format!("{field}.rewrite.uriRegexRewrite.match"),
                            format!("invalid regex: {e}"),
                        )
                    })?,
                    rr.rewrite.replace("\\\\", "$").replace('\\', "$"),
                )),
                (None, None) => None,
                (Some(_), Some(_)) => {
                    return Err(ferr(
                        format!("{field}.rewrite"),
                        "uri and uriRegexRewrite are exclusive",
                    ));
                }
            };
            filters.push(Filter::Rewrite(Rewrite {
                hostname: rw.authority.clone(),
                path,
            }));
        }
        let mut mirror_list: Vec<(DestinationRef, Option<f64>)> = Vec::new();
        if let Some(m) = &h.mirror {
            mirror_list.push((m.clone(), h.mirror_percentage.as_ref().map(|p| p.value)));
        }
        for m in &h.mirrors {
            mirror_list.push((m.destination.clone(), m.percentage.as_ref().map(|p| p.value)));
        }
        for (mi, (dest, pct)) in mirror_list.iter().enumerate() {
            let pct = pct.unwrap_or(100.0);
            if !(0.0..=100.0).contains(&pct) {
                return Err(ferr(format!("{field}.mirrorPercentage"), "must be between 0 and 100"));
            }
            filters.push(Filter::Mirror(Mirror {
                backend: resolve(dest, &format!("{field}.mirrors[{mi}]"))?,
                numerator: (pct * 10_000.0).round() as u32,
                denominator: 1_000_000,
            }));
        }
        let mut backends = Vec::new();
        for (di, d) in h.route.iter().enumerate() {
            let df = format!("{field}.route[{di}]");
            let weight = d.weight.unwrap_or(if h.route.len() == 1 { 100 } else { 0 });
            if !(0..=100).contains(&weight) {
                return Err(ferr(format!("{df}.weight"), "must be between 0 and 100"));
            }
            backends.push(WeightedBackend {
                backend: resolve(&d.destination, &format!("{df}.destination"))?,
                weight: weight as u32,
                filters: header_filters(&d.headers, &format!("{df}.headers"))?,
            });
        }
        if backends.is_empty() && h.redirect.is_none() && h.direct_response.is_none() {
            return Err(ferr(&field, "one of route, redirect or directResponse is required"));
        }
        let retry = match &h.retries {
            Some(r) => retry(r, &format!("{field}.retries"))?,
            None => Some(default_retry()),
        };
        rules.push(Arc::new(Rule {
            name: h.name.clone(),
            matches,
            filters,
            backends,
            timeouts: Timeouts {
                request: dur(&h.timeout, &format!("{field}.timeout"))?,
                backend_request: h
                    .retries
                    .as_ref()
                    .map(|r| dur(&r.per_try_timeout, &format!("{field}.retries.perTryTimeout")))
                    .transpose()?
                    .flatten(),
            },
            retry,
            direct_response: h.direct_response.as_ref().map(|d| DirectResponse {
                status: d.status,
                body: d.body.as_ref().and_then(|b| b.string.clone()).map(bytes::Bytes::from),
            }),
            fault: None,
        }));
    }
    Ok(Route {
        kind: RouteKind::VirtualService,
        namespace: own_ns.to_string(),
        name: vs.metadata.name.clone(),
        creation_timestamp: vs.metadata.creation_timestamp.clone(),
        source_order,
        hostnames: Vec::new(),
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forms() {
        assert_eq!(
            split_host("reviews", "a", "cluster.local"),
            Some(("a".into(), "reviews".into()))
        );
        assert_eq!(
            split_host("reviews.b", "a", "cluster.local"),
            Some(("b".into(), "reviews".into()))
        );
        assert_eq!(
            split_host("reviews.b.svc.cluster.local", "a", "cluster.local"),
            Some(("b".into(), "reviews".into()))
        );
        assert_eq!(split_host("*.example.com", "a", "cluster.local"), None);
    }

    #[test]
    fn retry_on_conditions() {
        let r = retry(
            &VsRetries {
                attempts: Some(3),
                retry_on: Some("gateway-error,connect-failure,409".into()),
                ..Default::default()
            },
            "f",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.attempts, 4);
        assert_eq!(r.codes, vec![409, 502, 503, 504]);
        assert!(r.on_connect_failure && !r.on_reset);
        assert!(
            retry(
                &VsRetries {
                    retry_on: Some("bogus".into()),
                    ..Default::default()
                },
                "f"
            )
            .is_err()
        );
        assert!(
            retry(
                &VsRetries {
                    attempts: Some(0),
                    ..Default::default()
                },
                "f"
            )
            .unwrap()
            .is_none()
        );
    }
}
