//! The destination node's ztunnel, reduced to what a waypoint talks to (reference §1.6): it terminates
//! HBONE on `podIP:15008` with the pod's certificate and forwards each CONNECT stream to `podIP:port`.
//!
//! Phases per stream, as in ztunnel's inbound path, all before the 200: method must be CONNECT, the
//! authority must be `ip:port`, the IP must be the pod's own (ztunnel's `IPMismatch`), and the TCP connect
//! must succeed (else 503). Every stream is recorded so tests can assert what the waypoint sent and as whom.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

use crate::hbone::{self, H2Io, TlsError};
use crate::net::accept_until;
use crate::pki::Leaf;

/// ztunnel's `CONNECTION_TIMEOUT`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DestZtunnelError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

#[derive(Debug, Clone)]
pub struct DestZtunnelConfig {
    pub pod_ip: Ipv4Addr,
    /// 15008 in a cluster; 0 picks a free port.
    pub hbone_port: u16,
    pub trust_domain: String,
    /// The pod's own identity.
    pub leaf: Leaf,
    pub root_pem: String,
}

impl DestZtunnelConfig {
    pub fn new(pod_ip: Ipv4Addr, trust_domain: &str, leaf: Leaf, root_pem: &str) -> DestZtunnelConfig {
        DestZtunnelConfig {
            pod_ip,
            hbone_port: 15008,
            trust_domain: trust_domain.to_string(),
            leaf,
            root_pem: root_pem.to_string(),
        }
    }
}

/// One CONNECT stream as the destination ztunnel saw it.
#[derive(Debug, Clone)]
pub struct ConnectRecord {
    /// SPIFFE ID of the client certificate (the waypoint's identity when the waypoint is the client).
    pub peer_identity: Option<String>,
    /// TCP source of the HBONE connection.
    pub peer_addr: SocketAddr,
    pub method: Method,
    /// `:authority` as received.
    pub authority: String,
    pub headers: HeaderMap,
    /// What we answered.
    pub status: StatusCode,
}

struct Shared {
    pod_ip: Ipv4Addr,
    acceptor: TlsAcceptor,
    connects: watch::Sender<Vec<ConnectRecord>>,
    tls: watch::Sender<TlsCounts>,
}

/// TLS handshakes on the HBONE port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsCounts {
    pub accepted: usize,
    /// No or untrusted client certificate, foreign trust domain, not TLS at all ...
    pub failed: usize,
}

pub struct DestZtunnel;

impl DestZtunnel {
    pub async fn start(config: DestZtunnelConfig) -> Result<DestZtunnelHandle, DestZtunnelError> {
        let tls = hbone::server_tls_config(&config.leaf, &config.root_pem, &config.trust_domain)?;
        let bind = SocketAddr::new(IpAddr::V4(config.pod_ip), config.hbone_port);
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| DestZtunnelError::Bind { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| DestZtunnelError::Bind { addr: bind, source })?;
        let shared = Arc::new(Shared {
            pod_ip: config.pod_ip,
            acceptor: TlsAcceptor::from(tls),
            connects: watch::Sender::new(Vec::new()),
            tls: watch::Sender::new(TlsCounts::default()),
        });
        let token = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), token.clone()));
        Ok(DestZtunnelHandle {
            addr,
            shared,
            _stop: token.drop_guard(),
        })
    }
}

/// A running destination ztunnel; dropping it closes the listener and every tunnel.
pub struct DestZtunnelHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl std::fmt::Debug for DestZtunnelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestZtunnelHandle").field("addr", &self.addr).finish()
    }
}

impl DestZtunnelHandle {
    /// `podIP:15008`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connects(&self) -> Vec<ConnectRecord> {
        self.shared.connects.borrow().clone()
    }

    /// Resolves once at least `n` CONNECT streams were answered, with all records so far.
    pub async fn wait_for_connects(&self, n: usize) -> Vec<ConnectRecord> {
        let mut connects = self.shared.connects.subscribe();
        // The sender lives in `self`: the channel cannot close while we wait.
        let records = connects.wait_for(|records| records.len() >= n).await;
        records.map(|records| records.clone()).unwrap_or_default()
    }

    /// TLS handshakes that succeeded (one per HBONE connection).
    pub fn tls_handshakes(&self) -> usize {
        self.shared.tls.borrow().accepted
    }

    /// TLS handshakes that failed.
    pub fn tls_handshake_failures(&self) -> usize {
        self.shared.tls.borrow().failed
    }

    /// Resolves once the counts satisfy `done` (the server counts a failure only after the client may
    /// already have seen it, so tests wait instead of reading the counter right away).
    pub async fn wait_for_tls(&self, done: impl FnMut(&TlsCounts) -> bool) -> TlsCounts {
        let mut tls = self.shared.tls.subscribe();
        let counts = tls.wait_for(done).await.map(|counts| *counts);
        counts.unwrap_or_default()
    }

    pub fn shutdown(self) {}
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    while let Some((tcp, peer)) = accept_until(&listener, &token).await {
        let (shared, token) = (shared.clone(), token.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = serve_connection(tcp, peer, shared, token.clone()) => {}
                () = token.cancelled() => {}
            }
        });
    }
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, token: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let tls = match shared.acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            shared.tls.send_modify(|counts| counts.failed += 1);
            debug!(%peer, "dest ztunnel TLS handshake failed: {e}");
            return;
        }
    };
    shared.tls.send_modify(|counts| counts.accepted += 1);
    let identity = hbone::peer_identity(tls.get_ref().1.peer_certificates());
    let mut connection = match hbone::h2_server_builder().handshake::<_, Bytes>(tls).await {
        Ok(connection) => connection,
        Err(e) => return debug!(%peer, "dest ztunnel h2 handshake failed: {e}"),
    };
    while let Some(accepted) = connection.accept().await {
        match accepted {
            Ok((request, respond)) => {
                let stream = Stream {
                    shared: shared.clone(),
                    peer,
                    identity: identity.clone(),
                };
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = stream.serve(request, respond) => {}
                        () = token.cancelled() => {}
                    }
                });
            }
            Err(e) => return debug!(%peer, "dest ztunnel h2 connection ended: {e}"),
        }
    }
}

/// One CONNECT stream on an accepted connection.
struct Stream {
    shared: Arc<Shared>,
    peer: SocketAddr,
    identity: Option<String>,
}

impl Stream {
    async fn serve(self, request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let decision = self.decide(&request).await;
        let status = decision.as_ref().err().copied().unwrap_or(StatusCode::OK);
        self.record(&request, status);
        let mut upstream = match decision {
            Ok(upstream) => upstream,
            Err(status) => {
                let _ = respond.send_response(response(status), true);
                return;
            }
        };
        let send = match respond.send_response(response(StatusCode::OK), false) {
            Ok(send) => send,
            Err(e) => return debug!("dest ztunnel: stream gone before 200: {e}"),
        };
        let mut tunnel = H2Io::new(send, request.into_body());
        if let Err(e) = tokio::io::copy_bidirectional(&mut tunnel, &mut upstream).await {
            debug!(peer = %self.peer, "dest ztunnel tunnel ended: {e}");
        }
    }

    /// The phases before the 200; each failure is the status ztunnel answers.
    async fn decide(&self, request: &Request<RecvStream>) -> Result<TcpStream, StatusCode> {
        if request.method() != Method::CONNECT {
            return Err(StatusCode::BAD_REQUEST);
        }
        let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let target: SocketAddr = authority.parse().map_err(|_| StatusCode::BAD_REQUEST)?;
        if target.ip() != IpAddr::V4(self.shared.pod_ip) {
            debug!(%target, pod_ip = %self.shared.pod_ip, "dest ztunnel: IP mismatch");
            return Err(StatusCode::BAD_REQUEST);
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                Ok(upstream)
            }
            Ok(Err(e)) => {
                debug!(%target, "dest ztunnel: upstream connect failed: {e}");
                Err(StatusCode::SERVICE_UNAVAILABLE)
            }
            Err(_) => Err(StatusCode::SERVICE_UNAVAILABLE),
        }
    }

    fn record(&self, request: &Request<RecvStream>, status: StatusCode) {
        let record = ConnectRecord {
            peer_identity: self.identity.clone(),
            peer_addr: self.peer,
            method: request.method().clone(),
            authority: request.uri().authority().map(|a| a.to_string()).unwrap_or_default(),
            headers: request.headers().clone(),
            status,
        };
        self.shared.connects.send_modify(|records| records.push(record));
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::{EchoConfig, EchoServer, TcpEcho};
    use crate::net::unique_loopback_ip;
    use crate::pki::{KeyKind, TestCa};
    use crate::source_ztunnel::{SourceError, SourceZtunnel, SourceZtunnelConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pod {
        ca: TestCa,
        ip: Ipv4Addr,
        ztunnel: DestZtunnelHandle,
    }

    async fn pod() -> Pod {
        let ca = TestCa::new("cluster.local");
        let ip = unique_loopback_ip();
        let leaf = ca.issue("ns1", "echo", KeyKind::EcdsaP256).unwrap();
        let ztunnel = DestZtunnel::start(DestZtunnelConfig::new(ip, "cluster.local", leaf, ca.root_pem()))
            .await
            .unwrap();
        Pod { ca, ip, ztunnel }
    }

    /// A source ztunnel stand-in dialing the pod's ztunnel directly (no waypoint).
    fn client(pod: &Pod, leaf: crate::pki::Leaf) -> SourceZtunnel {
        let mut config = SourceZtunnelConfig::new(
            pod.ztunnel.addr(),
            pod.ca.spiffe_id("ns1", "echo"),
            leaf,
            pod.ca.root_pem(),
        );
        config.source_workload = ("ns2".into(), "sleep-7f9c".into());
        SourceZtunnel::new(config).unwrap()
    }

    #[tokio::test]
    async fn forwards_to_the_pod_and_records_the_stream() {
        let pod = pod().await;
        let echo = TcpEcho::start(SocketAddr::new(pod.ip.into(), 9000)).await.unwrap();
        let leaf = pod.ca.issue("ns2", "sleep", KeyKind::Rsa2048).unwrap();
        let source = client(&pod, leaf);
        let mut tunnel = source.connect(&format!("{}:9000", pod.ip)).await.unwrap();
        tunnel.write_all(b"ping").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut out = String::new();
        tunnel.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "pingbytes=4\n");
        assert_eq!(echo.connections(), 1);

        let records = pod.ztunnel.connects();
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(record.status, StatusCode::OK);
        assert_eq!(record.method, Method::CONNECT);
        assert_eq!(record.authority, format!("{}:9000", pod.ip));
        assert_eq!(
            record.peer_identity.as_deref(),
            Some("spiffe://cluster.local/ns/ns2/sa/sleep")
        );
        let baggage = record.headers["baggage"].to_str().unwrap();
        assert!(baggage.contains("k8s.namespace.name=ns2"), "{baggage}");
        assert!(record.headers["forwarded"].to_str().unwrap().starts_with("for=\""));
        assert_eq!(record.headers["traceparent"].len(), 55);
        assert_eq!(pod.ztunnel.tls_handshakes(), 1);
    }

    #[tokio::test]
    async fn rejects_wrong_authority_method_and_closed_ports() {
        let pod = pod().await;
        let _echo = EchoServer::start(EchoConfig::new(SocketAddr::new(pod.ip.into(), 8080)))
            .await
            .unwrap();
        let leaf = pod.ca.issue("ns2", "sleep", KeyKind::EcdsaP256).unwrap();
        let source = client(&pod, leaf);
        let connection = source.dedicated_connection().await.unwrap();

        let status_of = |result: Result<_, SourceError>| match result {
            Err(SourceError::Status { status, .. }) => status,
            Ok(_) => StatusCode::OK,
            Err(e) => panic!("unexpected error {e}"),
        };
        // Another pod's IP (ztunnel's IPMismatch), a hostname, a port nobody listens on, a GET.
        let other_ip = unique_loopback_ip();
        assert_eq!(
            status_of(connection.connect(&format!("{other_ip}:8080")).await),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status_of(connection.connect("echo.ns1:8080").await),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status_of(connection.connect(&format!("{}:1", pod.ip)).await),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let get = connection.connect_with(crate::source_ztunnel::ConnectRequest::new(
            Method::GET,
            &format!("{}:8080", pod.ip),
        ));
        assert_eq!(status_of(get.await), StatusCode::BAD_REQUEST);
        // The same HTTP/2 connection still carries a good stream afterwards.
        assert_eq!(
            status_of(connection.connect(&format!("{}:8080", pod.ip)).await),
            StatusCode::OK
        );

        let statuses: Vec<u16> = pod
            .ztunnel
            .wait_for_connects(5)
            .await
            .iter()
            .map(|r| r.status.as_u16())
            .collect();
        assert_eq!(statuses, vec![400, 400, 503, 400, 200]);
        assert_eq!(pod.ztunnel.tls_handshakes(), 1);
    }

    #[tokio::test]
    async fn refuses_clients_without_a_mesh_certificate() {
        let pod = pod().await;
        let tcp = TcpStream::connect(pod.ztunnel.addr()).await.unwrap();
        let anonymous =
            hbone::anonymous_client_tls_config(pod.ca.root_pem(), &pod.ca.spiffe_id("ns1", "echo")).unwrap();
        // TLS 1.3: the client finishes its side first; the server's rejection shows on the first read.
        let result = async {
            let mut tls = hbone::tls_connect(anonymous, tcp).await?;
            tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
            let mut buf = [0u8; 1];
            tls.read(&mut buf).await
        }
        .await;
        assert!(result.is_err(), "{result:?}");

        // A certificate from another mesh's root.
        let stranger = TestCa::new("cluster.local")
            .issue("ns2", "sleep", KeyKind::EcdsaP256)
            .unwrap();
        let source = client(&pod, stranger);
        assert!(source.connect(&format!("{}:8080", pod.ip)).await.is_err());

        let counts = pod.ztunnel.wait_for_tls(|counts| counts.failed >= 2).await;
        assert_eq!(counts, TlsCounts { accepted: 0, failed: 2 });
        assert!(pod.ztunnel.connects().is_empty());
    }
}
