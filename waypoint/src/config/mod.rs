//! The IR: one immutable [`Snapshot`] built from a config source, swapped atomically on every accepted change.
//!
//! Everything the data path needs per CONNECT or per request is resolved here, when the snapshot is built:
//! VIP:port → service binding, target ports per endpoint, each endpoint's identity and HBONE address. The data
//! path pays one atomic load (`ArcSwap::load`) and hash lookups, never parsing or selector matching.

pub mod destination_rule;
pub mod duration;
pub mod gateway_api;
pub mod k8s;
pub mod load;
pub mod policy;
pub mod security;
pub mod virtual_service;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use waypoint_filters::route::{BackendId, RouteTable};

use crate::identity::SpiffeId;

pub use load::{ConfigError, ConfigErrors, load_file, load_file_with, parse_config, parse_config_with};

/// Process-level settings from the `WaypointConfig` document. Listener addresses and certificate paths are read
/// once at start-up; a later edit of those fields is reported and needs a restart.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub name: String,
    pub namespace: String,
    pub trust_domain: String,
    pub cluster_domain: String,
    pub hbone_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls: TlsPaths,
    pub destination_hbone_port: u16,
    #[serde(with = "duration::serde_millis")]
    pub drain_timeout: Duration,
    #[serde(with = "duration::serde_millis")]
    pub protocol_detection_timeout: Duration,
    #[serde(with = "duration::serde_millis")]
    pub watch_interval: Duration,
    /// How often free allocator memory goes back to the kernel (`spec.memoryReleaseInterval`; zero: never).
    #[serde(with = "duration::serde_millis")]
    pub memory_release_interval: Duration,
    /// PEM roots for HTTPS JWKS fetches (`spec.security.jwksRootsFile`).
    pub jwks_roots_file: Option<PathBuf>,
    /// Where the waypoint runs (`spec.locality`, `region/zone/subzone`): the reference point of locality load
    /// balancing.
    pub locality: policy::Locality,
    /// The waypoint's own labels (`spec.labels`, plus the topology labels of `spec.locality` when not given),
    /// compared with endpoint labels by `localityLbSetting.failoverPriority`.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsPaths {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub roots_file: PathBuf,
}

/// What runs inside a tunnel to a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PortProtocol {
    /// HTTP/1.1 (or HTTP/2 prior knowledge, detected from the preface); upstream HTTP/1.1.
    Http,
    /// HTTP/2 only (`http2`, `grpc`, `kubernetes.io/h2c`); upstream HTTP/2.
    Http2,
    /// Opaque bytes (`tcp`, `tls`, `mongo`, …).
    Tcp,
    /// Not declared: sniff the first bytes; upstream speaks what the client spoke.
    Detect,
}

impl PortProtocol {
    /// Istio's protocol selection: `appProtocol` first, then the port name prefix before the first `-`.
    pub fn from_port(app_protocol: Option<&str>, name: Option<&str>) -> PortProtocol {
        if let Some(p) = app_protocol
            && let Some(proto) = Self::from_word(&p.to_ascii_lowercase())
        {
            return proto;
        }
        if let Some(n) = name {
            let n = n.to_ascii_lowercase();
            let prefix = n.split('-').next().unwrap_or_default();
            if let Some(proto) = Self::from_word(prefix) {
                return proto;
            }
        }
        PortProtocol::Detect
    }

    fn from_word(w: &str) -> Option<PortProtocol> {
        Some(match w {
            "http" | "kubernetes.io/ws" | "kubernetes.io/wss" => PortProtocol::Http,
            "http2" | "grpc" | "grpc-web" | "kubernetes.io/h2c" => PortProtocol::Http2,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/tls" => PortProtocol::Tcp,
            _ => return None,
        })
    }
}

/// One backend endpoint (a pod or a WorkloadEntry) for one service port.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// podIP:targetPort — what the application listens on, and the CONNECT authority toward it.
    pub addr: SocketAddr,
    /// podIP:15008 when the endpoint's node runs ztunnel (HBONE); `None` = plain TCP to `addr`.
    pub hbone: Option<SocketAddr>,
    pub identity: SpiffeId,
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub labels: BTreeMap<String, String>,
    /// Where the endpoint runs (WorkloadEntry `locality`, or the pod's `topology.kubernetes.io/region`,
    /// `topology.kubernetes.io/zone` and `topology.istio.io/subzone` labels); empty when unknown.
    pub locality: policy::Locality,
}

/// A service port's endpoints. The round-robin cursor is per snapshot on purpose: resetting it on a config swap
/// is harmless, and endpoint health (which must survive swaps) lives in the upstream module instead.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub service: Arc<str>,
    pub namespace: Arc<str>,
    pub port: u16,
    /// DestinationRule subset name when this backend is one subset of the Service port.
    pub subset: Option<Arc<str>>,
    /// Set for the one-endpoint backend of a workload-addressed CONNECT (that pod's IP:port), so its runtime
    /// state never shares a key with a Service that happens to have the workload's name.
    pub workload_addr: Option<SocketAddr>,
    /// How to talk to the endpoints (the backend Service port's declared protocol).
    pub protocol: PortProtocol,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The DestinationRule traffic policy for this backend (merged: top level, port level, subset).
    pub policy: Arc<policy::TrafficPolicy>,
    /// Runtime state (load balancer, breaker, endpoint health) attached by the upstream module on first use;
    /// the state itself lives in a registry keyed by [`Backend::key`] so it survives config swaps.
    #[serde(skip)]
    pub runtime: std::sync::OnceLock<Arc<crate::upstream::cluster::BackendRuntime>>,
    #[serde(skip)]
    cursor: AtomicUsize,
}

impl Backend {
    pub fn new(
        service: Arc<str>,
        namespace: Arc<str>,
        port: u16,
        protocol: PortProtocol,
        endpoints: Vec<Arc<Endpoint>>,
    ) -> Self {
        Backend {
            service,
            namespace,
            port,
            subset: None,
            workload_addr: None,
            protocol,
            endpoints,
            policy: Arc::default(),
            runtime: std::sync::OnceLock::new(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Identifies the backend across snapshots: `namespace/service:port` plus `/subset` for a subset; a
    /// workload-addressed backend is keyed by its pod address instead.
    pub fn key(&self) -> String {
        if let Some(addr) = self.workload_addr {
            return format!("workload:{}/{}@{addr}", self.namespace, self.service);
        }
        match &self.subset {
            Some(s) => format!("{}/{}:{}/{s}", self.namespace, self.service, self.port),
            None => format!("{}/{}:{}", self.namespace, self.service, self.port),
        }
    }

    /// Round robin over the endpoints; `None` when the service has none.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.cursor.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }
}

/// What kind of address a CONNECT authority named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum BindingKind {
    /// A Service VIP:port (service-addressed traffic, the usual waypoint case).
    Service,
    /// A Gateway listener (`spec.addresses` × listener port): routes only, no default backend.
    GatewayListener,
    /// A pod or WorkloadEntry IP:port (workload-addressed traffic): straight to that endpoint.
    Workload,
}

/// What a CONNECT to one address resolves to.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceBinding {
    pub kind: BindingKind,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `<name>.<namespace>.svc.<cluster domain>`
    pub hostname: Arc<str>,
    pub vip: SocketAddr,
    pub port_name: Option<String>,
    pub protocol: PortProtocol,
    /// Where requests go when no route applies (Service: its own endpoints).
    pub backend: Arc<Backend>,
    /// HTTPRoute / GRPCRoute rules attached to this address, if any.
    pub routes: Option<Arc<RouteSet>>,
    /// A one-rule table sending to `backend`, used when the address has no routes but has security policy
    /// (the policy layers sit in the routed pipeline).
    #[serde(skip)]
    pub default_table: Option<Arc<RouteTable>>,
    /// RequestAuthentication and AuthorizationPolicy that apply to this address.
    #[serde(serialize_with = "security_summary")]
    pub security: security::ServiceSecurity,
}

fn security_summary<S: serde::Serializer>(sec: &security::ServiceSecurity, s: S) -> Result<S::Ok, S::Error> {
    serde_json::json!({
        "jwtRules": sec.jwt.as_ref().map(|j| j.rules().len()),
        "authorizationPolicies": sec.authz.as_ref().map(|a| a.len()),
    })
    .serialize(s)
}

/// The route tables of one parent: the producer's (routes in the Service's namespace, or a Gateway's), and
/// consumer tables for clients of other namespaces (GAMMA: a consumer route replaces the producer routes for
/// clients in its own namespace).
#[derive(Debug, Default)]
pub struct RouteSet {
    pub producer: Option<Arc<RouteTable>>,
    pub consumers: HashMap<String, Arc<RouteTable>>,
}

impl RouteSet {
    pub fn table_for(&self, client_namespace: &str) -> Option<&Arc<RouteTable>> {
        self.consumers.get(client_namespace).or(self.producer.as_ref())
    }
}

impl Serialize for RouteSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fn names(t: &RouteTable) -> Vec<String> {
            t.routes.iter().map(|r| format!("{}/{}", r.namespace, r.name)).collect()
        }
        let consumers: BTreeMap<&String, Vec<String>> = self.consumers.iter().map(|(ns, t)| (ns, names(t))).collect();
        serde_json::json!({
            "producer": self.producer.as_deref().map(names),
            "consumers": consumers,
        })
        .serialize(s)
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Increases by one with every accepted change.
    pub generation: u64,
    pub source: String,
    pub settings: Settings,
    #[serde(serialize_with = "services_sorted")]
    pub services: HashMap<SocketAddr, Arc<ServiceBinding>>,
    /// Every Service port a route or binding can send to, indexed by [`BackendId`].
    pub backends: Vec<Arc<Backend>>,
    /// Workload IPs, for workload-addressed CONNECTs (any port on a known pod or WorkloadEntry).
    #[serde(skip)]
    pub workloads: HashMap<IpAddr, Arc<Endpoint>>,
    /// Kinds present in the source that this build does not act on, reported at load.
    pub skipped: Vec<String>,
    /// Fields accepted but not acted on, and objects that do not apply to this waypoint: one line each, naming
    /// file, document, object and field (the same lines are logged at load).
    pub warnings: Vec<String>,
    /// Compiled `WaypointConfig.spec.security`.
    #[serde(skip)]
    pub security: security::SecuritySettings,
}

fn services_sorted<S: serde::Serializer>(
    services: &HashMap<SocketAddr, Arc<ServiceBinding>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let sorted: BTreeMap<String, &Arc<ServiceBinding>> = services.iter().map(|(k, v)| (k.to_string(), v)).collect();
    sorted.serialize(s)
}

impl Snapshot {
    pub fn service(&self, addr: &SocketAddr) -> Option<&Arc<ServiceBinding>> {
        self.services.get(addr)
    }

    /// The binding for a CONNECT authority: a Service or Gateway listener address, else a workload's IP (any
    /// port: the authority's port is the application port on that workload).
    pub fn resolve(&self, addr: &SocketAddr) -> Option<Arc<ServiceBinding>> {
        if let Some(b) = self.services.get(addr) {
            return Some(b.clone());
        }
        let w = self.workloads.get(&addr.ip())?;
        let ep = Arc::new(Endpoint {
            addr: *addr,
            ..Endpoint::clone(w)
        });
        Some(Arc::new(ServiceBinding {
            kind: BindingKind::Workload,
            name: w.workload.clone(),
            namespace: w.namespace.clone(),
            hostname: w.workload.clone(),
            vip: *addr,
            port_name: None,
            protocol: PortProtocol::Detect,
            backend: Arc::new(Backend {
                workload_addr: Some(*addr),
                ..Backend::new(
                    w.workload.clone(),
                    w.namespace.clone(),
                    addr.port(),
                    PortProtocol::Detect,
                    vec![ep],
                )
            }),
            routes: None,
            default_table: None,
            security: security::ServiceSecurity::default(),
        }))
    }

    pub fn backend(&self, id: BackendId) -> Option<&Arc<Backend>> {
        self.backends.get(id.0)
    }
}
