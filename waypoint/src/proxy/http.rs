//! HTTP inside a tunnel: a hyper server on the tunnel's bytes, each request proxied to an endpoint of the
//! tunnel's destination service.
//!
//! The service binding is looked up again for every request (one atomic load and a hash probe), so a config
//! swap applies to requests on tunnels that are already open. Bodies stream both ways as hyper frames (trailers
//! included, which gRPC needs) and are never collected.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use waypoint_filters::authz::{ConnectionInfo, ExtAuthz};
use waypoint_filters::context::{Attempt, MirrorSink, ResponseFlag};

use super::Ctx;
use super::error::ProxyError;
use super::l7::{self, Mirrors};
use crate::config::{Backend, PortProtocol};
use crate::ext_authz::ExtAuthzClient;
use crate::hbone::server::Peer;
use crate::upstream::Upstream;
use crate::upstream::cluster::{ClientAddr, InFlight, PickInput};
use crate::upstream::http_pool::{Body, BoxError, Protocol};
use crate::upstream::outlier::Outcome;

/// What every request in one tunnel shares.
pub struct TunnelInfo {
    pub peer: Arc<Peer>,
    /// The CONNECT authority: the service VIP:port the client addressed.
    pub vip: SocketAddr,
    /// What authorization knows of the connection, built once per tunnel and cloned into requests that need it.
    pub conn: ConnectionInfo,
}

impl TunnelInfo {
    pub fn new(peer: Arc<Peer>, vip: SocketAddr) -> TunnelInfo {
        let conn = ConnectionInfo {
            peer_principal: Some(peer.identity.principal().into()),
            source_ip: Some(peer.addr.ip()),
            destination: Some(vip),
            sni: None,
        };
        TunnelInfo { peer, vip, conn }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downstream {
    Http1,
    Http2,
}

pub async fn serve<IO>(ctx: Arc<Ctx>, tunnel: Arc<TunnelInfo>, io: IO, downstream: Downstream)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        let tunnel = tunnel.clone();
        // Boxed with an explicit `Send`: hyper's HTTP/2 server spawns this future, and without the coercion
        // rustc cannot prove `Send` for every lifetime of the borrows inside (a known higher-ranked limit).
        let fut: Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>> =
            Box::pin(async move { Ok::<_, Infallible>(handle(ctx, tunnel, req).await) });
        fut
    });
    let io = TokioIo::new(io);
    let result = match downstream {
        Downstream::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .max_buf_size(H1_MAX_BUF)
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = ctx.drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Downstream::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(crate::hbone::STREAM_WINDOW)
                .initial_connection_window_size(crate::hbone::CONNECTION_WINDOW)
                .max_concurrent_streams(1000)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = ctx.drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "downstream HTTP connection ended with an error");
    }
}

async fn handle(ctx: Arc<Ctx>, tunnel: Arc<TunnelInfo>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = proxy(&ctx, &tunnel, req).await;
    match resp.extensions().get::<ResponseFlag>() {
        None => {
            tracing::debug!(target: "access", %method, %uri, status = resp.status().as_u16(), peer = %tunnel.peer.identity, vip = %tunnel.vip, flags = "-")
        }
        Some(flag) => {
            tracing::info!(target: "access", %method, %uri, status = resp.status().as_u16(), flags = flag.0, peer = %tunnel.peer.identity, vip = %tunnel.vip)
        }
    }
    resp
}

pub fn local_reply(e: &ProxyError) -> Response<Body> {
    let mut resp = Response::new(full(e.body()));
    *resp.status_mut() = e.status();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let ProxyError::Overflow(_) = e {
        resp.headers_mut()
            .insert(X_ENVOY_OVERLOADED, HeaderValue::from_static("true"));
    }
    resp.extensions_mut().insert(ResponseFlag(e.flag()));
    resp
}

fn full(s: &'static str) -> Body {
    Full::new(Bytes::from_static(s.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

async fn proxy(ctx: &Ctx, tunnel: &TunnelInfo, mut req: Request<Incoming>) -> Response<Body> {
    let snapshot = ctx.config.load();
    let needs_client_addr = ctx.upstream.prepare(&snapshot);
    let Some(binding) = snapshot.resolve(&tunnel.vip) else {
        return local_reply(&ProxyError::NoRoute(tunnel.vip.to_string()));
    };
    let upgrade = upgrade_protocol(&req);
    let downstream_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(proto_name) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto_name.clone());
    }
    if !parts.headers.contains_key(X_REQUEST_ID) {
        parts.headers.insert(X_REQUEST_ID, request_id());
    }
    if !parts.headers.contains_key(X_FORWARDED_PROTO) {
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    // HTTP/2 clients put the host in :authority only; routing, rewrites and HTTP/1.1 upstreams read `Host`.
    if !parts.headers.contains_key(header::HOST) {
        let host = parts.uri.authority().map(|a| a.as_str()).unwrap_or(&binding.hostname);
        if let Ok(v) = HeaderValue::try_from(host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let mut req = Request::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed());
    if needs_client_addr && let Some(ip) = tunnel.conn.source_ip {
        req.extensions_mut().insert(ClientAddr(ip));
    }

    let table = binding
        .routes
        .as_ref()
        .and_then(|r| r.table_for(tunnel.peer.identity.namespace()))
        .or(binding.default_table.as_ref());
    let mut resp = match table {
        Some(table) => {
            if let Some(jwt) = &binding.security.jwt {
                req.extensions_mut().insert(jwt.clone());
            }
            if let Some(authz) = &binding.security.authz {
                req.extensions_mut().insert(authz.clone());
                req.extensions_mut().insert(tunnel.conn.clone());
                if authz.has_custom() {
                    let client: Arc<dyn ExtAuthz> = Arc::new(ExtAuthzClient {
                        upstream: ctx.upstream.clone(),
                        snapshot: snapshot.clone(),
                    });
                    req.extensions_mut().insert(client);
                }
            }
            req.extensions_mut().insert(table.clone());
            let mirrors: Arc<dyn MirrorSink> = Arc::new(Mirrors {
                upstream: ctx.upstream.clone(),
                snapshot: snapshot.clone(),
            });
            req.extensions_mut().insert(mirrors);
            req.extensions_mut().insert(snapshot);
            l7::call(ctx.http_stack.clone(), req).await
        }
        None => send_to_backend(&ctx.upstream, &binding.backend, req)
            .await
            .unwrap_or_else(|e| l7::error_reply(&e)),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice_upgrade(down, up));
        }
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
    resp
}

/// Send to one endpoint of `backend`, in the protocol the backend port declares (or the client's, when the
/// port declares none). The endpoint is the backend's load balancer's choice (avoiding endpoints an earlier
/// attempt of the request used, see [`Attempt`]); the outcome feeds its outlier detection.
pub async fn send_to_backend(
    upstream: &Upstream,
    backend: &Backend,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let rt = upstream.runtime(backend);
    let (mut parts, body) = req.into_parts();
    let client = parts.extensions.get::<ClientAddr>().map(|c| c.0);
    let (hash, set_cookie) = rt.request_hash(&parts, client);
    let attempt = parts.extensions.get::<Attempt>();
    // With outlier detection, note the attempt so a timeout that drops this future still counts; an earlier
    // attempt still noted was dropped that way, and counts before this one picks.
    let in_flight = rt
        .policy
        .outlier
        .as_ref()
        .and_then(|_| parts.extensions.get::<InFlight>().cloned());
    if let Some((previous, i)) = in_flight.as_ref().and_then(InFlight::take) {
        previous.report(i, Outcome::LocalFailure);
    }
    let index = rt.pick(&PickInput { hash, attempt }).ok_or_else(|| {
        ProxyError::NoHealthyUpstream(format!("{}/{}:{}", backend.namespace, backend.service, backend.port))
    })?;
    let Some(ep) = backend.endpoints.get(index) else {
        return Err(ProxyError::NoHealthyUpstream(rt.name().to_string()));
    };
    if let Some(a) = attempt {
        a.record(ep.addr);
    }
    if let Some(slot) = &in_flight {
        slot.start(rt.clone(), index);
    }
    let active = rt.begin(index);
    let proto = match backend.protocol {
        PortProtocol::Http2 => Protocol::Http2,
        PortProtocol::Http => Protocol::Http1,
        PortProtocol::Detect | PortProtocol::Tcp => {
            if parts.version == Version::HTTP_2 {
                Protocol::Http2
            } else {
                Protocol::Http1
            }
        }
    };
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_else(|| ep.addr.to_string());
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match proto {
        Protocol::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::try_from(path_and_query).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        }
        Protocol::Http2 => {
            parts.version = Version::HTTP_2;
            parts.uri = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path_and_query)
                .build()
                .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
            parts.headers.remove(header::HOST);
            // h2 has no upgrade mechanism; a WebSocket handshake cannot cross into an HTTP/2 upstream.
            parts.headers.remove(header::CONNECTION);
            parts.headers.remove(header::UPGRADE);
        }
    }
    let result = upstream
        .http
        .send_with(upstream, &rt.pool_params(), ep, proto, Request::from_parts(parts, body))
        .await;
    if let Some(slot) = &in_flight {
        slot.take();
    }
    match &result {
        Ok(resp) => rt.report(index, Outcome::Status(resp.status().as_u16())),
        // An overflow never reached the endpoint; anything else is the endpoint's (or its path's) failure.
        Err(ProxyError::Overflow(_)) => {}
        Err(_) => rt.report(index, Outcome::LocalFailure),
    }
    let mut resp = result?;
    if let Some(cookie) = set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if let Some(active) = active {
        // Least request counts the request until its response body ends.
        resp = resp.map(|b| {
            Guarded {
                inner: b,
                _guard: active,
            }
            .boxed()
        });
    }
    Ok(resp)
}

/// A response body that holds something (an active-request count) until it is done or dropped.
struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Sync + Unpin + 'static> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// After a 101, both sides become raw byte streams (WebSocket and other HTTP/1.1 upgrades).
async fn splice_upgrade(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Read (and queued write) buffer bound of every HTTP/1.1 connection, inbound and pooled upstream. Hyper's
/// default (~400 KiB) lets a buffer that once carried a large body stay that large for the connection's life;
/// with pools per worker that added up to most of the waypoint's resident memory on the rig. The bytes come
/// from an in-memory HTTP/2 stream, so smaller reads cost no extra system calls. Also bounds one request or
/// response head.
pub const H1_MAX_BUF: usize = 64 * 1024;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The request's `Upgrade` protocol when it asks for one (HTTP/1.1 only; HTTP/2 has no such mechanism).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 && req.version() != Version::HTTP_10 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        req.headers().get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// RFC 9110 §7.6.1: connection-specific headers, plus any header the `Connection` header names, end at this hop.
/// `te: trailers` survives: gRPC servers require it and it is the one TE value HTTP/2 allows.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    const FIXED: [HeaderName; 8] = [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ];
    // One pass over the few names present instead of a hashed removal per hop-by-hop name: on the hot path a
    // message carries none of them, or only `connection` (this showed in the rig's profile).
    let mut present = 0u8;
    let mut te = false;
    for name in headers.keys() {
        if let Some(i) = FIXED.iter().position(|f| f == name) {
            present |= 1 << i;
        } else if name == header::TE {
            te = true;
        }
    }
    // Bit 0 is `connection` (FIXED[0]): only then can the message name more headers to drop.
    if present & 1 != 0 {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            if name == header::TE {
                te = false;
            }
            headers.remove(name);
        }
    }
    for (i, name) in FIXED.into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if !te {
        return;
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A random UUIDv4, the format Envoy uses for `x-request-id`.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // 122 random bits in the 8-4-4-4-12 layout, version nibble 4, variant bits 10; written by hand because
    // this runs for every request and `format!` showed in the profile.
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    let a = (a & !0xf000) | 0x4000;
    let b = (b & !(0xc << 60)) | (0x8 << 60);
    let mut out = [b'-'; 36];
    let mut nibbles = (0..16)
        .map(|i| (a >> (60 - 4 * i)) & 0xf)
        .chain((0..16).map(|i| (b >> (60 - 4 * i)) & 0xf));
    for (pos, slot) in out.iter_mut().enumerate() {
        if matches!(pos, 8 | 13 | 18 | 23) {
            continue;
        }
        if let Some(n) = nibbles.next() {
            *slot = HEX[n as usize];
        }
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::{HashAlgo, HashKey, LbPolicy, OutlierPolicy, TrafficPolicy};
    use crate::upstream::test_support::{backend, body, get, server, upstream};

    #[tokio::test]
    async fn responses_feed_outlier_detection_and_the_balancer_avoids_the_ejected_endpoint() {
        let up = upstream();
        let (good, bad) = (server(false).await, server(false).await);
        bad.status.store(503, std::sync::atomic::Ordering::SeqCst);
        let policy = TrafficPolicy {
            outlier: Some(OutlierPolicy {
                consecutive_5xx: None,
                consecutive_gateway: Some(2),
                max_ejection_percent: 50,
                ..OutlierPolicy::default()
            }),
            ..TrafficPolicy::default()
        };
        let b = backend("svc", PortProtocol::Http, &[good.addr, bad.addr], policy);
        let mut statuses = Vec::new();
        for _ in 0..10 {
            let resp = send_to_backend(&up, &b, get("/")).await.unwrap();
            statuses.push(resp.status().as_u16());
            body(resp).await;
        }
        // Round robin: good, bad, good, bad (second gateway error: ejected), then good only.
        assert_eq!(statuses, vec![200, 503, 200, 503, 200, 200, 200, 200, 200, 200]);
        let dump = up.registry.dump();
        let eps = dump["ns/svc:80"]["endpoints"].as_array().unwrap();
        let bad_ep = eps.iter().find(|e| e["address"] == bad.addr.to_string()).unwrap();
        assert_eq!(bad_ep["ejected"], true, "{dump}");
        assert_eq!(bad_ep["timesEjected"], 1);
    }

    #[tokio::test]
    async fn a_hash_cookie_is_set_when_absent_and_sticks() {
        let up = upstream();
        let servers = [server(false).await, server(false).await, server(false).await];
        let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
        let policy = TrafficPolicy {
            lb: LbPolicy::Hash {
                key: HashKey::Cookie {
                    name: "sticky".into(),
                    path: Some("/".into()),
                    ttl: Some(std::time::Duration::from_secs(30)),
                },
                algo: HashAlgo::Ring { min_size: 1024 },
            },
            ..TrafficPolicy::default()
        };
        let b = backend("svc", PortProtocol::Http, &addrs, policy);
        let resp = send_to_backend(&up, &b, get("/")).await.unwrap();
        let cookie = resp.headers()[header::SET_COOKIE].to_str().unwrap().to_string();
        let first = body(resp).await;
        let pair = cookie.split(';').next().unwrap().to_string();
        assert!(cookie.ends_with("; Path=/; Max-Age=30; HttpOnly"), "{cookie}");
        for _ in 0..5 {
            let mut req = get("/");
            req.headers_mut()
                .insert(header::COOKIE, HeaderValue::try_from(pair.as_str()).unwrap());
            let resp = send_to_backend(&up, &b, req).await.unwrap();
            assert!(resp.headers().get(header::SET_COOKIE).is_none());
            assert_eq!(body(resp).await, first, "the cookie keeps the client on its endpoint");
        }
    }

    #[tokio::test]
    async fn least_request_releases_the_count_when_the_body_ends() {
        let up = upstream();
        let s = server(false).await;
        let b = backend(
            "svc",
            PortProtocol::Http,
            &[s.addr],
            TrafficPolicy {
                lb: LbPolicy::LeastRequest,
                ..TrafficPolicy::default()
            },
        );
        let resp = send_to_backend(&up, &b, get("/")).await.unwrap();
        let rt = up.runtime(&b);
        assert_eq!(rt.eps[0].active.load(std::sync::atomic::Ordering::Relaxed), 1);
        body(resp).await;
        assert_eq!(rt.eps[0].active.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-custom-hop"));
        h.insert("x-custom-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-custom-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-end-to-end").unwrap(), "kept");
    }

    #[test]
    fn hop_by_hop_stripping_keeps_end_to_end_headers_and_drops_te_without_trailers() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("svc"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before, "nothing hop-by-hop: untouched");

        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic x"));
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h, before,
            "te without trailers, upgrade and proxy-authorization removed"
        );

        // `te` named by `connection` goes even with `trailers`.
        h.insert(header::CONNECTION, HeaderValue::from_static("te"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn request_ids_are_uuid_v4_and_distinct() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        let parts: Vec<&str> = s.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12]);
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
    }
}
#[cfg(test)]
mod future_size {
    use super::*;
    use crate::upstream::test_support::{backend, get, upstream};

    /// Every request's future is moved (copied) several times: into the HTTP/2 server's task, through each
    /// layer. Opening a connection (TCP or HBONE, TLS, handshakes) is boxed in the pool so it does not make
    /// every request's future that large; inline it measured 5.3 KB against 1.9 KB, and the copy showed in the
    /// profile.
    #[test]
    fn the_send_future_does_not_carry_connection_setup() {
        let up = upstream();
        let be = backend("x", PortProtocol::Http, &[], Default::default());
        let send = send_to_backend(&up, &be, get("/"));
        let size = std::mem::size_of_val(&send);
        assert!(size < 3 * 1024, "send_to_backend's future is {size} bytes");
        let call = l7::call(crate::proxy::l7::stack(up.clone(), Default::default()), get("/"));
        assert!(std::mem::size_of_val(&call) < 1024);
    }
}
