//! One CONNECT stream from ztunnel, handled in explicit phases before anything is answered 200:
//!
//! 1. method must be CONNECT (405 otherwise);
//! 2. `:authority` must be `ip:port` or `[v6]:port` (400);
//! 3. a Service must be bound to that address in the current snapshot (404);
//! 4. for a port declared TCP, the upstream is connected first so a dead backend is a 503 on the CONNECT
//!    rather than a tunnel that closes at once;
//!
//! then 200 and the tunnel's protocol runs. Each failure answers this stream only; the HTTP/2 connection and
//! its other streams are untouched.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use super::Ctx;
use super::http::{Downstream, TunnelInfo};
use super::sniff::{self, Detected};
use crate::config::PortProtocol;
use crate::hbone::server::Peer;
use crate::hbone::stream::H2Stream;

pub async fn handle(
    ctx: Arc<Ctx>,
    peer: Arc<Peer>,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    if req.method() != Method::CONNECT {
        refuse(
            &mut respond,
            StatusCode::METHOD_NOT_ALLOWED,
            &peer,
            &format!("method {} is not CONNECT", req.method()),
        );
        return;
    }
    let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or_default();
    let vip: SocketAddr = match authority.parse() {
        Ok(a) => a,
        Err(_) => {
            refuse(
                &mut respond,
                StatusCode::BAD_REQUEST,
                &peer,
                &format!("authority {authority:?} is not ip:port"),
            );
            return;
        }
    };
    let resolved = {
        let snapshot = ctx.config.guard();
        ctx.upstream.prepare(&snapshot);
        snapshot.resolve(&vip)
    };
    let binding = match resolved {
        Some(b) => b,
        None => {
            refuse(
                &mut respond,
                StatusCode::NOT_FOUND,
                &peer,
                &format!("no service bound to {vip}"),
            );
            return;
        }
    };

    let tunnel = Arc::new(TunnelInfo::new(peer.clone(), vip));
    let upstream = if binding.protocol == PortProtocol::Tcp {
        if !super::tcp::authorized(&binding, &tunnel) {
            refuse(
                &mut respond,
                StatusCode::FORBIDDEN,
                &peer,
                "RBAC: access denied (flags RBAC)",
            );
            return;
        }
        match super::tcp::connect_upstream(&ctx.upstream, &binding, tunnel.conn.source_ip).await {
            Ok(up) => Some(up),
            Err(e) => {
                refuse(&mut respond, e.status(), &peer, &format!("{} ({})", e, e.flag()));
                return;
            }
        }
    } else {
        None
    };

    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "CONNECT stream gone before 200");
            return;
        }
    };
    let io = H2Stream::new(send, req.into_body());
    tracing::debug!(peer = %peer.identity, %vip, service = %binding.hostname, "tunnel open");

    match (binding.protocol, upstream) {
        (PortProtocol::Tcp, Some(up)) => super::tcp::splice(&ctx, &tunnel, io, up).await,
        (PortProtocol::Http, _) => {
            // Declared HTTP still allows HTTP/2 prior knowledge from a client that knows better.
            run_detected(ctx, tunnel, io, Some(Downstream::Http1)).await
        }
        (PortProtocol::Http2, _) => super::http::serve(ctx, tunnel, io, Downstream::Http2).await,
        _ => run_detected(ctx, tunnel, io, None).await,
    }
}

async fn run_detected(ctx: Arc<Ctx>, tunnel: Arc<TunnelInfo>, io: H2Stream, declared_http: Option<Downstream>) {
    let timeout = ctx.config.guard().settings.protocol_detection_timeout;
    let (detected, io) = match sniff::detect(io, timeout).await {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "tunnel closed during protocol detection");
            return;
        }
    };
    match (detected, declared_http) {
        (Detected::Http2, _) => super::http::serve(ctx, tunnel, io, Downstream::Http2).await,
        (Detected::Http1, _) => super::http::serve(ctx, tunnel, io, Downstream::Http1).await,
        // A port declared HTTP that does not carry HTTP: let hyper answer 400 rather than pass bytes through.
        (Detected::Opaque, Some(d)) => super::http::serve(ctx, tunnel, io, d).await,
        (Detected::Opaque, None) => {
            let Some(binding) = ctx.config.guard().resolve(&tunnel.vip) else {
                return;
            };
            if !super::tcp::authorized(&binding, &tunnel) {
                tracing::info!(vip = %tunnel.vip, peer = %tunnel.peer.identity, flags = "RBAC", "opaque tunnel denied by policy; closed");
                return;
            }
            match super::tcp::connect_upstream(&ctx.upstream, &binding, tunnel.conn.source_ip).await {
                Ok(up) => super::tcp::splice(&ctx, &tunnel, io, up).await,
                Err(e) => {
                    tracing::info!(vip = %tunnel.vip, flags = e.flag(), reason = %e, "opaque tunnel upstream failed; closed")
                }
            }
        }
    }
}

fn refuse(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode, peer: &Peer, reason: &str) {
    tracing::info!(peer = %peer.identity, src = %peer.addr, status = status.as_u16(), %reason, "CONNECT refused");
    let resp = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_else(|_| Response::new(()));
    let _ = respond.send_response(resp, true);
}
