//! Load balancing (DestinationRule `trafficPolicy.loadBalancer`) through the real waypoint: how requests spread
//! over the endpoints for each policy, and consistent hashing's stickiness and limited disruption when an
//! endpoint leaves. Distribution checks state their tolerance next to the assertion.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod traffic_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use http::StatusCode;
use traffic_support::*;
use waypoint_conformance::echo::Misbehaviour;
use waypoint_conformance::mesh::Mesh;

fn lb(load_balancer: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: traffic}}
spec:
  host: echo.traffic.svc.cluster.local
  trafficPolicy:
    loadBalancer: {load_balancer}
"
    )
}

async fn lb_mesh(pods: usize, load_balancer: &str) -> Mesh {
    let mesh = mesh(pods, &lb(load_balancer)).await;
    assert_config_accepted(&mesh);
    mesh
}

/// Which pod answered each of `n` sequential requests from one client.
async fn answers(mesh: &Mesh, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
    let source = mesh.source("client", "client").unwrap();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let reply = send(mesh, &source, get("/", headers)).await;
        assert_eq!(reply.status, StatusCode::OK);
        *counts.entry(answered_by(&reply).unwrap()).or_insert(0) += 1;
    }
    counts
}

/// The pod each key lands on, by header `x-user: <key>`.
async fn placement(mesh: &Mesh, keys: &[String]) -> BTreeMap<String, String> {
    let source = mesh.source("client", "client").unwrap();
    let mut out = BTreeMap::new();
    for key in keys {
        let reply = send(mesh, &source, get("/", &[("x-user", key)])).await;
        assert_eq!(reply.status, StatusCode::OK);
        out.insert(key.clone(), answered_by(&reply).unwrap());
    }
    out
}

#[tokio::test]
async fn round_robin_splits_evenly() {
    let mesh = lb_mesh(3, "{simple: ROUND_ROBIN}").await;
    let counts = answers(&mesh, 30, &[]).await;
    // Envoy keeps round-robin state per worker thread: sequential requests may land on different workers, so
    // each endpoint gets 10 ± 2 of 30 rather than exactly 10.
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (pod, n) in &counts {
        assert!((8..=12).contains(n), "{pod} got {n} of 30: {counts:?}");
    }
}

#[tokio::test]
async fn random_uses_every_endpoint() {
    let mesh = lb_mesh(3, "{simple: RANDOM}").await;
    let counts = answers(&mesh, 60, &[]).await;
    // P(an endpoint gets none of 60) = 3 · (2/3)^60 ≈ 1e-10.
    assert_eq!(counts.len(), 3, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_the_slow_endpoint() {
    let mesh = lb_mesh(3, "{simple: LEAST_REQUEST}").await;
    let slow = "echo-v1-0";
    echo(&mesh, slow)
        .misbehave(Misbehaviour::Delay(Duration::from_millis(300)))
        .await;
    let source = mesh.source("client", "client").unwrap();
    let authority = authority(&mesh);
    let total = 60;
    let replies: Vec<_> = stream::iter(0..total)
        .map(|_| {
            let (source, authority) = (source.clone(), authority.clone());
            async move {
                waypoint_conformance::client::request(&source, &authority, get("/", &[]))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(6)
        .collect()
        .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let to_slow = replies
        .iter()
        .filter(|r| answered_by(r).as_deref() == Some(slow))
        .count();
    // Round robin would give it 1/3 (20). With power-of-two choices it is picked only when both choices land
    // on it while it holds requests (1/9), or while it is idle: well under a quarter.
    assert!(
        share(to_slow, total) < 0.25,
        "the slow endpoint got {to_slow} of {total}"
    );
}

#[tokio::test]
async fn consistent_hash_on_header_sticks_and_spreads() {
    let mesh = lb_mesh(4, "{consistentHash: {httpHeaderName: x-user}}").await;
    let counts = answers(&mesh, 50, &[("x-user", "alice")]).await;
    assert_eq!(counts.len(), 1, "one key, one endpoint: {counts:?}");
    let keys: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let placed = placement(&mesh, &keys).await;
    let used: BTreeSet<&String> = placed.values().collect();
    // P(20 keys on one of 4 endpoints) = 4 · 4^-20.
    assert!(used.len() >= 2, "20 keys all on {used:?}");
    // The same keys again land where they did.
    assert_eq!(placement(&mesh, &keys).await, placed);
}

#[tokio::test]
async fn consistent_hash_on_query_parameter() {
    let mesh = lb_mesh(4, "{consistentHash: {httpQueryParameterName: user}}").await;
    let source = mesh.source("client", "client").unwrap();
    let mut pods = BTreeSet::new();
    for _ in 0..20 {
        let reply = send(&mesh, &source, get("/?user=bob", &[])).await;
        pods.insert(answered_by(&reply).unwrap());
    }
    assert_eq!(pods.len(), 1, "{pods:?}");
}

#[tokio::test]
async fn consistent_hash_cookie_with_ttl_is_set_then_sticks() {
    let mesh = lb_mesh(4, "{consistentHash: {httpCookie: {name: session, path: /, ttl: 60s}}}").await;
    let source = mesh.source("client", "client").unwrap();
    let first = send(&mesh, &source, get("/", &[])).await;
    assert_eq!(first.status, StatusCode::OK);
    let set_cookie = first
        .headers
        .get("set-cookie")
        .expect("a ttl makes the waypoint set the cookie when the request has none")
        .to_str()
        .unwrap()
        .to_string();
    assert!(set_cookie.starts_with("session="), "{set_cookie}");
    assert!(set_cookie.contains("Max-Age=60"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let pinned = answered_by(&first).unwrap();
    for i in 0..20 {
        let reply = send(&mesh, &source, get("/", &[("cookie", &cookie)])).await;
        assert_eq!(answered_by(&reply).as_deref(), Some(pinned.as_str()), "request {i}");
        assert!(
            reply.headers.get("set-cookie").is_none(),
            "no new cookie when the request has one"
        );
    }
}

#[tokio::test]
async fn consistent_hash_on_source_ip() {
    let mesh = lb_mesh(4, "{consistentHash: {useSourceIp: true}}").await;
    // One client pod (one source address): one endpoint.
    let counts = answers(&mesh, 20, &[]).await;
    assert_eq!(counts.len(), 1, "{counts:?}");
    // Sixteen client pods spread. P(all on one of 4) = 4 · 4^-16.
    let mut used = BTreeSet::new();
    for i in 0..16 {
        let source = mesh.source("client", &format!("client-{i}")).unwrap();
        let first = answered_by(&send(&mesh, &source, get("/", &[])).await).unwrap();
        let again = answered_by(&send(&mesh, &source, get("/", &[])).await).unwrap();
        assert_eq!(first, again, "client {i} moved");
        used.insert(first);
    }
    assert!(used.len() >= 2, "{used:?}");
}

/// Removing one of four endpoints moves the keys it held and (almost) nothing else.
async fn removal_moves_about_a_quarter(load_balancer: &str) {
    let rule = lb(load_balancer);
    let mesh = mesh(4, &rule).await;
    assert_config_accepted(&mesh);
    let keys: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
    let before = placement(&mesh, &keys).await;
    let removed = "echo-v1-3";
    reconfigure(&mesh, &[removed], &[&rule]).await;
    let after = placement(&mesh, &keys).await;
    assert!(
        after.values().all(|p| p != removed),
        "the removed endpoint still gets traffic"
    );

    let on_removed = before.values().filter(|p| *p == removed).count();
    let moved_elsewhere = keys
        .iter()
        .filter(|k| before[*k] != removed && before[*k] != after[*k])
        .count();
    // The removed endpoint held about a quarter of the keys: 50 ± 20 of 200 (binomial sd ≈ 6, plus the
    // unevenness of the hash table).
    assert!(
        (30..=70).contains(&on_removed),
        "{on_removed} of 200 keys were on {removed}"
    );
    // Keys of the remaining endpoints stay put: none move with a ring hash, Maglev moves a few (≤ 5 %).
    assert!(
        moved_elsewhere <= 10,
        "{moved_elsewhere} keys moved between remaining endpoints"
    );
}

#[tokio::test]
async fn ring_hash_removal_moves_about_a_quarter_of_keys() {
    removal_moves_about_a_quarter("{consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 1024}}}")
        .await;
}

#[tokio::test]
async fn maglev_removal_moves_about_a_quarter_of_keys() {
    removal_moves_about_a_quarter("{consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}").await;
}
