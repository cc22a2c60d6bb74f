//! Live changes: config hot-reload under continuous load, rejected edits, certificate rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use http::{Request, StatusCode};
use waypoint_conformance::client::{self, empty};
use waypoint_conformance::hbone;
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};
use waypoint_conformance::pki::KeyKind;

const NS: &str = "live";

fn extra_service(i: usize) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: extra-{i}, namespace: {NS}}}
spec:
  clusterIP: 10.97.0.{i}
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_under_load_loses_no_request() {
    let mesh = Mesh::builder()
        .service(ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 4, 1)).port(PortSpec::http(80, 8080)))
        .pod(PodSpec::new(NS, "echo-1").labels(&[("app", "echo")]))
        .pod(PodSpec::new(NS, "echo-2").labels(&[("app", "echo")]))
        .start()
        .await
        .unwrap();
    let app = mesh.app().unwrap();
    let mut changes = app.config().subscribe();
    let authority = mesh.authority(NS, "echo", 80);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let source = mesh.source("client", "load").unwrap();
        let (authority, stop, ok) = (authority.clone(), stop.clone(), ok.clone());
        load.spawn(async move {
            let mut failures = Vec::new();
            // Half the workers hold one keep-alive tunnel, half open a tunnel per request.
            let mut kept = if worker % 2 == 0 {
                Some(client::http1(source.connect(&authority).await.unwrap()).await.unwrap())
            } else {
                None
            };
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get("/load").header("host", "echo").body(empty()).unwrap();
                let result = match kept.as_mut() {
                    Some(send) => client::send1(send, req)
                        .await
                        .map(|r| r.status)
                        .map_err(|e| e.to_string()),
                    None => client::request(&source, &authority, req)
                        .await
                        .map(|r| r.status)
                        .map_err(|e| e.to_string()),
                };
                match result {
                    Ok(StatusCode::OK) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{other:?}")),
                }
            }
            failures
        });
    }
    // Every edit lands while requests flow; each one rebuilds every binding, including the one under load.
    for round in 1..=6u64 {
        let extras: Vec<String> = (1..=round as usize).map(extra_service).collect();
        let refs: Vec<&str> = extras.iter().map(String::as_str).collect();
        let before = ok.load(Ordering::Relaxed);
        mesh.rewrite_config(&refs).unwrap();
        changes.wait_for(|(g, _)| *g > round).await.unwrap();
        // Let some requests run on the new snapshot before the next edit.
        while ok.load(Ordering::Relaxed) < before + 20 {
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    while let Some(r) = load.join_next().await {
        failures.extend(r.unwrap());
    }
    assert!(failures.is_empty(), "requests failed during reloads: {failures:?}");
    assert!(ok.load(Ordering::Relaxed) > 100);
    // The last edit is live: the newest service answers.
    let source = mesh.source("client", "after").unwrap();
    let reply = client::get(&source, "10.97.0.6:80", "extra-6", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn invalid_edit_is_rejected_and_last_good_config_keeps_serving() {
    let mesh = Mesh::builder()
        .service(ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 4, 2)).port(PortSpec::http(80, 8080)))
        .pod(PodSpec::new(NS, "echo-1").labels(&[("app", "echo")]))
        .start()
        .await
        .unwrap();
    let app = mesh.app().unwrap();
    let mut changes = app.config().subscribe();
    let bad = "apiVersion: v1
kind: Service
metadata: {name: broken, namespace: live}
spec:
  clusterIP: 10.97.1.1
  ports: [{name: http, port: 99999}]
";
    mesh.rewrite_config(&[&extra_service(7), bad]).unwrap();
    changes.wait_for(|(_, rejected)| *rejected >= 1).await.unwrap();
    let err = app.config().last_error().expect("rejection recorded");
    assert!(err.contains("waypoint.yaml: document"), "{err}");
    assert!(
        err.contains("Service live/broken") && err.contains("spec.ports[0].port"),
        "{err}"
    );
    assert_eq!(app.config().load().generation, 1, "nothing of the bad file applied");

    let source = mesh.source("client", "sa").unwrap();
    let reply = client::get(&source, &mesh.authority(NS, "echo", 80), "echo", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "last good config serves");
    let err = source
        .connect("10.97.0.7:80")
        .await
        .map(|_| ())
        .expect_err("the valid half of a bad file is not applied");
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));

    // Fixing the file applies it.
    mesh.rewrite_config(&[&extra_service(7)]).unwrap();
    changes.wait_for(|(g, _)| *g >= 2).await.unwrap();
    let reply = client::get(&source, "10.97.0.7:80", "extra-7", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(app.config().last_error().is_none());
}

async fn presented_leaf(mesh: &Mesh) -> Vec<u8> {
    let leaf = mesh.ca().issue("client", "probe", KeyKind::EcdsaP256).unwrap();
    let cfg = hbone::client_tls_config(&leaf, mesh.ca().root_pem(), mesh.waypoint_identity()).unwrap();
    let tcp = tokio::net::TcpStream::connect(mesh.waypoint_addr()).await.unwrap();
    let tls = hbone::tls_connect(cfg, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec()
}

fn write_atomically(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn certificate_rotation_applies_to_new_connections_only() {
    let mesh = Mesh::builder()
        .service(ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 4, 3)).port(PortSpec::http(80, 8080)))
        .pod(PodSpec::new(NS, "echo-1").labels(&[("app", "echo")]))
        .start()
        .await
        .unwrap();
    let app = mesh.app().unwrap();
    let mut rotations = app.tls().subscribe();
    let source = mesh.source("client", "sa").unwrap();
    let tunnel = source.connect(&mesh.authority(NS, "echo", 80)).await.unwrap();
    let mut old_conn = client::http1(tunnel).await.unwrap();
    let before = presented_leaf(&mesh).await;

    // The same identity with a new key, as the Istio CA issues at half-life; RSA this time.
    let (ns, sa) = ("default", "waypoint");
    let new_leaf = mesh.ca().issue(ns, sa, KeyKind::Rsa2048).unwrap();
    assert_eq!(new_leaf.spiffe_id, mesh.waypoint_identity());
    write_atomically(&mesh.dir().join("waypoint-key.pem"), &new_leaf.key_pem);
    write_atomically(&mesh.dir().join("waypoint.pem"), &new_leaf.cert_pem);
    rotations.wait_for(|n| *n >= 1).await.unwrap();

    let after = presented_leaf(&mesh).await;
    assert_ne!(before, after, "new connections get the new certificate");
    assert_eq!(
        after,
        new_leaf.chain_der().unwrap()[0].as_ref(),
        "exactly the rotated leaf"
    );

    // The connection made before the rotation carries on.
    let req = Request::get("/still").header("host", "echo").body(empty()).unwrap();
    let reply = client::send1(&mut old_conn, req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    // And the waypoint's outbound connections use the new certificate as well.
    let fresh = mesh.source("client", "fresh").unwrap();
    let reply = client::get(&fresh, &mesh.authority(NS, "echo", 80), "echo", "/new")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
}
