//! Per-backend runtime state: what must outlive a config snapshot (circuit breaker gauges, endpoint health,
//! active requests, when an endpoint was first seen) and what is derived once per snapshot (the balancer, its
//! hash tables, locality levels).
//!
//! - [`Registry`] keeps one [`BackendState`] per [`Backend::key`] (Envoy's cluster), each with one
//!   [`EndpointState`] per endpoint address. A new snapshot's backends find their old state by key, so a config
//!   swap changes limits and policy but keeps in-flight counts, ejections and warm-up clocks.
//! - A [`Backend`] resolves its [`BackendRuntime`] once per snapshot into `Backend::runtime` (a `OnceLock`):
//!   after that, a request pays one atomic load to reach it. [`Registry::prepare`] resolves every backend of a
//!   new snapshot at once and then drops the states no live snapshot uses any more (held only by the registry),
//!   so the state of a backend that gets no traffic in between survives the swap too.
//! - The default policy (round robin, no outlier detection, no warm-up, no locality) picks with one atomic
//!   increment, as `Backend::pick` does; everything else takes [`BackendRuntime::pick`]'s general path.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use http::request::Parts;
use tokio::time::Instant;
use waypoint_filters::breaker::{CircuitBreaker, Limits};
use waypoint_filters::context::Attempt;

use super::hash::{Maglev, Ring, rehash, xxh64};
use super::http_pool::{ConnGate, PoolParams};
use super::outlier::{Detector, EndpointOutlier, Outcome};
use super::{lb, locality};
use crate::config::policy::{HashAlgo, HashKey, LbPolicy, Locality, TrafficPolicy};
use crate::config::{Backend, Endpoint, Snapshot};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the waypoint itself runs: the reference point of locality load balancing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Own {
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
}

/// The client address a request came from (for `consistentHash.useSourceIp`); put in the request extensions
/// only when some backend of the snapshot hashes on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

#[derive(Default)]
pub struct Registry {
    backends: Mutex<HashMap<String, Arc<BackendState>>>,
    next_id: AtomicU64,
    /// Generation of the last snapshot [`Registry::prepare`] went through.
    prepared: AtomicU64,
    prepare_lock: Mutex<()>,
    /// Whether a backend of that snapshot hashes on the client address.
    source_ip: std::sync::atomic::AtomicBool,
    own: ArcSwap<Own>,
}

/// One backend's state for the life of the process (while some snapshot has the backend).
pub struct BackendState {
    pub key: String,
    /// Distinguishes this backend's pooled connections from other backends' to the same endpoint (Envoy pools
    /// per cluster, and the connection limit is per backend).
    pub id: u64,
    pub gate: Arc<ConnGate>,
    pub detector: Detector,
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
}

pub struct EndpointState {
    pub addr: SocketAddr,
    /// Requests in flight (counted for `LEAST_REQUEST` backends only).
    pub active: AtomicU32,
    /// When a snapshot first listed this endpoint for this backend (warm-up age).
    pub first_seen: Instant,
    pub outlier: EndpointOutlier,
}

impl BackendState {
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.gate.breaker
    }

    /// The states of `endpoints`, created for new addresses. States no runtime holds any more are dropped.
    fn attach(&self, endpoints: &[Arc<Endpoint>]) -> Vec<Arc<EndpointState>> {
        let now = Instant::now();
        let mut map = lock(&self.endpoints);
        let states = endpoints
            .iter()
            .map(|ep| {
                map.entry(ep.addr)
                    .or_insert_with(|| {
                        Arc::new(EndpointState {
                            addr: ep.addr,
                            active: AtomicU32::new(0),
                            first_seen: now,
                            outlier: EndpointOutlier::default(),
                        })
                    })
                    .clone()
            })
            .collect();
        map.retain(|_, s| {
            let used = Arc::strong_count(s) > 1;
            if !used {
                self.detector.forget(&s.outlier);
            }
            used
        });
        states
    }
}

fn limits(policy: &TrafficPolicy) -> Limits {
    Limits {
        max_connections: policy.pool.max_connections,
        max_pending: policy.pool.max_pending,
        max_requests: policy.pool.max_requests,
        max_retries: policy.pool.max_retries,
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The backend's runtime for this snapshot, built on first use.
    pub fn runtime<'b>(&self, backend: &'b Backend) -> &'b Arc<BackendRuntime> {
        backend.runtime.get_or_init(|| Arc::new(self.build(backend)))
    }

    fn state(&self, key: String) -> Arc<BackendState> {
        let mut map = lock(&self.backends);
        map.entry(key)
            .or_insert_with_key(|key| {
                Arc::new(BackendState {
                    key: key.clone(),
                    id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
                    gate: Arc::new(ConnGate::new(Arc::new(CircuitBreaker::default()))),
                    detector: Detector::new(Instant::now()),
                    endpoints: Mutex::new(HashMap::new()),
                })
            })
            .clone()
    }

    fn build(&self, backend: &Backend) -> BackendRuntime {
        let state = self.state(backend.key());
        let policy = backend.policy.clone();
        state.breaker().set_limits(limits(&policy));
        let eps = state.attach(&backend.endpoints);
        BackendRuntime::new(state, eps, backend, policy, &self.own.load())
    }

    /// Called with the snapshot a request or tunnel is served from; does something once per generation:
    /// records the waypoint's own locality, resolves every backend's runtime and drops unused state. Returns
    /// whether requests need a [`ClientAddr`].
    pub fn prepare(&self, snapshot: &Snapshot) -> bool {
        if self.prepared.load(Ordering::Acquire) == snapshot.generation {
            return self.source_ip.load(Ordering::Acquire);
        }
        let _single = lock(&self.prepare_lock);
        if self.prepared.load(Ordering::Acquire) == snapshot.generation {
            return self.source_ip.load(Ordering::Acquire);
        }
        let own = Own {
            locality: snapshot.settings.locality.clone(),
            labels: snapshot.settings.labels.clone(),
        };
        if **self.own.load() != own {
            self.own.store(Arc::new(own));
        }
        let mut source_ip = false;
        let bindings = snapshot.services.values().map(|b| &b.backend);
        for backend in snapshot.backends.iter().chain(bindings) {
            self.runtime(backend);
            source_ip |= matches!(
                backend.policy.lb,
                LbPolicy::Hash {
                    key: HashKey::SourceIp,
                    ..
                }
            );
        }
        lock(&self.backends).retain(|_, s| Arc::strong_count(s) > 1);
        self.source_ip.store(source_ip, Ordering::Release);
        self.prepared.store(snapshot.generation, Ordering::Release);
        source_ip
    }

    #[cfg(test)]
    pub(crate) fn set_own(&self, own: Own) {
        self.own.store(Arc::new(own));
    }

    /// Generation of the last snapshot prepared (0 before the first).
    pub fn prepared(&self) -> u64 {
        self.prepared.load(Ordering::Acquire)
    }

    /// Per backend: breaker limits and in-use counts, and each endpoint's health (for `/config_dump`).
    pub fn dump(&self) -> serde_json::Value {
        let states: Vec<Arc<BackendState>> = lock(&self.backends).values().cloned().collect();
        let now = Instant::now();
        let mut out = BTreeMap::new();
        for s in states {
            let [connections, pending, requests, retries] = s.breaker().in_use();
            let l = s.breaker().limits();
            let now_ns = s.detector.nanos(now);
            let mut eps: Vec<Arc<EndpointState>> = lock(&s.endpoints).values().cloned().collect();
            eps.sort_by_key(|e| e.addr);
            let endpoints: Vec<serde_json::Value> = eps
                .iter()
                .map(|e| {
                    let v = e.outlier.view(now_ns);
                    serde_json::json!({
                        "address": e.addr.to_string(),
                        "activeRequests": e.active.load(Ordering::Relaxed),
                        "ejected": v.ejected,
                        "ejectionRemainingMs": v.remaining.map(|d| d.as_millis() as u64),
                        "ejectionMultiplier": v.multiplier,
                        "timesEjected": v.times_ejected,
                        "consecutive5xx": v.consecutive_5xx,
                        "consecutiveGatewayErrors": v.consecutive_gateway,
                        "ageMs": now.saturating_duration_since(e.first_seen).as_millis() as u64,
                    })
                })
                .collect();
            out.insert(
                s.key.clone(),
                serde_json::json!({
                    "breaker": {
                        "connections": {"inUse": connections, "limit": l.max_connections},
                        "pending": {"inUse": pending, "limit": l.max_pending},
                        "requests": {"inUse": requests, "limit": l.max_requests},
                        "retries": {"inUse": retries, "limit": l.max_retries},
                    },
                    "endpoints": endpoints,
                }),
            );
        }
        serde_json::json!(out)
    }

    /// Number of backend states kept (for tests).
    pub fn len(&self) -> usize {
        lock(&self.backends).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A set of endpoints picked among as one: all of them, one priority level, or one locality of a level.
#[derive(Debug)]
struct Tier {
    members: Vec<u32>,
    cursor: AtomicUsize,
    table: OnceLock<Table>,
}

impl Tier {
    fn new(members: Vec<u32>) -> Tier {
        Tier {
            members,
            cursor: AtomicUsize::new(0),
            table: OnceLock::new(),
        }
    }
}

#[derive(Debug)]
enum Table {
    Ring(Ring),
    Maglev(Maglev),
}

#[derive(Debug)]
struct Level {
    tier: Tier,
    /// `distribute` localities: (weight, endpoints).
    groups: Vec<(u32, Tier)>,
}

/// Healthy counts per level and locality at one detector version.
#[derive(Debug)]
struct Health {
    version: u64,
    ejected: usize,
    /// Per level: its (healthy, total), and that of each of its localities.
    levels: Vec<(Count, Vec<Count>)>,
}

/// (healthy, total) endpoints.
type Count = (usize, usize);

/// A backend's balancer for one snapshot, over the registry's long-lived state.
pub struct BackendRuntime {
    pub state: Arc<BackendState>,
    /// Aligned with `Backend::endpoints`.
    pub eps: Vec<Arc<EndpointState>>,
    pub policy: Arc<TrafficPolicy>,
    /// Round robin with nothing else configured: the one-atomic path.
    simple: bool,
    all: Tier,
    levels: Option<Vec<Level>>,
    /// Until when some endpoint is still warming up.
    warm_until: Option<Instant>,
    health: ArcSwapOption<Health>,
    name: String,
}

impl fmt::Debug for BackendRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendRuntime")
            .field("backend", &self.state.key)
            .field("endpoints", &self.eps.len())
            .finish_non_exhaustive()
    }
}

/// What a pick may take into account besides the policy.
#[derive(Debug, Default, Clone, Copy)]
pub struct PickInput<'a> {
    /// The request's consistent-hash key hash (`None`: no key, or not a hash policy → random, as Envoy).
    pub hash: Option<u64>,
    /// The retry attempt (previously tried endpoints are avoided while others remain).
    pub attempt: Option<&'a Attempt>,
}

/// Decrements an endpoint's active-request count when the request ends.
pub struct ActiveGuard(Arc<EndpointState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BackendRuntime {
    fn new(
        state: Arc<BackendState>,
        eps: Vec<Arc<EndpointState>>,
        backend: &Backend,
        policy: Arc<TrafficPolicy>,
        own: &Own,
    ) -> BackendRuntime {
        let levels = locality::plan(
            &backend.endpoints,
            &own.locality,
            &own.labels,
            policy.locality.as_ref(),
            policy.outlier.is_some(),
        )
        .map(|levels| {
            levels
                .into_iter()
                .map(|l| Level {
                    tier: Tier::new(l.members),
                    groups: l.groups.into_iter().map(|(w, m)| (w, Tier::new(m))).collect(),
                })
                .collect()
        });
        let warm_until = policy
            .warmup
            .filter(|w| !w.is_zero())
            .and_then(|w| eps.iter().map(|e| e.first_seen).max().map(|t| t + w));
        let simple =
            policy.lb == LbPolicy::RoundRobin && policy.outlier.is_none() && warm_until.is_none() && levels.is_none();
        BackendRuntime {
            all: Tier::new((0..eps.len() as u32).collect()),
            name: state.key.clone(),
            state,
            eps,
            policy,
            simple,
            levels,
            warm_until,
            health: ArcSwapOption::empty(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection pool settings of this backend for the HTTP pool.
    pub fn pool_params(&self) -> PoolParams<'_> {
        let p = &self.policy.pool;
        PoolParams {
            gate: Some(&self.state.gate),
            pool_id: self.state.id,
            idle_timeout: p.idle_timeout.unwrap_or(super::http_pool::DEFAULT_IDLE_TIMEOUT),
            max_requests_per_connection: p.max_requests_per_connection.filter(|n| *n > 0),
            connect_timeout: p.connect_timeout,
        }
    }

    /// The request's hash key (per `consistentHash`), and the `Set-Cookie` value to answer with when the key is
    /// a cookie with a TTL that the request did not carry (Envoy generates one; here a random 64-bit value).
    pub fn request_hash(&self, parts: &Parts, client: Option<IpAddr>) -> (Option<u64>, Option<HeaderValue>) {
        let LbPolicy::Hash { key, .. } = &self.policy.lb else {
            return (None, None);
        };
        match key {
            HashKey::Header(name) => (parts.headers.get(name).map(|v| xxh64(v.as_bytes(), 0)), None),
            HashKey::Query(name) => (
                query_param(parts.uri.query(), name).map(|v| xxh64(v.as_bytes(), 0)),
                None,
            ),
            HashKey::SourceIp => (client.map(source_hash), None),
            HashKey::Cookie { name, path, ttl } => {
                if let Some(v) = cookie(&parts.headers, name) {
                    return (Some(xxh64(v.as_bytes(), 0)), None);
                }
                let Some(ttl) = ttl else {
                    return (None, None);
                };
                let value = format!("{:016x}", fastrand::u64(..));
                let mut set = format!("{name}={value}");
                if let Some(p) = path {
                    set.push_str("; Path=");
                    set.push_str(p);
                }
                // Envoy: a zero TTL makes a session cookie (no Max-Age).
                if !ttl.is_zero() {
                    set.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                }
                set.push_str("; HttpOnly");
                (Some(xxh64(value.as_bytes(), 0)), HeaderValue::try_from(set).ok())
            }
        }
    }

    /// The hash for a TCP tunnel: only `useSourceIp` applies to opaque traffic (the others pick at random, as
    /// Envoy's TCP proxy does without a usable key).
    pub fn connection_hash(&self, client: Option<IpAddr>) -> Option<u64> {
        match &self.policy.lb {
            LbPolicy::Hash {
                key: HashKey::SourceIp, ..
            } => client.map(source_hash),
            _ => None,
        }
    }

    /// An endpoint index for a request; `None` when no endpoint can take it (none, or all ejected without
    /// panic mode).
    pub fn pick(&self, input: &PickInput<'_>) -> Option<usize> {
        let n = self.eps.len();
        if n == 0 {
            return None;
        }
        if self.simple && input.attempt.is_none_or(|a| a.number <= 1) {
            return Some(self.all.cursor.fetch_add(1, Ordering::Relaxed) % n);
        }
        self.pick_general(input).map(|i| i as usize)
    }

    fn pick_general(&self, input: &PickInput<'_>) -> Option<u32> {
        let retry = input.attempt.filter(|a| a.number > 1);
        let tried_guard = retry.map(|a| lock(&a.tried));
        let tried: &[SocketAddr] = tried_guard.as_deref().map_or(&[], |v| v.as_slice());
        let n = self.eps.len();

        let mut now: Option<Instant> = None;
        let mut clock = || *now.get_or_insert_with(Instant::now);
        let detector = &self.state.detector;
        let (now_ns, health) = match &self.policy.outlier {
            Some(p) if detector.any_ejected() => {
                let ns = detector.nanos(clock());
                if detector.due(ns) {
                    let all: Vec<Arc<EndpointState>> = lock(&self.state.endpoints).values().cloned().collect();
                    detector.sweep(ns, p, all.iter().map(|e| &e.outlier));
                }
                let health = self.health(ns);
                // Panic mode: below `minHealthPercent` healthy, ejections are ignored (Envoy's healthy panic
                // threshold; Istio's default 0 never panics).
                let healthy = n - health.ejected;
                let panic = (healthy as u64) * 100 < u64::from(p.min_health_percent) * n as u64;
                if panic { (None, None) } else { (Some(ns), Some(health)) }
            }
            _ => (None, None),
        };
        let ejected = |i: u32| now_ns.is_some_and(|ns| self.eps[i as usize].outlier.is_ejected(ns));
        let is_tried = |i: u32| tried.contains(&self.eps[i as usize].addr);

        let tier = match &self.levels {
            None => &self.all,
            Some(levels) => self.level_tier(
                levels,
                health.as_deref(),
                input,
                retry.is_some_and(|a| a.remote_localities),
                &is_tried,
            )?,
        };
        let warming = self.warm_until.is_some_and(|u| clock() < u);
        let now = if warming { Some(clock()) } else { None };
        let fresh = |i: u32| !ejected(i) && !is_tried(i);
        self.choose(tier, input.hash, now, &fresh).or_else(|| {
            if tried.is_empty() {
                None
            } else {
                self.choose(tier, input.hash, now, &|i| !ejected(i))
            }
        })
    }

    fn level_tier<'s>(
        &'s self,
        levels: &'s [Level],
        health: Option<&Health>,
        input: &PickInput<'_>,
        leave_tried_levels: bool,
        is_tried: &dyn Fn(u32) -> bool,
    ) -> Option<&'s Tier> {
        let draw = |h: Option<u64>| match h {
            Some(h) => (h % 100) as u32,
            None => fastrand::u32(..100),
        };
        // `retryRemoteLocalities`: Envoy's previous_priorities retry priority, levels already tried get no
        // load (unless that leaves none).
        let tried_level = |l: &Level| leave_tried_levels && l.tier.members.iter().any(|m| is_tried(*m));
        let level = if health.is_none() && !levels.iter().any(tried_level) {
            &levels[0]
        } else {
            let avail = |skip_tried: bool| -> Vec<u32> {
                levels
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        if skip_tried && tried_level(l) {
                            return 0;
                        }
                        match health {
                            Some(h) => locality::availability(h.levels[i].0.0, h.levels[i].0.1),
                            None => 100,
                        }
                    })
                    .collect()
            };
            let mut loads = locality::priority_loads(&avail(true));
            if loads.iter().all(|l| *l == 0) {
                loads = locality::priority_loads(&avail(false));
            }
            let i = locality::choose(&loads, draw(input.hash))?;
            &levels[i]
        };
        if level.groups.is_empty() {
            return Some(&level.tier);
        }
        let li = levels.iter().position(|l| std::ptr::eq(l, level)).unwrap_or(0);
        let weights: Vec<u64> = level
            .groups
            .iter()
            .enumerate()
            .map(|(g, (w, _))| {
                let a = health.map_or(100, |h| {
                    let (healthy, total) = h.levels[li].1[g];
                    locality::availability(healthy, total)
                });
                u64::from(*w) * u64::from(a)
            })
            .collect();
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return None;
        }
        let mut x = match input.hash {
            Some(h) => rehash(h, 0) % total,
            None => fastrand::u64(..total),
        };
        for (g, w) in weights.iter().enumerate() {
            if x < *w {
                return Some(&level.groups[g].1);
            }
            x -= w;
        }
        None
    }

    fn choose(
        &self,
        tier: &Tier,
        hash: Option<u64>,
        warming: Option<Instant>,
        ok: &dyn Fn(u32) -> bool,
    ) -> Option<u32> {
        let members = &tier.members[..];
        let weight = |now: Instant, window: Duration| {
            move |i: u32| lb::warmup_factor(now.saturating_duration_since(self.eps[i as usize].first_seen), window)
        };
        let active = |i: u32| self.eps[i as usize].active.load(Ordering::Relaxed);
        match (&self.policy.lb, warming.zip(self.policy.warmup)) {
            (LbPolicy::RoundRobin, None) => lb::round_robin(members, &tier.cursor, ok),
            (LbPolicy::RoundRobin, Some((now, w))) => lb::weighted_random(members, weight(now, w), ok),
            (LbPolicy::LeastRequest, None) => lb::least_request(members, active, ok),
            (LbPolicy::LeastRequest, Some((now, w))) => lb::weighted_least_request(members, active, weight(now, w), ok),
            // Envoy's slow start applies to round robin and least request only.
            (LbPolicy::Random, _) => lb::random(members, ok),
            (LbPolicy::Hash { algo, .. }, _) => match hash {
                None => lb::random(members, ok),
                Some(h) => self.hash_pick(tier, *algo, h, ok),
            },
        }
    }

    fn hash_pick(&self, tier: &Tier, algo: HashAlgo, hash: u64, ok: &dyn Fn(u32) -> bool) -> Option<u32> {
        let table = tier.table.get_or_init(|| {
            let addrs: Vec<SocketAddr> = tier.members.iter().map(|i| self.eps[*i as usize].addr).collect();
            match algo {
                HashAlgo::Ring { min_size } => Table::Ring(Ring::build(&addrs, min_size)),
                HashAlgo::Maglev { table_size } => Table::Maglev(Maglev::build(&addrs, table_size)),
            }
        });
        match table {
            // Walking on is what removing the unusable endpoints from the ring would do.
            Table::Ring(ring) => ring.walk(hash).map(|m| tier.members[m as usize]).find(|i| ok(*i)),
            // Maglev has no neighbour order: probe with derived hashes, then any usable endpoint.
            Table::Maglev(m) => (0..2 * tier.members.len() as u64 + 8)
                .filter_map(|k| m.lookup(if k == 0 { hash } else { rehash(hash, k) }))
                .map(|mi| tier.members[mi as usize])
                .find(|i| ok(*i))
                .or_else(|| lb::random(&tier.members, ok)),
        }
    }

    fn health(&self, now_ns: u64) -> Arc<Health> {
        let version = self.state.detector.version();
        if let Some(h) = self.health.load_full()
            && h.version == version
        {
            return h;
        }
        let out = |i: &u32| self.eps[*i as usize].outlier.is_ejected(now_ns);
        let count = |t: &Tier| {
            (
                t.members.len() - t.members.iter().filter(|i| out(i)).count(),
                t.members.len(),
            )
        };
        let h = Arc::new(Health {
            version,
            ejected: (0..self.eps.len() as u32).filter(|i| out(i)).count(),
            levels: self
                .levels
                .iter()
                .flatten()
                .map(|l| (count(&l.tier), l.groups.iter().map(|(_, t)| count(t)).collect()))
                .collect(),
        });
        self.health.store(Some(h.clone()));
        h
    }

    /// Counts a request in flight on the endpoint (least-request backends only), until the guard drops.
    pub fn begin(&self, index: usize) -> Option<ActiveGuard> {
        if !matches!(self.policy.lb, LbPolicy::LeastRequest) {
            return None;
        }
        let ep = self.eps.get(index)?;
        ep.active.fetch_add(1, Ordering::Relaxed);
        Some(ActiveGuard(ep.clone()))
    }

    /// Feeds outlier detection with an attempt's outcome.
    pub fn report(&self, index: usize, outcome: Outcome) {
        let Some(policy) = &self.policy.outlier else {
            return;
        };
        let Some(ep) = self.eps.get(index) else {
            return;
        };
        if ep.outlier.record(outcome, policy)
            && self
                .state
                .detector
                .eject(&ep.outlier, policy, Instant::now(), self.eps.iter().map(|e| &e.outlier))
        {
            tracing::info!(backend = %self.name, endpoint = %ep.addr, ?outcome, "outlier detection ejected the endpoint");
        }
    }
}

fn source_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => xxh64(&v4.octets(), 0),
        IpAddr::V6(v6) => xxh64(&v6.octets(), 0),
    }
}

/// The value of `name` in a query string (raw, as sent).
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The value of cookie `name` (quotes removed, as Envoy).
fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// The endpoint an attempt of a request is on, for outlier detection of timeouts: a timeout drops the
/// attempt's future before it can report, so whoever sees the timeout (the next attempt, or the layer
/// outside the retries) reports it from here. Inserted only for backends with outlier detection.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Mutex<Option<Attempted>>>);

/// An endpoint (index) of a backend runtime.
pub type Attempted = (Arc<BackendRuntime>, usize);

impl InFlight {
    /// Records the attempt now starting (after [`InFlight::take`] collected any earlier one).
    pub fn start(&self, rt: Arc<BackendRuntime>, index: usize) {
        *lock(&self.0) = Some((rt, index));
    }

    /// The attempt in flight, cleared.
    pub fn take(&self) -> Option<Attempted> {
        lock(&self.0).take()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use http::Request;

    use super::*;
    use crate::config::PortProtocol;
    use crate::config::policy::{ConnectionPool, LocalityLb, OutlierPolicy};
    use crate::upstream::test_support::{backend, endpoint};

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([10, 0, 0, i], 80))).collect()
    }

    fn policy(lb: LbPolicy) -> TrafficPolicy {
        TrafficPolicy {
            lb,
            ..TrafficPolicy::default()
        }
    }

    fn outlier(max_percent: u32) -> Option<OutlierPolicy> {
        Some(OutlierPolicy {
            consecutive_5xx: Some(2),
            max_ejection_percent: max_percent,
            ..OutlierPolicy::default()
        })
    }

    fn eject(rt: &BackendRuntime, i: usize) {
        rt.report(i, Outcome::LocalFailure);
        rt.report(i, Outcome::LocalFailure);
        let ns = rt.state.detector.nanos(Instant::now());
        assert!(rt.eps[i].outlier.is_ejected(ns), "endpoint {i} should be ejected");
    }

    fn counts(rt: &BackendRuntime, picks: usize, input: &PickInput<'_>) -> Vec<usize> {
        let mut c = vec![0; rt.eps.len()];
        for _ in 0..picks {
            c[rt.pick(input).unwrap()] += 1;
        }
        c
    }

    fn attempt(number: u32, remote_localities: bool, tried: &[SocketAddr]) -> Attempt {
        Attempt {
            number,
            remote_localities,
            tried: Arc::new(Mutex::new(tried.to_vec())),
        }
    }

    fn share(c: &[usize], of: &[usize]) -> f64 {
        of.iter().map(|i| c[*i]).sum::<usize>() as f64 / c.iter().sum::<usize>() as f64
    }

    #[test]
    fn default_policy_takes_the_round_robin_cursor_path() {
        let reg = Registry::new();
        let b = backend("svc", PortProtocol::Http, &addrs(3), TrafficPolicy::default());
        let rt = reg.runtime(&b);
        assert!(rt.simple);
        let order: Vec<usize> = (0..6).map(|_| rt.pick(&PickInput::default()).unwrap()).collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
        assert!(std::ptr::eq(reg.runtime(&b), rt), "resolved once per backend object");
        let empty = backend("none", PortProtocol::Http, &[], TrafficPolicy::default());
        assert_eq!(reg.runtime(&empty).pick(&PickInput::default()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoints_are_skipped_until_their_ejection_ends() {
        let reg = Registry::new();
        let p = TrafficPolicy {
            outlier: outlier(50),
            ..TrafficPolicy::default()
        };
        let b = backend("svc", PortProtocol::Http, &addrs(3), p);
        let rt = reg.runtime(&b);
        eject(rt, 0);
        assert_eq!(
            counts(rt, 300, &PickInput::default()),
            vec![0, 150, 150],
            "round robin over the other two"
        );
        // Default base ejection 30 s, interval 10 s: back at the 30 s sweep.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(counts(rt, 300, &PickInput::default()), vec![100, 100, 100]);
        assert!(!rt.state.detector.any_ejected(), "the return was booked");
    }

    #[tokio::test(start_paused = true)]
    async fn all_ejected_means_no_endpoint_unless_below_min_health() {
        let reg = Registry::new();
        let b = backend(
            "svc",
            PortProtocol::Http,
            &addrs(1),
            TrafficPolicy {
                outlier: outlier(100),
                ..TrafficPolicy::default()
            },
        );
        let rt = reg.runtime(&b);
        eject(rt, 0);
        assert_eq!(
            rt.pick(&PickInput::default()),
            None,
            "Istio's default minHealthPercent 0: no panic mode"
        );
        let mut p = TrafficPolicy {
            outlier: outlier(100),
            ..TrafficPolicy::default()
        };
        if let Some(o) = p.outlier.as_mut() {
            o.min_health_percent = 50;
        }
        let panicky = backend("svc", PortProtocol::Http, &addrs(1), p);
        let rt = reg.runtime(&panicky);
        assert!(
            rt.eps[0].outlier.is_ejected(rt.state.detector.nanos(Instant::now())),
            "state is shared"
        );
        assert_eq!(rt.pick(&PickInput::default()), Some(0), "panic: ejections ignored");
    }

    #[test]
    fn retries_avoid_endpoints_already_tried() {
        let reg = Registry::new();
        let a = addrs(3);
        let header = HashKey::Header(http::HeaderName::from_static("x-user"));
        for lb in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
            LbPolicy::Hash {
                key: header.clone(),
                algo: HashAlgo::Ring { min_size: 1024 },
            },
            LbPolicy::Hash {
                key: header.clone(),
                algo: HashAlgo::Maglev { table_size: 65537 },
            },
        ] {
            let b = backend(&format!("{lb:?}"), PortProtocol::Http, &a, policy(lb.clone()));
            let rt = reg.runtime(&b);
            let hash = Some(xxh64(b"alice", 0));
            let first = rt.pick(&PickInput { hash, attempt: None }).unwrap();
            let retry = attempt(2, false, &[a[first]]);
            for _ in 0..50 {
                let i = rt
                    .pick(&PickInput {
                        hash,
                        attempt: Some(&retry),
                    })
                    .unwrap();
                assert_ne!(i, first, "{lb:?}");
            }
            // Everything tried: an endpoint is still chosen.
            let all = attempt(4, false, &a);
            assert!(
                rt.pick(&PickInput {
                    hash,
                    attempt: Some(&all)
                })
                .is_some(),
                "{lb:?}"
            );
            // The first attempt is not constrained.
            let first_try = attempt(1, false, &[]);
            assert!(
                rt.pick(&PickInput {
                    hash,
                    attempt: Some(&first_try)
                })
                .is_some()
            );
        }
    }

    #[test]
    fn least_request_counts_requests_in_flight() {
        let reg = Registry::new();
        let b = backend("svc", PortProtocol::Http, &addrs(2), policy(LbPolicy::LeastRequest));
        let rt = reg.runtime(&b);
        let busy = rt.begin(0).unwrap();
        assert_eq!(counts(rt, 100, &PickInput::default()), vec![0, 100]);
        drop(busy);
        assert_eq!(rt.eps[0].active.load(Ordering::Relaxed), 0);
        let c = counts(rt, 10_000, &PickInput::default());
        assert!(c[0].abs_diff(5000) < 500, "{c:?}");
        let rr = backend("rr", PortProtocol::Http, &addrs(2), TrafficPolicy::default());
        assert!(reg.runtime(&rr).begin(0).is_none(), "only least request counts");
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut r = Request::builder().uri(uri);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hash_keys_from_header_cookie_query_and_source() {
        let reg = Registry::new();
        let hashed = |name: &str, key: HashKey| {
            backend(
                name,
                PortProtocol::Http,
                &addrs(5),
                policy(LbPolicy::Hash {
                    key,
                    algo: HashAlgo::Ring { min_size: 1024 },
                }),
            )
        };
        let b = hashed("header", HashKey::Header(http::HeaderName::from_static("x-user")));
        let rt = reg.runtime(&b);
        let (h, cookie) = rt.request_hash(&parts("/", &[("x-user", "alice")]), None);
        assert_eq!((h, cookie), (Some(xxh64(b"alice", 0)), None));
        assert_eq!(rt.request_hash(&parts("/", &[]), None), (None, None));
        let first = rt.pick(&PickInput { hash: h, attempt: None });
        for _ in 0..20 {
            assert_eq!(
                rt.pick(&PickInput { hash: h, attempt: None }),
                first,
                "same key, same endpoint"
            );
        }

        let b = hashed("query", HashKey::Query("user".into()));
        let rt = reg.runtime(&b);
        assert_eq!(
            rt.request_hash(&parts("/p?a=1&user=bob", &[]), None).0,
            Some(xxh64(b"bob", 0))
        );
        assert_eq!(rt.request_hash(&parts("/p?users=bob", &[]), None).0, None);

        let b = hashed("ip", HashKey::SourceIp);
        let rt = reg.runtime(&b);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            rt.request_hash(&parts("/", &[]), Some(ip)).0,
            Some(xxh64(&[10, 1, 2, 3], 0))
        );
        assert_eq!(rt.connection_hash(Some(ip)), Some(xxh64(&[10, 1, 2, 3], 0)));

        let b = hashed(
            "cookie",
            HashKey::Cookie {
                name: "session".into(),
                path: Some("/".into()),
                ttl: Some(Duration::from_secs(60)),
            },
        );
        let rt = reg.runtime(&b);
        let (h, set) = rt.request_hash(&parts("/", &[("cookie", "a=1; session=\"xyz\"")]), None);
        assert_eq!(
            (h, set),
            (Some(xxh64(b"xyz", 0)), None),
            "quotes removed, no new cookie"
        );
        let (h, set) = rt.request_hash(&parts("/", &[("cookie", "a=1")]), None);
        let set = set.unwrap();
        let set = set.to_str().unwrap();
        let value = set.strip_prefix("session=").unwrap().split(';').next().unwrap();
        assert_eq!(value.len(), 16);
        assert_eq!(set, format!("session={value}; Path=/; Max-Age=60; HttpOnly"));
        assert_eq!(
            h,
            Some(xxh64(value.as_bytes(), 0)),
            "the request hashes on the cookie it is given"
        );
        let b = hashed(
            "cookie-no-ttl",
            HashKey::Cookie {
                name: "session".into(),
                path: None,
                ttl: None,
            },
        );
        assert_eq!(reg.runtime(&b).request_hash(&parts("/", &[]), None), (None, None));
    }

    #[test]
    fn maglev_moves_only_the_keys_of_an_ejected_endpoint() {
        let reg = Registry::new();
        let p = TrafficPolicy {
            lb: LbPolicy::Hash {
                key: HashKey::SourceIp,
                algo: HashAlgo::Maglev { table_size: 65537 },
            },
            outlier: outlier(50),
            ..TrafficPolicy::default()
        };
        let b = backend("svc", PortProtocol::Http, &addrs(4), p);
        let rt = reg.runtime(&b);
        let keys: Vec<u64> = (0..2000u32).map(|i| xxh64(&i.to_le_bytes(), 0)).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|h| {
                rt.pick(&PickInput {
                    hash: Some(*h),
                    attempt: None,
                })
                .unwrap()
            })
            .collect();
        eject(rt, 1);
        for (h, was) in keys.iter().zip(&before) {
            let now = rt
                .pick(&PickInput {
                    hash: Some(*h),
                    attempt: None,
                })
                .unwrap();
            if *was == 1 {
                assert_ne!(now, 1);
            } else {
                assert_eq!(now, *was, "keys of healthy endpoints stay");
            }
        }
    }

    #[test]
    fn state_survives_a_config_swap() {
        let reg = Registry::new();
        let p1 = TrafficPolicy {
            outlier: outlier(50),
            pool: ConnectionPool {
                max_connections: Some(1),
                ..ConnectionPool::default()
            },
            ..TrafficPolicy::default()
        };
        let b1 = backend("svc", PortProtocol::Http, &addrs(3), p1);
        let rt1 = reg.runtime(&b1).clone();
        eject(&rt1, 0);
        let permit = rt1.state.gate.try_connection().unwrap();
        assert!(rt1.state.gate.try_connection().is_err());
        // The next snapshot's backend: a new object, the same key, a new policy and one more endpoint.
        let p2 = TrafficPolicy {
            outlier: outlier(50),
            pool: ConnectionPool {
                max_connections: Some(5),
                ..ConnectionPool::default()
            },
            ..TrafficPolicy::default()
        };
        let b2 = backend("svc", PortProtocol::Http, &addrs(4), p2);
        let rt2 = reg.runtime(&b2);
        assert!(Arc::ptr_eq(&rt1.state, &rt2.state));
        assert!(Arc::ptr_eq(&rt1.eps[0], &rt2.eps[0]));
        assert!(rt2.eps[0].outlier.is_ejected(rt2.state.detector.nanos(Instant::now())));
        assert_eq!(counts(rt2, 300, &PickInput::default())[0], 0);
        assert_eq!(rt2.state.breaker().limits().max_connections, Some(5));
        assert_eq!(rt2.state.breaker().in_use()[0], 1, "in-flight counts carry over");
        drop(permit);
        assert_eq!(rt2.state.breaker().in_use()[0], 0);
        // A subset is another backend with its own state.
        let mut sub = backend("svc", PortProtocol::Http, &addrs(3), TrafficPolicy::default());
        sub.subset = Some("v1".into());
        assert!(!Arc::ptr_eq(&reg.runtime(&sub).state, &rt1.state));
    }

    const CONFIG: &str = "apiVersion: waypoint.istio.io/v1alpha1
kind: WaypointConfig
metadata: {name: wp, namespace: infra}
spec:
  listeners: {hbone: 127.0.0.1:15008}
  tls: {certFile: c.pem, keyFile: k.pem, rootsFile: r.pem}
";

    fn service(name: &str, ip: &str, pod_ip: &str) -> String {
        format!(
            "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ns1}}
spec:
  clusterIP: {ip}
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-1, namespace: ns1, labels: {{app: {name}}}}}
status: {{podIP: {pod_ip}}}
"
        )
    }

    #[test]
    fn prepare_keeps_state_of_untouched_backends_and_drops_state_no_snapshot_uses() {
        let reg = Registry::new();
        let both = format!(
            "{CONFIG}{}{}",
            service("a", "10.96.0.1", "10.1.0.1"),
            service("b", "10.96.0.2", "10.1.0.2")
        );
        let snap1 = crate::config::parse_config("t.yaml", Path::new("/"), &both, 1).unwrap();
        reg.prepare(&snap1);
        let keys = |reg: &Registry| -> Vec<String> { reg.dump().as_object().unwrap().keys().cloned().collect() };
        assert!(keys(&reg).contains(&"ns1/a:80".to_string()), "{:?}", keys(&reg));
        assert!(keys(&reg).contains(&"ns1/b:80".to_string()));
        let a1 = &snap1.service(&"10.96.0.1:80".parse().unwrap()).unwrap().backend;
        let state = reg.runtime(a1).state.clone();
        let _permit = state.gate.try_connection().unwrap();

        // Generation 2 drops b; a gets no traffic before the swap completes.
        let only_a = format!("{CONFIG}{}", service("a", "10.96.0.1", "10.1.0.1"));
        let snap2 = crate::config::parse_config("t.yaml", Path::new("/"), &only_a, 2).unwrap();
        drop(snap1);
        reg.prepare(&snap2);
        assert!(!keys(&reg).contains(&"ns1/b:80".to_string()), "b's state is dropped");
        let a2 = &snap2.service(&"10.96.0.1:80".parse().unwrap()).unwrap().backend;
        assert!(Arc::ptr_eq(&reg.runtime(a2).state, &state), "a's state is kept");
        assert_eq!(state.breaker().in_use()[0], 1);
        assert_eq!(reg.prepared(), 2);
    }

    fn located(addr: SocketAddr, locality: &str) -> Arc<Endpoint> {
        let mut ep = Endpoint::clone(&endpoint(addr));
        ep.locality = Locality::parse(locality);
        Arc::new(ep)
    }

    fn located_backend(locs: &[&str], p: TrafficPolicy) -> Backend {
        let a = addrs(locs.len() as u8);
        let mut b = backend("svc", PortProtocol::Http, &[], p);
        b.endpoints = a.iter().zip(locs).map(|(a, l)| located(*a, l)).collect();
        b
    }

    fn own(locality: &str) -> Own {
        Own {
            locality: Locality::parse(locality),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn locality_priorities_spill_as_endpoints_are_ejected() {
        let reg = Registry::new();
        reg.set_own(own("us/a/1"));
        let p = TrafficPolicy {
            outlier: outlier(100),
            ..TrafficPolicy::default()
        };
        let b = located_backend(&["us/a/1", "us/a/1", "us/b/1", "us/b/2"], p);
        let rt = reg.runtime(&b);
        let c = counts(rt, 1000, &PickInput::default());
        assert_eq!(share(&c, &[0, 1]), 1.0, "all local while healthy: {c:?}");
        // Half of priority 0 out: 50 % × 1.4 = 70 % stays, 30 % spills to priority 2 (same region).
        eject(rt, 0);
        let c = counts(rt, 20_000, &PickInput::default());
        assert_eq!(c[0], 0);
        assert!((0.67..0.73).contains(&share(&c, &[1])), "{c:?}");
        // `retryRemoteLocalities`: a retry after a local endpoint leaves the local priority.
        let retry = attempt(2, true, &[rt.eps[1].addr]);
        let c = counts(
            rt,
            200,
            &PickInput {
                hash: None,
                attempt: Some(&retry),
            },
        );
        assert_eq!(share(&c, &[2, 3]), 1.0, "{c:?}");
        eject(rt, 1);
        assert_eq!(share(&counts(rt, 1000, &PickInput::default()), &[2, 3]), 1.0);
        // Without outlier detection there are no priorities (Istio).
        let plain = located_backend(&["us/a/1", "eu/a/1"], TrafficPolicy::default());
        let c = counts(reg.runtime(&plain), 100, &PickInput::default());
        assert_eq!(c, vec![50, 50]);
    }

    #[test]
    fn locality_distribute_weights() {
        let reg = Registry::new();
        reg.set_own(own("us/a/1"));
        let p = TrafficPolicy {
            locality: Some(LocalityLb {
                distribute: vec![("us/*".into(), vec![("us/a/*".into(), 80), ("us/b/*".into(), 20)])],
                ..LocalityLb::default()
            }),
            ..TrafficPolicy::default()
        };
        let b = located_backend(&["us/a/1", "us/b/1", "us/b/1", "eu/a/1"], p);
        let c = counts(reg.runtime(&b), 20_000, &PickInput::default());
        assert_eq!(c[3], 0, "localities no `to` matches get nothing");
        assert!((0.77..0.83).contains(&share(&c, &[0])), "{c:?}");
        assert!(c[1].abs_diff(c[2]) < 400, "round robin within the locality: {c:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn warmup_ramps_a_new_endpoint_up() {
        let reg = Registry::new();
        let p = TrafficPolicy {
            warmup: Some(Duration::from_secs(100)),
            ..TrafficPolicy::default()
        };
        let old = backend("svc", PortProtocol::Http, &addrs(3), p.clone());
        let _ = reg.runtime(&old);
        tokio::time::advance(Duration::from_secs(100)).await;
        let grown = backend("svc", PortProtocol::Http, &addrs(4), p);
        let rt = reg.runtime(&grown);
        // Just added: the 10 % floor, 0.1 / 3.1 ≈ 3.2 % of the picks.
        let c = counts(rt, 40_000, &PickInput::default());
        assert!((0.025..0.040).contains(&share(&c, &[3])), "{c:?}");
        tokio::time::advance(Duration::from_secs(50)).await;
        // Half-way: 0.5 / 3.5 ≈ 14.3 %.
        let c = counts(rt, 40_000, &PickInput::default());
        assert!((0.13..0.156).contains(&share(&c, &[3])), "{c:?}");
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(
            counts(rt, 400, &PickInput::default()),
            vec![100, 100, 100, 100],
            "warm: plain round robin"
        );
    }
}
