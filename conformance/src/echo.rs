//! Echo backends that report what reached them, in the two formats of `conformance/ECHO-FORMAT.md`: the
//! Gateway API echo-basic JSON and the Istio echo `Key=value` text.
//!
//! One port serves HTTP/1.1 (keep-alive) and h2c prior knowledge. Besides the upstream behaviour
//! (`?delay=`, `/retry/...`, `/status/NNN`, `/health`, `X-Echo-Set-Header`) the server has what proxy tests
//! need: request bodies are counted while streamed (`bodyBytes` / `BodyBytes=`), `/bytes/<n>` streams n
//! bytes of a fixed pattern and JSON echoes say whether the request body was that pattern
//! (`bodyMatchesPattern`), so bulk data can be checked byte for byte end to end, and gRPC-looking requests get
//! a gRPC-framed echo with trailers. `/ws` is echo-basic's WebSocket endpoint: it upgrades and echoes every
//! frame.
//!
//! An echoed request is logged like echo-basic does (`Echoing back request made to ...`); tests read the log
//! through the handle, and can wait for a line instead of sleeping.
//!
//! Traffic-policy tests make a backend misbehave on demand ([`EchoHandle::misbehave`], or per request with
//! `?misbehave=` / `X-Echo-Misbehave`, see [`crate::misbehave`]) and read back every exchange it saw
//! ([`EchoHandle::exchanges`]), the connections it accepted, and the requests in flight or cancelled.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use crate::misbehave::{Controls, InFlight, OpenConnection};
pub use crate::misbehave::{Exchange, MISBEHAVE_HEADER, Misbehaviour};
use crate::net::accept_until;

/// Bytes a `CloseAfterHeaders` response announces, and the few it actually sends.
const TRUNCATED_LENGTH: usize = 1024;
const TRUNCATED_SENT: &[u8] = b"truncated:";
const TRUNCATE_PAUSE: Duration = Duration::from_millis(20);
/// Pause before retrying a failed re-bind after `RefuseConnections` ends.
const REBIND_PAUSE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Why a request ends without a response.
#[derive(Debug, thiserror::Error)]
enum Abort {
    #[error("simulated failure: connection reset")]
    Reset,
    #[error("simulated failure: {0:?}")]
    Misbehaved(Misbehaviour),
    #[error("reading the request body: {0}")]
    Body(#[from] hyper::Error),
}

/// Which echo server to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EchoFormat {
    /// Gateway API echo-basic: one pretty JSON object.
    #[default]
    Json,
    /// Istio echo (the mesh profile's echo-advanced): `Key=value` lines.
    Text,
}

#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// Pod IP and container port to listen on.
    pub addr: SocketAddr,
    pub pod_name: String,
    pub namespace: String,
    /// `ServiceVersion=` of the text format (the pod's `version` label).
    pub service_version: String,
    pub format: EchoFormat,
    /// Answer anything but HTTP/2 with `400 Expected h2c request` (echo-basic's H2C listener).
    pub h2c_only: bool,
}

impl EchoConfig {
    pub fn new(addr: SocketAddr) -> EchoConfig {
        EchoConfig {
            addr,
            pod_name: "echo".into(),
            namespace: "default".into(),
            service_version: "v1".into(),
            format: EchoFormat::Json,
            h2c_only: false,
        }
    }
}

/// State shared by every connection of one echo server.
struct Shared {
    config: EchoConfig,
    log: watch::Sender<Vec<String>>,
    controls: Controls,
    /// `/retry` attempts per uuid.
    attempts: Mutex<HashMap<String, u32>>,
}

impl Shared {
    fn log_echo(&self, request_uri: &str, remote: SocketAddr) {
        let line = format!("Echoing back request made to {request_uri} to client ({remote})");
        debug!(pod = %self.config.pod_name, "{line}");
        self.log.send_modify(|lines| lines.push(line));
    }

    fn next_attempt(&self, uuid: &str) -> u32 {
        let mut attempts = self.attempts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = attempts.entry(uuid.to_string()).or_insert(0);
        *n += 1;
        *n
    }
}

pub struct EchoServer;

impl EchoServer {
    pub async fn start(config: EchoConfig) -> Result<EchoHandle, EchoError> {
        let listener = TcpListener::bind(config.addr).await.map_err(|source| EchoError::Bind {
            addr: config.addr,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| EchoError::Bind {
            addr: config.addr,
            source,
        })?;
        let shared = Arc::new(Shared {
            config: EchoConfig { addr, ..config },
            log: watch::Sender::new(Vec::new()),
            controls: Controls::new(),
            attempts: Mutex::new(HashMap::new()),
        });
        let token = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), token.clone()));
        Ok(EchoHandle {
            addr,
            shared,
            _stop: token.drop_guard(),
        })
    }
}

/// A running echo server; dropping it closes the listener and every connection.
pub struct EchoHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl std::fmt::Debug for EchoHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoHandle")
            .field("addr", &self.addr)
            .field("pod", &self.shared.config.pod_name)
            .finish()
    }
}

impl EchoHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &EchoConfig {
        &self.shared.config
    }

    /// One `Echoing back request made to <RequestURI> to client (<remote>)` line per echoed request.
    pub fn log_lines(&self) -> Vec<String> {
        self.shared.log.borrow().clone()
    }

    /// Requests received (echoed or not), counted when their headers arrive.
    pub fn requests_seen(&self) -> usize {
        *self.shared.controls.received().borrow()
    }

    /// Every request received so far (the most recent 10 000), in arrival order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared.controls.exchanges()
    }

    /// TCP connections accepted so far (dropped ones included).
    pub fn connections_accepted(&self) -> usize {
        *self.shared.controls.connections().borrow()
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        *self.shared.controls.open_connections().borrow()
    }

    /// Resolves once at most `n` connections are open (e.g. after a proxy closed its idle ones).
    pub async fn wait_for_open_connections_at_most(&self, n: usize) {
        let mut open = self.shared.controls.open_connections().subscribe();
        let _ = open.wait_for(|count| *count <= n).await;
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> usize {
        *self.shared.controls.in_flight().borrow()
    }

    /// Requests whose peer went away before the answer was complete (a hanging or delayed request that the
    /// proxy cancelled).
    pub fn cancelled(&self) -> usize {
        *self.shared.controls.cancelled().borrow()
    }

    /// Misbehave from now on, until [`EchoHandle::behave`]. `RefuseConnections` returns once the listening
    /// socket is closed.
    pub async fn misbehave(&self, what: Misbehaviour) {
        self.arm(what, None).await;
    }

    /// Misbehave for the next `times` requests (connections, for `DropConnections`), then behave again.
    /// `RefuseConnections` cannot be counted (refused connects never reach us): it lasts until `behave`.
    pub async fn misbehave_times(&self, what: Misbehaviour, times: usize) {
        self.arm(what, Some(times)).await;
    }

    async fn arm(&self, what: Misbehaviour, times: Option<usize>) {
        let refuse = what == Misbehaviour::RefuseConnections;
        self.shared.controls.arm(what, times);
        if refuse {
            self.wait_listening(false).await;
        }
    }

    /// Back to normal; returns once the server accepts connections again.
    pub async fn behave(&self) {
        self.shared.controls.clear();
        self.wait_listening(true).await;
    }

    async fn wait_listening(&self, listening: bool) {
        let mut state = self.shared.controls.listening.subscribe();
        let _ = state.wait_for(|l| *l == listening).await;
    }

    /// Resolves once at least `n` requests are being handled at the same time.
    pub async fn wait_for_in_flight(&self, n: usize) {
        let mut in_flight = self.shared.controls.in_flight().subscribe();
        let _ = in_flight.wait_for(|count| *count >= n).await;
    }

    /// Resolves once at least `n` exchanges were cancelled by the peer.
    pub async fn wait_for_cancelled(&self, n: usize) {
        let mut cancelled = self.shared.controls.cancelled().subscribe();
        let _ = cancelled.wait_for(|count| *count >= n).await;
    }

    /// Resolves once a log line contains `needle` (e.g. a mirror test's unique query parameter).
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let mut log = self.shared.log.subscribe();
        let found = log
            .wait_for(|lines| lines.iter().any(|line| line.contains(needle)))
            .await;
        // The sender lives in `self`, so the channel cannot close while we wait.
        found
            .ok()
            .and_then(|lines| lines.iter().find(|line| line.contains(needle)).cloned())
            .unwrap_or_default()
    }

    /// Resolves once at least `n` requests were received.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut seen = self.shared.controls.received().subscribe();
        let _ = seen.wait_for(|count| *count >= n).await;
    }

    pub fn shutdown(self) {}
}

/// Accepts until stopped. While connections are to be refused the listening socket is closed (the kernel
/// answers connects with RST), then bound again on the same address.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    let mut listener = Some(listener);
    let mut refuse = shared.controls.refuse.subscribe();
    loop {
        if *refuse.borrow_and_update() {
            drop(listener.take());
            shared.controls.listening.send_replace(false);
            tokio::select! {
                changed = refuse.changed() => if changed.is_err() { return },
                () = token.cancelled() => return,
            }
            continue;
        }
        let current = match &listener {
            Some(current) => current,
            None => match TcpListener::bind(shared.config.addr).await {
                Ok(bound) => {
                    shared.controls.listening.send_replace(true);
                    listener.insert(bound)
                }
                Err(e) => {
                    warn!(addr = %shared.config.addr, "echo: binding again after refusing connections: {e}");
                    tokio::time::sleep(REBIND_PAUSE).await;
                    continue;
                }
            },
        };
        tokio::select! {
            accepted = accept_until(current, &token) => {
                let Some((stream, remote)) = accepted else { return };
                let (id, drop_it) = shared.controls.accept_connection();
                if drop_it {
                    // RST instead of FIN: the peer sees a reset, not an orderly close.
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, remote, id, shared.clone(), token.clone()));
            }
            _ = refuse.changed() => {}
        }
    }
}

/// Per-connection request context.
struct Conn {
    shared: Arc<Shared>,
    remote: SocketAddr,
    /// Accept order of this connection, for [`Exchange::connection`].
    id: usize,
    /// Set when a request asks for the connection to be reset rather than answered.
    reset: Arc<AtomicBool>,
    /// The server's stop signal, for work that outlives the request (an upgraded WebSocket).
    stop: CancellationToken,
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    id: usize,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let counted = shared.clone();
    let _open = OpenConnection::start(&counted.controls);
    let reset = Arc::new(AtomicBool::new(false));
    let io = ResettableStream {
        inner: stream,
        reset: reset.clone(),
    };
    let conn = Arc::new(Conn {
        shared,
        remote,
        id,
        reset,
        stop: token.clone(),
    });
    let service = service_fn(move |request| {
        let conn = conn.clone();
        async move { conn.handle(request).await }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::select! {
        result = connection => if let Err(e) = result { debug!(%remote, "echo connection ended: {e}") },
        () = token.cancelled() => {}
    }
}

/// A TCP stream that closes with RST instead of FIN when asked to, which is how echo-basic's `/retry`
/// simulates a crashing backend.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Bodies can fail on purpose (a truncated response), hence a real error type.
type EchoBody = BoxBody<Bytes, io::Error>;

/// What is known about a request once its body has been read.
struct Received {
    parts: http::request::Parts,
    body_bytes: u64,
    /// Whether the body, byte for byte, is [`PATTERN`] from offset 0 (an empty body is).
    body_is_pattern: bool,
    trailers: Option<HeaderMap>,
}

impl Conn {
    async fn handle(&self, request: Request<Incoming>) -> Result<Response<EchoBody>, Abort> {
        let misbehaviour = requested_misbehaviour(&request).or_else(|| self.shared.controls.take_for_request());
        self.shared.controls.record(Exchange {
            seq: 0,
            connection: self.id,
            remote: self.remote,
            version: request.version(),
            method: request.method().clone(),
            uri: request_uri_of(&request),
            headers: request.headers().clone(),
            misbehaviour: misbehaviour.clone(),
        });
        let in_flight = InFlight::start(&self.shared.controls);
        let result = self.answer(request, misbehaviour).await;
        in_flight.finish();
        result
    }

    async fn answer(
        &self,
        request: Request<Incoming>,
        misbehaviour: Option<Misbehaviour>,
    ) -> Result<Response<EchoBody>, Abort> {
        match misbehaviour {
            None | Some(Misbehaviour::RefuseConnections | Misbehaviour::DropConnections) => {}
            Some(Misbehaviour::Delay(delay)) => tokio::time::sleep(delay).await,
            Some(Misbehaviour::Hang) => std::future::pending::<()>().await,
            Some(what) => {
                let received = receive(request).await?;
                return match what {
                    Misbehaviour::Status(code) => Ok(empty_response(
                        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    )),
                    Misbehaviour::CloseAfterHeaders => Ok(truncated_response()),
                    _ => {
                        // HTTP/1: the connection closes with RST. HTTP/2: hyper resets just this stream.
                        if received.parts.version != Version::HTTP_2 {
                            self.reset.store(true, Ordering::Relaxed);
                        }
                        Err(Abort::Misbehaved(what))
                    }
                };
            }
        }
        if self.shared.config.h2c_only && request.version() != Version::HTTP_2 {
            return Ok(text_response(StatusCode::BAD_REQUEST, "Expected h2c request\n"));
        }
        if request.uri().path() == "/ws" {
            return Ok(self.websocket(request));
        }
        let received = receive(request).await?;
        let path = received.parts.uri.path().to_string();
        if path == "/health" {
            return Ok(text_response(StatusCode::OK, "OK"));
        }
        if let Some(status) = status_path(&path) {
            return Ok(empty_response(status));
        }
        if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) {
            return Ok(bytes_response(n));
        }
        if path.starts_with("/retry") {
            return self.retry(received).await;
        }
        Ok(self.echo(received).await)
    }

    /// echo-basic's `/ws`: upgrade (RFC 6455 handshake) and echo every frame until the client closes.
    fn websocket(&self, mut request: Request<Incoming>) -> Response<EchoBody> {
        let headers = request.headers();
        let has_token = |name: HeaderName, token: &str| {
            headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        let key = headers
            .get("sec-websocket-key")
            .and_then(|k| k.to_str().ok())
            .map(str::to_string);
        let version_ok = headers.get("sec-websocket-version").is_some_and(|v| v == "13");
        let (true, true, true, Some(key)) = (
            request.method() == http::Method::GET,
            has_token(http::header::UPGRADE, "websocket") && has_token(http::header::CONNECTION, "upgrade"),
            version_ok,
            key,
        ) else {
            // gorilla/websocket's answer to a plain request on a WebSocket endpoint.
            return text_response(
                StatusCode::BAD_REQUEST,
                "Bad Request\nwebsocket: the client is not using the websocket protocol\n",
            );
        };
        let on_upgrade = hyper::upgrade::on(&mut request);
        let (stop, pod) = (self.stop.clone(), self.shared.config.pod_name.clone());
        tokio::spawn(async move {
            let session = async {
                let upgraded = on_upgrade.await.map_err(io::Error::other)?;
                crate::runner::websocket::serve_echo(TokioIo::new(upgraded)).await
            };
            tokio::select! {
                result = session => if let Err(e) = result { debug!(%pod, "websocket ended: {e}") },
                () = stop.cancelled() => {}
            }
        });
        let mut response = empty_response(StatusCode::SWITCHING_PROTOCOLS);
        let headers = response.headers_mut();
        set_header(headers, http::header::UPGRADE, "websocket");
        set_header(headers, http::header::CONNECTION, "Upgrade");
        set_header(
            headers,
            HeaderName::from_static("sec-websocket-accept"),
            &crate::runner::websocket::accept_key(&key),
        );
        response
    }

    /// echo-basic's retry simulator: the first `succeedAfter` attempts per uuid fail.
    async fn retry(&self, received: Received) -> Result<Response<EchoBody>, Abort> {
        let query = query_pairs(received.parts.uri.query());
        let (Some(uuid), Some(succeed_after)) = (query.get("uuid"), query.get("succeedAfter")) else {
            return Ok(error_response(StatusCode::BAD_REQUEST, "missing uuid or succeedAfter"));
        };
        let Ok(succeed_after) = succeed_after.parse::<u32>() else {
            return Ok(error_response(StatusCode::BAD_REQUEST, "invalid succeedAfter"));
        };
        if self.shared.next_attempt(uuid) > succeed_after {
            return Ok(self.echo(received).await);
        }
        if let Some(delay) = query.get("delayRetry") {
            match parse_go_duration(delay) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Ok(error_response(StatusCode::BAD_REQUEST, "invalid delayRetry")),
            }
        }
        match query.get("responseCode").and_then(|code| code.parse::<u16>().ok()) {
            Some(code) => Ok(empty_response(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            )),
            None => {
                // HTTP/1: the connection closes with RST. HTTP/2: hyper resets just this stream.
                if received.parts.version != Version::HTTP_2 {
                    self.reset.store(true, Ordering::Relaxed);
                }
                Err(Abort::Reset)
            }
        }
    }

    async fn echo(&self, received: Received) -> Response<EchoBody> {
        let request_uri = request_uri(&received.parts);
        self.shared.log_echo(&request_uri, self.remote);
        let query = query_pairs(received.parts.uri.query());
        if let Some(delay) = query.get("delay") {
            match parse_go_duration(delay) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    let message = format!("time: invalid duration \"{delay}\"");
                    return error_response(StatusCode::INTERNAL_SERVER_ERROR, &message);
                }
            }
        }
        let (body, content_type) = match self.shared.config.format {
            EchoFormat::Json => (self.json_body(&received, &request_uri), "application/json"),
            EchoFormat::Text => (self.text_body(&received, &request_uri), "application/text"),
        };
        let mut response = if is_grpc(&received.parts.headers) {
            grpc_response(body, received.trailers.as_ref())
        } else {
            let mut response = full_response(StatusCode::OK, body);
            set_header(response.headers_mut(), CONTENT_TYPE, content_type);
            if self.shared.config.format == EchoFormat::Json {
                set_header(
                    response.headers_mut(),
                    HeaderName::from_static("x-content-type-options"),
                    "nosniff",
                );
            }
            response
        };
        apply_echo_set_header(&received.parts.headers, response.headers_mut());
        response
    }

    fn json_body(&self, received: &Received, request_uri: &str) -> Bytes {
        let config = &self.shared.config;
        let echo = JsonEcho {
            path: request_uri,
            host: host_of(&received.parts),
            method: received.parts.method.as_str(),
            proto: proto_of(received.parts.version),
            headers: canonical_headers(&received.parts.headers),
            http_port: config.addr.port().to_string(),
            namespace: &config.namespace,
            ingress: "",
            service: "",
            pod: &config.pod_name,
            body_bytes: received.body_bytes,
            body_matches_pattern: received.body_is_pattern,
        };
        let mut out = Vec::new();
        let mut serializer =
            serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b" "));
        // Serializing plain strings and maps into a Vec cannot fail.
        let _ = echo.serialize(&mut serializer);
        Bytes::from(out)
    }

    fn text_body(&self, received: &Received, request_uri: &str) -> Bytes {
        let config = &self.shared.config;
        let parts = &received.parts;
        let mut lines = vec![
            format!("ServiceVersion={}", config.service_version),
            format!("ServicePort={}", config.addr.port()),
            format!("Host={}", host_of(parts)),
            format!("URL={request_uri}"),
            format!("Method={}", parts.method),
            format!("Proto={}", proto_of(parts.version)),
            format!("IP={}", self.remote.ip()),
            "Alpn=".to_string(),
        ];
        for (name, values) in canonical_headers(&parts.headers) {
            lines.extend(values.into_iter().map(|value| format!("RequestHeader={name}:{value}")));
        }
        // Newer Istio echo versions report the pod's namespace too; the runner checks it.
        lines.push(format!("Namespace={}", config.namespace));
        lines.push(format!("BodyBytes={}", received.body_bytes));
        lines.push(format!("Hostname={}", config.pod_name));
        let mut text = lines.join("\n");
        text.push('\n');
        Bytes::from(text)
    }
}

/// echo-basic's JSON object; field order as upstream, `bodyBytes` and `bodyMatchesPattern` are ours.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonEcho<'a> {
    path: &'a str,
    host: String,
    method: &'a str,
    proto: &'static str,
    headers: BTreeMap<String, Vec<String>>,
    http_port: String,
    namespace: &'a str,
    ingress: &'a str,
    service: &'a str,
    pod: &'a str,
    body_bytes: u64,
    body_matches_pattern: bool,
}

/// Reads the whole body frame by frame (never buffering it) and keeps only its size, whether it was the
/// `/bytes` pattern, and its trailers.
async fn receive(request: Request<Incoming>) -> Result<Received, Abort> {
    let (parts, mut body) = request.into_parts();
    let mut body_bytes = 0u64;
    let mut body_is_pattern = true;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                body_is_pattern = body_is_pattern && matches_pattern(body_bytes, &data);
                body_bytes += data.len() as u64;
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok(Received {
        parts,
        body_bytes,
        body_is_pattern,
        trailers,
    })
}

/// The per-request misbehaviour: `?misbehave=` first, then the `X-Echo-Misbehave` header.
fn requested_misbehaviour<B>(request: &Request<B>) -> Option<Misbehaviour> {
    let query = query_pairs(request.uri().query());
    let from_header = || {
        request
            .headers()
            .get(MISBEHAVE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(Misbehaviour::parse)
    };
    query
        .get("misbehave")
        .and_then(|m| Misbehaviour::parse(m))
        .or_else(from_header)
}

fn request_uri_of<B>(request: &Request<B>) -> String {
    target_of(request.uri(), request.version())
}

/// Go's `RequestURI`: the request target as sent (absolute-form stays absolute on HTTP/1).
fn request_uri(parts: &http::request::Parts) -> String {
    target_of(&parts.uri, parts.version)
}

fn target_of(uri: &http::Uri, version: Version) -> String {
    if version != Version::HTTP_2 && uri.scheme().is_some() {
        return uri.to_string();
    }
    uri.path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into())
}

/// `Host` on HTTP/1, `:authority` on HTTP/2.
fn host_of(parts: &http::request::Parts) -> String {
    let authority = parts.uri.authority().map(|a| a.as_str().to_string());
    let host = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    match parts.version {
        Version::HTTP_2 => authority.or(host),
        _ => host.or(authority),
    }
    .unwrap_or_default()
}

fn proto_of(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Request headers as Go's `r.Header` holds them: canonical names, one element per header line, without
/// `Host` and `Transfer-Encoding` (Go moves those out of the map).
fn canonical_headers(headers: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if name == HOST || name == TRANSFER_ENCODING {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(canonical_header_name(name.as_str())).or_default().push(value);
    }
    map
}

/// Go's `CanonicalMIMEHeaderKey`: `x-header-set` -> `X-Header-Set`.
pub fn canonical_header_name(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

/// `X-Echo-Set-Header: Name1:value1,Name2:value2` sets (or appends to) response headers.
fn apply_echo_set_header(request: &HeaderMap, response: &mut HeaderMap) {
    for list in request.get_all("x-echo-set-header") {
        let Ok(list) = list.to_str() else { continue };
        for item in list.split(',') {
            let (name, value) = item.trim().split_once(':').unwrap_or((item.trim(), ""));
            let (Ok(name), value) = (HeaderName::from_bytes(name.as_bytes()), value.trim()) else {
                continue;
            };
            let value = match response.get(&name).and_then(|v| v.to_str().ok()) {
                Some(existing) => format!("{existing},{value}"),
                None => value.to_string(),
            };
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.insert(name, value);
            }
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The echo as one gRPC length-prefixed message, `grpc-status: 0`, request trailers echoed back.
fn grpc_response(echo: Bytes, request_trailers: Option<&HeaderMap>) -> Response<EchoBody> {
    let mut message = BytesMut::with_capacity(5 + echo.len());
    message.put_u8(0);
    message.put_u32(u32::try_from(echo.len()).unwrap_or(u32::MAX));
    message.put_slice(&echo);
    let mut trailers = HeaderMap::new();
    set_header(&mut trailers, HeaderName::from_static("grpc-status"), "0");
    set_header(&mut trailers, HeaderName::from_static("grpc-message"), "OK");
    for (name, value) in request_trailers.into_iter().flatten() {
        if let Ok(echoed) = HeaderName::from_bytes(format!("x-echo-trailer-{name}").as_bytes()) {
            trailers.append(echoed, value.clone());
        }
    }
    let frames: Vec<Result<Frame<Bytes>, io::Error>> =
        vec![Ok(Frame::data(message.freeze())), Ok(Frame::trailers(trailers))];
    let mut response = Response::new(StreamBody::new(stream::iter(frames)).boxed());
    set_header(response.headers_mut(), CONTENT_TYPE, "application/grpc");
    response
}

/// The content of `/bytes/<n>` bodies and what `bodyMatchesPattern` compares uploads against: byte `i` of a body
/// is `PATTERN[i % PATTERN_PERIOD]`. The period is prime so that no reordered, repeated or dropped run of 16 KiB
/// records, h2 frames or 64 KiB chunks can line up with it and go unnoticed.
const PATTERN_PERIOD: usize = 131_071;
/// Longest slice handed out at once (one `/bytes` chunk).
const PATTERN_CHUNK: usize = 64 * 1024;

/// One period plus one chunk, so that any chunk is a contiguous slice (shared, no per-request allocation).
static PATTERN: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let period: Vec<u8> = (0..PATTERN_PERIOD)
        .map(|_| {
            // xorshift64: cheap, and its state cannot cycle within one period, so no run of bytes is periodic.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    let mut all = period.clone();
    all.extend_from_slice(&period[..PATTERN_CHUNK]);
    Bytes::from(all)
});

/// `len` (≤ 64 KiB) bytes of the pattern starting at body offset `offset`.
pub fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    let start = (offset % PATTERN_PERIOD as u64) as usize;
    PATTERN.slice(start..start + len.min(PATTERN_CHUNK))
}

/// Whether `data`, found at body offset `offset`, is the pattern there.
pub fn matches_pattern(mut offset: u64, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        let expected = pattern_chunk(offset, data.len());
        let (head, rest) = data.split_at(expected.len());
        if head != &expected[..] {
            return false;
        }
        offset += head.len() as u64;
        data = rest;
    }
    true
}

fn bytes_response(n: u64) -> Response<EchoBody> {
    let chunks = stream::unfold(0u64, move |sent| async move {
        if sent == n {
            return None;
        }
        let len = (n - sent).min(PATTERN_CHUNK as u64) as usize;
        let chunk = pattern_chunk(sent, len);
        Some((Ok::<_, io::Error>(Frame::data(chunk)), sent + len as u64))
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed());
    set_header(response.headers_mut(), CONTENT_TYPE, "application/octet-stream");
    set_header(response.headers_mut(), CONTENT_LENGTH, &n.to_string());
    response
}

fn status_path(path: &str) -> Option<StatusCode> {
    let code = path.strip_prefix("/status/")?;
    if code.len() != 3 {
        return None;
    }
    StatusCode::from_bytes(code.as_bytes()).ok()
}

/// 200 with a Content-Length of `TRUNCATED_LENGTH`, a few bytes, then a body error: hyper aborts the
/// connection (HTTP/1.1) or resets the stream (HTTP/2).
fn truncated_response() -> Response<EchoBody> {
    let first = stream::iter([Ok(Frame::data(Bytes::from_static(TRUNCATED_SENT)))]);
    // hyper flushes what it has when the body is not ready; without this pause it would see the error before
    // writing the headers and the peer would get no response at all.
    let then_fail = stream::once(async {
        tokio::time::sleep(TRUNCATE_PAUSE).await;
        Err(io::Error::other("simulated failure: closed after headers"))
    });
    let mut response = Response::new(StreamBody::new(futures_util::StreamExt::chain(first, then_fail)).boxed());
    set_header(response.headers_mut(), CONTENT_LENGTH, &TRUNCATED_LENGTH.to_string());
    set_header(response.headers_mut(), CONTENT_TYPE, "application/octet-stream");
    response
}

fn full_response(status: StatusCode, body: Bytes) -> Response<EchoBody> {
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
}

fn empty_response(status: StatusCode) -> Response<EchoBody> {
    full_response(status, Bytes::new())
}

fn text_response(status: StatusCode, text: &'static str) -> Response<EchoBody> {
    let mut response = full_response(status, Bytes::from_static(text.as_bytes()));
    set_header(response.headers_mut(), CONTENT_TYPE, "text/plain; charset=utf-8");
    response
}

/// echo-basic's `processError`: `{"message": "..."}`.
fn error_response(status: StatusCode, message: &str) -> Response<EchoBody> {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut response = full_response(status, Bytes::from(body));
    set_header(response.headers_mut(), CONTENT_TYPE, "application/json");
    response
}

fn set_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Decoded `key=value` pairs of a query string (first occurrence wins).
fn query_pairs(query: Option<&str>) -> HashMap<String, String> {
    let mut pairs = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        pairs
            .entry(percent_decode(key))
            .or_insert_with(|| percent_decode(value));
    }
    pairs
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex_value(bytes[i + 1])? * 16 + hex_value(bytes[i + 2])?))
            .flatten();
        match (bytes[i], escaped) {
            (_, Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (b, None) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|d| d as u8)
}

/// Go's `time.ParseDuration` (`1s`, `500ms`, `1m30s`, `1.5h`, `0`); negative durations clamp to zero.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * nanos_per_unit;
    }
    Some(if negative {
        Duration::ZERO
    } else {
        Duration::from_nanos(total as u64)
    })
}

// ---------------------------------------------------------------------------------------------------------
// Plain TCP echo

/// Echoes bytes; when the client half-closes, writes `bytes=<n>\n` and half-closes back, so tests can see
/// that a FIN crossed the proxy in each direction.
pub struct TcpEcho;

impl TcpEcho {
    pub async fn start(addr: SocketAddr) -> Result<TcpEchoHandle, EchoError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| EchoError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EchoError::Bind { addr, source })?;
        let connections = Arc::new(AtomicUsize::new(0));
        let token = CancellationToken::new();
        tokio::spawn(tcp_accept_loop(listener, connections.clone(), token.clone()));
        Ok(TcpEchoHandle {
            addr,
            connections,
            _stop: token.drop_guard(),
        })
    }
}

pub struct TcpEchoHandle {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    _stop: DropGuard,
}

impl std::fmt::Debug for TcpEchoHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpEchoHandle").field("addr", &self.addr).finish()
    }
}

impl TcpEchoHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn shutdown(self) {}
}

async fn tcp_accept_loop(listener: TcpListener, connections: Arc<AtomicUsize>, token: CancellationToken) {
    while let Some((stream, remote)) = accept_until(&listener, &token).await {
        connections.fetch_add(1, Ordering::Relaxed);
        let token = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = tcp_echo(stream) => if let Err(e) = result { debug!(%remote, "tcp echo: {e}") },
                () = token.cancelled() => {}
            }
        });
    }
}

async fn tcp_echo(mut stream: TcpStream) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.split();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    writer.write_all(format!("bytes={total}\n").as_bytes()).await?;
    writer.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::unique_loopback_ip;
    use http_body_util::Empty;
    use hyper::client::conn::{http1, http2};
    use std::convert::Infallible;
    use std::net::Ipv4Addr;

    async fn start(format: EchoFormat, h2c_only: bool) -> EchoHandle {
        let mut config = EchoConfig::new(SocketAddr::new(unique_loopback_ip().into(), 8080));
        config.pod_name = "infra-backend-v1-abc-xyz".into();
        config.namespace = "gateway-conformance-infra".into();
        config.format = format;
        config.h2c_only = h2c_only;
        EchoServer::start(config).await.unwrap()
    }

    type Client1 = http1::SendRequest<BoxBody<Bytes, Infallible>>;

    async fn h1(addr: SocketAddr) -> Client1 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        send
    }

    async fn h2(addr: SocketAddr) -> http2::SendRequest<BoxBody<Bytes, Infallible>> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        send
    }

    fn get(uri: &str) -> Request<BoxBody<Bytes, Infallible>> {
        Request::get(uri)
            .header("host", "echo.example")
            .body(Empty::new().boxed())
            .unwrap()
    }

    async fn body_of(response: Response<Incoming>) -> (http::response::Parts, Bytes, Option<HeaderMap>) {
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (parts, collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn json_echo_matches_echo_basic() {
        let echo = start(EchoFormat::Json, false).await;
        let mut client = h1(echo.addr()).await;
        let request = Request::get("/v2?x=1")
            .header("host", "203.0.113.7")
            .header("x-a", "v1")
            .header("x-a", "v2")
            .header(
                "x-echo-set-header",
                "X-Header-Set:set, X-Header-Add:one,X-Header-Add:two",
            )
            .body(Empty::new().boxed())
            .unwrap();
        let (parts, body, _) = body_of(client.send_request(request).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers[CONTENT_TYPE], "application/json");
        assert_eq!(parts.headers["x-content-type-options"], "nosniff");
        assert_eq!(parts.headers["x-header-set"], "set");
        assert_eq!(parts.headers["x-header-add"], "one,two");
        let text = std::str::from_utf8(&body).unwrap();
        assert!(
            text.starts_with("{\n \"path\": \"/v2?x=1\",\n \"host\": \"203.0.113.7\""),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["method"], "GET");
        assert_eq!(json["proto"], "HTTP/1.1");
        assert_eq!(json["headers"]["X-A"], serde_json::json!(["v1", "v2"]));
        assert!(json["headers"].get("Host").is_none());
        assert_eq!(json["httpPort"], "8080");
        assert_eq!(json["namespace"], "gateway-conformance-infra");
        assert_eq!(json["ingress"], "");
        assert_eq!(json["pod"], "infra-backend-v1-abc-xyz");
        assert_eq!(json["bodyBytes"], 0);
        assert_eq!(echo.requests_seen(), 1);
        let line = echo.wait_for_log("/v2?x=1").await;
        assert!(
            line.starts_with("Echoing back request made to /v2?x=1 to client (127."),
            "{line}"
        );
    }

    #[tokio::test]
    async fn h2c_text_echo_with_streamed_body() {
        let mut config = EchoConfig::new(SocketAddr::new(unique_loopback_ip().into(), 8080));
        config.format = EchoFormat::Text;
        config.pod_name = "echo-v2-5c7d9d8b6f-qk2mw".into();
        config.service_version = "v2".into();
        let echo = EchoServer::start(config).await.unwrap();
        let mut client = h2(echo.addr()).await;
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..10)
            .map(|_| Ok(Frame::data(Bytes::from(vec![1u8; 100_000]))))
            .collect();
        let request = Request::post("http://echo:80/upload?q=1")
            .header("version", "two")
            .body(StreamBody::new(stream::iter(chunks)).boxed())
            .unwrap();
        let (parts, body, _) = body_of(client.send_request(request).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        let text = String::from_utf8(body.to_vec()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ServiceVersion=v2");
        assert_eq!(lines[1], "ServicePort=8080");
        assert!(lines.contains(&"Host=echo:80"), "{text}");
        assert!(lines.contains(&"URL=/upload?q=1"));
        assert!(lines.contains(&"Method=POST"));
        assert!(lines.contains(&"Proto=HTTP/2.0"));
        assert!(lines.iter().any(|l| l.starts_with("IP=127.")));
        assert!(lines.contains(&"RequestHeader=Version:two"));
        assert!(lines.contains(&"BodyBytes=1000000"));
        assert_eq!(*lines.last().unwrap(), "Hostname=echo-v2-5c7d9d8b6f-qk2mw");
    }

    #[tokio::test]
    async fn h2c_only_port_rejects_http1() {
        let echo = start(EchoFormat::Json, true).await;
        let (parts, body, _) = body_of(h1(echo.addr()).await.send_request(get("/")).await.unwrap()).await;
        assert_eq!(parts.status, 400);
        assert_eq!(&body[..], b"Expected h2c request\n");
        let (parts, body, _) = body_of(h2(echo.addr()).await.send_request(get("http://x/")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["proto"], "HTTP/2.0");
    }

    #[tokio::test]
    async fn special_paths() {
        let echo = start(EchoFormat::Json, false).await;
        let mut client = h1(echo.addr()).await;
        let (parts, _, _) = body_of(client.send_request(get("/status/503")).await.unwrap()).await;
        assert_eq!(parts.status, 503);
        let (parts, body, _) = body_of(client.send_request(get("/health")).await.unwrap()).await;
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"OK"[..]));
        let (parts, body, _) = body_of(client.send_request(get("/bytes/200000")).await.unwrap()).await;
        assert_eq!(parts.headers[CONTENT_LENGTH], "200000");
        assert_eq!(body.len(), 200_000);
        assert!(matches_pattern(0, &body), "/bytes serves the pattern");
        let (parts, _, _) = body_of(client.send_request(get("/x?delay=10ms")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        let (parts, body, _) = body_of(client.send_request(get("/x?delay=soon")).await.unwrap()).await;
        assert_eq!(parts.status, 500);
        assert!(std::str::from_utf8(&body).unwrap().contains("message"));
        assert!(echo.log_lines().iter().all(|l| !l.contains("/health")));
        assert_eq!(echo.requests_seen(), 5);
    }

    #[test]
    fn pattern_detects_reordered_and_repeated_records() {
        const RECORD: usize = 16 * 1024;
        let body: Vec<u8> = (0..20u64)
            .flat_map(|i| pattern_chunk(i * RECORD as u64, RECORD).to_vec())
            .collect();
        assert!(matches_pattern(0, &body));
        assert!(matches_pattern(5, &body[5..]), "any offset");
        assert!(!matches_pattern(1, &body[..1000]), "shifted by one");
        let mut swapped = body.clone();
        swapped[..RECORD].copy_from_slice(&body[RECORD..2 * RECORD]);
        swapped[RECORD..2 * RECORD].copy_from_slice(&body[..RECORD]);
        assert!(!matches_pattern(0, &swapped));
        let mut repeated = body.clone();
        repeated[4 * RECORD..8 * RECORD].copy_from_slice(&body[..4 * RECORD]);
        assert!(
            !matches_pattern(0, &repeated),
            "a repeated 64 KiB run does not line up with the period"
        );
        let mut flipped = body;
        flipped[300_000] ^= 1;
        assert!(!matches_pattern(0, &flipped));
    }

    #[tokio::test]
    async fn upload_is_compared_with_the_pattern() {
        let echo = start(EchoFormat::Json, false).await;
        let mut client = h1(echo.addr()).await;
        for (body, want) in [
            (pattern_chunk(0, 50_000), true),
            (pattern_chunk(1, 50_000), false),
            (Bytes::new(), true),
        ] {
            let request = Request::post("/upload")
                .header("host", "echo.example")
                .body(Full::new(body).boxed())
                .unwrap();
            let (_, reply, _) = body_of(client.send_request(request).await.unwrap()).await;
            let json: serde_json::Value = serde_json::from_slice(&reply).unwrap();
            assert_eq!(json["bodyMatchesPattern"], want, "{json}");
        }
    }

    #[tokio::test]
    async fn status_for_the_next_requests_then_recovery_and_exchange_records() {
        let echo = start(EchoFormat::Json, false).await;
        echo.misbehave_times(Misbehaviour::Status(503), 2).await;
        let mut client = h1(echo.addr()).await;
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let (parts, _, _) = body_of(client.send_request(get("/a?x=1")).await.unwrap()).await;
            statuses.push(parts.status.as_u16());
        }
        assert_eq!(statuses, [503, 503, 200]);
        let mut other = h1(echo.addr()).await;
        let request = Request::get("/b")
            .header("x-envoy-attempt-count", "2")
            .body(Empty::new().boxed());
        body_of(other.send_request(request.unwrap()).await.unwrap()).await;

        let exchanges = echo.exchanges();
        assert_eq!(exchanges.len(), 4);
        assert_eq!(exchanges.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(exchanges[0].misbehaviour, Some(Misbehaviour::Status(503)));
        assert_eq!(exchanges[2].misbehaviour, None);
        assert_eq!(exchanges[0].uri, "/a?x=1");
        assert_eq!(
            exchanges[0].connection, exchanges[2].connection,
            "one keep-alive connection"
        );
        assert_ne!(exchanges[3].connection, exchanges[0].connection);
        assert_eq!(exchanges[3].header("x-envoy-attempt-count"), Some("2"));
        assert_eq!(echo.connections_accepted(), 2);
        assert_eq!(echo.open_connections(), 2);
        assert_eq!((echo.in_flight(), echo.cancelled()), (0, 0));
        drop(other);
        echo.wait_for_open_connections_at_most(1).await;

        // Unbounded until told to behave.
        echo.misbehave(Misbehaviour::Status(500)).await;
        for _ in 0..3 {
            let (parts, _, _) = body_of(client.send_request(get("/c")).await.unwrap()).await;
            assert_eq!(parts.status, 500);
        }
        echo.behave().await;
        let (parts, _, _) = body_of(client.send_request(get("/c")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
    }

    #[tokio::test]
    async fn per_request_misbehaviour_by_query_or_header() {
        let echo = start(EchoFormat::Json, false).await;
        let mut client = h1(echo.addr()).await;
        let (parts, _, _) = body_of(client.send_request(get("/x?misbehave=status:418")).await.unwrap()).await;
        assert_eq!(parts.status, 418);
        let request = Request::get("/x")
            .header(MISBEHAVE_HEADER, "status:429")
            .body(Empty::new().boxed())
            .unwrap();
        let (parts, _, _) = body_of(client.send_request(request).await.unwrap()).await;
        assert_eq!(parts.status, 429);
        // An unknown form is ignored, not an error.
        let (parts, _, _) = body_of(client.send_request(get("/x?misbehave=explode")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        // The request's own wish wins over the armed one.
        echo.misbehave(Misbehaviour::Status(503)).await;
        let (parts, _, _) = body_of(client.send_request(get("/x?misbehave=status:202")).await.unwrap()).await;
        assert_eq!(parts.status, 202);
    }

    #[tokio::test]
    async fn delay_answers_after_the_delay() {
        let echo = start(EchoFormat::Json, false).await;
        echo.misbehave_times(Misbehaviour::Delay(Duration::from_millis(200)), 1)
            .await;
        let mut client = h1(echo.addr()).await;
        let started = std::time::Instant::now();
        let (parts, _, _) = body_of(client.send_request(get("/slow")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "answered before the delay"
        );
        let started = std::time::Instant::now();
        let request = Request::get("/slow")
            .header(MISBEHAVE_HEADER, "delay:150ms")
            .body(Empty::new().boxed());
        body_of(client.send_request(request.unwrap()).await.unwrap()).await;
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn reset_closes_http1_connection_and_resets_only_the_h2_stream() {
        let echo = start(EchoFormat::Json, false).await;
        echo.misbehave_times(Misbehaviour::Reset, 1).await;
        let mut raw = TcpStream::connect(echo.addr()).await.unwrap();
        raw.write_all(b"POST /r HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let err = raw.read_to_end(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(buf.is_empty());

        echo.misbehave_times(Misbehaviour::Reset, 1).await;
        let mut client = h2(echo.addr()).await;
        let err = client.send_request(get("http://x/r")).await.unwrap_err();
        let h2_error = std::error::Error::source(&err)
            .and_then(|e| e.downcast_ref::<h2::Error>())
            .expect("an h2 error");
        assert!(h2_error.is_reset(), "{h2_error}");
        let (parts, _, _) = body_of(client.send_request(get("http://x/r")).await.unwrap()).await;
        assert_eq!(parts.status, 200, "the connection survives a stream reset");
        assert_eq!(echo.exchanges()[1].misbehaviour, Some(Misbehaviour::Reset));
    }

    #[tokio::test]
    async fn close_after_headers_truncates_the_body() {
        let echo = start(EchoFormat::Json, false).await;
        echo.misbehave_times(Misbehaviour::CloseAfterHeaders, 2).await;
        let response = h1(echo.addr()).await.send_request(get("/t")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[CONTENT_LENGTH], TRUNCATED_LENGTH.to_string());
        assert!(response.into_body().collect().await.is_err(), "HTTP/1.1 body cut short");
        let response = h2(echo.addr()).await.send_request(get("http://x/t")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.into_body().collect().await.is_err(), "h2 body reset");
        let (parts, _, _) = body_of(h1(echo.addr()).await.send_request(get("/t")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
    }

    #[tokio::test]
    async fn hang_never_answers_and_counts_the_cancellation() {
        let echo = start(EchoFormat::Json, false).await;
        echo.misbehave(Misbehaviour::Hang).await;
        let mut client = h2(echo.addr()).await;
        let pending = tokio::spawn(client.send_request(get("http://x/hang")));
        echo.wait_for_in_flight(1).await;
        assert!(!pending.is_finished());
        // The client gives up: h2 resets the stream, the server drops the handler.
        pending.abort();
        echo.wait_for_cancelled(1).await;
        assert_eq!(echo.in_flight(), 0);
        // Over HTTP/1.1 the client closes the connection.
        let mut raw = TcpStream::connect(echo.addr()).await.unwrap();
        raw.write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        echo.wait_for_in_flight(1).await;
        drop(raw);
        echo.wait_for_cancelled(2).await;
        echo.behave().await;
        let (parts, _, _) = body_of(client.send_request(get("http://x/ok")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
    }

    #[tokio::test]
    async fn refused_then_accepted_again_on_the_same_address() {
        let echo = start(EchoFormat::Json, false).await;
        echo.misbehave(Misbehaviour::RefuseConnections).await;
        let err = TcpStream::connect(echo.addr()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(echo.connections_accepted(), 0);
        echo.behave().await;
        let (parts, _, _) = body_of(h1(echo.addr()).await.send_request(get("/")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        assert_eq!(echo.connections_accepted(), 1);
    }

    #[tokio::test]
    async fn dropped_connections_are_reset_before_reading() {
        let echo = start(EchoFormat::Json, false).await;
        echo.misbehave_times(Misbehaviour::DropConnections, 1).await;
        let mut raw = TcpStream::connect(echo.addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let read = raw.read(&mut buf).await;
        assert!(
            matches!(&read, Ok(0)) || matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{read:?}"
        );
        let (parts, _, _) = body_of(h1(echo.addr()).await.send_request(get("/")).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        assert_eq!(echo.connections_accepted(), 2);
        assert_eq!(echo.requests_seen(), 1);
    }

    #[tokio::test]
    async fn retry_simulator_fails_then_succeeds() {
        let echo = start(EchoFormat::Json, false).await;
        let (parts, _, _) = body_of(h1(echo.addr()).await.send_request(get("/retry?uuid=a")).await.unwrap()).await;
        assert_eq!(parts.status, 400);

        let uri = "/retry?uuid=u1&succeedAfter=2&responseCode=503";
        let mut client = h1(echo.addr()).await;
        for expected in [503, 503, 200] {
            let (parts, _, _) = body_of(client.send_request(get(uri)).await.unwrap()).await;
            assert_eq!(parts.status, expected);
        }

        // Without responseCode the attempt ends with a reset and no response, on HTTP/1 ...
        let uri = "/retry?uuid=u2&succeedAfter=1";
        let mut raw = TcpStream::connect(echo.addr()).await.unwrap();
        raw.write_all(format!("GET {uri} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let err = raw.read_to_end(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(buf.is_empty());
        let (parts, _, _) = body_of(h1(echo.addr()).await.send_request(get(uri)).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        // ... and on HTTP/2, where only the stream is reset.
        let mut client = h2(echo.addr()).await;
        let uri = "http://x/retry?uuid=u3&succeedAfter=1";
        assert!(client.send_request(get(uri)).await.is_err());
        let (parts, _, _) = body_of(client.send_request(get(uri)).await.unwrap()).await;
        assert_eq!(parts.status, 200);
    }

    #[tokio::test]
    async fn grpc_requests_get_framed_echo_and_trailers() {
        let echo = start(EchoFormat::Text, false).await;
        let mut client = h2(echo.addr()).await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", HeaderValue::from_static("1"));
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ];
        let request = Request::post("http://echo/pkg.Svc/Method")
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(StreamBody::new(stream::iter(frames)).boxed())
            .unwrap();
        let (parts, body, trailers) = body_of(client.send_request(request).await.unwrap()).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers[CONTENT_TYPE], "application/grpc");
        assert_eq!(body[0], 0);
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!(len, body.len() - 5);
        assert!(std::str::from_utf8(&body[5..]).unwrap().contains("BodyBytes=7"));
        let trailers = trailers.unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "OK");
        assert_eq!(trailers["x-echo-trailer-x-t"], "1");
    }

    #[tokio::test]
    async fn tcp_echo_reports_bytes_after_half_close() {
        let echo = TcpEcho::start(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))
            .await
            .unwrap();
        let mut stream = TcpStream::connect(echo.addr()).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hellobytes=5\n");
        assert_eq!(echo.connections(), 1);
    }

    #[test]
    fn go_durations_and_header_names() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(canonical_header_name("x-header-set"), "X-Header-Set");
        assert_eq!(canonical_header_name("USER-AGENT"), "User-Agent");
        assert_eq!(percent_decode("a%20b+c%zz"), "a b c%zz");
    }
}
