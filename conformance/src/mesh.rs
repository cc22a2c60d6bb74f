//! Mesh-in-a-box: pods (echo backends, with or without a destination ztunnel), Services, a PKI and our
//! waypoint, all on loopback, described the way a cluster would describe them.
//!
//! Every pod and the waypoint get their own 127.x.y.z, so the cluster's well-known ports (15008, 15021,
//! 15000) are used unchanged and tests run in parallel. Service VIPs are never bound: they only appear in
//! CONNECT authorities and in the config file, exactly as a VIP only exists in ztunnel's and the waypoint's
//! tables. The waypoint reads the same multi-document YAML a user would write (Service / Pod objects plus our
//! `WaypointConfig`), so a mesh test also exercises the file config path.

use crate::tempdir::TempDir;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::dest_ztunnel::{DestZtunnel, DestZtunnelConfig, DestZtunnelError, DestZtunnelHandle};
use crate::echo::{EchoConfig, EchoError, EchoFormat, EchoHandle, EchoServer, TcpEcho, TcpEchoHandle};
use crate::net::{unique_loopback_ip, unique_loopback_ip_with_ports};
use crate::pki::{KeyKind, PkiError, TestCa};
use crate::source_ztunnel::{SourceError, SourceZtunnel, SourceZtunnelConfig};

const HBONE_PORT: u16 = 15008;
const READINESS_PORT: u16 = 15021;
const ADMIN_PORT: u16 = 15000;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("pod {pod}: {source}")]
    Echo { pod: String, source: EchoError },
    #[error("pod {pod}: {source}")]
    DestZtunnel { pod: String, source: DestZtunnelError },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("rendering the waypoint config: {0}")]
    Render(String),
    #[error("starting the waypoint: {0}")]
    Waypoint(#[from] waypoint::StartError),
    #[error("waypoint process exited before it was ready ({status}); log:\n{log}")]
    ChildExited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("waypoint not ready on {addr} after {timeout:?}; log:\n{log}")]
    NotReady {
        addr: SocketAddr,
        timeout: Duration,
        log: String,
    },
}

/// One port of a Service.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub app_protocol: Option<String>,
}

impl PortSpec {
    pub fn new(name: &str, port: u16, target_port: u16) -> PortSpec {
        PortSpec {
            name: name.to_string(),
            port,
            target_port,
            app_protocol: None,
        }
    }

    pub fn http(port: u16, target_port: u16) -> PortSpec {
        PortSpec::new("http", port, target_port).app_protocol("http")
    }

    pub fn tcp(port: u16, target_port: u16) -> PortSpec {
        PortSpec::new("tcp", port, target_port).app_protocol("tcp")
    }

    pub fn app_protocol(mut self, app_protocol: &str) -> PortSpec {
        self.app_protocol = Some(app_protocol.to_string());
        self
    }

    /// Backends behind this port speak plain TCP (a byte echo), not HTTP.
    fn is_tcp(&self) -> bool {
        self.name.starts_with("tcp") || self.app_protocol.as_deref() == Some("tcp")
    }

    /// echo-basic's h2c listener sits behind `appProtocol: kubernetes.io/h2c`.
    fn is_h2c(&self) -> bool {
        self.app_protocol.as_deref() == Some("kubernetes.io/h2c")
    }
}

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// The ClusterIP. Only ever written into authorities and config; never bound or dialed.
    pub vip: Ipv4Addr,
    pub ports: Vec<PortSpec>,
    pub selector: BTreeMap<String, String>,
}

impl ServiceSpec {
    /// A Service selecting `app=<name>`.
    pub fn new(namespace: &str, name: &str, vip: Ipv4Addr) -> ServiceSpec {
        ServiceSpec {
            namespace: namespace.to_string(),
            name: name.to_string(),
            vip,
            ports: Vec::new(),
            selector: BTreeMap::from([("app".to_string(), name.to_string())]),
        }
    }

    pub fn port(mut self, port: PortSpec) -> ServiceSpec {
        self.ports.push(port);
        self
    }

    pub fn selector(mut self, selector: &[(&str, &str)]) -> ServiceSpec {
        self.selector = labels(selector);
        self
    }

    fn selects(&self, pod: &PodSpec) -> bool {
        self.namespace == pod.namespace
            && !self.selector.is_empty()
            && self.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Captured by ztunnel: a destination ztunnel terminates HBONE on podIP:15008. Otherwise the waypoint
    /// must reach the pod with plain TCP.
    pub hbone: bool,
    pub echo: EchoFormat,
    /// Key type of the pod's certificate; the mesh default when `None`.
    pub key_kind: Option<KeyKind>,
}

impl PodSpec {
    /// An HBONE pod with JSON echo, service account `default`, labels given separately.
    pub fn new(namespace: &str, name: &str) -> PodSpec {
        PodSpec {
            namespace: namespace.to_string(),
            name: name.to_string(),
            labels: BTreeMap::new(),
            service_account: "default".into(),
            hbone: true,
            echo: EchoFormat::Json,
            key_kind: None,
        }
    }

    pub fn labels(mut self, labels_: &[(&str, &str)]) -> PodSpec {
        self.labels.extend(labels(labels_));
        self
    }

    pub fn service_account(mut self, service_account: &str) -> PodSpec {
        self.service_account = service_account.to_string();
        self
    }

    pub fn hbone(mut self, hbone: bool) -> PodSpec {
        self.hbone = hbone;
        self
    }

    pub fn echo(mut self, format: EchoFormat) -> PodSpec {
        self.echo = format;
        self
    }

    pub fn key_kind(mut self, kind: KeyKind) -> PodSpec {
        self.key_kind = Some(kind);
        self
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// How the waypoint runs.
#[derive(Debug, Clone)]
enum WaypointMode {
    InProcess,
    /// `<binary> waypoint run --config <file>`.
    /// The binary, and extra arguments after `waypoint run --config FILE`.
    ChildProcess(PathBuf, Vec<String>),
    /// Everything but the waypoint (to put another proxy, e.g. Envoy, in its place).
    External,
}

pub struct MeshBuilder {
    trust_domain: String,
    services: Vec<ServiceSpec>,
    pods: Vec<PodSpec>,
    waypoint_namespace: String,
    waypoint_service_account: String,
    key_kind: KeyKind,
    extra_config: Vec<String>,
    drain_timeout: String,
    security: Option<Value>,
    locality: Option<String>,
    held_back: Vec<String>,
    mode: WaypointMode,
}

impl MeshBuilder {
    pub fn trust_domain(mut self, trust_domain: &str) -> MeshBuilder {
        self.trust_domain = trust_domain.to_string();
        self
    }

    pub fn service(mut self, service: ServiceSpec) -> MeshBuilder {
        self.services.push(service);
        self
    }

    pub fn pod(mut self, pod: PodSpec) -> MeshBuilder {
        self.pods.push(pod);
        self
    }

    pub fn waypoint_identity(mut self, namespace: &str, service_account: &str) -> MeshBuilder {
        self.waypoint_namespace = namespace.to_string();
        self.waypoint_service_account = service_account.to_string();
        self
    }

    /// Key type of the waypoint's certificate and the default for pods and sources.
    pub fn key_kind(mut self, kind: KeyKind) -> MeshBuilder {
        self.key_kind = kind;
        self
    }

    /// YAML documents appended to the waypoint config file (routes, policies ...). May hold several
    /// documents separated by `---`.
    pub fn extra_config(mut self, yaml: &str) -> MeshBuilder {
        self.extra_config.push(yaml.to_string());
        self
    }

    /// `spec.security` of the WaypointConfig (e.g. `extensionProviders`), as JSON.
    pub fn security(mut self, security: Value) -> MeshBuilder {
        self.security = Some(security);
        self
    }

    /// `spec.locality` of the WaypointConfig (`region/zone/subzone`): where the waypoint runs, for locality
    /// load balancing. Pods carry theirs as `topology.kubernetes.io/region` / `zone` labels.
    pub fn waypoint_locality(mut self, locality: &str) -> MeshBuilder {
        self.locality = Some(locality.to_string());
        self
    }

    /// Start these pods but leave them out of the first config (endpoints that appear later, through
    /// [`Mesh::rewrite_config_without_pods`]).
    pub fn hold_back_pods(mut self, pods: &[&str]) -> MeshBuilder {
        self.held_back.extend(pods.iter().map(|p| p.to_string()));
        self
    }

    /// `spec.drainTimeout` of the WaypointConfig (default `10s`).
    pub fn drain_timeout(mut self, go_duration: &str) -> MeshBuilder {
        self.drain_timeout = go_duration.to_string();
        self
    }

    /// Runs the waypoint as `<binary> waypoint run --config <file>` instead of in this process
    /// (in tests: `env!("CARGO_BIN_EXE_waypoint-conformance")`).
    pub fn child_process(mut self, binary: impl Into<PathBuf>) -> MeshBuilder {
        self.mode = WaypointMode::ChildProcess(binary.into(), Vec::new());
        self
    }

    /// [`MeshBuilder::child_process`] with extra `waypoint run` arguments (e.g. `--work-stealing`).
    pub fn child_process_with_args(mut self, binary: impl Into<PathBuf>, args: &[&str]) -> MeshBuilder {
        self.mode = WaypointMode::ChildProcess(binary.into(), args.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Starts everything except the waypoint; the config file and certificates are still written, and
    /// the waypoint addresses are where it would listen.
    pub fn without_waypoint(mut self) -> MeshBuilder {
        self.mode = WaypointMode::External;
        self
    }

    pub async fn start(self) -> Result<Mesh, MeshError> {
        let ca = TestCa::try_new(&self.trust_domain)?;
        let dir = TempDir::new("waypoint-mesh").map_err(|source| MeshError::Io {
            what: "creating",
            path: std::env::temp_dir(),
            source,
        })?;
        let mut pods = Vec::with_capacity(self.pods.len());
        for spec in &self.pods {
            pods.push(self.start_pod(&ca, spec).await?);
        }
        let waypoint_ip = unique_loopback_ip_with_ports(&[READINESS_PORT, ADMIN_PORT]);
        let addrs = WaypointAddrs {
            hbone: SocketAddr::new(waypoint_ip.into(), HBONE_PORT),
            readiness: SocketAddr::new(waypoint_ip.into(), READINESS_PORT),
            admin: SocketAddr::new(waypoint_ip.into(), ADMIN_PORT),
        };
        let leaf = ca.issue(&self.waypoint_namespace, &self.waypoint_service_account, self.key_kind)?;
        leaf.write_to(dir.path(), "waypoint")?;
        ca.write_root(dir.path(), "root.pem")?;
        let (base_config, pod_documents) = self.render(&addrs, &pods)?;
        let held_back: Vec<&str> = self.held_back.iter().map(String::as_str).collect();
        let config_path = dir.path().join("waypoint.yaml");
        write_config(
            &config_path,
            &join_base(&base_config, &pod_documents, &held_back),
            &self.extra_config,
        )?;

        let mut mesh = Mesh {
            waypoint_identity: ca.spiffe_id(&self.waypoint_namespace, &self.waypoint_service_account),
            ca,
            key_kind: self.key_kind,
            services: self.services.clone(),
            pods,
            addrs,
            base_config,
            pod_documents,
            config_path,
            waypoint: Waypoint::External,
            dir,
        };
        mesh.waypoint = mesh.start_waypoint(&self.mode).await?;
        info!(waypoint = %mesh.addrs.hbone, config = %mesh.config_path.display(), "mesh started");
        Ok(mesh)
    }

    async fn start_pod(&self, ca: &TestCa, spec: &PodSpec) -> Result<RunningPod, MeshError> {
        let ip = unique_loopback_ip();
        let mut backends = Vec::new();
        for port in self.ports_of(spec) {
            let addr = SocketAddr::new(ip.into(), port.target_port);
            let backend = if port.is_tcp() {
                Backend::Tcp(TcpEcho::start(addr).await.map_err(|source| echo_error(spec, source))?)
            } else {
                let config = EchoConfig {
                    addr,
                    pod_name: spec.name.clone(),
                    namespace: spec.namespace.clone(),
                    service_version: spec.labels.get("version").cloned().unwrap_or_default(),
                    format: spec.echo,
                    h2c_only: port.is_h2c(),
                };
                Backend::Http(
                    EchoServer::start(config)
                        .await
                        .map_err(|source| echo_error(spec, source))?,
                )
            };
            backends.push((port.name.clone(), port.target_port, backend));
        }
        let ztunnel = if spec.hbone {
            let leaf = ca.issue(
                &spec.namespace,
                &spec.service_account,
                spec.key_kind.unwrap_or(self.key_kind),
            )?;
            let config = DestZtunnelConfig::new(ip, &self.trust_domain, leaf, ca.root_pem());
            let handle = DestZtunnel::start(config)
                .await
                .map_err(|source| MeshError::DestZtunnel {
                    pod: spec.name.clone(),
                    source,
                })?;
            Some(handle)
        } else {
            None
        };
        debug!(pod = %spec.name, %ip, hbone = spec.hbone, "pod started");
        Ok(RunningPod {
            spec: spec.clone(),
            ip,
            backends,
            ztunnel,
        })
    }

    /// The ports of every Service selecting `pod`, one per target port (the first Service port wins).
    fn ports_of(&self, pod: &PodSpec) -> Vec<PortSpec> {
        let mut ports: Vec<PortSpec> = Vec::new();
        for service in self.services.iter().filter(|s| s.selects(pod)) {
            for port in &service.ports {
                if !ports.iter().any(|p| p.target_port == port.target_port) {
                    ports.push(port.clone());
                }
            }
        }
        ports
    }

    /// The WaypointConfig and Service documents, and each pod's document by pod name (kept apart so a test
    /// can take pods out of the config, as endpoints leaving).
    fn render(&self, addrs: &WaypointAddrs, pods: &[RunningPod]) -> Result<(String, Vec<(String, String)>), MeshError> {
        let yaml = |document: &Value| -> Result<String, MeshError> {
            let text = serde_saphyr::to_string(document).map_err(|e| MeshError::Render(e.to_string()))?;
            Ok(format!("---\n{text}"))
        };
        let mut head = yaml(&self.waypoint_document(addrs))?;
        for service in &self.services {
            head.push_str(&yaml(&service_document(service))?);
        }
        let pods = pods
            .iter()
            .map(|pod| {
                Ok((
                    pod.spec.name.clone(),
                    yaml(&pod_document(pod, &self.ports_of(&pod.spec)))?,
                ))
            })
            .collect::<Result<_, MeshError>>()?;
        Ok((head, pods))
    }

    fn waypoint_document(&self, addrs: &WaypointAddrs) -> Value {
        let mut doc = json!({
            "apiVersion": "waypoint.istio.io/v1alpha1",
            "kind": "WaypointConfig",
            "metadata": {"name": "waypoint", "namespace": self.waypoint_namespace},
            "spec": {
                "trustDomain": self.trust_domain,
                "listeners": {
                    "hbone": addrs.hbone.to_string(),
                    "readiness": addrs.readiness.to_string(),
                    "admin": addrs.admin.to_string(),
                },
                "tls": {"certFile": "waypoint.pem", "keyFile": "waypoint-key.pem", "rootsFile": "root.pem"},
                "destinationHbonePort": HBONE_PORT,
                "drainTimeout": self.drain_timeout,
            },
        });
        if let Some(security) = &self.security {
            doc["spec"]["security"] = security.clone();
        }
        if let Some(locality) = &self.locality {
            doc["spec"]["locality"] = json!(locality);
        }
        doc
    }
}

fn echo_error(spec: &PodSpec, source: EchoError) -> MeshError {
    MeshError::Echo {
        pod: spec.name.clone(),
        source,
    }
}

fn service_document(service: &ServiceSpec) -> Value {
    let ports: Vec<Value> = service
        .ports
        .iter()
        .map(|port| {
            let mut value = json!({"name": port.name, "port": port.port, "targetPort": port.target_port});
            if let Some(app_protocol) = &port.app_protocol {
                value["appProtocol"] = json!(app_protocol);
            }
            value
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service.name, "namespace": service.namespace},
        "spec": {"clusterIP": service.vip.to_string(), "selector": service.selector, "ports": ports},
    })
}

fn pod_document(pod: &RunningPod, ports: &[PortSpec]) -> Value {
    let spec = &pod.spec;
    let mut metadata = json!({"name": spec.name, "namespace": spec.namespace, "labels": spec.labels});
    if spec.hbone {
        metadata["annotations"] = json!({"ambient.istio.io/redirection": "enabled"});
    }
    let container_ports: Vec<Value> = ports
        .iter()
        .map(|port| json!({"name": port.name, "containerPort": port.target_port}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "serviceAccountName": spec.service_account,
            "containers": [{"name": "echo", "ports": container_ports}],
        },
        "status": {"podIP": pod.ip.to_string(), "phase": "Running"},
    })
}

/// The base documents without the pods named in `removed`.
fn join_base(head: &str, pods: &[(String, String)], removed: &[&str]) -> String {
    let mut out = head.to_string();
    for (name, document) in pods {
        if !removed.contains(&name.as_str()) {
            out.push_str(document);
        }
    }
    out
}

/// The base documents followed by the caller's extra ones, replaced atomically (write + rename) so that a
/// watching waypoint never reads half a file.
fn write_config(path: &Path, base: &str, extra: &[String]) -> Result<(), MeshError> {
    let mut contents = base.to_string();
    for document in extra {
        if !document.trim_start().starts_with("---") {
            contents.push_str("---\n");
        }
        contents.push_str(document);
        if !document.ends_with('\n') {
            contents.push('\n');
        }
    }
    let tmp = path.with_extension(format!("yaml.tmp{}", fastrand::u32(..)));
    std::fs::write(&tmp, contents).map_err(|source| MeshError::Io {
        what: "writing",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| MeshError::Io {
        what: "renaming",
        path: path.to_path_buf(),
        source,
    })
}

impl Mesh {
    pub fn builder() -> MeshBuilder {
        MeshBuilder {
            trust_domain: "cluster.local".into(),
            services: Vec::new(),
            pods: Vec::new(),
            waypoint_namespace: "default".into(),
            waypoint_service_account: "waypoint".into(),
            key_kind: KeyKind::EcdsaP256,
            extra_config: Vec::new(),
            drain_timeout: "10s".into(),
            security: None,
            locality: None,
            held_back: Vec::new(),
            mode: WaypointMode::InProcess,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct WaypointAddrs {
    hbone: SocketAddr,
    readiness: SocketAddr,
    admin: SocketAddr,
}

enum Backend {
    Http(EchoHandle),
    Tcp(TcpEchoHandle),
}

struct RunningPod {
    spec: PodSpec,
    ip: Ipv4Addr,
    /// (service port name, target port, server)
    backends: Vec<(String, u16, Backend)>,
    ztunnel: Option<DestZtunnelHandle>,
}

enum Waypoint {
    InProcess(waypoint::App),
    Child { child: Child, log: PathBuf },
    External,
    Stopped,
}

/// A running mesh. Dropping it stops the waypoint (killing a child process), every pod, and removes the
/// temporary directory.
pub struct Mesh {
    ca: TestCa,
    key_kind: KeyKind,
    services: Vec<ServiceSpec>,
    pods: Vec<RunningPod>,
    addrs: WaypointAddrs,
    waypoint_identity: String,
    /// WaypointConfig and Services.
    base_config: String,
    /// (pod name, its document).
    pod_documents: Vec<(String, String)>,
    config_path: PathBuf,
    waypoint: Waypoint,
    // Last: removed after the waypoint stopped using the files.
    dir: TempDir,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("waypoint", &self.addrs.hbone)
            .field("config", &self.config_path)
            .field(
                "pods",
                &self.pods.iter().map(|p| (&p.spec.name, p.ip)).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Mesh {
    async fn start_waypoint(&self, mode: &WaypointMode) -> Result<Waypoint, MeshError> {
        let waypoint = match mode {
            WaypointMode::External => return Ok(Waypoint::External),
            WaypointMode::InProcess => Waypoint::InProcess(waypoint::App::start(self.config_path.clone()).await?),
            WaypointMode::ChildProcess(binary, args) => self.spawn_child(binary, args)?,
        };
        let mut waypoint = waypoint;
        let readiness = match &waypoint {
            Waypoint::InProcess(app) => app.readiness_addr,
            _ => self.addrs.readiness,
        };
        wait_ready(readiness, &mut waypoint).await?;
        Ok(waypoint)
    }

    fn spawn_child(&self, binary: &Path, args: &[String]) -> Result<Waypoint, MeshError> {
        let log = self.dir.path().join("waypoint.log");
        let open = |what| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|source| MeshError::Io {
                    what,
                    path: log.clone(),
                    source,
                })
        };
        let (stdout, stderr) = (open("creating")?, open("opening")?);
        let child = Command::new(binary)
            .arg("waypoint")
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| MeshError::Io {
                what: "spawning",
                path: binary.to_path_buf(),
                source,
            })?;
        info!(pid = child.id(), "waypoint child process started");
        Ok(Waypoint::Child { child, log })
    }

    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// The waypoint's HBONE listener (`ip:15008`).
    pub fn waypoint_addr(&self) -> SocketAddr {
        match &self.waypoint {
            Waypoint::InProcess(app) => app.hbone_addr,
            _ => self.addrs.hbone,
        }
    }

    pub fn readiness_addr(&self) -> SocketAddr {
        match &self.waypoint {
            Waypoint::InProcess(app) => app.readiness_addr,
            _ => self.addrs.readiness,
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        match &self.waypoint {
            Waypoint::InProcess(app) => app.admin_addr,
            _ => self.addrs.admin,
        }
    }

    /// The SPIFFE ID in the waypoint's certificate.
    pub fn waypoint_identity(&self) -> &str {
        &self.waypoint_identity
    }

    /// The directory holding the config file, the PEM files and (child mode) `waypoint.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The in-process waypoint, when it runs in this process.
    pub fn app(&self) -> Option<&waypoint::App> {
        match &self.waypoint {
            Waypoint::InProcess(app) => Some(app),
            _ => None,
        }
    }

    pub fn child_pid(&self) -> Option<u32> {
        match &self.waypoint {
            Waypoint::Child { child, .. } => Some(child.id()),
            _ => None,
        }
    }

    /// Re-renders the config file with `extra` documents in place of the builder's (hot-reload tests).
    pub fn rewrite_config(&self, extra: &[&str]) -> Result<(), MeshError> {
        self.rewrite_config_without_pods(&[], extra)
    }

    /// Like [`Mesh::rewrite_config`], and the pods named in `removed` leave the config (their endpoints go
    /// away, as when pods are deleted; their servers keep running).
    pub fn rewrite_config_without_pods(&self, removed: &[&str], extra: &[&str]) -> Result<(), MeshError> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let base = join_base(&self.base_config, &self.pod_documents, removed);
        write_config(&self.config_path, &base, &extra)
    }

    /// A source ztunnel for a client workload `namespace`/`service_account`, dialing the waypoint from its
    /// own loopback address (the client pod IP).
    pub fn source(&self, namespace: &str, service_account: &str) -> Result<SourceZtunnel, MeshError> {
        self.source_with_key(namespace, service_account, self.key_kind)
    }

    pub fn source_with_key(
        &self,
        namespace: &str,
        service_account: &str,
        kind: KeyKind,
    ) -> Result<SourceZtunnel, MeshError> {
        let leaf = self.ca.issue(namespace, service_account, kind)?;
        let mut config = SourceZtunnelConfig::new(
            self.waypoint_addr(),
            self.waypoint_identity.clone(),
            leaf,
            self.ca.root_pem(),
        );
        config.source_workload = (namespace.to_string(), service_account.to_string());
        config.local_ip = Some(IpAddr::V4(unique_loopback_ip()));
        Ok(SourceZtunnel::new(config)?)
    }

    /// `vip:port` of a Service, the authority a source ztunnel sends to the waypoint.
    #[track_caller]
    pub fn authority(&self, namespace: &str, service: &str, port: u16) -> String {
        format!("{}:{port}", self.service_vip(namespace, service))
    }

    #[track_caller]
    pub fn service_vip(&self, namespace: &str, service: &str) -> Ipv4Addr {
        match self
            .services
            .iter()
            .find(|s| s.namespace == namespace && s.name == service)
        {
            Some(service) => service.vip,
            None => panic!("no service {namespace}/{service} in this mesh"),
        }
    }

    #[track_caller]
    fn pod(&self, name: &str) -> &RunningPod {
        match self.pods.iter().find(|p| p.spec.name == name) {
            Some(pod) => pod,
            None => panic!("no pod {name} in this mesh"),
        }
    }

    #[track_caller]
    pub fn pod_ip(&self, name: &str) -> Ipv4Addr {
        self.pod(name).ip
    }

    /// The pod's first HTTP echo server.
    #[track_caller]
    pub fn echo(&self, pod: &str) -> &EchoHandle {
        let found = self.pod(pod).backends.iter().find_map(|(_, _, backend)| match backend {
            Backend::Http(echo) => Some(echo),
            Backend::Tcp(_) => None,
        });
        match found {
            Some(echo) => echo,
            None => panic!("pod {pod} has no HTTP echo (no Service port selects it)"),
        }
    }

    /// The pod's HTTP echo server on `target_port`.
    pub fn echo_on(&self, pod: &str, target_port: u16) -> Option<&EchoHandle> {
        self.pod(pod)
            .backends
            .iter()
            .find_map(|(_, port, backend)| match backend {
                Backend::Http(echo) if *port == target_port => Some(echo),
                _ => None,
            })
    }

    /// The pod's TCP echo server on `target_port`.
    pub fn tcp_echo(&self, pod: &str, target_port: u16) -> Option<&TcpEchoHandle> {
        self.pod(pod)
            .backends
            .iter()
            .find_map(|(_, port, backend)| match backend {
                Backend::Tcp(echo) if *port == target_port => Some(echo),
                _ => None,
            })
    }

    #[track_caller]
    pub fn dest_ztunnel(&self, pod: &str) -> &DestZtunnelHandle {
        match &self.pod(pod).ztunnel {
            Some(ztunnel) => ztunnel,
            None => panic!("pod {pod} does not speak HBONE"),
        }
    }

    /// Starts a graceful drain (what SIGTERM does) without waiting for it.
    pub fn drain(&self) {
        match &self.waypoint {
            Waypoint::InProcess(app) => app.drain(),
            Waypoint::Child { child, .. } => sigterm(child.id()),
            Waypoint::External | Waypoint::Stopped => {}
        }
    }

    /// Drains the waypoint and waits until it stopped; true when it finished cleanly (in-flight work done
    /// within the drain timeout, or the child exited with success).
    pub async fn shutdown(mut self) -> bool {
        match std::mem::replace(&mut self.waypoint, Waypoint::Stopped) {
            Waypoint::InProcess(app) => {
                app.drain();
                app.wait().await
            }
            Waypoint::Child { mut child, .. } => {
                sigterm(child.id());
                let status = tokio::task::spawn_blocking(move || child.wait()).await;
                matches!(status, Ok(Ok(status)) if status.success())
            }
            Waypoint::External | Waypoint::Stopped => true,
        }
    }

    /// The child waypoint's output so far (empty in the other modes).
    pub fn waypoint_log(&self) -> String {
        match &self.waypoint {
            Waypoint::Child { log, .. } => std::fs::read_to_string(log).unwrap_or_default(),
            _ => String::new(),
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Waypoint::Child { child, log } = &mut self.waypoint {
            if std::thread::panicking() {
                eprintln!("--- waypoint log ({}) ---\n{}", log.display(), tail(log));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sigterm(pid: u32) {
    // No libc binding (unsafe code is denied in the workspace): the `kill` utility does the same.
    match Command::new("kill").arg("-TERM").arg(pid.to_string()).status() {
        Ok(status) if status.success() => {}
        other => warn!(pid, "sending SIGTERM failed: {other:?}"),
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(100)..].join("\n")
}

/// Polls `GET /healthz/ready` until it answers 200, the child exits, or 30 s pass.
async fn wait_ready(addr: SocketAddr, waypoint: &mut Waypoint) -> Result<(), MeshError> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Waypoint::Child { child, log } = waypoint
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(MeshError::ChildExited { status, log: tail(log) });
        }
        if probe_ready(addr).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let log = match waypoint {
                Waypoint::Child { log, .. } => tail(log),
                _ => String::new(),
            };
            return Err(MeshError::NotReady {
                addr,
                timeout: READY_TIMEOUT,
                log,
            });
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

async fn probe_ready(addr: SocketAddr) -> bool {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.ok()?;
        tokio::spawn(conn);
        let request = http::Request::get("/healthz/ready")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = send.send_request(request).await.ok()?;
        Some(response.status() == http::StatusCode::OK)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn builder() -> MeshBuilder {
        Mesh::builder()
            .service(
                ServiceSpec::new("ns1", "echo", Ipv4Addr::new(10, 96, 0, 10))
                    .port(PortSpec::http(80, 8080))
                    .port(PortSpec::tcp(9000, 9000))
                    .port(PortSpec::new("grpc", 81, 3001).app_protocol("kubernetes.io/h2c")),
            )
            .pod(
                PodSpec::new("ns1", "echo-v1-abc")
                    .labels(&[("app", "echo"), ("version", "v1")])
                    .service_account("echo"),
            )
            .pod(
                PodSpec::new("ns1", "echo-v2-def")
                    .labels(&[("app", "echo"), ("version", "true")])
                    .hbone(false)
                    .echo(EchoFormat::Text),
            )
            .pod(PodSpec::new("ns2", "lonely").labels(&[("app", "echo")]))
            .extra_config("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra}\n")
    }

    #[tokio::test]
    async fn backends_and_config_file_without_a_waypoint() {
        let mesh = builder().without_waypoint().start().await.unwrap();
        let v1 = mesh.pod_ip("echo-v1-abc");
        let v2 = mesh.pod_ip("echo-v2-def");
        assert_ne!(v1, v2);
        assert_eq!(mesh.echo("echo-v1-abc").addr(), SocketAddr::new(v1.into(), 8080));
        assert!(mesh.echo_on("echo-v1-abc", 3001).unwrap().config().h2c_only);
        assert!(mesh.tcp_echo("echo-v2-def", 9000).is_some());
        assert_eq!(
            mesh.dest_ztunnel("echo-v1-abc").addr(),
            SocketAddr::new(v1.into(), 15008)
        );
        assert_eq!(mesh.authority("ns1", "echo", 80), "10.96.0.10:80");
        assert_eq!(
            mesh.waypoint_identity(),
            "spiffe://cluster.local/ns/default/sa/waypoint"
        );
        assert_eq!(mesh.waypoint_addr().port(), 15008);

        let text = std::fs::read_to_string(mesh.config_path()).unwrap();
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        assert_eq!(documents.len(), 6, "{text}");
        let waypoint = &documents[0];
        assert_eq!(waypoint["kind"], "WaypointConfig");
        assert_eq!(waypoint["spec"]["listeners"]["hbone"], mesh.waypoint_addr().to_string());
        assert_eq!(waypoint["spec"]["tls"]["certFile"], "waypoint.pem");
        assert!(mesh.dir().join("waypoint.pem").exists() && mesh.dir().join("root.pem").exists());
        let service = &documents[1];
        assert_eq!(service["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(service["spec"]["ports"][0]["targetPort"], 8080);
        let v2_doc = &documents[3];
        assert_eq!(v2_doc["metadata"]["labels"]["version"], "true", "{text}");
        assert!(v2_doc["metadata"].get("annotations").is_none());
        assert_eq!(v2_doc["status"]["podIP"], v2.to_string());
        assert_eq!(
            documents[2]["metadata"]["annotations"]["ambient.istio.io/redirection"],
            "enabled"
        );
        assert_eq!(
            documents[2]["spec"]["containers"][0]["ports"].as_array().unwrap().len(),
            3
        );
        // A pod in another namespace is not selected and has no backends.
        assert!(
            documents[4]["spec"]["containers"][0]["ports"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert_eq!(documents[5]["kind"], "ConfigMap");

        mesh.rewrite_config(&["apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}"])
            .unwrap();
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(&std::fs::read_to_string(mesh.config_path()).unwrap()).unwrap();
        assert_eq!(documents[5]["metadata"]["name"], "other");

        let dir = mesh.dir().to_path_buf();
        drop(mesh);
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn pods_answer_through_their_dest_ztunnel() {
        let mesh = builder().without_waypoint().start().await.unwrap();
        let v1 = mesh.pod_ip("echo-v1-abc");
        // Stand in for the waypoint: a client holding the waypoint's identity dials the pod's ztunnel.
        let leaf = mesh.ca().issue("default", "waypoint", KeyKind::EcdsaP256).unwrap();
        let config = SourceZtunnelConfig::new(
            mesh.dest_ztunnel("echo-v1-abc").addr(),
            mesh.ca().spiffe_id("ns1", "echo"),
            leaf,
            mesh.ca().root_pem(),
        );
        let source = SourceZtunnel::new(config).unwrap();
        let mut tunnel = source.connect(&format!("{v1}:9000")).await.unwrap();
        tunnel.write_all(b"abc").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut out = String::new();
        tunnel.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "abcbytes=3\n");
        let record = &mesh.dest_ztunnel("echo-v1-abc").connects()[0];
        assert_eq!(record.peer_identity.as_deref(), Some(mesh.waypoint_identity()));
    }
}
