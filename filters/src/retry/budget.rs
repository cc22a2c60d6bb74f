//! The retry budget: Envoy's default `retry_budget` — retries in flight may be at most 20% of the active
//! requests, and 3 concurrent retries are always allowed. One budget per `RetryLayer` instance, shared by every
//! service that layer makes (so by every clone of it): two `AtomicUsize`s, active requests and active retries.
//! A retry counts from the moment it is granted (its backoff included) until its attempt finished.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const BUDGET_PERCENT: usize = 20;
pub const MIN_RETRY_CONCURRENCY: usize = 3;

#[derive(Debug, Clone, Default)]
pub struct RetryBudget {
    active_requests: Arc<AtomicUsize>,
    active_retries: Arc<AtomicUsize>,
}

/// Holds one unit of a counter; gives it back when dropped (also when the request is cancelled).
#[derive(Debug)]
pub struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RetryBudget {
    /// Counts a request as active for as long as the returned guard lives.
    pub fn request(&self) -> Held {
        self.active_requests.fetch_add(1, Ordering::AcqRel);
        Held(self.active_requests.clone())
    }

    /// A retry, if the budget has room for one more.
    pub fn try_retry(&self) -> Option<Held> {
        let requests = self.active_requests.load(Ordering::Acquire);
        let limit = (requests * BUDGET_PERCENT / 100).max(MIN_RETRY_CONCURRENCY);
        self.active_retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Held(self.active_retries.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_retries_always_then_twenty_percent() {
        let budget = RetryBudget::default();
        let first = budget.request();
        let held: Vec<_> = (0..3).map(|_| budget.try_retry().unwrap()).collect();
        assert!(budget.try_retry().is_none());
        drop(held);
        assert!(budget.try_retry().is_some());

        let requests: Vec<_> = (0..50).map(|_| budget.request()).collect();
        let held: Vec<_> = (0..10).map(|_| budget.try_retry().unwrap()).collect();
        assert!(budget.try_retry().is_none(), "20% of 50 active requests is 10");
        drop((first, requests, held));
        assert_eq!(budget.active_retries.load(Ordering::SeqCst), 0);
        assert_eq!(budget.active_requests.load(Ordering::SeqCst), 0);
    }
}
