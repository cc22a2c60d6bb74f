//! What the layers tell each other about one request, carried in the request and response extensions.
//!
//! Request extensions, in the order they appear:
//! - `Arc<RouteTable>`: inserted by the waypoint before the route layer (the table of the service/port).
//! - `Arc<dyn MirrorSink>`: inserted by the waypoint; where the mirror layer hands request copies.
//! - [`Matched`]: inserted by the route layer.
//! - [`ChosenBackend`]: inserted by the backend layer.
//! - `Arc<`[`CircuitBreaker`](crate::breaker::CircuitBreaker)`>`: inserted by the waypoint for the chosen
//!   backend (absent = no limits); read by the retry layer (`try_retry`) and the breaker layer (`try_request`).
//! - [`Attempt`]: inserted by the retry layer on every attempt when the rule has a retry policy; the upstream
//!   service records the endpoint it used and avoids those on later attempts.
//!
//! Response extensions:
//! - [`ResponseFlag`]: on every reply the proxy made itself (Envoy's response flag, for the access log).
//! - [`UpstreamFailure`]: put by the waypoint's upstream service on the 5xx it makes when the upstream failed,
//!   so retry can tell a failed connect from a backend's own 503. The breaker layer marks its `UO` overflow
//!   replies the same way (kind [`FailureKind::Overflow`]) so they are never retried.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

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
    /// The upstream refused the stream before processing it (HTTP/2 `REFUSED_STREAM`): safe to retry.
    RefusedStream,
    /// A circuit breaker limit overflowed (`UO`): never retried, as in Envoy (an overflow reset is the one
    /// reset reason its router never retries).
    Overflow,
}

/// Marks a 5xx the proxy made because the upstream failed (not a status the backend sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailure {
    pub kind: FailureKind,
}

/// One attempt of a request under a retry policy (Envoy's `previous_hosts` retry host predicate, which Istio
/// configures on every route with retries). Clones share `tried`, so every attempt of one request sees the
/// endpoints the earlier ones used.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// `retryRemoteLocalities`: retries may leave the endpoint's locality.
    pub remote_localities: bool,
    /// Endpoints earlier attempts of this request went to, in order.
    pub tried: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Attempt {
    /// Records the endpoint this attempt is sent to (called by the upstream service).
    pub fn record(&self, endpoint: SocketAddr) {
        self.tried.lock().unwrap_or_else(PoisonError::into_inner).push(endpoint);
    }

    /// Whether an earlier attempt of this request used `endpoint`.
    pub fn was_tried(&self, endpoint: SocketAddr) -> bool {
        self.tried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&endpoint)
    }

    /// The endpoints used so far, in order.
    pub fn tried(&self) -> Vec<SocketAddr> {
        self.tried.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
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
