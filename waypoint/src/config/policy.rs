//! Compiled DestinationRule `trafficPolicy`: how the waypoint reaches one backend (a Service port, or one subset
//! of it). The config source merges the rule's top-level policy, the matching `portLevelSettings` entry and the
//! subset's own policy into one [`TrafficPolicy`] per [`super::Backend`]; the upstream module turns it into
//! load balancing, connection limits and outlier detection. Field defaults are Istio's (or Envoy's where Istio
//! passes the field through unchanged).

use std::time::Duration;

use http::HeaderName;
use serde::Serialize;

/// Everything a DestinationRule says about one backend. `Default` is the policy of a backend no rule selects.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub lb: LbPolicy,
    /// `loadBalancer.localityLbSetting`. `None` = locality load balancing off (`enabled: false`, or no rule
    /// selects the backend). A rule without `localityLbSetting` gets `Some(LocalityLb::default())`: Istio's mesh
    /// default enables locality failover (prefer the waypoint's own region/zone/subzone), which Istio only acts
    /// on when outlier detection is configured; `distribute` weights apply without it.
    pub locality: Option<LocalityLb>,
    /// `loadBalancer.warmup.duration` (or the deprecated `warmupDurationSecs`): new endpoints ramp up their share
    /// over this window. Only set with `RoundRobin` and `LeastRequest` (Istio ignores it for the others).
    #[serde(with = "super::duration::serde_opt_millis")]
    pub warmup: Option<Duration>,
    pub pool: ConnectionPool,
    pub outlier: Option<OutlierPolicy>,
}

impl TrafficPolicy {
    /// True when requests to this backend need the per-request pipeline (limits are enforced by its layers),
    /// even for an address without routes or security policy.
    pub fn needs_pipeline(&self) -> bool {
        self.pool.max_requests.is_some() || self.pool.max_retries.is_some() || self.pool.max_pending.is_some()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LbPolicy {
    /// `ROUND_ROBIN`, and what `UNSPECIFIED` or a rule without `loadBalancer` get here. Note: istiod ≥ 1.14
    /// translates `UNSPECIFIED` to Envoy's `LEAST_REQUEST` (`ROUND_ROBIN` only with its legacy-default flag).
    #[default]
    RoundRobin,
    /// Power of two random choices by active requests (`LEAST_REQUEST`, also `LEAST_CONN`).
    LeastRequest,
    Random,
    /// `consistentHash`.
    Hash {
        key: HashKey,
        algo: HashAlgo,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    #[serde(serialize_with = "ser_header")]
    Header(HeaderName),
    /// With a `ttl`, the waypoint sets the cookie when the request has none (Envoy's generated cookie).
    Cookie {
        name: String,
        path: Option<String>,
        #[serde(with = "super::duration::serde_opt_millis")]
        ttl: Option<Duration>,
    },
    Query(String),
    SourceIp,
}

fn ser_header<S: serde::Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.as_str())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashAlgo {
    /// `ringHash.minimumRingSize` (default 1024).
    Ring { min_size: usize },
    /// `maglev.tableSize` (default 65537, must be prime).
    Maglev { table_size: usize },
}

pub const DEFAULT_RING_SIZE: usize = 1024;
pub const DEFAULT_MAGLEV_TABLE: usize = 65537;

/// `trafficPolicy.connectionPool`. `None` = unlimited (Istio's defaults are 2³²−1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: upstream connections to the whole backend (HTTP/1.1 connections, TCP tunnels).
    pub max_connections: Option<u32>,
    /// `tcp.connectTimeout` (Istio default 10 s).
    #[serde(with = "super::duration::serde_opt_millis")]
    pub connect_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection when `max_connections` are busy.
    pub max_pending: Option<u32>,
    /// `http.http2MaxRequests`: concurrent requests to the backend (Envoy's `max_requests`, any protocol).
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection is closed after this many requests (0/None = unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: concurrent retries to the backend.
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`: an upstream connection without requests for this long is closed.
    #[serde(with = "super::duration::serde_opt_millis")]
    pub idle_timeout: Option<Duration>,
}

/// `trafficPolicy.outlierDetection`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierPolicy {
    /// `consecutive5xxErrors` (Istio default 5; 0 disables). Local failures (connect, reset, timeout) count
    /// as 5xx, since Istio does not split local-origin errors by default.
    pub consecutive_5xx: Option<u32>,
    /// `consecutiveGatewayErrors` (502, 503, 504 and local failures; disabled unless set).
    pub consecutive_gateway: Option<u32>,
    /// `interval` (default 10 s): how often ejections are re-evaluated.
    #[serde(with = "super::duration::serde_millis")]
    pub interval: Duration,
    /// `baseEjectionTime` (default 30 s), multiplied by the number of times the endpoint was ejected.
    #[serde(with = "super::duration::serde_millis")]
    pub base_ejection: Duration,
    /// `maxEjectionPercent` (default 10); at least one endpoint may always be ejected (Envoy).
    pub max_ejection_percent: u32,
    /// `minHealthPercent` (default 0): below this share of healthy endpoints, ejections are ignored (panic).
    pub min_health_percent: u32,
    /// `splitExternalLocalOriginErrors: true`: local-origin failures (connect failure, reset, timeout) are
    /// counted on their own and eject after `consecutiveLocalOriginFailures` (default 5) in a row; they then no
    /// longer count as 5xx or gateway errors (Envoy's `split_external_local_origin_errors`). `None` = not split.
    pub consecutive_local_origin: Option<u32>,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
            consecutive_local_origin: None,
        }
    }
}

/// `loadBalancer.localityLbSetting`. Localities are `region/zone/subzone` strings; `*` matches any level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityLb {
    /// `distribute`: (from pattern, [(to pattern, weight percent)]).
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    /// `failover`: (from region, to region).
    pub failover: Vec<(String, String)>,
    /// `failoverPriority`, as written: `key` (the endpoint's label must equal the waypoint's own, see
    /// `Settings.labels`) or `key=value` (the endpoint's label must equal `value`). Endpoints matching more
    /// leading entries come first; entry n only counts when entries 0..n all match.
    pub failover_priority: Vec<String>,
}

/// Topology labels (Kubernetes node labels Istio copies onto endpoints; pod labels here).
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
pub const LABEL_SUBZONE: &str = "topology.istio.io/subzone";

/// Where an endpoint (or the waypoint itself) runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// `region/zone/subzone`, any suffix omitted.
    pub fn parse(s: &str) -> Locality {
        let mut it = s.splitn(3, '/');
        Locality {
            region: it.next().unwrap_or_default().to_string(),
            zone: it.next().unwrap_or_default().to_string(),
            subzone: it.next().unwrap_or_default().to_string(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }

    /// From the topology labels (absent labels leave that level empty).
    pub fn from_labels(labels: &std::collections::BTreeMap<String, String>) -> Locality {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        Locality {
            region: get(LABEL_REGION),
            zone: get(LABEL_ZONE),
            subzone: get(LABEL_SUBZONE),
        }
    }

    /// Adds the topology labels of this locality where `labels` has none (Istio augments endpoint labels the
    /// same way, so subsets and `failoverPriority` can select on them).
    pub fn add_labels(&self, labels: &mut std::collections::BTreeMap<String, String>) {
        for (k, v) in [
            (LABEL_REGION, &self.region),
            (LABEL_ZONE, &self.zone),
            (LABEL_SUBZONE, &self.subzone),
        ] {
            if !v.is_empty() {
                labels.entry(k.to_string()).or_insert_with(|| v.clone());
            }
        }
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}
