//! The per-request L7 pipeline for addresses that have routes or security policy, composed once at start-up.
//! Read top to bottom, this is what happens to such a request: verify its JWT, authorize it, pick the rule,
//! pick the backend (and attach its long-lived state: breaker, outlier slot), inject faults, answer CORS
//! preflights and redirects, rewrite headers and path, mirror, then send with the request timeout around
//! retries around the per-try timeout around the circuit breaker. Every layer reads its config from the
//! request extensions (the matched rule), so one stack serves every snapshot; the innermost service is
//! [`UpstreamService`], which picks the endpoint with the backend's load balancer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};
use waypoint_filters::authz::DecisionCounters;
use waypoint_filters::context::{ChosenBackend, FailureKind, MirrorSink, ResponseFlag, UpstreamFailure};
use waypoint_filters::route::BackendId;
use waypoint_filters::{
    authz, backend, breaker, cors, fault, headers, jwt, mirror, redirect, retry, rewrite, route, timeout,
};

use super::error::ProxyError;
use super::http::local_reply;
use crate::config::{Backend, Snapshot};
use crate::upstream::Upstream;
use crate::upstream::cluster::InFlight;
use crate::upstream::http_pool::Body;
use crate::upstream::outlier::Outcome;

pub type HttpService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The layers in the order a request meets them.
pub fn stack(upstream: Arc<Upstream>, authz_counters: Arc<DecisionCounters>) -> HttpService {
    let svc = ServiceBuilder::new()
        // Istio's order: authenticate, authorize the request as the client sent it, then route.
        .layer(jwt::JwtLayer::new())
        .layer(authz::AuthzLayer::with_observer(authz_counters))
        .layer(route::RouteLayer::new())
        .layer(backend::BackendLayer::new())
        .layer(BackendStateLayer {
            upstream: upstream.clone(),
        })
        .layer(fault::FaultLayer::new())
        .layer(cors::CorsLayer::new())
        .layer(redirect::RedirectLayer::new())
        .layer(headers::RequestHeadersLayer::new())
        .layer(rewrite::RewriteLayer::new())
        .layer(mirror::MirrorLayer::new())
        .layer(headers::ResponseHeadersLayer::new())
        .layer(timeout::TimeoutLayer::request())
        .layer(retry::RetryLayer::new())
        .layer(timeout::TimeoutLayer::per_try())
        .layer(breaker::BreakerLayer::new())
        .service(UpstreamService { upstream });
    BoxCloneSyncService::new(svc)
}

/// Right after the backend is chosen: hands the later layers the chosen backend's long-lived state. The
/// breaker layer and the retry layer find the backend's `Arc<CircuitBreaker>` in the extensions (only when its
/// policy limits requests or retries: absent means unlimited, and the default path stays allocation-free).
/// With outlier detection, an [`InFlight`] slot lets a timeout, which drops the attempt before it can report,
/// still count against the endpoint (Envoy counts timeouts as local-origin failures): the next attempt reports
/// it, or this layer once the request is answered.
#[derive(Clone)]
pub struct BackendStateLayer {
    pub upstream: Arc<Upstream>,
}

impl<S> tower::Layer<S> for BackendStateLayer {
    type Service = BackendStateService<S>;

    fn layer(&self, inner: S) -> BackendStateService<S> {
        BackendStateService {
            inner,
            upstream: self.upstream.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BackendStateService<S> {
    inner: S,
    upstream: Arc<Upstream>,
}

impl<S> Service<Request<Body>> for BackendStateService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    /// The inner future itself on the default path (no extra allocation), boxed with the outlier report after.
    type Future = Either<S::Future, waypoint_filters::ResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // Borrowed, not cloned: no reference count traffic on the shared backend per request.
        let (breaker, outlier) = match chosen(&req) {
            Some(backend) => {
                let rt = self.upstream.runtime(backend);
                let pool = &rt.policy.pool;
                let limited = pool.max_requests.is_some() || pool.max_retries.is_some();
                (limited.then(|| rt.state.breaker().clone()), rt.policy.outlier.is_some())
            }
            None => (None, false),
        };
        if let Some(breaker) = breaker {
            req.extensions_mut().insert(breaker);
        }
        if !outlier {
            let clone = self.inner.clone();
            return Either::Left(std::mem::replace(&mut self.inner, clone).call(req));
        }
        let slot = InFlight::default();
        req.extensions_mut().insert(slot.clone());
        let fut = call_boxed(&mut self.inner, req);
        Either::Right(Box::pin(async move {
            let resp = fut.await?;
            // An attempt still marked in flight never finished: a timeout dropped it (a client that goes away
            // drops this future too, and nothing is reported).
            if let Some((rt, index)) = slot.take() {
                rt.report(index, Outcome::LocalFailure);
            }
            Ok(resp)
        }))
    }
}

/// The chosen backend, borrowed from the request's snapshot.
fn chosen(req: &Request<Body>) -> Option<&Arc<Backend>> {
    let id = req.extensions().get::<ChosenBackend>()?.backend?;
    req.extensions().get::<Arc<Snapshot>>()?.backend(id)
}

/// Calls the service `poll_ready` readied (leaving a clone for the next call) and boxes its future, in a plain
/// function: inside an `async` block rustc cannot prove the inner future `Send` (higher-ranked lifetimes).
fn call_boxed<S>(svc: &mut S, req: Request<Body>) -> waypoint_filters::ResponseFuture
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
    S::Future: Send + 'static,
{
    let clone = svc.clone();
    Box::pin(std::mem::replace(svc, clone).call(req))
}

/// Sends a request to an endpoint of the backend the pipeline chose (or of the binding's own backend).
#[derive(Clone)]
pub struct UpstreamService {
    pub upstream: Arc<Upstream>,
}

impl Service<Request<Body>> for UpstreamService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let upstream = self.upstream.clone();
        Box::pin(async move { Ok(send(&upstream, req).await.unwrap_or_else(|e| error_reply(&e))) })
    }
}

/// The backend the route layer chose, resolved in the snapshot the route was matched in (a config swap in
/// between cannot make the id point into another table).
fn backend_of(req: &Request<Body>) -> Result<Arc<Backend>, ProxyError> {
    let chosen = req.extensions().get::<ChosenBackend>().and_then(|c| c.backend);
    let snapshot = req.extensions().get::<Arc<Snapshot>>();
    chosen
        .and_then(|id| snapshot.and_then(|s| s.backend(id)).cloned())
        .ok_or_else(|| ProxyError::NoHealthyUpstream("no backend chosen".into()))
}

pub async fn send(upstream: &Upstream, req: Request<Body>) -> Result<Response<Body>, ProxyError> {
    let backend = backend_of(&req)?;
    super::http::send_to_backend(upstream, &backend, req).await
}

/// A local reply for an upstream failure, marked so the retry layer and the access log can tell it apart
/// from a status the backend sent.
pub fn error_reply(e: &ProxyError) -> Response<Body> {
    if let ProxyError::Overflow(o) = e {
        // The same reply as the breaker layer's, so every overflow looks alike and none is retried.
        return breaker::overflow_reply(*o);
    }
    let mut resp = local_reply(e);
    resp.extensions_mut().insert(ResponseFlag(e.flag()));
    let kind = match e {
        ProxyError::UpstreamConnect(_) | ProxyError::IdentityMismatch(_) => Some(FailureKind::Connect),
        ProxyError::UpstreamReset(_) => Some(FailureKind::Reset),
        ProxyError::UpstreamRefusedStream(_) => Some(FailureKind::RefusedStream),
        ProxyError::UpstreamTimeout => Some(FailureKind::Timeout),
        _ => None,
    };
    if let Some(kind) = kind {
        resp.extensions_mut().insert(UpstreamFailure { kind });
    }
    resp
}

/// Mirrors go to the mirror backend's endpoints with the same pools as regular traffic, fire-and-forget: the
/// response is read and dropped, failures only logged.
pub struct Mirrors {
    pub upstream: Arc<Upstream>,
    pub snapshot: Arc<Snapshot>,
}

impl MirrorSink for Mirrors {
    fn mirror(&self, backend: BackendId, req: Request<Body>) {
        let Some(backend) = self.snapshot.backend(backend).cloned() else {
            return;
        };
        let upstream = self.upstream.clone();
        tokio::spawn(async move {
            match super::http::send_to_backend(&upstream, &backend, req).await {
                Ok(resp) => {
                    let _ = resp.into_body().collect().await;
                }
                Err(e) => {
                    tracing::debug!(backend = %format!("{}/{}", backend.namespace, backend.service), reason = %e, "mirror failed")
                }
            }
        });
    }
}

/// Run `req` through the pipeline.
pub async fn call(mut stack: HttpService, req: Request<Body>) -> Response<Body> {
    // Not `oneshot`: its future names `<S as Service>::Future`, and rustc then fails to prove `Send` for the
    // HTTP/2 server's spawned task (a higher-ranked lifetime limit). `call` returns a plain boxed future.
    if let Err(never) = std::future::poll_fn(|cx| stack.poll_ready(cx)).await {
        match never {}
    }
    match stack.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::upstream::test_support::{get, server, upstream};

    fn config(pod_ip: std::net::IpAddr, port: u16) -> String {
        format!(
            "apiVersion: waypoint.istio.io/v1alpha1
kind: WaypointConfig
metadata: {{name: wp, namespace: infra}}
spec:
  listeners: {{hbone: 127.0.0.1:15008}}
  tls: {{certFile: c.pem, keyFile: k.pem, rootsFile: r.pem}}
---
apiVersion: v1
kind: Service
metadata: {{name: a, namespace: ns1}}
spec:
  clusterIP: 10.96.0.1
  selector: {{app: a}}
  ports: [{{name: http, port: 80, targetPort: {port}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: a-1, namespace: ns1, labels: {{app: a}}}}
status: {{podIP: {pod_ip}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: a, namespace: ns1}}
spec:
  hosts: [a]
  http:
  - timeout: 10s
    retries: {{attempts: 3, perTryTimeout: 50ms, retryOn: 5xx}}
    route: [{{destination: {{host: a}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: a, namespace: ns1}}
spec:
  host: a
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 3, maxEjectionPercent: 100}}
"
        )
    }

    #[tokio::test]
    async fn attempts_cut_by_timeouts_count_for_outlier_detection() {
        let s = server(false).await;
        s.gate.forget_permits(tokio::sync::Semaphore::MAX_PERMITS);
        let text = config(s.addr.ip(), s.addr.port());
        let snapshot = Arc::new(crate::config::parse_config("t.yaml", Path::new("/"), &text, 1).unwrap());
        let up = upstream();
        up.prepare(&snapshot);
        let binding = snapshot.service(&"10.96.0.1:80".parse().unwrap()).unwrap();
        let table = binding
            .routes
            .as_ref()
            .and_then(|r| r.table_for("ns1"))
            .unwrap()
            .clone();
        let mut req = get("/");
        req.extensions_mut().insert(table);
        let mirrors: Arc<dyn MirrorSink> = Arc::new(Mirrors {
            upstream: up.clone(),
            snapshot: snapshot.clone(),
        });
        req.extensions_mut().insert(mirrors);
        req.extensions_mut().insert(snapshot.clone());
        let stack = stack(up.clone(), Arc::new(DecisionCounters::default()));
        let resp = call(stack, req).await;
        // `attempts: 3` is three retries: the first three attempts are cut by the per-try timeout, which ejects
        // the endpoint (consecutive5xxErrors 3), so the fourth finds no healthy endpoint (no panic threshold).
        assert_eq!(s.requests.load(Ordering::SeqCst), 3);
        assert_eq!(resp.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("UH")));
        let dump = up.registry.dump();
        let ep = &dump["ns1/a:80"]["endpoints"][0];
        assert_eq!(ep["ejected"], true, "{dump}");
        assert_eq!(ep["timesEjected"], 1, "{dump}");
        let mut req = get("/");
        let table = binding
            .routes
            .as_ref()
            .and_then(|r| r.table_for("ns1"))
            .unwrap()
            .clone();
        req.extensions_mut().insert(table);
        req.extensions_mut().insert(snapshot.clone());
        let resp = call(super::stack(up.clone(), Arc::new(DecisionCounters::default())), req).await;
        assert_eq!(resp.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("UH")));
        s.gate.add_permits(10);
    }
}
