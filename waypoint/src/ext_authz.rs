//! The ext_authz clients behind CUSTOM AuthorizationPolicies: Envoy's HTTP authorization service and the gRPC
//! `envoy.service.auth.v3.Authorization/Check`, both sent through the upstream pools, so a provider Service is
//! reached like any other (plain TCP or HBONE per endpoint) and an IP-literal provider is dialled directly.
//!
//! The decision logic (when to ask, what an answer means for the request) lives in
//! `waypoint_filters::authz::custom`; this module only turns a [`CheckInput`] into a request to the provider and
//! the reply into a [`CheckOutcome`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use waypoint_filters::authz::{BoxFuture, CheckInput, CheckOutcome, ExtAuthz, HeaderEdits, StringMatch};
use waypoint_proto::ext_authz as pb;

use crate::config::security::{ExtAuthzKind, ExtAuthzProvider, HttpCheckSettings, ProviderTarget};
use crate::config::{Endpoint, PortProtocol, Snapshot};
use crate::identity::SpiffeId;
use crate::proxy::error::ProxyError;
use crate::upstream::Upstream;
use crate::upstream::http_pool::{Body, Protocol};

/// Bound on what is read of an authorization server's reply (its deny body is relayed to the client).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExtAuthzError {
    #[error("no ext_authz provider {0:?} in this config snapshot")]
    UnknownProvider(String),
    #[error("provider service {0} has no endpoint")]
    NoEndpoint(String),
    #[error("{0}")]
    Upstream(#[from] ProxyError),
    #[error("timed out")]
    Timeout,
    #[error("reading the reply: {0}")]
    Body(String),
    #[error("the HTTP authorization service answered {0}")]
    ServerError(StatusCode),
    #[error("gRPC status {code}: {message}")]
    Grpc { code: String, message: String },
    #[error("bad gRPC reply: {0}")]
    BadReply(String),
}

/// One client per request, bound to the snapshot the request is served from (providers and Services change
/// together with the policies that name them).
pub struct ExtAuthzClient {
    pub upstream: Arc<Upstream>,
    pub snapshot: Arc<Snapshot>,
}

impl ExtAuthz for ExtAuthzClient {
    fn check(&self, provider: &str, req: CheckInput) -> BoxFuture<CheckOutcome> {
        let Some(p) = self.snapshot.security.extension_providers.get(provider).cloned() else {
            let e = ExtAuthzError::UnknownProvider(provider.to_string());
            return Box::pin(std::future::ready(CheckOutcome::Error {
                reason: e.to_string(),
                fail_open: false,
                status_on_error: StatusCode::FORBIDDEN,
            }));
        };
        let upstream = self.upstream.clone();
        let snapshot = self.snapshot.clone();
        Box::pin(async move {
            let result = match tokio::time::timeout(p.timeout, check(&upstream, &snapshot, &p, req)).await {
                Ok(r) => r,
                Err(_) => Err(ExtAuthzError::Timeout),
            };
            result.unwrap_or_else(|e| CheckOutcome::Error {
                reason: format!("provider {}: {e}", p.name),
                fail_open: p.fail_open,
                status_on_error: p.status_on_error,
            })
        })
    }
}

type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<CheckOutcome, ExtAuthzError>> + Send + 'a>>;

/// Boxed with an explicit `Send` (built in a plain function): inside an `async fn`, rustc cannot prove `Send`
/// for the pool's futures over every lifetime of `Body`'s boxed error (the higher-ranked limit `proxy::http`
/// works around the same way).
fn check<'a>(
    upstream: &'a Upstream,
    snapshot: &'a Snapshot,
    p: &'a ExtAuthzProvider,
    input: CheckInput,
) -> CheckFuture<'a> {
    Box::pin(check_inner(upstream, snapshot, p, input))
}

async fn check_inner(
    upstream: &Upstream,
    snapshot: &Snapshot,
    p: &ExtAuthzProvider,
    input: CheckInput,
) -> Result<CheckOutcome, ExtAuthzError> {
    let (ep, declared) = endpoint(snapshot, p)?;
    match &p.kind {
        ExtAuthzKind::Http(settings) => {
            // The port's declared protocol decides, as for any upstream; HTTP/1.1 when it says nothing.
            let proto = if declared == PortProtocol::Http2 {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
            let req = http_check_request(p, settings, &input, proto)?;
            let resp = upstream.http.send(upstream, &ep, proto, req).await?;
            // 200 allows; a 5xx is a failure of the authorization service (Envoy treats it as an error, so
            // `failOpen` and `statusOnError` apply); any other status denies with it.
            let status = resp.status();
            if status.is_server_error() {
                return Err(ExtAuthzError::ServerError(status));
            }
            let (parts, body) = resp.into_parts();
            if status == StatusCode::OK {
                return Ok(http_allow(settings, &parts.headers));
            }
            let (body, _) = read_body(body).await?;
            Ok(http_deny(settings, status, &parts.headers, body))
        }
        ExtAuthzKind::Grpc => {
            let req = grpc_check_request(p, &input)?;
            let resp = upstream.http.send(upstream, &ep, Protocol::Http2, req).await?;
            grpc_outcome(resp).await
        }
    }
}

/// The endpoint to ask, and the provider port's declared protocol.
fn endpoint(snapshot: &Snapshot, p: &ExtAuthzProvider) -> Result<(Arc<Endpoint>, PortProtocol), ExtAuthzError> {
    match &p.target {
        ProviderTarget::Addr(addr) => Ok((
            Arc::new(Endpoint {
                addr: *addr,
                hbone: None,
                // Not checked on plain TCP; it only keys the connection pool.
                identity: SpiffeId::new("ext-authz", "ext-authz", &p.name),
                workload: Arc::from(format!("ext-authz/{}", p.name)),
                namespace: Arc::from(""),
                labels: BTreeMap::new(),
                locality: Default::default(),
            }),
            PortProtocol::Detect,
        )),
        ProviderTarget::Service { namespace, name, port } => {
            let backend = snapshot
                .backends
                .iter()
                .find(|b| &*b.namespace == namespace && &*b.service == name && b.port == *port)
                .ok_or_else(|| {
                    ExtAuthzError::NoEndpoint(format!("{namespace}/{name}:{port} (unknown service port)"))
                })?;
            let ep = backend
                .pick()
                .cloned()
                .ok_or_else(|| ExtAuthzError::NoEndpoint(format!("{namespace}/{name}:{port}")))?;
            Ok((ep, backend.protocol))
        }
    }
}

fn empty() -> Body {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed()
}

fn uri(proto: Protocol, authority: &str, path: &str) -> Result<Uri, ExtAuthzError> {
    let bad = |e: String| ExtAuthzError::Upstream(ProxyError::BadRequest(e));
    match proto {
        Protocol::Http1 => Uri::try_from(path).map_err(|e| bad(e.to_string())),
        Protocol::Http2 => Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|e| bad(e.to_string())),
    }
}

fn matches_any(list: &[StringMatch], name: &HeaderName) -> bool {
    list.iter().any(|m| m.matches(name.as_str()))
}

/// Envoy's HTTP authorization request: the client's method and `<pathPrefix><path>`, no body
/// (`content-length: 0`), the client's `Host`, the headers `includeRequestHeadersInCheck` allows, and
/// `includeAdditionalHeadersInCheck`.
fn http_check_request(
    p: &ExtAuthzProvider,
    settings: &HttpCheckSettings,
    input: &CheckInput,
    proto: Protocol,
) -> Result<Request<Body>, ExtAuthzError> {
    let path = format!("{}{}", settings.path_prefix, input.path);
    let authority = if input.host.is_empty() {
        &p.authority
    } else {
        &input.host
    };
    let mut req = Request::new(empty());
    *req.method_mut() = input.method.clone();
    *req.uri_mut() = uri(proto, authority, &path)?;
    *req.version_mut() = match proto {
        Protocol::Http1 => Version::HTTP_11,
        Protocol::Http2 => Version::HTTP_2,
    };
    let headers = req.headers_mut();
    for (name, value) in &input.headers {
        if name != header::HOST
            && name != header::CONTENT_LENGTH
            && matches_any(&settings.include_request_headers, name)
        {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &settings.additional_headers {
        headers.insert(name.clone(), value.clone());
    }
    if proto == Protocol::Http1 {
        let host = HeaderValue::try_from(authority.as_str())
            .map_err(|e| ExtAuthzError::Upstream(ProxyError::BadRequest(e.to_string())))?;
        headers.insert(header::HOST, host);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    Ok(req)
}

/// Reads a reply up to [`MAX_RESPONSE_BYTES`] (frame by frame: `http_body_util::Limited` over `Body` trips the
/// same higher-ranked `Send` limit as above).
async fn read_body(mut body: Body) -> Result<(Bytes, Option<HeaderMap>), ExtAuthzError> {
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ExtAuthzError::Body(e.to_string()))?;
        match frame.into_data() {
            Ok(chunk) => {
                if data.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(ExtAuthzError::Body(format!("longer than {MAX_RESPONSE_BYTES} bytes")));
                }
                data.extend_from_slice(&chunk);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((Bytes::from(data), trailers))
}

/// Headers that describe the server's own message, not something to relay.
fn is_framing(name: &HeaderName) -> bool {
    [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::HOST,
        header::DATE,
        header::SERVER,
    ]
    .contains(name)
}

const HEADERS_TO_REMOVE: HeaderName = HeaderName::from_static("x-envoy-auth-headers-to-remove");

fn http_allow(settings: &HttpCheckSettings, reply: &HeaderMap) -> CheckOutcome {
    let mut upstream = HeaderEdits::default();
    let mut downstream = HeaderEdits::default();
    for (name, value) in reply {
        if is_framing(name) {
            continue;
        }
        if matches_any(&settings.headers_to_upstream_on_allow, name) {
            upstream.set.push((name.clone(), value.clone()));
        }
        if matches_any(&settings.headers_to_downstream_on_allow, name) {
            downstream.append.push((name.clone(), value.clone()));
        }
    }
    // Envoy's HTTP-service way of consuming credentials: a comma-separated list of request headers to drop.
    upstream.remove = reply
        .get_all(HEADERS_TO_REMOVE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| n != header::HOST)
        .collect();
    CheckOutcome::Allow { upstream, downstream }
}

fn http_deny(settings: &HttpCheckSettings, status: StatusCode, reply: &HeaderMap, body: Bytes) -> CheckOutcome {
    let mut headers = HeaderMap::new();
    for (name, value) in reply {
        // No list = every header of the server's reply (Envoy), except the ones framing its own message.
        let wanted = settings.headers_to_downstream_on_deny.is_empty()
            || matches_any(&settings.headers_to_downstream_on_deny, name);
        if wanted && !is_framing(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    CheckOutcome::Deny { status, headers, body }
}

fn socket_address(ip: Option<std::net::IpAddr>, port: u16) -> Option<pb::Address> {
    ip.map(|ip| pb::Address {
        socket_address: Some(pb::SocketAddress {
            protocol: 0,
            address: ip.to_string(),
            port_value: u32::from(port),
        }),
    })
}

/// The `CheckRequest` Envoy would send: every request header (pseudo-headers included, repeated ones joined
/// with `,`), the peers' addresses and the client's SPIFFE identity.
pub fn check_request(input: &CheckInput) -> pb::CheckRequest {
    let mut headers: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (name, value) in &input.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    headers.insert(":authority".into(), input.host.clone());
    headers.insert(":method".into(), input.method.to_string());
    headers.insert(":path".into(), input.path.clone());
    let (path, query) = match input.path.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (input.path.clone(), String::new()),
    };
    let id = input
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(pb::Peer {
                address: socket_address(input.source_ip, 0),
                principal: input
                    .peer_principal
                    .as_deref()
                    .map(|p| format!("spiffe://{p}"))
                    .unwrap_or_default(),
                ..Default::default()
            }),
            destination: Some(pb::Peer {
                address: input.destination.and_then(|d| socket_address(Some(d.ip()), d.port())),
                ..Default::default()
            }),
            request: Some(pb::Request {
                http: Some(pb::HttpRequest {
                    id,
                    method: input.method.to_string(),
                    headers,
                    path,
                    host: input.host.clone(),
                    scheme: "http".into(),
                    query,
                    protocol: input.protocol.to_string(),
                    ..Default::default()
                }),
            }),
            context_extensions: Default::default(),
        }),
    }
}

fn grpc_check_request(p: &ExtAuthzProvider, input: &CheckInput) -> Result<Request<Body>, ExtAuthzError> {
    let mut req = Request::new(full(pb::grpc_frame(&check_request(input))));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri(Protocol::Http2, &p.authority, pb::CHECK_PATH)?;
    *req.version_mut() = Version::HTTP_2;
    let headers = req.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let timeout_ms = p.timeout.as_millis().min(99_999_999);
    if let Ok(v) = HeaderValue::try_from(format!("{timeout_ms}m")) {
        headers.insert("grpc-timeout", v);
    }
    Ok(req)
}

/// `append` wins when set; otherwise Envoy's `append_action` (1, add-if-absent, is approximated by append).
fn header_option(opt: &pb::HeaderValueOption, edits: &mut HeaderEdits, default_append: bool) {
    let Some(h) = &opt.header else { return };
    let Ok(name) = HeaderName::from_bytes(h.key.as_bytes()) else {
        return;
    };
    let raw = if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    };
    let Ok(value) = HeaderValue::from_bytes(raw) else {
        return;
    };
    let append = match &opt.append {
        Some(b) => b.value,
        None if opt.append_action == 0 => default_append,
        None => opt.append_action == 1,
    };
    if append {
        edits.append.push((name, value));
    } else {
        edits.set.push((name, value));
    }
}

async fn grpc_outcome(resp: Response<Body>) -> Result<CheckOutcome, ExtAuthzError> {
    if resp.status() != StatusCode::OK {
        return Err(ExtAuthzError::BadReply(format!("HTTP status {}", resp.status())));
    }
    let (parts, body) = resp.into_parts();
    let (bytes, trailers) = read_body(body).await?;
    // A trailers-only reply carries grpc-status in the headers.
    let meta = trailers
        .as_ref()
        .filter(|t| t.contains_key("grpc-status"))
        .unwrap_or(&parts.headers);
    let code = meta.get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("");
    if code != "0" {
        let message = meta
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        return Err(ExtAuthzError::Grpc {
            code: if code.is_empty() { "missing".into() } else { code.into() },
            message,
        });
    }
    let reply: pb::CheckResponse = pb::grpc_unframe(&bytes).map_err(|e| ExtAuthzError::BadReply(e.to_string()))?;
    Ok(grpc_decision(reply))
}

/// `status.code` 0 allows (with `ok_response`'s header edits); anything else denies with `denied_response`
/// (403 when the server gives no HTTP status).
pub fn grpc_decision(reply: pb::CheckResponse) -> CheckOutcome {
    let allowed = reply.status.as_ref().is_none_or(|s| s.code == 0);
    if allowed {
        let mut upstream = HeaderEdits::default();
        let mut downstream = HeaderEdits::default();
        if let Some(pb::HttpResponse::OkResponse(ok)) = &reply.http_response {
            for h in &ok.headers {
                header_option(h, &mut upstream, false);
            }
            upstream.remove = ok
                .headers_to_remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .filter(|n| n != header::HOST)
                .collect();
            for h in &ok.response_headers_to_add {
                header_option(h, &mut downstream, false);
            }
        }
        return CheckOutcome::Allow { upstream, downstream };
    }
    let mut status = StatusCode::FORBIDDEN;
    let mut edits = HeaderEdits::default();
    let mut body = Bytes::new();
    if let Some(pb::HttpResponse::DeniedResponse(denied)) = reply.http_response {
        if let Some(code) = denied
            .status
            .and_then(|s| u16::try_from(s.code).ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .filter(|c| c.as_u16() >= 200)
        {
            status = code;
        }
        for h in &denied.headers {
            header_option(h, &mut edits, false);
        }
        body = Bytes::from(denied.body);
    }
    let mut headers = HeaderMap::new();
    edits.apply(&mut headers);
    CheckOutcome::Deny { status, headers, body }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn grpc_replies_map_to_outcomes() {
        let hv = |k: &str, v: &str, append: Option<bool>| pb::HeaderValueOption {
            header: Some(pb::HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: vec![],
            }),
            append: append.map(|value| pb::BoolValue { value }),
            append_action: 0,
        };
        let ok = pb::CheckResponse {
            status: Some(pb::RpcStatus::default()),
            http_response: Some(pb::HttpResponse::OkResponse(pb::OkHttpResponse {
                headers: vec![hv("x-user", "alice", None), hv("x-tag", "t", Some(true))],
                headers_to_remove: vec!["authorization".into(), "host".into()],
                response_headers_to_add: vec![hv("x-down", "1", None)],
            })),
        };
        let CheckOutcome::Allow { upstream, downstream } = grpc_decision(ok) else {
            panic!("allowed")
        };
        assert_eq!(upstream.set[0].0, "x-user");
        assert_eq!(upstream.append[0].0, "x-tag");
        assert_eq!(upstream.remove, vec![header::AUTHORIZATION]);
        assert_eq!(downstream.set[0].0, "x-down");

        let denied = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 7,
                message: "denied".into(),
            }),
            http_response: Some(pb::HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
                status: Some(pb::HttpStatus { code: 401 }),
                headers: vec![hv("www-authenticate", "Bearer", None)],
                body: "who are you".into(),
            })),
        };
        let CheckOutcome::Deny { status, headers, body } = grpc_decision(denied) else {
            panic!("denied")
        };
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_eq!(body, "who are you");

        let bare = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 7,
                message: String::new(),
            }),
            http_response: None,
        };
        let CheckOutcome::Deny { status, .. } = grpc_decision(bare) else {
            panic!("denied")
        };
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn check_request_carries_the_attributes() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.insert("x-request-id", HeaderValue::from_static("rid"));
        let input = CheckInput {
            method: http::Method::POST,
            path: "/p?q=1".into(),
            host: "echo.app".into(),
            headers,
            protocol: "HTTP/1.1",
            peer_principal: Some("cluster.local/ns/a/sa/b".into()),
            source_ip: "10.0.0.1".parse().ok(),
            destination: "10.96.0.1:80".parse().ok(),
        };
        let req = check_request(&input);
        let attrs = req.attributes.unwrap();
        let http = attrs.request.unwrap().http.unwrap();
        assert_eq!(http.path, "/p");
        assert_eq!(http.query, "q=1");
        assert_eq!(http.method, "POST");
        assert_eq!(http.id, "rid");
        assert_eq!(http.headers["x-a"], "1,2");
        assert_eq!(http.headers[":path"], "/p?q=1");
        assert_eq!(attrs.source.unwrap().principal, "spiffe://cluster.local/ns/a/sa/b");
        let dest = attrs.destination.unwrap().address.unwrap().socket_address.unwrap();
        assert_eq!((dest.address.as_str(), dest.port_value), ("10.96.0.1", 80));
    }
}
