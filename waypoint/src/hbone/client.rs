//! Outbound HBONE: a pool of mTLS HTTP/2 connections to destination ztunnels, one CONNECT stream per tunnel.
//!
//! Pool key = (ztunnel address, expected identity), as ztunnel keys its own pool: two pods behind one node
//! ztunnel with different service accounts must not share a connection verified for the other's identity.
//! Each connection carries at most [`MAX_STREAMS_PER_CONN`] streams; beyond that a new connection is opened.
//! Opening is single-flight per key, so a burst of requests to a cold endpoint opens one connection, not one
//! per request. Dead connections are noticed by their driver task and removed.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::coalesce::{Coalesce, Ticks};
use super::stream::H2Stream;
use super::{CONNECT_TIMEOUT, MAX_FRAME, PING_INTERVAL, PING_TIMEOUT, STREAM_WINDOW, tune_socket};
use crate::identity::SpiffeId;
use crate::tls::PeerIdentityError;
use crate::tls::reload::TlsStore;

/// ztunnel's `POOL_MAX_STREAMS_PER_CONNECTION`.
pub const MAX_STREAMS_PER_CONN: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {addr}: timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("TLS with {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("{addr}: {source}")]
    IdentityMismatch {
        addr: SocketAddr,
        source: Arc<PeerIdentityError>,
    },
    #[error("client TLS config: {0}")]
    Config(String),
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("CONNECT {authority} via {addr} answered {status}")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
}

impl HboneError {
    /// Failures before any byte reached the destination application: safe to retry elsewhere.
    pub fn is_connect_failure(&self) -> bool {
        !matches!(self, HboneError::H2 { .. })
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Key {
    addr: SocketAddr,
    identity: SpiffeId,
    /// Per worker thread, like Envoy's per-worker pools: a connection's driver task runs on the worker that
    /// opened it, and streams from other workers would wake it across threads ([`crate::workers`]).
    worker: usize,
}

struct Conn {
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    dead: AtomicBool,
}

impl Conn {
    /// Reserve a stream slot if this connection has one.
    fn try_reserve(self: &Arc<Self>) -> Option<StreamSlot> {
        if self.dead.load(Ordering::Acquire) {
            return None;
        }
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if cur >= MAX_STREAMS_PER_CONN {
                return None;
            }
            match self
                .active
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(StreamSlot(self.clone())),
                Err(v) => cur = v,
            }
        }
    }
}

/// Holds one of a connection's stream slots until the tunnel is dropped.
struct StreamSlot(Arc<Conn>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    /// Single-flight for opening connections to this key.
    opening: Arc<tokio::sync::Mutex<()>>,
}

pub struct HbonePool {
    tls: Arc<TlsStore>,
    entries: Mutex<HashMap<Key, Entry>>,
}

impl HbonePool {
    pub fn new(tls: Arc<TlsStore>) -> Arc<Self> {
        Arc::new(HbonePool {
            tls,
            entries: Mutex::new(HashMap::new()),
        })
    }

    fn reserve(&self, key: &Key) -> (Option<StreamSlot>, Arc<tokio::sync::Mutex<()>>) {
        let mut entries = match self.entries.lock() {
            Ok(e) => e,
            Err(p) => p.into_inner(),
        };
        let entry = entries.entry(key.clone()).or_default();
        entry.conns.retain(|c| !c.dead.load(Ordering::Acquire));
        let slot = entry.conns.iter().find_map(|c| c.try_reserve());
        (slot, entry.opening.clone())
    }

    /// Open a CONNECT tunnel to `authority` (pod IP:port) through the ztunnel at `hbone_addr`, which must prove
    /// `identity`.
    pub async fn connect(
        self: &Arc<Self>,
        hbone_addr: SocketAddr,
        identity: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<H2Stream, HboneError> {
        let key = Key {
            addr: hbone_addr,
            identity: identity.clone(),
            worker: crate::workers::current(),
        };
        let (slot, opening) = self.reserve(&key);
        let slot = match slot {
            Some(s) => s,
            None => {
                let _single = opening.lock().await;
                match self.reserve(&key).0 {
                    Some(s) => s,
                    None => {
                        let conn = self.open(&key).await?;
                        let slot = conn
                            .try_reserve()
                            .ok_or_else(|| HboneError::Config("fresh connection full".into()))?;
                        if let Ok(mut entries) = self.entries.lock() {
                            entries.entry(key.clone()).or_default().conns.push(conn);
                        }
                        slot
                    }
                }
            }
        };
        let mut send = slot.0.send.clone();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .body(())
            .map_err(|e| HboneError::Config(e.to_string()))?;
        let h2err = |source| HboneError::H2 {
            addr: hbone_addr,
            source,
        };
        let (resp, send_stream) = {
            send = send.ready().await.map_err(|e| {
                slot.0.dead.store(true, Ordering::Release);
                h2err(e)
            })?;
            send.send_request(req, false).map_err(h2err)?
        };
        let resp = resp.await.map_err(h2err)?;
        if resp.status() != StatusCode::OK {
            return Err(HboneError::Status {
                addr: hbone_addr,
                authority,
                status: resp.status(),
            });
        }
        let recv = resp.into_body();
        Ok(H2Stream::new(send_stream, recv).with_guard(Box::new(slot)))
    }

    async fn open(self: &Arc<Self>, key: &Key) -> Result<Arc<Conn>, HboneError> {
        let addr = key.addr;
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(source)) => return Err(HboneError::Connect { addr, source }),
            Err(_) => return Err(HboneError::ConnectTimeout { addr }),
        };
        tune_socket(&tcp);
        let cfg = self
            .tls
            .current()
            .client_config(&key.identity)
            .map_err(|e| HboneError::Config(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(cfg);
        // No SNI is sent (enable_sni = false); the name only satisfies the API, as ztunnel's 0.0.0.0.
        let name = ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into());
        let tls = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            connector.connect(name, super::read_ahead::ReadAhead::new(tcp)),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(classify_tls_error(addr, e)),
            Err(_) => return Err(HboneError::ConnectTimeout { addr }),
        };
        // The task that polls `conn` runs under `ticks`, which its writer uses to defer flushes (see `coalesce`).
        let ticks = Ticks::default();
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(super::UPSTREAM_STREAM_WINDOW)
            .initial_connection_window_size(super::UPSTREAM_CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(16 * 1024)
            .max_send_buffer_size(STREAM_WINDOW as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(Coalesce::new(tls, ticks.clone()))
            .await
            .map_err(|source| HboneError::H2 { addr, source })?;
        let c = Arc::new(Conn {
            send,
            active: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&c);
        let ping = conn.ping_pong();
        tokio::spawn(async move {
            let keepalive = async move {
                let Some(mut pp) = ping else {
                    return std::future::pending().await;
                };
                loop {
                    tokio::time::sleep(PING_INTERVAL).await;
                    match tokio::time::timeout(PING_TIMEOUT, pp.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_)) => {}
                        _ => return,
                    }
                }
            };
            ticks
                .drive(async {
                    tokio::select! {
                        r = &mut conn => {
                            if let Err(e) = r {
                                tracing::debug!(%addr, error = %e, "hbone upstream connection closed");
                            }
                        }
                        _ = keepalive => tracing::info!(%addr, "hbone upstream stopped answering PING; dropped"),
                    }
                })
                .await;
            if let Some(c) = weak.upgrade() {
                c.dead.store(true, Ordering::Release);
            }
        });
        tracing::debug!(%addr, identity = %key.identity, "hbone upstream connection opened");
        Ok(c)
    }

    /// Number of live connections (for tests and the admin endpoint).
    pub fn connection_count(&self) -> usize {
        self.entries
            .lock()
            .map(|e| {
                e.values()
                    .map(|v| v.conns.iter().filter(|c| !c.dead.load(Ordering::Acquire)).count())
                    .sum()
            })
            .unwrap_or(0)
    }
}

fn classify_tls_error(addr: SocketAddr, e: std::io::Error) -> HboneError {
    if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
        e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        let inner: &(dyn std::error::Error + 'static) = &*other.0;
        if let Some(PeerIdentityError::IdentityMismatch { expected, sans }) = inner.downcast_ref::<PeerIdentityError>()
        {
            return HboneError::IdentityMismatch {
                addr,
                source: Arc::new(PeerIdentityError::IdentityMismatch {
                    expected: expected.clone(),
                    sans: sans.clone(),
                }),
            };
        }
    }
    HboneError::Tls {
        addr,
        reason: e.to_string(),
    }
}
