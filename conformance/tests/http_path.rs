//! HTTP through the whole path: source ztunnel → waypoint → destination ztunnel → echo, over loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::Ipv4Addr;

use bytes::Bytes;
use http::{Request, StatusCode};
use waypoint_conformance::client::{self, body, empty};
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};

const NS: &str = "shop";

async fn mesh() -> Mesh {
    Mesh::builder()
        .service(
            ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 1, 1))
                .port(PortSpec::http(80, 8080))
                .port(PortSpec::new("grpc", 7070, 7070).app_protocol("kubernetes.io/h2c"))
                .port(PortSpec::new("web", 8000, 8080)),
        )
        .service(ServiceSpec::new(NS, "legacy", Ipv4Addr::new(10, 96, 1, 2)).port(PortSpec::http(80, 8080)))
        .pod(
            PodSpec::new(NS, "echo-a")
                .labels(&[("app", "echo")])
                .service_account("echo"),
        )
        .pod(
            PodSpec::new(NS, "echo-b")
                .labels(&[("app", "echo")])
                .service_account("echo"),
        )
        .pod(PodSpec::new(NS, "legacy-vm").labels(&[("app", "legacy")]).hbone(false))
        .start()
        .await
        .expect("mesh starts")
}

#[tokio::test]
async fn get_and_post_over_http1_reach_every_endpoint_through_hbone() {
    let mesh = mesh().await;
    let source = mesh.source("frontend", "web").unwrap();
    let authority = mesh.authority(NS, "echo", 80);
    let mut pods = Vec::new();
    for _ in 0..4 {
        let reply = client::get(&source, &authority, "echo.shop", "/items?id=7")
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let json = reply.json();
        assert_eq!(json["path"], "/items?id=7");
        assert_eq!(json["host"], "echo.shop");
        assert_eq!(json["method"], "GET");
        let request_id = json["headers"]["X-Request-Id"][0]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(request_id.len(), 36, "x-request-id added: {json}");
        pods.push(json["pod"].as_str().unwrap().to_string());
    }
    pods.sort();
    pods.dedup();
    assert_eq!(pods, vec!["echo-a", "echo-b"], "round robin over both endpoints");

    let payload: Bytes = (0..300_000u64)
        .step_by(50_000)
        .flat_map(|offset| waypoint_conformance::echo::pattern_chunk(offset, 50_000).to_vec())
        .collect::<Vec<u8>>()
        .into();
    let req = Request::post("/orders")
        .header("host", "echo.shop")
        .header("x-client-id", "kept")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .body(body(payload))
        .unwrap();
    let reply = client::request(&source, &authority, req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let json = reply.json();
    assert_eq!(json["method"], "POST");
    assert_eq!(json["bodyBytes"], 300_000);
    assert_eq!(json["bodyMatchesPattern"], true, "the body arrived byte for byte");
    assert_eq!(json["headers"]["X-Client-Id"][0], "kept");
    assert!(
        json["headers"].get("X-Hop").is_none(),
        "header named by Connection is hop-by-hop: {json}"
    );

    // The waypoint re-tunnels with its own identity and the pod's IP:targetPort as authority.
    let records = mesh.dest_ztunnel("echo-a").wait_for_connects(1).await;
    let rec = &records[0];
    assert_eq!(rec.peer_identity.as_deref(), Some(mesh.waypoint_identity()));
    assert_eq!(rec.authority, format!("{}:8080", mesh.pod_ip("echo-a")));
    assert_eq!(rec.status, StatusCode::OK);
}

#[tokio::test]
async fn keep_alive_requests_share_one_tunnel_and_pooled_upstreams() {
    let mesh = mesh().await;
    let source = mesh.source("frontend", "web").unwrap();
    let tunnel = source.connect(&mesh.authority(NS, "echo", 80)).await.unwrap();
    let mut send = client::http1(tunnel).await.unwrap();
    for i in 0..20 {
        let req = Request::get(format!("/k/{i}"))
            .header("host", "echo")
            .body(empty())
            .unwrap();
        let reply = client::send1(&mut send, req).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["path"], format!("/k/{i}"));
    }
    // 20 sequential requests alternate between two pods; pooled upstream connections mean far fewer
    // CONNECTs to the destination ztunnels than requests.
    let connects = mesh.dest_ztunnel("echo-a").connects().len() + mesh.dest_ztunnel("echo-b").connects().len();
    assert!(
        connects <= 4,
        "upstream HTTP/1.1 connections are reused, saw {connects} CONNECTs"
    );
}

#[tokio::test]
async fn endpoints_without_ztunnel_get_plain_tcp() {
    let mesh = mesh().await;
    let source = mesh.source("frontend", "web").unwrap();
    let reply = client::get(&source, &mesh.authority(NS, "legacy", 80), "legacy", "/old")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["pod"], "legacy-vm");
}

#[tokio::test]
async fn h2c_and_grpc_with_trailers() {
    let mesh = mesh().await;
    let source = mesh.source("frontend", "web").unwrap();

    // A gRPC call on a port declared h2c: upstream HTTP/2, trailers carried back.
    let tunnel = source.connect(&mesh.authority(NS, "echo", 7070)).await.unwrap();
    let mut send = client::http2(tunnel).await.unwrap();
    let req = Request::post("http://echo.shop:7070/echo.Echo/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body(Bytes::from_static(b"\0\0\0\0\x03abc")))
        .unwrap();
    let reply = client::send2(&mut send, req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/grpc");
    let trailers = reply.trailers.expect("gRPC trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert!(
        reply.body.len() > 5 && reply.body[0] == 0,
        "one length-prefixed message"
    );

    // h2c prior knowledge on a port with no declared protocol: sniffed, and the upstream speaks HTTP/2 too.
    let tunnel = source.connect(&mesh.authority(NS, "echo", 8000)).await.unwrap();
    let mut send = client::http2(tunnel).await.unwrap();
    let req = Request::get("http://echo.shop:8000/sniffed").body(empty()).unwrap();
    let reply = client::send2(&mut send, req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["proto"], "HTTP/2.0");
    assert_eq!(reply.json()["path"], "/sniffed");

    // HTTP/1.1 on the same undeclared port: sniffed as HTTP/1.1.
    let reply = client::get(&source, &mesh.authority(NS, "echo", 8000), "echo.shop", "/one")
        .await
        .unwrap();
    assert_eq!(reply.json()["proto"], "HTTP/1.1");
}

#[tokio::test]
async fn two_hundred_concurrent_streams_on_one_hbone_connection() {
    let mesh = mesh().await;
    let source = mesh.source("frontend", "web").unwrap();
    let conn = source.dedicated_connection().await.unwrap();
    let authority = mesh.authority(NS, "echo", 80);
    // Open all 200 tunnels first so they are concurrently alive on the one connection.
    let mut tunnels = Vec::new();
    for _ in 0..200 {
        tunnels.push(conn.connect(&authority).await.expect("CONNECT accepted"));
    }
    assert_eq!(conn.active_streams(), 200);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, t) in tunnels.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut send = client::http1(t).await.unwrap();
            let req = Request::get(format!("/stream/{i}"))
                .header("host", "echo")
                .body(empty())
                .unwrap();
            let reply = client::send1(&mut send, req).await.unwrap();
            (
                i,
                reply.status,
                reply.json()["path"].as_str().unwrap_or_default().to_string(),
            )
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        let (i, status, path) = r.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(path, format!("/stream/{i}"));
        ok += 1;
    }
    assert_eq!(ok, 200);
}
