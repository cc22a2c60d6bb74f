//! The HBONE frame path on both ends, over real mTLS on loopback: our outbound pool (`HbonePool::connect`) opens
//! CONNECT streams to an echo server stacked the way our inbound listener is (TCP → read-ahead → rustls →
//! coalescing writer → h2 → `H2Stream`), with the waypoint's TLS configs and HTTP/2 settings.
//!
//! Client and server share one current-thread runtime, like one of the waypoint's workers, so a figure is the
//! CPU both ends spend (plus the loopback kernel path) per operation:
//! - `hbone/connect_echo_1KiB`: a CONNECT stream on the pooled connection, 1 KiB there and back, both halves
//!   closed — what a short request costs the tunnel layer;
//! - `hbone/stream_echo_1MiB`: 1 MiB each way on an open stream — the bulk-data path (16 KiB records,
//!   read-ahead, DATA frames, flow control).

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark setup: a failed unwrap is a broken bench

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use waypoint::config::TlsPaths;
use waypoint::hbone::client::HbonePool;
use waypoint::hbone::coalesce::{Coalesce, Ticks};
use waypoint::hbone::read_ahead::ReadAhead;
use waypoint::hbone::stream::H2Stream;
use waypoint::hbone::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW, tune_socket};
use waypoint::identity::SpiffeId;
use waypoint::tls::reload::TlsStore;
use waypoint_conformance::pki::{KeyKind, TestCa};
use waypoint_conformance::tempdir::TempDir;

const TRUST_DOMAIN: &str = "cluster.local";
const SMALL: usize = 1024;
const LARGE: usize = 1024 * 1024;

struct Fixture {
    _dir: TempDir,
    pool: Arc<HbonePool>,
    server: SocketAddr,
    server_id: SpiffeId,
}

fn tls_store(ca: &TestCa, dir: &TempDir, sa: &str) -> Arc<TlsStore> {
    let leaf = ca.issue("bench", sa, KeyKind::EcdsaP256).unwrap();
    let (cert_file, key_file) = leaf.write_to(dir.path(), sa).unwrap();
    let roots_file = ca.write_root(dir.path(), "roots").unwrap();
    TlsStore::load(
        TlsPaths {
            cert_file,
            key_file,
            roots_file,
        },
        TRUST_DOMAIN.into(),
    )
    .unwrap()
}

async fn fixture() -> Fixture {
    let dir = TempDir::new("hbone-bench").unwrap();
    let ca = TestCa::new(TRUST_DOMAIN);
    let server_tls = tls_store(&ca, &dir, "ztunnel");
    let client_tls = tls_store(&ca, &dir, "waypoint");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(echo_server(listener, server_tls));
    Fixture {
        _dir: dir,
        pool: HbonePool::new(client_tls),
        server,
        server_id: ca.spiffe_id("bench", "ztunnel").parse().unwrap(),
    }
}

async fn echo_server(listener: TcpListener, tls: Arc<TlsStore>) {
    while let Ok((tcp, _)) = listener.accept().await {
        tune_socket(&tcp);
        let config = tls.current().server.clone();
        tokio::spawn(async move {
            let tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(ReadAhead::new(tcp))
                .await
                .expect("bench TLS handshake");
            let ticks = Ticks::default();
            ticks
                .drive(async {
                    let mut conn = h2::server::Builder::new()
                        .initial_window_size(STREAM_WINDOW)
                        .initial_connection_window_size(CONNECTION_WINDOW)
                        .max_frame_size(MAX_FRAME)
                        .handshake::<_, Bytes>(Coalesce::new(tls, ticks.clone()))
                        .await
                        .expect("bench h2 handshake");
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let send = respond.send_response(http::Response::new(()), false).unwrap();
                        let stream = H2Stream::new(send, req.into_body());
                        tokio::spawn(async move {
                            let (mut rd, mut wr) = tokio::io::split(stream);
                            let _ = tokio::io::copy(&mut rd, &mut wr).await;
                            let _ = wr.shutdown().await;
                        });
                    }
                })
                .await
        });
    }
}

impl Fixture {
    async fn open(&self) -> H2Stream {
        self.pool
            .connect(self.server, &self.server_id, "127.0.0.1:8080".parse().unwrap())
            .await
            .unwrap()
    }
}

/// Writes `data` and reads the echo at the same time (a stream's window is smaller than 1 MiB, so the two must
/// overlap); returns what came back.
async fn echo(stream: H2Stream, data: &[u8], close: bool) -> (H2Stream, Vec<u8>) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut back = vec![0u8; data.len()];
    let write = async {
        wr.write_all(data).await.unwrap();
        if close {
            wr.shutdown().await.unwrap();
        } else {
            wr.flush().await.unwrap();
        }
    };
    let read = rd.read_exact(&mut back);
    let ((), n) = tokio::join!(write, read);
    n.unwrap();
    if close {
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the echo ends where the client's stream ended");
    }
    (rd.unsplit(wr), back)
}

fn bench_hbone(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fx = rt.block_on(fixture());
    let small: Vec<u8> = (0..SMALL).map(|i| (i % 251) as u8).collect();
    let large: Vec<u8> = (0..LARGE).map(|i| (i % 251) as u8).collect();

    // Both paths must really echo, byte for byte, before they are timed.
    rt.block_on(async {
        let (_, back) = echo(fx.open().await, &small, true).await;
        assert_eq!(back, small);
        let (_, back) = echo(fx.open().await, &large, false).await;
        assert_eq!(back, large);
    });

    let mut group = c.benchmark_group("hbone");
    group.throughput(Throughput::Bytes(2 * SMALL as u64));
    group.bench_function("connect_echo_1KiB", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let (_, back) = echo(fx.open().await, &small, true).await;
                    debug_assert_eq!(back.len(), SMALL);
                }
                start.elapsed()
            })
        })
    });

    group.throughput(Throughput::Bytes(2 * LARGE as u64));
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("stream_echo_1MiB", |b| {
        let mut stream = Some(rt.block_on(fx.open()));
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let (s, back) = echo(stream.take().unwrap(), &large, false).await;
                    debug_assert_eq!(back.len(), LARGE);
                    stream = Some(s);
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_hbone);
criterion_main!(benches);
