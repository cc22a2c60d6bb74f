//! Istio `VirtualService` (networking.istio.io) HTTP routes for services bound to the waypoint, translated into
//! the same compiled route model as Gateway API routes (kind `VirtualService`: first match wins, in order).
//!
//! Supported per http route: `match` (uri exact/prefix/regex, `ignoreUriCase`, headers, `withoutHeaders`,
//! queryParams, method, port, scheme, gateways), `route` destinations with subsets, weights and per-destination
//! headers, `redirect`, `rewrite` (uri, authority, `uriRegexRewrite`), `headers` (request/response
//! set/add/remove), `timeout`, `retries`, `fault` (delay, abort), `mirror`/`mirrors` with percentage,
//! `corsPolicy`, `directResponse`. Every field of the API is declared (an unknown one is an error); the few the
//! route model cannot express either never match (`sourceLabels`, `sourceNamespace`, `authority`: a match meant
//! for other requests must not apply to all of them) or are rejected (`delegate`, `fault.abort.http2Error`),
//! each with a warning or error naming the field.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use waypoint_filters::route::{
    AbortStatus, CorsPolicy, DirectResponse, FaultAbort, FaultDelay, FaultPolicy, Filter, HeaderMatch, HeaderModifier,
    Mirror, PathMatch, PathModifier, QueryMatch, Redirect, RetryPolicy, Rewrite, Route, RouteKind, RouteMatch, Rule,
    StringMatch, Timeouts, WeightedBackend,
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// TLS (SNI) routes: not applied (a waypoint does not route unterminated TLS by SNI).
    #[serde(default)]
    pub tls: Vec<serde_json::Value>,
    /// Opaque TCP routes: not applied (TCP tunnels go to the Service's own endpoints).
    #[serde(default)]
    pub tcp: Vec<serde_json::Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
    pub delegate: Option<serde_json::Value>,
    #[serde(default)]
    pub rewrite: Option<VsRewrite>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<VsRetries>,
    #[serde(default)]
    pub fault: Option<VsFault>,
    #[serde(default)]
    pub mirror: Option<DestinationRef>,
    /// Deprecated integer form of `mirrorPercentage`.
    #[serde(default)]
    pub mirror_percent: Option<i64>,
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringSpec>,
    #[serde(default)]
    pub scheme: Option<StringSpec>,
    #[serde(default)]
    pub method: Option<StringSpec>,
    #[serde(default)]
    pub authority: Option<StringSpec>,
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
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub stat_prefix: Option<String>,
}

/// Istio `StringMatch`: one of exact / prefix / regex (an empty object matches presence).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringSpec {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub destination: DestinationRef,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationRef {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    pub number: u16,
}

/// Istio `Percent` (0.0–100.0; an empty object is 0).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorPolicy {
    pub destination: DestinationRef,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRedirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub derive_port: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub redirect_code: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsDirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: Option<VsBody>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsBody {
    #[serde(default)]
    pub string: Option<String>,
    /// Base64, as protobuf JSON writes bytes.
    #[serde(default)]
    pub bytes: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRetries {
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Option<String>,
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
    #[serde(default)]
    pub retry_ignore_previous_hosts: Option<bool>,
    #[serde(default)]
    pub backoff: Option<String>,
}

/// `fault`: delay and/or abort a share of the requests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsFault {
    #[serde(default)]
    pub delay: Option<VsFaultDelay>,
    #[serde(default)]
    pub abort: Option<VsFaultAbort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsFaultDelay {
    #[serde(default)]
    pub fixed_delay: Option<String>,
    #[serde(default)]
    pub exponential_delay: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer form of `percentage`.
    #[serde(default)]
    pub percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsFaultAbort {
    #[serde(default)]
    pub http_status: Option<i64>,
    /// A gRPC status name (`UNAVAILABLE`) or number.
    #[serde(default)]
    pub grpc_status: Option<serde_json::Value>,
    #[serde(default)]
    pub http2_error: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsCors {
    /// Deprecated exact origins (`allowOrigins` replaces it).
    #[serde(default)]
    pub allow_origin: Vec<String>,
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
    #[serde(default)]
    pub unmatched_preflights: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOps>,
    #[serde(default)]
    pub response: Option<HeaderOps>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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

    /// `exportTo` visibility from the waypoint's namespace.
    pub fn visible_from(&self, namespace: &str) -> bool {
        let own = self.metadata.namespace.as_deref().unwrap_or("default");
        super::destination_rule::exported_to(&self.spec.export_to, own, namespace)
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

/// istiod's `DefaultPolicy`, used when a route has no `retries`: 2 retries on connect failures, refused streams
/// and 503 (retryOn `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`, retriable
/// status codes `[503]`).
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

/// `retries`, as istiod's `ConvertPolicy` reads it: a missing or zero `attempts` disables retries; a missing
/// `retryOn` keeps the default conditions; numbers in `retryOn` are retriable status codes (istiod adds
/// `retriable-status-codes` for them). Conditions mean what Envoy's router makes of them.
fn retry(r: &VsRetries, field: &str, warnings: &mut Vec<FieldError>) -> Result<Option<RetryPolicy>, FieldError> {
    let attempts = r.attempts.unwrap_or(0);
    if !(0..=100).contains(&attempts) {
        return Err(ferr(format!("{field}.attempts"), "must be between 0 and 100"));
    }
    let backoff = dur(&r.backoff, &format!("{field}.backoff"))?;
    dur(&r.per_try_timeout, &format!("{field}.perTryTimeout"))?;
    let retry_on = r.retry_on.as_deref().filter(|s| !s.trim().is_empty());
    let mut policy = match retry_on {
        None => default_retry(),
        Some(_) => RetryPolicy::default(),
    };
    for cond in retry_on
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match cond {
            // Envoy counts any upstream reset (connect failure and refused stream included) as a 5xx, so both
            // status policies retry resets too (`RetryStateImpl::wouldRetryFromReset`).
            "5xx" | "gateway-error" => {
                if cond == "5xx" {
                    policy.codes.extend(500..600);
                } else {
                    policy.codes.extend([502, 503, 504]);
                }
                policy.on_reset = true;
                policy.on_connect_failure = true;
                policy.on_refused_stream = true;
            }
            "reset" => {
                policy.on_reset = true;
                policy.on_connect_failure = true;
                policy.on_refused_stream = true;
            }
            // Resets before the request reached the upstream: a failed connect or a refused stream.
            "reset-before-request" => {
                policy.on_connect_failure = true;
                policy.on_refused_stream = true;
            }
            "connect-failure" => policy.on_connect_failure = true,
            "refused-stream" => policy.on_refused_stream = true,
            "retriable-4xx" => policy.codes.push(409),
            // The codes listed next to it are the retriable ones; on its own it adds none.
            "retriable-status-codes" => {}
            "unavailable" | "cancelled" | "deadline-exceeded" | "resource-exhausted" | "internal" => {
                warnings.push(ferr(
                    format!("{field}.retryOn"),
                    format!("{cond:?} not applied: gRPC status conditions are not evaluated by the retry layer"),
                ));
            }
            "retriable-headers" | "envoy-ratelimited" | "http3-post-connect-failure" => {
                warnings.push(ferr(
                    format!("{field}.retryOn"),
                    format!("{cond:?} has no effect here (no retriable headers, rate limiter or HTTP/3 upstream)"),
                ));
            }
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
    if attempts == 0 {
        if r.attempts.is_none() {
            warnings.push(ferr(
                format!("{field}.attempts"),
                "not set: retries are disabled (istiod reads a missing attempts as 0)",
            ));
        }
        return Ok(None);
    }
    if r.retry_ignore_previous_hosts == Some(false) {
        warnings.push(ferr(
            format!("{field}.retryIgnorePreviousHosts"),
            "not applied: a retry picks its endpoint through the load balancer like any request",
        ));
    }
    policy.attempts = attempts as u32 + 1;
    policy.backoff = backoff;
    policy.remote_localities = r.retry_remote_localities.unwrap_or(false);
    policy.codes.sort_unstable();
    policy.codes.dedup();
    Ok(Some(policy))
}

/// gRPC status codes by name, as `fault.abort.grpcStatus` writes them.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn grpc_status(v: &serde_json::Value, field: &str) -> Result<u32, FieldError> {
    let bad = || {
        ferr(
            field,
            format!("{v} is not a gRPC status (a name such as \"UNAVAILABLE\", or a number 0-16)"),
        )
    };
    let code = match v {
        serde_json::Value::Number(n) => n.as_u64().ok_or_else(bad)?,
        serde_json::Value::String(s) => match s.trim().parse::<u64>() {
            Ok(n) => n,
            Err(_) => GRPC_CODES
                .iter()
                .position(|c| c.eq_ignore_ascii_case(s.trim()))
                .ok_or_else(bad)? as u64,
        },
        _ => return Err(bad()),
    };
    if code > 16 {
        return Err(bad());
    }
    Ok(code as u32)
}

fn percentage(p: &Option<Percent>, legacy: Option<i64>, field: &str) -> Result<f64, FieldError> {
    let value = match (p, legacy) {
        (Some(p), _) => p.value,
        (None, Some(n)) => n as f64,
        (None, None) => 100.0,
    };
    if !(0.0..=100.0).contains(&value) {
        return Err(ferr(field, format!("must be between 0 and 100, got {value}")));
    }
    Ok(value)
}

/// `fault`: Envoy's fault filter, delay first, then abort, each with its own share of requests.
fn fault(f: &VsFault, field: &str) -> Result<FaultPolicy, FieldError> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err(ferr(field, "one of delay or abort is required"));
    }
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let df = format!("{field}.delay");
            if d.exponential_delay.is_some() {
                return Err(ferr(
                    format!("{df}.exponentialDelay"),
                    "not supported (Istio does not support it either): use fixedDelay",
                ));
            }
            let fixed = match &d.fixed_delay {
                None => return Err(ferr(format!("{df}.fixedDelay"), "required")),
                Some(s) => duration::parse(s).map_err(|e| ferr(format!("{df}.fixedDelay"), e.to_string()))?,
            };
            let pf = if d.percentage.is_some() {
                format!("{df}.percentage.value")
            } else {
                format!("{df}.percent")
            };
            Some(FaultDelay {
                fixed,
                percent: percentage(&d.percentage, d.percent, &pf)?,
            })
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let af = format!("{field}.abort");
            if a.http2_error.is_some() {
                return Err(ferr(
                    format!("{af}.http2Error"),
                    "not supported (Istio does not support it either): use httpStatus or grpcStatus",
                ));
            }
            let status = match (a.http_status, &a.grpc_status) {
                (Some(_), Some(_)) => return Err(ferr(&af, "httpStatus and grpcStatus are exclusive")),
                (None, None) => return Err(ferr(&af, "one of httpStatus or grpcStatus is required")),
                (Some(s), None) => match u16::try_from(s) {
                    Ok(s) if (200..600).contains(&s) => AbortStatus::Http(s),
                    _ => return Err(ferr(format!("{af}.httpStatus"), format!("must be 200-599, got {s}"))),
                },
                (None, Some(g)) => AbortStatus::Grpc(grpc_status(g, &format!("{af}.grpcStatus"))?),
            };
            Some(FaultAbort {
                status,
                percent: percentage(&a.percentage, None, &format!("{af}.percentage.value"))?,
            })
        }
    };
    Ok(FaultPolicy { delay, abort })
}

fn matches_value(m: &StringMatch, v: &str) -> bool {
    match m {
        StringMatch::Exact(e) => e == v,
        StringMatch::Prefix(p) => v.starts_with(p.as_str()),
        StringMatch::Regex(r) => r.is_match(v),
        StringMatch::Present => true,
    }
}

/// Standard base64 (padding optional), for `directResponse.body.bytes`.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim().trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Translate one VirtualService for one service port. `port` is the service port the route table is for (the
/// default destination port). Fields accepted but not acted on are reported in `warnings`.
pub fn translate(
    vs: &VirtualService,
    port: u16,
    cluster_domain: &str,
    resolver: &dyn BackendResolver,
    source_order: usize,
    warnings: &mut Vec<FieldError>,
) -> Result<Route, FieldError> {
    let own_ns = vs.metadata.namespace.as_deref().unwrap_or("default");
    let resolve = |d: &DestinationRef,
                   field: &str,
                   warnings: &mut Vec<FieldError>|
     -> Result<Option<waypoint_filters::route::BackendId>, FieldError> {
        let (ns, name) = split_host(&d.host, own_ns, cluster_domain)
            .ok_or_else(|| ferr(format!("{field}.host"), format!("{:?} is not a service host", d.host)))?;
        let p = d.port.as_ref().map(|p| p.number);
        if let Some(subset) = &d.subset {
            let found = resolver.subset(&ns, &name, p, subset).or_else(|| {
                p.is_none()
                    .then(|| resolver.subset(&ns, &name, Some(port), subset))
                    .flatten()
            });
            if found.is_none() {
                // Envoy answers such a route 503 NC (cluster not found); the config itself stays valid.
                warnings.push(ferr(
                    format!("{field}.subset"),
                    format!("subset {subset:?} is not defined by a DestinationRule for {ns}/{name}: requests routed here answer 503"),
                ));
            }
            return Ok(found);
        }
        Ok(resolver
            .backend(&ns, &name, p)
            .or_else(|| p.is_none().then(|| resolver.backend(&ns, &name, Some(port))).flatten()))
    };
    if !vs.spec.tcp.is_empty() {
        warnings.push(ferr(
            "spec.tcp",
            "not applied: opaque TCP through the waypoint goes to the Service's own endpoints",
        ));
    }
    if !vs.spec.tls.is_empty() {
        warnings.push(ferr(
            "spec.tls",
            "not applied: the waypoint does not route unterminated TLS by SNI (it is opaque TCP to the Service)",
        ));
    }
    let mut rules = Vec::new();
    for (i, h) in vs.spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        if h.delegate.is_some() {
            return Err(ferr(
                format!("{field}.delegate"),
                "not supported: this waypoint does not resolve delegate VirtualServices; put the routes here",
            ));
        }
        let mut matches = Vec::new();
        let mut any_prefix = false;
        for (mi, m) in h.matches.iter().enumerate() {
            let mf = format!("{field}.match[{mi}]");
            if m.port.is_some_and(|p| p != port) {
                continue;
            }
            if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
                // The match is for gateways only (match-level `gateways` overrides the top-level list).
                continue;
            }
            if m.source_labels.is_some() {
                // Source labels would need the client's pod labels (workload discovery); never match rather than
                // apply a route meant for other clients.
                warnings.push(ferr(
                    format!("{mf}.sourceLabels"),
                    "not supported (the client's labels are unknown to the waypoint): this match never applies",
                ));
                continue;
            }
            if m.source_namespace.is_some() {
                warnings.push(ferr(
                    format!("{mf}.sourceNamespace"),
                    "not supported by the route model: this match never applies",
                ));
                continue;
            }
            if m.authority.is_some() {
                warnings.push(ferr(
                    format!("{mf}.authority"),
                    "not supported by the route model (no per-match authority condition): this match never applies",
                ));
                continue;
            }
            if let Some(sch) = &m.scheme {
                // Requests inside an HBONE tunnel are always cleartext: the scheme is `http`.
                if !matches_value(&string_match(sch, &format!("{mf}.scheme"))?, "http") {
                    continue;
                }
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
            // Every match was for another port (or gateway, or never applies): the rule does not exist here.
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
            let cf = format!("{field}.corsPolicy");
            let mut origins: Vec<String> = c.allow_origin.clone();
            origins.extend(c.allow_origins.iter().map(|o| match (&o.exact, &o.prefix) {
                (Some(e), _) => e.clone(),
                (None, Some(p)) => format!("{p}*"),
                _ => "*".into(),
            }));
            if let Some(u) = &c.unmatched_preflights {
                match u.as_str() {
                    "UNSPECIFIED" | "FORWARD" => {}
                    "IGNORE" => warnings.push(ferr(
                        format!("{cf}.unmatchedPreflights"),
                        "IGNORE not applied: preflights from origins that do not match are forwarded (FORWARD)",
                    )),
                    other => {
                        return Err(ferr(
                            format!("{cf}.unmatchedPreflights"),
                            format!("unknown value {other:?} (FORWARD, IGNORE)"),
                        ));
                    }
                }
            }
            let max_age = dur(&c.max_age, &format!("{cf}.maxAge"))?.map(|d| d.as_secs());
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
            let rf = format!("{field}.redirect");
            let port = match (r.port, r.derive_port.as_deref()) {
                (Some(_), Some(_)) => return Err(ferr(&rf, "port and derivePort are exclusive")),
                (p, None) => p,
                (None, Some("FROM_PROTOCOL_DEFAULT")) => Some(match r.scheme.as_deref() {
                    Some(s) if s.eq_ignore_ascii_case("https") => 443,
                    _ => 80,
                }),
                (None, Some("FROM_REQUEST_PORT")) => {
                    if r.scheme.is_some() {
                        warnings.push(ferr(
                            format!("{rf}.derivePort"),
                            "with scheme set, the new scheme's default port is used instead of the request's",
                        ));
                    }
                    None
                }
                (None, Some(other)) => {
                    return Err(ferr(
                        format!("{rf}.derivePort"),
                        format!("unknown value {other:?} (FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT)"),
                    ));
                }
            };
            filters.push(Filter::Redirect(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.authority.clone(),
                port,
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
        let mut mirror_list: Vec<(DestinationRef, Option<f64>, String)> = Vec::new();
        if let Some(m) = &h.mirror {
            let pct = match (&h.mirror_percentage, h.mirror_percent) {
                (Some(p), _) => Some(p.value),
                (None, Some(n)) => Some(n as f64),
                (None, None) => None,
            };
            mirror_list.push((m.clone(), pct, format!("{field}.mirror")));
        }
        for (mi, m) in h.mirrors.iter().enumerate() {
            mirror_list.push((
                m.destination.clone(),
                m.percentage.as_ref().map(|p| p.value),
                format!("{field}.mirrors[{mi}].destination"),
            ));
        }
        for (dest, pct, mf) in &mirror_list {
            let pct = pct.unwrap_or(100.0);
            if !(0.0..=100.0).contains(&pct) {
                return Err(ferr(format!("{field}.mirrorPercentage"), "must be between 0 and 100"));
            }
            filters.push(Filter::Mirror(Mirror {
                backend: resolve(dest, mf, warnings)?,
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
                backend: resolve(&d.destination, &format!("{df}.destination"), warnings)?,
                weight: weight as u32,
                filters: header_filters(&d.headers, &format!("{df}.headers"))?,
            });
        }
        if backends.is_empty() && h.redirect.is_none() && h.direct_response.is_none() {
            return Err(ferr(&field, "one of route, redirect or directResponse is required"));
        }
        let retry = match &h.retries {
            Some(r) => retry(r, &format!("{field}.retries"), warnings)?,
            None => Some(default_retry()),
        };
        let fault = h
            .fault
            .as_ref()
            .map(|f| fault(f, &format!("{field}.fault")))
            .transpose()?;
        let direct_response = match &h.direct_response {
            None => None,
            Some(d) => {
                let body = match d.body.as_ref().map(|b| (&b.string, &b.bytes)) {
                    None | Some((None, None)) => None,
                    Some((Some(s), None)) => Some(bytes::Bytes::from(s.clone())),
                    Some((None, Some(b))) => {
                        Some(bytes::Bytes::from(base64_decode(b).ok_or_else(|| {
                            ferr(format!("{field}.directResponse.body.bytes"), "not valid base64")
                        })?))
                    }
                    Some((Some(_), Some(_))) => {
                        return Err(ferr(
                            format!("{field}.directResponse.body"),
                            "string and bytes are exclusive",
                        ));
                    }
                };
                Some(DirectResponse { status: d.status, body })
            }
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
            direct_response,
            fault,
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
    use std::path::Path;

    use super::*;
    use crate::config::{ConfigErrors, Snapshot, parse_config};

    const HEADER: &str = "apiVersion: waypoint.istio.io/v1alpha1
kind: WaypointConfig
metadata: {name: wp, namespace: infra}
spec:
  listeners: {hbone: 127.0.0.1:15008}
  tls: {certFile: c.pem, keyFile: k.pem, rootsFile: r.pem}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: ns1}
spec:
  clusterIP: 10.0.0.2
  selector: {app: echo}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: ns1, labels: {app: echo}}
status: {podIP: 127.1.0.1}
";

    /// A VirtualService for ns1/echo with these `http` routes (YAML, indented under `http:`).
    fn with_routes(http: &str) -> Result<Snapshot, ConfigErrors> {
        let text = format!(
            "{HEADER}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs, namespace: ns1}}\nspec:\n  hosts: [echo]\n  http:\n{http}"
        );
        parse_config("test.yaml", Path::new("/"), &text, 1)
    }

    fn rules(snap: &Snapshot) -> Vec<Arc<Rule>> {
        let b = snap.service(&"10.0.0.2:80".parse().unwrap()).unwrap();
        b.routes.as_ref().unwrap().producer.as_ref().unwrap().routes[0]
            .rules
            .clone()
    }

    fn error(http: &str) -> String {
        with_routes(http).unwrap_err().to_string()
    }

    #[test]
    fn fault_delay_and_abort() {
        let snap = with_routes(
            "  - match: [{uri: {prefix: /slow}}]
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 12.5}}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /legacy}}]
    fault:
      delay: {fixedDelay: 100ms, percent: 30}
      abort: {httpStatus: 503}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /grpc}}]
    fault:
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.5}}
    route: [{destination: {host: echo}}]
  - fault:
      abort: {grpcStatus: 4}
    route: [{destination: {host: echo}}]
",
        )
        .unwrap();
        let r = rules(&snap);
        assert_eq!(
            r[0].fault,
            Some(FaultPolicy {
                delay: Some(FaultDelay {
                    fixed: Duration::from_secs(2),
                    percent: 12.5
                }),
                abort: None,
            })
        );
        assert_eq!(
            r[1].fault,
            Some(FaultPolicy {
                delay: Some(FaultDelay {
                    fixed: Duration::from_millis(100),
                    percent: 30.0
                }),
                abort: Some(FaultAbort {
                    status: AbortStatus::Http(503),
                    percent: 100.0
                }),
            })
        );
        assert_eq!(
            r[2].fault.as_ref().unwrap().abort,
            Some(FaultAbort {
                status: AbortStatus::Grpc(14),
                percent: 0.5
            })
        );
        assert_eq!(
            r[3].fault.as_ref().unwrap().abort.as_ref().unwrap().status,
            AbortStatus::Grpc(4)
        );
        assert!(
            !snap.warnings.iter().any(|w| w.contains("fault")),
            "{:?}",
            snap.warnings
        );
    }

    #[test]
    fn fault_errors_name_the_field() {
        let route = "    route: [{destination: {host: echo}}]\n";
        for (fault, want) in [
            (
                "{abort: {http2Error: PROTOCOL_ERROR}}",
                "field spec.http[0].fault.abort.http2Error: not supported",
            ),
            (
                "{abort: {httpStatus: 700}}",
                "field spec.http[0].fault.abort.httpStatus: must be 200-599",
            ),
            (
                "{abort: {grpcStatus: NOPE}}",
                "field spec.http[0].fault.abort.grpcStatus:",
            ),
            (
                "{abort: {grpcStatus: 17}}",
                "field spec.http[0].fault.abort.grpcStatus:",
            ),
            (
                "{abort: {httpStatus: 500, grpcStatus: INTERNAL}}",
                "field spec.http[0].fault.abort: httpStatus and grpcStatus are exclusive",
            ),
            (
                "{delay: {fixedDelay: 1s, percentage: {value: 150}}}",
                "field spec.http[0].fault.delay.percentage.value: must be between 0 and 100",
            ),
            (
                "{delay: {fixedDelay: 1s, percent: -1}}",
                "field spec.http[0].fault.delay.percent:",
            ),
            (
                "{delay: {percent: 10}}",
                "field spec.http[0].fault.delay.fixedDelay: required",
            ),
            (
                "{delay: {exponentialDelay: 1s}}",
                "field spec.http[0].fault.delay.exponentialDelay: not supported",
            ),
            (
                "{delay: {fixedDelay: soon}}",
                "field spec.http[0].fault.delay.fixedDelay: invalid duration",
            ),
            ("{}", "field spec.http[0].fault: one of delay or abort is required"),
            (
                "{abort: {httpStatus: 503, percentage: {valu: 5}}}",
                "field spec.http[0].fault.abort.percentage.valu: unknown field `valu`",
            ),
        ] {
            let e = error(&format!("  - fault: {fault}\n{route}"));
            assert!(
                e.contains("test.yaml: document 4") && e.contains(want),
                "want {want:?} in {e}"
            );
        }
    }

    #[test]
    fn retries_follow_istio_and_envoy() {
        let snap = with_routes(
            "  - match: [{uri: {prefix: /a}}]
    retries: {attempts: 2, retryOn: 'refused-stream,retriable-4xx', retryRemoteLocalities: true, backoff: 50ms}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /b}}]
    retries: {attempts: 1, retryOn: 'retriable-status-codes,502,504'}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /c}}]
    retries: {attempts: 4, perTryTimeout: 1s}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /d}}]
    retries: {retryOn: 5xx}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /e}}]
    retries: {attempts: 1, retryOn: 'reset,unavailable'}
    route: [{destination: {host: echo}}]
  - route: [{destination: {host: echo}}]
",
        )
        .unwrap();
        let r = rules(&snap);
        let a = r[0].retry.clone().unwrap();
        assert_eq!(
            a,
            RetryPolicy {
                attempts: 3,
                codes: vec![409],
                on_connect_failure: false,
                on_reset: false,
                on_refused_stream: true,
                backoff: Some(Duration::from_millis(50)),
                remote_localities: true,
            },
            "refused-stream is not connect-failure; retriable-4xx is 409"
        );
        let b = r[1].retry.clone().unwrap();
        assert_eq!(
            b.codes,
            vec![502, 504],
            "retriable-status-codes retries the listed codes, not 503"
        );
        assert!(!b.on_connect_failure && !b.on_refused_stream && !b.on_reset);
        let c = r[2].retry.clone().unwrap();
        assert_eq!(c.attempts, 5);
        assert_eq!(c.codes, vec![503], "no retryOn keeps Istio's default conditions");
        assert!(c.on_connect_failure && c.on_refused_stream && !c.on_reset && !c.remote_localities);
        assert_eq!(r[2].timeouts.backend_request, Some(Duration::from_secs(1)));
        assert!(r[3].retry.is_none(), "istiod reads a missing attempts as 0: no retries");
        let e = r[4].retry.clone().unwrap();
        assert!(e.on_reset && e.on_connect_failure && e.on_refused_stream && e.codes.is_empty());
        assert_eq!(r[5].retry, Some(default_retry()));
        for w in [
            "field spec.http[3].retries.attempts: not set: retries are disabled",
            "field spec.http[4].retries.retryOn: \"unavailable\" not applied",
        ] {
            assert!(
                snap.warnings.iter().any(|s| s.contains(w)),
                "{w} not in {:?}",
                snap.warnings
            );
        }
        assert!(
            error("  - retries: {attempts: -1}\n    route: [{destination: {host: echo}}]\n")
                .contains("retries.attempts")
        );
    }

    #[test]
    fn match_fields_the_model_cannot_express_never_match() {
        let snap = with_routes(
            "  - match: [{authority: {exact: echo.example.com}}]
    route: [{destination: {host: echo}}]
  - match: [{sourceNamespace: ns2}]
    route: [{destination: {host: echo}}]
  - match: [{gateways: [my-gateway]}]
    route: [{destination: {host: echo}}]
  - match: [{scheme: {exact: https}}]
    route: [{destination: {host: echo}}]
  - match: [{name: plain, scheme: {exact: http}, gateways: [mesh], statPrefix: s, uri: {exact: /here}}]
    route: [{destination: {host: echo}}]
",
        )
        .unwrap();
        let r = rules(&snap);
        assert_eq!(r.len(), 1, "only the last rule can ever match here");
        assert!(matches!(r[0].matches[0].path, Some(PathMatch::Exact(ref p)) if p == "/here"));
        for w in [
            "spec.http[0].match[0].authority",
            "spec.http[1].match[0].sourceNamespace",
        ] {
            assert!(
                snap.warnings
                    .iter()
                    .any(|s| s.contains(&format!("field {w}: not supported"))),
                "{w} not in {:?}",
                snap.warnings
            );
        }
        let e = error("  - match: [{urii: {exact: /}}]\n    route: [{destination: {host: echo}}]\n");
        assert!(
            e.contains("field spec.http[0].match[0].urii: unknown field `urii`"),
            "{e}"
        );
        let e = error("  - delegate: {name: other}\n");
        assert!(e.contains("field spec.http[0].delegate: not supported"), "{e}");
    }

    #[test]
    fn other_route_fields() {
        let snap = with_routes(
            "  - match: [{uri: {exact: /bytes}}]
    directResponse: {status: 418, body: {bytes: aGVsbG8=}}
  - match: [{uri: {exact: /moved}}]
    redirect: {uri: /new, derivePort: FROM_PROTOCOL_DEFAULT, scheme: https}
  - route: [{destination: {host: echo}}]
    mirror: {host: echo}
    mirrorPercent: 25
    corsPolicy: {allowOrigin: [https://a.example], allowOrigins: [{prefix: 'https://b.'}], unmatchedPreflights: FORWARD}
",
        )
        .unwrap();
        let r = rules(&snap);
        let body = r[0].direct_response.as_ref().unwrap().body.clone().unwrap();
        assert_eq!(&body[..], b"hello");
        let redirect = r[1].filters.iter().find_map(|f| match f {
            Filter::Redirect(r) => Some(r.clone()),
            _ => None,
        });
        assert_eq!(redirect.unwrap().port, Some(443));
        let mirror = r[2].filters.iter().find_map(|f| match f {
            Filter::Mirror(m) => Some(m.numerator),
            _ => None,
        });
        assert_eq!(mirror, Some(250_000));
        let cors = r[2].filters.iter().find_map(|f| match f {
            Filter::Cors(c) => Some(c.allow_origins.clone()),
            _ => None,
        });
        assert_eq!(cors.unwrap(), vec!["https://a.example", "https://b.*"]);
        assert_eq!(base64_decode("aGk"), Some(b"hi".to_vec()));
        assert_eq!(base64_decode("a*b"), None);
    }

    #[test]
    fn export_to_and_unapplied_route_kinds() {
        let text = format!(
            "{HEADER}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs, namespace: ns1}}\nspec:\n  hosts: [echo]\n  exportTo: ['.']\n  http: [{{directResponse: {{status: 204}}}}]\n"
        );
        let snap = parse_config("test.yaml", Path::new("/"), &text, 1).unwrap();
        let b = snap.service(&"10.0.0.2:80".parse().unwrap()).unwrap();
        assert!(b.routes.is_none(), "exported to ns1 only, the waypoint is in infra");
        let text = text.replace(
            "exportTo: ['.']",
            "exportTo: [infra]\n  tcp: [{route: [{destination: {host: echo}}]}]",
        );
        let snap = parse_config("test.yaml", Path::new("/"), &text, 1).unwrap();
        assert_eq!(rules(&snap).len(), 1);
        assert!(
            snap.warnings
                .iter()
                .any(|w| w.contains("VirtualService ns1/vs): field spec.tcp: not applied")),
            "{:?}",
            snap.warnings
        );
    }

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
            &mut Vec::new(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.attempts, 4);
        assert_eq!(r.codes, vec![409, 502, 503, 504]);
        // Envoy's gateway-error also retries upstream resets (it counts them as 5xx).
        assert!(r.on_connect_failure && r.on_reset && r.on_refused_stream);
        assert!(
            retry(
                &VsRetries {
                    retry_on: Some("bogus".into()),
                    ..Default::default()
                },
                "f",
                &mut Vec::new(),
            )
            .is_err()
        );
        assert!(
            retry(
                &VsRetries {
                    attempts: Some(0),
                    ..Default::default()
                },
                "f",
                &mut Vec::new(),
            )
            .unwrap()
            .is_none()
        );
    }
}
