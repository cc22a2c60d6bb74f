//! The per-request L7 pipeline for addresses that have routes or security policy, composed once at start-up.
//! Read top to bottom, this is what happens to such a request: verify its JWT, authorize it, pick the rule,
//! pick the backend, answer CORS preflights and
//! redirects, rewrite headers and path, mirror, then send with the request timeout around retries around the
//! per-try timeout. Every layer reads its config from the request extensions (the matched rule), so one stack
//! serves every snapshot; the innermost service is [`UpstreamService`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};
use waypoint_filters::authz::DecisionCounters;
use waypoint_filters::context::{ChosenBackend, FailureKind, MirrorSink, ResponseFlag, UpstreamFailure};
use waypoint_filters::route::BackendId;
use waypoint_filters::{authz, backend, cors, headers, jwt, mirror, redirect, retry, rewrite, route, timeout};

use super::error::ProxyError;
use super::http::local_reply;
use crate::config::{Backend, Snapshot};
use crate::upstream::Upstream;
use crate::upstream::http_pool::Body;

pub type HttpService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The layers in the order a request meets them.
pub fn stack(upstream: Arc<Upstream>, authz_counters: Arc<DecisionCounters>) -> HttpService {
    let svc = ServiceBuilder::new()
        // Istio's order: authenticate, authorize the request as the client sent it, then route.
        .layer(jwt::JwtLayer::new())
        .layer(authz::AuthzLayer::with_observer(authz_counters))
        .layer(route::RouteLayer::new())
        .layer(backend::BackendLayer::new())
        .layer(cors::CorsLayer::new())
        .layer(redirect::RedirectLayer::new())
        .layer(headers::RequestHeadersLayer::new())
        .layer(rewrite::RewriteLayer::new())
        .layer(mirror::MirrorLayer::new())
        .layer(headers::ResponseHeadersLayer::new())
        .layer(timeout::TimeoutLayer::request())
        .layer(retry::RetryLayer::new())
        .layer(timeout::TimeoutLayer::per_try())
        .service(UpstreamService { upstream });
    BoxCloneSyncService::new(svc)
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
    let mut resp = local_reply(e);
    resp.extensions_mut().insert(ResponseFlag(e.flag()));
    let kind = match e {
        ProxyError::UpstreamConnect(_) | ProxyError::IdentityMismatch(_) => Some(FailureKind::Connect),
        ProxyError::UpstreamReset(_) => Some(FailureKind::Reset),
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
