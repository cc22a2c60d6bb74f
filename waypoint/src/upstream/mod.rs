//! Reaching an endpoint: a byte pipe ([`Upstream::connect`]: HBONE tunnel or plain TCP) and pooled HTTP client
//! connections on top of those pipes ([`http_pool`]).

pub mod http_pool;
pub mod io;

use std::sync::Arc;

use crate::config::Endpoint;
use crate::hbone::client::HbonePool;
use crate::proxy::error::ProxyError;
use crate::tls::reload::TlsStore;

pub use io::UpstreamIo;

pub struct Upstream {
    pub hbone: Arc<HbonePool>,
    pub http: http_pool::HttpPool,
}

impl Upstream {
    pub fn new(tls: Arc<TlsStore>) -> Arc<Self> {
        Arc::new(Upstream {
            hbone: HbonePool::new(tls),
            http: http_pool::HttpPool::default(),
        })
    }

    /// A byte pipe to the endpoint's application port: a CONNECT stream through its node's ztunnel when the
    /// endpoint speaks HBONE, plain TCP otherwise.
    pub async fn connect(&self, ep: &Endpoint) -> Result<UpstreamIo, ProxyError> {
        match ep.hbone {
            Some(hbone_addr) => {
                let s = self.hbone.connect(hbone_addr, &ep.identity, ep.addr).await.map_err(|e| {
                    let e = ProxyError::from(e);
                    tracing::warn!(endpoint = %ep.addr, workload = %ep.workload, reason = %e, "upstream HBONE connect failed");
                    e
                })?;
                Ok(UpstreamIo::Hbone(s))
            }
            None => {
                let connect = tokio::net::TcpStream::connect(ep.addr);
                match tokio::time::timeout(crate::hbone::CONNECT_TIMEOUT, connect).await {
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
