//! The environment a run shares across tests: a PKI, the waypoint (in process, on its own loopback IP), the
//! pods of every Deployment a test needed so far (started on first use and kept running), stable Service and
//! Gateway addresses, and the source ztunnels requests leave from.
//!
//! Per test, the waypoint config file is rewritten with that test's objects (base manifests + its own) and
//! the runner waits until the waypoint applied it: that is what Kubernetes' "Accepted/Programmed" becomes here.

use crate::tempdir::TempDir;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{debug, info};

use super::manifests::Object;
use super::workload::{self, DeploymentPlan, PodFields, ServerKind};
use super::world::{GatewayInfo, PodInfo, ServiceInfo, TestWorld};
use crate::dest_ztunnel::{DestZtunnel, DestZtunnelConfig, DestZtunnelHandle};
use crate::echo::{EchoConfig, EchoFormat, EchoHandle, EchoServer, TcpEcho, TcpEchoHandle};
use crate::net::{unique_loopback_ip, unique_loopback_ip_with_ports};
use crate::pki::{KeyKind, PkiError, TestCa};
use crate::source_ztunnel::{SourceZtunnel, SourceZtunnelConfig};

const TRUST_DOMAIN: &str = "cluster.local";
const HBONE_PORT: u16 = 15008;
const READINESS_PORT: u16 = 15021;
const ADMIN_PORT: u16 = 15000;
const WAYPOINT_NAMESPACE: &str = "default";
const WAYPOINT_SERVICE_ACCOUNT: &str = "waypoint";
/// The identity requests through a Gateway come from (any would do: a Gateway client is not a mesh workload).
const GATEWAY_CLIENT: (&str, &str) = ("gateway-conformance-client", "default");
/// How long a config rewrite may take to be picked up (the watch polls every `WATCH_INTERVAL`).
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
const WATCH_INTERVAL: &str = "50ms";

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rendering the waypoint config: {0}")]
    Render(String),
    #[error("starting the waypoint: {0}")]
    Start(#[from] waypoint::StartError),
    #[error("Deployment {namespace}/{name}: {reason}")]
    Deployment {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("pod {pod}: {reason}")]
    Pod { pod: String, reason: String },
    #[error("the waypoint rejected the config: {0}")]
    Rejected(String),
    #[error("the waypoint did not apply the rewritten config within {0:?}")]
    ApplyTimeout(Duration),
}

enum Server {
    Http(EchoHandle),
    /// Kept only to keep the listener open.
    Tcp {
        _handle: TcpEchoHandle,
    },
}

struct RunningPod {
    info: PodInfo,
    containers: Value,
    servers: Vec<Server>,
    _ztunnel: DestZtunnelHandle,
}

struct RunningDeployment {
    fingerprint: String,
    pods: Vec<RunningPod>,
}

pub struct Environment {
    ca: TestCa,
    dir: TempDir,
    config_path: PathBuf,
    waypoint_document: Value,
    waypoint_identity: String,
    app: waypoint::App,
    deployments: BTreeMap<(String, String), RunningDeployment>,
    service_vips: HashMap<(String, String), Ipv4Addr>,
    gateway_vips: HashMap<(String, String), Ipv4Addr>,
    /// Source ztunnels by client (pod name, or the Gateway client): their HBONE connection pools are reused.
    sources: Mutex<HashMap<String, SourceZtunnel>>,
    applies: u64,
}

impl Environment {
    pub async fn start() -> Result<Environment, EnvError> {
        let ca = TestCa::try_new(TRUST_DOMAIN)?;
        let dir = TempDir::new("waypoint-conformance").map_err(|source| EnvError::Io {
            what: "creating",
            path: std::env::temp_dir(),
            source,
        })?;
        let ip = unique_loopback_ip_with_ports(&[READINESS_PORT, ADMIN_PORT]);
        let leaf = ca.issue(WAYPOINT_NAMESPACE, WAYPOINT_SERVICE_ACCOUNT, KeyKind::EcdsaP256)?;
        leaf.write_to(dir.path(), "waypoint")?;
        ca.write_root(dir.path(), "root.pem")?;
        let waypoint_document = json!({
            "apiVersion": "waypoint.istio.io/v1alpha1",
            "kind": "WaypointConfig",
            "metadata": {"name": WAYPOINT_SERVICE_ACCOUNT, "namespace": WAYPOINT_NAMESPACE},
            "spec": {
                "trustDomain": TRUST_DOMAIN,
                "listeners": {
                    "hbone": SocketAddr::new(ip.into(), HBONE_PORT).to_string(),
                    "readiness": SocketAddr::new(ip.into(), READINESS_PORT).to_string(),
                    "admin": SocketAddr::new(ip.into(), ADMIN_PORT).to_string(),
                },
                "tls": {"certFile": "waypoint.pem", "keyFile": "waypoint-key.pem", "rootsFile": "root.pem"},
                "destinationHbonePort": HBONE_PORT,
                "drainTimeout": "1s",
                "watchInterval": WATCH_INTERVAL,
            },
        });
        let config_path = dir.path().join("waypoint.yaml");
        write_atomically(
            &config_path,
            &render("initial config", std::slice::from_ref(&waypoint_document))?,
        )?;
        let app = waypoint::App::start(config_path.clone()).await?;
        info!(hbone = %app.hbone_addr, config = %config_path.display(), "conformance environment started");
        Ok(Environment {
            waypoint_identity: ca.spiffe_id(WAYPOINT_NAMESPACE, WAYPOINT_SERVICE_ACCOUNT),
            ca,
            dir,
            config_path,
            waypoint_document,
            app,
            deployments: BTreeMap::new(),
            service_vips: HashMap::new(),
            gateway_vips: HashMap::new(),
            sources: Mutex::new(HashMap::new()),
            applies: 0,
        })
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn waypoint(&self) -> &waypoint::App {
        &self.app
    }

    /// Starts what `objects` need, hands them to the waypoint and waits until it applied them.
    pub async fn prepare(&mut self, label: &str, objects: &[Object]) -> Result<TestWorld, EnvError> {
        let mut plans = Vec::new();
        for object in objects.iter().filter(|o| o.is("apps", "Deployment")) {
            let plan = workload::plan(object).map_err(|reason| EnvError::Deployment {
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                reason,
            })?;
            self.ensure_running(&plan).await?;
            plans.push(plan);
        }

        let mut world = TestWorld::default();
        let mut documents = vec![self.waypoint_document.clone()];
        for object in objects {
            let mut object = object.clone();
            if object.is("apps", "Deployment") || object.is("", "ConfigMap") || object.is("", "Secret") {
                continue;
            }
            if object.is("", "Namespace") {
                world.namespaces.insert(object.name.clone(), object.labels());
            } else if object.is("", "Service") {
                let headless = object
                    .value
                    .pointer("/spec/clusterIP")
                    .and_then(Value::as_str)
                    .is_some_and(|ip| ip.eq_ignore_ascii_case("none"));
                let vip = (!headless).then(|| self.service_vip(&object.namespace, &object.name));
                if let (Some(vip), Some(spec)) = (vip, object.value.get_mut("spec").and_then(Value::as_object_mut)) {
                    spec.insert("clusterIP".into(), json!(vip.to_string()));
                }
                world.services.push(ServiceInfo::from_object(&object, vip));
            } else if object.is("gateway.networking.k8s.io", "Gateway") {
                let vip = self.gateway_vip(&object.namespace, &object.name);
                if let Some(spec) = object.value.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.insert(
                        "addresses".into(),
                        json!([{"type": "IPAddress", "value": vip.to_string()}]),
                    );
                }
                world.gateways.push(GatewayInfo::from_object(&object, vip));
            }
            documents.push(object.value.clone());
            world.objects.push(object);
        }
        for plan in &plans {
            let key = (plan.namespace.clone(), plan.name.clone());
            for pod in self
                .deployments
                .get(&key)
                .map(|d| d.pods.as_slice())
                .unwrap_or_default()
            {
                documents.push(pod_document(pod));
                world.pods.push(pod.info.clone());
            }
        }
        world.pods.sort_by(|a, b| a.name.cmp(&b.name));

        self.applies += 1;
        let text = render(&format!("{label} (apply #{})", self.applies), &documents)?;
        self.apply(&text).await?;
        world.skipped = self.app.config().load().skipped.clone();
        Ok(world)
    }

    /// Writes the config and waits for the waypoint's verdict on it.
    async fn apply(&self, text: &str) -> Result<(), EnvError> {
        let store = self.app.config();
        let mut changes = store.subscribe();
        let (generation, rejected) = *changes.borrow_and_update();
        write_atomically(&self.config_path, text)?;
        let verdict = async {
            loop {
                if changes.changed().await.is_err() {
                    return Err(EnvError::Rejected("the waypoint's config store went away".into()));
                }
                let (g, r) = *changes.borrow_and_update();
                if r > rejected {
                    return Err(EnvError::Rejected(store.last_error().unwrap_or_default()));
                }
                if g > generation {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(APPLY_TIMEOUT, verdict)
            .await
            .map_err(|_| EnvError::ApplyTimeout(APPLY_TIMEOUT))?
    }

    async fn ensure_running(&mut self, plan: &DeploymentPlan) -> Result<(), EnvError> {
        let key = (plan.namespace.clone(), plan.name.clone());
        if self
            .deployments
            .get(&key)
            .is_some_and(|d| d.fingerprint == plan.fingerprint)
        {
            return Ok(());
        }
        // A changed Deployment replaces its pods, as a rollout would.
        if let Some(old) = self.deployments.remove(&key) {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            for pod in &old.pods {
                sources.remove(&pod.info.name);
            }
        }
        let mut pods = Vec::new();
        for _ in 0..plan.replicas {
            pods.push(self.start_pod(plan).await?);
        }
        debug!(deployment = %format!("{}/{}", plan.namespace, plan.name), pods = pods.len(), "deployment started");
        self.deployments.insert(
            key,
            RunningDeployment {
                fingerprint: plan.fingerprint.clone(),
                pods,
            },
        );
        Ok(())
    }

    async fn start_pod(&self, plan: &DeploymentPlan) -> Result<RunningPod, EnvError> {
        let name = workload::pod_name(&plan.name);
        let ip = unique_loopback_ip();
        let ip_text = ip.to_string();
        let pod_error = |reason: String| EnvError::Pod {
            pod: name.clone(),
            reason,
        };
        let fields = PodFields {
            name: &name,
            namespace: &plan.namespace,
            ip: &ip_text,
            service_account: &plan.service_account,
        };
        let mut servers = Vec::new();
        let mut bound: Vec<u16> = Vec::new();
        for image in &plan.images {
            for server in &image.servers {
                if bound.contains(&server.port) {
                    continue;
                }
                bound.push(server.port);
                let addr = SocketAddr::new(ip.into(), server.port);
                let started = match server.kind {
                    ServerKind::Tcp => TcpEcho::start(addr).await.map(|h| Server::Tcp { _handle: h }),
                    ServerKind::Http { format, h2c_only } => {
                        let mut config = EchoConfig::new(addr);
                        config.format = format;
                        config.h2c_only = h2c_only;
                        config.service_version = plan.labels.get("version").cloned().unwrap_or_default();
                        match format {
                            // echo-basic reports what its env says (POD_NAME / NAMESPACE via the downward API).
                            EchoFormat::Json => {
                                config.pod_name = image.env_for("POD_NAME", &fields);
                                config.namespace = image.env_for("NAMESPACE", &fields);
                            }
                            // The Istio echo reports its hostname, which is the pod name.
                            EchoFormat::Text => {
                                config.pod_name = name.clone();
                                config.namespace = plan.namespace.clone();
                            }
                        }
                        EchoServer::start(config).await.map(Server::Http)
                    }
                };
                servers.push(started.map_err(|e| pod_error(e.to_string()))?);
            }
        }
        let leaf = self
            .ca
            .issue(&plan.namespace, &plan.service_account, KeyKind::EcdsaP256)?;
        let ztunnel = DestZtunnel::start(DestZtunnelConfig::new(ip, TRUST_DOMAIN, leaf, self.ca.root_pem()))
            .await
            .map_err(|e| pod_error(e.to_string()))?;
        Ok(RunningPod {
            info: PodInfo {
                name: name.clone(),
                namespace: plan.namespace.clone(),
                deployment: plan.name.clone(),
                labels: plan.labels.clone(),
                service_account: plan.service_account.clone(),
                ip,
            },
            containers: plan.containers.clone(),
            servers,
            _ztunnel: ztunnel,
        })
    }

    fn service_vip(&mut self, namespace: &str, name: &str) -> Ipv4Addr {
        allocate(&mut self.service_vips, [10, 96], namespace, name)
    }

    fn gateway_vip(&mut self, namespace: &str, name: &str) -> Ipv4Addr {
        allocate(&mut self.gateway_vips, [10, 200], namespace, name)
    }

    /// The source ztunnel of the Gateway client.
    pub fn gateway_source(&self) -> Result<SourceZtunnel, String> {
        self.source_for(
            "\0gateway-client",
            GATEWAY_CLIENT.0,
            GATEWAY_CLIENT.1,
            "gateway-client",
            None,
        )
    }

    /// The source ztunnel of a mesh pod: its identity, leaving from its IP.
    pub fn pod_source(&self, pod: &PodInfo) -> Result<SourceZtunnel, String> {
        self.source_for(
            &pod.name,
            &pod.namespace,
            &pod.service_account,
            &pod.name,
            Some(IpAddr::V4(pod.ip)),
        )
    }

    fn source_for(
        &self,
        key: &str,
        namespace: &str,
        service_account: &str,
        workload: &str,
        local_ip: Option<IpAddr>,
    ) -> Result<SourceZtunnel, String> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = sources.get(key) {
            return Ok(source.clone());
        }
        let leaf = self
            .ca
            .issue(namespace, service_account, KeyKind::EcdsaP256)
            .map_err(|e| e.to_string())?;
        let mut config = SourceZtunnelConfig::new(
            self.app.hbone_addr,
            self.waypoint_identity.clone(),
            leaf,
            self.ca.root_pem(),
        );
        config.source_workload = (namespace.to_string(), workload.to_string());
        config.local_ip = Some(local_ip.unwrap_or_else(|| IpAddr::V4(unique_loopback_ip())));
        let source = SourceZtunnel::new(config).map_err(|e| e.to_string())?;
        sources.insert(key.to_string(), source.clone());
        Ok(source)
    }

    /// Every `Echoing back …` line the pod's HTTP echo servers logged so far.
    pub fn log_lines(&self, pod_name: &str) -> Vec<String> {
        self.deployments
            .values()
            .flat_map(|d| d.pods.iter())
            .filter(|p| p.info.name == pod_name)
            .flat_map(|p| p.servers.iter())
            .filter_map(|s| match s {
                Server::Http(echo) => Some(echo.log_lines()),
                Server::Tcp { .. } => None,
            })
            .flatten()
            .collect()
    }

    /// Drains the waypoint and stops every pod.
    pub async fn shutdown(self) {
        self.app.drain();
        self.app.wait().await;
        drop(self.deployments);
        drop(self.dir);
    }
}

/// The next free address in `<prefix>.0.0/16` for (namespace, name), stable for the run.
fn allocate(table: &mut HashMap<(String, String), Ipv4Addr>, prefix: [u8; 2], namespace: &str, name: &str) -> Ipv4Addr {
    let next = table.len() as u32 + 10;
    *table
        .entry((namespace.to_string(), name.to_string()))
        .or_insert_with(|| Ipv4Addr::new(prefix[0], prefix[1], (next >> 8) as u8, (next & 0xff) as u8))
}

fn pod_document(pod: &RunningPod) -> Value {
    let info = &pod.info;
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": info.name,
            "namespace": info.namespace,
            "labels": info.labels,
            "annotations": {"ambient.istio.io/redirection": "enabled"},
        },
        "spec": {
            "serviceAccountName": info.service_account,
            "containers": pod.containers,
        },
        "status": {"podIP": info.ip.to_string(), "phase": "Running"},
    })
}

/// Multi-document YAML. The leading comment makes every apply a content change, so the waypoint's watcher
/// (which compares contents) reloads even when two tests use identical objects.
pub fn render(label: &str, documents: &[Value]) -> Result<String, EnvError> {
    let mut out = format!("# waypoint-conformance: {}\n", label.replace('\n', " "));
    for document in documents {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(document).map_err(|e| EnvError::Render(e.to_string()))?);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Write + rename, so the watching waypoint never reads half a file.
fn write_atomically(path: &Path, contents: &str) -> Result<(), EnvError> {
    let tmp = path.with_extension(format!("yaml.tmp{}", fastrand::u32(..)));
    std::fs::write(&tmp, contents).map_err(|source| EnvError::Io {
        what: "writing",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| EnvError::Io {
        what: "renaming",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rendered_documents_read_back_identically() {
        let doc = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "tricky", "namespace": "ns"},
            "data": {
                "yes": "yes", "number": "3600", "float": "1.0", "null": "null", "star": "*",
                "braces": "{GATEWAY}", "colon": "a: b", "dash": "- a", "hash": "#c", "empty": "",
                "multi": "line one\nline two\n", "jwks": "{\"keys\":[{\"kty\":\"RSA\"}]}",
            },
            "list": [1, true, null, 2.5],
        });
        let text = render("label\nwith newline", &[doc.clone(), doc.clone()]).unwrap();
        assert!(text.starts_with("# waypoint-conformance: label with newline\n---\n"));
        let back: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        assert_eq!(back, vec![doc.clone(), doc]);
    }

    #[test]
    fn addresses_are_stable_per_object() {
        let mut table = HashMap::new();
        let a = allocate(&mut table, [10, 96], "ns", "a");
        let b = allocate(&mut table, [10, 96], "ns", "b");
        assert_eq!(a, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(b, Ipv4Addr::new(10, 96, 0, 11));
        assert_eq!(allocate(&mut table, [10, 96], "ns", "a"), a);
        assert_eq!(
            allocate(&mut table, [10, 200], "other", "a"),
            Ipv4Addr::new(10, 200, 0, 12)
        );
    }
}
