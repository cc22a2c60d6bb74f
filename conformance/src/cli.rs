//! `waypoint-conformance demo`: the waypoint on the example config with every peer it needs, on loopback.
//! `waypoint-conformance run`: the Gateway API conformance runner (see [`crate::runner`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;
use crate::dest_ztunnel::{DestZtunnel, DestZtunnelConfig, DestZtunnelHandle};
use crate::echo::{EchoConfig, EchoFormat, EchoHandle, EchoServer, TcpEcho, TcpEchoHandle};
use crate::pki::{KeyKind, TestCa};
use crate::runner;
use crate::source_ztunnel::{SourceZtunnel, SourceZtunnelConfig};
use waypoint::config::{PortProtocol, Snapshot};

#[derive(Parser, Debug)]
#[command(
    name = "waypoint-conformance",
    about = "Mesh-in-a-box for the waypoint: demo and conformance runner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the waypoint on an example config with ztunnel stand-ins and echo backends, send a few requests
    /// through it, then keep everything running for you to try.
    Demo {
        #[arg(long, default_value = "examples/waypoint.yaml")]
        config: PathBuf,
        /// Exit after the scripted requests instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Run a conformance case file (format gateway-api-conformance-cases/1) against the waypoint.
    Run {
        /// The case file.
        #[arg(long)]
        cases: PathBuf,
        /// A directory the case file's manifest paths are relative to (repeatable: looked up in order, the
        /// first directory holding a path wins).
        #[arg(long, required = true)]
        manifests: Vec<PathBuf>,
        /// Where to write the JSON report.
        #[arg(long, default_value = runner::DEFAULT_REPORT)]
        report: PathBuf,
        /// Run only this test (repeatable).
        #[arg(long = "only", value_name = "NAME")]
        only: Vec<String>,
        /// Override MaxTimeToConsistency (seconds; upstream: 30).
        #[arg(long, value_name = "SECONDS")]
        consistency_timeout: Option<f64>,
    },
}

pub fn main(args: Vec<OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The runner's own lines are its output; the in-process waypoint's warnings about each test's config
    // (e.g. HTTPS listeners it does not serve) would drown them.
    let default_filter = match cli.command {
        Command::Run { .. } => "error",
        Command::Demo { .. } => "warn",
    };
    let filter = std::env::var("WAYPOINT_LOG").unwrap_or_else(|_| default_filter.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_default())
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo { config, once } => rt.block_on(demo(&config, once)).map(|()| ExitCode::SUCCESS),
        Command::Run {
            cases,
            manifests,
            report,
            only,
            consistency_timeout,
        } => {
            let mut dirs = manifests.into_iter();
            let mut options = runner::RunOptions::new(cases, dirs.next().unwrap_or_default());
            options.manifests.extend(dirs);
            options.only = only;
            options.progress = true;
            if let Some(seconds) = consistency_timeout {
                options.settings.consistency.timeout = std::time::Duration::from_secs_f64(seconds.max(0.0));
            }
            rt.block_on(run(&options, &report))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the case file; the per-test lines are printed as tests finish, then the closing line. Exit code 1
/// when any test failed.
async fn run(options: &runner::RunOptions, report_path: &Path) -> anyhow::Result<ExitCode> {
    let report = runner::run(options).await?;
    report
        .write_json(report_path)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!("{}", report.summary_line());
    Ok(if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Everything the demo started; dropped at the end.
struct Peers {
    _echo: Vec<EchoHandle>,
    _tcp: Vec<TcpEchoHandle>,
    _ztunnels: Vec<DestZtunnelHandle>,
}

async fn demo(example: &Path, once: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(example).with_context(|| format!("reading {}", example.display()))?;
    let dir = std::env::temp_dir().join(format!("waypoint-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("waypoint.yaml");
    std::fs::write(&config_path, &text)?;
    let snapshot = waypoint::config::load_file(&config_path, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
    let s = &snapshot.settings;
    println!(
        "config      {} ({} service addresses)",
        example.display(),
        snapshot.services.len()
    );

    let ca = TestCa::try_new(&s.trust_domain)?;
    let wp_leaf = ca.issue(&s.namespace, &s.name, KeyKind::EcdsaP256)?;
    write(&s.tls.cert_file, &wp_leaf.cert_pem)?;
    write(&s.tls.key_file, &wp_leaf.key_pem)?;
    write(&s.tls.roots_file, ca.root_pem())?;

    let peers = start_peers(&snapshot, &ca).await?;
    let app = waypoint::App::start(config_path.clone()).await?;
    println!(
        "waypoint    HBONE {}  readiness http://{}/healthz/ready  admin http://{}/config_dump",
        app.hbone_addr, app.readiness_addr, app.admin_addr
    );

    let client_leaf = ca.issue(&s.namespace, "client", KeyKind::EcdsaP256)?;
    let waypoint_id = ca.spiffe_id(&s.namespace, &s.name);
    let mut src_cfg = SourceZtunnelConfig::new(app.hbone_addr, waypoint_id, client_leaf, ca.root_pem());
    src_cfg.source_workload = (s.namespace.clone(), "client".into());
    let source = SourceZtunnel::new(src_cfg)?;
    println!("client      {} (source ztunnel stand-in)\n", source.identity());

    let mut vips: Vec<_> = snapshot.services.values().collect();
    vips.sort_by_key(|b| b.vip);
    let mut curl_lines = Vec::new();
    for b in vips {
        let authority = b.vip.to_string();
        match b.protocol {
            PortProtocol::Tcp => {
                let mut t = source.connect(&authority).await?;
                t.write_all(b"hello over opaque TCP\n").await?;
                t.shutdown().await?;
                let mut out = String::new();
                t.read_to_string(&mut out).await?;
                println!(
                    "TCP  {} ({}): sent 22 bytes, echoed back {:?}",
                    authority,
                    b.hostname,
                    out.trim_end()
                );
            }
            PortProtocol::Http2 => {
                let tunnel = source.connect(&authority).await?;
                let mut send = client::http2(tunnel).await?;
                let req = Request::post(format!("http://{}/demo.Echo/Call", b.hostname))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(client::body(Bytes::from_static(b"\0\0\0\0\x05hello")))?;
                let reply = client::send2(&mut send, req).await?;
                let status = reply
                    .trailers
                    .as_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_string();
                println!(
                    "gRPC {} ({}): HTTP {} grpc-status {}",
                    authority, b.hostname, reply.status, status
                );
            }
            PortProtocol::Http | PortProtocol::Detect => {
                for _ in 0..3 {
                    let reply = client::get(&source, &authority, &b.hostname, "/hello?from=demo").await?;
                    let pod = reply
                        .json()
                        .get("pod")
                        .and_then(|p| p.as_str())
                        .unwrap_or("-")
                        .to_string();
                    println!(
                        "HTTP {} ({}): GET /hello -> {} from pod {}",
                        authority, b.hostname, reply.status, pod
                    );
                }
                let local = source.listen(&authority).await?;
                curl_lines.push(format!("curl -s http://{local}/hello -H 'Host: {}'", b.hostname));
            }
        }
    }
    println!();
    if once {
        app.drain();
        app.wait().await;
        drop(peers);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    println!("Everything is still running. Try (each local port is a source-ztunnel tunnel to a service VIP):");
    for l in &curl_lines {
        println!("  {l}");
    }
    println!("  curl -s http://{}/config_dump | head -40", app.admin_addr);
    println!("Ctrl-C to stop (the waypoint drains gracefully).");
    tokio::signal::ctrl_c().await?;
    app.drain();
    app.wait().await;
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Start an echo backend at every endpoint address and a destination ztunnel at every HBONE address.
async fn start_peers(snapshot: &Snapshot, ca: &TestCa) -> anyhow::Result<Peers> {
    let mut peers = Peers {
        _echo: Vec::new(),
        _tcp: Vec::new(),
        _ztunnels: Vec::new(),
    };
    let mut started: HashSet<SocketAddr> = HashSet::new();
    let mut bindings: Vec<_> = snapshot.services.values().collect();
    bindings.sort_by_key(|b| b.vip);
    for b in bindings {
        for ep in &b.backend.endpoints {
            if started.insert(ep.addr) {
                if b.protocol == PortProtocol::Tcp {
                    peers._tcp.push(TcpEcho::start(ep.addr).await?);
                } else {
                    let mut cfg = EchoConfig::new(ep.addr);
                    cfg.pod_name = ep.workload.to_string();
                    cfg.namespace = ep.namespace.to_string();
                    cfg.service_version = ep.labels.get("version").cloned().unwrap_or_default();
                    cfg.format = EchoFormat::Json;
                    cfg.h2c_only = false;
                    peers._echo.push(EchoServer::start(cfg).await?);
                }
            }
            if let Some(hbone) = ep.hbone
                && started.insert(hbone)
            {
                let IpAddr::V4(ip) = hbone.ip() else {
                    bail!("the demo's ztunnel stand-in needs IPv4 pod IPs")
                };
                let leaf = ca.issue(
                    ep.identity.namespace(),
                    ep.identity.service_account(),
                    KeyKind::EcdsaP256,
                )?;
                let mut cfg = DestZtunnelConfig::new(ip, ca.trust_domain(), leaf, ca.root_pem());
                cfg.hbone_port = hbone.port();
                peers._ztunnels.push(DestZtunnel::start(cfg).await?);
            }
        }
    }
    Ok(peers)
}
