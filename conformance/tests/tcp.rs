//! Opaque TCP through the waypoint, declared and sniffed, with half-close carried end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::Ipv4Addr;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};

#[tokio::test]
async fn tcp_passthrough_with_half_close() {
    let mesh = Mesh::builder()
        .service(ServiceSpec::new("db", "pg", Ipv4Addr::new(10, 96, 3, 1)).port(PortSpec::tcp(5432, 5432)))
        .pod(PodSpec::new("db", "pg-0").labels(&[("app", "pg")]))
        .pod(PodSpec::new("db", "pg-1").labels(&[("app", "pg")]).hbone(false))
        .start()
        .await
        .unwrap();
    let source = mesh.source("client", "sa").unwrap();
    for round in 0..2 {
        let mut t = source.connect(&mesh.authority("db", "pg", 5432)).await.unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        t.write_all(&payload).await.unwrap();
        // Half-close: the echo sees EOF, answers with its byte count and closes its side.
        t.shutdown().await.unwrap();
        let mut back = Vec::new();
        t.read_to_end(&mut back).await.unwrap();
        let tail = format!("bytes={}\n", payload.len());
        assert!(
            back.ends_with(tail.as_bytes()),
            "round {round}: echo saw the half-close"
        );
        assert_eq!(&back[..payload.len()], &payload[..], "round {round}: bytes intact");
    }
    // Round robin put one connection on each pod: the HBONE one and the plain-TCP one.
    assert_eq!(mesh.tcp_echo("pg-0", 5432).unwrap().connections(), 1);
    assert_eq!(mesh.tcp_echo("pg-1", 5432).unwrap().connections(), 1);
}

#[tokio::test]
async fn tcp_port_with_dead_backend_is_refused_before_200() {
    let mesh = Mesh::builder()
        .service(ServiceSpec::new("db", "nothing", Ipv4Addr::new(10, 96, 3, 2)).port(PortSpec::tcp(6379, 6379)))
        .start()
        .await
        .unwrap();
    let source = mesh.source("client", "sa").unwrap();
    let err = source
        .connect(&mesh.authority("db", "nothing", 6379))
        .await
        .map(|_| ())
        .expect_err("refused");
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn undeclared_port_carrying_non_http_is_opaque() {
    let mesh = Mesh::builder()
        .service(
            ServiceSpec::new("db", "raw", Ipv4Addr::new(10, 96, 3, 3))
                .port(PortSpec::new("tcp", 7000, 7000).app_protocol("tcp")),
        )
        .pod(PodSpec::new("db", "raw-0").labels(&[("app", "raw")]))
        .start()
        .await
        .unwrap();
    // A second Service in front of the same TCP echo whose port declares no protocol: the waypoint must
    // sniff, see a first byte no HTTP request starts with, and splice.
    let app = mesh.app().unwrap();
    let mut changes = app.config().subscribe();
    let svc = "apiVersion: v1
kind: Service
metadata: {name: sniffed, namespace: db}
spec:
  clusterIP: 10.96.3.9
  selector: {app: raw}
  ports: [{name: data, port: 7000, targetPort: 7000}]
";
    mesh.rewrite_config(&[svc]).unwrap();
    changes.wait_for(|(g, _)| *g >= 2).await.unwrap();
    let source = mesh.source("client", "sa").unwrap();
    let mut t = source.connect("10.96.3.9:7000").await.unwrap();
    t.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert!(back.starts_with(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]));
    assert!(back.ends_with(b"bytes=10\n"));
}
