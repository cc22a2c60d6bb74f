//! The source node's ztunnel, reduced to its outbound HBONE client (reference §1.2–1.4): mTLS with the
//! source workload's certificate, the server must prove the expected SPIFFE ID, HTTP/2 with ztunnel's
//! settings, and one CONNECT stream per tunneled connection carrying `baggage`, `forwarded` and
//! `traceparent` as ztunnel sends them.
//!
//! Connections are pooled like ztunnel's (up to 100 streams each, a new connection beyond that; a connection
//! that received GOAWAY takes no new streams). Tests that need control over the HTTP/2 connection (a bad and a
//! good stream on the same connection) take a [`HboneConnection`] of their own.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

use crate::hbone::{self, H2Io, MAX_STREAMS_PER_CONNECTION, TlsError};
use crate::net::accept_until;
use crate::pki::Leaf;

/// ztunnel's `CONNECTION_TIMEOUT` (TCP connect plus handshakes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    TlsConfig(#[from] TlsError),
    #[error("TCP connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP/2 handshake with {addr}: {source}")]
    H2Handshake { addr: SocketAddr, source: h2::Error },
    #[error("connecting to {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("{method} {authority}: {source}")]
    Stream {
        method: Method,
        authority: String,
        source: h2::Error,
    },
    #[error("{method} {authority} answered {status}")]
    Status {
        method: Method,
        authority: String,
        status: StatusCode,
        /// Boxed to keep the error small; it is rarely looked at.
        headers: Box<HeaderMap>,
    },
    #[error("cannot build a request for {authority:?}: {reason}")]
    BadRequest { authority: String, reason: String },
    #[error("binding a local listener: {0}")]
    Listen(io::Error),
}

impl SourceError {
    /// The HTTP status the peer answered the CONNECT with, when it did answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            SourceError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The RST_STREAM / GOAWAY reason, when the stream was refused at the HTTP/2 level.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            SourceError::Stream { source, .. } => source.reason(),
            _ => None,
        }
    }

    /// A stream the server never processed (GOAWAY below its id, or REFUSED_STREAM): safe to retry.
    fn is_unprocessed(&self) -> bool {
        matches!(self, SourceError::Stream { source, .. }
            if source.is_go_away() || source.reason() == Some(Reason::REFUSED_STREAM))
    }
}

#[derive(Debug, Clone)]
pub struct SourceZtunnelConfig {
    /// Where HBONE connections go (the waypoint's `ip:15008`, or a destination ztunnel).
    pub waypoint_addr: SocketAddr,
    /// The SPIFFE ID the server certificate must carry.
    pub waypoint_identity: String,
    /// The source workload's certificate.
    pub leaf: Leaf,
    pub root_pem: String,
    /// (namespace, pod name) of the source workload, for `baggage`.
    pub source_workload: (String, String),
    /// Source address of HBONE connections (the source pod IP); any loopback address when `None`.
    pub local_ip: Option<IpAddr>,
}

impl SourceZtunnelConfig {
    pub fn new(
        waypoint_addr: SocketAddr,
        waypoint_identity: impl Into<String>,
        leaf: Leaf,
        root_pem: &str,
    ) -> SourceZtunnelConfig {
        SourceZtunnelConfig {
            waypoint_addr,
            waypoint_identity: waypoint_identity.into(),
            leaf,
            root_pem: root_pem.to_string(),
            source_workload: ("default".into(), "client".into()),
            local_ip: None,
        }
    }
}

/// One CONNECT (or, to test refusals, any other method) to send.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub method: Method,
    /// `:authority`, e.g. `10.96.0.10:80`.
    pub authority: String,
    /// `;host=` of the `forwarded` header (the intended Service's FQDN), as ztunnel adds when known.
    pub forwarded_host: Option<String>,
    /// Added after (and in addition to) the ztunnel headers.
    pub extra_headers: HeaderMap,
    /// Send `baggage`, `forwarded` and `traceparent` like ztunnel (default true).
    pub ztunnel_headers: bool,
}

impl ConnectRequest {
    pub fn new(method: Method, authority: &str) -> ConnectRequest {
        ConnectRequest {
            method,
            authority: authority.to_string(),
            forwarded_host: None,
            extra_headers: HeaderMap::new(),
            ztunnel_headers: true,
        }
    }

    pub fn connect(authority: &str) -> ConnectRequest {
        ConnectRequest::new(Method::CONNECT, authority)
    }
}

/// A source ztunnel stand-in. Cheap to clone; the pool and listeners live until the last clone is dropped.
#[derive(Clone)]
pub struct SourceZtunnel {
    inner: Arc<Inner>,
    _stop: Arc<DropGuard>,
}

impl std::fmt::Debug for SourceZtunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceZtunnel")
            .field("waypoint", &self.inner.config.waypoint_addr)
            .field("identity", &self.inner.config.leaf.spiffe_id)
            .finish()
    }
}

struct Inner {
    config: SourceZtunnelConfig,
    tls: Arc<rustls::ClientConfig>,
    baggage: HeaderValue,
    /// A tokio mutex: held while a new connection is established so that concurrent callers share it.
    pool: tokio::sync::Mutex<Vec<HboneConnection>>,
    connections_opened: AtomicUsize,
    stop: CancellationToken,
}

impl SourceZtunnel {
    pub fn new(config: SourceZtunnelConfig) -> Result<SourceZtunnel, SourceError> {
        let tls = hbone::client_tls_config(&config.leaf, &config.root_pem, &config.waypoint_identity)?;
        let baggage = baggage(&config.source_workload.0, &config.source_workload.1)?;
        let stop = CancellationToken::new();
        let inner = Inner {
            config,
            tls,
            baggage,
            pool: tokio::sync::Mutex::new(Vec::new()),
            connections_opened: AtomicUsize::new(0),
            stop: stop.clone(),
        };
        Ok(SourceZtunnel {
            inner: Arc::new(inner),
            _stop: Arc::new(stop.drop_guard()),
        })
    }

    /// This client's SPIFFE ID.
    pub fn identity(&self) -> &str {
        &self.inner.config.leaf.spiffe_id
    }

    pub fn config(&self) -> &SourceZtunnelConfig {
        &self.inner.config
    }

    /// HBONE connections opened so far (pooled and dedicated).
    pub fn connections_opened(&self) -> usize {
        self.inner.connections_opened.load(Ordering::Relaxed)
    }

    /// A CONNECT to `authority` over a pooled connection; an error carries the status for non-200 answers.
    pub async fn connect(&self, authority: &str) -> Result<HboneStream, SourceError> {
        self.inner.connect_with(ConnectRequest::connect(authority)).await
    }

    pub async fn connect_with(&self, request: ConnectRequest) -> Result<HboneStream, SourceError> {
        self.inner.connect_with(request).await
    }

    /// A request with another method (e.g. GET, which a waypoint must refuse with 405).
    pub async fn connect_raw(&self, method: Method, authority: &str) -> Result<HboneStream, SourceError> {
        self.inner.connect_with(ConnectRequest::new(method, authority)).await
    }

    /// A new HBONE connection outside the pool, for tests that control which streams share it.
    pub async fn dedicated_connection(&self) -> Result<HboneConnection, SourceError> {
        self.inner.open_connection().await
    }

    /// Binds 127.0.0.1:0 and tunnels every accepted TCP connection through a CONNECT to `authority`, so
    /// ordinary clients (curl, hyper, load generators) reach a Service VIP through the waypoint.
    pub async fn listen(&self, authority: &str) -> Result<SocketAddr, SourceError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(SourceError::Listen)?;
        let addr = listener.local_addr().map_err(SourceError::Listen)?;
        tokio::spawn(listen_loop(
            listener,
            self.inner.clone(),
            ConnectRequest::connect(authority),
        ));
        Ok(addr)
    }
}

impl Inner {
    async fn connect_with(&self, request: ConnectRequest) -> Result<HboneStream, SourceError> {
        let (connection, slot) = self.pooled().await?;
        match connection.open(request.clone(), slot).await {
            // The waypoint went away (drain) between picking the connection and using it: one fresh try.
            Err(e) if e.is_unprocessed() => {
                connection.mark_closed();
                let (connection, slot) = self.pooled().await?;
                connection.open(request, slot).await
            }
            result => result,
        }
    }

    /// A pooled connection with a free stream slot, opening a new connection when none has one.
    async fn pooled(&self) -> Result<(HboneConnection, StreamSlot), SourceError> {
        let mut pool = self.pool.lock().await;
        pool.retain(|connection| !connection.is_closed());
        if let Some(connection) = pool.iter().find(|c| c.active_streams() < MAX_STREAMS_PER_CONNECTION) {
            return Ok((connection.clone(), connection.slot()));
        }
        let connection = self.open_connection().await?;
        pool.push(connection.clone());
        let slot = connection.slot();
        Ok((connection, slot))
    }

    async fn open_connection(&self) -> Result<HboneConnection, SourceError> {
        let addr = self.config.waypoint_addr;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, self.handshake())
            .await
            .map_err(|_| SourceError::Timeout { addr })??;
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        Ok(connection)
    }

    async fn handshake(&self) -> Result<HboneConnection, SourceError> {
        let addr = self.config.waypoint_addr;
        let tcp = self
            .tcp_connect()
            .await
            .map_err(|source| SourceError::Connect { addr, source })?;
        let local_addr = tcp
            .local_addr()
            .map_err(|source| SourceError::Connect { addr, source })?;
        let tls = hbone::tls_connect(self.tls.clone(), tcp)
            .await
            .map_err(|source| SourceError::Tls { addr, source })?;
        let (send, driver) = hbone::h2_client_builder()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| SourceError::H2Handshake { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let driver_closed = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                debug!(%addr, "HBONE client connection ended: {e}");
            }
            driver_closed.store(true, Ordering::Relaxed);
        });
        Ok(HboneConnection {
            send,
            local_addr,
            peer_addr: addr,
            baggage: self.baggage.clone(),
            active: Arc::new(AtomicUsize::new(0)),
            closed,
        })
    }

    async fn tcp_connect(&self) -> io::Result<TcpStream> {
        let addr = self.config.waypoint_addr;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.config.local_ip {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.set_nodelay(true)?;
        socket.connect(addr).await
    }
}

async fn listen_loop(listener: TcpListener, inner: Arc<Inner>, request: ConnectRequest) {
    let stop = inner.stop.clone();
    while let Some((mut downstream, peer)) = accept_until(&listener, &stop).await {
        let (inner, request, stop) = (inner.clone(), request.clone(), stop.clone());
        tokio::spawn(async move {
            let _ = downstream.set_nodelay(true);
            let tunnel = async {
                let mut upstream = inner.connect_with(request).await.map_err(io::Error::other)?;
                tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
            };
            tokio::select! {
                result = tunnel => if let Err(e) = result { debug!(%peer, "source ztunnel tunnel ended: {e}") },
                () = stop.cancelled() => {}
            }
        });
    }
}

/// One mTLS HTTP/2 connection to the waypoint. Clones share the connection.
#[derive(Clone)]
pub struct HboneConnection {
    send: h2::client::SendRequest<Bytes>,
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
    baggage: HeaderValue,
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for HboneConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneConnection")
            .field("local", &self.local_addr)
            .field("peer", &self.peer_addr)
            .field("active", &self.active_streams())
            .finish()
    }
}

impl HboneConnection {
    /// Source address of the TCP connection (what the waypoint sees as the client address).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// The connection ended or refused new streams (GOAWAY).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub async fn connect(&self, authority: &str) -> Result<HboneStream, SourceError> {
        self.open(ConnectRequest::connect(authority), self.slot()).await
    }

    pub async fn connect_with(&self, request: ConnectRequest) -> Result<HboneStream, SourceError> {
        self.open(request, self.slot()).await
    }

    fn mark_closed(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn slot(&self) -> StreamSlot {
        self.active.fetch_add(1, Ordering::Relaxed);
        StreamSlot(self.active.clone())
    }

    async fn open(&self, request: ConnectRequest, slot: StreamSlot) -> Result<HboneStream, SourceError> {
        let stream_error = |source: h2::Error| SourceError::Stream {
            method: request.method.clone(),
            authority: request.authority.clone(),
            source,
        };
        let http_request = self.build(&request)?;
        let mut send = self.send.clone().ready().await.map_err(|e| {
            if e.is_go_away() {
                self.mark_closed();
            }
            stream_error(e)
        })?;
        // Only CONNECT keeps the request side open; anything else is a complete request without body.
        let end_of_stream = request.method != Method::CONNECT;
        let (response, send_stream) = send.send_request(http_request, end_of_stream).map_err(stream_error)?;
        let response = response.await.map_err(stream_error)?;
        let (parts, body) = response.into_parts();
        if parts.status != StatusCode::OK {
            return Err(SourceError::Status {
                method: request.method,
                authority: request.authority,
                status: parts.status,
                headers: Box::new(parts.headers),
            });
        }
        Ok(HboneStream {
            io: H2Io::new(send_stream, body),
            response_headers: parts.headers,
            _slot: slot,
        })
    }

    fn build(&self, request: &ConnectRequest) -> Result<Request<()>, SourceError> {
        let bad = |reason: String| SourceError::BadRequest {
            authority: request.authority.clone(),
            reason,
        };
        let uri: Uri = if request.method == Method::CONNECT {
            request.authority.parse()
        } else {
            format!("http://{}/", request.authority).parse()
        }
        .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        let mut http_request = Request::builder()
            .method(request.method.clone())
            .uri(uri)
            .body(())
            .map_err(|e| bad(e.to_string()))?;
        let headers = http_request.headers_mut();
        if request.ztunnel_headers {
            headers.insert("baggage", self.baggage.clone());
            headers.insert(
                "forwarded",
                forwarded(self.local_addr, request.forwarded_host.as_deref()).map_err(bad)?,
            );
            headers.insert("traceparent", traceparent());
        }
        for (name, value) in &request.extra_headers {
            headers.append(name.clone(), value.clone());
        }
        Ok(http_request)
    }
}

/// Counts a stream against its connection's budget until dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An established tunnel: a byte stream to whatever is behind the authority.
pub struct HboneStream {
    io: H2Io,
    response_headers: HeaderMap,
    _slot: StreamSlot,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream").field("io", &self.io).finish()
    }
}

impl HboneStream {
    /// Headers of the 200 answer (ztunnel reads `baggage` from here).
    pub fn response_headers(&self) -> &HeaderMap {
        &self.response_headers
    }

    /// Aborts the tunnel with RST_STREAM instead of a clean close.
    pub fn reset(&mut self, reason: Reason) {
        self.io.reset(reason);
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// ztunnel's `baggage` for a Kubernetes pod (empty values are left out, as ztunnel does).
fn baggage(namespace: &str, pod: &str) -> Result<HeaderValue, SourceError> {
    let entries = [
        ("k8s.namespace.name", namespace),
        ("k8s.pod.name", pod),
        ("service.name", pod),
    ];
    let value = entries
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",");
    HeaderValue::from_str(&value).map_err(|e| SourceError::BadRequest {
        authority: String::new(),
        reason: format!("baggage: {e}"),
    })
}

/// `for="<ip:port>"[;host=<fqdn>]`.
fn forwarded(source: SocketAddr, host: Option<&str>) -> Result<HeaderValue, String> {
    let mut value = format!("for=\"{source}\"");
    if let Some(host) = host {
        value.push_str(";host=");
        value.push_str(host);
    }
    HeaderValue::from_str(&value).map_err(|e| format!("forwarded: {e}"))
}

/// A random W3C traceparent, not sampled: ztunnel uses it as a connection id, not for tracing.
fn traceparent() -> HeaderValue {
    let value = format!("00-{:032x}-{:016x}-00", fastrand::u128(1..), fastrand::u64(1..));
    HeaderValue::from_str(&value)
        .unwrap_or_else(|_| HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-00"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dest_ztunnel::{DestZtunnel, DestZtunnelConfig};
    use crate::echo::{EchoConfig, EchoFormat, EchoServer};
    use crate::net::unique_loopback_ip;
    use crate::pki::{KeyKind, TestCa};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn ztunnel_headers() {
        assert_eq!(
            baggage("ns2", "sleep").unwrap(),
            "k8s.namespace.name=ns2,k8s.pod.name=sleep,service.name=sleep"
        );
        let addr: SocketAddr = "127.1.2.3:4567".parse().unwrap();
        assert_eq!(forwarded(addr, None).unwrap(), "for=\"127.1.2.3:4567\"");
        assert_eq!(
            forwarded(addr, Some("echo.ns1.svc.cluster.local")).unwrap(),
            "for=\"127.1.2.3:4567\";host=echo.ns1.svc.cluster.local"
        );
        let tp = traceparent();
        let parts: Vec<&str> = tp.to_str().unwrap().split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
    }

    struct Setup {
        pod_ip: Ipv4Addr,
        source: SourceZtunnel,
        ztunnel: crate::dest_ztunnel::DestZtunnelHandle,
        _echo: crate::echo::EchoHandle,
    }

    /// Source stand-in → destination stand-in → text echo, no waypoint in between.
    async fn setup() -> Setup {
        let ca = TestCa::new("cluster.local");
        let pod_ip = unique_loopback_ip();
        let mut echo_config = EchoConfig::new(SocketAddr::new(pod_ip.into(), 8080));
        echo_config.format = EchoFormat::Text;
        echo_config.pod_name = "echo-v1-abc".into();
        let echo = EchoServer::start(echo_config).await.unwrap();
        let pod_leaf = ca.issue("ns1", "echo", KeyKind::EcdsaP256).unwrap();
        let ztunnel = DestZtunnel::start(DestZtunnelConfig::new(
            pod_ip,
            "cluster.local",
            pod_leaf.clone(),
            ca.root_pem(),
        ))
        .await
        .unwrap();
        let client_ip = unique_loopback_ip();
        let mut config = SourceZtunnelConfig::new(
            ztunnel.addr(),
            pod_leaf.spiffe_id,
            ca.issue("ns2", "sleep", KeyKind::EcdsaP256).unwrap(),
            ca.root_pem(),
        );
        config.local_ip = Some(client_ip.into());
        let source = SourceZtunnel::new(config).unwrap();
        Setup {
            pod_ip,
            source,
            ztunnel,
            _echo: echo,
        }
    }

    async fn http_get(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn source_reaches_echo_through_dest_ztunnel() {
        let setup = setup().await;
        let mut tunnel = setup.source.connect(&format!("{}:8080", setup.pod_ip)).await.unwrap();
        let response = http_get(&mut tunnel, "/hello").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("Hostname=echo-v1-abc"));
        assert!(response.contains("URL=/hello"));

        let record = &setup.ztunnel.connects()[0];
        assert_eq!(record.peer_addr.ip(), setup.source.config().local_ip.unwrap());
        assert_eq!(
            record.peer_identity.as_deref(),
            Some("spiffe://cluster.local/ns/ns2/sa/sleep")
        );
    }

    #[tokio::test]
    async fn pool_reuses_connections_up_to_the_stream_limit() {
        let setup = setup().await;
        let authority = format!("{}:8080", setup.pod_ip);
        let mut open = Vec::new();
        for _ in 0..MAX_STREAMS_PER_CONNECTION {
            open.push(setup.source.connect(&authority).await.unwrap());
        }
        assert_eq!(setup.source.connections_opened(), 1);
        open.push(setup.source.connect(&authority).await.unwrap());
        assert_eq!(setup.source.connections_opened(), 2);
        open.clear();
        setup.source.connect(&authority).await.unwrap();
        assert_eq!(setup.source.connections_opened(), 2);
        assert_eq!(setup.ztunnel.tls_handshakes(), 2);
    }

    #[tokio::test]
    async fn listen_tunnels_plain_tcp_clients() {
        let setup = setup().await;
        let addr = setup.source.listen(&format!("{}:8080", setup.pod_ip)).await.unwrap();
        for path in ["/a", "/b"] {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let response = http_get(&mut tcp, path).await;
            assert!(response.contains(&format!("URL={path}")), "{response}");
        }
        assert_eq!(setup.ztunnel.connects().len(), 2);
    }

    #[tokio::test]
    async fn wrong_server_identity_fails_the_handshake() {
        let setup = setup().await;
        let mut config = setup.source.config().clone();
        config.waypoint_identity = "spiffe://cluster.local/ns/istio-system/sa/waypoint".into();
        let source = SourceZtunnel::new(config).unwrap();
        let err = source.connect(&format!("{}:8080", setup.pod_ip)).await.unwrap_err();
        assert!(matches!(err, SourceError::Tls { .. }), "{err}");
    }
}
