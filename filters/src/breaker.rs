//! Circuit breaking (DestinationRule `connectionPool`): per-backend limits on concurrent connections, pending
//! requests, requests and retries, as Envoy's cluster circuit breakers. Overflow is never queued: the caller
//! answers 503 `UO` at once.
//!
//! One [`CircuitBreaker`] exists per backend for the life of the process (the waypoint keeps them in a registry
//! keyed by backend, so in-flight counts survive config swaps); a new config only moves the limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// `u32::MAX` stands for "no limit" (Istio's default for every field is 2³²−1).
pub const UNLIMITED: u32 = u32::MAX;

/// The limits of one backend; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Debug, Default)]
struct Gauge {
    active: AtomicUsize,
    limit: AtomicU32,
}

impl Gauge {
    fn new(limit: Option<u32>) -> Gauge {
        Gauge {
            active: AtomicUsize::new(0),
            limit: AtomicU32::new(limit.unwrap_or(UNLIMITED)),
        }
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == UNLIMITED {
            self.active.fetch_add(1, Ordering::AcqRel);
            return Some(Permit(self.clone()));
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit as usize).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.clone()))
    }
}

/// One unit of a breaker resource (a connection, a pending request, a request, a retry); released on drop.
#[derive(Debug)]
pub struct Permit(Arc<Gauge>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Which limit overflowed (for logs and the `UO` reply's detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("upstream connection limit reached")]
    Connections,
    #[error("pending request limit reached")]
    Pending,
    #[error("request limit reached")]
    Requests,
    #[error("retry limit reached")]
    Retries,
}

/// Circuit breaker state of one backend.
#[derive(Debug)]
pub struct CircuitBreaker {
    connections: Arc<Gauge>,
    pending: Arc<Gauge>,
    requests: Arc<Gauge>,
    retries: Arc<Gauge>,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker::new(Limits::default())
    }
}

impl CircuitBreaker {
    pub fn new(limits: Limits) -> CircuitBreaker {
        CircuitBreaker {
            connections: Arc::new(Gauge::new(limits.max_connections)),
            pending: Arc::new(Gauge::new(limits.max_pending)),
            requests: Arc::new(Gauge::new(limits.max_requests)),
            retries: Arc::new(Gauge::new(limits.max_retries)),
        }
    }

    /// Applies a new config's limits; what is in flight stays counted.
    pub fn set_limits(&self, limits: Limits) {
        let set = |g: &Gauge, l: Option<u32>| g.limit.store(l.unwrap_or(UNLIMITED), Ordering::Relaxed);
        set(&self.connections, limits.max_connections);
        set(&self.pending, limits.max_pending);
        set(&self.requests, limits.max_requests);
        set(&self.retries, limits.max_retries);
    }

    pub fn limits(&self) -> Limits {
        let get = |g: &Gauge| Some(g.limit.load(Ordering::Relaxed)).filter(|l| *l != UNLIMITED);
        Limits {
            max_connections: get(&self.connections),
            max_pending: get(&self.pending),
            max_requests: get(&self.requests),
            max_retries: get(&self.retries),
        }
    }

    pub fn try_connection(&self) -> Result<Permit, Overflow> {
        self.connections.try_acquire().ok_or(Overflow::Connections)
    }

    pub fn try_pending(&self) -> Result<Permit, Overflow> {
        self.pending.try_acquire().ok_or(Overflow::Pending)
    }

    pub fn try_request(&self) -> Result<Permit, Overflow> {
        self.requests.try_acquire().ok_or(Overflow::Requests)
    }

    pub fn try_retry(&self) -> Result<Permit, Overflow> {
        self.retries.try_acquire().ok_or(Overflow::Retries)
    }

    /// Currently held (connections, pending, requests, retries), for the admin endpoint and tests.
    pub fn in_use(&self) -> [usize; 4] {
        [&self.connections, &self.pending, &self.requests, &self.retries].map(|g| g.active.load(Ordering::Acquire))
    }
}
