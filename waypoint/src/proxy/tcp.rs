//! Opaque TCP through the waypoint: bytes copied both ways, a half-close on one side forwarded to the other
//! (tokio's `copy_bidirectional` shuts the peer's write side down when a side reaches EOF).
//!
//! A TCP tunnel is authorized once when it opens, with Istio's TCP semantics (HTTP-only fields never match an
//! ALLOW rule), and again whenever the config changes: a tunnel the new policy denies is closed, as ztunnel
//! does, instead of living on under the old policy.

use tokio::io::{AsyncRead, AsyncWrite};

use super::Ctx;
use super::error::ProxyError;
use super::http::TunnelInfo;
use crate::config::ServiceBinding;
use crate::upstream::UpstreamIo;
use crate::upstream::cluster::{ActiveGuard, PickInput};
use crate::upstream::http_pool::ConnPermit;
use crate::upstream::outlier::Outcome;

/// An upstream connection for a TCP tunnel, with the backend resources it holds while open.
pub struct TcpUpstream {
    pub io: UpstreamIo,
    /// One of the backend's `maxConnections`.
    _permit: ConnPermit,
    /// Counted as an active request for least-request balancing while the tunnel lasts.
    _active: Option<ActiveGuard>,
}

/// Picks an endpoint of the binding's backend with its load balancer, takes a connection permit (overflow:
/// `UO`) and connects within the backend's connect timeout; the connect outcome feeds outlier detection.
pub async fn connect_upstream(
    ctx: &Ctx,
    binding: &ServiceBinding,
    tunnel: &TunnelInfo,
) -> Result<TcpUpstream, ProxyError> {
    let backend = &binding.backend;
    let rt = ctx.upstream.runtime(backend);
    let hash = rt.connection_hash(tunnel.conn.source_ip);
    let index = rt
        .pick(&PickInput { hash, attempt: None })
        .ok_or_else(|| ProxyError::NoHealthyUpstream(format!("{}/{}", binding.namespace, binding.name)))?;
    let ep = backend
        .endpoints
        .get(index)
        .ok_or_else(|| ProxyError::NoHealthyUpstream(rt.name().to_string()))?;
    let permit = rt.state.gate.try_connection()?;
    let active = rt.begin(index);
    match ctx.upstream.connect_with(ep, rt.policy.pool.connect_timeout).await {
        Ok(io) => {
            rt.report(index, Outcome::Connected);
            Ok(TcpUpstream {
                io,
                _permit: permit,
                _active: active,
            })
        }
        Err(e) => {
            rt.report(index, Outcome::LocalFailure);
            Err(e)
        }
    }
}

pub fn authorized(binding: &ServiceBinding, tunnel: &TunnelInfo) -> bool {
    match &binding.security.authz {
        None => true,
        Some(policies) => policies.evaluate(&tunnel.conn.tcp_request()).allowed,
    }
}

pub async fn splice<IO>(ctx: &Ctx, tunnel: &TunnelInfo, mut downstream: IO, mut upstream: TcpUpstream)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut changes = ctx.config.subscribe();
    let copy = tokio::io::copy_bidirectional(&mut downstream, &mut upstream.io);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            r = &mut copy => {
                match r {
                    Ok((sent, received)) => tracing::debug!(sent, received, "tcp tunnel closed"),
                    Err(e) => tracing::debug!(error = %e, "tcp tunnel ended with an error"),
                }
                return;
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    // The config store is gone (shutdown): keep copying until the peers finish.
                    (&mut copy).await.ok();
                    return;
                }
                let binding = ctx.config.guard().resolve(&tunnel.vip);
                if binding.is_some_and(|b| !authorized(&b, tunnel)) {
                    tracing::info!(vip = %tunnel.vip, peer = %tunnel.peer.identity, flags = "RBAC", "policy changed and now denies this TCP tunnel; closed");
                    return;
                }
            }
        }
    }
}
