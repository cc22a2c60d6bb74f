//! Pooled HTTP client connections to endpoints, each running over an [`super::UpstreamIo`] pipe, one pool per
//! backend (Envoy pools per cluster, and connection limits are per backend).
//!
//! * HTTP/1.1: idle connections per endpoint, reused LIFO (the most recently used one is the one most likely
//!   still open). A connection goes back to the pool when its response body has been read to the end; a
//!   response dropped half-read makes hyper close the connection, so it is simply not returned. Idle
//!   connections older than the backend's `idleTimeout` are closed rather than reused; after
//!   `maxRequestsPerConnection` requests a connection is closed instead of returned.
//! * HTTP/2 (h2c inside the tunnel): one multiplexed connection per endpoint, reopened when it dies, and
//!   replaced by a new one after `maxRequestsPerConnection` streams (the old one finishes its streams). It is
//!   not closed for idleness (`idleTimeout` applies to HTTP/1.1 here) and not counted under `maxConnections`
//!   (one per endpoint; `http2MaxRequests` bounds its streams through the breaker layer).
//! * Idle HTTP/1.1 connections are closed by one reaper task when their idle timeout passes, so the endpoint
//!   sees them go (and their `maxConnections` permits return) without waiting for another request.
//! * `maxConnections` ([`ConnGate`]): every HTTP/1.1 connection holds a permit of the backend's circuit
//!   breaker while it is open, idle or busy. A request that finds no idle connection and no free permit waits
//!   as one of at most `http1MaxPendingRequests` pending requests until a connection of the backend is
//!   returned or closed (if the returned connection goes to another endpoint, an idle connection is closed to
//!   free its permit); beyond that bound the answer is 503 `UO` at once.
//!
//! A request that hyper reports as never sent (the pooled connection closed under us) is retried once on a
//! fresh connection; nothing of it reached the endpoint, so this is safe whatever the method.

use std::collections::HashMap;
use std::error::Error as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;
use tokio::time::Instant;
use waypoint_filters::breaker::{CircuitBreaker, Permit};

use super::Upstream;
use crate::config::Endpoint;
use crate::identity::SpiffeId;
use crate::proxy::error::ProxyError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections older than this are closed rather than reused, unless the backend's
/// `idleTimeout` says otherwise (Envoy's upstream idle timeout is 1 h; servers commonly close idle keep-alive
/// connections much sooner, so by default reuse only recent ones).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const H1_MAX_IDLE_PER_ENDPOINT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// A backend's connection limit, shared by every connection to its endpoints.
#[derive(Debug)]
pub struct ConnGate {
    pub breaker: Arc<CircuitBreaker>,
    /// Signalled when a connection is returned idle or closed (pending requests re-check).
    freed: Notify,
}

impl ConnGate {
    pub fn new(breaker: Arc<CircuitBreaker>) -> ConnGate {
        ConnGate {
            breaker,
            freed: Notify::new(),
        }
    }

    /// A connection permit, held as long as the connection (or TCP tunnel) is open.
    pub fn try_connection(self: &Arc<Self>) -> Result<ConnPermit, ProxyError> {
        let permit = self.breaker.try_connection().map_err(ProxyError::Overflow)?;
        Ok(ConnPermit {
            permit: Some(permit),
            gate: self.clone(),
        })
    }

    fn limited(&self) -> bool {
        self.breaker.limits().max_connections.is_some()
    }

    fn has_pending(&self) -> bool {
        self.breaker.in_use()[1] > 0
    }
}

/// One of a backend's `maxConnections`; released (and pending requests woken) on drop.
pub struct ConnPermit {
    permit: Option<Permit>,
    gate: Arc<ConnGate>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        // Release before waking, or the woken request would find the permit still taken.
        drop(self.permit.take());
        self.gate.freed.notify_waiters();
    }
}

/// How one backend's connections are pooled and limited.
#[derive(Debug, Clone, Copy)]
pub struct PoolParams<'a> {
    /// `None`: no connection limit and nothing counted (providers reached outside any backend).
    pub gate: Option<&'a Arc<ConnGate>>,
    pub pool_id: u64,
    pub idle_timeout: Duration,
    pub max_requests_per_connection: Option<u32>,
    pub connect_timeout: Option<Duration>,
}

impl Default for PoolParams<'_> {
    fn default() -> Self {
        PoolParams {
            gate: None,
            pool_id: 0,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_requests_per_connection: None,
            connect_timeout: None,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    hbone: Option<SocketAddr>,
    identity: SpiffeId,
    pool: u64,
    /// Each worker thread reuses the connections its own tasks drive ([`crate::workers`]).
    worker: usize,
}

impl Key {
    fn of(ep: &Endpoint, pool: u64) -> Key {
        Key {
            addr: ep.addr,
            hbone: ep.hbone,
            identity: ep.identity.clone(),
            pool,
            worker: crate::workers::current(),
        }
    }
}

struct H1Conn {
    send: http1::SendRequest<Body>,
    /// Requests sent on this connection so far.
    served: u32,
    gate: Option<Arc<ConnGate>>,
}

struct Idle {
    conn: H1Conn,
    expires: Instant,
}

/// The idle HTTP/1.1 connections, and the task that closes them when their idle timeout passes.
struct IdlePool {
    map: Mutex<HashMap<Key, Vec<Idle>>>,
    epoch: Instant,
    /// When the reaper next wakes (ns after `epoch`; `u64::MAX`: not before it is told).
    deadline: AtomicU64,
    wake: Notify,
    reaper_started: AtomicBool,
}

type IdleMap = Arc<IdlePool>;

impl IdlePool {
    fn new() -> IdlePool {
        IdlePool {
            map: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            deadline: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
            reaper_started: AtomicBool::new(false),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Makes sure the reaper wakes by `expires` (a connection just went idle until then). Only an expiry
    /// earlier than the reaper's current deadline costs more than an atomic load, and with one idle timeout
    /// per backend that is rare.
    fn schedule(self: &Arc<Self>, expires: Instant) {
        let at = self.nanos(expires);
        if at >= self.deadline.load(Ordering::Acquire) {
            return;
        }
        self.deadline.fetch_min(at, Ordering::AcqRel);
        if !self.reaper_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().reap());
        }
        self.wake.notify_one();
    }

    /// Closes idle connections when their idle timeout passes (the backend sees them close, as with Envoy's
    /// `idle_timeout`), sleeping until the earliest expiry in between.
    async fn reap(self: Arc<Self>) {
        loop {
            let next = self.purge(Instant::now());
            self.deadline
                .store(next.map_or(u64::MAX, |t| self.nanos(t)), Ordering::Release);
            match next {
                Some(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// Drops expired and closed idle connections; the earliest expiry left.
    fn purge(&self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        {
            let mut map = lock(&self.map);
            map.retain(|_, list| {
                let (keep, gone): (Vec<Idle>, Vec<Idle>) = std::mem::take(list)
                    .into_iter()
                    .partition(|idle| idle.expires > now && !idle.conn.send.is_closed());
                *list = keep;
                expired.extend(gone);
                for idle in list.iter() {
                    next = Some(next.map_or(idle.expires, |n| n.min(idle.expires)));
                }
                !list.is_empty()
            });
        }
        // Closed outside the lock.
        drop(expired);
        next
    }
}

#[derive(Default)]
struct H2Entry {
    send: Option<http2::SendRequest<Body>>,
    opening: Arc<tokio::sync::Mutex<()>>,
    /// Streams opened on `send` so far.
    streams: u32,
}

pub struct HttpPool {
    h1: IdleMap,
    h2: Mutex<HashMap<Key, H2Entry>>,
}

impl Default for HttpPool {
    fn default() -> Self {
        HttpPool {
            h1: Arc::new(IdlePool::new()),
            h2: Mutex::new(HashMap::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failed exchange: an HTTP/2 `REFUSED_STREAM` (the server did not process the request, safe to retry)
/// apart from other resets.
fn reset(e: hyper::Error) -> ProxyError {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if h2e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return ProxyError::UpstreamRefusedStream(e.to_string());
            }
            break;
        }
        source = s.source();
    }
    ProxyError::UpstreamReset(e.to_string())
}

impl HttpPool {
    /// Sends outside any backend's limits (ext_authz providers).
    pub async fn send(
        &self,
        upstream: &Upstream,
        ep: &Endpoint,
        proto: Protocol,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        self.send_with(upstream, &PoolParams::default(), ep, proto, req).await
    }

    pub async fn send_with(
        &self,
        upstream: &Upstream,
        params: &PoolParams<'_>,
        ep: &Endpoint,
        proto: Protocol,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        match proto {
            Protocol::Http1 => self.send_h1(upstream, params, ep, req).await,
            Protocol::Http2 => self.send_h2(upstream, params, ep, req).await,
        }
    }

    async fn checkout_h1(&self, key: &Key, max_requests: Option<u32>) -> Option<H1Conn> {
        loop {
            let idle = {
                let mut pool = lock(&self.h1.map);
                let list = pool.get_mut(key)?;
                let idle = list.pop();
                if list.is_empty() {
                    pool.remove(key);
                }
                idle?
            };
            // A connection that already served what `maxRequestsPerConnection` allows (the limit may have
            // been set after the connection was pooled: Envoy would have drained it with the old cluster).
            let spent = max_requests.is_some_and(|m| idle.conn.served >= m);
            if spent || idle.expires <= Instant::now() || idle.conn.send.is_closed() {
                continue;
            }
            let mut conn = idle.conn;
            // Usually ready at once; otherwise the connection is finishing the previous exchange.
            if conn.send.ready().await.is_ok() {
                return Some(conn);
            }
        }
    }

    async fn open_h1(
        &self,
        upstream: &Upstream,
        params: &PoolParams<'_>,
        ep: &Endpoint,
        permit: Option<ConnPermit>,
    ) -> Result<H1Conn, ProxyError> {
        let io = upstream.connect_with(ep, params.connect_timeout).await?;
        let (send, conn) = http1::Builder::new()
            .max_buf_size(crate::proxy::http::H1_MAX_BUF)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::UpstreamConnect(e.to_string()))?;
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
            // The connection is gone: its slot under `maxConnections` is free.
            drop(permit);
        });
        Ok(H1Conn {
            send,
            served: 0,
            gate: params.gate.cloned(),
        })
    }

    /// A connection for a request that found none idle: a new one if the limit allows, else wait as a pending
    /// request (bounded) for one to be returned or for a permit.
    async fn acquire_h1(
        &self,
        upstream: &Upstream,
        params: &PoolParams<'_>,
        ep: &Endpoint,
        key: &Key,
    ) -> Result<(H1Conn, bool), ProxyError> {
        let Some(gate) = params.gate else {
            return Ok((self.open_h1(upstream, params, ep, None).await?, false));
        };
        if let Ok(permit) = gate.try_connection() {
            return Ok((self.open_h1(upstream, params, ep, Some(permit)).await?, false));
        }
        let _pending = gate.breaker.try_pending().map_err(ProxyError::Overflow)?;
        loop {
            // Registered before looking, so a connection freed after the look still wakes this request.
            let freed = gate.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(conn) = self.checkout_h1(key, params.max_requests_per_connection).await {
                return Ok((conn, true));
            }
            if let Ok(permit) = gate.try_connection() {
                return Ok((self.open_h1(upstream, params, ep, Some(permit)).await?, false));
            }
            // Every permit is taken; if one is held by an idle connection to another endpoint, close that
            // connection (its permit comes back when it has closed, which wakes this loop).
            self.evict_idle(params.pool_id);
            freed.await;
        }
    }

    fn evict_idle(&self, pool_id: u64) -> bool {
        let evicted = {
            let mut pool = lock(&self.h1.map);
            let key = pool
                .iter()
                .find(|(k, list)| k.pool == pool_id && !list.is_empty())
                .map(|(k, _)| k.clone());
            key.and_then(|k| {
                let list = pool.get_mut(&k)?;
                // The oldest: the least likely to be reused soon.
                let idle = (!list.is_empty()).then(|| list.remove(0));
                if list.is_empty() {
                    pool.remove(&k);
                }
                idle
            })
        };
        evicted.is_some()
    }

    /// Closes idle connections past their idle timeout (also those of backends that no longer exist).
    pub fn purge_idle(&self) {
        self.h1.purge(Instant::now());
    }

    async fn send_h1(
        &self,
        upstream: &Upstream,
        params: &PoolParams<'_>,
        ep: &Endpoint,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let key = Key::of(ep, params.pool_id);
        let mut req = req;
        let (conn, resp) = loop {
            let (mut conn, reused) = match self.checkout_h1(&key, params.max_requests_per_connection).await {
                Some(c) => (c, true),
                // Boxed: opening a connection (TCP or HBONE, TLS, handshakes) is a large future, and inline it
                // would make every request's future that large, copied on each move even when a pooled
                // connection serves it.
                None => Box::pin(self.acquire_h1(upstream, params, ep, &key)).await?,
            };
            conn.served += 1;
            match conn.send.try_send_request(req).await {
                Ok(resp) => break (conn, resp),
                Err(mut e) => match e.take_message() {
                    // Never written: a stale pooled connection. Try again, on a fresh one at the latest.
                    Some(back) if reused => {
                        req = back;
                        continue;
                    }
                    _ => return Err(reset(e.into_error())),
                },
            }
        };
        let upgrade = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        let (parts, body) = resp.into_parts();
        let ret = (!upgrade).then(|| Return {
            pool: self.h1.clone(),
            key,
            conn,
            idle_timeout: params.idle_timeout,
            max_requests: params.max_requests_per_connection,
        });
        Ok(Response::from_parts(parts, ReturnOnEnd { inner: body, ret }.boxed()))
    }

    async fn send_h2(
        &self,
        upstream: &Upstream,
        params: &PoolParams<'_>,
        ep: &Endpoint,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let key = Key::of(ep, params.pool_id);
        let mut send = self.h2_sender(upstream, params, ep, &key).await?;
        send.ready().await.map_err(reset)?;
        let resp = send.send_request(req).await.map_err(reset)?;
        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
    }

    /// Takes a stream slot on the entry's connection; after the last one `maxRequestsPerConnection` allows, the
    /// next request opens a new connection.
    fn h2_take(entry: &mut H2Entry, max: Option<u32>) -> Option<http2::SendRequest<Body>> {
        // Also when the limit came with a later config than the connection.
        if max.is_some_and(|m| entry.streams >= m) {
            entry.send = None;
            return None;
        }
        let send = entry.send.as_ref().filter(|s| !s.is_closed())?.clone();
        entry.streams += 1;
        if max.is_some_and(|m| entry.streams >= m) {
            entry.send = None;
        }
        Some(send)
    }

    async fn h2_sender(
        &self,
        upstream: &Upstream,
        params: &PoolParams<'_>,
        ep: &Endpoint,
        key: &Key,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let max = params.max_requests_per_connection;
        let opening = {
            let mut map = lock(&self.h2);
            let entry = map.entry(key.clone()).or_default();
            if let Some(s) = Self::h2_take(entry, max) {
                return Ok(s);
            }
            entry.opening.clone()
        };
        // Boxed for the reason `send_h1` boxes `acquire_h1`: the common case never opens a connection.
        Box::pin(self.open_h2(upstream, params, ep, key, opening)).await
    }

    /// Opens the HTTP/2 connection of `key`, one at a time per key: a request that waited for another's open
    /// takes a stream on that connection.
    async fn open_h2(
        &self,
        upstream: &Upstream,
        params: &PoolParams<'_>,
        ep: &Endpoint,
        key: &Key,
        opening: Arc<tokio::sync::Mutex<()>>,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let max = params.max_requests_per_connection;
        let _single = opening.lock().await;
        if let Some(s) = lock(&self.h2).get_mut(key).and_then(|e| Self::h2_take(e, max)) {
            return Ok(s);
        }
        let io = upstream.connect_with(ep, params.connect_timeout).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(crate::hbone::STREAM_WINDOW)
            .initial_connection_window_size(crate::hbone::CONNECTION_WINDOW)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::UpstreamConnect(e.to_string()))?;
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        let mut map = lock(&self.h2);
        let entry = map.entry(key.clone()).or_default();
        entry.send = Some(send.clone());
        entry.streams = 0;
        Self::h2_take(entry, max);
        Ok(send)
    }

    /// Idle HTTP/1.1 connections currently pooled (for tests and the admin endpoint).
    pub fn idle_h1(&self) -> usize {
        lock(&self.h1.map).values().map(Vec::len).sum()
    }
}

struct Return {
    pool: IdleMap,
    key: Key,
    conn: H1Conn,
    idle_timeout: Duration,
    max_requests: Option<u32>,
}

impl Return {
    fn put_back(self) {
        if self.max_requests.is_some_and(|m| self.conn.served >= m) {
            // Dropped: hyper closes the connection, its permit returns and wakes pending requests.
            return;
        }
        // Only a limited backend can have pending requests; the others skip the reference count traffic.
        let gate = self.conn.gate.as_ref().filter(|g| g.limited()).cloned();
        let expires = Instant::now() + self.idle_timeout;
        {
            let mut pool = lock(&self.pool.map);
            let list = pool.entry(self.key).or_default();
            if list.len() < H1_MAX_IDLE_PER_ENDPOINT {
                list.push(Idle {
                    conn: self.conn,
                    expires,
                });
            }
        }
        self.pool.schedule(expires);
        // Checked after the connection is in the pool: a request that became pending before this point is
        // either seen here or finds the connection itself (it looks after registering for the wake-up).
        if let Some(gate) = gate
            && gate.has_pending()
        {
            gate.freed.notify_waiters();
        }
    }
}

/// Response body that returns its HTTP/1.1 connection to the pool once the body has been read to the end.
struct ReturnOnEnd {
    inner: Incoming,
    ret: Option<Return>,
}

impl HttpBody for ReturnOnEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(r) = this.ret.take() {
                    r.put_back();
                }
            }
            Poll::Ready(Some(Err(_))) => this.ret = None,
            _ => {
                if this.inner.is_end_stream()
                    && let Some(r) = this.ret.take()
                {
                    r.put_back();
                }
            }
        }
        polled.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ReturnOnEnd {
    fn drop(&mut self) {
        // hyper does not poll a body that already reports its end (empty bodies, HEAD, 204, 304).
        if self.inner.is_end_stream()
            && let Some(r) = self.ret.take()
        {
            r.put_back();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::Ordering;

    use waypoint_filters::breaker::{Limits, Overflow};

    use super::*;
    use crate::upstream::test_support::{body, endpoint, get, server, upstream};

    fn gate(limits: Limits) -> Arc<ConnGate> {
        Arc::new(ConnGate::new(Arc::new(CircuitBreaker::new(limits))))
    }

    fn params(gate: &Arc<ConnGate>) -> PoolParams<'_> {
        PoolParams {
            gate: Some(gate),
            pool_id: 1,
            ..PoolParams::default()
        }
    }

    /// Yields until `cond` holds (waiting on an event another task causes, without a timer).
    async fn until(cond: impl Fn() -> bool) {
        while !cond() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn max_connections_queues_pending_requests_and_overflows_beyond_the_bound() {
        let up = upstream();
        let s = server(false).await;
        // Hold every response until released.
        s.gate.forget_permits(tokio::sync::Semaphore::MAX_PERMITS);
        let ep = endpoint(s.addr);
        let g = gate(Limits {
            max_connections: Some(1),
            max_pending: Some(1),
            ..Limits::default()
        });
        let first = {
            let (up, ep, g) = (up.clone(), ep.clone(), g.clone());
            tokio::spawn(async move {
                up.http
                    .send_with(&up, &params(&g), &ep, Protocol::Http1, get("/a"))
                    .await
            })
        };
        until(|| s.requests.load(Ordering::SeqCst) == 1).await;
        assert_eq!(g.breaker.in_use()[0], 1, "one connection open");
        let second = {
            let (up, ep, g) = (up.clone(), ep.clone(), g.clone());
            tokio::spawn(async move {
                up.http
                    .send_with(&up, &params(&g), &ep, Protocol::Http1, get("/b"))
                    .await
            })
        };
        until(|| g.breaker.in_use()[1] == 1).await;
        // The connection is busy and the one pending slot is taken: the third overflows at once.
        let third = up
            .http
            .send_with(&up, &params(&g), &ep, Protocol::Http1, get("/c"))
            .await;
        assert!(
            matches!(third, Err(ProxyError::Overflow(Overflow::Pending))),
            "{third:?}"
        );

        // Releasing the first response returns the connection, which the pending request then uses.
        s.gate.add_permits(2);
        let first = first.await.unwrap().unwrap();
        assert_eq!(body(first).await, s.addr.to_string());
        let second = second.await.unwrap().unwrap();
        assert_eq!(body(second).await, s.addr.to_string());
        assert_eq!(
            s.connections.load(Ordering::SeqCst),
            1,
            "the pending request reused the connection"
        );
        assert_eq!(g.breaker.in_use()[..2], [1, 0]);
        assert_eq!(up.http.idle_h1(), 1);
    }

    #[tokio::test]
    async fn pending_request_for_another_endpoint_gets_the_permit_of_an_idle_connection() {
        let up = upstream();
        let (a, b) = (server(false).await, server(false).await);
        let g = gate(Limits {
            max_connections: Some(1),
            ..Limits::default()
        });
        let resp = up
            .http
            .send_with(&up, &params(&g), &endpoint(a.addr), Protocol::Http1, get("/"))
            .await
            .unwrap();
        body(resp).await;
        assert_eq!(up.http.idle_h1(), 1, "a's connection is idle and holds the only permit");
        let resp = up
            .http
            .send_with(&up, &params(&g), &endpoint(b.addr), Protocol::Http1, get("/"))
            .await
            .unwrap();
        assert_eq!(body(resp).await, b.addr.to_string());
        assert_eq!(g.breaker.in_use()[..2], [1, 0]);
    }

    #[tokio::test]
    async fn zero_pending_overflows_when_connections_are_full() {
        let up = upstream();
        let s = server(false).await;
        s.gate.forget_permits(tokio::sync::Semaphore::MAX_PERMITS);
        let g = gate(Limits {
            max_connections: Some(1),
            max_pending: Some(0),
            ..Limits::default()
        });
        let ep = endpoint(s.addr);
        let _busy = {
            let (up, ep, g) = (up.clone(), ep.clone(), g.clone());
            tokio::spawn(async move {
                up.http
                    .send_with(&up, &params(&g), &ep, Protocol::Http1, get("/"))
                    .await
            })
        };
        until(|| s.requests.load(Ordering::SeqCst) == 1).await;
        let r = up
            .http
            .send_with(&up, &params(&g), &ep, Protocol::Http1, get("/"))
            .await;
        assert!(matches!(r, Err(ProxyError::Overflow(Overflow::Pending))), "{r:?}");
        s.gate.add_permits(1);
    }

    async fn sequential(up: &Upstream, p: &PoolParams<'_>, addr: SocketAddr, proto: Protocol, n: usize) {
        for _ in 0..n {
            let resp = up
                .http
                .send_with(up, p, &endpoint(addr), proto, get("http://svc/"))
                .await
                .unwrap();
            body(resp).await;
        }
    }

    #[tokio::test]
    async fn max_requests_per_connection_closes_http1_connections() {
        let up = upstream();
        let s = server(false).await;
        let g = gate(Limits::default());
        let p = PoolParams {
            max_requests_per_connection: Some(2),
            ..params(&g)
        };
        sequential(&up, &p, s.addr, Protocol::Http1, 5).await;
        assert_eq!(s.connections.load(Ordering::SeqCst), 3, "2 + 2 + 1");
        // Without the limit, one connection serves them all.
        let s = server(false).await;
        sequential(&up, &params(&g), s.addr, Protocol::Http1, 5).await;
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn max_requests_per_connection_rotates_http2_connections() {
        let up = upstream();
        let s = server(true).await;
        let g = gate(Limits::default());
        let p = PoolParams {
            max_requests_per_connection: Some(2),
            ..params(&g)
        };
        sequential(&up, &p, s.addr, Protocol::Http2, 5).await;
        assert_eq!(s.connections.load(Ordering::SeqCst), 3);
        assert_eq!(s.requests.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn idle_timeout_is_per_backend() {
        let up = upstream();
        let s = server(false).await;
        let g = gate(Limits::default());
        let p = PoolParams {
            idle_timeout: Duration::ZERO,
            ..params(&g)
        };
        sequential(&up, &p, s.addr, Protocol::Http1, 3).await;
        assert_eq!(
            s.connections.load(Ordering::SeqCst),
            3,
            "an idle connection expired at once is not reused"
        );
        up.http.purge_idle();
        assert_eq!(up.http.idle_h1(), 0, "expired idle connections are purged");
    }

    #[tokio::test]
    async fn idle_connections_are_closed_when_their_idle_timeout_passes() {
        let up = upstream();
        let s = server(false).await;
        let g = gate(Limits::default());
        let p = PoolParams {
            idle_timeout: Duration::from_millis(50),
            ..params(&g)
        };
        sequential(&up, &p, s.addr, Protocol::Http1, 1).await;
        // Closed by the pool's reaper, without another request coming along.
        s.closed_at_least(1).await;
        assert_eq!(up.http.idle_h1(), 0);
        until(|| g.breaker.in_use()[0] == 0).await;
    }

    #[tokio::test]
    async fn a_new_requests_per_connection_limit_applies_to_pooled_connections() {
        let up = upstream();
        let (h1, h2) = (server(false).await, server(true).await);
        let g = gate(Limits::default());
        for (s, proto) in [(&h1, Protocol::Http1), (&h2, Protocol::Http2)] {
            sequential(&up, &params(&g), s.addr, proto, 3).await;
            assert_eq!(s.connections.load(Ordering::SeqCst), 1);
            let limited = PoolParams {
                max_requests_per_connection: Some(1),
                ..params(&g)
            };
            sequential(&up, &limited, s.addr, proto, 2).await;
            assert_eq!(
                s.connections.load(Ordering::SeqCst),
                3,
                "{proto:?}: one fresh connection per request"
            );
        }
    }

    #[tokio::test]
    async fn backends_do_not_share_connections() {
        let up = upstream();
        let s = server(false).await;
        let (g1, g2) = (gate(Limits::default()), gate(Limits::default()));
        sequential(&up, &params(&g1), s.addr, Protocol::Http1, 2).await;
        let p2 = PoolParams {
            pool_id: 2,
            ..params(&g2)
        };
        sequential(&up, &p2, s.addr, Protocol::Http1, 2).await;
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
        assert_eq!((g1.breaker.in_use()[0], g2.breaker.in_use()[0]), (1, 1));
    }

    #[tokio::test]
    async fn refused_stream_is_told_apart_from_a_reset() {
        let listener = tokio::net::TcpListener::bind((crate::upstream::test_support::next_ip(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let mut n = 0;
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                n += 1;
                respond.send_reset(if n == 1 {
                    h2::Reason::REFUSED_STREAM
                } else {
                    h2::Reason::INTERNAL_ERROR
                });
            }
        });
        let up = upstream();
        let ep = endpoint(addr);
        let r = up.http.send(&up, &ep, Protocol::Http2, get("http://svc/")).await;
        assert!(matches!(r, Err(ProxyError::UpstreamRefusedStream(_))), "{r:?}");
        let r = up.http.send(&up, &ep, Protocol::Http2, get("http://svc/")).await;
        assert!(matches!(r, Err(ProxyError::UpstreamReset(_))), "{r:?}");
    }
}
