//! Inbound HBONE: accept TCP, terminate mTLS, run an HTTP/2 server, hand each CONNECT stream to its own task.
//!
//! One task per stream (not per connection): the connection task only drives HTTP/2 framing and keepalive, so a
//! slow stream never holds up the others. Where the tasks run depends on the runtime: with thread-per-core
//! workers (the default, see [`crate::workers`]) a connection and all its streams share one worker thread, as
//! in Envoy; under `--work-stealing` the streams of one busy connection spread over every core.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};

use super::coalesce::{Coalesce, Ticks};
use super::{CONNECTION_WINDOW, MAX_FRAME, PING_INTERVAL, PING_TIMEOUT, STREAM_WINDOW, tune_socket};
use crate::identity::SpiffeId;
use crate::proxy::{self, Ctx};

/// Who is on the other end of an HBONE connection.
#[derive(Debug)]
pub struct Peer {
    pub identity: SpiffeId,
    /// TCP peer address: in ztunnel's in-pod mode, the source pod's IP.
    pub addr: SocketAddr,
    /// Our own address on that connection.
    pub local: SocketAddr,
}

/// How many concurrent CONNECT streams we let one HBONE connection open. ztunnel uses up to 100 per pooled
/// connection; advertising more leaves room for other clients (and for tests) without costing anything.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;

pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.drain.signaled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => match &ctx.workers {
                None => {
                    let ctx2 = ctx.clone();
                    ctx.drain.spawn(async move { connection(tcp, peer, ctx2).await });
                }
                Some(workers) => {
                    // Re-registered with the worker's own I/O driver: left on the accepting runtime's, every
                    // readiness event would cross threads.
                    let tcp = match tcp.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot hand the connection to a worker");
                            continue;
                        }
                    };
                    let ctx2 = ctx.clone();
                    let (fut, handle) = workers.assign(async move {
                        match TcpStream::from_std(tcp) {
                            Ok(tcp) => connection(tcp, peer, ctx2).await,
                            Err(e) => tracing::warn!(%peer, error = %e, "worker cannot register the connection"),
                        }
                    });
                    ctx.drain.spawn_on(fut, handle);
                }
            },
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(error = %e, "hbone accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!("hbone listener closed for drain");
}

async fn connection(tcp: TcpStream, peer_addr: SocketAddr, ctx: Arc<Ctx>) {
    tune_socket(&tcp);
    let local = tcp.local_addr().unwrap_or(peer_addr);
    let tls_state = ctx.tls.current();
    let trust_domain = ctx.config.guard().settings.trust_domain.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_state.server.clone());
    let tls = match tokio::time::timeout(
        super::CONNECT_TIMEOUT,
        acceptor.accept(super::read_ahead::ReadAhead::new(tcp)),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(peer = %peer_addr, reason = %e, "hbone TLS handshake refused; connection closed");
            return;
        }
        Err(_) => {
            tracing::warn!(peer = %peer_addr, "hbone TLS handshake timed out; connection closed");
            return;
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| crate::tls::peer_identity(leaf, &trust_domain));
    let Some(identity) = identity else {
        // The verifier already demanded a SPIFFE ID in our trust domain; reaching here means it changed under us.
        tracing::warn!(peer = %peer_addr, "hbone peer has no SPIFFE identity in trust domain {trust_domain}; closed");
        return;
    };
    let peer = Arc::new(Peer {
        identity,
        addr: peer_addr,
        local,
    });
    let span = tracing::debug_span!("hbone", peer = %peer.addr, identity = %peer.identity);
    let _enter = span.enter();
    drop(_enter);

    // Everything that polls the HTTP/2 connection runs under `ticks`, which its writer uses to defer flushes
    // to the next poll (see `coalesce`).
    let ticks = Ticks::default();
    ticks
        .drive(async {
            let mut conn = match h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .max_header_list_size(64 * 1024)
                // ztunnel's server value: data queued per stream beyond this waits (back-pressure) instead of piling
                // up in memory when the peer reads slower than the upstream answers.
                .max_send_buffer_size(400 * 1024)
                .handshake::<_, Bytes>(Coalesce::new(tls, ticks.clone()))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(peer = %peer_addr, error = %e, "hbone HTTP/2 handshake failed");
                    return;
                }
            };

            let mut ping = conn.ping_pong();
            let dead = tokio_util::sync::CancellationToken::new();
            if let Some(pp) = ping.take() {
                tokio::spawn(keepalive(pp, dead.clone()));
            }
            let _stop_keepalive = dead.clone().drop_guard();

            let mut draining = false;
            loop {
                let next = tokio::select! {
                    biased;
                    _ = dead.cancelled() => {
                        tracing::info!(peer = %peer_addr, "hbone peer stopped answering PING; connection dropped");
                        conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                        break;
                    }
                    _ = ctx.drain.signaled(), if !draining => {
                        draining = true;
                        conn.graceful_shutdown();
                        continue;
                    }
                    n = conn.accept() => n,
                };
                match next {
                    Some(Ok((req, respond))) => {
                        let ctx = ctx.clone();
                        let peer = peer.clone();
                        ctx.drain
                            .clone()
                            .spawn(async move { proxy::tunnel::handle(ctx, peer, req, respond).await });
                    }
                    Some(Err(e)) => {
                        if !e.is_go_away() && !e.is_io() {
                            tracing::debug!(peer = %peer_addr, error = %e, "hbone connection error");
                        }
                        break;
                    }
                    None => break,
                }
            }
        })
        .await
}

async fn keepalive(mut pp: h2::PingPong, dead: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = dead.cancelled() => return,
            _ = tokio::time::sleep(PING_INTERVAL) => {}
        }
        match tokio::time::timeout(PING_TIMEOUT, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection is gone already; the accept loop notices on its own.
            Ok(Err(_)) => return,
            Err(_) => {
                dead.cancel();
                return;
            }
        }
    }
}
