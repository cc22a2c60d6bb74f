//! Circuit breaking (DestinationRule `trafficPolicy.connectionPool`) through the real waypoint: overflow is
//! answered 503 with `x-envoy-overloaded: true` at once (never queued behind the slow request), requests
//! within the limits get through, and per-connection limits show at the backend as new connections.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod traffic_support;

use std::time::Duration;

use http::StatusCode;
use traffic_support::*;
use waypoint_conformance::client::Reply;
use waypoint_conformance::mesh::Mesh;

fn pool(connection_pool: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: traffic}}
spec:
  host: echo.traffic.svc.cluster.local
  trafficPolicy:
    connectionPool: {connection_pool}
"
    )
}

fn spawn_get(mesh: &Mesh, path: &str) -> tokio::task::JoinHandle<Reply> {
    let source = mesh.source("client", "client").unwrap();
    let (authority, path) = (authority(mesh), path.to_string());
    tokio::spawn(async move {
        waypoint_conformance::client::request(&source, &authority, get(&path, &[]))
            .await
            .unwrap()
    })
}

fn assert_overflow(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(
        reply.headers.get("x-envoy-overloaded").map(|v| v.to_str().unwrap()),
        Some("true"),
        "Envoy marks circuit-breaker overflow (UO) with x-envoy-overloaded"
    );
}

/// Polls until a request succeeds again (the slot of a finished request is released as its stream ends,
/// which may trail the client's last byte).
async fn eventually_ok(mesh: &Mesh) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let reply = get_once(mesh, "/after").await;
        if reply.status == StatusCode::OK {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} after the slow request finished",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http2_max_requests_overflow_is_503_at_once() {
    let mesh = mesh(1, &pool("{http: {http2MaxRequests: 1}}")).await;
    assert_config_accepted(&mesh);
    let backend = echo(&mesh, "echo-v1-0");
    let slow = spawn_get(&mesh, "/slow?delay=2s");
    backend.wait_for_in_flight(1).await;
    let reply = get_once(&mesh, "/second").await;
    assert_overflow(&reply);
    assert!(
        !slow.is_finished(),
        "the overflow was answered while the first request still ran"
    );
    assert_eq!(backend.requests_seen(), 1, "the overflow never reached the backend");
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    eventually_ok(&mesh).await;
}

#[tokio::test]
async fn max_connections_with_one_pending_request_overflows_the_third() {
    let mesh = mesh(
        1,
        &pool("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}"),
    )
    .await;
    assert_config_accepted(&mesh);
    let backend = echo(&mesh, "echo-v1-0");
    let slow = spawn_get(&mesh, "/slow?delay=1s");
    backend.wait_for_in_flight(1).await;
    // One of these waits for the only connection, the other has no room anywhere.
    let (mut b, mut c) = (spawn_get(&mesh, "/b"), spawn_get(&mesh, "/c"));
    let first_done = tokio::select! {
        r = &mut b => r.unwrap(),
        r = &mut c => r.unwrap(),
    };
    assert_overflow(&first_done);
    assert!(
        !slow.is_finished(),
        "the overflow was answered at once, not after the slow request"
    );
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    // The pending one goes out on the same connection once the slow request is done.
    tokio::time::timeout(DEADLINE, backend.wait_for_requests(2))
        .await
        .expect("the pending request is served");
    assert_eq!(backend.connections_accepted(), 1, "maxConnections: 1");
    eventually_ok(&mesh).await;
}

#[tokio::test]
async fn pending_requests_within_the_limit_all_succeed() {
    let mesh = mesh(
        1,
        &pool("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 5}}"),
    )
    .await;
    let backend = echo(&mesh, "echo-v1-0");
    let requests: Vec<_> = (0..4)
        .map(|i| spawn_get(&mesh, &format!("/r{i}?delay=100ms")))
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(backend.requests_seen(), 4);
    assert_eq!(
        backend.connections_accepted(),
        1,
        "one connection, requests queued for it"
    );
}

/// The connection each request with `uri` arrived on.
fn connections_of(mesh: &Mesh, uri: &str) -> Vec<usize> {
    echo(mesh, "echo-v1-0")
        .exchanges()
        .iter()
        .filter(|e| e.uri == uri)
        .map(|e| e.connection)
        .collect()
}

#[tokio::test]
async fn max_requests_per_connection_one_opens_a_connection_per_request() {
    let mesh = mesh(1, &pool("{http: {maxRequestsPerConnection: 1}}")).await;
    assert_config_accepted(&mesh);
    for _ in 0..4 {
        assert_eq!(get_once(&mesh, "/fresh").await.status, StatusCode::OK);
    }
    let used = connections_of(&mesh, "/fresh");
    assert_eq!(used, [1, 2, 3, 4], "each request on a connection of its own");
}

#[tokio::test]
async fn max_requests_per_connection_applies_to_connections_opened_before_the_rule() {
    let mesh = mesh(1, "").await;
    let backend = echo(&mesh, "echo-v1-0");
    for _ in 0..3 {
        assert_eq!(get_once(&mesh, "/pooled").await.status, StatusCode::OK);
    }
    assert_eq!(
        backend.connections_accepted(),
        1,
        "without a limit, the idle connection is reused"
    );

    // Envoy builds a new cluster for the changed rule and drains the old pool: the connection that already
    // carried three requests does not carry a fourth.
    reconfigure(&mesh, &[], &[&pool("{http: {maxRequestsPerConnection: 1}}")]).await;
    for _ in 0..4 {
        assert_eq!(get_once(&mesh, "/fresh").await.status, StatusCode::OK);
    }
    let used = connections_of(&mesh, "/fresh");
    assert_eq!(used, [2, 3, 4, 5], "connections per request after the rule applied");
}

#[tokio::test]
async fn idle_timeout_closes_unused_upstream_connections() {
    let mesh = mesh(1, &pool("{http: {idleTimeout: 300ms}}")).await;
    assert_config_accepted(&mesh);
    let backend = echo(&mesh, "echo-v1-0");
    assert_eq!(get_once(&mesh, "/once").await.status, StatusCode::OK);
    // The waypoint's own pool keeps idle connections for 60 s; the rule's 300 ms closes this one.
    tokio::time::timeout(DEADLINE, backend.wait_for_open_connections_at_most(0))
        .await
        .expect("the idle upstream connection is closed");
}
