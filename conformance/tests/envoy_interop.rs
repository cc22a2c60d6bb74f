//! Interop with a real peer: Envoy (Istio's own data plane) as the source and destination ztunnels around our
//! waypoint, so our HBONE server and client are each checked against an implementation we did not write.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint_conformance::client::{self, empty};
use waypoint_conformance::echo::{EchoConfig, EchoServer, TcpEcho};
use waypoint_conformance::envoy::{
    self, DestZtunnelConfig, EnvoyDestZtunnel, EnvoySourceZtunnel, PemIdentity, SourceTarget, SourceZtunnelConfig,
};
use waypoint_conformance::net::unique_loopback_ip;
use waypoint_conformance::pki::{KeyKind, TestCa};

const TD: &str = "cluster.local";

fn config(wp_ip: IpAddr, pod_ip: IpAddr) -> String {
    format!(
        "apiVersion: waypoint.istio.io/v1alpha1
kind: WaypointConfig
metadata: {{name: waypoint, namespace: mesh}}
spec:
  trustDomain: {TD}
  listeners: {{hbone: '{wp_ip}:15008', readiness: '{wp_ip}:15021', admin: '{wp_ip}:15000'}}
  tls: {{certFile: wp.pem, keyFile: wp-key.pem, rootsFile: root.pem}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: apps}}
spec:
  clusterIP: 10.96.9.1
  selector: {{app: echo}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: tcp-raw, port: 9000, targetPort: 9000}}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-envoy
  namespace: apps
  labels: {{app: echo}}
  annotations: {{ambient.istio.io/redirection: enabled}}
spec: {{serviceAccountName: echo}}
status: {{podIP: '{pod_ip}'}}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ztunnels_on_both_sides_of_the_waypoint() {
    let Some(bin) = envoy::envoy_for_test() else { return };
    let ca = TestCa::new(TD);
    let dir = std::env::temp_dir().join(format!("waypoint-envoy-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wp_leaf = ca.issue("mesh", "waypoint", KeyKind::EcdsaP256).unwrap();
    wp_leaf.write_to(&dir, "wp").unwrap();
    ca.write_root(&dir, "root.pem").unwrap();

    let pod_ip = IpAddr::V4(unique_loopback_ip());
    let wp_ip = IpAddr::V4(unique_loopback_ip());
    let mut echo_cfg = EchoConfig::new(SocketAddr::new(pod_ip, 8080));
    echo_cfg.pod_name = "echo-envoy".into();
    echo_cfg.namespace = "apps".into();
    let echo = EchoServer::start(echo_cfg).await.unwrap();
    let _tcp = TcpEcho::start(SocketAddr::new(pod_ip, 9000)).await.unwrap();

    // Envoy terminates the waypoint's HBONE as the destination pod's ztunnel (identity apps/echo); its leaf is
    // RSA while the waypoint's is ECDSA, so both key types cross the interop boundary.
    let pod_leaf = ca.issue("apps", "echo", KeyKind::Rsa2048).unwrap();
    let dest = EnvoyDestZtunnel::start(
        &bin,
        &DestZtunnelConfig {
            identity: PemIdentity::from(&pod_leaf),
            roots_pem: ca.root_pem().to_string(),
            trust_domain: TD.into(),
            pod_ip,
            hbone_port: envoy::HBONE_PORT,
            target_ports: vec![8080, 9000],
        },
    )
    .await
    .unwrap();

    let cfg_path = dir.join("waypoint.yaml");
    std::fs::write(&cfg_path, config(wp_ip, pod_ip)).unwrap();
    let app = waypoint::App::start(cfg_path).await.unwrap();

    let client_leaf = ca.issue("frontend", "web", KeyKind::EcdsaP256).unwrap();
    let target = |authority: &str| SourceTarget {
        authority: authority.into(),
        next_hop: app.hbone_addr,
        expected_identity: ca.spiffe_id("mesh", "waypoint"),
        forwarded_host: Some("echo.apps.svc.cluster.local".into()),
    };
    let source = EnvoySourceZtunnel::start(
        &bin,
        &SourceZtunnelConfig {
            identity: PemIdentity::from(&client_leaf),
            roots_pem: ca.root_pem().to_string(),
            listen_ip: IpAddr::V4(unique_loopback_ip()),
            source_ip: None,
            baggage: Some("k8s.namespace.name=frontend,k8s.deployment.name=web,service.name=web".into()),
            targets: vec![target("10.96.9.1:80"), target("10.96.9.1:9000")],
        },
    )
    .await
    .unwrap();

    // HTTP/1.1 keep-alive through Envoy → waypoint → Envoy → echo.
    let http_in = source.listener("10.96.9.1:80").unwrap();
    let mut send = client::http1(tokio::net::TcpStream::connect(http_in).await.unwrap())
        .await
        .unwrap();
    for i in 0..10 {
        let req = Request::get(format!("/interop/{i}"))
            .header("host", "echo.apps")
            .body(empty())
            .unwrap();
        let reply = client::send1(&mut send, req).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["path"], format!("/interop/{i}"));
        assert_eq!(reply.json()["pod"], "echo-envoy");
    }
    // Concurrent tunnels multiplexed by Envoy on its pooled HBONE connection.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        tasks.spawn(async move {
            let tcp = tokio::net::TcpStream::connect(http_in).await.unwrap();
            let mut send = client::http1(tcp).await.unwrap();
            let req = Request::get(format!("/c/{i}"))
                .header("host", "echo")
                .body(empty())
                .unwrap();
            client::send1(&mut send, req).await.unwrap().status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert!(echo.requests_seen() >= 60);

    // Opaque TCP with half-close through both Envoys.
    let tcp_in = source.listener("10.96.9.1:9000").unwrap();
    let mut t = tokio::net::TcpStream::connect(tcp_in).await.unwrap();
    t.write_all(b"through envoy and back").await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_string(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, "through envoy and backbytes=22\n");

    // Envoy's destination access log proves the waypoint tunnelled with its own identity to podIP:targetPort.
    let entry = dest
        .wait_for_access_log(Duration::from_secs(10), |e| {
            e.authority.as_deref() == Some(&format!("{pod_ip}:8080"))
        })
        .await
        .unwrap();
    assert_eq!(
        entry.peer_uri_san.as_deref(),
        Some(ca.spiffe_id("mesh", "waypoint").as_str())
    );
    assert_eq!(entry.response_code, Some(200));
    dest.wait_for_access_log(Duration::from_secs(10), |e| {
        e.authority.as_deref() == Some(&format!("{pod_ip}:9000"))
    })
    .await
    .unwrap();

    app.drain();
    assert!(app.wait().await);
    let _ = std::fs::remove_dir_all(&dir);
}
