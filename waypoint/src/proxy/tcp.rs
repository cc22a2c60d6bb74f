//! Opaque TCP through the waypoint: bytes copied both ways, a half-close on one side forwarded to the other
//! (tokio's `copy_bidirectional` shuts the peer's write side down when a side reaches EOF).
//!
//! A TCP tunnel is authorized once when it opens, with Istio's TCP semantics (HTTP-only fields never match an
//! ALLOW rule), and again whenever the config changes: a tunnel the new policy denies is closed, as ztunnel
//! does, instead of living on under the old policy.

use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Ctx;
use super::error::ProxyError;
use super::http::TunnelInfo;
use crate::config::ServiceBinding;
use crate::upstream::cluster::{ActiveGuard, PickInput};
use crate::upstream::http_pool::ConnPermit;
use crate::upstream::outlier::Outcome;
use crate::upstream::{Upstream, UpstreamIo};

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
    upstream: &Upstream,
    binding: &ServiceBinding,
    source_ip: Option<IpAddr>,
) -> Result<TcpUpstream, ProxyError> {
    let backend = &binding.backend;
    let rt = upstream.runtime(backend);
    let hash = rt.connection_hash(source_ip);
    let index = rt
        .pick(&PickInput { hash, attempt: None })
        .ok_or_else(|| ProxyError::NoHealthyUpstream(format!("{}/{}", binding.namespace, binding.name)))?;
    let ep = backend
        .endpoints
        .get(index)
        .ok_or_else(|| ProxyError::NoHealthyUpstream(rt.name().to_string()))?;
    let permit = rt.state.gate.try_connection()?;
    let active = rt.begin(index);
    match upstream.connect_with(ep, rt.policy.pool.connect_timeout).await {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;

    use waypoint_filters::breaker::Overflow;

    use super::*;
    use crate::upstream::test_support::{next_ip, upstream};

    fn config(name: &str, vip: &str, pod: SocketAddr, traffic_policy: &str) -> String {
        format!(
            "apiVersion: waypoint.istio.io/v1alpha1
kind: WaypointConfig
metadata: {{name: wp, namespace: infra}}
spec:
  listeners: {{hbone: 127.0.0.1:15008}}
  tls: {{certFile: c.pem, keyFile: k.pem, rootsFile: r.pem}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ns1}}
spec:
  clusterIP: {vip}
  selector: {{app: {name}}}
  ports: [{{name: tcp-db, port: 5432, targetPort: {port}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-1, namespace: ns1, labels: {{app: {name}}}}}
status: {{podIP: {ip}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: ns1}}
spec:
  host: {name}
  trafficPolicy: {traffic_policy}
",
            port = pod.port(),
            ip = pod.ip()
        )
    }

    fn binding(text: &str, vip: &str) -> Arc<ServiceBinding> {
        let snapshot = crate::config::parse_config("t.yaml", Path::new("/"), text, 1).unwrap();
        snapshot.service(&vip.parse().unwrap()).unwrap().clone()
    }

    #[tokio::test]
    async fn tunnels_hold_a_connection_permit_and_overflow_beyond_max_connections() {
        let listener = tokio::net::TcpListener::bind((next_ip(), 0)).await.unwrap();
        let pod = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let b = binding(
            &config("db", "10.96.0.5", pod, "{connectionPool: {tcp: {maxConnections: 1}}}"),
            "10.96.0.5:5432",
        );
        let up = upstream();
        let first = connect_upstream(&up, &b, None).await.unwrap();
        let second = connect_upstream(&up, &b, None).await;
        assert!(
            matches!(second, Err(ProxyError::Overflow(Overflow::Connections))),
            "{:?}",
            second.err()
        );
        drop(first);
        let third = connect_upstream(&up, &b, None).await;
        assert!(third.is_ok(), "the closed tunnel gave its permit back");
    }

    #[tokio::test]
    async fn refused_connections_feed_outlier_detection() {
        let closed = {
            let l = std::net::TcpListener::bind((next_ip(), 0)).unwrap();
            l.local_addr().unwrap()
        };
        let b = binding(
            &config(
                "gone",
                "10.96.0.6",
                closed,
                "{outlierDetection: {consecutive5xxErrors: 2, maxEjectionPercent: 100}}",
            ),
            "10.96.0.6:5432",
        );
        let up = upstream();
        for _ in 0..2 {
            let r = connect_upstream(&up, &b, None).await;
            assert!(matches!(r, Err(ProxyError::UpstreamConnect(_))), "{:?}", r.err());
        }
        let r = connect_upstream(&up, &b, None).await;
        assert!(
            matches!(r, Err(ProxyError::NoHealthyUpstream(_))),
            "ejected after two connect failures: {:?}",
            r.err()
        );
    }
}
