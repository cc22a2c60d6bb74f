//! HTTPRoute / GRPCRoute / Gateway routing through the real waypoint: the attachment rules (Service parents,
//! consumer routes, Gateway listeners and hostnames, workload addresses) that the conformance cases rely on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::Ipv4Addr;

use http::{Request, StatusCode};
use waypoint_conformance::client::{self, empty};
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};

const NS: &str = "app";

const ROUTES: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: by-path, namespace: app}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-routed, value: v2}]}
  - matches: [{headers: [{name: x-version, value: v1}]}]
    backendRefs: [{name: echo-v1, port: 80}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-added, value: by-route}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer-pin, namespace: consumer}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, namespace: app}]
  rules:
  - backendRefs: [{name: echo-v1, namespace: app, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: consumers, namespace: app}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: consumer}]
  to: [{group: '', kind: Service}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: app}
spec:
  gatewayClassName: waypoint
  addresses: [{type: IPAddress, value: 10.200.0.9}]
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: '*.example.com'}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge-route, namespace: app}
spec:
  parentRefs: [{name: edge}]
  hostnames: [shop.example.com, other.test]
  rules:
  - backendRefs: [{name: echo-v2, port: 80}]
";

async fn mesh() -> Mesh {
    Mesh::builder()
        .service(ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 7, 1)).port(PortSpec::http(80, 8080)))
        .service(
            ServiceSpec::new(NS, "echo-v1", Ipv4Addr::new(10, 96, 7, 2))
                .selector(&[("app", "echo"), ("version", "v1")])
                .port(PortSpec::http(80, 8080)),
        )
        .service(
            ServiceSpec::new(NS, "echo-v2", Ipv4Addr::new(10, 96, 7, 3))
                .selector(&[("app", "echo"), ("version", "v2")])
                .port(PortSpec::http(80, 8080)),
        )
        .pod(PodSpec::new(NS, "echo-v1-pod").labels(&[("app", "echo"), ("version", "v1")]))
        .pod(PodSpec::new(NS, "echo-v2-pod").labels(&[("app", "echo"), ("version", "v2")]))
        .extra_config(ROUTES)
        .start()
        .await
        .expect("mesh with routes starts")
}

async fn get(
    mesh: &Mesh,
    ns: &str,
    authority: &str,
    host: &str,
    path: &str,
    hdr: Option<(&str, &str)>,
) -> client::Reply {
    let source = mesh.source(ns, "client").unwrap();
    let mut req = Request::get(path).header("host", host);
    if let Some((k, v)) = hdr {
        req = req.header(k, v);
    }
    client::request(&source, authority, req.body(empty()).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn service_routes_match_path_and_headers_and_apply_filters() {
    let mesh = mesh().await;
    let echo = mesh.authority(NS, "echo", 80);
    let reply = get(&mesh, NS, &echo, "echo", "/v2/x", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["pod"], "echo-v2-pod");
    assert_eq!(reply.headers["x-routed"], "v2");

    let reply = get(&mesh, NS, &echo, "echo", "/any", Some(("x-version", "v1"))).await;
    assert_eq!(reply.json()["pod"], "echo-v1-pod");
    assert_eq!(reply.json()["headers"]["X-Added"][0], "by-route");

    // Routes exist for this Service and none matches: 404 from the waypoint, not a default backend.
    let reply = get(&mesh, NS, &echo, "echo", "/nothing", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // The Host header plays no part for a Service parent: the authority chose the Service.
    let reply = get(&mesh, NS, &echo, "unrelated.example", "/v2", None).await;
    assert_eq!(reply.json()["pod"], "echo-v2-pod");
    // A Service without routes keeps its default: its own endpoints.
    let reply = get(
        &mesh,
        NS,
        &mesh.authority(NS, "echo-v1", 80),
        "echo-v1",
        "/nothing",
        None,
    )
    .await;
    assert_eq!(reply.json()["pod"], "echo-v1-pod");
}

#[tokio::test]
async fn consumer_route_applies_only_to_its_namespace() {
    let mesh = mesh().await;
    let echo = mesh.authority(NS, "echo", 80);
    for _ in 0..4 {
        let reply = get(&mesh, "consumer", &echo, "echo", "/v2/ignored-for-consumers", None).await;
        assert_eq!(
            reply.json()["pod"],
            "echo-v1-pod",
            "the consumer route replaces the producer's for its clients"
        );
    }
    let reply = get(&mesh, "elsewhere", &echo, "echo", "/v2", None).await;
    assert_eq!(
        reply.json()["pod"],
        "echo-v2-pod",
        "other namespaces see the producer routes"
    );
}

#[tokio::test]
async fn gateway_listener_routes_by_hostname() {
    let mesh = mesh().await;
    let reply = get(&mesh, "outside", "10.200.0.9:80", "shop.example.com", "/", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["pod"], "echo-v2-pod");
    // other.test is outside the listener's *.example.com: not attached there.
    let reply = get(&mesh, "outside", "10.200.0.9:80", "other.test", "/", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = get(&mesh, "outside", "10.200.0.9:80", "shop.example.com:80", "/", None).await;
    assert_eq!(reply.status, StatusCode::OK, "the port in Host is ignored");
}

#[tokio::test]
async fn workload_addressed_traffic_goes_straight_to_the_pod() {
    let mesh = mesh().await;
    let authority = format!("{}:8080", mesh.pod_ip("echo-v1-pod"));
    let reply = get(&mesh, NS, &authority, "direct", "/v2", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["pod"],
        "echo-v1-pod",
        "no Service route applies to a pod address"
    );
    assert!(reply.headers.get("x-routed").is_none());
}
