//! End-to-end performance rig: our waypoint against Envoy as the waypoint, on loopback, in an Istio ambient shape.
//!
//! `cargo run --release -p waypoint-benches --bin rig -- [options]` (or `benches/run-rig.sh [options]`, which
//! installs the tools and builds first). Starts an Envoy source ztunnel, both waypoints, an Envoy destination
//! ztunnel and a backend on 127.0.0.0/8; checks every path end to end; then for each load shape and repetition
//! measures the no-waypoint path, ours and Envoy back to back; then the config-scale case; and writes
//! `benches/RESULTS.md`. See `topology.rs` for the picture.

mod backend;
mod envoy_wp;
mod http1;
mod load;
mod measure;
mod ours;
mod procfs;
mod procs;
mod report;
mod scale;
mod topology;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;

use backend::BackendKind;
use measure::{QuietPolicy, RunSpec};
use topology::{PathKind, RigOptions};

#[derive(Parser, Debug)]
#[command(
    name = "rig",
    about = "End-to-end benchmark: our waypoint vs Envoy as the waypoint (loopback only)"
)]
struct Opts {
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Warm-up seconds before each run (same shape, not measured).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Repetitions; each repetition runs no-waypoint, ours and Envoy back to back for every shape.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Load shapes to run (comma-separated ids; default all): h1-c1, h1-c16, h1-c64, h1-close-c16, h1-1mib-c16,
    /// h2-m<streams>.
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Concurrent streams on the one HTTP/2 connection of the h2 shape.
    #[arg(long, default_value_t = 64)]
    h2_streams: u32,
    /// wrk threads (capped at the connection count).
    #[arg(long, default_value_t = 2)]
    wrk_threads: u32,
    /// Worker threads of our waypoint.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// `--concurrency` of every Envoy (both ztunnels and the Envoy waypoint).
    #[arg(long, default_value_t = 2)]
    envoy_concurrency: u32,
    /// Envoy binary (default: $ENVOY_BIN, else the venv of .ci/install-envoy.sh).
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// Our waypoint binary (default: target/release/waypoint of this workspace).
    #[arg(long)]
    waypoint_bin: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    backend: BackendKind,
    /// Before each run, wait until the machine is at most this busy (percent of all CPUs) while the rig is idle.
    #[arg(long, default_value_t = 10.0)]
    quiet_max_busy: f64,
    /// Consecutive quiet seconds required before each run.
    #[arg(long, default_value_t = 3)]
    quiet_secs: u32,
    /// Longest wait for a quiet machine before each run, in seconds (0 = don't wait).
    #[arg(long, default_value_t = 300)]
    quiet_wait: u64,
    /// Runs disturbed by other processes (more than 0.1 cores outside the rig) are redone up to this many times.
    #[arg(long, default_value_t = 1)]
    retry_disturbed: u32,
    /// Services (each with one HTTPRoute) for the config-scale case; 0 skips it.
    #[arg(long, default_value_t = 1000)]
    scale_services: usize,
    /// Times the config-scale swap cycle (1 → N → N' → 1 services) is repeated.
    #[arg(long, default_value_t = 3)]
    scale_cycles: u32,
    /// Seconds of wrk load around the config swaps (should cover every cycle).
    #[arg(long, default_value_t = 20)]
    scale_window: u64,
    /// `spec.watchInterval` of our waypoint's config, in ms (part of every measured apply time).
    #[arg(long, default_value_t = 100)]
    watch_interval_ms: u64,
    /// Where to write the report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scratch directory (configs, logs, raw load-tool output); default a fresh one under the temp dir.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Start everything, run the end-to-end check, stop.
    #[arg(long)]
    check_only: bool,
}

/// CPU used outside the rig during a run above which the run counts as disturbed.
const DISTURBED_CORES: f64 = 0.1;

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(backend::SERVE_BACKEND) {
        return match backend::serve_main(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("serve-backend: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = Opts::parse();
    // One thread: the harness only waits on processes and polls; it should cost the measured machine nothing.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rig: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        // On Ctrl-C or SIGTERM the main future is dropped, which drops the rig and kills every process it started.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(&opts, &args) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rig: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn shell_quote(a: &str) -> String {
    if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

fn now_utc() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine(envoy: &Path, waypoint_bin: &Path, backend: &str) -> report::Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cmd = |c: &str, a: &[&str]| procs::version_of(Path::new(c), a);
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_owned());
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or("unknown".into(), |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0));
    let root = workspace_root();
    let git = |a: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(a)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let dirty = git(&["status", "--porcelain"]).lines().count();
    let built = std::fs::metadata(waypoint_bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .and_then(|d| {
            let out = Command::new("date")
                .args(["-u", "-d", &format!("@{}", d.as_secs()), "+%Y-%m-%dT%H:%M:%SZ"])
                .output();
            out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        })
        .unwrap_or_default();
    report::Machine {
        nproc: cmd("nproc", &[]),
        cpu_model: model,
        kernel: cmd("uname", &["-srm"]),
        memory,
        envoy: cmd(&envoy.display().to_string(), &["--version"])
            .split("version: ")
            .last()
            .unwrap_or_default()
            .to_owned(),
        rustc: cmd("rustc", &["--version"]),
        wrk: cmd("wrk", &["-v"])
            .split(" Copyright")
            .next()
            .unwrap_or_default()
            .to_owned(),
        h2load: cmd("h2load", &["--version"]),
        backend: backend.to_owned(),
        waypoint_bin: format!("`{}` (built {built}), `--workers` as below", waypoint_bin.display()),
        git: format!(
            "commit {} with {dirty} uncommitted change(s)",
            git(&["rev-parse", "--short", "HEAD"])
        ),
    }
}

async fn run(opts: &Opts, args: &[String]) -> Result<()> {
    let started = now_utc();
    let root = workspace_root();
    for tool in ["wrk", "h2load"] {
        if procs::which(tool).is_none() {
            bail!("{tool} not found: apt-get install wrk nghttp2-client (benches/run-rig.sh does it)");
        }
    }
    let envoy_bin = match &opts.envoy {
        Some(p) => p.clone(),
        None => waypoint_conformance::envoy::envoy_bin().context("Envoy (run .ci/install-envoy.sh or pass --envoy)")?,
    };
    let waypoint_bin = opts
        .waypoint_bin
        .clone()
        .unwrap_or_else(|| root.join("target/release/waypoint"));
    if !waypoint_bin.is_file() {
        bail!("{} missing: cargo build --release -p waypoint", waypoint_bin.display());
    }
    // Processes run with their own working directories: relative paths would point elsewhere there.
    let waypoint_bin = std::fs::canonicalize(&waypoint_bin)?;
    let envoy_bin = std::fs::canonicalize(&envoy_bin).with_context(|| format!("Envoy at {}", envoy_bin.display()))?;
    let shapes: Vec<load::Shape> = {
        let all = load::all_shapes(opts.h2_streams);
        if opts.shapes.is_empty() {
            all
        } else {
            for s in &opts.shapes {
                if !all.iter().any(|a| &a.id == s) {
                    let ids: Vec<&str> = all.iter().map(|a| a.id.as_str()).collect();
                    bail!("unknown shape {s:?}; known: {}", ids.join(", "));
                }
            }
            all.into_iter().filter(|a| opts.shapes.contains(&a.id)).collect()
        }
    };
    let work = match &opts.work_dir {
        Some(w) => std::path::absolute(w)?,
        None => std::env::temp_dir().join(format!("waypoint-rig-{}", std::process::id())),
    };
    let raw_dir = work.join("raw");
    std::fs::create_dir_all(&raw_dir).with_context(|| format!("create {}", raw_dir.display()))?;
    eprintln!("[rig] work dir {}", work.display());
    // Declared before the rig so that it is dropped after it: the processes writing there are gone by then.
    let _scratch = Scratch {
        dir: work.clone(),
        remove: opts.work_dir.is_none(),
    };

    let mut rig = topology::start(&RigOptions {
        work: work.clone(),
        envoy_bin: envoy_bin.clone(),
        waypoint_bin: waypoint_bin.clone(),
        backend: opts.backend,
        workers: opts.workers,
        envoy_concurrency: opts.envoy_concurrency,
        scale_probe: (opts.scale_services > 0).then_some(opts.scale_services / 2),
        watch_interval_ms: opts.watch_interval_ms,
    })
    .await?;
    let e2e = rig.e2e_check().await?;
    for l in &e2e {
        eprintln!("[rig] e2e: {l}");
    }
    if opts.check_only {
        eprintln!("[rig] end-to-end check OK (--check-only)");
        return Ok(());
    }

    let quiet = QuietPolicy {
        max_busy_pct: opts.quiet_max_busy,
        quiet_secs: opts.quiet_secs,
        max_wait: Duration::from_secs(opts.quiet_wait),
    };
    let mut results = Vec::new();
    let mut retried = Vec::new();
    for rep in 1..=opts.repeat {
        for shape in &shapes {
            for path in [PathKind::NoWaypoint, PathKind::Ours, PathKind::Envoy] {
                let spec = RunSpec {
                    shape,
                    path,
                    rep,
                    duration: opts.duration,
                    warmup: opts.warmup,
                    wrk_threads: opts.wrk_threads,
                    out_dir: &raw_dir,
                    quiet,
                };
                let mut attempt = 0;
                let result = loop {
                    let r = measure::run_one(&mut rig, &spec).await?;
                    if r.others_cores <= DISTURBED_CORES || attempt >= opts.retry_disturbed {
                        break r;
                    }
                    attempt += 1;
                    retried.push(format!(
                        "{}/{}/r{} ({:.2} cores)",
                        r.shape,
                        path.id(),
                        rep,
                        r.others_cores
                    ));
                    eprintln!(
                        "[rig] {:.2} cores used outside the rig during that run: redoing it",
                        r.others_cores
                    );
                };
                results.push(result);
            }
        }
    }

    let (scale, scale_error) = if opts.scale_services > 0 {
        let _ = measure::wait_quiet(quiet).await?;
        let spec = scale::ScaleSpec {
            n: opts.scale_services,
            cycles: opts.scale_cycles.max(1),
            window_s: opts.scale_window,
        };
        match scale::run(&mut rig, &spec, &raw_dir).await {
            Ok(s) => (Some(s), None),
            Err(e) => {
                eprintln!("[rig] config-scale case failed: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        }
    } else {
        (None, None)
    };

    // How the source ztunnel spread the tunnels, and how Envoy's waypoint spread them over its workers: HBONE
    // concentrates many streams on few connections, which decides how many cores a waypoint can use.
    let mut notes = Vec::new();
    let mut settings = vec![
        format!(
            "load tool → Envoy source ztunnel (plain TCP in, HBONE out as `{}`, :authority {} for the waypoints) → \
             waypoint at {}:15008 (ours) or {}:15008 (Envoy), identity `{}` → HBONE to the Envoy destination \
             ztunnel at {}:15008 (:authority {}:{}) → backend",
            rig.client_identity,
            rig.vip,
            rig.ours_ip,
            rig.envoy_ip,
            rig.waypoint_identity,
            rig.pod_ip,
            rig.pod_ip,
            backend::H1_PORT
        ),
        format!(
            "no-waypoint path: source ztunnel → destination ztunnel directly (:authority {}:{}; the h2 shape uses \
             the backend's h2c port {} there, while both waypoints translate h2c to HTTP/1.1 toward port {})",
            rig.pod_ip,
            backend::H1_PORT,
            backend::H2_PORT,
            backend::H1_PORT
        ),
        format!(
            "{} s measured + {} s warm-up per run, {} repetition(s), order per repetition and shape: no waypoint, ours, Envoy",
            opts.duration, opts.warmup, opts.repeat
        ),
        format!(
            "our waypoint `--workers {}` (thread-per-core workers, its default runtime: each HBONE connection \
             on one worker, like Envoy's); every Envoy `--concurrency {}`; wrk threads min({}, connections); \
             HBONE: TLS 1.3, ALPN h2, ECDSA P-256 certificates from one test CA; source ztunnel ≤ 100 streams per \
             HBONE connection",
            opts.workers, opts.envoy_concurrency, opts.wrk_threads
        ),
        format!(
            "quiet machine: before each run wait ≤ {} s until the machine, with the rig idle, was ≤ {}% busy for {} \
             consecutive seconds",
            opts.quiet_wait, opts.quiet_max_busy, opts.quiet_secs
        ),
        "everything on 127.0.0.0/8 (the service VIP too; nothing listens on it)".into(),
    ];
    if let Ok(stats) = rig.envoy_wp.stats("downstream_cx_total").await {
        let per_worker: Vec<String> = stats
            .iter()
            .filter(|(n, _)| n.starts_with("listener.") && n.contains(".worker_") && n.contains("_15008."))
            .map(|(n, v)| {
                let worker = n.split('.').find(|p| p.starts_with("worker_")).unwrap_or("?");
                format!("{worker}: {v}")
            })
            .collect();
        settings.push(format!(
            "Envoy waypoint HBONE connections accepted per worker over the whole invocation: {}",
            per_worker.join(", ")
        ));
    }
    if let Ok(stats) = rig.src_zt.stats("upstream_cx_total").await {
        let per_cluster: Vec<String> = stats
            .iter()
            .filter(|(n, _)| n.starts_with("cluster.hbone_"))
            .map(|(n, v)| format!("{}: {v}", n.trim_end_matches(".upstream_cx_total")))
            .collect();
        settings.push(format!(
            "source ztunnel HBONE connections opened per upstream cluster (hbone_0 = ours, hbone_1 = Envoy \
             waypoint, hbone_2 = destination ztunnel): {}",
            per_cluster.join(", ")
        ));
    }
    let disturbed: Vec<String> = results
        .iter()
        .filter(|r| r.others_cores > DISTURBED_CORES || !r.quiet.ok || r.steal_pct > 5.0)
        .map(|r| {
            format!(
                "{}/{}/r{} ({:.2} cores others)",
                r.shape,
                r.path.id(),
                r.rep,
                r.others_cores
            )
        })
        .collect();
    if !disturbed.is_empty() {
        notes.push(format!(
            "{} run(s) disturbed by other processes (> 0.1 cores outside the rig, steal > 5 % or no quiet start): {}",
            disturbed.len(),
            disturbed.join(", ")
        ));
    }
    if !retried.is_empty() {
        notes.push(format!(
            "{} run(s) were redone because other processes used more than {DISTURBED_CORES} cores during them \
             (first attempt discarded): {}",
            retried.len(),
            retried.join(", ")
        ));
    }
    let errors: Vec<String> = results
        .iter()
        .filter(|r| r.load.errors() > 0)
        .map(|r| format!("{}/{}/r{}: {}", r.shape, r.path.id(), r.rep, r.load.errors()))
        .collect();
    if !errors.is_empty() {
        notes.push(format!("runs with errors: {}", errors.join(", ")));
    }

    let mut command: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    if let Ok(wrapper) = std::env::var("RIG_COMMAND") {
        command = vec![wrapper];
    } else if let Some(first) = command.first_mut() {
        *first = "cargo run --release -p waypoint-benches --bin rig --".into();
    }
    let machine = machine(&envoy_bin, &waypoint_bin, &rig.backend.description);
    let report = report::Report {
        command: command.join(" "),
        started,
        finished: now_utc(),
        machine: &machine,
        settings,
        e2e: &e2e,
        shapes: &shapes,
        results: &results,
        scale: scale.as_ref(),
        scale_error,
        notes: &notes,
    }
    .render();
    let out = opts.out.clone().unwrap_or_else(|| root.join("benches/RESULTS.md"));
    std::fs::write(&out, &report).with_context(|| format!("write {}", out.display()))?;
    println!("{report}");
    if opts.work_dir.is_some() {
        eprintln!(
            "[rig] report written to {}; raw output in {}",
            out.display(),
            raw_dir.display()
        );
    } else {
        eprintln!(
            "[rig] report written to {}; scratch directory removed (pass --work-dir to keep raw output and logs)",
            out.display()
        );
    }
    Ok(())
}

/// The rig's scratch directory. A default one under the temp dir is removed when the rig ends, however it ends:
/// the destination ztunnel's access log alone grows by ~100 MB per full run.
struct Scratch {
    dir: PathBuf,
    remove: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.remove
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            eprintln!("[rig] could not remove {}: {e}", self.dir.display());
        }
    }
}
