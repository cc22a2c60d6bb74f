//! Traffic-share checks: weights (`weighted_distribution` in the conventions) and percentage mirroring.

use std::collections::BTreeMap;

use super::cases::DistributionSpec;

/// A pod name with its last two `-` segments (ReplicaSet hash and pod suffix) removed: the Deployment name.
pub fn backend_name(pod: &str) -> String {
    let parts: Vec<&str> = pod.split('-').collect();
    if parts.len() <= 2 {
        return String::new();
    }
    parts[..parts.len() - 2].join("-")
}

/// One round's counts against the expected fractions (share = count / samples): a backend with fraction 0
/// must get nothing, any other must get something and be within the tolerance, an unknown backend fails.
pub fn check(counts: &BTreeMap<String, usize>, spec: &DistributionSpec) -> Result<(), String> {
    let samples = spec.samples.max(1) as f64;
    for (backend, fraction) in &spec.expected_fractions {
        if *fraction > 0.0 && counts.get(backend).copied().unwrap_or(0) == 0 {
            return Err(format!("backend {backend} received no traffic ({})", describe(counts)));
        }
    }
    for (backend, count) in counts {
        let Some(expected) = spec.expected_fractions.get(backend) else {
            return Err(format!("unexpected backend {backend:?} ({})", describe(counts)));
        };
        if *expected == 0.0 && *count > 0 {
            return Err(format!(
                "backend {backend} should receive no traffic ({})",
                describe(counts)
            ));
        }
        let actual = *count as f64 / samples;
        if (actual - expected).abs() > spec.tolerance_abs {
            return Err(format!(
                "backend {backend} got {actual:.3} of the traffic, expected {expected} ± {} ({})",
                spec.tolerance_abs,
                describe(counts)
            ));
        }
    }
    if let Some(exactly) = &spec.backends_receiving_traffic_exactly {
        let got: Vec<&String> = counts.iter().filter(|(_, c)| **c > 0).map(|(b, _)| b).collect();
        let mut want: Vec<&String> = exactly.iter().collect();
        want.sort();
        if got != want {
            return Err(format!("backends with traffic {got:?}, expected exactly {want:?}"));
        }
    }
    Ok(())
}

pub fn describe(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(b, c)| format!("{}={c}", if b.is_empty() { "<none>" } else { b }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `accept_count_between: [lo, hi]` (inclusive).
pub fn check_band(count: usize, band: &[f64]) -> Result<(), String> {
    let [lo, hi] = band else {
        return Err(format!("accept_count_between must be [low, high], got {band:?}"));
    };
    let c = count as f64;
    if c >= *lo && c <= *hi {
        Ok(())
    } else {
        Err(format!("{count} mirrored requests, expected between {lo} and {hi}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> DistributionSpec {
        DistributionSpec {
            samples: 500,
            concurrency: Some(10),
            expected_fractions: BTreeMap::from([
                ("infra-backend-v1".into(), 0.7),
                ("infra-backend-v2".into(), 0.3),
                ("infra-backend-v3".into(), 0.0),
            ]),
            tolerance_abs: 0.05,
            backends_receiving_traffic_exactly: Some(vec!["infra-backend-v1".into(), "infra-backend-v2".into()]),
            max_attempts: Some(10),
            entropy: None,
            per_request_check: None,
        }
    }

    fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
        pairs.iter().map(|(b, c)| (b.to_string(), *c)).collect()
    }

    #[test]
    fn names_strip_the_replica_set_suffixes() {
        assert_eq!(backend_name("infra-backend-v1-7d9c5b8f4-x2kqz"), "infra-backend-v1");
        assert_eq!(backend_name("echo-v2-abcdefghij-klmno"), "echo-v2");
        assert_eq!(backend_name(""), "");
        assert_eq!(backend_name("a-b"), "");
    }

    #[test]
    fn weights_within_tolerance() {
        check(
            &counts(&[("infra-backend-v1", 350), ("infra-backend-v2", 150)]),
            &spec(),
        )
        .unwrap();
        check(
            &counts(&[("infra-backend-v1", 374), ("infra-backend-v2", 126)]),
            &spec(),
        )
        .unwrap();
        let err = check(
            &counts(&[("infra-backend-v1", 400), ("infra-backend-v2", 100)]),
            &spec(),
        )
        .unwrap_err();
        assert!(err.contains("infra-backend-v1"), "{err}");
        assert!(
            check(&counts(&[("infra-backend-v1", 500)]), &spec())
                .unwrap_err()
                .contains("no traffic")
        );
        let err = check(
            &counts(&[
                ("infra-backend-v1", 349),
                ("infra-backend-v2", 150),
                ("infra-backend-v3", 1),
            ]),
            &spec(),
        )
        .unwrap_err();
        assert!(err.contains("infra-backend-v3"), "{err}");
        let err = check(
            &counts(&[("infra-backend-v1", 349), ("infra-backend-v2", 150), ("", 1)]),
            &spec(),
        )
        .unwrap_err();
        assert!(err.contains("unexpected backend"), "{err}");
    }

    #[test]
    fn mirror_band() {
        check_band(100, &[73.17, 126.83]).unwrap();
        assert!(check_band(127, &[73.17, 126.83]).is_err());
        assert!(check_band(73, &[73.17, 126.83]).is_err());
        assert!(check_band(1, &[1.0]).is_err());
    }
}
