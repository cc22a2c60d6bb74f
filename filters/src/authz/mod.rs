//! Authorization (Istio `AuthorizationPolicy`, Envoy RBAC) at L7.
//!
//! - [`model`]: the compiled policy (rules of sources, operations and conditions) and how a rule matches.
//! - [`eval`]: the request view, the per-service [`AuthzPolicies`] and Istio's CUSTOM → DENY → ALLOW order.
//! - [`custom`]: CUSTOM policies: the [`ExtAuthz`] client interface and what the server answers.
//! - [`layer`]: the tower layer and the extension types the waypoint inserts ([`ConnectionInfo`]).
//! - [`cidr`], [`matcher`]: value matching (IP blocks; exact/prefix/suffix/`*`, principals, path templates).
//!
//! Everything is compiled when the config snapshot is built; evaluation allocates nothing unless a rule reads
//! repeated headers or the path needs normalising.

pub mod cidr;
pub mod custom;
pub mod eval;
pub mod layer;
pub mod matcher;
pub mod model;

pub use cidr::Cidr;
pub use custom::{BoxFuture, CheckInput, CheckOutcome, ExtAuthz, HeaderEdits};
pub use eval::{
    AuthzPolicies, AuthzRequest, AuthzSettings, Decision, DryRun, HttpAttributes, PathNormalization, PolicyId, Reason,
    normalize_path, remote_ip,
};
pub use layer::{
    AuthzLayer, AuthzService, ConnectionInfo, DecisionCounters, DecisionObserver, denied, ext_authz_reply,
};
pub use matcher::{PathMatch, PrincipalMatch, StringMatch};
pub use model::{
    Action, AuthorizationPolicy, Condition, ConditionError, ConditionKey, Mode, Operation, Rule, Source, Values,
};

#[cfg(test)]
mod property_tests;
#[cfg(test)]
mod tests;
