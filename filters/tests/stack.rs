//! The whole per-request stack in the waypoint's order, erased the way the waypoint erases it, driven with a
//! stub upstream: proves the layers compose (Clone + Send + Sync, Send futures) and talk through the extensions.
//! The waypoint's part between the backend and fault layers (putting the chosen backend's circuit breaker in
//! the extensions) is played by a `map_request` over a small registry.

#![allow(clippy::unwrap_used)] // the test helpers outside #[test] functions unwrap too

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneSyncService;
use tower::util::MapRequestLayer;
use tower::{ServiceBuilder, ServiceExt};
use waypoint_filters::breaker::{self, CircuitBreaker, Limits};
use waypoint_filters::context::{Attempt, ChosenBackend, FailureKind, MirrorSink, ResponseFlag, UpstreamFailure};
use waypoint_filters::route::{
    AbortStatus, BackendId, CorsPolicy, FaultAbort, FaultDelay, FaultPolicy, Filter, HeaderModifier, Mirror, PathMatch,
    PathModifier, Redirect, RetryPolicy, Rewrite, Route, RouteKind, RouteMatch, RouteTable, Rule, Timeouts,
    WeightedBackend,
};
use waypoint_filters::{Body, backend, cors, fault, headers, mirror, redirect, retry, rewrite, route, timeout};

type Stack = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

fn body(text: &'static str) -> Body {
    Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

/// The upstream: echoes "<backend> <method> <uri> <x-header-set>", fails `/flaky` on its first attempt with a
/// reset, sleeps on `/slow`.
fn upstream() -> Stack {
    BoxCloneSyncService::new(tower::service_fn(|req: Request<Body>| async move {
        let backend = req
            .extensions()
            .get::<ChosenBackend>()
            .and_then(|c| c.backend)
            .map_or(99, |b| b.0);
        let attempt = req.headers().get("x-envoy-attempt-count").cloned();
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        if req.uri().path() == "/flaky" && attempt.as_ref().is_some_and(|a| a == "1") {
            let mut res = Response::new(body("reset"));
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            res.extensions_mut().insert(UpstreamFailure {
                kind: FailureKind::Reset,
            });
            res.extensions_mut().insert(ResponseFlag("UR"));
            return Ok::<_, Infallible>(res);
        }
        let set = req
            .headers()
            .get("x-header-set")
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        let text = format!("{backend} {} {} {set}", req.method(), req.uri());
        Ok(Response::new(
            Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed(),
        ))
    }))
}

/// The circuit breakers of the backends, as the waypoint keeps them.
type Breakers = Arc<HashMap<BackendId, Arc<CircuitBreaker>>>;

fn stack() -> Stack {
    stack_over(upstream(), Breakers::default())
}

fn stack_over(upstream: Stack, breakers: Breakers) -> Stack {
    let attach_breaker = MapRequestLayer::new(move |mut req: Request<Body>| {
        let chosen = req.extensions().get::<ChosenBackend>().and_then(|c| c.backend);
        if let Some(breaker) = chosen.and_then(|b| breakers.get(&b)).cloned() {
            req.extensions_mut().insert(breaker);
        }
        req
    });
    let svc = ServiceBuilder::new()
        .layer(route::RouteLayer::new())
        .layer(backend::BackendLayer::new())
        .layer(attach_breaker)
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
        .service(upstream);
    BoxCloneSyncService::new(svc)
}

fn prefix_rule(prefix: &str, filters: Vec<Filter>) -> Rule {
    Rule {
        matches: vec![RouteMatch {
            path: Some(PathMatch::Prefix(prefix.into())),
            ..Default::default()
        }],
        filters,
        backends: vec![WeightedBackend {
            backend: Some(BackendId(1)),
            weight: 1,
            filters: vec![],
        }],
        ..Default::default()
    }
}

fn table() -> Arc<RouteTable> {
    let hn = HeaderName::from_static;
    let set = HeaderModifier {
        set: vec![(hn("x-header-set"), HeaderValue::from_static("set"))],
        ..Default::default()
    };
    let rules = vec![
        prefix_rule("/", vec![]),
        prefix_rule(
            "/prefix",
            vec![
                Filter::RequestHeaders(set),
                Filter::Rewrite(Rewrite {
                    hostname: None,
                    path: Some(PathModifier::ReplacePrefixMatch("/".into())),
                }),
                Filter::Mirror(Mirror {
                    backend: Some(BackendId(7)),
                    numerator: 1,
                    denominator: 1,
                }),
                Filter::ResponseHeaders(HeaderModifier {
                    add: vec![(hn("x-response"), HeaderValue::from_static("yes"))],
                    ..Default::default()
                }),
            ],
        ),
        Rule {
            backends: vec![],
            ..prefix_rule(
                "/redirect",
                vec![Filter::Redirect(Redirect {
                    scheme: Some("https".into()),
                    status: 301,
                    ..Default::default()
                })],
            )
        },
        prefix_rule(
            "/cors",
            vec![Filter::Cors(Arc::new(CorsPolicy {
                allow_origins: vec!["https://a.example".into()],
                allow_methods: vec!["GET".into()],
                ..Default::default()
            }))],
        ),
        Rule {
            timeouts: Timeouts {
                request: Some(Duration::from_millis(500)),
                backend_request: None,
            },
            ..prefix_rule("/slow", vec![])
        },
        Rule {
            retry: Some(RetryPolicy {
                attempts: 2,
                on_reset: true,
                ..Default::default()
            }),
            ..prefix_rule("/flaky", vec![])
        },
    ];
    let route = Route {
        kind: RouteKind::Http,
        namespace: "ns".into(),
        name: "r".into(),
        creation_timestamp: None,
        source_order: 0,
        hostnames: vec![],
        rules: rules.into_iter().map(Arc::new).collect(),
    };
    Arc::new(RouteTable::new(vec![Arc::new(route)]))
}

#[derive(Default)]
struct Sink(Mutex<Vec<(BackendId, String, Option<HeaderValue>)>>);

impl MirrorSink for Sink {
    fn mirror(&self, backend: BackendId, req: Request<Body>) {
        let header = req.headers().get("x-header-set").cloned();
        self.0.lock().unwrap().push((backend, req.uri().to_string(), header));
    }
}

async fn send(req: Request<Body>, sink: &Arc<Sink>) -> (Response<Bytes>, Option<ResponseFlag>) {
    let mut req = req;
    req.extensions_mut().insert(table());
    let sink: Arc<dyn MirrorSink> = sink.clone();
    req.extensions_mut().insert(sink);
    let res = stack().oneshot(req).await.unwrap();
    let flag = res.extensions().get::<ResponseFlag>().copied();
    let (parts, body) = res.into_parts();
    (
        Response::from_parts(parts, body.collect().await.unwrap().to_bytes()),
        flag,
    )
}

fn get(uri: &str) -> Request<Body> {
    Request::builder()
        .uri(uri)
        .header("host", "svc.ns:8080")
        .body(body(""))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_request_through_every_layer() {
    let sink = Arc::new(Sink::default());
    let (res, _) = send(get("/prefix/x?q=1"), &sink).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "1 GET /x?q=1 set");
    assert_eq!(res.headers()["x-response"], "yes");
    let mirrored = sink.0.lock().unwrap().clone();
    assert_eq!(
        mirrored,
        [(BackendId(7), "/x?q=1".to_owned(), Some(HeaderValue::from_static("set")))]
    );

    let (res, flag) = send(get("/redirect/a"), &sink).await;
    assert_eq!(res.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(res.headers()["location"], "https://svc.ns/redirect/a");
    assert_eq!(flag, None);

    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/cors")
        .header("origin", "https://a.example")
        .header("access-control-request-method", "GET")
        .body(body(""))
        .unwrap();
    let (res, _) = send(preflight, &sink).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["access-control-allow-origin"], "https://a.example");
    assert!(res.body().is_empty(), "a preflight is not forwarded");

    let (res, flag) = send(get("/slow"), &sink).await;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(flag, Some(ResponseFlag("UT")));

    let (res, _) = send(get("/flaky"), &sink).await;
    assert_eq!(res.status(), StatusCode::OK);

    let (res, flag) = send(get("/"), &sink).await;
    assert_eq!(res.body(), "1 GET / ");
    assert_eq!(flag, None);
}

#[tokio::test]
async fn unrouted_requests_are_404_nr() {
    let req = Request::builder().uri("/").body(body("")).unwrap();
    let res = stack().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("NR")));
}

/// What the scripted upstream saw of one attempt.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    path: String,
    /// The [`Attempt`] extension's number (0 without one) and the `x-envoy-attempt-count` header.
    attempt: u32,
    header: Option<String>,
    /// The breaker's (requests, retries) in use while the attempt ran.
    breaker: Option<(usize, usize)>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Answers by path: `/retry` 503 on the first attempt then 200, `/always500` 500, anything else 200.
fn scripted(log: Log) -> Stack {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let seen = Seen {
            path: req.uri().path().to_owned(),
            attempt: req.extensions().get::<Attempt>().map_or(0, |a| a.number),
            header: req
                .headers()
                .get("x-envoy-attempt-count")
                .map(|v| v.to_str().unwrap().to_owned()),
            breaker: req
                .extensions()
                .get::<Arc<CircuitBreaker>>()
                .map(|b| (b.in_use()[2], b.in_use()[3])),
        };
        let status = match (seen.path.as_str(), seen.attempt) {
            ("/retry", 1) => StatusCode::SERVICE_UNAVAILABLE,
            ("/always500", _) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::OK,
        };
        log.lock().unwrap().push(seen);
        let mut res = Response::new(body("upstream"));
        *res.status_mut() = status;
        std::future::ready(Ok::<_, Infallible>(res))
    }))
}

fn resilience_table() -> Arc<RouteTable> {
    let retry = |codes: &[u16]| {
        Some(RetryPolicy {
            attempts: 4,
            codes: codes.to_vec(),
            on_reset: true,
            on_connect_failure: true,
            on_refused_stream: true,
            ..Default::default()
        })
    };
    let to = |backend: usize, rule: Rule| Rule {
        backends: vec![WeightedBackend {
            backend: Some(BackendId(backend)),
            weight: 1,
            filters: vec![],
        }],
        ..rule
    };
    let rules = vec![
        to(
            1,
            Rule {
                fault: Some(FaultPolicy {
                    delay: None,
                    abort: Some(FaultAbort {
                        status: AbortStatus::Http(503),
                        percent: 100.0,
                    }),
                }),
                retry: retry(&[503]),
                ..prefix_rule("/abort", vec![])
            },
        ),
        to(
            1,
            Rule {
                fault: Some(FaultPolicy {
                    delay: Some(FaultDelay {
                        fixed: Duration::from_secs(2),
                        percent: 100.0,
                    }),
                    abort: None,
                }),
                timeouts: Timeouts {
                    request: Some(Duration::from_secs(1)),
                    backend_request: None,
                },
                ..prefix_rule("/delay", vec![])
            },
        ),
        to(
            1,
            Rule {
                retry: retry(&[503]),
                timeouts: Timeouts {
                    request: None,
                    backend_request: Some(Duration::from_secs(1)),
                },
                ..prefix_rule("/retry", vec![])
            },
        ),
        to(
            1,
            Rule {
                retry: retry(&[500]),
                ..prefix_rule("/always500", vec![])
            },
        ),
        to(
            2,
            Rule {
                retry: retry(&[503]),
                ..prefix_rule("/full", vec![])
            },
        ),
    ];
    let route = Route {
        kind: RouteKind::VirtualService,
        namespace: "ns".into(),
        name: "vs".into(),
        creation_timestamp: None,
        source_order: 0,
        hostnames: vec![],
        rules: rules.into_iter().map(Arc::new).collect(),
    };
    Arc::new(RouteTable::new(vec![Arc::new(route)]))
}

#[tokio::test(start_paused = true)]
async fn resilience_layers_compose() {
    let log: Log = Arc::default();
    let roomy = Arc::new(CircuitBreaker::new(Limits {
        max_requests: Some(10),
        max_retries: Some(10),
        ..Limits::default()
    }));
    let full = Arc::new(CircuitBreaker::new(Limits {
        max_requests: Some(0),
        ..Limits::default()
    }));
    let breakers: Breakers = Arc::new([(BackendId(1), roomy.clone()), (BackendId(2), full.clone())].into());
    let svc = stack_over(scripted(log.clone()), breakers);
    let send = |path: &'static str| {
        let mut req = get(path);
        req.extensions_mut().insert(resilience_table());
        svc.clone().oneshot(req)
    };
    let take_log = || std::mem::take(&mut *log.lock().unwrap());

    // A fault abort answers before the upstream (and before retry: its 503 is not retried).
    let res = send("/abort").await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("FI")));
    assert_eq!(take_log(), []);

    // The injected delay is outside the route timeout (2 s delay, 1 s timeout, still 200).
    let start = tokio::time::Instant::now();
    let res = send("/delay").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("DI")));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(take_log().len(), 1);
    assert_eq!(roomy.in_use()[2], 1);
    drop(res);
    assert_eq!(roomy.in_use()[2], 0, "a dropped response gives its permit back");

    // A retry after a 503 goes through the breaker: each attempt holds a request permit, the retry a retry
    // permit; all are back once the response body is read.
    let res = send("/retry").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = take_log();
    let attempts: Vec<_> = seen
        .iter()
        .map(|s| (s.attempt, s.header.as_deref(), s.breaker))
        .collect();
    assert_eq!(attempts, [(1, Some("1"), Some((1, 0))), (2, Some("2"), Some((1, 1)))]);
    assert_eq!(roomy.in_use()[2], 1, "the permit lives with the response body");
    res.into_body().collect().await.unwrap();
    assert_eq!(roomy.in_use(), [0; 4]);

    // Attempt numbers run 1..n; retries exhausted on a backend's own 500 return it unflagged.
    let res = send("/always500").await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let numbers: Vec<_> = take_log().iter().map(|s| s.attempt).collect();
    assert_eq!(numbers, [1, 2, 3, 4]);

    // Breaker overflow: 503 UO at once, not retried although the policy retries 503 and resets.
    let res = send("/full").await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("UO")));
    assert_eq!(res.headers()["x-envoy-overloaded"], "true");
    assert_eq!(take_log(), []);
    assert_eq!(full.in_use(), [0; 4]);
}
