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
    /// (healthy, total) per level, and per locality of each level.
    levels: Vec<((usize, usize), Vec<(usize, usize)>)>,
}

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
        if self.policy.lb != LbPolicy::LeastRequest {
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
pub struct InFlight(Arc<Mutex<Option<(Arc<BackendRuntime>, usize)>>>);

impl InFlight {
    /// Records the attempt now starting; returns the previous attempt if it never finished (it timed out).
    pub fn start(&self, rt: Arc<BackendRuntime>, index: usize) -> Option<(Arc<BackendRuntime>, usize)> {
        lock(&self.0).replace((rt, index))
    }

    /// The attempt in flight, cleared.
    pub fn take(&self) -> Option<(Arc<BackendRuntime>, usize)> {
        lock(&self.0).take()
    }
}
