//! HTTP clients over HBONE tunnels, for tests and the demo: a hyper HTTP/1.1 or h2c client connection on top
//! of one CONNECT stream from the source-ztunnel stand-in.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::source_ztunnel::{SourceError, SourceZtunnel};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("tunnel: {0}")]
    Tunnel(#[from] SourceError),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("body: {0}")]
    Body(BoxError),
    #[error("request: {0}")]
    Request(#[from] http::Error),
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub fn body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    body(Bytes::new())
}

/// An HTTP/1.1 client connection over `io`; the connection task runs in the background.
pub async fn http1<IO>(io: IO) -> Result<http1::SendRequest<Body>, ClientError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// An h2c (prior knowledge) client connection over `io`.
pub async fn http2<IO>(io: IO) -> Result<http2::SendRequest<Body>, ClientError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Read a response to the end, trailers included.
pub async fn collect<B>(resp: Response<B>) -> Result<Reply, ClientError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, b) = resp.into_parts();
    let collected = b.collect().await.map_err(|e| ClientError::Body(e.into()))?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// One HTTP/1.1 request in a fresh tunnel to `authority` (a service VIP:port).
pub async fn request(source: &SourceZtunnel, authority: &str, req: Request<Body>) -> Result<Reply, ClientError> {
    let tunnel = source.connect(authority).await?;
    let mut send = http1(tunnel).await?;
    let resp = send.send_request(req).await?;
    collect(resp).await
}

/// `GET path` with `Host: host` in a fresh tunnel.
pub async fn get(source: &SourceZtunnel, authority: &str, host: &str, path: &str) -> Result<Reply, ClientError> {
    let req = Request::get(path).header(http::header::HOST, host).body(empty())?;
    request(source, authority, req).await
}

/// Send on a kept-alive HTTP/1.1 connection: waits until the previous exchange has finished (hyper refuses a
/// request on a connection that is not ready yet) and reads the response to the end.
pub async fn send1(send: &mut http1::SendRequest<Body>, req: Request<Body>) -> Result<Reply, ClientError> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    collect(resp).await
}

/// Send on an h2c connection and read the response to the end.
pub async fn send2(send: &mut http2::SendRequest<Body>, req: Request<Body>) -> Result<Reply, ClientError> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    collect(resp).await
}
