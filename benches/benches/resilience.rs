//! Per-request cost of the resilience layers on the happy path: fault injection (configured at 0 %), request
//! timeout, retry (a policy on 5xx/reset with three attempts, so the body goes through the replay buffer), per-try
//! timeout and circuit breaker (limits set, far from reached), over an upstream that answers 200 at once.
//!
//! - `bare`: the upstream alone, the same request (extensions included) built and its body read.
//! - `layers_no_policy`: the five layers, with a rule that sets none of their policies (pass-through cost).
//! - `layers_with_policies`: the five layers, every policy active.
//! - `layers_with_policies_lb`: as above, and the upstream first picks one of eight endpoints through the real
//!   per-backend runtime (LEAST_REQUEST power of two choices with outlier detection on, so every pick also
//!   counts the request in flight and reports its status), as `send_to_backend` does.
//!
//! The difference `layers_with_policies_lb − bare` is what the resilience stack (retry + timeout + breaker +
//! fault + LB) adds to each request. One
//! current-thread runtime drives a loop of `iters` requests per sample, so `block_on` is not measured.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use waypoint::config::policy::{LbPolicy, OutlierPolicy, TrafficPolicy};
use waypoint::config::{Backend, Endpoint, PortProtocol};
use waypoint::identity::SpiffeId;
use waypoint::upstream::cluster::{BackendRuntime, PickInput, Registry};
use waypoint::upstream::outlier::Outcome;
use waypoint_filters::breaker::{BreakerLayer, CircuitBreaker, Limits};
use waypoint_filters::context::Attempt;
use waypoint_filters::fault::FaultLayer;
use waypoint_filters::retry::RetryLayer;
use waypoint_filters::route::{
    AbortStatus, FaultAbort, FaultDelay, FaultPolicy, Matched, RetryPolicy, Route, RouteKind, Rule, Timeouts,
};
use waypoint_filters::timeout::TimeoutLayer;
use waypoint_filters::{Body, ResponseFuture};

type Stack = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

fn upstream() -> Stack {
    BoxCloneSyncService::new(tower::service_fn(|_req: Request<Body>| -> ResponseFuture {
        let body = Full::new(Bytes::from_static(b"ok"))
            .map_err(|never| match never {})
            .boxed();
        Box::pin(std::future::ready(Ok(Response::new(body))))
    }))
}

/// Eight endpoints behind LEAST_REQUEST with outlier detection; the runtime comes from a registry as in the
/// proxy (the backend owns it through its `OnceLock`, so it is leaked here to live as long as the bench).
fn balanced_backend() -> &'static Arc<BackendRuntime> {
    let endpoints = (0..8u8)
        .map(|i| {
            Arc::new(Endpoint {
                addr: std::net::SocketAddr::from(([10, 0, 0, i + 1], 8080)),
                hbone: Some(std::net::SocketAddr::from(([10, 0, 0, i + 1], 15008))),
                identity: SpiffeId::new("cluster.local", "bench", "backend"),
                workload: format!("backend-{i}").into(),
                namespace: "bench".into(),
                labels: Default::default(),
                locality: Default::default(),
            })
        })
        .collect();
    let mut backend = Backend::new("backend".into(), "bench".into(), 8080, PortProtocol::Http, endpoints);
    backend.policy = Arc::new(TrafficPolicy {
        lb: LbPolicy::LeastRequest,
        outlier: Some(OutlierPolicy::default()),
        ..Default::default()
    });
    let registry = Registry::new();
    let backend: &'static Backend = Box::leak(Box::new(backend));
    registry.runtime(backend)
}

/// The upstream behind a load balancer: pick (skipping endpoints earlier attempts used), count the request
/// in flight, answer, report the status to outlier detection.
fn balanced_upstream(rt: &'static Arc<BackendRuntime>) -> Stack {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| -> ResponseFuture {
        let attempt = req.extensions().get::<Attempt>();
        let Some(index) = rt.pick(&PickInput { hash: None, attempt }) else {
            panic!("no endpoint picked");
        };
        let active = rt.begin(index);
        rt.report(index, Outcome::Status(200));
        drop(active);
        let body = Full::new(Bytes::from_static(b"ok"))
            .map_err(|never| match never {})
            .boxed();
        Box::pin(std::future::ready(Ok(Response::new(body))))
    }))
}

fn resilient(inner: Stack) -> Stack {
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(FaultLayer::new())
            .layer(TimeoutLayer::request())
            .layer(RetryLayer::new())
            .layer(TimeoutLayer::per_try())
            .layer(BreakerLayer::new())
            .service(inner),
    )
}

fn matched(rule: Rule) -> Matched {
    Matched {
        route: Arc::new(Route {
            kind: RouteKind::VirtualService,
            namespace: "bench".into(),
            name: "vs".into(),
            creation_timestamp: None,
            source_order: 0,
            hostnames: vec![],
            rules: vec![],
        }),
        rule: Arc::new(rule),
        matched_prefix: None,
        rule_index: 0,
        match_index: 0,
    }
}

fn with_policies() -> Rule {
    Rule {
        timeouts: Timeouts {
            request: Some(Duration::from_secs(15)),
            backend_request: Some(Duration::from_secs(5)),
        },
        retry: Some(RetryPolicy {
            attempts: 3,
            codes: (500..600).collect(),
            on_connect_failure: true,
            on_reset: true,
            on_refused_stream: true,
            ..Default::default()
        }),
        fault: Some(FaultPolicy {
            delay: Some(FaultDelay {
                fixed: Duration::from_secs(1),
                percent: 0.0,
            }),
            abort: Some(FaultAbort {
                status: AbortStatus::Http(503),
                percent: 0.0,
            }),
        }),
        ..Default::default()
    }
}

struct Case {
    name: &'static str,
    stack: Stack,
    matched: Matched,
    breaker: Arc<CircuitBreaker>,
}

fn request(case: &Case) -> Request<Body> {
    let mut req = Request::get("/api")
        .header("host", "svc.bench:8080")
        .body(Empty::<Bytes>::new().map_err(|never| match never {}).boxed())
        .expect("request");
    req.extensions_mut().insert(case.matched.clone());
    req.extensions_mut().insert(case.breaker.clone());
    req
}

async fn one(case: &Case) {
    let res = case.stack.clone().oneshot(request(case)).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    black_box(res.into_body().collect().await.expect("body").to_bytes());
}

fn bench_resilience(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let breaker = Arc::new(CircuitBreaker::new(Limits {
        max_connections: Some(1024),
        max_pending: Some(1024),
        max_requests: Some(1024),
        max_retries: Some(3),
    }));
    let cases = [
        Case {
            name: "resilience/bare",
            stack: upstream(),
            matched: matched(with_policies()),
            breaker: breaker.clone(),
        },
        Case {
            name: "resilience/layers_no_policy",
            stack: resilient(upstream()),
            matched: matched(Rule::default()),
            breaker: breaker.clone(),
        },
        Case {
            name: "resilience/layers_with_policies",
            stack: resilient(upstream()),
            matched: matched(with_policies()),
            breaker: breaker.clone(),
        },
        Case {
            name: "resilience/layers_with_policies_lb",
            stack: resilient(balanced_upstream(balanced_backend())),
            matched: matched(with_policies()),
            breaker: breaker.clone(),
        },
    ];
    for case in &cases {
        rt.block_on(one(case));
        c.bench_function(case.name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        one(case).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    assert_eq!(breaker.in_use(), [0; 4], "every permit was given back");
}

criterion_group!(benches, bench_resilience);
criterion_main!(benches);
