//! The authorization layer. Reads from the request extensions:
//! - `Arc<AuthzPolicies>`: the service's policies (inserted by the waypoint; none = nothing to enforce);
//! - [`ConnectionInfo`]: who is calling (inserted by the waypoint from the HBONE tunnel);
//! - [`RequestAuth`]: the JWT identity, when the jwt layer verified one;
//! - `Arc<dyn ExtAuthz>`: the ext_authz client, needed when a CUSTOM policy matches.
//!
//! Denied requests get Envoy's RBAC reply: 403 `RBAC: access denied`, response flag `RBAC`. Every decision is
//! logged at debug with the deciding policy and handed to the [`DecisionObserver`] (telemetry). A request a
//! CUSTOM policy's server refuses gets the server's reply (or `statusOnError`), response flag `UAEX`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use tower::{Layer, Service};

use super::custom::{CheckInput, CheckOutcome, ExtAuthz, HeaderEdits};
use super::eval::{AuthzPolicies, AuthzRequest, Decision, HttpAttributes, PolicyId, Reason, normalize_path, remote_ip};
use crate::authority::request_authority;
use crate::context::ResponseFlag;
use crate::jwt::RequestAuth;
use crate::reply::{empty_body, full_body, local_reply};
use crate::service::{HttpService, call_ready, take_ready};
use crate::{Body, ResponseFuture};

/// Facts about the connection a request arrived on, put in the request extensions by the waypoint.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    /// The HBONE peer's SPIFFE identity without `spiffe://` (`cluster.local/ns/x/sa/y`).
    pub peer_principal: Option<Arc<str>>,
    pub source_ip: Option<IpAddr>,
    /// The CONNECT authority (service VIP and service port).
    pub destination: Option<SocketAddr>,
    pub sni: Option<Arc<str>>,
}

impl ConnectionInfo {
    /// The view of an opaque stream (no HTTP attributes): for judging TCP tunnels, at open and on policy change.
    pub fn tcp_request(&self) -> AuthzRequest<'_> {
        AuthzRequest {
            peer: self.peer_principal.as_deref(),
            source_ip: self.source_ip,
            remote_ip: self.source_ip,
            destination: self.destination,
            sni: self.sni.as_deref(),
            http: None,
        }
    }
}

/// Told about every decision (metrics). Called on the request path: keep it cheap.
pub trait DecisionObserver: Send + Sync + 'static {
    fn observe(&self, decision: &Decision);
}

/// A ready-made observer: lock-free counters the waypoint can export.
#[derive(Debug, Default)]
pub struct DecisionCounters {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub audited: AtomicU64,
    /// Requests a dry-run policy would have denied.
    pub dry_run_denied: AtomicU64,
}

impl DecisionObserver for DecisionCounters {
    fn observe(&self, d: &Decision) {
        let counter = if d.allowed { &self.allowed } else { &self.denied };
        counter.fetch_add(1, Ordering::Relaxed);
        if d.audited_by.is_some() {
            self.audited.fetch_add(1, Ordering::Relaxed);
        }
        if d.dry_run.as_ref().is_some_and(|r| !r.allowed) {
            self.dry_run_denied.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Default)]
pub struct AuthzLayer {
    observer: Option<Arc<dyn DecisionObserver>>,
}

impl AuthzLayer {
    pub fn new() -> AuthzLayer {
        AuthzLayer::default()
    }

    pub fn with_observer(observer: Arc<dyn DecisionObserver>) -> AuthzLayer {
        AuthzLayer {
            observer: Some(observer),
        }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;

    fn layer(&self, inner: S) -> AuthzService<S> {
        AuthzService {
            inner,
            observer: self.observer.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthzService<S> {
    inner: S,
    observer: Option<Arc<dyn DecisionObserver>>,
}

impl<S: HttpService> Service<Request<Body>> for AuthzService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> ResponseFuture {
        let Some(policies) = req.extensions().get::<Arc<AuthzPolicies>>().cloned() else {
            return call_ready(&mut self.inner, req);
        };
        if policies.is_empty() {
            return call_ready(&mut self.inner, req);
        }
        let normalized = match normalize_path(req.uri().path(), policies.settings.path_normalization) {
            Cow::Borrowed(_) => None,
            Cow::Owned(p) => Some(p),
        };
        if let Some(path) = &normalized {
            // Forward what was judged (Envoy normalises before any filter, so routing sees it too).
            set_path(&mut req, path);
        }
        if let Some((policy, provider)) = custom_check(&policies, &req) {
            return self.call_custom(policies, policy, provider, req);
        }
        let decision = decide(&policies, &req, false);
        self.enforce(decision, req)
    }
}

impl<S: HttpService> AuthzService<S> {
    /// Reports a DENY/ALLOW decision and enforces it.
    fn enforce(&mut self, decision: Decision, req: Request<Body>) -> ResponseFuture {
        observe(self.observer.as_deref(), &decision);
        if decision.allowed {
            call_ready(&mut self.inner, req)
        } else {
            Box::pin(std::future::ready(Ok(denied())))
        }
    }

    /// A CUSTOM policy matched: ask its provider, then (when allowed) judge DENY → ALLOW as usual, the request
    /// carrying the headers the server added (Envoy's RBAC filter runs after ext_authz and sees them too).
    fn call_custom(
        &mut self,
        policies: Arc<AuthzPolicies>,
        policy: PolicyId,
        provider: String,
        mut req: Request<Body>,
    ) -> ResponseFuture {
        let observer = self.observer.clone();
        let Some(client) = req.extensions().get::<Arc<dyn ExtAuthz>>().cloned() else {
            // Config load refuses CUSTOM policies without a provider, so this is a wiring bug: never let through
            // what the server was meant to judge.
            tracing::warn!(%policy, provider, "CUSTOM policy matched but no ext_authz client is available");
            let decision = custom_denied(&policies, &req, policy);
            observe(observer.as_deref(), &decision);
            return Box::pin(std::future::ready(Ok(ext_authz_reply(
                StatusCode::FORBIDDEN,
                HeaderMap::new(),
                Bytes::new(),
            ))));
        };
        let input = check_input(&req);
        let mut inner = take_ready(&mut self.inner);
        Box::pin(async move {
            let downstream = match client.check(&provider, input).await {
                CheckOutcome::Allow { upstream, downstream } => {
                    upstream.apply(req.headers_mut());
                    downstream
                }
                CheckOutcome::Deny { status, headers, body } => {
                    tracing::debug!(%policy, provider, status = status.as_u16(), "ext_authz denied");
                    let decision = custom_denied(&policies, &req, policy);
                    observe(observer.as_deref(), &decision);
                    return Ok(ext_authz_reply(status, headers, body));
                }
                CheckOutcome::Error {
                    reason,
                    fail_open,
                    status_on_error,
                } => {
                    tracing::warn!(%policy, provider, reason, fail_open, "ext_authz check failed");
                    if !fail_open {
                        let decision = custom_denied(&policies, &req, policy);
                        observe(observer.as_deref(), &decision);
                        return Ok(ext_authz_reply(status_on_error, HeaderMap::new(), Bytes::new()));
                    }
                    HeaderEdits::default()
                }
            };
            let decision = decide(&policies, &req, false);
            observe(observer.as_deref(), &decision);
            if !decision.allowed {
                return Ok(denied());
            }
            let mut resp = call_ready(&mut inner, req).await?;
            downstream.apply(resp.headers_mut());
            Ok(resp)
        })
    }
}

fn observe(observer: Option<&dyn DecisionObserver>, decision: &Decision) {
    if let Some(o) = observer {
        o.observe(decision);
    }
    tracing::debug!(
        allowed = decision.allowed,
        reason = ?decision.reason,
        policy = decision.policy.as_deref().unwrap_or("-"),
        audited_by = decision.audited_by.as_deref().unwrap_or("-"),
        dry_run_allowed = ?decision.dry_run.as_ref().map(|d| d.allowed),
        dry_run_policy = decision.dry_run.as_ref().and_then(|d| d.policy.as_deref()).unwrap_or("-"),
        "authz decision"
    );
}

/// The decision to report when the CUSTOM policy refused (AUDIT and dry-run still evaluated for the record).
fn custom_denied<B>(policies: &AuthzPolicies, req: &Request<B>, policy: PolicyId) -> Decision {
    Decision {
        allowed: false,
        reason: Reason::CustomMatched,
        policy: Some(policy),
        ..decide(policies, req, false)
    }
}

/// A refusal on behalf of the authorization server: its status, headers and body, flagged `UAEX` as Envoy does.
pub fn ext_authz_reply(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(if body.is_empty() { empty_body() } else { full_body(body) });
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp.extensions_mut().insert(ResponseFlag("UAEX"));
    resp
}

fn check_input<B>(req: &Request<B>) -> CheckInput {
    let conn = req.extensions().get::<ConnectionInfo>();
    CheckInput {
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string()),
        host: request_authority(req).unwrap_or_default().to_string(),
        headers: req.headers().clone(),
        protocol: match req.version() {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        },
        peer_principal: conn.and_then(|c| c.peer_principal.clone()),
        source_ip: conn.and_then(|c| c.source_ip),
        destination: conn.and_then(|c| c.destination),
    }
}

/// Envoy's RBAC refusal.
pub fn denied() -> Response<Body> {
    local_reply(StatusCode::FORBIDDEN, Some("RBAC"), "RBAC: access denied")
}

/// The matching CUSTOM policy and its provider, owned so the request can move into the check's future.
fn custom_check<B>(policies: &AuthzPolicies, req: &Request<B>) -> Option<(PolicyId, String)> {
    if !policies.has_custom() {
        return None;
    }
    with_view(policies, req, |view| {
        policies
            .custom_match(view)
            .map(|(id, provider)| (id, provider.to_string()))
    })
}

/// DENY → ALLOW; with `custom`, a matching CUSTOM policy denies too.
fn decide<B>(policies: &AuthzPolicies, req: &Request<B>, custom: bool) -> Decision {
    with_view(policies, req, |view| {
        if custom {
            policies.evaluate(view)
        } else {
            policies.evaluate_after_custom(view)
        }
    })
}

fn with_view<B, T>(policies: &AuthzPolicies, req: &Request<B>, f: impl FnOnce(&AuthzRequest<'_>) -> T) -> T {
    let conn = req.extensions().get::<ConnectionInfo>();
    let host = request_authority(req).unwrap_or_default();
    let host_lower: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    let source_ip = conn.and_then(|c| c.source_ip);
    let view = AuthzRequest {
        peer: conn.and_then(|c| c.peer_principal.as_deref()),
        source_ip,
        remote_ip: remote_ip(req.headers(), source_ip, policies.settings.xff_num_trusted_hops),
        destination: conn.and_then(|c| c.destination),
        sni: conn.and_then(|c| c.sni.as_deref()),
        http: Some(HttpAttributes {
            host_lower: &host_lower,
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
            auth: req.extensions().get::<RequestAuth>(),
        }),
    };
    f(&view)
}

fn set_path<B>(req: &mut Request<B>, path: &str) {
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let Ok(pq) = PathAndQuery::try_from(pq) else {
        return;
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq);
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}
