//! The rig: addresses, certificates and every long-running process, plus the end-to-end check that proves each
//! path goes where it should before anything is measured.
//!
//! ```text
//! load tool ─► source ztunnel (Envoy) ══HBONE, sa/client, :authority VIP:80══► OUR waypoint  ─┐
//!                                     ══HBONE, sa/client, :authority VIP:80══► Envoy waypoint ─┤ HBONE, sa/waypoint,
//!                                     ══HBONE, sa/client, :authority pod:8080 (no waypoint)═══╗│ :authority pod:8080
//!                                                                                 destination ztunnel (Envoy) pod:15008
//!                                                                                             └─► backend pod:8080
//! ```
//! Both waypoints run side by side on their own loopback addresses, so alternating between them needs no
//! restart; the idle one's CPU is reported with the other processes'.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::time::{Instant, sleep};
use waypoint_conformance::envoy::{DEST_ACCESS_LOG, DestZtunnelConfig, PemIdentity, SourceTarget, SourceZtunnelConfig};
use waypoint_conformance::net::{unique_loopback_ip, unique_loopback_ip_with_ports};
use waypoint_conformance::pki::{KeyKind, TestCa};

use crate::backend::{self, Backend, BackendKind, H1_PORT, H2_PORT, LARGE_BODY, SMALL_BODY};
use crate::envoy_wp::{self, EnvoyWaypoint};
use crate::http1;
use crate::ours::{self, OursConfig, Scale};
use crate::procfs;
use crate::procs::{EnvoyLaunch, EnvoyProc, Proc};

pub const TRUST_DOMAIN: &str = "cluster.local";
const HBONE_PORT: u16 = 15008;
/// The file names `waypoint_conformance::envoy` renders into its bootstraps (checked at launch: a bootstrap that
/// names another file fails before Envoy starts).
const CONFORMANCE_CERT: &str = "identity-cert.pem";
const CONFORMANCE_KEY: &str = "identity-key.pem";
const CONFORMANCE_ROOTS: &str = "roots.pem";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathKind {
    NoWaypoint,
    Ours,
    Envoy,
}

impl PathKind {
    pub fn label(self) -> &'static str {
        match self {
            PathKind::NoWaypoint => "no waypoint",
            PathKind::Ours => "ours",
            PathKind::Envoy => "Envoy",
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            PathKind::NoWaypoint => "nowp",
            PathKind::Ours => "ours",
            PathKind::Envoy => "envoy",
        }
    }
}

pub struct RigOptions {
    pub work: PathBuf,
    pub envoy_bin: PathBuf,
    pub waypoint_bin: PathBuf,
    pub backend: BackendKind,
    pub workers: usize,
    pub envoy_concurrency: u32,
    /// Index of the scale service the probe listener tunnels to (the config-scale case checks its routes).
    pub scale_probe: Option<usize>,
    pub watch_interval_ms: u64,
}

/// Source-ztunnel entry points (plain TCP listeners the load tools connect to).
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    pub ours: SocketAddr,
    pub envoy: SocketAddr,
    /// Straight to the destination ztunnel, authority pod:8080 (HTTP/1.1 backend port).
    pub nowp_h1: SocketAddr,
    /// Straight to the destination ztunnel, authority pod:8081 (h2c backend port).
    pub nowp_h2: SocketAddr,
    /// Through our waypoint to a scale service's VIP (refused until the scale config is applied).
    pub scale_probe: Option<SocketAddr>,
}

pub struct Rig {
    // Processes first, in the order they are stopped when the rig is dropped (fields drop in declaration order):
    // the load side before the servers it talks to.
    pub src_zt: EnvoyProc,
    pub envoy_wp: EnvoyProc,
    pub ours: Proc,
    pub dest_zt: EnvoyProc,
    pub backend: Backend,
    pub vip: SocketAddr,
    pub pod_ip: IpAddr,
    pub ours_ip: IpAddr,
    pub envoy_ip: IpAddr,
    pub waypoint_identity: String,
    pub client_identity: String,
    pub ours_admin: SocketAddr,
    pub ours_config: OursConfig,
    pub ours_config_path: PathBuf,
    pub listeners: Listeners,
}

fn pem(leaf: &waypoint_conformance::pki::Leaf) -> PemIdentity {
    leaf.into()
}

pub async fn start(o: &RigOptions) -> Result<Rig> {
    std::fs::create_dir_all(&o.work)?;
    // Every role on its own 127.x.y.z (outside 127.0.0.0/16), so fixed ports (15008, 8080) cannot clash with
    // anything else on the machine, including another rig.
    let pod_ip = IpAddr::V4(unique_loopback_ip_with_ports(&[H1_PORT, H2_PORT]));
    let ours_ip = IpAddr::V4(unique_loopback_ip_with_ports(&[15021, 15000]));
    let envoy_ip = IpAddr::V4(unique_loopback_ip());
    let client_ip = IpAddr::V4(unique_loopback_ip());
    // The service VIP is only a string in CONNECT authorities and configs; it is loopback too, and nothing
    // listens on it, so a bug that dialled it could not leave the machine.
    let vip = SocketAddr::new(IpAddr::V4(unique_loopback_ip()), 80);
    let pod_h1 = SocketAddr::new(pod_ip, H1_PORT);
    let pod_h2 = SocketAddr::new(pod_ip, H2_PORT);

    let ca = TestCa::try_new(TRUST_DOMAIN)?;
    let client = ca.issue(ours::NAMESPACE, "client", KeyKind::EcdsaP256)?;
    let waypoint = ca.issue(ours::NAMESPACE, "waypoint", KeyKind::EcdsaP256)?;
    let server = ca.issue(ours::NAMESPACE, ours::POD_SA, KeyKind::EcdsaP256)?;

    let backend = backend::start(o.backend, pod_ip, &o.work)?;
    wait_tcp(pod_h1, Duration::from_secs(10)).await.context("backend")?;

    let dest_cfg = DestZtunnelConfig {
        identity: pem(&server),
        roots_pem: ca.root_pem().to_owned(),
        trust_domain: TRUST_DOMAIN.into(),
        pod_ip,
        hbone_port: HBONE_PORT,
        target_ports: vec![H1_PORT, H2_PORT],
    };
    let dest_zt = EnvoyLaunch {
        bin: &o.envoy_bin,
        role: "dest-ztunnel",
        dir: o.work.join("dest-ztunnel"),
        bootstrap: &dest_cfg.render(IpAddr::V4(unique_loopback_ip()))?,
        files: &conformance_files(&server.chain_pem, &server.key_pem, ca.root_pem()),
        concurrency: o.envoy_concurrency,
    }
    .start()
    .await?;

    // Our waypoint.
    let ours_dir = o.work.join("ours");
    std::fs::create_dir_all(&ours_dir)?;
    waypoint.write_to(&ours_dir, "waypoint")?;
    ca.write_root(&ours_dir, envoy_wp::ROOTS_FILE)?;
    let ours_config = OursConfig {
        hbone: SocketAddr::new(ours_ip, HBONE_PORT),
        readiness: SocketAddr::new(ours_ip, 15021),
        admin: SocketAddr::new(ours_ip, 15000),
        trust_domain: TRUST_DOMAIN.into(),
        cert_file: envoy_wp::CERT_FILE.into(),
        key_file: envoy_wp::KEY_FILE.into(),
        roots_file: envoy_wp::ROOTS_FILE.into(),
        vip,
        pod_ip,
        pod_port: H1_PORT,
        watch_interval: format!("{}ms", o.watch_interval_ms),
    };
    let ours_config_path = ours_dir.join("waypoint.yaml");
    write_config(&ours_config_path, &ours_config.render(Scale::None))?;
    check_config(&o.waypoint_bin, &ours_config_path)?;
    let mut cmd = Command::new(&o.waypoint_bin);
    cmd.arg("run")
        .arg("--config")
        .arg(&ours_config_path)
        .args(["--workers", &o.workers.to_string(), "--log", "warn"])
        .current_dir(&ours_dir);
    let mut ours_proc = Proc::spawn("waypoint-ours", &mut cmd, &ours_dir.join("waypoint.log"))?;
    wait_ready(&mut ours_proc, ours_config.readiness).await?;

    // Envoy as the waypoint, same identity and certificate files.
    let envoy_cfg = EnvoyWaypoint {
        listen: SocketAddr::new(envoy_ip, HBONE_PORT),
        admin_ip: IpAddr::V4(unique_loopback_ip()),
        trust_domain: TRUST_DOMAIN.into(),
        dest_identity: server.spiffe_id.clone(),
        hbone_port: HBONE_PORT,
        services: vec![envoy_wp::Service {
            name: ours::SERVICE.into(),
            vip,
            endpoints: vec![pod_h1],
        }],
    };
    let envoy_wp = EnvoyLaunch {
        bin: &o.envoy_bin,
        role: "waypoint-envoy",
        dir: o.work.join("waypoint-envoy"),
        bootstrap: &envoy_cfg.render(),
        files: &[
            (envoy_wp::CERT_FILE, waypoint.chain_pem.as_str()),
            (envoy_wp::KEY_FILE, waypoint.key_pem.as_str()),
            (envoy_wp::ROOTS_FILE, ca.root_pem()),
        ],
        concurrency: o.envoy_concurrency,
    }
    .start()
    .await?;

    // The source ztunnel: one listener per path.
    let hbone = |ip: IpAddr| SocketAddr::new(ip, HBONE_PORT);
    let fqdn = format!("{}.{}.svc.{TRUST_DOMAIN}", ours::SERVICE, ours::NAMESPACE);
    let mut targets = vec![
        SourceTarget {
            authority: vip.to_string(),
            next_hop: hbone(ours_ip),
            expected_identity: waypoint.spiffe_id.clone(),
            forwarded_host: Some(fqdn.clone()),
        },
        SourceTarget {
            authority: vip.to_string(),
            next_hop: hbone(envoy_ip),
            expected_identity: waypoint.spiffe_id.clone(),
            forwarded_host: Some(fqdn.clone()),
        },
        SourceTarget {
            authority: pod_h1.to_string(),
            next_hop: hbone(pod_ip),
            expected_identity: server.spiffe_id.clone(),
            forwarded_host: None,
        },
        SourceTarget {
            authority: pod_h2.to_string(),
            next_hop: hbone(pod_ip),
            expected_identity: server.spiffe_id.clone(),
            forwarded_host: None,
        },
    ];
    if let Some(i) = o.scale_probe {
        targets.push(SourceTarget {
            authority: ours::scale_vip(i).to_string(),
            next_hop: hbone(ours_ip),
            expected_identity: waypoint.spiffe_id.clone(),
            forwarded_host: None,
        });
    }
    let src_cfg = SourceZtunnelConfig {
        identity: pem(&client),
        roots_pem: ca.root_pem().to_owned(),
        listen_ip: client_ip,
        source_ip: Some(client_ip),
        baggage: Some("k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,service.name=client,service.version=v1".into()),
        targets,
    };
    let src_zt = EnvoyLaunch {
        bin: &o.envoy_bin,
        role: "source-ztunnel",
        dir: o.work.join("source-ztunnel"),
        bootstrap: &src_cfg.render(IpAddr::V4(unique_loopback_ip()))?,
        files: &conformance_files(&client.chain_pem, &client.key_pem, ca.root_pem()),
        concurrency: o.envoy_concurrency,
    }
    .start()
    .await?;
    let bound = src_zt.listeners().await?;
    let listener = |i: usize| -> Result<SocketAddr> {
        let name = SourceZtunnelConfig::listener_name(i);
        bound
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .with_context(|| format!("source ztunnel has no listener {name}: {bound:?}"))
    };
    let listeners = Listeners {
        ours: listener(0)?,
        envoy: listener(1)?,
        nowp_h1: listener(2)?,
        nowp_h2: listener(3)?,
        scale_probe: o.scale_probe.map(|_| listener(4)).transpose()?,
    };

    Ok(Rig {
        vip,
        pod_ip,
        ours_ip,
        envoy_ip,
        waypoint_identity: waypoint.spiffe_id.clone(),
        client_identity: client.spiffe_id.clone(),
        backend,
        dest_zt,
        ours: ours_proc,
        ours_admin: ours_config.admin,
        ours_config,
        ours_config_path,
        envoy_wp,
        src_zt,
        listeners,
    })
}

fn conformance_files<'a>(cert: &'a str, key: &'a str, roots: &'a str) -> [(&'static str, &'a str); 3] {
    [
        (CONFORMANCE_CERT, cert),
        (CONFORMANCE_KEY, key),
        (CONFORMANCE_ROOTS, roots),
    ]
}

/// Writes a config atomically (temp file + rename): the waypoint polls the file and must never read half of it.
pub fn write_config(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// `waypoint check FILE`: a generated config the binary rejects is a rig bug, reported before anything starts.
pub fn check_config(bin: &Path, path: &Path) -> Result<()> {
    let out = Command::new(bin)
        .arg("check")
        .arg(path)
        .output()
        .with_context(|| format!("run {} check", bin.display()))?;
    if !out.status.success() {
        bail!(
            "waypoint check {} failed:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn wait_tcp(addr: SocketAddr, within: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > within {
            bail!("nothing listening on {addr} after {within:?}");
        }
        sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(proc: &mut Proc, readiness: SocketAddr) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(30) {
        proc.check_alive()?;
        match http1::get(readiness, "/healthz/ready", Duration::from_secs(2)).await {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => last = format!("status {}", r.status),
            Err(e) => last = format!("{e:#}"),
        }
        sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "our waypoint not ready after 30 s ({last}); log:\n{}",
        proc.log_tail(30)
    )
}

impl Rig {
    /// The source-ztunnel listener a load tool connects to for `path`; the HTTP/2 shape's no-waypoint path ends at
    /// the backend's h2c port, since no waypoint is there to translate.
    pub fn target(&self, path: PathKind, h2: bool) -> SocketAddr {
        match (path, h2) {
            (PathKind::Ours, _) => self.listeners.ours,
            (PathKind::Envoy, _) => self.listeners.envoy,
            (PathKind::NoWaypoint, false) => self.listeners.nowp_h1,
            (PathKind::NoWaypoint, true) => self.listeners.nowp_h2,
        }
    }

    pub fn waypoint_pid(&self, path: PathKind) -> Option<u32> {
        match path {
            PathKind::NoWaypoint => None,
            PathKind::Ours => Some(self.ours.pid()),
            PathKind::Envoy => Some(self.envoy_wp.proc.pid()),
        }
    }

    /// (role, pid) of every long-running process.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![
            ("ours", self.ours.pid()),
            ("envoy", self.envoy_wp.proc.pid()),
            ("src_zt", self.src_zt.proc.pid()),
            ("dest_zt", self.dest_zt.proc.pid()),
            ("backend", self.backend.proc.pid()),
        ]
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.ours.check_alive()?;
        self.envoy_wp.proc.check_alive()?;
        self.src_zt.proc.check_alive()?;
        self.dest_zt.proc.check_alive()?;
        self.backend.proc.check_alive()
    }

    /// One request of each kind along every path, then proof from the destination ztunnel's access log that each
    /// waypoint opened its own tunnel with its own identity, and that no socket left loopback. Returns the report
    /// lines; fails on the first problem.
    pub async fn e2e_check(&self) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        for path in [PathKind::NoWaypoint, PathKind::Ours, PathKind::Envoy] {
            let target = self.target(path, false);
            for (p, len) in [("/", SMALL_BODY), ("/1m", LARGE_BODY)] {
                let r = get_retrying(target, p)
                    .await
                    .with_context(|| format!("{} path", path.label()))?;
                if r.status != 200 || r.body.len() != len {
                    bail!(
                        "{} path GET {p}: status {} with {} body bytes (want 200 with {len})",
                        path.label(),
                        r.status,
                        r.body.len()
                    );
                }
                lines.push(format!(
                    "{:<12} GET {p:<3} via {target}: 200, {len} bytes, server: {}",
                    path.label(),
                    r.header("server").unwrap_or("-")
                ));
            }
            let h2 = h2_probe(self.target(path, true))
                .await
                .with_context(|| format!("{} path h2c", path.label()))?;
            lines.push(format!(
                "{:<12} h2c via {}: {h2}",
                path.label(),
                self.target(path, true)
            ));
        }

        let pod = SocketAddr::new(self.pod_ip, H1_PORT).to_string();
        let missing = self.wait_access_log(&pod).await?;
        if let Some((what, entries)) = missing {
            bail!("destination ztunnel access log shows no {what} (authority {pod}, status 200): {entries:#?}");
        }
        for what in ACCESS_CHECKS {
            lines.push(format!("destination ztunnel access log: {what}, CONNECT {pod} 200: OK"));
        }

        let pids: Vec<u32> = self.pids().into_iter().map(|(_, p)| p).collect();
        let bad = procfs::non_loopback_sockets(&pids)?;
        if !bad.is_empty() {
            bail!("sockets outside 127.0.0.0/8: {bad:?}");
        }
        lines.push("TCP sockets of the rig's processes outside 127.0.0.0/8: none".into());
        Ok(lines)
    }

    /// Waits until the destination ztunnel has logged a tunnel of each kind in [`ACCESS_CHECKS`] (its access log
    /// is flushed on a timer, so entries show up late); on timeout, the first kind missing and what was logged.
    async fn wait_access_log(&self, pod: &str) -> Result<Option<(&'static str, Vec<AccessEntry>)>> {
        let path = self.dest_zt.dir.join(DEST_ACCESS_LOG);
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let entries = parse_access_log(&text);
            let found = |peer: &str, from_envoy: Option<bool>| {
                entries.iter().any(|e| {
                    e.authority == pod
                        && e.status == 200
                        && e.established
                        && e.peer == peer
                        && from_envoy.is_none_or(|want| (e.src_ip == Some(self.envoy_ip)) == want)
                })
            };
            let wanted = [
                found(&self.client_identity, None),
                found(&self.waypoint_identity, Some(false)),
                found(&self.waypoint_identity, Some(true)),
            ];
            let missing = ACCESS_CHECKS
                .iter()
                .zip(wanted)
                .find(|(_, ok)| !ok)
                .map(|(what, _)| *what);
            match missing {
                None => return Ok(None),
                Some(what) if start.elapsed() > Duration::from_secs(10) => return Ok(Some((what, entries))),
                Some(_) => sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// The tunnels the end-to-end check expects in the destination ztunnel's access log, in the order
/// `wait_access_log` tests them.
const ACCESS_CHECKS: [&str; 3] = [
    "no-waypoint tunnel, client identity",
    "our waypoint's own tunnel, waypoint identity",
    "Envoy waypoint's own tunnel, waypoint identity",
];

/// GET through a fresh tunnel; the first tunnels of a path may race the source ztunnel's connection setup.
async fn get_retrying(target: SocketAddr, path: &str) -> Result<http1::Response> {
    let mut last = None;
    for _ in 0..20 {
        match http1::get(target, path, Duration::from_secs(5)).await {
            Ok(r) if r.status == 200 => return Ok(r),
            Ok(r) => last = Some(anyhow::anyhow!("status {}: {}", r.status, r.text().trim())),
            Err(e) => last = Some(e),
        }
        sleep(Duration::from_millis(250)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
}

/// 20 HTTP/2 requests on one h2c connection.
async fn h2_probe(target: SocketAddr) -> Result<String> {
    let out = tokio::process::Command::new("h2load")
        .args(["-n20", "-c1", "-m4"])
        .arg(format!("http://{target}/"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .context("h2load probe timed out")??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = text.contains("20 succeeded") && text.contains("20 2xx");
    if !out.status.success() || !ok {
        bail!("h2load -n20 -c1 -m4: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok("20/20 requests 2xx on one connection".into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub established: bool,
    pub authority: String,
    pub status: u16,
    pub peer: String,
    pub src_ip: Option<IpAddr>,
}

/// The destination ztunnel's JSON access log (fields as `waypoint_conformance::envoy` renders them).
fn parse_access_log(text: &str) -> Vec<AccessEntry> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let s = |k: &str| match &v[k] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            };
            AccessEntry {
                established: s("type") == "DownstreamTunnelSuccessfullyEstablished",
                authority: s("authority"),
                status: s("response_code").parse().unwrap_or(0),
                peer: s("peer_uri_san"),
                src_ip: s("downstream_remote").parse::<SocketAddr>().ok().map(|a| a.ip()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines() {
        let text = concat!(
            r#"{"type":"DownstreamTunnelSuccessfullyEstablished","authority":"127.5.5.5:8080","response_code":200,"#,
            r#""peer_uri_san":"spiffe://cluster.local/ns/default/sa/waypoint","downstream_remote":"127.4.4.4:5555"}"#,
            "\n",
            r#"{"type":"DownstreamEnd","response_code":"0"}"#
        );
        let e = parse_access_log(text);
        assert_eq!(e.len(), 1);
        assert!(e[0].established);
        assert_eq!(e[0].status, 200);
        assert_eq!(e[0].src_ip, Some("127.4.4.4".parse().unwrap()));
    }
}
