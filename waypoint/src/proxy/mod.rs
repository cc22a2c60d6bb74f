//! The data path inside a tunnel: CONNECT phases ([`tunnel`]), protocol detection ([`sniff`]), HTTP proxying
//! ([`http`]) and opaque TCP ([`tcp`]); failures map to status + response flag in one place ([`error`]).

pub mod error;
pub mod http;
pub mod l7;
pub mod sniff;
pub mod tcp;
pub mod tunnel;

use std::sync::Arc;

use crate::config::watch::ConfigStore;
use crate::drain::Drain;
use crate::tls::reload::TlsStore;
use crate::upstream::Upstream;

/// Everything the data path shares. Built once at start-up.
pub struct Ctx {
    pub config: Arc<ConfigStore>,
    pub tls: Arc<TlsStore>,
    pub upstream: Arc<Upstream>,
    pub drain: Drain,
    /// The routed-request pipeline ([`l7::stack`]), built once.
    pub http_stack: l7::HttpService,
    /// Authorization decisions so far (allowed, denied, audited, dry-run denials).
    pub authz_counters: Arc<waypoint_filters::authz::DecisionCounters>,
    /// Thread-per-core workers that accepted connections are handed to; `None` = serve them on the runtime
    /// that accepts (a work-stealing runtime, or a test's).
    pub workers: Option<crate::workers::Workers>,
}
