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
    /// and drops state nothing uses any more. Returns whether requests need a [`cluster::ClientAddr`] (a
    /// backend hashes on the client address).
    pub fn prepare(&self, snapshot: &Snapshot) -> bool {
        self.registry.prepare(snapshot)
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

/// What tests of the upstream side share: an [`Upstream`] (its HBONE pool gets a throwaway self-signed
/// identity; the tests reach endpoints over plain TCP) and tiny HTTP endpoints on loopback.
#[cfg(test)]
pub(crate) mod test_support {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    use super::Upstream;
    use super::http_pool::Body;
    use crate::config::policy::{Locality, TrafficPolicy};
    use crate::config::{Backend, Endpoint, PortProtocol, TlsPaths};
    use crate::identity::SpiffeId;
    use crate::tls::reload::TlsStore;

    pub fn upstream() -> Arc<Upstream> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "waypoint-upstream-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/infra/sa/waypoint".try_into().unwrap(),
        )];
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let paths = TlsPaths {
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            roots_file: dir.join("roots.pem"),
        };
        std::fs::write(&paths.cert_file, cert.pem()).unwrap();
        std::fs::write(&paths.roots_file, cert.pem()).unwrap();
        std::fs::write(&paths.key_file, key.serialize_pem()).unwrap();
        let tls = TlsStore::load(paths, "cluster.local".into()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Upstream::new(tls)
    }

    /// A fresh loopback address per call (127.0.7.x, 127.0.8.x, …), so tests do not share endpoints.
    pub fn next_ip() -> std::net::IpAddr {
        static N: AtomicU16 = AtomicU16::new(7 * 256);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::net::Ipv4Addr::new(127, 0, (n >> 8) as u8, (n & 0xff).max(1) as u8).into()
    }

    pub fn endpoint(addr: SocketAddr) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr,
            hbone: None,
            identity: SpiffeId::new("cluster.local", "ns", "sa"),
            workload: format!("pod-{addr}").into(),
            namespace: "ns".into(),
            labels: Default::default(),
            locality: Locality::default(),
        })
    }

    pub fn backend(name: &str, protocol: PortProtocol, eps: &[SocketAddr], policy: TrafficPolicy) -> Backend {
        let mut b = Backend::new(
            name.into(),
            "ns".into(),
            80,
            protocol,
            eps.iter().map(|a| endpoint(*a)).collect(),
        );
        b.policy = Arc::new(policy);
        b
    }

    /// A test endpoint: answers every request with `status` and a body naming itself, once `gate` lets it
    /// (a semaphore with plenty of permits answers at once); counts connections and requests.
    pub struct Server {
        pub addr: SocketAddr,
        pub connections: Arc<AtomicUsize>,
        pub requests: Arc<AtomicUsize>,
        pub gate: Arc<Semaphore>,
        pub status: Arc<std::sync::atomic::AtomicU16>,
        /// Connections closed so far, and a signal on each close.
        pub closed: Arc<AtomicUsize>,
        pub on_close: Arc<tokio::sync::Notify>,
    }

    impl Server {
        /// Waits until at least `n` connections have closed.
        pub async fn closed_at_least(&self, n: usize) {
            loop {
                let notified = self.on_close.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.closed.load(Ordering::SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        }
    }

    pub async fn server(h2: bool) -> Server {
        let listener = TcpListener::bind((next_ip(), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let closed = Arc::new(AtomicUsize::new(0));
        let on_close = Arc::new(tokio::sync::Notify::new());
        let s = Server {
            addr,
            connections: connections.clone(),
            requests: requests.clone(),
            gate: gate.clone(),
            status: status.clone(),
            closed: closed.clone(),
            on_close: on_close.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                connections.fetch_add(1, Ordering::SeqCst);
                let (requests, gate, status) = (requests.clone(), gate.clone(), status.clone());
                let (closed, on_close) = (closed.clone(), on_close.clone());
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let (requests, gate, status) = (requests.clone(), gate.clone(), status.clone());
                    async move {
                        requests.fetch_add(1, Ordering::SeqCst);
                        gate.acquire().await.unwrap().forget();
                        let mut r = Response::new(Full::new(Bytes::from(addr.to_string())));
                        *r.status_mut() = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                tokio::spawn(async move {
                    let io = TokioIo::new(tcp);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                    on_close.notify_waiters();
                });
            }
        });
        s
    }

    pub fn get(path: &str) -> Request<Body> {
        Request::builder()
            .uri(path)
            .header("host", "svc")
            .body(Full::new(Bytes::new()).map_err(|never| match never {}).boxed())
            .unwrap()
    }

    pub async fn body(resp: Response<Body>) -> String {
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;
    use std::time::Duration;

    use super::test_support::{endpoint, next_ip, upstream};
    use crate::proxy::error::ProxyError;

    /// A listener that never accepts and whose accept queue is full: the kernel drops further SYNs, so a connect
    /// to it hangs until the caller gives up (the listener and the queued connections must stay alive for that).
    fn black_hole() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::new(next_ip(), 0).into()).unwrap();
        sock.listen(0).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        // Fill the queue: the first connect that cannot complete shows it is full.
        for _ in 0..64 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => queued.push(s),
                Err(_) => break,
            }
        }
        assert!(!queued.is_empty(), "the queue admitted at least one connection");
        (sock, queued, addr)
    }

    #[tokio::test]
    async fn connect_timeout_bounds_tcp_and_hbone_connects_that_never_complete() {
        let up = upstream();
        let (_hole, _queued, addr) = black_hole();

        let plain = endpoint(addr);
        let r = up.connect_with(&plain, Some(Duration::from_millis(300))).await;
        assert!(
            matches!(&r, Err(ProxyError::UpstreamConnect(m)) if m.contains("timed out")),
            "plain TCP: {:?}",
            r.err()
        );

        // Through HBONE the timeout bounds the whole tunnel setup, starting with the TCP connect to ztunnel.
        let mut hbone = (*endpoint(SocketAddr::new(addr.ip(), 8080))).clone();
        hbone.hbone = Some(addr);
        let r = up.connect_with(&hbone, Some(Duration::from_millis(300))).await;
        assert!(
            matches!(&r, Err(ProxyError::UpstreamConnect(m)) if m.contains("timed out")),
            "HBONE: {:?}",
            r.err()
        );
    }
}
