//! One HTTP exchange through the mesh: a fresh CONNECT tunnel from a source ztunnel to the waypoint (the Go
//! client runs with keep-alives disabled, so every request is a new connection), then HTTP/1.1, h2c prior
//! knowledge, or a unary gRPC call inside.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};

use crate::client::{self, ClientError};
use crate::source_ztunnel::{SourceError, SourceZtunnel};

/// The gRPC method the Istio echo client calls.
pub const GRPC_ECHO_PATH: &str = "/proto.EchoTestService/Echo";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Http1,
    /// Cleartext HTTP/2 without upgrade.
    H2c,
    /// A unary gRPC call (h2c, `application/grpc`, one empty message).
    Grpc,
}

#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// `ip:port` of the CONNECT.
    pub authority: String,
    pub method: String,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub host: String,
    /// The request target, sent verbatim (query included).
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub wire: Wire,
    /// `Connection: close`, what Go sends with keep-alives disabled.
    pub connection_close: bool,
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names, one entry per value, in order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub trailers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Tunnel(#[from] SourceError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    #[error("cannot build the request: {0}")]
    Invalid(String),
}

pub async fn send(source: &SourceZtunnel, request: &HttpRequest, timeout: Duration) -> Result<HttpResponse, SendError> {
    match tokio::time::timeout(timeout, exchange(source, request)).await {
        Ok(result) => result,
        Err(_) => Err(SendError::Timeout(timeout)),
    }
}

async fn exchange(source: &SourceZtunnel, request: &HttpRequest) -> Result<HttpResponse, SendError> {
    let built = build(request)?;
    let tunnel = source.connect(&request.authority).await?;
    let reply = match request.wire {
        Wire::Http1 => {
            let mut send = client::http1(tunnel).await?;
            client::send1(&mut send, built).await?
        }
        Wire::H2c | Wire::Grpc => {
            let mut send = client::http2(tunnel).await?;
            client::send2(&mut send, built).await?
        }
    };
    let pairs = |map: &http::HeaderMap| -> Vec<(String, String)> {
        map.iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    };
    Ok(HttpResponse {
        status: reply.status.as_u16(),
        headers: pairs(&reply.headers),
        body: reply.body,
        trailers: reply.trailers.as_ref().map(pairs).unwrap_or_default(),
    })
}

fn build(request: &HttpRequest) -> Result<Request<client::Body>, SendError> {
    let invalid = |what: String| SendError::Invalid(what);
    let method =
        Method::from_bytes(request.method.as_bytes()).map_err(|_| invalid(format!("method {:?}", request.method)))?;
    let path = if request.path.is_empty() { "/" } else { &request.path };
    let uri: Uri = match request.wire {
        Wire::Http1 => path.parse(),
        Wire::H2c | Wire::Grpc => format!("http://{}{path}", request.host).parse(),
    }
    .map_err(|e| invalid(format!("request target {path:?}: {e}")))?;
    let mut builder = Request::builder().method(method).uri(uri);
    if request.wire == Wire::Http1 {
        builder = builder.header(http::header::HOST, header_value(&request.host)?);
    }
    for (name, value) in &request.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid(format!("header name {name:?}")))?;
        builder = builder.header(name, header_value(value)?);
    }
    if request.connection_close && request.wire == Wire::Http1 {
        builder = builder.header(http::header::CONNECTION, "close");
    }
    let body = if request.wire == Wire::Grpc {
        builder = builder
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers");
        // One uncompressed, empty message: an EchoRequest with no fields set.
        client::body(Bytes::from_static(&[0, 0, 0, 0, 0]))
    } else {
        client::empty()
    };
    builder.body(body).map_err(|e| invalid(e.to_string()))
}

fn header_value(value: &str) -> Result<HeaderValue, SendError> {
    HeaderValue::from_str(value).map_err(|_| SendError::Invalid(format!("header value {value:?}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(wire: Wire) -> HttpRequest {
        HttpRequest {
            authority: "10.200.0.1:80".into(),
            method: "GET".into(),
            host: "10.200.0.1".into(),
            path: "/?ANIMAL=Whale&x=%20".into(),
            headers: vec![("X-Echo-Set-Header".into(), String::new())],
            wire,
            connection_close: true,
        }
    }

    #[test]
    fn http1_requests_keep_the_target_verbatim() {
        let r = build(&request(Wire::Http1)).unwrap();
        assert_eq!(r.uri().to_string(), "/?ANIMAL=Whale&x=%20");
        assert_eq!(r.headers()["host"], "10.200.0.1");
        assert_eq!(r.headers()["connection"], "close");
        assert_eq!(r.headers()["x-echo-set-header"], "");
    }

    #[test]
    fn h2c_and_grpc_carry_the_authority_in_the_uri() {
        let r = build(&request(Wire::H2c)).unwrap();
        assert_eq!(r.uri().authority().unwrap().as_str(), "10.200.0.1");
        assert!(r.headers().get("host").is_none() && r.headers().get("connection").is_none());
        let mut g = request(Wire::Grpc);
        g.method = "POST".into();
        g.path = GRPC_ECHO_PATH.into();
        let r = build(&g).unwrap();
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["te"], "trailers");
        let mut bad = request(Wire::Http1);
        bad.method = "GE T".into();
        assert!(matches!(build(&bad), Err(SendError::Invalid(_))));
    }
}
