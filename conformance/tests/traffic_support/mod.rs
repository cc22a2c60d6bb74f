//! Shared by the `traffic_*` end-to-end tests: one Service (`echo` in namespace `traffic`) over N echo pods
//! behind the real waypoint, requests from source ztunnels, per-pod counters, and config edits that wait
//! until the waypoint applied them.

#![allow(dead_code)] // each test crate uses a different part of this module

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use http::{Request, StatusCode};
use waypoint_conformance::client::{self, Body, Reply, empty};
use waypoint_conformance::echo::EchoHandle;
use waypoint_conformance::mesh::{Mesh, MeshBuilder, PodSpec, PortSpec, ServiceSpec};
use waypoint_conformance::source_ztunnel::SourceZtunnel;

pub const NS: &str = "traffic";
pub const SERVICE: &str = "echo";
pub const HOST: &str = "echo.traffic.svc.cluster.local";
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 1);
/// Deadline for anything the tests wait for by polling (a hot reload, an ejection to end).
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Pod `i` of the Service: `echo-<version>-<i>`.
pub fn pod_name(version: &str, i: usize) -> String {
    format!("echo-{version}-{i}")
}

/// A mesh builder with Service `echo` (port 80 → 8080, HTTP) and `pods` pods per version, all labelled
/// `app=echo`, `version=<v>`.
pub fn builder(versions: &[(&str, usize)]) -> MeshBuilder {
    let mut builder = Mesh::builder().service(ServiceSpec::new(NS, SERVICE, VIP).port(PortSpec::http(80, 8080)));
    for (version, count) in versions {
        for i in 0..*count {
            builder =
                builder.pod(PodSpec::new(NS, &pod_name(version, i)).labels(&[("app", SERVICE), ("version", version)]));
        }
    }
    builder
}

/// A mesh with `count` v1 pods and the given extra config documents.
pub async fn mesh(count: usize, extra: &str) -> Mesh {
    let mut builder = builder(&[("v1", count)]);
    if !extra.is_empty() {
        builder = builder.extra_config(extra);
    }
    builder.start().await.expect("mesh starts")
}

pub fn pods(mesh_pods: &[(&str, usize)]) -> Vec<String> {
    mesh_pods
        .iter()
        .flat_map(|(v, n)| (0..*n).map(move |i| pod_name(v, i)))
        .collect()
}

pub fn authority(mesh: &Mesh) -> String {
    mesh.authority(NS, SERVICE, 80)
}

/// A GET with `Host: echo` and the given headers.
pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::get(path).header("host", SERVICE);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(empty()).expect("valid request")
}

/// One request in a fresh tunnel from `source`.
pub async fn send(mesh: &Mesh, source: &SourceZtunnel, request: Request<Body>) -> Reply {
    client::request(source, &authority(mesh), request)
        .await
        .expect("the waypoint answers")
}

/// `GET path` from a fresh client workload.
pub async fn get_once(mesh: &Mesh, path: &str) -> Reply {
    let source = mesh.source("client", "client").expect("source");
    send(mesh, &source, get(path, &[])).await
}

/// The pod that answered (echo JSON `pod`), or `None` for a reply the backend did not produce.
pub fn answered_by(reply: &Reply) -> Option<String> {
    reply.json()["pod"].as_str().map(str::to_string)
}

/// Requests received so far by each pod.
pub fn seen(mesh: &Mesh, pods: &[String]) -> BTreeMap<String, usize> {
    pods.iter().map(|p| (p.clone(), mesh.echo(p).requests_seen())).collect()
}

pub fn echo<'a>(mesh: &'a Mesh, pod: &str) -> &'a EchoHandle {
    mesh.echo(pod)
}

/// The `x-envoy-attempt-count` of every request the pod received, in order.
pub fn attempt_counts(echo: &EchoHandle) -> Vec<String> {
    echo.exchanges()
        .iter()
        .map(|e| e.header("x-envoy-attempt-count").unwrap_or("-").to_string())
        .collect()
}

/// Rewrites the extra config (and drops `removed` pods) and waits until the waypoint applied it; panics with
/// the waypoint's complaint when it rejected it.
pub async fn reconfigure(mesh: &Mesh, removed: &[&str], extra: &[&str]) {
    let store = mesh.app().expect("in-process waypoint").config();
    let mut changes = store.subscribe();
    let (generation, rejected) = *changes.borrow_and_update();
    mesh.rewrite_config_without_pods(removed, extra)
        .expect("config written");
    let verdict = tokio::time::timeout(DEADLINE, async {
        loop {
            changes.changed().await.expect("config store alive");
            let (g, r) = *changes.borrow_and_update();
            if r > rejected {
                return Err(store.last_error().unwrap_or_default());
            }
            if g > generation {
                return Ok(());
            }
        }
    })
    .await
    .expect("the waypoint picks up the rewritten config");
    if let Err(e) = verdict {
        panic!("the waypoint rejected the config: {e}");
    }
}

/// Fails the test with the waypoint's reason when it skipped or warned about any of our objects: a policy the
/// waypoint does not act on must not pass silently as "no effect".
pub fn assert_config_accepted(mesh: &Mesh) {
    let snapshot = mesh.app().expect("in-process waypoint").config().load();
    assert!(
        snapshot.skipped.is_empty(),
        "the waypoint ignored objects of this test: {:?}",
        snapshot.skipped
    );
}

pub fn status(reply: &Reply) -> StatusCode {
    reply.status
}

/// Share of `part` in `total`.
pub fn share(part: usize, total: usize) -> f64 {
    part as f64 / total as f64
}
