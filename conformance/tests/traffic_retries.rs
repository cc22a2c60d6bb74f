//! VirtualService `retries` through the real waypoint: which failures are retried for each `retryOn`, how many
//! attempts reach the backend (counted there), `x-envoy-attempt-count`, exhausted retries, body replay.
//!
//! Istio's `attempts` is the number of retries (Envoy's `num_retries`): `attempts: 2` allows 3 tries.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod traffic_support;

use http::{Request, StatusCode};
use traffic_support::*;
use waypoint_conformance::client;
use waypoint_conformance::echo::Misbehaviour;
use waypoint_conformance::mesh::{Mesh, PodSpec};

fn retries(retry_on: &str, attempts: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: traffic}}
spec:
  hosts: [echo.traffic.svc.cluster.local]
  http:
  - retries: {{attempts: {attempts}, retryOn: '{retry_on}'}}
    route:
    - destination: {{host: echo.traffic.svc.cluster.local}}
"
    )
}

async fn one_pod(retry_on: &str, attempts: u32) -> Mesh {
    let mesh = mesh(1, &retries(retry_on, attempts)).await;
    assert_config_accepted(&mesh);
    mesh
}

#[tokio::test]
async fn retry_on_5xx_until_success_with_attempt_count_header() {
    let mesh = one_pod("5xx", 3).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave_times(Misbehaviour::Status(500), 2).await;
    let reply = get_once(&mesh, "/flaky").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(backend.requests_seen(), 3, "two failures, then the success");
    assert_eq!(attempt_counts(backend), ["1", "2", "3"]);
    // The echo of the successful attempt shows the header as the backend saw it.
    assert_eq!(reply.json()["headers"]["X-Envoy-Attempt-Count"][0], "3");
}

#[tokio::test]
async fn exhausted_retries_return_the_last_status() {
    let mesh = one_pod("5xx", 2).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave(Misbehaviour::Status(503)).await;
    let reply = get_once(&mesh, "/down").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(backend.requests_seen(), 3, "the first try and two retries");
    assert_eq!(attempt_counts(backend), ["1", "2", "3"]);
}

#[tokio::test]
async fn gateway_error_retries_502_503_504_but_not_500() {
    let mesh = one_pod("gateway-error", 2).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave_times(Misbehaviour::Status(500), 1).await;
    let reply = get_once(&mesh, "/a").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(backend.requests_seen(), 1, "500 is not a gateway error");
    for code in [502, 503, 504] {
        let before = backend.requests_seen();
        backend.misbehave_times(Misbehaviour::Status(code), 1).await;
        let reply = get_once(&mesh, "/b").await;
        assert_eq!(reply.status, StatusCode::OK, "{code} is retried");
        assert_eq!(backend.requests_seen() - before, 2, "{code}: one retry");
    }
}

#[tokio::test]
async fn status_not_in_retry_on_is_not_retried() {
    let mesh = one_pod("connect-failure", 2).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave_times(Misbehaviour::Status(503), 1).await;
    let reply = get_once(&mesh, "/once").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(backend.requests_seen(), 1);
}

#[tokio::test]
async fn reset_is_retried_with_retry_on_reset() {
    let mesh = one_pod("reset", 2).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave_times(Misbehaviour::Reset, 1).await;
    let reply = get_once(&mesh, "/reset").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(backend.requests_seen(), 2);
    assert_eq!(attempt_counts(backend), ["1", "2"]);
}

#[tokio::test]
async fn reset_without_retry_on_reset_is_a_503() {
    let mesh = one_pod("retriable-4xx", 2).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave_times(Misbehaviour::Reset, 1).await;
    let reply = get_once(&mesh, "/reset").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply.text().contains("reset before headers"),
        "Envoy's local reply for a reset: {:?}",
        reply.text()
    );
    assert_eq!(backend.requests_seen(), 1);
}

#[tokio::test]
async fn retriable_4xx_retries_409_only() {
    let mesh = one_pod("retriable-4xx", 2).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave_times(Misbehaviour::Status(409), 1).await;
    let reply = get_once(&mesh, "/conflict").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(backend.requests_seen(), 2);
    backend.misbehave_times(Misbehaviour::Status(429), 1).await;
    let reply = get_once(&mesh, "/busy").await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "only 409 is a retriable 4xx"
    );
    assert_eq!(backend.requests_seen(), 3);
}

#[tokio::test]
async fn retriable_status_codes_with_a_listed_code() {
    // Istio: a status code in retryOn is added to the retriable codes.
    let mesh = one_pod("retriable-status-codes,418", 2).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave_times(Misbehaviour::Status(418), 2).await;
    let reply = get_once(&mesh, "/teapot").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(backend.requests_seen(), 3);
    backend.misbehave_times(Misbehaviour::Status(500), 1).await;
    let reply = get_once(&mesh, "/other").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "500 is not listed");
    assert_eq!(backend.requests_seen(), 4);
}

#[tokio::test]
async fn small_post_body_is_replayed_on_retry() {
    let mesh = one_pod("5xx", 2).await;
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave_times(Misbehaviour::Status(503), 1).await;
    let source = mesh.source("client", "client").unwrap();
    let body = vec![b'p'; 5000];
    let request = Request::post("/upload")
        .header("host", SERVICE)
        .body(client::body(body))
        .unwrap();
    let reply = send(&mesh, &source, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(backend.requests_seen(), 2);
    assert_eq!(
        reply.json()["bodyBytes"],
        5000,
        "the retry carries the whole body again"
    );
    assert_eq!(reply.json()["method"], "POST");
}

/// Connect failures on plain-TCP endpoints (no ztunnel in front: the connect itself is refused).
#[tokio::test]
async fn connect_failure_is_retried_on_another_endpoint_and_exhaustion_is_503() {
    let mesh = builder(&[])
        .pod(PodSpec::new(NS, "echo-down").labels(&[("app", SERVICE)]).hbone(false))
        .pod(PodSpec::new(NS, "echo-up").labels(&[("app", SERVICE)]).hbone(false))
        .extra_config(&retries("connect-failure", 3))
        .start()
        .await
        .unwrap();
    assert_config_accepted(&mesh);
    let (down, up) = (echo(&mesh, "echo-down"), echo(&mesh, "echo-up"));
    let source = mesh.source("client", "client").unwrap();
    // Both refuse: every try fails to connect, the answer is the last failure's local reply (URX).
    down.misbehave(Misbehaviour::RefuseConnections).await;
    up.misbehave(Misbehaviour::RefuseConnections).await;
    let reply = send(&mesh, &source, get("/c", &[])).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply.text().contains("connection failure"),
        "Envoy's local reply for a connect failure: {:?}",
        reply.text()
    );

    // One comes back: every request succeeds there, whichever endpoint the balancer tries first.
    up.behave().await;
    for i in 0..10 {
        let reply = send(&mesh, &source, get("/c", &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
        assert_eq!(answered_by(&reply).as_deref(), Some("echo-up"));
    }
    assert_eq!(up.requests_seen(), 10);
    assert_eq!(down.requests_seen(), 0);
}

/// The same through destination ztunnels: the pod refusing connections makes its ztunnel answer the CONNECT
/// with 503, which is a connect failure too.
#[tokio::test]
async fn connect_failure_through_ztunnel_is_retried() {
    let mesh = mesh(2, &retries("connect-failure", 3)).await;
    let (down, up) = (echo(&mesh, "echo-v1-0"), echo(&mesh, "echo-v1-1"));
    down.misbehave(Misbehaviour::RefuseConnections).await;
    let source = mesh.source("client", "client").unwrap();
    for i in 0..8 {
        let reply = send(&mesh, &source, get("/z", &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
    }
    assert_eq!(up.requests_seen(), 8);
    assert_eq!(down.requests_seen(), 0);
}
