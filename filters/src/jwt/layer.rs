//! The JWT layer: reads the service's `Arc<JwtPolicy>` from the request extensions (put there by the waypoint;
//! none = the service has no RequestAuthentication), verifies, and either refuses or passes the request on with a
//! [`RequestAuth`](super::RequestAuth) extension.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{HOST, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

use super::{JwtFailure, JwtPolicy};
use crate::reply::local_reply;
use crate::service::{HttpService, call_ready, oneshot};
use crate::{Body, ResponseFuture};

#[derive(Debug, Clone, Copy, Default)]
pub struct JwtLayer;

impl JwtLayer {
    pub fn new() -> JwtLayer {
        JwtLayer
    }
}

impl<S> Layer<S> for JwtLayer {
    type Service = JwtService<S>;

    fn layer(&self, inner: S) -> JwtService<S> {
        JwtService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct JwtService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for JwtService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> ResponseFuture {
        let Some(policy) = req.extensions().get::<Arc<JwtPolicy>>().cloned() else {
            return call_ready(&mut self.inner, req);
        };
        // Generations of the remote key sets before verifying: if the token names a kid they lack, the verifier
        // asks for a refresh, and the request waits (bounded) for a set newer than what it was judged against.
        let seen: Vec<u64> = policy
            .rules()
            .iter()
            .filter(|r| r.jwks.uri().is_some())
            .map(|r| r.jwks.generation())
            .collect();
        match policy.verify_request(&req, unix_now()) {
            Err(JwtFailure::NoMatchingKey) if !seen.is_empty() => {
                let inner = self.inner.clone();
                Box::pin(async move {
                    let remote = policy.rules().iter().filter(|r| r.jwks.uri().is_some());
                    let waits = remote.zip(seen).map(|(r, g)| {
                        Box::pin(async move { r.jwks.stored_after(g).await })
                            as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>
                    });
                    let _ = tokio::time::timeout(KEY_REFRESH_WAIT, futures_select_any(waits.collect())).await;
                    let mut req = req;
                    match policy.verify_request(&req, unix_now()) {
                        Ok(None) => oneshot(inner, req).await,
                        Ok(Some(done)) => {
                            policy.apply(&mut req, &done);
                            req.extensions_mut().insert(done.auth);
                            oneshot(inner, req).await
                        }
                        Err(failure) => Ok(refusal(&req, failure)),
                    }
                })
            }
            Ok(None) => call_ready(&mut self.inner, req),
            Ok(Some(done)) => {
                tracing::debug!(principal = %done.auth.principal, "jwt verified");
                policy.apply(&mut req, &done);
                req.extensions_mut().insert(done.auth);
                call_ready(&mut self.inner, req)
            }
            Err(failure) => {
                tracing::debug!(reason = failure.text(), "jwt refused");
                Box::pin(std::future::ready(Ok(refusal(&req, failure))))
            }
        }
    }
}

/// How long a request with an unknown `kid` waits for the key set to be refetched (Istio's default JWKS fetch
/// timeout). Keys appear at rotation time; failing those requests would make every rotation an outage.
const KEY_REFRESH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves when the first of `futs` does.
async fn futures_select_any(futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>>) {
    let mut futs = futs;
    std::future::poll_fn(move |cx| {
        if futs.iter_mut().any(|f| f.as_mut().poll(cx).is_ready()) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Envoy's reply: the status text as body, and `www-authenticate` naming the request URL as realm.
pub fn refusal<B>(req: &Request<B>, failure: JwtFailure) -> Response<Body> {
    let mut response = local_reply(failure.status(), None, failure.text());
    let challenge = format!("Bearer realm=\"{}\", error=\"invalid_token\"", original_uri(req));
    let value = HeaderValue::from_str(&challenge)
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"\", error=\"invalid_token\""));
    response.headers_mut().insert(WWW_AUTHENTICATE, value);
    response
}

/// `scheme://host/path?query` as Envoy's `buildOriginalUri` writes it (scheme from `x-forwarded-proto`).
fn original_uri<B>(req: &Request<B>) -> String {
    let scheme = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().scheme_str())
        .unwrap_or("http");
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("{scheme}://{host}{path}")
}
