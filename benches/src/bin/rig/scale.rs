//! Config-scale case (our waypoint only: Envoy would need an xDS server for a live config change): while wrk
//! drives the benchmarked service, the config file is swapped from 1 service to N services with one HTTPRoute
//! each, then every route is changed, then it goes back to 1 service, a few times over. For each swap: time from
//! the file write to the waypoint publishing the new snapshot (its `snapshot.generation` in `/config_dump` moves),
//! RSS afterwards, and whether the routes took effect; over the whole window: wrk errors, which must be zero.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::time::{Instant, sleep};

use crate::http1;
use crate::load::{self, LoadOutcome, Shape, Tool};
use crate::ours::{self, Scale};
use crate::procfs;
use crate::topology::{self, Rig};

const POLL: Duration = Duration::from_millis(20);
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Step {
    pub what: String,
    pub file_bytes: usize,
    /// None when the edit was rejected or never applied.
    pub apply_ms: Option<f64>,
    pub rejection: Option<String>,
    pub services_after: usize,
    pub rss_after_kib: u64,
}

#[derive(Debug, Clone)]
pub struct ScaleResult {
    pub n: usize,
    pub cycles: u32,
    /// Whether the HTTPRoutes were accepted and in force (else the numbers are for Services only).
    pub routes_applied: bool,
    pub notes: Vec<String>,
    pub steps: Vec<Step>,
    pub load: Option<LoadOutcome>,
    pub load_error: Option<String>,
    pub window_s: u64,
    pub rss_before_kib: u64,
    pub peak_rss_kib: u64,
    pub watch_interval: String,
}

async fn dump(admin: SocketAddr) -> Result<Value> {
    let r = http1::get(admin, "/config_dump", Duration::from_secs(10)).await?;
    if r.status != 200 {
        bail!("/config_dump: status {}", r.status);
    }
    serde_json::from_slice(&r.body).context("/config_dump is not JSON")
}

fn generation(v: &Value) -> u64 {
    v["snapshot"]["generation"].as_u64().unwrap_or(0)
}

fn rejected(v: &Value) -> u64 {
    v["rejectedUpdates"].as_u64().unwrap_or(0)
}

fn service_count(v: &Value) -> usize {
    v["snapshot"]["services"].as_object().map_or(0, |m| m.len())
}

/// Writes `text` as the live config and waits until the waypoint applies or rejects it.
async fn swap(rig: &Rig, cycle: u32, what: &str, text: &str) -> Result<Step> {
    let before = dump(rig.ours_admin).await?;
    let (g0, r0) = (generation(&before), rejected(&before));
    let t0 = Instant::now();
    topology::write_config(&rig.ours_config_path, text)?;
    loop {
        let v = dump(rig.ours_admin).await?;
        let at = t0.elapsed();
        if generation(&v) > g0 || rejected(&v) > r0 {
            let applied = generation(&v) > g0;
            // Let allocator and pools settle before reading RSS.
            sleep(Duration::from_millis(500)).await;
            let rss = procfs::status_kib(rig.ours.pid(), "VmRSS")?;
            let step = Step {
                what: what.to_owned(),
                file_bytes: text.len(),
                apply_ms: applied.then_some(at.as_secs_f64() * 1000.0),
                rejection: (!applied).then(|| v["lastRejection"].as_str().unwrap_or("?").to_owned()),
                services_after: service_count(&dump(rig.ours_admin).await?),
                rss_after_kib: rss,
            };
            eprintln!(
                "[rig] scale cycle {cycle}: {what}: {} ({} bytes), RSS {:.1} MiB",
                step.apply_ms
                    .map_or_else(|| "REJECTED".to_owned(), |ms| format!("applied in {ms:.0} ms")),
                text.len(),
                rss as f64 / 1024.0
            );
            return Ok(step);
        }
        if at > APPLY_TIMEOUT {
            bail!("{what}: neither applied nor rejected after {APPLY_TIMEOUT:?}");
        }
        sleep(POLL).await;
    }
}

/// Checks through the probe listener (a tunnel to scale service `probe`'s VIP) whether its route is in force:
/// with the route, "/" matches no rule (404) and the route's prefix reaches the backend (200).
async fn probe_routes(rig: &Rig, probe: usize, variant: u32, notes: &mut Vec<String>) -> Result<bool> {
    let Some(listener) = rig.listeners.scale_probe else {
        return Ok(false);
    };
    let v = dump(rig.ours_admin).await?;
    let vip = ours::scale_vip(probe).to_string();
    let attached = &v["snapshot"]["services"][&vip]["routes"];
    notes.push(format!(
        "config_dump: service {vip} has routes {}",
        if attached.is_null() {
            "null (none attached)".to_owned()
        } else {
            attached.to_string()
        }
    ));
    let prefix = ours::scale_route_prefix(probe, variant);
    let root = http1::get(listener, "/", Duration::from_secs(5)).await?;
    let routed = http1::get(listener, &format!("{prefix}/x"), Duration::from_secs(5)).await?;
    notes.push(format!(
        "through a tunnel to {vip}: GET / -> {}, GET {prefix}/x -> {}",
        root.status, routed.status
    ));
    Ok(!attached.is_null() && root.status == 404 && routed.status == 200)
}

pub struct ScaleSpec {
    pub n: usize,
    pub cycles: u32,
    pub window_s: u64,
}

pub async fn run(rig: &mut Rig, spec: &ScaleSpec, out_dir: &std::path::Path) -> Result<ScaleResult> {
    let n = spec.n;
    let probe = n / 2;
    let pid = rig.ours.pid();
    let rss_before = procfs::status_kib(pid, "VmRSS")?;
    procfs::reset_peak_rss(pid)?;
    let shape = Shape {
        id: "scale-h1-c16".into(),
        title: "HTTP/1.1 keep-alive, 16 connections, during config swaps".into(),
        tool: Tool::Wrk {
            conns: 16,
            close: false,
        },
        path: load::SMALL_PATH,
    };
    let target = rig.listeners.ours;
    let load_fut = load::run(&shape, target, spec.window_s, 2, out_dir, "scale_ours");
    let rig_ref: &Rig = rig;
    let swaps = async {
        let mut notes = Vec::new();
        let mut steps = Vec::new();
        let mut routes_applied = true;
        let cfg = &rig_ref.ours_config;
        // Let wrk reach steady state before the first swap.
        sleep(Duration::from_secs(2)).await;
        for cycle in 1..=spec.cycles {
            // Only the first cycle's probes are reported; later cycles repeat the same checks silently.
            let mut cycle_notes = Vec::new();
            let big = cfg.render(Scale::ServicesAndRoutes { n, variant: 1 });
            let first = swap(rig_ref, cycle, &format!("1 → {n} Services + {n} HTTPRoutes"), &big).await?;
            if let Some(why) = &first.rejection {
                cycle_notes.push(format!(
                    "the HTTPRoutes were rejected ({why}); measured with Services only"
                ));
                routes_applied = false;
                steps.push(first);
                let services = cfg.render(Scale::Services(n));
                steps.push(swap(rig_ref, cycle, &format!("1 → {n} Services (no routes)"), &services).await?);
                let mut changed = services;
                changed.push_str("# revision 2\n");
                steps.push(
                    swap(
                        rig_ref,
                        cycle,
                        &format!("{n} → {n} Services (file rewritten)"),
                        &changed,
                    )
                    .await?,
                );
            } else {
                steps.push(first);
                if !probe_routes(rig_ref, probe, 1, &mut cycle_notes).await? {
                    routes_applied = false;
                    cycle_notes.push("the HTTPRoutes were accepted but are not in force (see the probe above)".into());
                }
                let changed = cfg.render(Scale::ServicesAndRoutes { n, variant: 2 });
                let what = format!("{n} → {n}, every HTTPRoute's path changed");
                steps.push(swap(rig_ref, cycle, &what, &changed).await?);
                if routes_applied && !probe_routes(rig_ref, probe, 2, &mut cycle_notes).await? {
                    routes_applied = false;
                    cycle_notes.push("the changed routes are not in force".into());
                }
            }
            let base = cfg.render(Scale::None);
            steps.push(swap(rig_ref, cycle, &format!("{n} → 1 Service (base config)"), &base).await?);
            if cycle == 1 {
                notes.extend(cycle_notes);
            }
        }
        anyhow::Ok((steps, notes, routes_applied))
    };
    let started = Instant::now();
    let sampled_peak = std::cell::Cell::new(0u64);
    let (load_res, swap_res) = tokio::select! {
        r = async { tokio::join!(load_fut, swaps) } => r,
        () = crate::measure::sample_rss(Some(pid), &sampled_peak) => unreachable!("the sampler never ends"),
    };
    let (steps, mut notes, routes_applied) = swap_res?;
    if started.elapsed().as_secs() > spec.window_s + 5 {
        notes.push(format!(
            "the swaps took longer than the {} s load window: later swaps ran without load",
            spec.window_s
        ));
    }
    let peak = procfs::status_kib(pid, "VmHWM")?.max(sampled_peak.get());
    rig.check_alive()?;
    let (load, load_error) = match load_res {
        Ok(l) => (Some(l), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    Ok(ScaleResult {
        n,
        cycles: spec.cycles,
        routes_applied,
        notes,
        steps,
        load,
        load_error,
        window_s: spec.window_s,
        rss_before_kib: rss_before,
        peak_rss_kib: peak,
        watch_interval: rig.ours_config.watch_interval.clone(),
    })
}
