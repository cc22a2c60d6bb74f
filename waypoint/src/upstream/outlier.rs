//! Outlier detection (DestinationRule `outlierDetection`), Envoy's consecutive-error detector:
//!
//! - Every attempt's outcome is recorded on its endpoint. A 5xx, or a local failure (connect failure, reset,
//!   timeout: by default Istio does not split local-origin errors, so they count as 5xx), adds to the
//!   consecutive-5xx count; 502/503/504 and local failures add to the consecutive-gateway count (another 5xx
//!   resets it). Any other status resets both.
//! - With `splitExternalLocalOriginErrors`, local failures count only toward `consecutiveLocalOriginFailures`
//!   (reset by any response or established connection), and the 5xx counts see only real responses.
//! - Reaching `consecutive5xxErrors` or `consecutiveGatewayErrors` ejects the endpoint at once, unless
//!   `maxEjectionPercent` of the endpoints are already ejected (`ejected·100 < max·N` must hold before the
//!   ejection, so with a non-zero maximum one endpoint can always be ejected, as in Envoy).
//! - An ejection lasts `baseEjectionTime × multiplier`; the multiplier grows by one per ejection (up to Envoy's
//!   `max_ejection_time`, 300 s, or the base if larger) and shrinks by one per `interval` the endpoint spends
//!   un-ejected (Envoy decrements it at every sweep that finds the host healthy).
//! - Envoy re-admits endpoints at its periodic sweeps, every `interval` from the detector's start. Here the
//!   sweep is lazy: an ejection ends at the first sweep tick at or after `ejection time + duration`, computed
//!   when the endpoint is ejected, and the bookkeeping (counts, multiplier decay) happens whenever the detector
//!   next looks (a pick that finds the earliest deadline passed, or the next ejection). No timer task runs.
//!
//! Timestamps are `tokio::time::Instant`, so tests drive the detector with the paused clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::policy::OutlierPolicy;

/// Envoy's `max_ejection_time` default.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What one attempt to an endpoint came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// No response: connect failure, reset before headers, timeout.
    LocalFailure,
    /// A TCP connection was established (Envoy's `LocalOriginConnectSuccessFinal`).
    Connected,
}

impl Outcome {
    fn is_5xx(self) -> bool {
        match self {
            Outcome::Status(s) => (500..600).contains(&s),
            Outcome::LocalFailure => true,
            Outcome::Connected => false,
        }
    }

    fn is_gateway_error(self) -> bool {
        match self {
            Outcome::Status(s) => matches!(s, 502..=504),
            Outcome::LocalFailure => true,
            Outcome::Connected => false,
        }
    }
}

/// Zeroes a counter, loading first: a healthy endpoint's counters are already zero, and a store would bounce
/// the cache line between the cores serving it.
fn reset(counter: &AtomicU32) {
    if counter.load(Ordering::Relaxed) != 0 {
        counter.store(0, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Cold {
    /// The ejection-time multiplier.
    backoff: u32,
    /// The last sweep tick whose multiplier decay has been applied.
    accounted_tick: u64,
    times_ejected: u64,
}

/// One endpoint's detector state (kept in the upstream registry, so it outlives config snapshots).
#[derive(Debug, Default)]
pub struct EndpointOutlier {
    /// Nanoseconds after the detector's epoch when the current ejection ends; 0 = not ejected.
    until: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Split mode only.
    consecutive_local: AtomicU32,
    cold: Mutex<Cold>,
}

/// A view of an endpoint's state for the admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierView {
    pub ejected: bool,
    /// Time left in the current ejection.
    pub remaining: Option<Duration>,
    pub multiplier: u32,
    pub times_ejected: u64,
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
}

impl EndpointOutlier {
    /// Whether the endpoint is out of rotation at `now` (see [`Detector::nanos`]).
    pub fn is_ejected(&self, now_ns: u64) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until != 0 && now_ns < until
    }

    /// Records an outcome; true when it reached an ejection threshold.
    pub fn record(&self, outcome: Outcome, policy: &OutlierPolicy) -> bool {
        if let Some(threshold) = policy.consecutive_local_origin {
            // Envoy's split mode: local-origin failures have their own count, and a response or a connection
            // is a local-origin success.
            if outcome == Outcome::LocalFailure {
                let n = self.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
                return threshold > 0 && n >= threshold;
            }
            reset(&self.consecutive_local);
        }
        if !outcome.is_5xx() {
            reset(&self.consecutive_5xx);
            reset(&self.consecutive_gateway);
            return false;
        }
        let gateway = if outcome.is_gateway_error() {
            self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let errors = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        let reached = |threshold: Option<u32>, count: u32| threshold.is_some_and(|t| t > 0 && count >= t);
        reached(policy.consecutive_5xx, errors) || reached(policy.consecutive_gateway, gateway)
    }

    pub fn view(&self, now_ns: u64) -> OutlierView {
        let until = self.until.load(Ordering::Acquire);
        let cold = lock(&self.cold);
        OutlierView {
            ejected: until != 0 && now_ns < until,
            remaining: (until != 0 && now_ns < until).then(|| Duration::from_nanos(until - now_ns)),
            multiplier: cold.backoff,
            times_ejected: cold.times_ejected,
            consecutive_5xx: self.consecutive_5xx.load(Ordering::Relaxed),
            consecutive_gateway: self.consecutive_gateway.load(Ordering::Relaxed),
        }
    }

    /// Applies the multiplier decay of the sweep ticks passed while the endpoint was not ejected.
    fn decay(cold: &mut Cold, now_ns: u64, interval_ns: u64) {
        let tick = now_ns / interval_ns;
        if tick > cold.accounted_tick {
            let passed = u32::try_from(tick - cold.accounted_tick).unwrap_or(u32::MAX);
            cold.backoff = cold.backoff.saturating_sub(passed);
            cold.accounted_tick = tick;
        }
    }
}

/// One backend's detector: the epoch its sweep ticks count from and a summary of who is ejected.
#[derive(Debug)]
pub struct Detector {
    epoch: Instant,
    /// Endpoints flagged ejected whose return has not been booked yet.
    ejected: AtomicU32,
    /// Earliest ejection end among them (ns after the epoch); `u64::MAX` when none.
    next_check: AtomicU64,
    /// Bumped on every ejection and return, so per-snapshot health views know when to recount.
    version: AtomicU64,
    lock: Mutex<()>,
}

impl Detector {
    pub fn new(epoch: Instant) -> Detector {
        Detector {
            epoch,
            ejected: AtomicU32::new(0),
            next_check: AtomicU64::new(u64::MAX),
            version: AtomicU64::new(0),
            lock: Mutex::new(()),
        }
    }

    /// `now` as nanoseconds after the epoch (the unit of the ejection deadlines).
    pub fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Cheap check for the pick path: nothing is (or was, unbooked) ejected.
    pub fn any_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire) != 0
    }

    /// Whether some ejection has ended without its return being booked ([`Detector::sweep`] has work).
    pub fn due(&self, now_ns: u64) -> bool {
        now_ns >= self.next_check.load(Ordering::Acquire)
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Books the returns that are due (`all` must list every endpoint state of the backend). Cheap when none
    /// is: one atomic load.
    pub fn sweep<'a>(&self, now_ns: u64, policy: &OutlierPolicy, all: impl Iterator<Item = &'a EndpointOutlier>) {
        if now_ns < self.next_check.load(Ordering::Acquire) {
            return;
        }
        let _g = lock(&self.lock);
        let interval_ns = interval_ns(policy);
        let mut next = u64::MAX;
        for ep in all {
            self.settle(ep, now_ns, interval_ns);
            let until = ep.until.load(Ordering::Acquire);
            if until != 0 {
                next = next.min(until);
            }
        }
        self.next_check.store(next, Ordering::Release);
    }

    /// Under `lock`: if `ep`'s ejection has ended, book its return.
    fn settle(&self, ep: &EndpointOutlier, now_ns: u64, interval_ns: u64) {
        let until = ep.until.load(Ordering::Acquire);
        if until == 0 || now_ns < until {
            return;
        }
        ep.until.store(0, Ordering::Release);
        lock(&ep.cold).accounted_tick = until / interval_ns;
        self.ejected.fetch_sub(1, Ordering::AcqRel);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets an endpoint that left the config (its ejection no longer counts).
    pub fn forget(&self, ep: &EndpointOutlier) {
        let _g = lock(&self.lock);
        if ep.until.swap(0, Ordering::AcqRel) != 0 {
            self.ejected.fetch_sub(1, Ordering::AcqRel);
            self.version.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Ejects `ep` (which reached a threshold) unless it already is, or `maxEjectionPercent` of `population`
    /// (the backend's current endpoints) are ejected. Returns whether it was ejected.
    pub fn eject<'a>(
        &self,
        ep: &EndpointOutlier,
        policy: &OutlierPolicy,
        now: Instant,
        population: impl Iterator<Item = &'a EndpointOutlier>,
    ) -> bool {
        let now_ns = self.nanos(now);
        let interval_ns = interval_ns(policy);
        let _g = lock(&self.lock);
        self.settle(ep, now_ns, interval_ns);
        if ep.is_ejected(now_ns) {
            return false;
        }
        let (mut total, mut ejected) = (0u64, 0u64);
        for other in population {
            total += 1;
            if other.is_ejected(now_ns) {
                ejected += 1;
            }
        }
        if ejected * 100 >= u64::from(policy.max_ejection_percent) * total.max(1) {
            return false;
        }
        let base = policy.base_ejection;
        let max = MAX_EJECTION.max(base);
        let mut cold = lock(&ep.cold);
        EndpointOutlier::decay(&mut cold, now_ns, interval_ns);
        // Envoy: the multiplier stops growing once base × multiplier passes the maximum.
        if base.saturating_mul(cold.backoff) < max.saturating_add(base) {
            cold.backoff += 1;
        }
        cold.times_ejected += 1;
        let duration = base.saturating_mul(cold.backoff).min(max);
        let end = now_ns.saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        let until = end.div_ceil(interval_ns).saturating_mul(interval_ns).max(1);
        drop(cold);
        ep.until.store(until, Ordering::Release);
        ep.consecutive_5xx.store(0, Ordering::Relaxed);
        ep.consecutive_gateway.store(0, Ordering::Relaxed);
        ep.consecutive_local.store(0, Ordering::Relaxed);
        self.ejected.fetch_add(1, Ordering::AcqRel);
        self.version.fetch_add(1, Ordering::AcqRel);
        self.next_check.fetch_min(until, Ordering::AcqRel);
        true
    }
}

fn interval_ns(policy: &OutlierPolicy) -> u64 {
    u64::try_from(policy.interval.as_nanos()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
            ..OutlierPolicy::default()
        }
    }

    fn fail(d: &Detector, eps: &[EndpointOutlier], i: usize, p: &OutlierPolicy, times: usize) -> bool {
        let mut ejected = false;
        for _ in 0..times {
            if eps[i].record(Outcome::LocalFailure, p) {
                ejected |= d.eject(&eps[i], p, Instant::now(), eps.iter());
            }
        }
        ejected
    }

    fn ejected_now(d: &Detector, ep: &EndpointOutlier) -> bool {
        ep.is_ejected(d.nanos(Instant::now()))
    }

    #[test]
    fn counts_5xx_and_gateway_errors_and_success_resets() {
        let p = OutlierPolicy {
            consecutive_5xx: None,
            consecutive_gateway: Some(2),
            ..policy()
        };
        let ep = EndpointOutlier::default();
        assert!(!ep.record(Outcome::Status(503), &p));
        // A 500 is a 5xx but not a gateway error: it resets the gateway count.
        assert!(!ep.record(Outcome::Status(500), &p));
        assert!(!ep.record(Outcome::Status(502), &p));
        assert!(ep.record(Outcome::LocalFailure, &p));
        let ep = EndpointOutlier::default();
        let p = policy();
        assert!(!ep.record(Outcome::Status(500), &p));
        assert!(!ep.record(Outcome::Status(500), &p));
        assert!(
            !ep.record(Outcome::Status(404), &p),
            "a 4xx is a success for the detector"
        );
        assert!(!ep.record(Outcome::Status(500), &p));
        assert!(!ep.record(Outcome::Status(500), &p));
        assert!(ep.record(Outcome::Status(504), &p));
        let ep = EndpointOutlier::default();
        assert!(!ep.record(Outcome::LocalFailure, &p));
        assert!(!ep.record(Outcome::Connected, &p));
        assert!(!ep.record(Outcome::LocalFailure, &p));
        assert!(!ep.record(Outcome::LocalFailure, &p));
        assert!(ep.record(Outcome::LocalFailure, &p));
    }

    #[test]
    fn split_mode_counts_local_failures_apart() {
        let p = OutlierPolicy {
            consecutive_local_origin: Some(2),
            ..policy()
        };
        let ep = EndpointOutlier::default();
        assert!(!ep.record(Outcome::Status(500), &p));
        assert!(!ep.record(Outcome::LocalFailure, &p));
        assert!(
            !ep.record(Outcome::Status(500), &p),
            "a response resets the local count, not the 5xx count"
        );
        assert!(!ep.record(Outcome::LocalFailure, &p));
        assert!(ep.record(Outcome::LocalFailure, &p), "two local failures in a row");
        assert!(
            ep.record(Outcome::Status(503), &p),
            "the third 5xx response (local failures did not count)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_lasts_base_times_multiplier_rounded_to_the_sweep_interval() {
        let d = Detector::new(Instant::now());
        let p = policy();
        let eps: Vec<EndpointOutlier> = (0..4).map(|_| EndpointOutlier::default()).collect();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(fail(&d, &eps, 0, &p, 3));
        assert!(d.any_ejected());
        // Ejected at 5 s for 30 s: back at the first sweep at or after 35 s, which is 40 s.
        tokio::time::advance(Duration::from_secs(34)).await;
        assert!(ejected_now(&d, &eps[0]), "39 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!ejected_now(&d, &eps[0]), "40 s");
        d.sweep(d.nanos(Instant::now()), &p, eps.iter());
        assert!(!d.any_ejected());
        // Ejected again at 41 s, before any healthy sweep (50 s) decayed the multiplier: 2 × 30 s = 60 s, so
        // back at the first tick at or after 101 s = 110 s.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(fail(&d, &eps, 0, &p, 3));
        assert_eq!(eps[0].view(d.nanos(Instant::now())).multiplier, 2);
        tokio::time::advance(Duration::from_secs(68)).await;
        assert!(ejected_now(&d, &eps[0]), "109 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!ejected_now(&d, &eps[0]), "110 s");
    }

    #[tokio::test(start_paused = true)]
    async fn multiplier_decays_one_per_healthy_interval() {
        let d = Detector::new(Instant::now());
        let p = policy();
        let eps: Vec<EndpointOutlier> = (0..4).map(|_| EndpointOutlier::default()).collect();
        assert!(fail(&d, &eps, 0, &p, 3)); // 0 s, ×1, back at 30 s
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(fail(&d, &eps, 0, &p, 3)); // 30 s, ×2, back at 90 s
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!ejected_now(&d, &eps[0]));
        // Healthy sweeps at 100 s and 110 s bring ×2 down to 0; the next ejection is ×1 again.
        tokio::time::advance(Duration::from_secs(25)).await;
        assert!(fail(&d, &eps, 0, &p, 3));
        let v = eps[0].view(d.nanos(Instant::now()));
        assert_eq!((v.multiplier, v.times_ejected), (1, 3));
        assert_eq!(v.remaining, Some(Duration::from_secs(35)), "115 s + 30 s → tick 150 s");
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_caps_ejections_but_one_is_always_allowed() {
        let d = Detector::new(Instant::now());
        let p = policy(); // 50 %
        let eps: Vec<EndpointOutlier> = (0..4).map(|_| EndpointOutlier::default()).collect();
        assert!(fail(&d, &eps, 0, &p, 3));
        assert!(fail(&d, &eps, 1, &p, 3), "1 of 4 ejected = 25 % < 50 %");
        assert!(!fail(&d, &eps, 2, &p, 3), "2 of 4 = 50 %: no more");
        assert!(!ejected_now(&d, &eps[2]));
        let p10 = OutlierPolicy {
            max_ejection_percent: 10,
            ..policy()
        };
        let d = Detector::new(Instant::now());
        let eps: Vec<EndpointOutlier> = (0..3).map(|_| EndpointOutlier::default()).collect();
        assert!(
            fail(&d, &eps, 0, &p10, 3),
            "one is always allowed, even if it is 33 % > 10 %"
        );
        assert!(!fail(&d, &eps, 1, &p10, 3));
        let p0 = OutlierPolicy {
            max_ejection_percent: 0,
            ..policy()
        };
        let d = Detector::new(Instant::now());
        assert!(!fail(&d, &eps[..], 2, &p0, 3), "0 % disables ejection");
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_books_returns_and_forget_drops_an_ejection() {
        let d = Detector::new(Instant::now());
        let p = policy();
        let eps: Vec<EndpointOutlier> = (0..4).map(|_| EndpointOutlier::default()).collect();
        fail(&d, &eps, 0, &p, 3);
        let v0 = d.version();
        d.sweep(d.nanos(Instant::now()), &p, eps.iter());
        assert!(d.any_ejected(), "not due yet");
        tokio::time::advance(Duration::from_secs(30)).await;
        d.sweep(d.nanos(Instant::now()), &p, eps.iter());
        assert!(!d.any_ejected());
        assert!(d.version() > v0);
        fail(&d, &eps, 1, &p, 3);
        d.forget(&eps[1]);
        assert!(!d.any_ejected());
    }
}
