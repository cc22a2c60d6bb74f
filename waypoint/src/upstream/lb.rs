//! Endpoint choice among a set of candidates (DestinationRule `loadBalancer.simple`), each function taking the
//! candidates as endpoint indices and an eligibility test (not ejected, not tried by this request yet).
//!
//! - Round robin: a shared cursor; skipped (ineligible) endpoints advance it too, so the endpoint after an
//!   ejected one does not take its turn as well.
//! - Random: uniform over the eligible candidates.
//! - Least request: Envoy's power of two choices (`choice_count` 2): two random candidates, the one with fewer
//!   active requests wins (the first on a tie). The two are distinct when possible, which only sharpens it.
//! - Weighted variants for endpoints in slow start (`warmupDurationSecs`): random by weight, and for least
//!   request two weighted draws compared by active requests per unit of weight (Envoy divides the weight by
//!   active + 1). Envoy's round robin is an EDF schedule over the same weights; a weighted random draw gives
//!   the same shares without a lock per pick.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Envoy's `min_weight_percent` default for slow start.
pub const MIN_WARMUP_FACTOR: f64 = 0.1;

/// How many random draws are tried before scanning for an eligible candidate.
const DRAWS: usize = 4;

pub fn round_robin(members: &[u32], cursor: &AtomicUsize, ok: impl Fn(u32) -> bool) -> Option<u32> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    for k in 0..n {
        let m = members[start.wrapping_add(k) % n];
        if ok(m) {
            if k > 0 {
                cursor.fetch_add(k, Ordering::Relaxed);
            }
            return Some(m);
        }
    }
    None
}

pub fn random(members: &[u32], ok: impl Fn(u32) -> bool) -> Option<u32> {
    random_except(members, u32::MAX, &ok)
}

fn random_except(members: &[u32], except: u32, ok: &impl Fn(u32) -> bool) -> Option<u32> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let usable = |m: u32| m != except && ok(m);
    for _ in 0..DRAWS {
        let m = members[fastrand::usize(..n)];
        if usable(m) {
            return Some(m);
        }
    }
    // Mostly ineligible: scan from a random start (slightly favours endpoints right after ineligible ones,
    // which only matters while most of the set is out).
    let start = fastrand::usize(..n);
    (0..n).map(|k| members[(start + k) % n]).find(|m| usable(*m))
}

pub fn least_request(members: &[u32], active: impl Fn(u32) -> u32, ok: impl Fn(u32) -> bool) -> Option<u32> {
    let first = random_except(members, u32::MAX, &ok)?;
    match random_except(members, first, &ok) {
        Some(second) if active(second) < active(first) => Some(second),
        _ => Some(first),
    }
}

pub fn weighted_random(members: &[u32], weight: impl Fn(u32) -> f64, ok: impl Fn(u32) -> bool) -> Option<u32> {
    weighted_except(members, u32::MAX, &weight, &ok)
}

fn weighted_except(
    members: &[u32],
    except: u32,
    weight: &impl Fn(u32) -> f64,
    ok: &impl Fn(u32) -> bool,
) -> Option<u32> {
    let usable = |m: u32| m != except && ok(m);
    let total: f64 = members.iter().filter(|m| usable(**m)).map(|m| weight(*m)).sum();
    if total <= 0.0 {
        return None;
    }
    let mut draw = fastrand::f64() * total;
    let mut last = None;
    for m in members.iter().copied().filter(|m| usable(*m)) {
        let w = weight(m);
        if draw < w {
            return Some(m);
        }
        draw -= w;
        last = Some(m);
    }
    last
}

pub fn weighted_least_request(
    members: &[u32],
    active: impl Fn(u32) -> u32,
    weight: impl Fn(u32) -> f64,
    ok: impl Fn(u32) -> bool,
) -> Option<u32> {
    let first = weighted_except(members, u32::MAX, &weight, &ok)?;
    let load = |m: u32| f64::from(active(m) + 1) / weight(m).max(f64::MIN_POSITIVE);
    match weighted_except(members, first, &weight, &ok) {
        Some(second) if load(second) < load(first) => Some(second),
        _ => Some(first),
    }
}

/// Envoy's slow-start weight factor with aggression 1: `max(min 10 %, max(age, 1 s) / window)` inside the
/// window, 1 after it.
pub fn warmup_factor(age: Duration, window: Duration) -> f64 {
    if age >= window || window.is_zero() {
        return 1.0;
    }
    let t = age.as_secs_f64().max(1.0) / window.as_secs_f64();
    t.clamp(MIN_WARMUP_FACTOR, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: usize, picks: usize, mut pick: impl FnMut() -> Option<u32>) -> Vec<usize> {
        let mut c = vec![0; n];
        for _ in 0..picks {
            c[pick().unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_exact_and_skips_ineligible_fairly() {
        let members = [0, 1, 2];
        let cursor = AtomicUsize::new(0);
        let order: Vec<u32> = (0..6)
            .map(|_| round_robin(&members, &cursor, |_| true).unwrap())
            .collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(
            counts(3, 300, || round_robin(&members, &cursor, |_| true)),
            vec![100, 100, 100]
        );
        // With 1 out, the other two alternate exactly.
        let members = [0, 1, 2, 3];
        let c = counts(4, 300, || round_robin(&members, &cursor, |m| m != 1));
        assert_eq!(c, vec![100, 0, 100, 100]);
        assert_eq!(round_robin(&members, &cursor, |_| false), None);
        assert_eq!(round_robin(&[], &cursor, |_| true), None);
    }

    /// 40 000 picks over 4: 10 000 expected each, σ ≈ 87; ±5 % (500) is beyond 5σ.
    const PICKS: usize = 40_000;
    fn within_5_percent(c: &[usize], expected: usize) {
        for x in c {
            assert!(x.abs_diff(expected) * 20 <= expected, "{c:?}, expected {expected} each");
        }
    }

    #[test]
    fn random_is_uniform_over_eligible() {
        let members = [0, 1, 2, 3];
        within_5_percent(&counts(4, PICKS, || random(&members, |_| true)), PICKS / 4);
        let c = counts(5, PICKS, || random(&[0, 1, 2, 3, 4], |m| m != 4));
        assert_eq!(c[4], 0);
        within_5_percent(&c[..4], PICKS / 4);
        assert_eq!(random(&members, |m| m == 2), Some(2));
        assert_eq!(random(&members, |_| false), None);
    }

    #[test]
    fn least_request_spreads_evenly_when_idle_and_prefers_the_idle_endpoint() {
        let members = [0, 1, 2, 3];
        within_5_percent(
            &counts(4, PICKS, || least_request(&members, |_| 0, |_| true)),
            PICKS / 4,
        );
        // Endpoint 0 has 10 requests in flight, the others none: two distinct candidates always include an
        // idle one, so 0 is never chosen.
        let c = counts(4, 10_000, || {
            least_request(&members, |m| if m == 0 { 10 } else { 0 }, |_| true)
        });
        assert_eq!(c[0], 0, "{c:?}");
        // Busier endpoints get less: 0 has 1, 1 has 0 → 1 always wins a duel with 0.
        let c = counts(2, 1000, || least_request(&[0, 1], |m| 1 - m, |_| true));
        assert_eq!(c, vec![0, 1000]);
        assert_eq!(least_request(&[3], |_| 5, |_| true), Some(3));
    }

    #[test]
    fn weighted_random_follows_weights() {
        // Weights 1, 1, 1, 0.1 (one endpoint at the slow-start floor): the new one gets 0.1 / 3.1 ≈ 3.2 %.
        let w = |m: u32| if m == 3 { 0.1 } else { 1.0 };
        let c = counts(4, PICKS, || weighted_random(&[0, 1, 2, 3], w, |_| true));
        let share = c[3] as f64 / PICKS as f64;
        assert!((0.022..0.043).contains(&share), "{c:?}");
        within_5_percent(&c[..3], (PICKS as f64 / 3.1) as usize);
        let c = counts(4, 10_000, || weighted_least_request(&[0, 1, 2, 3], |_| 0, w, |_| true));
        assert!(c[3] < 1000, "{c:?}");
    }

    #[test]
    fn warmup_ramp() {
        let window = Duration::from_secs(100);
        assert_eq!(warmup_factor(Duration::ZERO, window), MIN_WARMUP_FACTOR);
        assert_eq!(warmup_factor(Duration::from_secs(5), window), MIN_WARMUP_FACTOR);
        assert!((warmup_factor(Duration::from_secs(50), window) - 0.5).abs() < 1e-9);
        assert!((warmup_factor(Duration::from_secs(99), window) - 0.99).abs() < 1e-9);
        assert_eq!(warmup_factor(Duration::from_secs(100), window), 1.0);
        assert_eq!(warmup_factor(Duration::from_secs(500), window), 1.0);
    }
}
