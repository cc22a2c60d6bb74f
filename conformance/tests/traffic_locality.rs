//! Locality load balancing and slow start through the real waypoint: traffic stays in the waypoint's own
//! locality while it is healthy, fails over in `localityLbSetting.failover` order when its endpoints are
//! ejected, and an endpoint that joins under `warmupDurationSecs` starts with a small share.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod traffic_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::StatusCode;
use traffic_support::*;
use waypoint_conformance::echo::Misbehaviour;
use waypoint_conformance::mesh::{Mesh, PodSpec};

const REGION: &str = "topology.kubernetes.io/region";
const ZONE: &str = "topology.kubernetes.io/zone";

fn located(name: &str, region: &str, zone: &str) -> PodSpec {
    PodSpec::new(NS, name).labels(&[("app", SERVICE), (REGION, region), (ZONE, zone)])
}

/// Who answered `n` sequential requests.
async fn answers(mesh: &Mesh, n: usize) -> BTreeMap<String, usize> {
    let source = mesh.source("client", "client").unwrap();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let reply = send(mesh, &source, get("/", &[])).await;
        assert_eq!(reply.status, StatusCode::OK);
        *counts.entry(answered_by(&reply).unwrap()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn traffic_stays_local_then_fails_over_in_the_configured_order() {
    let rule = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: traffic}
spec:
  host: echo.traffic.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        enabled: true
        failover: [{from: r1, to: r3}]
    outlierDetection: {consecutive5xxErrors: 1, interval: 100ms, baseEjectionTime: 30s, maxEjectionPercent: 100}
";
    let mesh = builder(&[])
        .waypoint_locality("r1/z1")
        .pod(located("echo-near-0", "r1", "z1"))
        .pod(located("echo-near-1", "r1", "z1"))
        .pod(located("echo-r2", "r2", "z2"))
        .pod(located("echo-r3", "r3", "z3"))
        .extra_config(rule)
        .start()
        .await
        .unwrap();
    assert_config_accepted(&mesh);
    let local = answers(&mesh, 20).await;
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        ["echo-near-0", "echo-near-1"],
        "healthy local endpoints take everything: {local:?}"
    );

    for pod in ["echo-near-0", "echo-near-1"] {
        echo(&mesh, pod).misbehave(Misbehaviour::Status(500)).await;
    }
    // Each local endpoint fails once and is ejected. While only one is out, Envoy's overprovisioning (1.4)
    // still sends most traffic to the local level; once both are out, the failover region serves.
    let source = mesh.source("client", "client").unwrap();
    let deadline = Instant::now() + DEADLINE;
    while ["echo-near-0", "echo-near-1"]
        .iter()
        .any(|pod| echo(&mesh, pod).requests_seen() == local[*pod])
    {
        assert!(
            Instant::now() < deadline,
            "the local endpoints never got their failing request"
        );
        send(&mesh, &source, get("/", &[])).await;
    }
    let remote = answers(&mesh, 10).await;
    assert_eq!(
        remote.keys().collect::<Vec<_>>(),
        ["echo-r3"],
        "failover goes to r3 as configured, not r2: {remote:?}"
    );
    assert_eq!(echo(&mesh, "echo-r2").requests_seen(), 0);
}

fn warmup_rule(warmup: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: traffic}}
spec:
  host: echo.traffic.svc.cluster.local
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN{warmup}}}
"
    )
}

/// Share of 30 requests that the endpoint joining after start-up gets right after it joined, once the first
/// endpoints are `settled` old, and how long the endpoint had been known when the last of them was answered.
async fn share_of_new_endpoint(warmup: &str, settled: Duration) -> (f64, Duration) {
    let rule = warmup_rule(warmup);
    let mesh = builder(&[("v1", 3)])
        .hold_back_pods(&["echo-v1-2"])
        .extra_config(&rule)
        .start()
        .await
        .unwrap();
    assert_config_accepted(&mesh);
    answers(&mesh, 6).await;
    // Envoy puts every endpoint that joins in slow start, the first ones included; the comparison needs them
    // past their window. Nothing signals that but the clock, so this waits for the window itself.
    tokio::time::sleep(settled).await;
    let joined = Instant::now();
    reconfigure(&mesh, &[], &[&rule]).await;
    let counts = answers(&mesh, 30).await;
    (
        share(counts.get("echo-v1-2").copied().unwrap_or(0), 30),
        joined.elapsed(),
    )
}

#[tokio::test]
async fn a_new_endpoint_without_warmup_takes_its_share_at_once() {
    // Round robin over three: a third, give or take the per-worker rotation.
    let (got, _) = share_of_new_endpoint("", Duration::ZERO).await;
    assert!(got >= 0.25, "the new endpoint got {got:.2}");
}

#[tokio::test]
async fn a_new_endpoint_under_warmup_starts_with_a_small_share() {
    // Envoy's slow start begins a new endpoint at 10 % of its weight (min_weight_percent) and ramps it up
    // linearly over the window (aggression 1): while the first half of a 6 s window runs it gets well under
    // the third it would get otherwise (its weight stays under half of the others').
    let window = Duration::from_secs(6);
    let (got, age) = share_of_new_endpoint(", warmupDurationSecs: 6s", window).await;
    // The ramp goes on while the 30 requests are answered (slowly, on a loaded machine), so the bound is the
    // share at the newest age the endpoint reached: weight max(age, 1 s) / window against two endpoints at
    // full weight; plus two requests of slack for the weighted rotation. When answering was quick this is well
    // under the third an endpoint without warm-up gets.
    let weight = (age.as_secs_f64().max(1.0) / window.as_secs_f64()).clamp(0.1, 1.0);
    let bound = weight / (2.0 + weight) + 2.0 / 30.0;
    assert!(
        got <= bound,
        "the warming endpoint got {got:.2}, more than {bound:.2} after {age:?}"
    );
}
