//! CUSTOM AuthorizationPolicies through the real waypoint: an HTTP and a gRPC ext_authz server on loopback,
//! allow (headers to the upstream and to the client), deny (the server's reply, flag UAEX), CUSTOM before DENY,
//! and an unreachable server failing closed (`statusOnError`) or open (`failOpen`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use waypoint_conformance::client::{self, empty};
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};
use waypoint_conformance::net::unique_loopback_ip;
use waypoint_proto::ext_authz as pb;

const NS: &str = "app";

type Seen = Arc<Mutex<Vec<Request<()>>>>;

/// Envoy's HTTP authorization service contract: `/check/allow…` → 200 with headers for the upstream and the
/// client, anything else → 401 with a header and a body.
async fn http_authz_server() -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind((unique_loopback_ip(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (parts, _) = req.into_parts();
                    let allow = parts.uri.path().starts_with("/check/allow");
                    record.lock().unwrap().push(Request::from_parts(parts, ()));
                    let resp = if allow {
                        Response::builder()
                            .header("x-ext-user", "alice")
                            .header("x-ext-down", "seen")
                            .header("x-not-forwarded", "1")
                            .body(Full::new(Bytes::new()))
                    } else {
                        Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .header("x-ext-reason", "no-token")
                            .header("x-other", "dropped")
                            .body(Full::new(Bytes::from_static(b"denied by ext")))
                    };
                    async move { Ok::<_, Infallible>(resp.unwrap()) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// `envoy.service.auth.v3.Authorization/Check`: allows paths under `/ok`, denies the rest with 401.
async fn grpc_authz_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((unique_loopback_ip(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    assert_eq!(req.uri().path(), pb::CHECK_PATH);
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let check: pb::CheckRequest = pb::grpc_unframe(&body).unwrap();
                    let attrs = check.attributes.unwrap();
                    let http = attrs.request.unwrap().http.unwrap();
                    let principal = attrs.source.unwrap().principal;
                    let reply = if http.path.starts_with("/ok") {
                        pb::CheckResponse {
                            status: Some(pb::RpcStatus::default()),
                            http_response: Some(pb::HttpResponse::OkResponse(pb::OkHttpResponse {
                                headers: vec![header("x-grpc-principal", &principal)],
                                ..Default::default()
                            })),
                        }
                    } else {
                        pb::CheckResponse {
                            status: Some(pb::RpcStatus {
                                code: 7,
                                message: "denied".into(),
                            }),
                            http_response: Some(pb::HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
                                status: Some(pb::HttpStatus { code: 401 }),
                                headers: vec![header("x-grpc-reason", "denied")],
                                body: "grpc says no".into(),
                            })),
                        }
                    };
                    let frame = Bytes::from(pb::grpc_frame(&reply));
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let body = http_body_util::StreamBody::new(futures_util::stream::iter(vec![
                        Ok::<_, Infallible>(hyper::body::Frame::data(frame)),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ]));
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn header(key: &str, value: &str) -> pb::HeaderValueOption {
    pb::HeaderValueOption {
        header: Some(pb::HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: vec![],
        }),
        append: None,
        append_action: 0,
    }
}

fn custom(service: &str, provider: &str, paths: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext-{service}, namespace: app}}
spec:
  targetRefs: [{{group: '', kind: Service, name: {service}}}]
  action: CUSTOM
  provider: {{name: {provider}}}
  rules: [{{to: [{{operation: {{paths: {paths}}}}}]}}]
"
    )
}

const DENY_SECRET: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-secret, namespace: app}
spec:
  targetRefs: [{group: '', kind: Service, name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: ['*/secret']}}]}]
";

async fn mesh() -> (Mesh, Seen) {
    let (http_addr, seen) = http_authz_server().await;
    let grpc_addr = grpc_authz_server().await;
    // Nothing listens there: connection refused.
    let dead = SocketAddr::new(unique_loopback_ip().into(), 9);
    let security = json!({
        "extensionProviders": [
            {"name": "http-ext", "envoyExtAuthzHttp": {
                "service": http_addr.ip().to_string(), "port": http_addr.port(), "timeout": "2s",
                "pathPrefix": "/check",
                "includeRequestHeadersInCheck": ["authorization", "x-ext-*"],
                "includeAdditionalHeadersInCheck": {"x-from-waypoint": "yes"},
                "headersToUpstreamOnAllow": ["x-ext-user"],
                "headersToDownstreamOnAllow": ["x-ext-down"],
                "headersToDownstreamOnDeny": ["x-ext-reason"],
            }},
            {"name": "grpc-ext", "envoyExtAuthzGrpc": {
                "service": grpc_addr.ip().to_string(), "port": grpc_addr.port(), "timeout": "2s",
            }},
            {"name": "dead-closed", "envoyExtAuthzHttp": {
                "service": dead.ip().to_string(), "port": dead.port(), "timeout": "1s", "statusOnError": "503",
            }},
            {"name": "dead-open", "envoyExtAuthzGrpc": {
                "service": dead.ip().to_string(), "port": dead.port(), "timeout": "1s", "failOpen": true,
            }},
        ]
    });
    let svc = |name: &str, last: u8| {
        ServiceSpec::new(NS, name, Ipv4Addr::new(10, 96, 8, last))
            .selector(&[("app", "echo")])
            .port(PortSpec::http(80, 8080))
    };
    let config = [
        custom("echo", "http-ext", "['/allow*', '/deny*']"),
        DENY_SECRET.to_string(),
        custom("echo-grpc", "grpc-ext", "['*']"),
        custom("echo-closed", "dead-closed", "['*']"),
        custom("echo-open", "dead-open", "['*']"),
    ]
    .join("---\n");
    let mesh = Mesh::builder()
        .service(svc("echo", 1))
        .service(svc("echo-grpc", 2))
        .service(svc("echo-closed", 3))
        .service(svc("echo-open", 4))
        .pod(PodSpec::new(NS, "echo-pod").labels(&[("app", "echo")]))
        .security(security)
        .extra_config(&config)
        .start()
        .await
        .expect("mesh with ext_authz providers starts");
    (mesh, seen)
}

async fn get(mesh: &Mesh, service: &str, path: &str) -> client::Reply {
    let source = mesh.source("front", "client").unwrap();
    let req = Request::get(path)
        .header("host", service)
        .header("authorization", "Bearer t0k")
        .header("x-ext-extra", "1")
        .header("x-private", "secret")
        .body(empty())
        .unwrap();
    client::request(&source, &mesh.authority(NS, service, 80), req)
        .await
        .unwrap()
}

#[tokio::test]
async fn http_provider_allows_denies_and_runs_before_deny() {
    let (mesh, seen) = mesh().await;

    let reply = get(&mesh, "echo", "/allow/x?q=1").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["X-Ext-User"][0], "alice");
    assert!(reply.json()["headers"]["X-Not-Forwarded"].is_null());
    assert_eq!(reply.headers["x-ext-down"], "seen");
    {
        let seen = seen.lock().unwrap();
        let check = seen.last().unwrap();
        assert_eq!(check.method(), http::Method::GET);
        assert_eq!(check.uri().path_and_query().unwrap().as_str(), "/check/allow/x?q=1");
        assert_eq!(check.headers()["host"], "echo");
        assert_eq!(check.headers()["authorization"], "Bearer t0k");
        assert_eq!(check.headers()["x-ext-extra"], "1");
        assert_eq!(check.headers()["x-from-waypoint"], "yes");
        assert_eq!(check.headers()["content-length"], "0");
        assert!(check.headers().get("x-private").is_none());
    }

    let reply = get(&mesh, "echo", "/deny").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.text(), "denied by ext");
    assert_eq!(reply.headers["x-ext-reason"], "no-token");
    assert!(reply.headers.get("x-other").is_none());

    // Allowed by the server, then denied by the DENY policy (CUSTOM → DENY → ALLOW).
    let reply = get(&mesh, "echo", "/allow/secret").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.text(), "RBAC: access denied");
    // The CUSTOM policy does not match: the server is not asked.
    let asked = seen.lock().unwrap().len();
    let reply = get(&mesh, "echo", "/public").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().len(), asked);
}

#[tokio::test]
async fn grpc_provider_allows_and_denies() {
    let (mesh, _) = mesh().await;
    let reply = get(&mesh, "echo-grpc", "/ok/1").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["headers"]["X-Grpc-Principal"][0],
        format!("spiffe://{}/ns/front/sa/client", mesh.trust_domain())
    );
    let reply = get(&mesh, "echo-grpc", "/nope").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.text(), "grpc says no");
    assert_eq!(reply.headers["x-grpc-reason"], "denied");
}

#[tokio::test]
async fn unreachable_provider_fails_closed_or_open() {
    let (mesh, _) = mesh().await;
    let reply = get(&mesh, "echo-closed", "/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let reply = get(&mesh, "echo-open", "/x").await;
    assert_eq!(reply.status, StatusCode::OK);
}
