//! Pooled HTTP client connections to endpoints, each running over an [`super::UpstreamIo`] pipe.
//!
//! * HTTP/1.1: idle connections per endpoint, reused LIFO (the most recently used one is the one most likely
//!   still open). A connection goes back to the pool when its response body has been read to the end; a
//!   response dropped half-read makes hyper close the connection, so it is simply not returned.
//! * HTTP/2 (h2c inside the tunnel): one multiplexed connection per endpoint, reopened when it dies.
//!
//! A request that hyper reports as never sent (the pooled connection closed under us) is retried once on a
//! fresh connection; nothing of it reached the endpoint, so this is safe whatever the method.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Upstream;
use crate::config::Endpoint;
use crate::identity::SpiffeId;
use crate::proxy::error::ProxyError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections older than this are closed rather than reused (Envoy's upstream idle timeout is
/// 1 h; servers commonly close idle keep-alive connections much sooner, so reuse only recent ones).
const H1_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const H1_MAX_IDLE_PER_ENDPOINT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    hbone: Option<SocketAddr>,
    identity: SpiffeId,
}

impl Key {
    fn of(ep: &Endpoint) -> Key {
        Key {
            addr: ep.addr,
            hbone: ep.hbone,
            identity: ep.identity.clone(),
        }
    }
}

struct Idle {
    send: http1::SendRequest<Body>,
    since: Instant,
}

#[derive(Default)]
struct H2Entry {
    send: Option<http2::SendRequest<Body>>,
    opening: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
pub struct HttpPool {
    h1: Arc<Mutex<HashMap<Key, Vec<Idle>>>>,
    h2: Mutex<HashMap<Key, H2Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn reset(e: hyper::Error) -> ProxyError {
    ProxyError::UpstreamReset(e.to_string())
}

impl HttpPool {
    pub async fn send(
        &self,
        upstream: &Upstream,
        ep: &Endpoint,
        proto: Protocol,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        match proto {
            Protocol::Http1 => self.send_h1(upstream, ep, req).await,
            Protocol::Http2 => self.send_h2(upstream, ep, req).await,
        }
    }

    async fn checkout_h1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        loop {
            let idle = {
                let mut pool = lock(&self.h1);
                let list = pool.get_mut(key)?;
                let idle = list.pop();
                if list.is_empty() {
                    pool.remove(key);
                }
                idle?
            };
            if idle.since.elapsed() > H1_IDLE_TIMEOUT || idle.send.is_closed() {
                continue;
            }
            let mut send = idle.send;
            // Usually ready at once; otherwise the connection is finishing the previous exchange.
            if send.ready().await.is_ok() {
                return Some(send);
            }
        }
    }

    async fn open_h1(&self, upstream: &Upstream, ep: &Endpoint) -> Result<http1::SendRequest<Body>, ProxyError> {
        let io = upstream.connect(ep).await?;
        let (send, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::UpstreamConnect(e.to_string()))?;
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(send)
    }

    async fn send_h1(
        &self,
        upstream: &Upstream,
        ep: &Endpoint,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let key = Key::of(ep);
        let mut req = req;
        let mut reused = true;
        let (send, resp) = loop {
            let mut send = match self.checkout_h1(&key).await {
                Some(s) => s,
                None => {
                    reused = false;
                    self.open_h1(upstream, ep).await?
                }
            };
            match send.try_send_request(req).await {
                Ok(resp) => break (send, resp),
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
            send,
        });
        Ok(Response::from_parts(parts, ReturnOnEnd { inner: body, ret }.boxed()))
    }

    async fn send_h2(
        &self,
        upstream: &Upstream,
        ep: &Endpoint,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let key = Key::of(ep);
        let mut send = self.h2_sender(upstream, ep, &key).await?;
        send.ready().await.map_err(reset)?;
        let resp = send.send_request(req).await.map_err(reset)?;
        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
    }

    async fn h2_sender(
        &self,
        upstream: &Upstream,
        ep: &Endpoint,
        key: &Key,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let opening = {
            let mut map = lock(&self.h2);
            let entry = map.entry(key.clone()).or_default();
            if let Some(s) = entry.send.as_ref().filter(|s| !s.is_closed()) {
                return Ok(s.clone());
            }
            entry.opening.clone()
        };
        let _single = opening.lock().await;
        if let Some(s) = lock(&self.h2)
            .get(key)
            .and_then(|e| e.send.as_ref().filter(|s| !s.is_closed()).cloned())
        {
            return Ok(s);
        }
        let io = upstream.connect(ep).await?;
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
        lock(&self.h2).entry(key.clone()).or_default().send = Some(send.clone());
        Ok(send)
    }

    /// Idle HTTP/1.1 connections currently pooled (for tests and the admin endpoint).
    pub fn idle_h1(&self) -> usize {
        lock(&self.h1).values().map(Vec::len).sum()
    }
}

struct Return {
    pool: Arc<Mutex<HashMap<Key, Vec<Idle>>>>,
    key: Key,
    send: http1::SendRequest<Body>,
}

impl Return {
    fn put_back(self) {
        let mut pool = lock(&self.pool);
        let list = pool.entry(self.key).or_default();
        if list.len() < H1_MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                send: self.send,
                since: Instant::now(),
            });
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
