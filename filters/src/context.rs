//! What the layers tell each other about one request, carried in the request and response extensions.
//!
//! Request extensions, in the order they appear:
//! - `Arc<RouteTable>`: inserted by the waypoint before the route layer (the table of the service/port).
//! - `Arc<dyn MirrorSink>`: inserted by the waypoint; where the mirror layer hands request copies.
//! - [`Matched`]: inserted by the route layer.
//! - [`ChosenBackend`]: inserted by the backend layer.
//!
//! Response extensions:
//! - [`ResponseFlag`]: on every reply the proxy made itself (Envoy's response flag, for the access log).
//! - [`UpstreamFailure`]: put by the waypoint's upstream service on the 5xx it makes when the upstream failed,
//!   so retry can tell a failed connect from a backend's own 503.

use std::sync::Arc;

use http::Request;

use crate::Body;
use crate::route::{BackendId, Filter, Matched, Rule};

/// Envoy's response flag for a local reply (`NR`, `UT`, `URX`, `UF`, `UR`, `UH`, `NC`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFlag(pub &'static str);

/// How the upstream failed before a response arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection (refused, unreachable, HBONE CONNECT refused).
    Connect,
    /// The connection or stream was reset before response headers.
    Reset,
    /// The attempt ran out of time (per-try timeout).
    Timeout,
}

/// Marks a 5xx the proxy made because the upstream failed (not a status the backend sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailure {
    pub kind: FailureKind,
}

/// The backend the backend layer picked for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChosenBackend {
    /// `None` when the rule answers without a backend (a rule-level redirect).
    pub backend: Option<BackendId>,
    /// Index into `rule.backends` of the chosen entry, whose `filters` apply after the rule's.
    pub index: Option<usize>,
}

impl ChosenBackend {
    /// The filters of the chosen backendRef (empty when none was chosen).
    pub fn filters<'r>(&self, rule: &'r Rule) -> &'r [Filter] {
        self.index
            .and_then(|i| rule.backends.get(i))
            .map_or(&[], |b| b.filters.as_slice())
    }
}

/// Where mirrored requests go: fire-and-forget, the waypoint sends them to `backend` and drops the response.
pub trait MirrorSink: Send + Sync + 'static {
    fn mirror(&self, backend: BackendId, req: Request<Body>);
}

/// The rule of a request and the filters that apply to it: the rule's own first, then the chosen backend's.
#[derive(Clone)]
pub struct ActiveFilters {
    pub rule: Arc<Rule>,
    pub chosen: Option<ChosenBackend>,
}

impl ActiveFilters {
    /// Reads what the route and backend layers left in the extensions; `None` when no rule was matched.
    pub fn of<B>(req: &Request<B>) -> Option<ActiveFilters> {
        let matched = req.extensions().get::<Matched>()?;
        Some(ActiveFilters {
            rule: matched.rule.clone(),
            chosen: req.extensions().get::<ChosenBackend>().copied(),
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Filter> {
        let backend = self.chosen.map_or(&[][..], |c| c.filters(&self.rule));
        self.rule.filters.iter().chain(backend)
    }
}
