//! DestinationRule subsets (by `version` label) used by VirtualService routes through the real waypoint:
//! routing by header, weighted split, a subset's own traffic policy, and a route to an undefined subset.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod traffic_support;

use http::StatusCode;
use traffic_support::*;
use waypoint_conformance::mesh::Mesh;

const SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: traffic}
spec:
  host: echo.traffic.svc.cluster.local
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
";

async fn subset_mesh(vs: &str) -> Mesh {
    let mesh = builder(&[("v1", 2), ("v2", 2)])
        .extra_config(SUBSETS)
        .extra_config(vs)
        .start()
        .await
        .unwrap();
    assert_config_accepted(&mesh);
    mesh
}

fn version_of(pod: &str) -> &str {
    pod.split('-').nth(1).unwrap_or_default()
}

#[tokio::test]
async fn header_match_routes_to_subsets() {
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: traffic}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-version: {exact: v2}}}]
    route:
    - destination: {host: echo, subset: v2}
  - route:
    - destination: {host: echo, subset: v1}
";
    let mesh = subset_mesh(vs).await;
    let source = mesh.source("client", "client").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let reply = send(&mesh, &source, get("/", &[("x-version", "v2")])).await;
        assert_eq!(reply.status, StatusCode::OK);
        let pod = answered_by(&reply).unwrap();
        assert_eq!(version_of(&pod), "v2", "{pod}");
        let reply = send(&mesh, &source, get("/", &[])).await;
        let pod = answered_by(&reply).unwrap();
        assert_eq!(version_of(&pod), "v1", "{pod}");
        seen.insert(pod);
    }
    assert_eq!(seen.len(), 2, "both v1 pods serve the v1 subset: {seen:?}");
}

#[tokio::test]
async fn subset_traffic_policy_applies_to_that_subset() {
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: traffic}
spec:
  hosts: [echo.traffic.svc.cluster.local]
  http:
  - route:
    - destination: {host: echo.traffic.svc.cluster.local, subset: v2}
";
    let mesh = subset_mesh(vs).await;
    let source = mesh.source("client", "client").unwrap();
    // v2's own policy hashes on x-user: one user stays on one pod.
    let mut pods = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let reply = send(&mesh, &source, get("/", &[("x-user", "carol")])).await;
        pods.insert(answered_by(&reply).unwrap());
    }
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(version_of(pods.first().unwrap()), "v2");
}

#[tokio::test]
async fn weighted_subsets_split_80_20() {
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: traffic}
spec:
  hosts: [echo.traffic.svc.cluster.local]
  http:
  - route:
    - destination: {host: echo.traffic.svc.cluster.local, subset: v1}
      weight: 80
    - destination: {host: echo.traffic.svc.cluster.local, subset: v2}
      weight: 20
";
    let mesh = subset_mesh(vs).await;
    let source = mesh.source("client", "client").unwrap();
    let total = 500;
    let mut v2 = 0;
    for _ in 0..total {
        let reply = send(&mesh, &source, get("/", &[])).await;
        assert_eq!(reply.status, StatusCode::OK);
        if version_of(&answered_by(&reply).unwrap()) == "v2" {
            v2 += 1;
        }
    }
    // 20 % ± 6 points: binomial sd over 500 is 1.8 points, so this is over 3 sd.
    let got = share(v2, total);
    assert!((0.14..=0.26).contains(&got), "v2 got {v2} of {total} ({got:.3})");
}

#[tokio::test]
async fn undefined_subset_is_503() {
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: traffic}
spec:
  hosts: [echo.traffic.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /ghost}}]
    route:
    - destination: {host: echo.traffic.svc.cluster.local, subset: v3}
  - route:
    - destination: {host: echo.traffic.svc.cluster.local, subset: v1}
";
    let mesh = builder(&[("v1", 1), ("v2", 1)])
        .extra_config(SUBSETS)
        .extra_config(vs)
        .start()
        .await
        .unwrap();
    // Envoy answers a route whose cluster does not exist with 503 (NC); the rest of the route table works.
    let reply = get_once(&mesh, "/ghost").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    let reply = get_once(&mesh, "/real").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(answered_by(&reply).as_deref(), Some("echo-v1-0"));
    for pod in ["echo-v1-0", "echo-v2-0"] {
        assert!(
            echo(&mesh, pod)
                .exchanges()
                .iter()
                .all(|e| !e.uri.starts_with("/ghost")),
            "{pod} got the undefined subset's request"
        );
    }
}
