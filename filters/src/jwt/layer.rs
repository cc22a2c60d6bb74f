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
use crate::service::{HttpService, call_ready};
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
        match policy.verify_request(&req, unix_now()) {
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
