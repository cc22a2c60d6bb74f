//! Reaching an endpoint: a byte pipe ([`Upstream::connect`]: HBONE tunnel or plain TCP), pooled HTTP client
//! connections on top of those pipes ([`http_pool`]), and per-backend runtime state ([`cluster`]: load
//! balancing ([`lb`], [`hash`], [`locality`]), outlier detection ([`outlier`]), circuit breaker gauges).

pub mod cluster;
pub mod hash;
pub mod http_pool;
pub mod io;
pub mod lb;
pub mod locality;
pub mod outlier;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Backend, Endpoint, Snapshot};
use crate::hbone::client::HbonePool;
use crate::proxy::error::ProxyError;
use crate::tls::reload::TlsStore;

pub use io::UpstreamIo;

pub struct Upstream {
    pub hbone: Arc<HbonePool>,
    pub http: http_pool::HttpPool,
    pub registry: cluster::Registry,
}

impl Upstream {
    pub fn new(tls: Arc<TlsStore>) -> Arc<Self> {
        Arc::new(Upstream {
            hbone: HbonePool::new(tls),
            http: http_pool::HttpPool::default(),
            registry: cluster::Registry::new(),
        })
    }

    /// Once per config generation (cheap otherwise): resolves the snapshot's backends against the registry
    /// and drops state and idle connections nothing uses any more. Returns whether requests need a
    /// [`cluster::ClientAddr`] (a backend hashes on the client address).
    pub fn prepare(&self, snapshot: &Snapshot) -> bool {
        let generation = snapshot.generation;
        let before = self.registry.prepared();
        let source_ip = self.registry.prepare(snapshot);
        if before != generation {
            self.http.purge_idle();
        }
        source_ip
    }

    /// The backend's runtime (load balancer, breaker, endpoint health) for its snapshot.
    pub fn runtime<'b>(&self, backend: &'b Backend) -> &'b Arc<cluster::BackendRuntime> {
        self.registry.runtime(backend)
    }

    /// A byte pipe to the endpoint's application port: a CONNECT stream through its node's ztunnel when the
    /// endpoint speaks HBONE, plain TCP otherwise.
    pub async fn connect(&self, ep: &Endpoint) -> Result<UpstreamIo, ProxyError> {
        self.connect_with(ep, None).await
    }

    /// [`Upstream::connect`] within `timeout` (`tcp.connectTimeout`; default 10 s). Through HBONE the timeout
    /// bounds the whole tunnel setup; the HBONE pool's own 10 s bound on opening its connection still applies.
    pub async fn connect_with(&self, ep: &Endpoint, timeout: Option<Duration>) -> Result<UpstreamIo, ProxyError> {
        let timeout = timeout.unwrap_or(crate::hbone::CONNECT_TIMEOUT);
        match ep.hbone {
            Some(hbone_addr) => {
                let connect = self.hbone.connect(hbone_addr, &ep.identity, ep.addr);
                let s = match tokio::time::timeout(timeout, connect).await {
                    Ok(r) => r.map_err(ProxyError::from),
                    Err(_) => Err(ProxyError::UpstreamConnect(format!("{} via {hbone_addr}: timed out", ep.addr))),
                }
                .inspect_err(|e| {
                    tracing::warn!(endpoint = %ep.addr, workload = %ep.workload, reason = %e, "upstream HBONE connect failed");
                })?;
                Ok(UpstreamIo::Hbone(s))
            }
            None => {
                let connect = tokio::net::TcpStream::connect(ep.addr);
                match tokio::time::timeout(timeout, connect).await {
                    Ok(Ok(s)) => {
                        crate::hbone::tune_socket(&s);
                        Ok(UpstreamIo::Tcp(s))
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(endpoint = %ep.addr, reason = %e, "upstream TCP connect failed");
                        Err(ProxyError::UpstreamConnect(format!("{}: {e}", ep.addr)))
                    }
                    Err(_) => Err(ProxyError::UpstreamConnect(format!("{}: timed out", ep.addr))),
                }
            }
        }
    }
}
