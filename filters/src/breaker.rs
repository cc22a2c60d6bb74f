//! Circuit breaking (DestinationRule `connectionPool`): per-backend limits on concurrent connections, pending
//! requests, requests and retries, as Envoy's cluster circuit breakers. Overflow is never queued: the caller
//! answers 503 `UO` at once.
//!
//! One [`CircuitBreaker`] exists per backend for the life of the process (the waypoint keeps them in a registry
//! keyed by backend, so in-flight counts survive config swaps); a new config only moves the limits.
//!
//! [`BreakerLayer`] enforces `max_requests` per attempt. It sits innermost, just outside the upstream service
//! and inside the per-try timeout, so every retry attempt takes its own request permit. It reads the
//! `Arc<CircuitBreaker>` the waypoint put in the request extensions for the chosen backend (none = no limits).
//! On overflow it answers 503 at once, flagged `UO`, with `x-envoy-overloaded: true` (Envoy's overflow reply),
//! and marks it [`FailureKind::Overflow`] so the retry layer never retries it (Envoy never retries an overflow).
//! The permit is held until the response body ends or is dropped: a streaming response still occupies the
//! upstream. (`max_retries` is taken by the retry layer, connections and pending requests by the pools.)

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::context::{FailureKind, UpstreamFailure};
use crate::reply::local_reply;
use crate::service::{HttpService, call_ready};
use crate::{Body, BoxError, ResponseFuture};

/// `u32::MAX` stands for "no limit" (Istio's default for every field is 2³²−1).
pub const UNLIMITED: u32 = u32::MAX;

/// The limits of one backend; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Debug, Default)]
struct Gauge {
    active: AtomicUsize,
    limit: AtomicU32,
}

impl Gauge {
    fn new(limit: Option<u32>) -> Gauge {
        Gauge {
            active: AtomicUsize::new(0),
            limit: AtomicU32::new(limit.unwrap_or(UNLIMITED)),
        }
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == UNLIMITED {
            self.active.fetch_add(1, Ordering::AcqRel);
            return Some(Permit(self.clone()));
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit as usize).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.clone()))
    }
}

/// One unit of a breaker resource (a connection, a pending request, a request, a retry); released on drop.
#[derive(Debug)]
pub struct Permit(Arc<Gauge>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Which limit overflowed (for logs and the `UO` reply's detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("upstream connection limit reached")]
    Connections,
    #[error("pending request limit reached")]
    Pending,
    #[error("request limit reached")]
    Requests,
    #[error("retry limit reached")]
    Retries,
}

/// Circuit breaker state of one backend.
#[derive(Debug)]
pub struct CircuitBreaker {
    connections: Arc<Gauge>,
    pending: Arc<Gauge>,
    requests: Arc<Gauge>,
    retries: Arc<Gauge>,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker::new(Limits::default())
    }
}

impl CircuitBreaker {
    pub fn new(limits: Limits) -> CircuitBreaker {
        CircuitBreaker {
            connections: Arc::new(Gauge::new(limits.max_connections)),
            pending: Arc::new(Gauge::new(limits.max_pending)),
            requests: Arc::new(Gauge::new(limits.max_requests)),
            retries: Arc::new(Gauge::new(limits.max_retries)),
        }
    }

    /// Applies a new config's limits; what is in flight stays counted.
    pub fn set_limits(&self, limits: Limits) {
        let set = |g: &Gauge, l: Option<u32>| g.limit.store(l.unwrap_or(UNLIMITED), Ordering::Relaxed);
        set(&self.connections, limits.max_connections);
        set(&self.pending, limits.max_pending);
        set(&self.requests, limits.max_requests);
        set(&self.retries, limits.max_retries);
    }

    pub fn limits(&self) -> Limits {
        let get = |g: &Gauge| Some(g.limit.load(Ordering::Relaxed)).filter(|l| *l != UNLIMITED);
        Limits {
            max_connections: get(&self.connections),
            max_pending: get(&self.pending),
            max_requests: get(&self.requests),
            max_retries: get(&self.retries),
        }
    }

    pub fn try_connection(&self) -> Result<Permit, Overflow> {
        self.connections.try_acquire().ok_or(Overflow::Connections)
    }

    pub fn try_pending(&self) -> Result<Permit, Overflow> {
        self.pending.try_acquire().ok_or(Overflow::Pending)
    }

    pub fn try_request(&self) -> Result<Permit, Overflow> {
        self.requests.try_acquire().ok_or(Overflow::Requests)
    }

    pub fn try_retry(&self) -> Result<Permit, Overflow> {
        self.retries.try_acquire().ok_or(Overflow::Retries)
    }

    /// Currently held (connections, pending, requests, retries), for the admin endpoint and tests.
    pub fn in_use(&self) -> [usize; 4] {
        [&self.connections, &self.pending, &self.requests, &self.retries].map(|g| g.active.load(Ordering::Acquire))
    }
}

pub static OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
/// Envoy's body for a request its connection pool rejected on overflow.
pub const OVERFLOW_MESSAGE: &str = "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// The 503 `UO` a breaker overflow answers; also for the waypoint's pools when `try_connection` or
/// `try_pending` overflows, so every overflow looks the same (and is never retried).
pub fn overflow_reply(overflow: Overflow) -> Response<Body> {
    tracing::debug!(%overflow, "circuit breaker overflow");
    let mut response = local_reply(StatusCode::SERVICE_UNAVAILABLE, Some("UO"), OVERFLOW_MESSAGE);
    response
        .headers_mut()
        .insert(OVERLOADED.clone(), HeaderValue::from_static("true"));
    response.extensions_mut().insert(UpstreamFailure {
        kind: FailureKind::Overflow,
    });
    response
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BreakerLayer;

impl BreakerLayer {
    pub fn new() -> BreakerLayer {
        BreakerLayer
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;

    fn layer(&self, inner: S) -> BreakerService<S> {
        BreakerService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct BreakerService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for BreakerService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let Some(breaker) = req.extensions().get::<Arc<CircuitBreaker>>() else {
            return call_ready(&mut self.inner, req);
        };
        let permit = match breaker.try_request() {
            Ok(permit) => permit,
            Err(overflow) => return Box::pin(std::future::ready(Ok(overflow_reply(overflow)))),
        };
        let fut = call_ready(&mut self.inner, req);
        Box::pin(async move {
            // Dropped with this future if the attempt is cancelled (per-try timeout, client gone).
            let response = fut.await?;
            Ok(response.map(|body| hold_until_end(body, permit)))
        })
    }
}

fn hold_until_end(body: Body, permit: Permit) -> Body {
    if body.is_end_stream() {
        return body;
    }
    PermitBody {
        inner: body,
        permit: Some(permit),
    }
    .boxed()
}

/// A response body that gives its request permit back when it ends (or is dropped).
struct PermitBody {
    inner: Body,
    permit: Option<Permit>,
}

impl HttpBody for PermitBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            self.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ResponseFlag;
    use crate::reply::{empty_body, full_body};
    use crate::test_support::{body_bytes, chunked};
    use tokio::sync::Semaphore;
    use tower::ServiceExt;

    fn limited(max_requests: u32) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new(Limits {
            max_requests: Some(max_requests),
            ..Limits::default()
        }))
    }

    fn request(breaker: Option<&Arc<CircuitBreaker>>) -> Request<Body> {
        let mut req = Request::new(empty_body());
        if let Some(breaker) = breaker {
            req.extensions_mut().insert(breaker.clone());
        }
        req
    }

    /// Answers 200 with `body` once the test adds a permit to `gate` (one per request).
    fn gated(gate: Arc<Semaphore>, body: fn() -> Body) -> impl HttpService {
        tower::service_fn(move |_req: Request<Body>| {
            let gate = gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, Infallible>(Response::new(body()))
            }
        })
    }

    fn is_overflow(res: &Response<Body>) -> bool {
        res.status() == StatusCode::SERVICE_UNAVAILABLE
            && res.extensions().get::<ResponseFlag>() == Some(&ResponseFlag("UO"))
            && res.headers().get(&OVERLOADED).is_some_and(|v| v == "true")
            && res.extensions().get::<UpstreamFailure>()
                == Some(&UpstreamFailure {
                    kind: FailureKind::Overflow,
                })
    }

    #[tokio::test]
    async fn n_plus_one_concurrent_requests_give_exactly_one_overflow() {
        const N: usize = 4;
        let breaker = limited(N as u32);
        let gate = Arc::new(Semaphore::new(0));
        let mut svc = BreakerLayer.layer(gated(gate.clone(), empty_body));
        // All N + 1 are in flight at once: the permit is taken in `call`, the upstream answers only later.
        let mut in_flight = Vec::new();
        for _ in 0..=N {
            in_flight.push(svc.ready().await.unwrap().call(request(Some(&breaker))));
        }
        assert_eq!(breaker.in_use()[2], N);
        gate.add_permits(N + 1);
        let mut overflows = 0;
        for fut in in_flight {
            let res = fut.await.unwrap();
            if is_overflow(&res) {
                overflows += 1;
            } else {
                assert_eq!(res.status(), StatusCode::OK);
            }
        }
        assert_eq!(overflows, 1);
        assert_eq!(
            breaker.in_use()[2],
            0,
            "empty bodies give their permit back with the response"
        );
        assert_eq!(
            gate.available_permits(),
            1,
            "the overflowing request never reached the upstream"
        );
    }

    #[tokio::test]
    async fn the_permit_lives_until_the_body_ends_or_is_dropped() {
        let breaker = limited(1);
        let gate = Arc::new(Semaphore::new(10));
        let svc = BreakerLayer.layer(gated(gate, || chunked(&["a", "b"])));

        let res = svc.clone().oneshot(request(Some(&breaker))).await.unwrap();
        assert_eq!(breaker.in_use()[2], 1);
        assert!(is_overflow(
            &svc.clone().oneshot(request(Some(&breaker))).await.unwrap()
        ));
        assert_eq!(body_bytes(res.into_body()).await, "ab");
        assert_eq!(breaker.in_use()[2], 0, "released when the body ended");

        let res = svc.clone().oneshot(request(Some(&breaker))).await.unwrap();
        assert_eq!(breaker.in_use()[2], 1);
        drop(res);
        assert_eq!(breaker.in_use()[2], 0, "released when the response was dropped");

        // A body whose last frame says so releases without a final poll.
        let svc = BreakerLayer.layer(gated(Arc::new(Semaphore::new(10)), || full_body("x")));
        let res = svc.clone().oneshot(request(Some(&breaker))).await.unwrap();
        let mut body = res.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "x");
        assert_eq!(breaker.in_use()[2], 0);
    }

    #[tokio::test]
    async fn a_cancelled_attempt_gives_its_permit_back() {
        let breaker = limited(1);
        let gate = Arc::new(Semaphore::new(0));
        let svc = BreakerLayer.layer(gated(gate, empty_body));
        let pending = svc.clone().oneshot(request(Some(&breaker)));
        let mut pending = Box::pin(pending);
        assert!(futures_poll_once(&mut pending).await.is_none());
        assert_eq!(breaker.in_use()[2], 1);
        drop(pending);
        assert_eq!(breaker.in_use()[2], 0);
    }

    /// Polls a future once, returning its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut *fut).poll(cx) {
                Poll::Ready(out) => Some(out),
                Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn limits_change_live_and_no_breaker_passes_through() {
        let breaker = limited(1);
        let gate = Arc::new(Semaphore::new(10));
        let svc = BreakerLayer.layer(gated(gate, || chunked(&["a"])));
        let first = svc.clone().oneshot(request(Some(&breaker))).await.unwrap();
        assert!(is_overflow(
            &svc.clone().oneshot(request(Some(&breaker))).await.unwrap()
        ));

        breaker.set_limits(Limits {
            max_requests: Some(2),
            ..Limits::default()
        });
        let second = svc.clone().oneshot(request(Some(&breaker))).await.unwrap();
        assert_eq!(second.status(), StatusCode::OK);
        assert!(is_overflow(
            &svc.clone().oneshot(request(Some(&breaker))).await.unwrap()
        ));

        // Lowering the limit below what is in flight sheds new requests only.
        breaker.set_limits(Limits {
            max_requests: Some(1),
            ..Limits::default()
        });
        drop(first);
        assert!(is_overflow(
            &svc.clone().oneshot(request(Some(&breaker))).await.unwrap()
        ));
        drop(second);
        let third = svc.clone().oneshot(request(Some(&breaker))).await.unwrap();
        assert_eq!(third.status(), StatusCode::OK);

        breaker.set_limits(Limits::default());
        let held: Vec<_> = (0..100).map(|_| breaker.try_request().unwrap()).collect();
        assert_eq!(
            svc.clone().oneshot(request(Some(&breaker))).await.unwrap().status(),
            StatusCode::OK
        );
        drop((held, third));

        let no_breaker = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(no_breaker.status(), StatusCode::OK);
        assert_eq!(breaker.in_use()[2], 0);
    }
}
