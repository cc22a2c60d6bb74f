//! Every way a CONNECT or an HBONE connection is refused, each checked while a good stream on the same
//! waypoint keeps working; and the upstream identity check.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::Ipv4Addr;

use http::{Method, Request, StatusCode};
use hyper::client::conn::http1::SendRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint_conformance::client::{self, Body, empty};
use waypoint_conformance::hbone;
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};
use waypoint_conformance::pki::{KeyKind, TestCa};
use waypoint_conformance::source_ztunnel::{ConnectRequest, SourceZtunnel, SourceZtunnelConfig};

const NS: &str = "app";

async fn mesh() -> Mesh {
    Mesh::builder()
        .service(ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 2, 1)).port(PortSpec::http(80, 8080)))
        .service(ServiceSpec::new(NS, "impostor", Ipv4Addr::new(10, 96, 2, 2)).port(PortSpec::http(80, 8080)))
        .pod(
            PodSpec::new(NS, "echo-1")
                .labels(&[("app", "echo")])
                .service_account("echo"),
        )
        .start()
        .await
        .expect("mesh starts")
}

async fn assert_alive(send: &mut SendRequest<Body>, what: &str) {
    let req = Request::get("/still-alive")
        .header("host", "echo")
        .body(empty())
        .unwrap();
    let reply = client::send1(send, req)
        .await
        .unwrap_or_else(|e| panic!("good stream broken after {what}: {e}"));
    assert_eq!(reply.status, StatusCode::OK, "good stream after {what}");
}

#[tokio::test]
async fn bad_connects_are_refused_per_stream_on_a_shared_connection() {
    let mesh = mesh().await;
    let source = mesh.source("client", "sa").unwrap();
    let conn = source.dedicated_connection().await.unwrap();
    let good = conn.connect(&mesh.authority(NS, "echo", 80)).await.unwrap();
    let mut send = client::http1(good).await.unwrap();
    assert_alive(&mut send, "start").await;

    let cases: [(ConnectRequest, StatusCode); 5] = [
        (
            ConnectRequest::new(Method::GET, &mesh.authority(NS, "echo", 80)),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            ConnectRequest::connect("echo.app.svc.cluster.local:80"),
            StatusCode::BAD_REQUEST,
        ),
        (ConnectRequest::connect("10.96.2.1"), StatusCode::BAD_REQUEST),
        (ConnectRequest::connect("10.96.2.1:81"), StatusCode::NOT_FOUND),
        (ConnectRequest::connect("10.99.99.99:80"), StatusCode::NOT_FOUND),
    ];
    for (req, want) in cases {
        let what = format!("{} {}", req.method, req.authority);
        let err = conn
            .connect_with(req)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} must be refused"));
        assert_eq!(err.status(), Some(want), "{what}: {err}");
        assert!(!conn.is_closed(), "{what} must not close the HBONE connection");
        assert_alive(&mut send, &what).await;
    }
    // An IPv6 authority is well-formed; with no service bound it is a 404, not a 400.
    let err = conn
        .connect_with(ConnectRequest::connect("[fd00::1]:80"))
        .await
        .map(|_| ())
        .expect_err("refused");
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert_alive(&mut send, "ipv6 authority").await;
}

fn source_with(mesh: &Mesh, leaf: waypoint_conformance::pki::Leaf) -> SourceZtunnel {
    let cfg = SourceZtunnelConfig::new(
        mesh.waypoint_addr(),
        mesh.waypoint_identity(),
        leaf,
        mesh.ca().root_pem(),
    );
    SourceZtunnel::new(cfg).unwrap()
}

#[tokio::test]
async fn bad_client_certificates_close_only_their_connection() {
    let mesh = mesh().await;
    let source = mesh.source("client", "sa").unwrap();
    let good = source.connect(&mesh.authority(NS, "echo", 80)).await.unwrap();
    let mut send = client::http1(good).await.unwrap();
    assert_alive(&mut send, "start").await;

    // No client certificate at all.
    let cfg = hbone::anonymous_client_tls_config(mesh.ca().root_pem(), mesh.waypoint_identity()).unwrap();
    let tcp = tokio::net::TcpStream::connect(mesh.waypoint_addr()).await.unwrap();
    match hbone::tls_connect(cfg, tcp).await {
        Err(_) => {}
        Ok(mut tls) => {
            // TLS 1.3: the server judges the client certificate after the client finished; the alert arrives
            // on the first read.
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            let n = tls.read(&mut buf).await;
            assert!(
                matches!(n, Err(_) | Ok(0)),
                "no client cert must be refused, read {n:?}"
            );
        }
    }
    assert_alive(&mut send, "no client certificate").await;

    // A certificate from another CA.
    let foreign = TestCa::new("cluster.local");
    let leaf = foreign.issue("client", "sa", KeyKind::EcdsaP256).unwrap();
    let err = source_with(&mesh, leaf).connect(&mesh.authority(NS, "echo", 80)).await;
    assert!(err.is_err(), "foreign CA must be refused");
    assert_alive(&mut send, "foreign CA").await;

    // Our CA, but a SPIFFE ID in another trust domain.
    let leaf = mesh
        .ca()
        .issue_with_uris(&["spiffe://evil.example/ns/client/sa/sa".into()], KeyKind::EcdsaP256)
        .unwrap();
    let err = source_with(&mesh, leaf).connect(&mesh.authority(NS, "echo", 80)).await;
    assert!(err.is_err(), "other trust domain must be refused");
    assert_alive(&mut send, "other trust domain").await;

    // Our CA, no SPIFFE URI at all.
    let leaf = mesh.ca().issue_with_uris(&[], KeyKind::EcdsaP256).unwrap();
    assert!(
        source_with(&mesh, leaf)
            .connect(&mesh.authority(NS, "echo", 80))
            .await
            .is_err()
    );
    assert_alive(&mut send, "no SPIFFE ID").await;

    // RSA-2048 clients are accepted like ECDSA ones.
    let rsa = mesh.source_with_key("client", "rsa", KeyKind::Rsa2048).unwrap();
    let reply = client::get(&rsa, &mesh.authority(NS, "echo", 80), "echo", "/rsa")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn rsa_certificates_on_every_hop() {
    let mesh = Mesh::builder()
        .key_kind(KeyKind::Rsa2048)
        .service(ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 2, 1)).port(PortSpec::http(80, 8080)))
        .pod(PodSpec::new(NS, "echo-1").labels(&[("app", "echo")]))
        .start()
        .await
        .unwrap();
    let source = mesh.source("client", "sa").unwrap();
    let reply = client::get(&source, &mesh.authority(NS, "echo", 80), "echo", "/rsa")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["pod"], "echo-1");
}

#[tokio::test]
async fn upstream_identity_mismatch_is_503_uf() {
    let mesh = mesh().await;
    let app = mesh.app().expect("in-process waypoint");
    let mut changes = app.config().subscribe();
    // The config claims the pod at echo-1's IP runs as service account "someone-else"; its ztunnel proves
    // "echo". The waypoint must refuse to send traffic there.
    let entry = format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: impostor, namespace: {NS}}}
spec:
  address: {}
  serviceAccount: someone-else
  labels: {{app: impostor, networking.istio.io/tunnel: http}}
",
        mesh.pod_ip("echo-1")
    );
    mesh.rewrite_config(&[&entry]).unwrap();
    changes.wait_for(|(generation, _)| *generation >= 2).await.unwrap();

    let source = mesh.source("client", "sa").unwrap();
    let reply = client::get(&source, &mesh.authority(NS, "impostor", 80), "impostor", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.text().contains("connection failure"), "{}", reply.text());
    // The real service on the same pod still works with the right identity.
    let reply = client::get(&source, &mesh.authority(NS, "echo", 80), "echo", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn unreachable_endpoint_is_503_and_missing_endpoints_are_503() {
    let mesh = Mesh::builder()
        .service(ServiceSpec::new(NS, "empty", Ipv4Addr::new(10, 96, 2, 3)).port(PortSpec::http(80, 8080)))
        .service(ServiceSpec::new(NS, "gone", Ipv4Addr::new(10, 96, 2, 4)).port(PortSpec::http(80, 8080)))
        .start()
        .await
        .unwrap();
    let app = mesh.app().unwrap();
    let mut changes = app.config().subscribe();
    // A pod whose IP has nothing listening: neither ztunnel nor the app.
    let ip = waypoint_conformance::net::unique_loopback_ip();
    let pod = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: gone-1, namespace: {NS}, labels: {{app: gone}}, annotations: {{ambient.istio.io/redirection: enabled}}}}
status: {{podIP: {ip}}}
"
    );
    mesh.rewrite_config(&[&pod]).unwrap();
    changes.wait_for(|(g, _)| *g >= 2).await.unwrap();
    let source = mesh.source("client", "sa").unwrap();
    let reply = client::get(&source, &mesh.authority(NS, "empty", 80), "empty", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text(), "no healthy upstream\n");
    let reply = client::get(&source, &mesh.authority(NS, "gone", 80), "gone", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.text().contains("connection failure"));
}
