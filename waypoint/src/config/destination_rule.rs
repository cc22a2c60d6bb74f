//! Istio `DestinationRule` (networking.istio.io v1, v1beta1, v1alpha3): parsed, validated the way istiod
//! validates it, and compiled into the [`TrafficPolicy`] of each backend (a Service port, or one subset of it).
//!
//! Which rule applies to a Service: rules in the Service's namespace first, then in the waypoint's namespace,
//! then in the root namespace; within a namespace an exact host beats a wildcard (the longest wildcard beats a
//! shorter one), and of several rules for the same host the oldest (creation timestamp, then file order) wins.
//! Rules whose `exportTo` hides them from the waypoint's namespace, and rules with a `workloadSelector` (those
//! configure sidecars), never apply.
//!
//! Merging follows istiod (`MergeSubsetTrafficPolicy`): a `portLevelSettings` entry for the port replaces the
//! whole top-level policy (sections it omits fall back to defaults, not to the top level); a subset's policy then
//! replaces the sections it sets, and all of them when it has an entry for the port.
//!
//! Every field of the API is declared: a field this build does not act on is accepted with a warning naming it,
//! one it cannot honour safely is an error, and an unknown field is an error (a misspelt policy must not be
//! silently dropped).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;

use super::duration;
use super::gateway_api::{FieldError, ferr};
use super::k8s::ObjectMeta;
use super::policy::{
    ConnectionPool, DEFAULT_MAGLEV_TABLE, DEFAULT_RING_SIZE, HashAlgo, HashKey, LABEL_REGION, LABEL_SUBZONE,
    LABEL_ZONE, LbPolicy, LocalityLb, OutlierPolicy, TrafficPolicy,
};

// ---------------------------------------------------------------- the API, as serde reads it

#[derive(Debug, Clone, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DrSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DrSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    pub subsets: Vec<SubsetSpec>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelectorSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelectorSpec {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default)]
    pub tls: Option<ClientTlsSpec>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicySpec>,
    #[serde(default)]
    pub tunnel: Option<serde_json::Value>,
    #[serde(default)]
    pub proxy_protocol: Option<serde_json::Value>,
    #[serde(default)]
    pub retry_budget: Option<RetryBudgetSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicySpec {
    #[serde(default)]
    pub port: Option<PortSelectorSpec>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default)]
    pub tls: Option<ClientTlsSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelectorSpec {
    #[serde(default)]
    pub number: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubsetSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    #[serde(default)]
    pub simple: Option<String>,
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHashSpec>,
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSpec>,
    #[serde(default)]
    pub warmup_duration_secs: Option<String>,
    #[serde(default)]
    pub warmup: Option<WarmupSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashSpec {
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HttpCookieSpec>,
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    #[serde(default)]
    pub ring_hash: Option<RingHashSpec>,
    #[serde(default)]
    pub maglev: Option<MaglevSpec>,
    #[serde(default)]
    pub minimum_ring_size: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookieSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHashSpec {
    #[serde(default)]
    pub minimum_ring_size: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaglevSpec {
    #[serde(default)]
    pub table_size: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSpec {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub distribute: Vec<DistributeSpec>,
    #[serde(default)]
    pub failover: Vec<FailoverSpec>,
    #[serde(default)]
    pub failover_priority: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributeSpec {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSpec {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmupSpec {
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub minimum_percent: Option<f64>,
    #[serde(default)]
    pub aggression: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPoolSpec {
    #[serde(default)]
    pub tcp: Option<TcpSettingsSpec>,
    #[serde(default)]
    pub http: Option<HttpSettingsSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettingsSpec {
    #[serde(default)]
    pub max_connections: Option<i64>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepaliveSpec>,
    #[serde(default)]
    pub max_connection_duration: Option<String>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpKeepaliveSpec {
    #[serde(default)]
    pub probes: Option<i64>,
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettingsSpec {
    #[serde(default, rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(default, rename = "http2MaxRequests")]
    pub http2_max_requests: Option<i64>,
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    #[serde(default)]
    pub max_retries: Option<i64>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    #[serde(default, rename = "h2UpgradePolicy")]
    pub h2_upgrade_policy: Option<String>,
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    #[serde(default)]
    pub max_concurrent_streams: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    #[serde(default)]
    pub consecutive_errors: Option<i64>,
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<i64>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<i64>,
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
    #[serde(default)]
    pub min_health_percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSpec {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default)]
    pub ca_crl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSpec {
    #[serde(default)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub min_retry_concurrency: Option<i64>,
}

// ---------------------------------------------------------------- compiled form

/// Which Service hostnames a rule's `host` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.suffix`, stored as `.suffix`.
    Suffix(String),
    /// `*`
    Any,
}

impl HostPattern {
    fn matches(&self, hostname: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == hostname,
            HostPattern::Suffix(s) => hostname.len() > s.len() && hostname.ends_with(s.as_str()),
            HostPattern::Any => true,
        }
    }

    /// Lower sorts first: exact, then the longest wildcard (Istio's `MostSpecificHostMatch`).
    fn specificity(&self) -> (u8, Reverse<usize>) {
        match self {
            HostPattern::Exact(_) => (0, Reverse(0)),
            HostPattern::Suffix(s) => (1, Reverse(s.len())),
            HostPattern::Any => (2, Reverse(0)),
        }
    }
}

/// The sections of one traffic policy level; `None` = not set at this level.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sections {
    lb: Option<LbSection>,
    pool: Option<ConnectionPool>,
    outlier: Option<OutlierPolicy>,
    /// Only its presence matters (merging); the waypoint always originates HBONE mTLS.
    tls: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct LbSection {
    lb: LbPolicy,
    /// `None` = `enabled: false`.
    locality: Option<LocalityLb>,
    warmup: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct CompiledPolicy {
    top: Sections,
    ports: Vec<(u16, Sections)>,
}

impl CompiledPolicy {
    /// istiod's `GetPortLevelTrafficPolicy`: the port's entry replaces the whole policy.
    fn for_port(&self, port: u16) -> (&Sections, bool) {
        match self.ports.iter().find(|(p, _)| *p == port) {
            Some((_, s)) => (s, true),
            None => (&self.top, false),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CompiledSubset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    policy: Option<CompiledPolicy>,
}

/// One valid DestinationRule, ready for lookup.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub namespace: String,
    pub name: String,
    /// `spec.host` as written.
    pub host: String,
    pattern: HostPattern,
    creation_timestamp: Option<String>,
    source_order: usize,
    policy: Option<CompiledPolicy>,
    pub subsets: Vec<CompiledSubset>,
}

impl CompiledRule {
    /// The merged policy for one Service port, or for one subset of it.
    pub fn policy(&self, port: u16, subset: Option<&str>) -> TrafficPolicy {
        let mut merged = self
            .policy
            .as_ref()
            .map(|p| p.for_port(port).0.clone())
            .unwrap_or_default();
        let sub = subset.and_then(|name| self.subsets.iter().find(|s| s.name == name));
        if let Some(sp) = sub.and_then(|s| s.policy.as_ref()) {
            let (s, whole) = sp.for_port(port);
            if s.lb.is_some() || whole {
                merged.lb = s.lb.clone();
            }
            if s.pool.is_some() || whole {
                merged.pool = s.pool.clone();
            }
            if s.outlier.is_some() || whole {
                merged.outlier = s.outlier.clone();
            }
            if s.tls || whole {
                merged.tls = s.tls;
            }
        }
        let lb = merged.lb.unwrap_or(LbSection {
            lb: LbPolicy::default(),
            locality: Some(LocalityLb::default()),
            warmup: None,
        });
        TrafficPolicy {
            lb: lb.lb,
            locality: lb.locality,
            warmup: lb.warmup,
            pool: merged.pool.unwrap_or_default(),
            outlier: merged.outlier,
        }
    }

    /// `Kind namespace/name`, for logs.
    pub fn object(&self) -> String {
        format!("DestinationRule {}/{}", self.namespace, self.name)
    }

    /// Older first: a creation timestamp before none, then the timestamp (RFC 3339 as Kubernetes writes it, in
    /// UTC with `Z`, sorts as a string), then file order.
    fn age(&self) -> (bool, Option<&str>, usize) {
        (
            self.creation_timestamp.is_none(),
            self.creation_timestamp.as_deref(),
            self.source_order,
        )
    }
}

/// `exportTo` semantics shared by DestinationRule and VirtualService: empty or `*` = all namespaces, `.` = the
/// object's own namespace, `~` = none, anything else a namespace name.
pub fn exported_to(export_to: &[String], own_namespace: &str, viewer: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == viewer || (e == "." && own_namespace == viewer))
}

/// What one document turned out to be.
#[derive(Debug)]
pub enum Outcome {
    Applies(Box<CompiledRule>),
    /// Valid, but not for this waypoint (the reason is logged).
    Skipped(String),
}

/// A compiled rule (or why it does not apply), with the fields accepted but not acted on.
#[derive(Debug)]
pub struct Translated {
    pub outcome: Outcome,
    pub warnings: Vec<FieldError>,
}

/// Validate and compile one DestinationRule. Every problem is reported, not just the first.
pub fn translate(
    dr: &DestinationRule,
    cluster_domain: &str,
    waypoint_namespace: &str,
    source_order: usize,
) -> Result<Translated, Vec<FieldError>> {
    let mut d = Diag::default();
    let ns = dr.metadata.namespace.as_deref().unwrap_or("default");
    let spec = &dr.spec;
    let pattern = match host_pattern(&spec.host, ns, cluster_domain) {
        Ok(p) => Some(p),
        Err(reason) => {
            d.error("spec.host", reason);
            None
        }
    };
    if let Some(HostPattern::Exact(h)) = &pattern
        && !h.ends_with(&format!(".svc.{cluster_domain}"))
    {
        // istiod expands only short names: `name.namespace` is a hostname of its own that no Service has.
        d.warn(
            "spec.host",
            format!("{h:?} is neither a short name nor <name>.<namespace>.svc.{cluster_domain}: it matches no Service"),
        );
    }
    let policy = spec
        .traffic_policy
        .as_ref()
        .map(|p| traffic_policy(&mut d, p, "spec.trafficPolicy"));
    let mut names = HashSet::new();
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let f = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            d.error(&format!("{f}.name"), "required");
        } else if !is_dns1123_label(&s.name) {
            d.error(
                &format!("{f}.name"),
                format!("{:?} is not a valid subset name (lower-case DNS label)", s.name),
            );
        } else if !names.insert(s.name.clone()) {
            d.error(&format!("{f}.name"), format!("duplicate subset name {:?}", s.name));
        }
        for k in s.labels.keys() {
            if k.is_empty() {
                d.error(&format!("{f}.labels"), "label keys must not be empty");
            }
        }
        let policy = s
            .traffic_policy
            .as_ref()
            .map(|p| traffic_policy(&mut d, p, &format!("{f}.trafficPolicy")));
        subsets.push(CompiledSubset {
            name: s.name.clone(),
            labels: s.labels.clone(),
            policy,
        });
    }
    for (i, e) in spec.export_to.iter().enumerate() {
        if e.is_empty() || (e != "." && e != "*" && e != "~" && !is_dns1123_label(e)) {
            d.error(
                &format!("spec.exportTo[{i}]"),
                format!("{e:?} is not \".\", \"*\", \"~\" or a namespace name"),
            );
        }
    }
    if let Some(ws) = &spec.workload_selector {
        for k in ws.match_labels.keys() {
            if k.is_empty() {
                d.error("spec.workloadSelector.matchLabels", "label keys must not be empty");
            }
        }
    }
    if !d.errors.is_empty() {
        return Err(d.errors);
    }
    let outcome = if spec.workload_selector.is_some() {
        Outcome::Skipped("has a workloadSelector: it configures the selected sidecars, not a waypoint".into())
    } else if !exported_to(&spec.export_to, ns, waypoint_namespace) {
        Outcome::Skipped(format!(
            "exportTo {:?} hides it from the waypoint's namespace {waypoint_namespace:?}",
            spec.export_to
        ))
    } else {
        match pattern {
            Some(pattern) => Outcome::Applies(Box::new(CompiledRule {
                namespace: ns.to_string(),
                name: dr.metadata.name.clone(),
                host: spec.host.clone(),
                pattern,
                creation_timestamp: dr.metadata.creation_timestamp.clone(),
                source_order,
                policy,
                subsets,
            })),
            None => return Err(d.errors),
        }
    };
    Ok(Translated {
        outcome,
        warnings: d.warnings,
    })
}

/// The rule that applies to a Service, and the rules it won against in the same lookup namespace.
#[derive(Debug)]
pub struct Selection<'a> {
    pub rule: Option<&'a CompiledRule>,
    /// Same namespace, same host pattern specificity, younger: ignored (logged by the caller).
    pub shadowed: Vec<&'a CompiledRule>,
    /// Every rule of the lookup namespaces whose host matches the Service, applied or not.
    pub candidates: Vec<&'a CompiledRule>,
}

/// Every DestinationRule that may apply to this waypoint.
#[derive(Debug, Default)]
pub struct DrIndex {
    rules: Vec<CompiledRule>,
}

impl DrIndex {
    pub fn add(&mut self, rule: CompiledRule) {
        self.rules.push(rule);
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    /// The rule for Service `namespace/name`, looked up in `namespaces` in order (the Service's, the
    /// waypoint's, the root namespace).
    pub fn select(&self, namespace: &str, name: &str, cluster_domain: &str, namespaces: &[&str]) -> Selection<'_> {
        let hostname = format!("{name}.{namespace}.svc.{cluster_domain}").to_ascii_lowercase();
        let all: Vec<&CompiledRule> = self
            .rules
            .iter()
            .filter(|r| namespaces.contains(&r.namespace.as_str()) && r.pattern.matches(&hostname))
            .collect();
        let mut seen: Vec<&str> = Vec::new();
        for ns in namespaces {
            if seen.contains(ns) {
                continue;
            }
            seen.push(ns);
            let mut candidates: Vec<&CompiledRule> = all.iter().copied().filter(|r| r.namespace == *ns).collect();
            if candidates.is_empty() {
                continue;
            }
            candidates.sort_by(|a, b| {
                a.pattern
                    .specificity()
                    .cmp(&b.pattern.specificity())
                    .then_with(|| a.age().cmp(&b.age()))
            });
            let best = candidates[0];
            let shadowed = candidates[1..]
                .iter()
                .copied()
                .filter(|r| r.pattern.specificity() == best.pattern.specificity())
                .collect();
            return Selection {
                rule: Some(best),
                shadowed,
                candidates: all,
            };
        }
        Selection {
            rule: None,
            shadowed: Vec::new(),
            candidates: all,
        }
    }
}

// ---------------------------------------------------------------- validation and compilation

#[derive(Default)]
struct Diag {
    errors: Vec<FieldError>,
    warnings: Vec<FieldError>,
}

impl Diag {
    fn error(&mut self, field: &str, reason: impl Into<String>) {
        self.errors.push(ferr(field, reason));
    }

    fn warn(&mut self, field: &str, reason: impl Into<String>) {
        self.warnings.push(ferr(field, reason));
    }

    /// A non-negative count that fits in `max` (Istio's int32 fields: `i32::MAX`; UInt32Value: `u32::MAX`).
    fn count(&mut self, field: &str, v: Option<i64>, max: i64) -> Option<u32> {
        let v = v?;
        if v < 0 {
            self.error(field, format!("must not be negative, got {v}"));
            return None;
        }
        if v > max {
            self.error(field, format!("must be at most {max}, got {v}"));
            return None;
        }
        u32::try_from(v).ok()
    }

    fn percent(&mut self, field: &str, v: Option<i64>) -> Option<u32> {
        let v = v?;
        if !(0..=100).contains(&v) {
            self.error(field, format!("must be a percentage 0-100, got {v}"));
            return None;
        }
        u32::try_from(v).ok()
    }

    /// A duration of at least 1 ms (istiod's `ValidateDuration`), or zero when `zero_ok`.
    fn duration(&mut self, field: &str, v: Option<&str>, zero_ok: bool) -> Option<Duration> {
        let s = v?;
        match duration::parse(s) {
            Err(e) => {
                self.error(field, e.to_string());
                None
            }
            Ok(d) if d.is_zero() && zero_ok => Some(d),
            Ok(d) if d < Duration::from_millis(1) => {
                self.error(field, format!("{s:?}: must be at least 1ms"));
                None
            }
            Ok(d) => Some(d),
        }
    }
}

const I32_MAX: i64 = i32::MAX as i64;
const U32_MAX: i64 = u32::MAX as i64;
/// Envoy's `maximum_ring_size` default: a larger minimum is rejected by Envoy.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Istio: the Maglev table size must be a prime below this.
const MAX_MAGLEV_TABLE: u64 = 5_000_011;

fn traffic_policy(d: &mut Diag, p: &TrafficPolicySpec, field: &str) -> CompiledPolicy {
    let outlier_set = p.outlier_detection.is_some();
    let top = sections(
        d,
        field,
        p.load_balancer.as_ref(),
        p.connection_pool.as_ref(),
        p.outlier_detection.as_ref(),
        p.tls.as_ref(),
        outlier_set,
    );
    let mut ports = Vec::new();
    let mut seen = HashSet::new();
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let f = format!("{field}.portLevelSettings[{i}]");
        let number = match pl.port.as_ref().and_then(|p| p.number) {
            None => {
                d.error(&format!("{f}.port.number"), "required");
                None
            }
            Some(n) => match u16::try_from(n) {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    d.error(
                        &format!("{f}.port.number"),
                        format!("must be a port number 1-65535, got {n}"),
                    );
                    None
                }
            },
        };
        let s = sections(
            d,
            &f,
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.tls.as_ref(),
            pl.outlier_detection.is_some(),
        );
        if let Some(n) = number {
            if !seen.insert(n) {
                // istiod takes the first entry for a port; a second one is dead configuration.
                d.warn(
                    &format!("{f}.port.number"),
                    format!("port {n} already has an entry; this one is ignored"),
                );
            } else {
                ports.push((n, s));
            }
        }
    }
    if p.tunnel.is_some() {
        // istiod does not apply `tunnel` to waypoint clusters either.
        d.warn(
            &format!("{field}.tunnel"),
            "not applied: tunnel settings apply to sidecar egress, not to a waypoint",
        );
    }
    if p.proxy_protocol.is_some() {
        d.error(
            &format!("{field}.proxyProtocol"),
            "not supported: the waypoint does not send a PROXY protocol header (the backend would misread the stream)",
        );
    }
    if let Some(rb) = &p.retry_budget {
        let f = format!("{field}.retryBudget");
        if let Some(pct) = rb.percent
            && !(0.0..=100.0).contains(&pct)
        {
            d.error(
                &format!("{f}.percent"),
                format!("must be a percentage 0-100, got {pct}"),
            );
        }
        d.count(&format!("{f}.minRetryConcurrency"), rb.min_retry_concurrency, U32_MAX);
        d.warn(
            &f,
            "not applied: the waypoint's own retry budget applies (retries up to 20% of active requests, at least 3 concurrent)",
        );
    }
    CompiledPolicy { top, ports }
}

fn sections(
    d: &mut Diag,
    field: &str,
    lb: Option<&LoadBalancerSpec>,
    pool: Option<&ConnectionPoolSpec>,
    outlier: Option<&OutlierDetectionSpec>,
    tls: Option<&ClientTlsSpec>,
    outlier_set: bool,
) -> Sections {
    if let Some(t) = tls {
        client_tls(d, t, &format!("{field}.tls"));
    }
    Sections {
        lb: lb.and_then(|lb| load_balancer(d, lb, &format!("{field}.loadBalancer"), outlier_set)),
        pool: pool.map(|p| connection_pool(d, p, &format!("{field}.connectionPool"))),
        outlier: outlier.map(|o| outlier_detection(d, o, &format!("{field}.outlierDetection"))),
        tls: tls.is_some(),
    }
}

fn load_balancer(d: &mut Diag, lb: &LoadBalancerSpec, field: &str, outlier_set: bool) -> Option<LbSection> {
    let policy = match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => {
            d.error(field, "simple and consistentHash are exclusive");
            return None;
        }
        (Some(s), None) => match s.as_str() {
            "UNSPECIFIED" | "ROUND_ROBIN" => LbPolicy::RoundRobin,
            // LEAST_CONN is deprecated in favour of LEAST_REQUEST, which istiod substitutes.
            "LEAST_REQUEST" | "LEAST_CONN" => LbPolicy::LeastRequest,
            "RANDOM" => LbPolicy::Random,
            "PASSTHROUGH" => {
                d.error(
                    &format!("{field}.simple"),
                    "PASSTHROUGH is not supported: it forwards to the caller's original destination address, and a waypoint is addressed by Service VIP (there is no original pod address to pass through to)",
                );
                return None;
            }
            other => {
                d.error(
                    &format!("{field}.simple"),
                    format!("unknown load balancer {other:?} (ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM)"),
                );
                return None;
            }
        },
        (None, Some(ch)) => consistent_hash(d, ch, &format!("{field}.consistentHash"))?,
        (None, None) => LbPolicy::default(),
    };
    let locality = match &lb.locality_lb_setting {
        None => Some(LocalityLb::default()),
        Some(l) => locality_lb(d, l, &format!("{field}.localityLbSetting"), outlier_set),
    };
    let warmup = match (&lb.warmup, &lb.warmup_duration_secs) {
        (Some(w), _) => {
            let f = format!("{field}.warmup");
            if let Some(p) = w.minimum_percent
                && !(0.0..=100.0).contains(&p)
            {
                d.error(
                    &format!("{f}.minimumPercent"),
                    format!("must be a percentage 0-100, got {p}"),
                );
            }
            if let Some(a) = w.aggression
                && a < 1.0
            {
                d.error(&format!("{f}.aggression"), format!("must be at least 1, got {a}"));
            }
            if w.minimum_percent.is_some() || w.aggression.is_some() {
                d.warn(
                    &f,
                    "minimumPercent and aggression are not applied: the ramp is linear from 10% (Envoy's slow-start defaults)",
                );
            }
            match &w.duration {
                None => {
                    d.error(&format!("{f}.duration"), "required");
                    None
                }
                Some(s) => d.duration(&format!("{f}.duration"), Some(s), false),
            }
        }
        (None, Some(s)) => d.duration(&format!("{field}.warmupDurationSecs"), Some(s), false),
        (None, None) => None,
    };
    let warmup = match (&policy, warmup) {
        (LbPolicy::RoundRobin | LbPolicy::LeastRequest, w) => w,
        (_, None) => None,
        (_, Some(_)) => {
            d.warn(
                &format!("{field}.warmup"),
                "not applied: warmup only works with ROUND_ROBIN and LEAST_REQUEST (Istio)",
            );
            None
        }
    };
    Some(LbSection {
        lb: policy,
        locality,
        warmup,
    })
}

fn consistent_hash(d: &mut Diag, ch: &ConsistentHashSpec, field: &str) -> Option<LbPolicy> {
    let mut keys = Vec::new();
    if let Some(h) = &ch.http_header_name {
        match HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) => keys.push(HashKey::Header(name)),
            Err(_) => {
                d.error(
                    &format!("{field}.httpHeaderName"),
                    format!("{h:?} is not a header name"),
                );
                return None;
            }
        }
    }
    if let Some(c) = &ch.http_cookie {
        let f = format!("{field}.httpCookie");
        if c.name.is_empty() {
            d.error(&format!("{f}.name"), "required");
            return None;
        }
        let ttl = match &c.ttl {
            None => None,
            // A zero TTL asks for a generated session cookie (no Max-Age), so zero is meaningful here.
            Some(s) => Some(d.duration(&format!("{f}.ttl"), Some(s), true)?),
        };
        keys.push(HashKey::Cookie {
            name: c.name.clone(),
            path: c.path.clone().filter(|p| !p.is_empty()),
            ttl,
        });
    }
    if ch.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = &ch.http_query_parameter_name {
        if q.is_empty() {
            d.error(&format!("{field}.httpQueryParameterName"), "must not be empty");
            return None;
        }
        keys.push(HashKey::Query(q.clone()));
    }
    let key = match keys.len() {
        1 => keys.pop()?,
        _ => {
            d.error(
                field,
                "exactly one of httpHeaderName, httpCookie, useSourceIp: true or httpQueryParameterName is required",
            );
            return None;
        }
    };
    let algo = match (&ch.ring_hash, &ch.maglev, ch.minimum_ring_size) {
        (Some(_), Some(_), _) => {
            d.error(field, "ringHash and maglev are exclusive");
            return None;
        }
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            d.error(
                &format!("{field}.minimumRingSize"),
                "only one of minimumRingSize (deprecated) or ringHash/maglev can be set",
            );
            return None;
        }
        (Some(r), None, None) => ring(d, r.minimum_ring_size, &format!("{field}.ringHash.minimumRingSize"))?,
        (None, None, m) => {
            if m.is_some() {
                d.warn(
                    &format!("{field}.minimumRingSize"),
                    "deprecated: use ringHash.minimumRingSize",
                );
            }
            ring(d, m, &format!("{field}.minimumRingSize"))?
        }
        (None, Some(m), None) => {
            let f = format!("{field}.maglev.tableSize");
            let size = match m.table_size {
                None | Some(0) => DEFAULT_MAGLEV_TABLE as u64,
                Some(n) if n < 0 => {
                    d.error(&f, format!("must not be negative, got {n}"));
                    return None;
                }
                Some(n) => n as u64,
            };
            if size >= MAX_MAGLEV_TABLE {
                d.error(&f, format!("must be less than {MAX_MAGLEV_TABLE}, got {size}"));
                return None;
            }
            if !is_prime(size) {
                d.error(&f, format!("must be prime, got {size}"));
                return None;
            }
            HashAlgo::Maglev {
                table_size: usize::try_from(size).ok()?,
            }
        }
    };
    Some(LbPolicy::Hash { key, algo })
}

fn ring(d: &mut Diag, size: Option<i64>, field: &str) -> Option<HashAlgo> {
    let size = match size {
        // Zero cannot be told from unset in the proto: Envoy's default applies.
        None | Some(0) => DEFAULT_RING_SIZE as u64,
        Some(n) if n < 0 => {
            d.error(field, format!("must not be negative, got {n}"));
            return None;
        }
        Some(n) => n as u64,
    };
    if size > MAX_RING_SIZE {
        d.error(
            field,
            format!("must be at most {MAX_RING_SIZE} (Envoy's maximum ring size), got {size}"),
        );
        return None;
    }
    Some(HashAlgo::Ring {
        min_size: usize::try_from(size).ok()?,
    })
}

/// Trial division, as Envoy (and istiod, which copies it) checks Maglev table sizes.
fn is_prime(x: u64) -> bool {
    if x < 2 {
        return false;
    }
    if x < 4 {
        return true;
    }
    if x.is_multiple_of(2) {
        return false;
    }
    let mut f = 3u64;
    while f * f <= x {
        if x.is_multiple_of(f) {
            return false;
        }
        f += 2;
    }
    true
}

fn locality_lb(d: &mut Diag, l: &LocalityLbSpec, field: &str, outlier_set: bool) -> Option<LocalityLb> {
    if !l.distribute.is_empty() && !l.failover.is_empty() {
        d.error(field, "distribute and failover are exclusive");
        return None;
    }
    if !l.failover.is_empty() {
        for (i, p) in l.failover_priority.iter().enumerate() {
            if [LABEL_REGION, LABEL_ZONE, LABEL_SUBZONE].contains(&p.as_str()) {
                d.error(
                    &format!("{field}.failoverPriority[{i}]"),
                    format!("{p:?} cannot be combined with failover (failover already orders by topology)"),
                );
            }
        }
    }
    let mut distribute = Vec::new();
    let mut froms = Vec::new();
    for (i, dist) in l.distribute.iter().enumerate() {
        let f = format!("{field}.distribute[{i}]");
        if let Err(e) = check_locality(&dist.from) {
            d.error(&format!("{f}.from"), e);
        }
        froms.push(dist.from.clone());
        let mut total: i64 = 0;
        let mut to = Vec::new();
        for (loc, w) in &dist.to {
            if let Err(e) = check_locality(loc) {
                d.error(&format!("{f}.to.{loc}"), e);
            }
            if !(1..=100).contains(w) {
                d.error(&format!("{f}.to.{loc}"), format!("weight must be 1-100, got {w}"));
                continue;
            }
            total += w;
            to.push((loc.clone(), *w as u32));
        }
        if total != 100 && to.len() == dist.to.len() {
            d.error(&format!("{f}.to"), format!("weights must sum to 100, got {total}"));
        }
        distribute.push((dist.from.clone(), to));
    }
    froms.sort();
    if let Some(w) = froms.windows(2).find(|w| w[0] == w[1]) {
        d.error(&format!("{field}.distribute"), format!("from {:?} appears twice", w[0]));
    }
    let mut failover = Vec::new();
    for (i, fo) in l.failover.iter().enumerate() {
        let f = format!("{field}.failover[{i}]");
        if fo.from.is_empty() || fo.to.is_empty() {
            d.error(&f, "from and to are required");
        } else if fo.from == fo.to {
            d.error(&f, "from and to must be different regions");
        } else if [&fo.from, &fo.to].iter().any(|r| r.contains('/') || r.contains('*')) {
            d.error(&f, "failover names regions only (no '/', no '*')");
        }
        failover.push((fo.from.clone(), fo.to.clone()));
    }
    for (i, p) in l.failover_priority.iter().enumerate() {
        let key = p.split_once('=').map_or(p.as_str(), |(k, _)| k);
        if key.is_empty() {
            d.error(&format!("{field}.failoverPriority[{i}]"), "label key must not be empty");
        }
    }
    if (!l.failover.is_empty() || !l.failover_priority.is_empty()) && !outlier_set {
        d.warn(
            field,
            "failover needs outlierDetection in the same policy: without it no endpoint is ever ejected, so traffic never fails over",
        );
    }
    if l.enabled == Some(false) {
        return None;
    }
    Some(LocalityLb {
        distribute,
        failover,
        failover_priority: l.failover_priority.clone(),
    })
}

/// `region[/zone[/subzone]]`, each part non-empty, at most one `*`, only as the whole last part.
fn check_locality(loc: &str) -> Result<(), String> {
    let parts: Vec<&str> = loc.split('/').collect();
    if loc.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!("{loc:?} is not region[/zone[/subzone]]"));
    }
    let stars = loc.matches('*').count();
    if stars > 1 || (stars == 1 && parts.last() != Some(&"*")) {
        return Err(format!("{loc:?}: '*' may only be the whole last part"));
    }
    Ok(())
}

fn connection_pool(d: &mut Diag, p: &ConnectionPoolSpec, field: &str) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    if let Some(tcp) = &p.tcp {
        let f = format!("{field}.tcp");
        // Zero is "unset" for these int32 fields in Istio (the 2³²−1 default applies).
        out.max_connections = d
            .count(&format!("{f}.maxConnections"), tcp.max_connections, I32_MAX)
            .filter(|n| *n > 0);
        out.connect_timeout = d.duration(&format!("{f}.connectTimeout"), tcp.connect_timeout.as_deref(), false);
        if let Some(ka) = &tcp.tcp_keepalive {
            let kf = format!("{f}.tcpKeepalive");
            d.count(&format!("{kf}.probes"), ka.probes, U32_MAX);
            d.duration(&format!("{kf}.time"), ka.time.as_deref(), false);
            d.duration(&format!("{kf}.interval"), ka.interval.as_deref(), false);
            d.warn(
                &kf,
                "not applied: upstream connections are HBONE tunnels, kept alive by HTTP/2 PINGs",
            );
        }
        if tcp.max_connection_duration.is_some() {
            d.duration(
                &format!("{f}.maxConnectionDuration"),
                tcp.max_connection_duration.as_deref(),
                false,
            );
            d.warn(&format!("{f}.maxConnectionDuration"), "not applied");
        }
        if tcp.idle_timeout.is_some() {
            d.duration(&format!("{f}.idleTimeout"), tcp.idle_timeout.as_deref(), true);
            d.warn(
                &format!("{f}.idleTimeout"),
                "not applied: opaque TCP tunnels stay open until either side closes",
            );
        }
    }
    if let Some(http) = &p.http {
        let f = format!("{field}.http");
        out.max_pending = d
            .count(
                &format!("{f}.http1MaxPendingRequests"),
                http.http1_max_pending_requests,
                I32_MAX,
            )
            .filter(|n| *n > 0);
        out.max_requests = d
            .count(&format!("{f}.http2MaxRequests"), http.http2_max_requests, I32_MAX)
            .filter(|n| *n > 0);
        out.max_requests_per_connection = d
            .count(
                &format!("{f}.maxRequestsPerConnection"),
                http.max_requests_per_connection,
                I32_MAX,
            )
            .filter(|n| *n > 0);
        out.max_retries = d
            .count(&format!("{f}.maxRetries"), http.max_retries, I32_MAX)
            .filter(|n| *n > 0);
        out.idle_timeout = d.duration(&format!("{f}.idleTimeout"), http.idle_timeout.as_deref(), false);
        if let Some(p) = &http.h2_upgrade_policy {
            match p.as_str() {
                "DEFAULT" | "DO_NOT_UPGRADE" => {}
                "UPGRADE" => {
                    if http.use_client_protocol == Some(true) {
                        d.error(
                            &format!("{f}.useClientProtocol"),
                            "must not be true when h2UpgradePolicy is UPGRADE",
                        );
                    }
                    d.warn(
                        &format!("{f}.h2UpgradePolicy"),
                        "not applied: the upstream protocol follows the Service port's declared protocol",
                    );
                }
                other => d.error(
                    &format!("{f}.h2UpgradePolicy"),
                    format!("unknown policy {other:?} (DEFAULT, DO_NOT_UPGRADE, UPGRADE)"),
                ),
            }
        }
        if http.use_client_protocol == Some(true) {
            d.warn(
                &format!("{f}.useClientProtocol"),
                "not applied: undeclared ports already keep the client's protocol; declared ports use the declared one",
            );
        }
        if http.max_concurrent_streams.is_some() {
            d.count(
                &format!("{f}.maxConcurrentStreams"),
                http.max_concurrent_streams,
                I32_MAX,
            );
            d.warn(
                &format!("{f}.maxConcurrentStreams"),
                "not applied: the peer's HTTP/2 SETTINGS limit streams per connection",
            );
        }
    }
    out
}

fn outlier_detection(d: &mut Diag, o: &OutlierDetectionSpec, field: &str) -> OutlierPolicy {
    let mut out = OutlierPolicy::default();
    let c5xx = d.count(
        &format!("{field}.consecutive5xxErrors"),
        o.consecutive_5xx_errors,
        U32_MAX,
    );
    let gateway = d.count(
        &format!("{field}.consecutiveGatewayErrors"),
        o.consecutive_gateway_errors,
        U32_MAX,
    );
    let legacy = d.count(&format!("{field}.consecutiveErrors"), o.consecutive_errors, I32_MAX);
    // An explicit 0 disables a detector; an absent consecutive5xxErrors keeps Envoy's default of 5.
    if o.consecutive_5xx_errors.is_some() {
        out.consecutive_5xx = c5xx.filter(|n| *n > 0);
    }
    out.consecutive_gateway = gateway.filter(|n| *n > 0);
    if let Some(e) = legacy.filter(|n| *n > 0) {
        d.warn(
            &format!("{field}.consecutiveErrors"),
            "deprecated: use consecutiveGatewayErrors or consecutive5xxErrors",
        );
        // istiod maps the deprecated field to gateway errors and turns the 5xx detector off, unless one of the
        // new fields is set.
        if o.consecutive_5xx_errors.is_none() && o.consecutive_gateway_errors.is_none() {
            out.consecutive_gateway = Some(e);
            out.consecutive_5xx = None;
        }
    }
    let local = d.count(
        &format!("{field}.consecutiveLocalOriginFailures"),
        o.consecutive_local_origin_failures,
        U32_MAX,
    );
    if o.split_external_local_origin_errors == Some(true) {
        out.consecutive_local_origin = Some(local.unwrap_or(5));
    } else if local.is_some_and(|n| n > 0) {
        d.error(
            &format!("{field}.consecutiveLocalOriginFailures"),
            "set, but splitExternalLocalOriginErrors is not true",
        );
    }
    if let Some(i) = d.duration(&format!("{field}.interval"), o.interval.as_deref(), false) {
        out.interval = i;
    }
    if let Some(b) = d.duration(
        &format!("{field}.baseEjectionTime"),
        o.base_ejection_time.as_deref(),
        false,
    ) {
        out.base_ejection = b;
    }
    // istiod only passes a positive maxEjectionPercent on; 0 leaves Envoy's default of 10%.
    if let Some(p) = d.percent(&format!("{field}.maxEjectionPercent"), o.max_ejection_percent)
        && p > 0
    {
        out.max_ejection_percent = p;
    }
    if let Some(p) = d.percent(&format!("{field}.minHealthPercent"), o.min_health_percent) {
        out.min_health_percent = p;
    }
    out
}

fn client_tls(d: &mut Diag, t: &ClientTlsSpec, field: &str) {
    match t.mode.as_deref() {
        // The waypoint always reaches endpoints over HBONE, mutually authenticated with its own certificate:
        // ISTIO_MUTUAL is what it does anyway, and DISABLE (no TLS inside the tunnel) is too.
        None | Some("ISTIO_MUTUAL") | Some("DISABLE") => {}
        Some(m @ ("SIMPLE" | "MUTUAL")) => d.warn(
            &format!("{field}.mode"),
            format!(
                "{m} not applied: the waypoint reaches endpoints over HBONE mTLS and does not originate TLS inside the tunnel"
            ),
        ),
        Some(other) => d.error(
            &format!("{field}.mode"),
            format!("unknown TLS mode {other:?} (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)"),
        ),
    }
    let set = [
        ("clientCertificate", t.client_certificate.is_some()),
        ("privateKey", t.private_key.is_some()),
        ("caCertificates", t.ca_certificates.is_some()),
        ("credentialName", t.credential_name.is_some()),
        ("subjectAltNames", !t.subject_alt_names.is_empty()),
        ("sni", t.sni.is_some()),
        ("insecureSkipVerify", t.insecure_skip_verify.is_some()),
        ("caCrl", t.ca_crl.is_some()),
    ];
    for (name, present) in set {
        if present {
            d.warn(
                &format!("{field}.{name}"),
                "not applied: endpoints are verified by their SPIFFE identity over HBONE",
            );
        }
    }
}

fn host_pattern(host: &str, namespace: &str, cluster_domain: &str) -> Result<HostPattern, String> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    if h.is_empty() {
        return Err("required".into());
    }
    if h == "*" {
        return Ok(HostPattern::Any);
    }
    if let Some(rest) = h.strip_prefix("*.") {
        if rest.is_empty() || rest.contains('*') || !rest.split('.').all(is_dns1123_label) {
            return Err(format!("{host:?} is not a valid wildcard host"));
        }
        return Ok(HostPattern::Suffix(format!(".{rest}")));
    }
    if h.contains('*') {
        return Err(format!(
            "{host:?}: a wildcard must be the whole first label (*.example.com)"
        ));
    }
    if !h.split('.').all(is_dns1123_label) {
        return Err(format!("{host:?} is not a valid host name"));
    }
    if h.contains('.') {
        Ok(HostPattern::Exact(h))
    } else {
        // Kubernetes short name: relative to the rule's own namespace (not the Service's).
        Ok(HostPattern::Exact(format!("{h}.{namespace}.svc.{cluster_domain}")))
    }
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::policy::Locality;
    use crate::config::{Backend, ConfigErrors, Snapshot, parse_config};

    const HEADER: &str = "apiVersion: waypoint.istio.io/v1alpha1
kind: WaypointConfig
metadata: {name: wp, namespace: infra}
spec:
  listeners: {hbone: 127.0.0.1:15008}
  tls: {certFile: c.pem, keyFile: k.pem, rootsFile: r.pem}
";

    /// Service `ns1/reviews` (10.0.0.1, ports 80 and 9080) with pods v1 and v2, plus whatever follows.
    fn config(rest: &str) -> String {
        format!(
            "{HEADER}---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: ns1}}
spec:
  clusterIP: 10.0.0.1
  selector: {{app: reviews}}
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: http-admin, port: 9080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1
  namespace: ns1
  labels: {{app: reviews, version: v1, topology.kubernetes.io/region: us-east, topology.kubernetes.io/zone: us-east-1a}}
status: {{podIP: 127.1.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v2, namespace: ns1, labels: {{app: reviews, version: v2}}}}
status: {{podIP: 127.1.0.2}}
{rest}"
        )
    }

    fn parse(text: &str) -> Result<Snapshot, ConfigErrors> {
        parse_config("test.yaml", Path::new("/etc/wp"), text, 1)
    }

    fn backend(snap: &Snapshot, port: u16, subset: Option<&str>) -> Arc<Backend> {
        snap.backends
            .iter()
            .find(|b| &*b.service == "reviews" && b.port == port && b.subset.as_deref() == subset)
            .cloned()
            .unwrap_or_else(|| panic!("no backend for port {port} subset {subset:?}"))
    }

    fn policy(snap: &Snapshot, port: u16, subset: Option<&str>) -> TrafficPolicy {
        TrafficPolicy::clone(&backend(snap, port, subset).policy)
    }

    fn dr(name: &str, ns: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
        )
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text).unwrap_err().0.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn every_load_balancer_field() {
        let text = config(&dr(
            "lb",
            "ns1",
            "  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: session, path: /, ttl: 0s}
        ringHash: {minimumRingSize: 4096}
      localityLbSetting:
        distribute:
        - from: us-east/*
          to: {us-east/*: 80, us-west/*: 20}
    outlierDetection: {}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer:
        consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 251}}
        localityLbSetting:
          failover: [{from: us-east, to: us-west}]
          failoverPriority: [topology.istio.io/network, version=v1]
      outlierDetection: {consecutive5xxErrors: 3}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpQueryParameterName: user, minimumRingSize: 2048}
  - name: ip
    labels: {app: reviews}
    trafficPolicy:
      loadBalancer:
        simple: LEAST_CONN
        warmupDurationSecs: 60s
  - name: src
    labels: {app: reviews}
    trafficPolicy:
      loadBalancer:
        consistentHash: {useSourceIp: true}
        localityLbSetting: {enabled: false}
  - name: rr
    labels: {app: reviews}
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
        warmup: {duration: 30s}",
        ));
        let snap = parse(&text).unwrap();
        let top = policy(&snap, 80, None);
        assert_eq!(
            top.lb,
            LbPolicy::Hash {
                key: HashKey::Cookie {
                    name: "session".into(),
                    path: Some("/".into()),
                    ttl: Some(Duration::ZERO),
                },
                algo: HashAlgo::Ring { min_size: 4096 },
            }
        );
        assert_eq!(
            top.locality,
            Some(LocalityLb {
                distribute: vec![(
                    "us-east/*".into(),
                    vec![("us-east/*".into(), 80), ("us-west/*".into(), 20)]
                )],
                ..Default::default()
            })
        );
        assert_eq!(top.outlier, Some(OutlierPolicy::default()));
        let admin = policy(&snap, 9080, None);
        assert_eq!(
            admin.lb,
            LbPolicy::Hash {
                key: HashKey::Header(HeaderName::from_static("x-user")),
                algo: HashAlgo::Maglev { table_size: 251 },
            }
        );
        let loc = admin.locality.unwrap();
        assert_eq!(loc.failover, vec![("us-east".to_string(), "us-west".to_string())]);
        assert_eq!(loc.failover_priority, vec!["topology.istio.io/network", "version=v1"]);
        assert_eq!(admin.outlier.unwrap().consecutive_5xx, Some(3));
        assert_eq!(policy(&snap, 80, Some("v1")).lb, LbPolicy::Random);
        assert_eq!(
            policy(&snap, 80, Some("v2")).lb,
            LbPolicy::Hash {
                key: HashKey::Query("user".into()),
                algo: HashAlgo::Ring { min_size: 2048 },
            }
        );
        let ip = policy(&snap, 80, Some("ip"));
        assert_eq!(ip.lb, LbPolicy::LeastRequest, "LEAST_CONN is LEAST_REQUEST");
        assert_eq!(ip.warmup, Some(Duration::from_secs(60)));
        let src = policy(&snap, 80, Some("src"));
        assert_eq!(
            src.lb,
            LbPolicy::Hash {
                key: HashKey::SourceIp,
                algo: HashAlgo::Ring {
                    min_size: DEFAULT_RING_SIZE
                },
            }
        );
        assert_eq!(src.locality, None, "enabled: false");
        assert_eq!(policy(&snap, 80, Some("rr")).warmup, Some(Duration::from_secs(30)));
        assert!(
            snap.warnings.iter().any(|w| w.contains(
                "field spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.minimumRingSize: deprecated"
            )),
            "{:?}",
            snap.warnings
        );
    }

    #[test]
    fn connection_pool_and_outlier_detection_fields() {
        let text = config(&dr(
            "pool",
            "ns1",
            "  host: reviews.ns1.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http:
        http1MaxPendingRequests: 10
        http2MaxRequests: 1000
        maxRequestsPerConnection: 5
        maxRetries: 3
        idleTimeout: 30s
    outlierDetection:
      consecutive5xxErrors: 0
      consecutiveGatewayErrors: 4
      splitExternalLocalOriginErrors: true
      consecutiveLocalOriginFailures: 2
      interval: 5s
      baseEjectionTime: 1m
      maxEjectionPercent: 50
      minHealthPercent: 20
    portLevelSettings:
    - port: {number: 9080}
      connectionPool:
        tcp: {maxConnections: 0}
        http: {http2MaxRequests: 0}
      outlierDetection: {consecutiveErrors: 7, maxEjectionPercent: 0}",
        ));
        let snap = parse(&text).unwrap();
        let top = policy(&snap, 80, None);
        assert_eq!(
            top.pool,
            ConnectionPool {
                max_connections: Some(100),
                connect_timeout: Some(Duration::from_millis(250)),
                max_pending: Some(10),
                max_requests: Some(1000),
                max_requests_per_connection: Some(5),
                max_retries: Some(3),
                idle_timeout: Some(Duration::from_secs(30)),
            }
        );
        assert_eq!(
            top.outlier,
            Some(OutlierPolicy {
                consecutive_5xx: None,
                consecutive_gateway: Some(4),
                interval: Duration::from_secs(5),
                base_ejection: Duration::from_secs(60),
                max_ejection_percent: 50,
                min_health_percent: 20,
                consecutive_local_origin: Some(2),
            })
        );
        assert!(top.needs_pipeline());
        let port = policy(&snap, 9080, None);
        assert_eq!(port.pool, ConnectionPool::default(), "zero limits are Istio's 'unset'");
        assert!(!port.needs_pipeline());
        assert_eq!(
            port.outlier,
            Some(OutlierPolicy {
                consecutive_5xx: None,
                consecutive_gateway: Some(7),
                ..OutlierPolicy::default()
            }),
            "deprecated consecutiveErrors counts gateway errors and turns the 5xx detector off; maxEjectionPercent 0 keeps 10"
        );
        // A backend without any rule keeps the built-in defaults.
        let text = config("");
        assert_eq!(policy(&parse(&text).unwrap(), 80, None), TrafficPolicy::default());
    }

    #[test]
    fn port_level_settings_replace_the_whole_policy_and_subsets_replace_sections() {
        let text = config(&dr(
            "merge",
            "ns1",
            "  host: reviews
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {http: {http2MaxRequests: 10}}
    outlierDetection: {consecutive5xxErrors: 2}
    portLevelSettings:
    - port: {number: 9080}
      connectionPool: {http: {maxRetries: 1}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 7}}
      portLevelSettings:
      - port: {number: 80}
        outlierDetection: {consecutiveGatewayErrors: 9}",
        ));
        let snap = parse(&text).unwrap();
        let top = policy(&snap, 80, None);
        assert_eq!(top.lb, LbPolicy::Random);
        assert_eq!(top.pool.max_requests, Some(10));
        assert_eq!(top.outlier.as_ref().unwrap().consecutive_5xx, Some(2));
        // Port 9080's entry is the whole policy: nothing is inherited from the top level.
        let admin = policy(&snap, 9080, None);
        assert_eq!(admin.lb, LbPolicy::RoundRobin);
        assert_eq!(admin.pool.max_requests, None);
        assert_eq!(admin.pool.max_retries, Some(1));
        assert_eq!(admin.outlier, None);
        // Subset v1 replaces only the load balancer, on both ports.
        let v1 = policy(&snap, 80, Some("v1"));
        assert_eq!(v1.lb, LbPolicy::LeastRequest);
        assert_eq!(v1.pool.max_requests, Some(10));
        assert_eq!(v1.outlier, top.outlier);
        let v1_admin = policy(&snap, 9080, Some("v1"));
        assert_eq!(v1_admin.lb, LbPolicy::LeastRequest);
        assert_eq!(v1_admin.pool.max_retries, Some(1));
        // Subset v2 has an entry for port 80: every section comes from it (defaults where it is silent).
        let v2 = policy(&snap, 80, Some("v2"));
        assert_eq!(v2.lb, LbPolicy::RoundRobin);
        assert_eq!(v2.pool, ConnectionPool::default());
        assert_eq!(v2.outlier.unwrap().consecutive_gateway, Some(9));
        // On port 9080 subset v2 has no port entry: its top-level connectionPool replaces that section only.
        let v2_admin = policy(&snap, 9080, Some("v2"));
        assert_eq!(v2_admin.pool.max_connections, Some(7));
        assert_eq!(v2_admin.pool.max_retries, None);
    }

    #[test]
    fn lookup_order_service_namespace_then_waypoint_then_root() {
        let svc_ns = dr(
            "in-svc-ns",
            "ns1",
            "  host: reviews\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
        );
        let wp_ns = dr(
            "in-wp-ns",
            "infra",
            "  host: reviews.ns1.svc.cluster.local\n  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
        );
        let root = dr(
            "in-root",
            "istio-system",
            "  host: '*.ns1.svc.cluster.local'\n  trafficPolicy: {connectionPool: {http: {maxRetries: 4}}}",
        );
        let lb = |text: String| policy(&parse(&text).unwrap(), 80, None);
        let snap = parse(&config(&format!("{root}{wp_ns}{svc_ns}"))).unwrap();
        assert_eq!(policy(&snap, 80, None).lb, LbPolicy::Random);
        assert!(
            snap.warnings.is_empty(),
            "overridden rules still select the Service: {:?}",
            snap.warnings
        );
        assert_eq!(lb(config(&format!("{root}{wp_ns}"))).lb, LbPolicy::LeastRequest);
        assert_eq!(lb(config(&root)).pool.max_retries, Some(4));
        // A short host in another namespace means a Service of that namespace, not ns1's.
        let elsewhere = dr(
            "short",
            "infra",
            "  host: reviews\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
        );
        let snap = parse(&config(&elsewhere)).unwrap();
        assert_eq!(policy(&snap, 80, None), TrafficPolicy::default());
        assert!(
            snap.warnings
                .iter()
                .any(|w| w
                    .contains("DestinationRule infra/short): field spec.host: host \"reviews\" selects no Service")),
            "{:?}",
            snap.warnings
        );
    }

    #[test]
    fn exact_host_beats_wildcard_and_oldest_wins() {
        let wildcard = dr(
            "wild",
            "ns1",
            "  host: '*.ns1.svc.cluster.local'\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
        );
        let exact = dr(
            "exact",
            "ns1",
            "  host: reviews\n  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
        );
        let snap = parse(&config(&format!("{wildcard}{exact}"))).unwrap();
        assert_eq!(policy(&snap, 80, None).lb, LbPolicy::LeastRequest);

        let aged = |name: &str, ts: &str, simple: &str| {
            format!(
                "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: ns1, creationTimestamp: '{ts}'}}\nspec: {{host: reviews, trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}}}\n"
            )
        };
        let young = aged("young", "2024-06-01T00:00:00Z", "RANDOM");
        let old = aged("old", "2024-01-01T00:00:00Z", "LEAST_REQUEST");
        let snap = parse(&config(&format!("{young}{old}"))).unwrap();
        assert_eq!(
            policy(&snap, 80, None).lb,
            LbPolicy::LeastRequest,
            "older creationTimestamp wins"
        );
        assert!(
            snap.warnings.iter().any(|w| w.contains(
                "DestinationRule ns1/young): field spec.host: ignored for Service ns1/reviews: DestinationRule ns1/old"
            )),
            "{:?}",
            snap.warnings
        );
        // Without timestamps, file order decides (v1alpha3 is read the same way).
        let first = dr(
            "first",
            "ns1",
            "  host: reviews\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
        )
        .replace("networking.istio.io/v1\n", "networking.istio.io/v1alpha3\n");
        let second = dr(
            "second",
            "ns1",
            "  host: reviews\n  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
        );
        assert_eq!(
            policy(&parse(&config(&format!("{first}{second}"))).unwrap(), 80, None).lb,
            LbPolicy::Random
        );
    }

    #[test]
    fn subsets_select_endpoints_by_labels_and_virtual_services_route_to_them() {
        let rule = dr(
            "subsets",
            "ns1",
            "  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
  - {name: none, labels: {version: v9}}",
        );
        let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: ns1}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {x-canary: {exact: 'yes'}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{headers: {x-missing: {exact: 'yes'}}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews.ns1.svc.cluster.local, subset: v2, port: {number: 80}}, weight: 10}
";
        let snap = parse(&config(&format!("{rule}{vs}"))).unwrap();
        let pods = |b: &Backend| b.endpoints.iter().map(|e| e.workload.to_string()).collect::<Vec<_>>();
        let v1 = backend(&snap, 80, Some("v1"));
        assert_eq!(pods(&v1), vec!["reviews-v1"]);
        assert_eq!(v1.key(), "ns1/reviews:80/v1");
        assert_eq!(pods(&backend(&snap, 9080, Some("v2"))), vec!["reviews-v2"]);
        assert!(backend(&snap, 80, Some("none")).endpoints.is_empty());
        assert_eq!(
            pods(&backend(&snap, 80, None)).len(),
            2,
            "the Service itself keeps every endpoint"
        );

        let binding = snap.service(&"10.0.0.1:80".parse().unwrap()).unwrap();
        let table = binding.routes.as_ref().unwrap().producer.clone().unwrap();
        let rules = &table.routes[0].rules;
        let id_of = |b: Option<waypoint_filters::route::BackendId>| b.map(|id| snap.backends[id.0].key());
        assert_eq!(id_of(rules[0].backends[0].backend), Some("ns1/reviews:80/v2".into()));
        assert_eq!(
            rules[1].backends[0].backend, None,
            "undefined subset: no backend (503 NC)"
        );
        assert_eq!(id_of(rules[2].backends[0].backend), Some("ns1/reviews:80/v1".into()));
        assert_eq!(id_of(rules[2].backends[1].backend), Some("ns1/reviews:80/v2".into()));
        // On the other port the same VirtualService resolves to that port's subsets.
        let admin = snap.service(&"10.0.0.1:9080".parse().unwrap()).unwrap();
        let rules = &admin.routes.as_ref().unwrap().producer.clone().unwrap().routes[0].rules;
        assert_eq!(id_of(rules[0].backends[0].backend), Some("ns1/reviews:9080/v2".into()));
        assert!(
            snap.warnings.iter().any(|w| w.contains(
                "VirtualService ns1/reviews): field spec.http[1].route[0].destination.subset: subset \"v3\" is not defined"
            )),
            "{:?}",
            snap.warnings
        );
    }

    #[test]
    fn validation_errors_name_file_document_and_field() {
        let bad = [
            (
                "  host: reviews\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x, maglev: {tableSize: 65536}}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: must be prime",
            ),
            (
                "  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}",
                "spec.trafficPolicy.connectionPool.tcp.maxConnections: must not be negative",
            ),
            (
                "  host: reviews\n  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 3000000000}}}",
                "spec.trafficPolicy.connectionPool.http.http2MaxRequests: must be at most 2147483647",
            ),
            (
                "  host: reviews\n  trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}",
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent: must be a percentage 0-100",
            ),
            (
                "  host: reviews\n  subsets: [{name: v1}, {name: v1}]",
                "spec.subsets[1].name: duplicate subset name",
            ),
            (
                "  host: reviews\n  trafficPolicy: {outlierDetection: {interval: 10 seconds}}",
                "spec.trafficPolicy.outlierDetection.interval: invalid duration",
            ),
            (
                "  host: reviews\n  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}",
                "spec.trafficPolicy.loadBalancer.simple: PASSTHROUGH is not supported",
            ),
            (
                "  host: reviews\n  trafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: a/*, to: {a/*: 60, b/*: 30}}]}}}",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to: weights must sum to 100, got 90",
            ),
            (
                "  host: reviews\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x, useSourceIp: true}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash: exactly one of",
            ),
            (
                "  host: reviews\n  trafficPolicy: {outlierDetetion: {}}",
                "spec.trafficPolicy.outlierDetetion: unknown field `outlierDetetion`",
            ),
            (
                "  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
                "spec.host: required",
            ),
            (
                "  host: reviews\n  trafficPolicy: {portLevelSettings: [{port: {number: 70000}, loadBalancer: {simple: RANDOM}}]}",
                "spec.trafficPolicy.portLevelSettings[0].port.number: must be a port number",
            ),
            (
                "  host: reviews\n  subsets: [{name: v1, trafficPolicy: {connectionPool: {http: {maxRetries: -3}}}}]",
                "spec.subsets[0].trafficPolicy.connectionPool.http.maxRetries: must not be negative",
            ),
            (
                "  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 0s}}}",
                "spec.trafficPolicy.connectionPool.tcp.connectTimeout: \"0s\": must be at least 1ms",
            ),
            (
                "  host: reviews\n  trafficPolicy: {proxyProtocol: {version: V1}}",
                "spec.trafficPolicy.proxyProtocol: not supported",
            ),
            (
                "  host: reviews\n  trafficPolicy: {loadBalancer: {localityLbSetting: {failover: [{from: us-east, to: us-east}]}}, outlierDetection: {}}",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0]: from and to must be different regions",
            ),
            (
                "  host: reviews\n  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: c, ttl: soon}}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl: invalid duration",
            ),
        ];
        for (spec, want) in bad {
            let msgs = errors(&config(&dr("bad", "ns1", spec)));
            assert!(
                msgs.iter().any(|m| m.starts_with("test.yaml: document 5 (line ")
                    && m.contains("DestinationRule ns1/bad): field ")
                    && m.contains(want)),
                "want {want:?} in {msgs:?}"
            );
        }
        // Every error of a rule is reported, not just the first; the whole config is rejected.
        let msgs = errors(&config(&dr(
            "bad",
            "ns1",
            "  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}, outlierDetection: {minHealthPercent: 200}}",
        )));
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        // An invalid rule fails the load even when it selects no Service.
        assert!(
            !errors(&config(&dr(
                "bad",
                "other",
                "  host: nothing\n  subsets: [{name: Bad_Name}]"
            )))
            .is_empty()
        );
    }

    #[test]
    fn fields_not_applied_are_accepted_with_a_warning_naming_them() {
        let text = config(&dr(
            "tls",
            "ns1",
            "  host: reviews
  trafficPolicy:
    tls: {mode: SIMPLE, sni: reviews.example.com}
    connectionPool:
      tcp: {tcpKeepalive: {time: 7200s, interval: 75s}, maxConnectionDuration: 1h, idleTimeout: 0s}
      http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 100}
    tunnel: {targetHost: proxy.example.com, targetPort: 8080}
    retryBudget: {percent: 25, minRetryConcurrency: 5}
    loadBalancer:
      simple: RANDOM
      warmupDurationSecs: 10s",
        ));
        let snap = parse(&text).unwrap();
        for field in [
            "spec.trafficPolicy.tls.mode: SIMPLE not applied",
            "spec.trafficPolicy.tls.sni: not applied",
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive: not applied",
            "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration: not applied",
            "spec.trafficPolicy.connectionPool.tcp.idleTimeout: not applied",
            "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: not applied",
            "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams: not applied",
            "spec.trafficPolicy.tunnel: not applied",
            "spec.trafficPolicy.retryBudget: not applied",
            "spec.trafficPolicy.loadBalancer.warmup: not applied",
        ] {
            assert!(
                snap.warnings
                    .iter()
                    .any(|w| w.contains(&format!("DestinationRule ns1/tls): field {field}"))),
                "{field} not in {:?}",
                snap.warnings
            );
        }
        assert_eq!(
            policy(&snap, 80, None).warmup,
            None,
            "warmup needs ROUND_ROBIN or LEAST_REQUEST"
        );
        // ISTIO_MUTUAL (and DISABLE: nothing inside the tunnel) is what the waypoint does anyway.
        let snap = parse(&config(&dr(
            "mtls",
            "ns1",
            "  host: reviews\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}",
        )))
        .unwrap();
        assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
    }

    #[test]
    fn rules_for_sidecars_or_hidden_by_export_to_do_not_apply() {
        let selector = dr(
            "sidecar",
            "ns1",
            "  host: reviews\n  workloadSelector: {matchLabels: {app: client}}\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
        );
        let hidden = dr(
            "hidden",
            "ns1",
            "  host: reviews\n  exportTo: ['.']\n  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
        );
        let snap = parse(&config(&format!("{selector}{hidden}"))).unwrap();
        assert_eq!(policy(&snap, 80, None), TrafficPolicy::default());
        assert!(
            snap.warnings
                .iter()
                .any(|w| w
                    .contains("DestinationRule ns1/sidecar): does not apply to this waypoint: has a workloadSelector")),
            "{:?}",
            snap.warnings
        );
        assert!(
            snap.warnings
                .iter()
                .any(|w| w.contains("DestinationRule ns1/hidden): does not apply"))
        );
        // Exported to the waypoint's namespace by name: applies.
        let shown = hidden.replace("exportTo: ['.']", "exportTo: [infra]");
        assert_eq!(
            policy(&parse(&config(&shown)).unwrap(), 80, None).lb,
            LbPolicy::LeastRequest
        );
    }

    #[test]
    fn connection_limits_put_an_address_without_routes_on_the_policy_pipeline() {
        let vip = "10.0.0.1:80".parse().unwrap();
        let snap = parse(&config("")).unwrap();
        assert!(snap.service(&vip).unwrap().default_table.is_none());
        let limits = dr(
            "limits",
            "ns1",
            "  host: reviews\n  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 5}}}",
        );
        let snap = parse(&config(&limits)).unwrap();
        let binding = snap.service(&vip).unwrap();
        assert!(binding.routes.is_none());
        let table = binding.default_table.as_ref().unwrap();
        let target = table.routes[0].rules[0].backends[0].backend.unwrap();
        assert_eq!(snap.backends[target.0].policy.pool.max_requests, Some(5));
        // A policy without request limits does not need the pipeline.
        let lb_only = dr(
            "lb",
            "ns1",
            "  host: reviews\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
        );
        assert!(
            parse(&config(&lb_only))
                .unwrap()
                .service(&vip)
                .unwrap()
                .default_table
                .is_none()
        );
    }

    #[test]
    fn endpoint_and_waypoint_locality() {
        let text = config(
            "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: ns1}
spec: {address: 127.1.0.3, labels: {app: reviews, version: v1}, locality: eu-west/eu-west-1b/rack7}
",
        )
        .replace(
            "  tls: {certFile",
            "  locality: us-east/us-east-1a\n  labels: {version: v1}\n  tls: {certFile",
        );
        let snap = parse(&text).unwrap();
        let eps = &backend(&snap, 80, None).endpoints;
        let loc = |w: &str| eps.iter().find(|e| &*e.workload == w).unwrap().locality.clone();
        assert_eq!(loc("reviews-v1"), Locality::parse("us-east/us-east-1a"));
        assert_eq!(loc("reviews-v2"), Locality::default());
        assert_eq!(loc("vm"), Locality::parse("eu-west/eu-west-1b/rack7"));
        let vm = eps.iter().find(|e| &*e.workload == "vm").unwrap();
        assert_eq!(
            vm.labels.get("topology.istio.io/subzone").map(String::as_str),
            Some("rack7")
        );
        assert_eq!(snap.settings.locality, Locality::parse("us-east/us-east-1a"));
        assert_eq!(snap.settings.labels.get("version").map(String::as_str), Some("v1"));
        assert_eq!(
            snap.settings
                .labels
                .get("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("us-east-1a")
        );
        let bad = text.replace("locality: us-east/us-east-1a", "locality: a/b/c/d");
        assert!(
            errors(&bad)
                .iter()
                .any(|m| m.contains("WaypointConfig infra/wp): field spec.locality")),
            "{:?}",
            errors(&bad)
        );
        let bad = text.replace("eu-west/eu-west-1b/rack7", "eu-west/*");
        assert!(
            errors(&bad)
                .iter()
                .any(|m| m.contains("WorkloadEntry ns1/vm): field spec.locality"))
        );
    }

    #[test]
    fn the_example_config_applies_its_rule_and_routes_to_subsets() {
        let text = include_str!("../../../examples/waypoint.yaml");
        let snap = parse(text).unwrap();
        assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
        let http = snap.service(&"10.96.0.20:80".parse().unwrap()).unwrap();
        assert_eq!(http.backend.policy.lb, LbPolicy::LeastRequest);
        assert!(http.backend.policy.needs_pipeline());
        let rules = &http.routes.as_ref().unwrap().producer.as_ref().unwrap().routes[0].rules;
        assert!(rules[0].fault.as_ref().unwrap().delay.is_some());
        assert!(rules[1].fault.as_ref().unwrap().abort.is_some());
        let canary: Vec<String> = rules[2]
            .backends
            .iter()
            .map(|b| snap.backends[b.backend.unwrap().0].key())
            .collect();
        assert_eq!(canary, vec!["demo/echo:80/v1", "demo/echo:80/v2"]);
    }
}
