//! Tower layers for the waypoint's L7 policies. Each policy is one layer with its own compiled config type,
//! so the dependency arrow points one way (waypoint → filters) and each layer is testable with plain structs.

pub mod route;

use bytes::Bytes;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every layer passes along (the same type the waypoint's upstream client sends).
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;
