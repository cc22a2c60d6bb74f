//! Locality-aware load balancing (`loadBalancer.localityLbSetting`), as Istio programs Envoy:
//!
//! - `distribute`: the first entry whose `from` matches the waypoint's locality applies; each `to` pattern's
//!   weight is shared by the localities it matches (in proportion to their endpoint counts, rounded up, as
//!   Istio does), localities no pattern matches get no traffic. Applies with or without outlier detection.
//! - Otherwise, only when outlier detection is configured (Istio: without it Envoy would never see an endpoint
//!   fail, so it would never leave the first priority): priorities. With `failoverPriority`, an endpoint's
//!   priority is the number of trailing label keys it does not match (the waypoint's labels; the first mismatch
//!   decides). Without it: same region/zone/subzone → 0, same region/zone → 1, same region → 2, other → 3,
//!   and with a `failover` entry for the waypoint's region, regions other than its `to` drop to 4. Empty
//!   priorities are removed.
//! - Traffic goes to priority 0 while it is healthy enough; Envoy's overprovisioning factor 1.4 makes a level
//!   whose healthy share falls below 1/1.4 ≈ 71 % spill the difference to the next level.
//!
//! A waypoint without a locality of its own gets no locality handling (Istio: no proxy locality, no rewrite).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::Endpoint;
use crate::config::policy::{Locality, LocalityLb};

/// Envoy's default overprovisioning factor, in percent.
pub const OVERPROVISIONING: u64 = 140;

/// One priority level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// Endpoint indices (into the backend's endpoint list).
    pub members: Vec<u32>,
    /// With `distribute`: the level's localities and their weights (picked first, then an endpoint within).
    /// Empty: pick among `members` directly.
    pub groups: Vec<(u32, Vec<u32>)>,
}

/// The levels for one backend, highest priority first; `None` when locality does not apply.
pub fn plan(
    endpoints: &[Arc<Endpoint>],
    own: &Locality,
    own_labels: &BTreeMap<String, String>,
    setting: Option<&LocalityLb>,
    outlier_detection: bool,
) -> Option<Vec<Level>> {
    if own.is_empty() || endpoints.is_empty() {
        return None;
    }
    if let Some(setting) = setting
        && !setting.distribute.is_empty()
    {
        return distribute(endpoints, own, &setting.distribute).map(|groups| {
            vec![Level {
                members: groups.iter().flat_map(|(_, m)| m.iter().copied()).collect(),
                groups,
            }]
        });
    }
    if !outlier_detection {
        return None;
    }
    let priorities: Vec<usize> = match setting {
        Some(s) if !s.failover_priority.is_empty() => endpoints
            .iter()
            .map(|ep| label_priority(ep, own_labels, &s.failover_priority))
            .collect(),
        _ => {
            let failover = setting.map_or(&[][..], |s| s.failover.as_slice());
            endpoints
                .iter()
                .map(|ep| locality_priority(own, &ep.locality, failover))
                .collect()
        }
    };
    let mut levels: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for (i, p) in priorities.iter().enumerate() {
        levels.entry(*p).or_default().push(i as u32);
    }
    Some(
        levels
            .into_values()
            .map(|members| Level {
                members,
                groups: Vec::new(),
            })
            .collect(),
    )
}

/// Istio's `LbPriority` plus `failover`.
fn locality_priority(own: &Locality, ep: &Locality, failover: &[(String, String)]) -> usize {
    if own.region == ep.region {
        if own.zone == ep.zone {
            if own.subzone == ep.subzone {
                return 0;
            }
            return 1;
        }
        return 2;
    }
    match failover.iter().find(|(from, _)| *from == own.region) {
        Some((_, to)) if *to != ep.region => 4,
        _ => 3,
    }
}

/// An endpoint's value for a `failoverPriority` key: its label, or for the topology keys its locality.
fn label_value<'a>(ep: &'a Endpoint, key: &str) -> Option<&'a str> {
    if let Some(v) = ep.labels.get(key) {
        return Some(v);
    }
    let from_locality = match key {
        "topology.kubernetes.io/region" => &ep.locality.region,
        "topology.kubernetes.io/zone" => &ep.locality.zone,
        "topology.istio.io/subzone" => &ep.locality.subzone,
        _ => return None,
    };
    (!from_locality.is_empty()).then_some(from_locality.as_str())
}

fn label_priority(ep: &Endpoint, own_labels: &BTreeMap<String, String>, keys: &[String]) -> usize {
    for (j, key) in keys.iter().enumerate() {
        match own_labels.get(key) {
            Some(v) if label_value(ep, key) == Some(v.as_str()) => {}
            _ => return keys.len() - j,
        }
    }
    0
}

/// Istio's `LocalityMatch`: `region/zone/subzone` with `*` for any, and omitted levels matching anything.
pub fn matches(locality: &Locality, pattern: &str) -> bool {
    let p = Locality::parse(pattern);
    let level =
        |rule: &str, actual: &str, may_omit: bool| rule == "*" || (may_omit && rule.is_empty()) || rule == actual;
    level(&p.region, &locality.region, false)
        && level(&p.zone, &locality.zone, true)
        && level(&p.subzone, &locality.subzone, true)
}

/// `distribute`: (weight, members) per endpoint locality, or `None` when no `from` matches the waypoint.
fn distribute(
    endpoints: &[Arc<Endpoint>],
    own: &Locality,
    rules: &[(String, Vec<(String, u32)>)],
) -> Option<Vec<(u32, Vec<u32>)>> {
    let (_, to) = rules.iter().find(|(from, _)| matches(own, from))?;
    // Localities in order of first appearance.
    let mut localities: Vec<(&Locality, Vec<u32>)> = Vec::new();
    for (i, ep) in endpoints.iter().enumerate() {
        match localities.iter_mut().find(|(l, _)| **l == ep.locality) {
            Some((_, members)) => members.push(i as u32),
            None => localities.push((&ep.locality, vec![i as u32])),
        }
    }
    let mut taken = vec![false; localities.len()];
    let mut groups = Vec::new();
    for (pattern, weight) in to {
        let matched: Vec<usize> = (0..localities.len())
            .filter(|i| !taken[*i] && matches(localities[*i].0, pattern))
            .collect();
        let total: u64 = matched.iter().map(|i| localities[*i].1.len() as u64).sum();
        for i in matched {
            taken[i] = true;
            let count = localities[i].1.len() as u64;
            // Istio: ⌈count × weight / total⌉. A weight of 0 sends nothing there (Istio would leave the
            // locality's original weight in place, which is surely not what a 0 means).
            let w = (count * u64::from(*weight)).div_ceil(total.max(1));
            if w > 0 {
                groups.push((u32::try_from(w).unwrap_or(u32::MAX), localities[i].1.clone()));
            }
        }
    }
    Some(groups)
}

/// A level's (or locality's) availability in percent: healthy share × 1.4, capped at 100.
pub fn availability(healthy: usize, total: usize) -> u32 {
    if total == 0 {
        return 0;
    }
    (OVERPROVISIONING * healthy as u64 / total as u64).min(100) as u32
}

/// Envoy's priority load: each level in turn takes as much of the 100 % as its availability (normalised by
/// the total availability, capped at 100) allows; the rounding remainder goes to the first available level.
/// All zeros when nothing is available.
pub fn priority_loads(availability: &[u32]) -> Vec<u32> {
    let total: u32 = availability.iter().sum::<u32>().min(100);
    let mut loads = vec![0u32; availability.len()];
    if total == 0 {
        return loads;
    }
    let mut remaining = 100u32;
    for (load, a) in loads.iter_mut().zip(availability) {
        *load = remaining.min(a * 100 / total);
        remaining -= *load;
    }
    if remaining > 0
        && let Some(first) = availability.iter().position(|a| *a > 0)
    {
        loads[first] += remaining;
    }
    loads
}

/// The level a draw in `0..100` falls into.
pub fn choose(loads: &[u32], draw: u32) -> Option<usize> {
    let mut acc = 0;
    for (i, l) in loads.iter().enumerate() {
        acc += l;
        if draw < acc {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    fn ep(i: u8, locality: &str, labels: &[(&str, &str)]) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr: ([10, 0, 0, i], 80).into(),
            hbone: None,
            identity: SpiffeId::new("cluster.local", "ns", "sa"),
            workload: "w".into(),
            namespace: "ns".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            locality: Locality::parse(locality),
        })
    }

    fn members(levels: &[Level]) -> Vec<Vec<u32>> {
        levels.iter().map(|l| l.members.clone()).collect()
    }

    #[test]
    fn priorities_by_locality_match() {
        let eps = vec![
            ep(1, "us/a/1", &[]),
            ep(2, "us/a/2", &[]),
            ep(3, "us/b/1", &[]),
            ep(4, "eu/a/1", &[]),
            ep(5, "us/a/1", &[]),
        ];
        let own = Locality::parse("us/a/1");
        let none = BTreeMap::new();
        let levels = plan(&eps, &own, &none, None, true).unwrap();
        assert_eq!(members(&levels), vec![vec![0, 4], vec![1], vec![2], vec![3]]);
        assert!(
            plan(&eps, &own, &none, None, false).is_none(),
            "failover needs outlier detection"
        );
        assert!(plan(&eps, &Locality::default(), &none, None, true).is_none());
    }

    #[test]
    fn failover_region_comes_before_other_regions() {
        let eps = vec![ep(1, "us/a", &[]), ep(2, "ap/a", &[]), ep(3, "eu/a", &[])];
        let setting = LocalityLb {
            failover: vec![("us".into(), "eu".into())],
            ..Default::default()
        };
        let levels = plan(&eps, &Locality::parse("us/a"), &BTreeMap::new(), Some(&setting), true).unwrap();
        assert_eq!(members(&levels), vec![vec![0], vec![2], vec![1]]);
    }

    #[test]
    fn failover_priority_by_leading_labels() {
        let eps = vec![
            ep(1, "", &[("net", "n1"), ("cluster", "c1")]),
            ep(2, "", &[("net", "n1"), ("cluster", "c2")]),
            ep(3, "", &[("net", "n2"), ("cluster", "c1")]),
            ep(4, "us/z", &[]),
        ];
        let own_labels: BTreeMap<String, String> = [("net", "n1"), ("cluster", "c1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let setting = LocalityLb {
            failover_priority: vec!["net".into(), "cluster".into()],
            ..Default::default()
        };
        let levels = plan(&eps, &Locality::parse("us/z"), &own_labels, Some(&setting), true).unwrap();
        assert_eq!(members(&levels), vec![vec![0], vec![1], vec![2, 3]]);
        // Topology keys read the endpoint's locality when it has no such label.
        let setting = LocalityLb {
            failover_priority: vec!["topology.kubernetes.io/region".into()],
            ..Default::default()
        };
        let own_labels: BTreeMap<String, String> = [("topology.kubernetes.io/region".to_string(), "us".to_string())]
            .into_iter()
            .collect();
        let levels = plan(&eps, &Locality::parse("us/z"), &own_labels, Some(&setting), true).unwrap();
        assert_eq!(members(&levels), vec![vec![3], vec![0, 1, 2]]);
    }

    #[test]
    fn distribute_weights_localities_and_drops_unmatched() {
        let eps = vec![
            ep(1, "us/a/1", &[]),
            ep(2, "us/a/2", &[]),
            ep(3, "us/a/2", &[]),
            ep(4, "us/b/1", &[]),
            ep(5, "eu/a/1", &[]),
        ];
        let setting = LocalityLb {
            distribute: vec![
                ("eu/*".into(), vec![("eu/*".into(), 100)]),
                ("us/a/*".into(), vec![("us/a/*".into(), 60), ("us/b/*".into(), 40)]),
            ],
            ..Default::default()
        };
        let levels = plan(
            &eps,
            &Locality::parse("us/a/1"),
            &BTreeMap::new(),
            Some(&setting),
            false,
        )
        .unwrap();
        assert_eq!(levels.len(), 1);
        // us/a/1 has 1 of the 3 us/a endpoints: ⌈60/3⌉ = 20; us/a/2 ⌈120/3⌉ = 40; us/b/1 40; eu dropped.
        assert_eq!(levels[0].groups, vec![(20, vec![0]), (40, vec![1, 2]), (40, vec![3])]);
        assert_eq!(levels[0].members, vec![0, 1, 2, 3]);
        // No `from` for the waypoint's locality: nothing applies.
        assert!(plan(&eps, &Locality::parse("ap/x"), &BTreeMap::new(), Some(&setting), false).is_none());
    }

    #[test]
    fn pattern_matching() {
        let l = Locality::parse("us/a/1");
        assert!(matches(&l, "us"));
        assert!(matches(&l, "us/*"));
        assert!(matches(&l, "us/a/*"));
        assert!(matches(&l, "*"));
        assert!(matches(&l, "us/a/1"));
        assert!(!matches(&l, "us/b"));
        assert!(!matches(&l, "eu/*"));
    }

    #[test]
    fn loads_spill_with_overprovisioning() {
        // All healthy: everything on P0.
        assert_eq!(
            priority_loads(&[availability(10, 10), availability(5, 5)]),
            vec![100, 0]
        );
        // 80 % healthy × 1.4 = 112 → still 100 % on P0.
        assert_eq!(priority_loads(&[availability(8, 10), availability(5, 5)]), vec![100, 0]);
        // 50 % healthy → 70 % on P0, 30 % spills to P1.
        assert_eq!(priority_loads(&[availability(5, 10), availability(5, 5)]), vec![70, 30]);
        // Nothing healthy on P0.
        assert_eq!(priority_loads(&[availability(0, 10), availability(5, 5)]), vec![0, 100]);
        // Both degraded: normalised by the total availability (28 + 42 = 70): 40 % / 60 %.
        assert_eq!(
            priority_loads(&[availability(2, 10), availability(3, 10)]),
            vec![40, 60]
        );
        assert_eq!(priority_loads(&[0, 0]), vec![0, 0]);
        assert_eq!(choose(&[70, 30], 69), Some(0));
        assert_eq!(choose(&[70, 30], 70), Some(1));
        assert_eq!(choose(&[0, 0], 5), None);
    }
}
