//! The fault injection layer (VirtualService `fault`): delay and/or abort a share of the matched rule's requests.
//!
//! - It sits right after the backend layer, before the request timeout and retry, as Envoy's fault filter sits
//!   before its router: the route timeout does not include the injected delay, and an aborted request never
//!   reaches the upstream (nor the mirror).
//! - The delay comes first, then the abort, each sampled on its own per request (`percentage.value`, 0–100, a
//!   fraction allowed). A zero delay is no delay.
//! - An HTTP abort is a local reply with that status and the body `fault filter abort`; a gRPC abort is a
//!   trailers-only gRPC reply (HTTP 200, `grpc-status`, `grpc-message: fault filter abort`). Both are flagged
//!   `FI`. A request that was delayed and then forwarded gets `DI` on its response, unless a layer inside
//!   already flagged it (the flag says why the reply is what it is; a later `UT` or `URX` says more).

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use tower::{Layer, Service};

use crate::context::ResponseFlag;
use crate::reply::{empty_body, local_reply};
use crate::route::{AbortStatus, FaultPolicy, Matched};
use crate::service::{HttpService, call_ready, take_ready};
use crate::{Body, ResponseFuture};

pub const ABORT_MESSAGE: &str = "fault filter abort";
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

#[derive(Debug, Clone, Copy, Default)]
pub struct FaultLayer;

impl FaultLayer {
    pub fn new() -> FaultLayer {
        FaultLayer
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct FaultService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for FaultService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let Some(decision) = req
            .extensions()
            .get::<Matched>()
            .and_then(|m| m.rule.fault.as_ref())
            .map(decide)
        else {
            return call_ready(&mut self.inner, req);
        };
        match decision {
            Decision {
                delay: None,
                abort: None,
            } => call_ready(&mut self.inner, req),
            Decision {
                delay: None,
                abort: Some(status),
            } => Box::pin(std::future::ready(Ok(abort_reply(status)))),
            Decision {
                delay: Some(delay),
                abort,
            } => {
                let mut inner = take_ready(&mut self.inner);
                Box::pin(async move {
                    tracing::debug!(?delay, "fault injection: delaying request");
                    tokio::time::sleep(delay).await;
                    if let Some(status) = abort {
                        return Ok(abort_reply(status));
                    }
                    let mut response = call_ready(&mut inner, req).await?;
                    if response.extensions().get::<ResponseFlag>().is_none() {
                        response.extensions_mut().insert(ResponseFlag("DI"));
                    }
                    Ok(response)
                })
            }
        }
    }
}

/// What the samples decided for one request.
struct Decision {
    delay: Option<std::time::Duration>,
    abort: Option<AbortStatus>,
}

fn decide(policy: &FaultPolicy) -> Decision {
    Decision {
        delay: policy
            .delay
            .as_ref()
            .filter(|d| !d.fixed.is_zero() && sampled(d.percent))
            .map(|d| d.fixed),
        abort: policy.abort.as_ref().filter(|a| sampled(a.percent)).map(|a| a.status),
    }
}

/// True for `percent` % of the calls: 0 never, 100 (or more) always.
pub fn sampled(percent: f64) -> bool {
    fastrand::f64() * 100.0 < percent
}

pub fn abort_reply(status: AbortStatus) -> Response<Body> {
    tracing::debug!(?status, "fault injection: aborting request");
    match status {
        AbortStatus::Http(code) => {
            // Istio validates httpStatus as 200–599; a code `http` cannot represent falls back to Envoy's
            // local-reply default.
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            local_reply(status, Some("FI"), ABORT_MESSAGE)
        }
        AbortStatus::Grpc(code) => {
            let mut response = Response::new(empty_body());
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(GRPC_STATUS.clone(), HeaderValue::from(code));
            headers.insert(GRPC_MESSAGE.clone(), HeaderValue::from_static(ABORT_MESSAGE));
            response.extensions_mut().insert(ResponseFlag("FI"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{FaultAbort, FaultDelay, Route, RouteKind, Rule};
    use crate::test_support::body_bytes;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::time::Instant;
    use tower::ServiceExt;

    fn matched(fault: FaultPolicy) -> Matched {
        Matched {
            route: Arc::new(Route {
                kind: RouteKind::VirtualService,
                namespace: "ns".into(),
                name: "vs".into(),
                creation_timestamp: None,
                source_order: 0,
                hostnames: vec![],
                rules: vec![],
            }),
            rule: Arc::new(Rule {
                fault: Some(fault),
                ..Default::default()
            }),
            matched_prefix: None,
            rule_index: 0,
            match_index: 0,
        }
    }

    /// Answers 200 at once and counts the requests that reached it.
    fn upstream(calls: Arc<AtomicUsize>) -> impl HttpService {
        tower::service_fn(move |_req: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<_, Infallible>(Response::new(empty_body())))
        })
    }

    fn delay(ms: u64, percent: f64) -> Option<FaultDelay> {
        Some(FaultDelay {
            fixed: Duration::from_millis(ms),
            percent,
        })
    }

    fn abort(status: AbortStatus, percent: f64) -> Option<FaultAbort> {
        Some(FaultAbort { status, percent })
    }

    async fn send(svc: &mut FaultService<impl HttpService>, fault: &FaultPolicy) -> Response<Body> {
        let mut req = Request::new(empty_body());
        req.extensions_mut().insert(matched(fault.clone()));
        svc.ready().await.unwrap().call(req).await.unwrap()
    }

    fn flag(res: &Response<Body>) -> Option<&'static str> {
        res.extensions().get::<ResponseFlag>().map(|f| f.0)
    }

    #[tokio::test(start_paused = true)]
    async fn delay_is_applied_exactly_then_forwarded() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = FaultLayer.layer(upstream(calls.clone()));
        let fault = FaultPolicy {
            delay: delay(1500, 100.0),
            abort: None,
        };
        let start = Instant::now();
        let res = send(&mut svc, &fault).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(flag(&res), Some("DI"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_upstream_is_not_called_before_the_delay_ends() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = FaultLayer.layer(upstream(calls.clone()));
        let mut req = Request::new(empty_body());
        req.extensions_mut().insert(matched(FaultPolicy {
            delay: delay(1000, 100.0),
            abort: None,
        }));
        let fut = svc.ready().await.unwrap().call(req);
        let task = tokio::spawn(fut);
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        task.await.unwrap().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_inner_flag_is_kept_after_a_delay() {
        let flagged = tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(local_reply(
                StatusCode::GATEWAY_TIMEOUT,
                Some("UT"),
                "upstream request timeout",
            ))
        });
        let mut svc = FaultLayer.layer(flagged);
        let fault = FaultPolicy {
            delay: delay(10, 100.0),
            abort: None,
        };
        assert_eq!(flag(&send(&mut svc, &fault).await), Some("UT"));
    }

    #[tokio::test(start_paused = true)]
    async fn http_aborts_answer_the_status_without_the_upstream() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = FaultLayer.layer(upstream(calls.clone()));
        for code in [400, 404, 500, 503] {
            let fault = FaultPolicy {
                delay: None,
                abort: abort(AbortStatus::Http(code), 100.0),
            };
            let res = send(&mut svc, &fault).await;
            assert_eq!(res.status().as_u16(), code);
            assert_eq!(flag(&res), Some("FI"));
            assert_eq!(body_bytes(res.into_body()).await, ABORT_MESSAGE);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_abort_is_trailers_only() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = FaultLayer.layer(upstream(calls.clone()));
        let fault = FaultPolicy {
            delay: None,
            abort: abort(AbortStatus::Grpc(14), 100.0),
        };
        let res = send(&mut svc, &fault).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(res.headers()[&GRPC_STATUS], "14");
        assert_eq!(res.headers()[&GRPC_MESSAGE], ABORT_MESSAGE);
        assert_eq!(flag(&res), Some("FI"));
        assert!(body_bytes(res.into_body()).await.is_empty());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_then_abort() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = FaultLayer.layer(upstream(calls.clone()));
        let fault = FaultPolicy {
            delay: delay(200, 100.0),
            abort: abort(AbortStatus::Http(503), 100.0),
        };
        let start = Instant::now();
        let res = send(&mut svc, &fault).await;
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(flag(&res), Some("FI"));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_percent_never_and_no_policy_passes_through() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = FaultLayer.layer(upstream(calls.clone()));
        let fault = FaultPolicy {
            delay: delay(1000, 0.0),
            abort: abort(AbortStatus::Http(500), 0.0),
        };
        let start = Instant::now();
        for _ in 0..1000 {
            let res = send(&mut svc, &fault).await;
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(flag(&res), None);
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(empty_body()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 1001);
    }

    /// Over 10 000 requests each share lands within ±2.5 points of its percentage (binomial standard deviation
    /// at most 0.5 points, so the bound is 5σ), the extremes are exact, and the two samples are independent.
    #[tokio::test(start_paused = true)]
    async fn percentages_are_respected() {
        const N: usize = 10_000;
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = FaultLayer.layer(upstream(calls.clone()));
        for (delay_pct, abort_pct) in [(100.0, 0.0), (0.0, 100.0), (30.0, 0.0), (0.0, 12.5), (50.0, 50.0)] {
            let fault = FaultPolicy {
                delay: delay(1, delay_pct),
                abort: abort(AbortStatus::Http(500), abort_pct),
            };
            let (mut delayed, mut aborted, mut both) = (0usize, 0usize, 0usize);
            for _ in 0..N {
                let start = Instant::now();
                let res = send(&mut svc, &fault).await;
                let was_delayed = !start.elapsed().is_zero();
                let was_aborted = res.status() == StatusCode::INTERNAL_SERVER_ERROR;
                delayed += usize::from(was_delayed);
                aborted += usize::from(was_aborted);
                both += usize::from(was_delayed && was_aborted);
            }
            let pct = |n: usize| n as f64 * 100.0 / N as f64;
            let near = |n: usize, want: f64| (pct(n) - want).abs() <= 2.5;
            assert!(near(delayed, delay_pct), "delayed {delayed} of {N}, want {delay_pct}%");
            assert!(near(aborted, abort_pct), "aborted {aborted} of {N}, want {abort_pct}%");
            for (n, want) in [(delayed, delay_pct), (aborted, abort_pct)] {
                if want == 0.0 {
                    assert_eq!(n, 0);
                }
                if want == 100.0 {
                    assert_eq!(n, N);
                }
            }
            assert!(near(both, delay_pct * abort_pct / 100.0), "both {both} of {N}");
        }
    }
}
