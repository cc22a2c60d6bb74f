//! CUSTOM policies: the request is judged by an external authorization server (Envoy's ext_authz).
//!
//! The layer only decides *when* to ask (a matching CUSTOM policy, before DENY and ALLOW, as Istio orders them)
//! and *what to do* with the answer; talking to the server is the waypoint's business, behind [`ExtAuthz`] (an
//! `Arc<dyn ExtAuthz>` request extension), so the policy logic is testable with a fake.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the authorization server is told about a request (the attributes of Envoy's `CheckRequest`).
#[derive(Debug, Clone)]
pub struct CheckInput {
    pub method: Method,
    /// Path and query, after path normalisation (Envoy normalises before any filter runs).
    pub path: String,
    /// The authority as the client sent it.
    pub host: String,
    /// Every request header; each client picks what its provider allows to be sent.
    pub headers: HeaderMap,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'static str,
    pub peer_principal: Option<Arc<str>>,
    pub source_ip: Option<IpAddr>,
    pub destination: Option<SocketAddr>,
}

/// Header changes for an allowed request or its response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Replace any header of that name.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Add besides existing values.
    pub append: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.append.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.append {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// The server's verdict.
#[derive(Debug, Clone)]
pub enum CheckOutcome {
    /// Continue to DENY/ALLOW, with `upstream` applied to the request and `downstream` to the response.
    Allow {
        upstream: HeaderEdits,
        downstream: HeaderEdits,
    },
    /// Answer the client with the server's status, headers and body.
    Deny {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// The server could not be asked (connect failure, timeout, malformed reply). The provider's config says
    /// whether that lets the request through (`failOpen`) or refuses it with `status_on_error`.
    Error {
        reason: String,
        fail_open: bool,
        status_on_error: StatusCode,
    },
}

/// The client side of ext_authz, one implementation per transport; the provider is the CUSTOM policy's
/// `provider.name`.
pub trait ExtAuthz: Send + Sync {
    fn check(&self, provider: &str, req: CheckInput) -> BoxFuture<CheckOutcome>;
}
