//! Timeouts through the real waypoint: VirtualService `timeout` and `retries.perTryTimeout`, HTTPRoute
//! `timeouts.request`, against echo backends that hang or answer late.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod traffic_support;

use std::time::Duration;

use http::StatusCode;
use traffic_support::*;
use waypoint_conformance::echo::Misbehaviour;

const VS_TIMEOUT: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: traffic}
spec:
  hosts: [echo.traffic.svc.cluster.local]
  http:
  - timeout: 300ms
    retries: {attempts: 0}
    route:
    - destination: {host: echo.traffic.svc.cluster.local}
";

#[tokio::test]
async fn vs_timeout_answers_504_and_cancels_the_hanging_upstream() {
    let mesh = mesh(1, VS_TIMEOUT).await;
    assert_config_accepted(&mesh);
    let backend = echo(&mesh, "echo-v1-0");
    backend.misbehave(Misbehaviour::Hang).await;
    let started = std::time::Instant::now();
    let reply = get_once(&mesh, "/hang").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
    assert_eq!(reply.text().trim_end(), "upstream request timeout", "Envoy's UT body");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered before the deadline"
    );
    assert_eq!(backend.requests_seen(), 1, "no retry was configured");
    // The upstream request does not linger at the backend after the deadline.
    tokio::time::timeout(DEADLINE, backend.wait_for_cancelled(1))
        .await
        .expect("the waypoint cancels the upstream request at the deadline");

    // The same route answers normally once the backend does.
    backend.behave().await;
    let reply = get_once(&mesh, "/fine").await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn vs_timeout_does_not_cut_a_backend_that_answers_in_time() {
    let mesh = mesh(1, VS_TIMEOUT).await;
    let reply = get_once(&mesh, "/quick?delay=50ms").await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = get_once(&mesh, "/late?delay=2s").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn per_try_timeout_retries_on_another_endpoint() {
    let extra = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: traffic}
spec:
  hosts: [echo.traffic.svc.cluster.local]
  http:
  - timeout: 10s
    retries: {attempts: 2, perTryTimeout: 200ms, retryOn: 5xx}
    route:
    - destination: {host: echo.traffic.svc.cluster.local}
";
    let mesh = mesh(2, extra).await;
    assert_config_accepted(&mesh);
    let (slow, good) = (echo(&mesh, "echo-v1-0"), echo(&mesh, "echo-v1-1"));
    slow.misbehave(Misbehaviour::Hang).await;
    // Until the hanging endpoint had two first attempts (the balancer decides which endpoint goes first),
    // every request must still succeed, from the good endpoint, through a retry after the per-try timeout.
    let source = mesh.source("client", "client").unwrap();
    let mut requests = 0;
    while slow.requests_seen() < 2 {
        requests += 1;
        assert!(
            requests <= 50,
            "50 requests and the hanging endpoint got fewer than 2 attempts"
        );
        let reply = send(&mesh, &source, get("/try", &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "request {requests}: {}", reply.text());
        assert_eq!(answered_by(&reply).as_deref(), Some("echo-v1-1"));
    }
    // Istio adds the previous-hosts retry predicate: the retry goes to the other endpoint, never back to the
    // one that timed out.
    assert_eq!(slow.requests_seen(), 2, "a retry went back to the hanging endpoint");
    assert_eq!(good.requests_seen(), requests);
    let retried: Vec<String> = attempt_counts(good).into_iter().filter(|c| c != "1").collect();
    assert_eq!(retried, ["2", "2"], "each retry is the second attempt");
    tokio::time::timeout(DEADLINE, slow.wait_for_cancelled(2))
        .await
        .expect("timed-out attempts are cancelled upstream");
}

#[tokio::test]
async fn httproute_request_timeout() {
    let extra = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: traffic}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - timeouts: {request: 300ms}
    backendRefs: [{name: echo, port: 80}]
";
    let mesh = mesh(1, extra).await;
    assert_config_accepted(&mesh);
    let reply = get_once(&mesh, "/late?delay=3s").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.text().trim_end(), "upstream request timeout");
    let reply = get_once(&mesh, "/quick?delay=10ms").await;
    assert_eq!(reply.status, StatusCode::OK);
}
