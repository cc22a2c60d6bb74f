//! The timeout layers: [`TimeoutLayer::request`] bounds the whole request, retries included (HTTPRoute
//! `timeouts.request`, VirtualService `timeout`), and sits outside retry; [`TimeoutLayer::per_try`] bounds one
//! attempt (`timeouts.backendRequest`, `retries.perTryTimeout`) and sits inside it.
//!
//! On expiry the inner future is dropped, which cancels the upstream stream, and the answer is 504 `UT`. The
//! per-try reply also carries `UpstreamFailure { kind: Timeout }` so retry can tell it from a backend's 504.
//! The clock runs until the response headers arrive; a streaming response body is not cut off (as tower-http's
//! timeout). A zero duration means no timeout (Gateway API: `0s` disables it).

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::context::{FailureKind, UpstreamFailure};
use crate::reply::local_reply;
use crate::route::Matched;
use crate::service::{HttpService, call_ready};
use crate::{Body, ResponseFuture};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Request,
    PerTry,
}

#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    scope: Scope,
}

impl TimeoutLayer {
    /// Reads `rule.timeouts.request`.
    pub fn request() -> TimeoutLayer {
        TimeoutLayer { scope: Scope::Request }
    }

    /// Reads `rule.timeouts.backend_request`.
    pub fn per_try() -> TimeoutLayer {
        TimeoutLayer { scope: Scope::PerTry }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;

    fn layer(&self, inner: S) -> TimeoutService<S> {
        TimeoutService {
            inner,
            scope: self.scope,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    scope: Scope,
}

impl<S: HttpService> Service<Request<Body>> for TimeoutService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let scope = self.scope;
        let limit = req
            .extensions()
            .get::<Matched>()
            .and_then(|m| match scope {
                Scope::Request => m.rule.timeouts.request,
                Scope::PerTry => m.rule.timeouts.backend_request,
            })
            .filter(|d| !d.is_zero());
        let fut = call_ready(&mut self.inner, req);
        let Some(limit) = limit else {
            return fut;
        };
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(response) => response,
                Err(_) => Ok(timed_out(scope, limit)),
            }
        })
    }
}

fn timed_out(scope: Scope, limit: Duration) -> Response<Body> {
    tracing::debug!(?limit, per_try = scope == Scope::PerTry, "upstream request timeout");
    let mut response = local_reply(StatusCode::GATEWAY_TIMEOUT, Some("UT"), "upstream request timeout");
    if scope == Scope::PerTry {
        response.extensions_mut().insert(UpstreamFailure {
            kind: FailureKind::Timeout,
        });
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ResponseFlag;
    use crate::reply::empty_body;
    use crate::route::{Route, RouteKind, Rule, Timeouts};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt;

    fn matched(timeouts: Timeouts) -> Matched {
        Matched {
            route: Arc::new(Route {
                kind: RouteKind::Http,
                namespace: "ns".into(),
                name: "r".into(),
                creation_timestamp: None,
                source_order: 0,
                hostnames: vec![],
                rules: vec![],
            }),
            rule: Arc::new(Rule {
                timeouts,
                ..Default::default()
            }),
            matched_prefix: None,
            rule_index: 0,
            match_index: 0,
        }
    }

    /// Answers after `delay`; sets `dropped` if its future is dropped before answering.
    fn slow(delay: Duration, dropped: Arc<AtomicBool>) -> impl HttpService {
        tower::service_fn(move |_req: Request<Body>| {
            let dropped = dropped.clone();
            async move {
                struct Guard(Arc<AtomicBool>, bool);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        if !self.1 {
                            self.0.store(true, Ordering::SeqCst);
                        }
                    }
                }
                let mut guard = Guard(dropped, false);
                tokio::time::sleep(delay).await;
                guard.1 = true;
                Ok::<_, Infallible>(Response::new(empty_body()))
            }
        })
    }

    async fn send(layer: TimeoutLayer, timeouts: Timeouts, delay: Duration) -> (Response<Body>, bool) {
        let dropped = Arc::new(AtomicBool::new(false));
        let mut req = Request::new(empty_body());
        req.extensions_mut().insert(matched(timeouts));
        let res = layer.layer(slow(delay, dropped.clone())).oneshot(req).await.unwrap();
        (res, dropped.load(Ordering::SeqCst))
    }

    const MS_500: Option<Duration> = Some(Duration::from_millis(500));

    #[tokio::test(start_paused = true)]
    async fn request_timeout_answers_504_ut_and_cancels() {
        let timeouts = Timeouts {
            request: MS_500,
            backend_request: None,
        };
        let start = tokio::time::Instant::now();
        let (res, dropped) = send(TimeoutLayer::request(), timeouts, Duration::from_secs(1)).await;
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("UT")));
        assert_eq!(res.extensions().get::<UpstreamFailure>(), None);
        assert!(dropped, "the upstream future must be dropped");
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn fast_enough_or_disabled() {
        let timeouts = Timeouts {
            request: MS_500,
            backend_request: None,
        };
        let (res, _) = send(TimeoutLayer::request(), timeouts, Duration::from_millis(499)).await;
        assert_eq!(res.status(), StatusCode::OK);
        let zero = Timeouts {
            request: Some(Duration::ZERO),
            backend_request: None,
        };
        let (res, _) = send(TimeoutLayer::request(), zero, Duration::from_secs(1)).await;
        assert_eq!(res.status(), StatusCode::OK);
        // The per-try layer ignores the request timeout.
        let (res, _) = send(TimeoutLayer::per_try(), timeouts, Duration::from_secs(1)).await;
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timeout_is_an_upstream_failure() {
        let timeouts = Timeouts {
            request: None,
            backend_request: MS_500,
        };
        let (res, dropped) = send(TimeoutLayer::per_try(), timeouts, Duration::from_secs(1)).await;
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            res.extensions().get::<UpstreamFailure>(),
            Some(&UpstreamFailure {
                kind: FailureKind::Timeout
            })
        );
        assert!(dropped);
    }
}
