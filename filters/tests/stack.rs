//! The whole per-request stack in the waypoint's order, erased the way the waypoint erases it, driven with a
//! stub upstream: proves the layers compose (Clone + Send + Sync, Send futures) and talk through the extensions.

#![allow(clippy::unwrap_used)] // the test helpers outside #[test] functions unwrap too

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use waypoint_filters::context::{ChosenBackend, FailureKind, MirrorSink, ResponseFlag, UpstreamFailure};
use waypoint_filters::route::{
    BackendId, CorsPolicy, Filter, HeaderModifier, Mirror, PathMatch, PathModifier, Redirect, RetryPolicy, Rewrite,
    Route, RouteKind, RouteMatch, RouteTable, Rule, Timeouts, WeightedBackend,
};
use waypoint_filters::{Body, backend, cors, headers, mirror, redirect, retry, rewrite, route, timeout};

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

fn stack() -> Stack {
    let svc = ServiceBuilder::new()
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
        .service(upstream());
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
