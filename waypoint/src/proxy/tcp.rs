//! Opaque TCP through the waypoint: bytes copied both ways, a half-close on one side forwarded to the other
//! (tokio's `copy_bidirectional` shuts the peer's write side down when a side reaches EOF).
//!
//! A TCP tunnel is authorized once when it opens, with Istio's TCP semantics (HTTP-only fields never match an
//! ALLOW rule), and again whenever the config changes: a tunnel the new policy denies is closed, as ztunnel
//! does, instead of living on under the old policy.

use tokio::io::{AsyncRead, AsyncWrite};

use super::Ctx;
use super::http::TunnelInfo;
use crate::config::ServiceBinding;
use crate::upstream::UpstreamIo;

pub fn authorized(binding: &ServiceBinding, tunnel: &TunnelInfo) -> bool {
    match &binding.security.authz {
        None => true,
        Some(policies) => policies.evaluate(&tunnel.conn.tcp_request()).allowed,
    }
}

pub async fn splice<IO>(ctx: &Ctx, tunnel: &TunnelInfo, mut downstream: IO, mut upstream: UpstreamIo)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut changes = ctx.config.subscribe();
    let copy = tokio::io::copy_bidirectional(&mut downstream, &mut upstream);
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
