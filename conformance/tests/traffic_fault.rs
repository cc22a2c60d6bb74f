//! VirtualService `fault` through the real waypoint: abort with an HTTP status (all or a share of requests),
//! delay, and a gRPC status abort over h2c.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod traffic_support;

use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use traffic_support::*;
use waypoint_conformance::client;
use waypoint_conformance::mesh::{PortSpec, ServiceSpec};

fn fault(fault: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: traffic}}
spec:
  hosts: [echo.traffic.svc.cluster.local]
  http:
  - fault: {fault}
    retries: {{attempts: 0}}
    route:
    - destination: {{host: echo.traffic.svc.cluster.local}}
"
    )
}

#[tokio::test]
async fn abort_all_requests_with_a_status() {
    let mesh = mesh(1, &fault("{abort: {httpStatus: 418, percentage: {value: 100}}}")).await;
    assert_config_accepted(&mesh);
    for _ in 0..5 {
        let reply = get_once(&mesh, "/").await;
        assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
        assert_eq!(reply.text(), "fault filter abort", "Envoy's fault abort body");
    }
    assert_eq!(
        echo(&mesh, "echo-v1-0").requests_seen(),
        0,
        "aborted requests never reach the backend"
    );
}

#[tokio::test]
async fn abort_half_of_the_requests() {
    let mesh = mesh(1, &fault("{abort: {httpStatus: 503, percentage: {value: 50}}}")).await;
    assert_config_accepted(&mesh);
    let source = mesh.source("client", "client").unwrap();
    let total = 200;
    let mut aborted = 0;
    for _ in 0..total {
        let reply = send(&mesh, &source, get("/", &[])).await;
        match reply.status {
            StatusCode::SERVICE_UNAVAILABLE => aborted += 1,
            StatusCode::OK => {}
            other => panic!("unexpected {other}"),
        }
    }
    // 50 % ± 12 points: binomial sd over 200 is 3.5 points.
    let got = share(aborted, total);
    assert!((0.38..=0.62).contains(&got), "{aborted} of {total} aborted");
    assert_eq!(echo(&mesh, "echo-v1-0").requests_seen(), total - aborted);
}

#[tokio::test]
async fn delay_holds_the_request_before_forwarding() {
    let mesh = mesh(1, &fault("{delay: {fixedDelay: 300ms, percentage: {value: 100}}}")).await;
    assert_config_accepted(&mesh);
    let started = Instant::now();
    let reply = get_once(&mesh, "/slow").await;
    assert_eq!(reply.status, StatusCode::OK);
    // A lower bound only: the request cannot have been answered before the injected delay.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(echo(&mesh, "echo-v1-0").requests_seen(), 1);
}

#[tokio::test]
async fn zero_percent_never_faults() {
    let mesh = mesh(1, &fault("{abort: {httpStatus: 500, percentage: {value: 0}}}")).await;
    let source = mesh.source("client", "client").unwrap();
    for _ in 0..30 {
        assert_eq!(send(&mesh, &source, get("/", &[])).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn grpc_status_abort_over_h2c() {
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc, namespace: traffic}
spec:
  hosts: [grpc.traffic.svc.cluster.local]
  http:
  - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route:
    - destination: {host: grpc.traffic.svc.cluster.local}
";
    let mesh = builder(&[("v1", 1)])
        .service(
            ServiceSpec::new(NS, "grpc", std::net::Ipv4Addr::new(10, 96, 50, 2))
                .selector(&[("app", SERVICE)])
                .port(PortSpec::new("grpc", 7070, 7070).app_protocol("kubernetes.io/h2c")),
        )
        .extra_config(vs)
        .start()
        .await
        .unwrap();
    assert_config_accepted(&mesh);
    let source = mesh.source("client", "client").unwrap();
    let tunnel = source.connect(&mesh.authority(NS, "grpc", 7070)).await.unwrap();
    let mut h2 = client::http2(tunnel).await.unwrap();
    let request = Request::post("http://grpc.traffic:7070/pkg.Echo/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(client::body(&b"\0\0\0\0\x02hi"[..]))
        .unwrap();
    let reply = client::send2(&mut h2, request).await.unwrap();
    // A gRPC status is an HTTP 200 carrying grpc-status (trailers-only: in the headers).
    assert_eq!(reply.status, StatusCode::OK);
    let grpc_status = reply
        .headers
        .get("grpc-status")
        .or_else(|| reply.trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(grpc_status.as_deref(), Some("14"), "UNAVAILABLE is 14");
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc"),
        "{:?}",
        reply.headers
    );
    assert_eq!(mesh.echo_on("echo-v1-0", 7070).unwrap().requests_seen(), 0);
}
