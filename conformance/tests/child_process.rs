//! Tests that need the waypoint as its own process: memory under large bodies, and SIGTERM drain.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::Ipv4Addr;
use std::time::Duration;

use futures_util::stream;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use waypoint_conformance::client::{self, Body, BoxError, empty};
use waypoint_conformance::echo;
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};

const BIN: &str = env!("CARGO_BIN_EXE_waypoint-conformance");
const NS: &str = "proc";

async fn mesh(drain_timeout: &str) -> Mesh {
    Mesh::builder()
        .service(ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 5, 1)).port(PortSpec::http(80, 8080)))
        .pod(PodSpec::new(NS, "echo-1").labels(&[("app", "echo")]))
        .drain_timeout(drain_timeout)
        .child_process(BIN)
        .start()
        .await
        .expect("mesh with a child waypoint starts")
}

/// Peak resident set size of a process (kB), from /proc.
fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

const MIB: usize = 1024 * 1024;
const LARGE: usize = 256 * MIB;

/// `total` bytes of the echo's pattern, in 64 KiB chunks that share the pattern's memory.
fn streamed_upload(total: usize) -> Body {
    const CHUNK: usize = 64 * 1024;
    let chunks = stream::iter((0..total).step_by(CHUNK).map(move |offset| {
        let len = CHUNK.min(total - offset);
        Ok::<_, BoxError>(http_body::Frame::data(echo::pattern_chunk(offset as u64, len)))
    }));
    BodyExt::boxed(StreamBody::new(chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_without_growing_memory() {
    let mesh = mesh("5s").await;
    let pid = mesh.child_pid().unwrap();
    let source = mesh.source("client", "big").unwrap();
    let authority = mesh.authority(NS, "echo", 80);
    // Warm up so the baseline includes the connection pools and buffers a steady state has anyway.
    let reply = client::get(&source, &authority, "echo", "/bytes/1048576")
        .await
        .unwrap();
    assert_eq!(reply.body.len(), MIB);
    let before = vm_hwm_kb(pid);

    let req = Request::post("/upload")
        .header("host", "echo")
        .body(streamed_upload(LARGE))
        .unwrap();
    let reply = client::request(&source, &authority, req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["bodyBytes"],
        LARGE as u64,
        "every byte of the upload arrived"
    );
    assert_eq!(
        reply.json()["bodyMatchesPattern"],
        true,
        "the upload arrived byte for byte, in order"
    );

    let tunnel = source.connect(&authority).await.unwrap();
    let mut send = client::http1(tunnel).await.unwrap();
    let req = Request::get(format!("/bytes/{LARGE}"))
        .header("host", "echo")
        .body(empty())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            assert!(
                echo::matches_pattern(received as u64, &data),
                "download bytes {received}..{} differ from what the backend sent",
                received + data.len()
            );
            received += data.len();
        }
    }
    assert_eq!(received, LARGE, "every byte of the download arrived");

    let growth_mib = (vm_hwm_kb(pid).saturating_sub(before)) / 1024;
    assert!(growth_mib < 64, "peak RSS grew by {growth_mib} MiB moving 2 x 256 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mesh = mesh("20s").await;
    let source = mesh.source("client", "slow").unwrap();
    let authority = mesh.authority(NS, "echo", 80);
    let slow = {
        let (source, authority) = (source.clone(), authority.clone());
        tokio::spawn(async move { client::get(&source, &authority, "echo", "/slow?delay=1500ms").await })
    };
    // The request is in flight once the backend has it.
    mesh.echo("echo-1").wait_for_requests(1).await;

    mesh.drain();
    // Readiness flips to 503 so Kubernetes stops routing new connections here.
    let readiness = mesh.readiness_addr();
    let mut status = 0;
    for _ in 0..200 {
        status = readiness_status(readiness).await;
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 503, "readiness reports draining");

    let reply = slow
        .await
        .unwrap()
        .expect("the in-flight request completes during the drain");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["path"], "/slow?delay=1500ms");

    // New HBONE connections are no longer accepted.
    let fresh = mesh.source("client", "late").unwrap();
    assert!(
        fresh.connect(&authority).await.is_err(),
        "listener closed after SIGTERM"
    );
    assert!(mesh.shutdown().await, "waypoint exits 0 after draining");
}

async fn readiness_status(addr: std::net::SocketAddr) -> u16 {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let Ok(mut send) = client::http1(tcp).await else {
        return 0;
    };
    let req = Request::get("/healthz/ready")
        .header("host", "probe")
        .body(empty())
        .unwrap();
    match send.send_request(req).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Threads of a process whose name starts with `prefix` (names are cut to 15 bytes by the kernel).
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim_end().starts_with(prefix))
        .count()
}

/// Both runtime models serve many HBONE connections at once, each with several requests: thread-per-core
/// workers (the default; connections are spread over the workers) and `--work-stealing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_and_work_stealing_serve_concurrent_connections() {
    for (args, worker_threads) in [
        (&["--workers", "3"][..], 3),
        (&["--work-stealing", "--workers", "2"][..], 0),
    ] {
        let mesh = Mesh::builder()
            .service(ServiceSpec::new(NS, "echo", Ipv4Addr::new(10, 96, 5, 1)).port(PortSpec::http(80, 8080)))
            .pod(PodSpec::new(NS, "echo-1").labels(&[("app", "echo")]))
            .pod(PodSpec::new(NS, "echo-2").labels(&[("app", "echo")]))
            .child_process_with_args(BIN, args)
            .start()
            .await
            .expect("mesh with a child waypoint starts");
        let pid = mesh.child_pid().unwrap();
        assert_eq!(threads_named(pid, "waypoint-worke"), worker_threads, "{args:?}");
        let authority = mesh.authority(NS, "echo", 80);
        let clients: Vec<_> = (0..12)
            .map(|i| {
                // A source identity each: separate HBONE connections.
                let source = mesh.source("client", &format!("sa-{i}")).unwrap();
                let authority = authority.clone();
                tokio::spawn(async move {
                    let mut ok = 0;
                    for n in 0..5 {
                        let reply = client::get(&source, &authority, "echo", &format!("/c{i}/r{n}"))
                            .await
                            .unwrap();
                        assert_eq!(reply.status, StatusCode::OK);
                        assert_eq!(reply.json()["path"], format!("/c{i}/r{n}"));
                        ok += 1;
                    }
                    ok
                })
            })
            .collect();
        let mut served = 0;
        for c in clients {
            served += c.await.unwrap();
        }
        assert_eq!(served, 60, "{args:?}");
        assert!(mesh.shutdown().await, "{args:?}: waypoint exits 0");
    }
}
