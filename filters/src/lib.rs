//! Tower layers for the waypoint's L7 policies. Each policy is one layer with its own compiled config type,
//! so the dependency arrow points one way (waypoint → filters) and each layer is testable with plain structs.
//!
//! The waypoint composes the per-request layers in this order (outermost first):
//! [`route`] → [`backend`] → [`fault`] → [`cors`] → [`redirect`] → [`headers::RequestHeadersLayer`] →
//! [`rewrite`] → [`mirror`] → [`headers::ResponseHeadersLayer`] → [`timeout::TimeoutLayer::request`] →
//! [`retry`] → [`timeout::TimeoutLayer::per_try`] → [`breaker::BreakerLayer`] → upstream.
//!
//! Fault injection comes right after the backend is chosen and before the timeouts, as Envoy's fault filter
//! sits before its router (the injected delay is not part of the route timeout; an aborted request is neither
//! forwarded nor mirrored). The breaker is innermost, inside the per-try timeout, so each attempt takes its own
//! request permit. The layers talk to each other only through the request and response extensions defined in
//! [`context`]. Every service answers failures as responses (`Error = Infallible`), flagged with a
//! [`context::ResponseFlag`].

pub mod authority;
pub mod authz;
pub mod backend;
pub mod breaker;
pub mod context;
pub mod cors;
pub mod fault;
pub mod headers;
pub mod jwt;
pub mod mirror;
pub mod path_modifier;
pub mod redirect;
pub mod reply;
pub mod retry;
pub mod rewrite;
pub mod route;
pub mod service;
/// Helpers for this crate's tests and the workspace's benchmarks (request bodies, a route-match result); not
/// part of the proxy's API.
#[doc(hidden)]
pub mod test_support;
pub mod timeout;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every layer passes along (the same type the waypoint's upstream client sends).
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;
/// The future every layer returns: boxed so the stack's types stay short and `Send`.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>>;
