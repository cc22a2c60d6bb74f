//! The retry layer (HTTPRoute `retry`, VirtualService `retries`), between the request timeout and the per-try
//! timeout.
//!
//! - `rule.retry.attempts` counts every attempt, the first included; a policy with fewer than 2, or with
//!   nothing to retry on, passes through (its body is not buffered, no [`Attempt`] is allocated).
//! - An attempt is retried when the upstream answered a status in `codes`, or when the waypoint marked its reply
//!   as an [`UpstreamFailure`] of an enabled kind, as Envoy's `wouldRetryFromReset`: `Connect` with
//!   `on_connect_failure`, `RefusedStream` (HTTP/2 `REFUSED_STREAM`) with `on_refused_stream`, and every one of
//!   those plus `Reset` with `on_reset` (Envoy's `reset` retries any reset reason but overflow); `Timeout` (the
//!   per-try timeout) with `on_reset` or when 504 is in `codes`; `Overflow` (a circuit breaker's `UO`) never. A
//!   marked reply is judged by its kind only, so a failed connect is never mistaken for the backend's own 503.
//! - Backoff is Envoy's fully jittered exponential: before retry n, a random delay in
//!   `[0, backoff · (2ⁿ − 1))`, capped at 10 × backoff (25 ms and 250 ms by default).
//! - The body must be replayable: bodies up to 64 KiB ([`REPLAY_LIMIT`]) are buffered; a larger one (or one
//!   whose declared size is larger) is sent once, unretried, and unchanged.
//! - Each attempt carries `x-envoy-attempt-count: N` and an [`Attempt`] extension (number, `remote_localities`,
//!   and the endpoints earlier attempts used, shared by all of them): Istio configures Envoy's `previous_hosts`
//!   retry host predicate, so the upstream service records its endpoint there and avoids those on later
//!   attempts when others exist.
//! - When attempts run out, the last response is returned, flagged `URX` if it was a local upstream failure.
//! - Two limits can deny a retry, each held from the grant (backoff included) until the retried attempt's
//!   response: the [`RetryBudget`] shared by everything one `RetryLayer` builds — Envoy's `retry_budget`
//!   defaults, retries in flight at most 20 % ([`BUDGET_PERCENT`]) of the active requests with 3
//!   ([`MIN_RETRY_CONCURRENCY`]) always allowed — and the chosen backend's circuit breaker `max_retries`
//!   (`CircuitBreaker::try_retry` on the request's `Arc<CircuitBreaker>`, when there is one). When either is
//!   spent the current response is returned unretried, flagged `UO` if it was a local upstream failure
//!   (Envoy's `NoOverflow` retry status).

mod budget;
mod replay;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service};

pub use budget::{BUDGET_PERCENT, Held, MIN_RETRY_CONCURRENCY, RetryBudget};
pub use replay::{Buffered, REPLAY_LIMIT, Replay, buffer};

use crate::breaker::{CircuitBreaker, Overflow, Permit};
use crate::context::{Attempt, FailureKind, ResponseFlag, UpstreamFailure};
use crate::reply::local_reply;
use crate::route::{Matched, RetryPolicy};
use crate::service::{HttpService, call_ready, oneshot, take_ready};
use crate::{Body, ResponseFuture};

pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Envoy's `max_interval` default: ten times the base interval.
pub const BACKOFF_CAP_FACTOR: u32 = 10;
pub static ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");

#[derive(Debug, Clone, Default)]
pub struct RetryLayer {
    budget: RetryBudget,
}

impl RetryLayer {
    /// A layer with its own budget.
    pub fn new() -> RetryLayer {
        RetryLayer::default()
    }

    /// A layer drawing on an existing budget (to share one budget between several stacks).
    pub fn with_budget(budget: RetryBudget) -> RetryLayer {
        RetryLayer { budget }
    }

    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = RetryService<S>;

    fn layer(&self, inner: S) -> RetryService<S> {
        RetryService {
            inner,
            budget: self.budget.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RetryService<S> {
    inner: S,
    budget: RetryBudget,
}

impl<S: HttpService> Service<Request<Body>> for RetryService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let active = self.budget.request();
        let policy = req
            .extensions()
            .get::<Matched>()
            .and_then(|m| m.rule.retry.clone())
            .filter(|p| p.attempts > 1 && retries_anything(p));
        let Some(policy) = policy else {
            let fut = call_ready(&mut self.inner, req);
            return Box::pin(async move {
                let _active = active;
                fut.await
            });
        };
        let inner = take_ready(&mut self.inner);
        Box::pin(retrying(inner, req, policy, self.budget.clone(), active))
    }
}

fn retries_anything(policy: &RetryPolicy) -> bool {
    !policy.codes.is_empty() || policy.on_connect_failure || policy.on_reset || policy.on_refused_stream
}

async fn retrying<S: HttpService>(
    inner: S,
    req: Request<Body>,
    policy: RetryPolicy,
    budget: RetryBudget,
    _active: Held,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let breaker = parts.extensions.get::<Arc<CircuitBreaker>>().cloned();
    let first = Attempt {
        number: 1,
        remote_localities: policy.remote_localities,
        tried: Arc::default(),
    };
    let replay = match buffer(body, REPLAY_LIMIT).await {
        Buffered::Replayable(replay) => replay,
        Buffered::Once(body) => return oneshot(inner, attempt_request(&parts, body, first)).await,
        Buffered::Failed(err) => {
            tracing::debug!(%err, "request body failed while buffering for retry");
            return Ok(local_reply(StatusCode::BAD_REQUEST, Some("DC"), "request body error"));
        }
    };
    let base = policy.backoff.filter(|d| !d.is_zero()).unwrap_or(DEFAULT_BACKOFF);
    let mut attempt = first;
    let mut _retry: Option<RetryPermits> = None;
    loop {
        let number = attempt.number;
        let response = oneshot(inner.clone(), attempt_request(&parts, replay.body(), attempt.clone())).await?;
        _retry = None;
        if !should_retry(&policy, &response) {
            return Ok(response);
        }
        if number >= policy.attempts {
            return Ok(exhausted(response));
        }
        match RetryPermits::try_take(&budget, breaker.as_deref()) {
            Ok(permits) => _retry = Some(permits),
            Err(denied) => {
                tracing::debug!(attempt = number, %denied, "retry not allowed");
                return Ok(overflowed(response));
            }
        }
        drop(response);
        tokio::time::sleep(backoff(number, base)).await;
        attempt.number += 1;
    }
}

/// What a retry holds while it is pending and running.
struct RetryPermits {
    _budget: Held,
    _breaker: Option<Permit>,
}

#[derive(Debug, thiserror::Error)]
enum Denied {
    #[error("retry budget exhausted")]
    Budget,
    #[error("circuit breaker: {0}")]
    Breaker(Overflow),
}

impl RetryPermits {
    fn try_take(budget: &RetryBudget, breaker: Option<&CircuitBreaker>) -> Result<RetryPermits, Denied> {
        let budget = budget.try_retry().ok_or(Denied::Budget)?;
        let breaker = breaker
            .map(CircuitBreaker::try_retry)
            .transpose()
            .map_err(Denied::Breaker)?;
        Ok(RetryPermits {
            _budget: budget,
            _breaker: breaker,
        })
    }
}

fn attempt_request(parts: &Parts, body: Body, attempt: Attempt) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req.headers_mut()
        .insert(ATTEMPT_COUNT.clone(), HeaderValue::from(attempt.number));
    req.extensions_mut().insert(attempt);
    req
}

pub fn should_retry(policy: &RetryPolicy, response: &Response<Body>) -> bool {
    let status = response.status().as_u16();
    match response.extensions().get::<UpstreamFailure>().map(|f| f.kind) {
        Some(FailureKind::Overflow) => false,
        Some(FailureKind::Connect) => policy.on_connect_failure || policy.on_reset,
        Some(FailureKind::RefusedStream) => policy.on_refused_stream || policy.on_reset,
        Some(FailureKind::Reset) => policy.on_reset,
        Some(FailureKind::Timeout) => policy.on_reset || policy.codes.contains(&status),
        None => policy.codes.contains(&status),
    }
}

/// A retry was wanted but a limit denied it.
fn overflowed(mut response: Response<Body>) -> Response<Body> {
    if response.extensions().get::<UpstreamFailure>().is_some() {
        response.extensions_mut().insert(ResponseFlag("UO"));
    }
    response
}

fn exhausted(mut response: Response<Body>) -> Response<Body> {
    if response.extensions().get::<UpstreamFailure>().is_some() {
        response.extensions_mut().insert(ResponseFlag("URX"));
    }
    response
}

/// The delay before retry `retry` (1 for the first retry).
pub fn backoff(retry: u32, base: Duration) -> Duration {
    let cap = base.saturating_mul(BACKOFF_CAP_FACTOR);
    let factor = 2u32.checked_pow(retry.min(31)).map_or(u32::MAX, |f| f - 1);
    let ceiling = base.saturating_mul(factor).min(cap);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(..nanos.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{empty_body, full_body};
    use crate::route::{Route, RouteKind, Rule};
    use crate::test_support::{body_bytes, chunked};
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;
    use tower::ServiceExt;

    fn matched(policy: RetryPolicy) -> Matched {
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
                retry: Some(policy),
                ..Default::default()
            }),
            matched_prefix: None,
            rule_index: 0,
            match_index: 0,
        }
    }

    /// What the stub upstream saw, per attempt: (attempt header, body, time).
    type Log = Arc<Mutex<Vec<(String, bytes::Bytes, Instant)>>>;

    /// Answers the scripted replies in order (the last one repeats).
    fn scripted(replies: Vec<(u16, Option<FailureKind>)>) -> (impl HttpService, Log) {
        let log: Log = Arc::default();
        let seen = log.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let seen = seen.clone();
            let replies = replies.clone();
            async move {
                let attempt = req
                    .headers()
                    .get(&ATTEMPT_COUNT)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let body = body_bytes(req.into_body()).await;
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push((attempt, body, Instant::now()));
                    seen.len()
                };
                let (status, failure) = replies[(n - 1).min(replies.len() - 1)];
                let mut res = Response::new(empty_body());
                *res.status_mut() = StatusCode::from_u16(status).unwrap();
                if let Some(kind) = failure {
                    res.extensions_mut().insert(UpstreamFailure { kind });
                }
                Ok::<_, Infallible>(res)
            }
        });
        (svc, log)
    }

    fn policy(attempts: u32, codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            attempts,
            codes: codes.to_vec(),
            ..Default::default()
        }
    }

    async fn send(layer: &RetryLayer, svc: impl HttpService, policy: RetryPolicy, body: Body) -> Response<Body> {
        let mut req = Request::builder().uri("/retry").body(body).unwrap();
        req.extensions_mut().insert(matched(policy));
        layer.layer(svc).oneshot(req).await.unwrap()
    }

    fn attempts(log: &Log) -> Vec<String> {
        log.lock().unwrap().iter().map(|(a, _, _)| a.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn retries_listed_codes_until_success() {
        let (svc, log) = scripted(vec![(500, None), (500, None), (200, None)]);
        let res = send(&RetryLayer::new(), svc, policy(3, &[500]), full_body("payload")).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(attempts(&log), ["1", "2", "3"]);
        assert!(log.lock().unwrap().iter().all(|(_, body, _)| body == "payload"));
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_attempts_return_the_last_response() {
        let (svc, log) = scripted(vec![(500, None)]);
        let res = send(&RetryLayer::new(), svc, policy(3, &[500]), empty_body()).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            res.extensions().get::<ResponseFlag>(),
            None,
            "a backend's own 500 is not flagged"
        );
        assert_eq!(attempts(&log).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn unlisted_codes_are_not_retried() {
        let (svc, log) = scripted(vec![(503, None), (200, None)]);
        let res = send(&RetryLayer::new(), svc, policy(3, &[500]), empty_body()).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(attempts(&log), ["1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_failures_are_judged_by_kind() {
        // A connect failure's 503 is not "the backend said 503".
        let (svc, log) = scripted(vec![(503, Some(FailureKind::Connect)), (200, None)]);
        let res = send(&RetryLayer::new(), svc, policy(3, &[503]), empty_body()).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(attempts(&log).len(), 1);

        let connect = RetryPolicy {
            on_connect_failure: true,
            ..policy(3, &[])
        };
        let (svc, log) = scripted(vec![(503, Some(FailureKind::Connect)), (200, None)]);
        assert_eq!(
            send(&RetryLayer::new(), svc, connect, empty_body()).await.status(),
            StatusCode::OK
        );
        assert_eq!(attempts(&log).len(), 2);

        let reset = RetryPolicy {
            on_reset: true,
            ..policy(3, &[])
        };
        let (svc, log) = scripted(vec![(503, Some(FailureKind::Reset))]);
        let res = send(&RetryLayer::new(), svc, reset.clone(), empty_body()).await;
        assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("URX")));
        assert_eq!(attempts(&log).len(), 3);

        let (svc, log) = scripted(vec![(504, Some(FailureKind::Timeout)), (200, None)]);
        assert_eq!(
            send(&RetryLayer::new(), svc, reset, empty_body()).await.status(),
            StatusCode::OK
        );
        assert_eq!(attempts(&log).len(), 2);
        let (svc, log) = scripted(vec![(504, Some(FailureKind::Timeout)), (200, None)]);
        assert_eq!(
            send(&RetryLayer::new(), svc, policy(2, &[504]), empty_body())
                .await
                .status(),
            StatusCode::OK
        );
        assert_eq!(attempts(&log).len(), 2);
        let (svc, log) = scripted(vec![(504, Some(FailureKind::Timeout)), (200, None)]);
        let res = send(&RetryLayer::new(), svc, policy(2, &[500]), empty_body()).await;
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(attempts(&log).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn large_bodies_are_sent_once() {
        let chunk = "x".repeat(16 * 1024);
        let chunks: Vec<&str> = (0..5).map(|_| chunk.as_str()).collect();
        let (svc, log) = scripted(vec![(500, None), (200, None)]);
        let res = send(&RetryLayer::new(), svc, policy(3, &[500]), chunked(&chunks)).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].1.len(), 80 * 1024, "the whole body still reaches the upstream");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_jittered_exponential() {
        let (svc, log) = scripted(vec![(500, None)]);
        let backoff = Some(Duration::from_millis(100));
        let res = send(
            &RetryLayer::new(),
            svc,
            RetryPolicy {
                backoff,
                ..policy(4, &[500])
            },
            empty_body(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let times: Vec<Instant> = log.lock().unwrap().iter().map(|(_, _, t)| *t).collect();
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps.len(), 3);
        assert!(gaps[0] < Duration::from_millis(100), "{gaps:?}");
        assert!(gaps[1] < Duration::from_millis(300), "{gaps:?}");
        assert!(gaps[2] < Duration::from_millis(700), "{gaps:?}");
        for retry in 1..40 {
            assert!(super::backoff(retry, DEFAULT_BACKOFF) < Duration::from_millis(250));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_is_shared_by_the_layer() {
        let layer = RetryLayer::new();
        let held: Vec<_> = (0..MIN_RETRY_CONCURRENCY)
            .map(|_| layer.budget().try_retry().unwrap())
            .collect();
        let (svc, log) = scripted(vec![(500, None), (200, None)]);
        let res = send(&layer, svc, policy(3, &[500]), empty_body()).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(attempts(&log), ["1"]);
        drop(held);
        let (svc, log) = scripted(vec![(500, None), (200, None)]);
        assert_eq!(
            send(&layer, svc, policy(3, &[500]), empty_body()).await.status(),
            StatusCode::OK
        );
        assert_eq!(attempts(&log), ["1", "2"]);
    }

    /// What the stub upstream saw of one attempt: the attempt extension (number, remote localities, endpoints
    /// tried before it) and the breaker's retries in use.
    #[derive(Debug, Clone, PartialEq)]
    struct Seen {
        attempt: Option<(u32, bool, Vec<std::net::SocketAddr>)>,
        retries_in_use: Option<usize>,
    }

    /// Like [`scripted`], and each attempt records endpoint 10.0.0.<attempt>:80 as the one it used.
    fn observed(replies: Vec<(u16, Option<FailureKind>)>) -> (impl HttpService, Arc<Mutex<Vec<Seen>>>) {
        let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen = log.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let attempt = req.extensions().get::<Attempt>().cloned();
            let entry = Seen {
                attempt: attempt.as_ref().map(|a| (a.number, a.remote_localities, a.tried())),
                retries_in_use: req.extensions().get::<Arc<CircuitBreaker>>().map(|b| b.in_use()[3]),
            };
            if let Some(a) = &attempt {
                a.record(std::net::SocketAddr::from(([10, 0, 0, a.number as u8], 80)));
            }
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push(entry);
                seen.len()
            };
            let (status, failure) = replies[(n - 1).min(replies.len() - 1)];
            let mut res = Response::new(empty_body());
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(kind) = failure {
                res.extensions_mut().insert(UpstreamFailure { kind });
            }
            std::future::ready(Ok::<_, Infallible>(res))
        });
        (svc, log)
    }

    async fn send_with_breaker(
        svc: impl HttpService,
        policy: RetryPolicy,
        breaker: &Arc<CircuitBreaker>,
    ) -> Response<Body> {
        let mut req = Request::builder().uri("/retry").body(empty_body()).unwrap();
        req.extensions_mut().insert(matched(policy));
        req.extensions_mut().insert(breaker.clone());
        RetryLayer::new().layer(svc).oneshot(req).await.unwrap()
    }

    fn breaker(max_retries: Option<u32>) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new(crate::breaker::Limits {
            max_retries,
            ..Default::default()
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn each_retry_holds_a_breaker_retry_permit() {
        let breaker = breaker(Some(5));
        let (svc, log) = observed(vec![(500, None), (500, None), (200, None)]);
        let res = send_with_breaker(svc, policy(3, &[500]), &breaker).await;
        assert_eq!(res.status(), StatusCode::OK);
        let in_use: Vec<_> = log.lock().unwrap().iter().map(|s| s.retries_in_use).collect();
        assert_eq!(
            in_use,
            [Some(0), Some(1), Some(1)],
            "one permit per pending retry, none for the first try"
        );
        assert_eq!(breaker.in_use()[3], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_retry_overflow_returns_the_current_response() {
        let breaker = breaker(Some(1));
        let held = breaker.try_retry().unwrap();
        let (svc, log) = observed(vec![(500, None), (200, None)]);
        let res = send_with_breaker(svc, policy(3, &[500]), &breaker).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            res.extensions().get::<ResponseFlag>(),
            None,
            "a backend's own 500 keeps no flag"
        );
        assert_eq!(log.lock().unwrap().len(), 1);

        let reset = RetryPolicy {
            on_reset: true,
            ..policy(3, &[])
        };
        let (svc, log) = observed(vec![(503, Some(FailureKind::Reset)), (200, None)]);
        let res = send_with_breaker(svc, reset.clone(), &breaker).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("UO")));
        assert_eq!(log.lock().unwrap().len(), 1);

        drop(held);
        let (svc, log) = observed(vec![(503, Some(FailureKind::Reset)), (200, None)]);
        assert_eq!(send_with_breaker(svc, reset, &breaker).await.status(), StatusCode::OK);
        assert_eq!(log.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn overflow_is_never_retried() {
        let everything = RetryPolicy {
            on_reset: true,
            on_connect_failure: true,
            on_refused_stream: true,
            ..policy(3, &[503])
        };
        let (svc, log) = scripted(vec![(503, Some(FailureKind::Overflow)), (200, None)]);
        let res = send(&RetryLayer::new(), svc, everything, empty_body()).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(attempts(&log), ["1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_streams_and_resets_follow_envoy() {
        let refused = RetryPolicy {
            on_refused_stream: true,
            ..policy(2, &[])
        };
        let reset = RetryPolicy {
            on_reset: true,
            ..policy(2, &[])
        };
        let connect = RetryPolicy {
            on_connect_failure: true,
            ..policy(2, &[])
        };
        // (policy, failure, retried?)
        let cases = [
            (&refused, FailureKind::RefusedStream, true),
            (&refused, FailureKind::Reset, false),
            (&refused, FailureKind::Connect, false),
            (&reset, FailureKind::RefusedStream, true),
            (&reset, FailureKind::Connect, true),
            (&connect, FailureKind::RefusedStream, false),
        ];
        for (policy, kind, retried) in cases {
            let (svc, log) = scripted(vec![(503, Some(kind)), (200, None)]);
            let res = send(&RetryLayer::new(), svc, policy.clone(), empty_body()).await;
            assert_eq!(res.status() == StatusCode::OK, retried, "{kind:?} under {policy:?}");
            assert_eq!(attempts(&log).len(), if retried { 2 } else { 1 });
        }
        // A policy retrying only refused streams is a policy: its body is buffered and attempts are counted.
        let (svc, log) = scripted(vec![(503, Some(FailureKind::RefusedStream))]);
        let res = send(
            &RetryLayer::new(),
            svc,
            RetryPolicy { attempts: 3, ..refused },
            empty_body(),
        )
        .await;
        assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("URX")));
        assert_eq!(attempts(&log), ["1", "2", "3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_share_the_endpoints_tried() {
        let (svc, log) = observed(vec![(500, None)]);
        let remote = RetryPolicy {
            remote_localities: true,
            ..policy(3, &[500])
        };
        let res = send(&RetryLayer::new(), svc, remote, empty_body()).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let ep = |n: u8| std::net::SocketAddr::from(([10, 0, 0, n], 80));
        let attempts: Vec<_> = log.lock().unwrap().iter().map(|s| s.attempt.clone()).collect();
        assert_eq!(
            attempts,
            [
                Some((1, true, vec![])),
                Some((2, true, vec![ep(1)])),
                Some((3, true, vec![ep(1), ep(2)])),
            ]
        );

        // A large body is sent once, still as attempt 1 of a policy.
        let (svc, log) = observed(vec![(500, None)]);
        let big = "x".repeat(REPLAY_LIMIT + 1);
        send(&RetryLayer::new(), svc, policy(3, &[500]), full_body(big)).await;
        let attempts: Vec<_> = log.lock().unwrap().iter().map(|s| s.attempt.clone()).collect();
        assert_eq!(attempts, [Some((1, false, vec![]))]);

        // No policy, no extension.
        let (svc, log) = observed(vec![(500, None)]);
        send(&RetryLayer::new(), svc, policy(1, &[500]), empty_body()).await;
        assert_eq!(log.lock().unwrap()[0].attempt, None);
    }

    #[tokio::test(start_paused = true)]
    async fn no_policy_passes_through() {
        let (svc, log) = scripted(vec![(500, None)]);
        let mut req = Request::new(empty_body());
        req.extensions_mut().insert(matched(policy(1, &[500])));
        let res = RetryLayer::new().layer(svc).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(attempts(&log), [""], "no attempt header without a retry policy");
    }
}
