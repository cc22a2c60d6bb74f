//! Compiled routing config: what a config source (the local file, xDS) translates Gateway API HTTPRoute /
//! GRPCRoute and Istio VirtualService objects into. Regexes are compiled and tables sorted when the snapshot is
//! built; nothing here is parsed per request.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

/// Which API object a route came from (precedence and telemetry differ slightly between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Grpc,
    /// Istio VirtualService http route: first match wins in document order, no Gateway API re-sorting.
    VirtualService,
}

/// One route object (HTTPRoute, GRPCRoute, or one VirtualService) attached to one parent.
#[derive(Debug)]
pub struct Route {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    /// RFC 3339 `metadata.creationTimestamp` when given: older routes win ties.
    pub creation_timestamp: Option<String>,
    /// Position of the object in its source (file order): the tie-break after the timestamp, before the name.
    pub source_order: usize,
    /// Gateway API `hostnames` (matched against Host / :authority for Gateway parents; empty = any).
    pub hostnames: Vec<String>,
    pub rules: Vec<Arc<Rule>>,
}

#[derive(Debug, Default)]
pub struct Rule {
    /// `rules[].name` (sectionName of the rule).
    pub name: Option<String>,
    /// ORed; an empty list matches every request (Gateway API: a rule without matches is `PathPrefix /`).
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    pub backends: Vec<WeightedBackend>,
    pub timeouts: Timeouts,
    pub retry: Option<RetryPolicy>,
    /// Answer with this directly (Istio directResponse; Gateway API has none).
    pub direct_response: Option<DirectResponse>,
    /// VirtualService `fault`: delay and/or abort a share of the requests.
    pub fault: Option<FaultPolicy>,
}

/// VirtualService `fault`. Delay first, then abort (Envoy's fault filter order); each with its own share.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPolicy {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultDelay {
    pub fixed: Duration,
    /// Share of requests delayed, 0.0–100.0 (`percentage.value`; 100 when absent).
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultAbort {
    pub status: AbortStatus,
    /// Share of requests aborted, 0.0–100.0.
    pub percent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortStatus {
    /// `httpStatus`.
    Http(u16),
    /// `grpcStatus`, as its numeric code: a trailers-only gRPC reply (HTTP 200, `grpc-status`).
    Grpc(u32),
}

/// All conditions ANDed.
#[derive(Debug, Default, Clone)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    /// GRPCRoute `method` match (`/<service>/<method>` of the request path).
    pub grpc: Option<GrpcMethodMatch>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Segment-wise prefix: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`. Stored without a
    /// trailing slash (except for `/` itself); the table also ignores one if given.
    /// In a `RouteKind::VirtualService` route it is Istio's plain string prefix instead (`/foo` matches
    /// `/foobar`), so keep the VirtualService value as written, trailing slash included.
    Prefix(String),
    /// Anchored: the whole path must match.
    Regex(Regex),
    /// Istio `ignoreUriCase` variants.
    ExactIgnoreCase(String),
    PrefixIgnoreCase(String),
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
    /// Istio only (VirtualService `prefix`).
    Prefix(String),
    /// Istio only: header must be present, any value.
    Present,
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: StringMatch,
    /// Istio `withoutHeaders`: match when the header does NOT match.
    pub invert: bool,
}

#[derive(Debug, Clone)]
pub struct QueryMatch {
    pub name: String,
    pub value: StringMatch,
}

#[derive(Debug, Clone, Default)]
pub struct GrpcMethodMatch {
    pub service: Option<StringMatch>,
    pub method: Option<StringMatch>,
}

#[derive(Debug, Clone)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
    Cors(Arc<CorsPolicy>),
}

#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    /// Replace (or create) the header.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append a value (a new header line if present).
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replace the part of the path the rule's `PathPrefix` matched.
    ReplacePrefixMatch(String),
    /// Istio `uriRegexRewrite`: (regex, replacement with `\1`-style groups already converted to `$1`).
    RegexReplace(Regex, String),
}

#[derive(Debug, Clone, Default)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    /// 301, 302, 303, 307 or 308 (default 302).
    pub status: u16,
}

#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone)]
pub struct Mirror {
    /// The mirror's backend (an index into the snapshot's backend table), `None` if the ref did not resolve.
    pub backend: Option<BackendId>,
    /// Share of requests mirrored: numerator / denominator (100/100 when not given).
    pub numerator: u32,
    pub denominator: u32,
}

#[derive(Debug, Clone, Default)]
pub struct CorsPolicy {
    /// Exact origins or patterns with `*` wildcards (`https://*.example.com`); `*` alone = any origin.
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    pub max_age: Option<u64>,
}

/// Opaque handle for a backend the config source resolved; the data path maps it to endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendId(pub usize);

#[derive(Debug, Clone)]
pub struct WeightedBackend {
    /// `None` when the backendRef does not resolve (missing Service, not permitted): choosing it answers 500.
    pub backend: Option<BackendId>,
    pub weight: u32,
    /// Filters that apply only when this backend is chosen.
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Whole request, retries included (HTTPRoute `timeouts.request`, VirtualService `timeout`).
    pub request: Option<Duration>,
    /// Each attempt (HTTPRoute `timeouts.backendRequest`, VirtualService `retries.perTryTimeout`).
    pub backend_request: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first (Gateway API `attempts` counts retries: translate as attempts+1).
    pub attempts: u32,
    /// Status codes that trigger a retry.
    pub codes: Vec<u16>,
    /// Retry on connect failure (`connect-failure`).
    pub on_connect_failure: bool,
    /// Retry on a reset before response headers, the per-try timeout included (`reset`).
    pub on_reset: bool,
    /// Retry when the upstream refused the stream (HTTP/2 REFUSED_STREAM; `refused-stream`).
    pub on_refused_stream: bool,
    pub backoff: Option<Duration>,
    /// `retryRemoteLocalities`: retries may go to endpoints in other localities (Istio's default is false).
    pub remote_localities: bool,
}

#[derive(Debug, Clone)]
pub struct DirectResponse {
    pub status: u16,
    pub body: Option<bytes::Bytes>,
}
