//! Outlier detection (DestinationRule `trafficPolicy.outlierDetection`) through the real waypoint: an endpoint
//! answering errors is ejected after the configured consecutive errors, receives nothing while ejected, comes
//! back after `baseEjectionTime`, and stays ejected across a config hot reload.
//!
//! Times are short (1 s ejection) and the tests never sleep for them: "nothing while ejected" is checked only
//! on requests that finished inside the ejection window, measured from the last failure; "comes back" is
//! polled with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod traffic_support;

use std::time::{Duration, Instant};

use http::StatusCode;
use traffic_support::*;
use waypoint_conformance::echo::Misbehaviour;
use waypoint_conformance::mesh::Mesh;
use waypoint_conformance::source_ztunnel::SourceZtunnel;

const BAD: &str = "echo-v1-0";

fn outlier(detection: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: traffic}}
spec:
  host: echo.traffic.svc.cluster.local
  trafficPolicy:
    outlierDetection: {detection}
"
    )
}

/// Sends requests until the bad endpoint has answered `errors` of them; returns when the last one came back.
async fn drive_until_errors(mesh: &Mesh, source: &SourceZtunnel, errors: usize) -> Instant {
    let bad = echo(mesh, BAD);
    for _ in 0..200 {
        let before = bad.requests_seen();
        let reply = send(mesh, source, get("/", &[])).await;
        if bad.requests_seen() > before {
            assert!(
                reply.status.is_server_error(),
                "the bad endpoint's answer: {}",
                reply.status
            );
            if bad.requests_seen() >= errors {
                return Instant::now();
            }
        } else {
            assert_eq!(reply.status, StatusCode::OK);
        }
    }
    panic!("200 requests and {BAD} did not get {errors}");
}

/// Requests that complete inside `window` after `since` must not reach the bad endpoint. Returns how many
/// requests were checked.
async fn assert_ejected_for(mesh: &Mesh, source: &SourceZtunnel, since: Instant, window: Duration) -> usize {
    let bad = echo(mesh, BAD);
    let before = bad.requests_seen();
    let mut checked = 0;
    loop {
        let reply = send(mesh, source, get("/", &[])).await;
        if since.elapsed() >= window {
            return checked;
        }
        checked += 1;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "healthy endpoints answer while {BAD} is ejected"
        );
        assert_eq!(
            bad.requests_seen(),
            before,
            "{BAD} got a request {:?} into its ejection",
            since.elapsed()
        );
    }
}

async fn wait_until_bad_gets_traffic(mesh: &Mesh, source: &SourceZtunnel) {
    let bad = echo(mesh, BAD);
    let before = bad.requests_seen();
    let deadline = Instant::now() + DEADLINE;
    while bad.requests_seen() == before {
        assert!(Instant::now() < deadline, "{BAD} never came back after its ejection");
        send(mesh, source, get("/", &[])).await;
    }
}

#[tokio::test]
async fn consecutive_5xx_ejects_for_base_ejection_time_then_returns() {
    let mesh = mesh(
        3,
        &outlier("{consecutive5xxErrors: 2, interval: 100ms, baseEjectionTime: 1s, maxEjectionPercent: 100}"),
    )
    .await;
    assert_config_accepted(&mesh);
    echo(&mesh, BAD).misbehave(Misbehaviour::Status(500)).await;
    let source = mesh.source("client", "client").unwrap();
    let ejected_at = drive_until_errors(&mesh, &source, 2).await;
    let checked = assert_ejected_for(&mesh, &source, ejected_at, Duration::from_secs(1)).await;
    assert!(checked > 0, "no request finished inside the ejection window");
    // After the ejection time the endpoint is tried again (and, still failing, ejected again).
    wait_until_bad_gets_traffic(&mesh, &source).await;
}

#[tokio::test]
async fn healthy_endpoints_are_never_ejected() {
    let mesh = mesh(
        3,
        &outlier("{consecutive5xxErrors: 1, interval: 100ms, baseEjectionTime: 30s, maxEjectionPercent: 100}"),
    )
    .await;
    let source = mesh.source("client", "client").unwrap();
    for _ in 0..30 {
        assert_eq!(send(&mesh, &source, get("/", &[])).await.status, StatusCode::OK);
    }
    for pod in pods(&[("v1", 3)]) {
        assert!(echo(&mesh, &pod).requests_seen() > 0, "{pod} got no traffic");
    }
}

#[tokio::test]
async fn consecutive_gateway_errors_count_502_503_504_only() {
    let mesh = mesh(
        3,
        &outlier(
            "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, interval: 100ms, baseEjectionTime: 30s, maxEjectionPercent: 100}",
        ),
    )
    .await;
    assert_config_accepted(&mesh);
    let bad = echo(&mesh, BAD);
    let source = mesh.source("client", "client").unwrap();
    // 500 is not a gateway error: the endpoint keeps its share.
    bad.misbehave(Misbehaviour::Status(500)).await;
    drive_until_errors(&mesh, &source, 4).await;
    // 502 is: two in a row eject it.
    bad.misbehave(Misbehaviour::Status(502)).await;
    let ejected_at = drive_until_errors(&mesh, &source, 6).await;
    let checked = assert_ejected_for(&mesh, &source, ejected_at, Duration::from_secs(3)).await;
    assert!(checked > 0);
}

#[tokio::test]
async fn ejection_survives_a_config_hot_reload() {
    let rule = outlier("{consecutive5xxErrors: 2, interval: 100ms, baseEjectionTime: 30s, maxEjectionPercent: 100}");
    let mesh = mesh(3, &rule).await;
    assert_config_accepted(&mesh);
    echo(&mesh, BAD).misbehave(Misbehaviour::Status(500)).await;
    let source = mesh.source("client", "client").unwrap();
    drive_until_errors(&mesh, &source, 2).await;

    // An unrelated change: one more Service. The endpoint's ejection is state of the endpoint, not of the
    // config generation.
    let unrelated = "apiVersion: v1
kind: Service
metadata: {name: unrelated, namespace: traffic}
spec:
  clusterIP: 10.96.50.99
  selector: {app: nothing}
  ports: [{name: http, port: 80, targetPort: 8080}]
";
    reconfigure(&mesh, &[], &[&rule, unrelated]).await;
    let before = echo(&mesh, BAD).requests_seen();
    for i in 0..30 {
        let reply = send(&mesh, &source, get("/", &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i} after the reload");
    }
    assert_eq!(echo(&mesh, BAD).requests_seen(), before, "the reload un-ejected {BAD}");
}
