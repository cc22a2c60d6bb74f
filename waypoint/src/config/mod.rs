//! The IR: one immutable [`Snapshot`] built from a config source, swapped atomically on every accepted change.
//!
//! Everything the data path needs per CONNECT or per request is resolved here, when the snapshot is built:
//! VIP:port → service binding, target ports per endpoint, each endpoint's identity and HBONE address. The data
//! path pays one atomic load (`ArcSwap::load`) and hash lookups, never parsing or selector matching.

pub mod duration;
pub mod k8s;
pub mod load;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::identity::SpiffeId;

pub use load::{ConfigError, ConfigErrors, load_file, parse_config};

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
}

/// A service port's endpoints. The round-robin cursor is per snapshot on purpose: resetting it on a config swap
/// is harmless, and endpoint health (which must survive swaps) lives in the upstream module instead.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub service: Arc<str>,
    pub namespace: Arc<str>,
    pub port: u16,
    pub endpoints: Vec<Arc<Endpoint>>,
    #[serde(skip)]
    cursor: AtomicUsize,
}

impl Backend {
    pub fn new(service: Arc<str>, namespace: Arc<str>, port: u16, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Backend {
            service,
            namespace,
            port,
            endpoints,
            cursor: AtomicUsize::new(0),
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

/// What a CONNECT to one VIP:port resolves to.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceBinding {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `<name>.<namespace>.svc.<cluster domain>`
    pub hostname: Arc<str>,
    pub vip: SocketAddr,
    pub port_name: Option<String>,
    pub protocol: PortProtocol,
    pub backend: Arc<Backend>,
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
    /// Kinds present in the source that this build does not act on, reported at load.
    pub skipped: Vec<String>,
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
}
