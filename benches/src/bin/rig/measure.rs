//! One measured run: wait for a quiet machine, warm up, then run the load tool while reading every rig process's
//! CPU time, the machine's CPU split and the active waypoint's memory around it.

use std::cell::Cell;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use tokio::time::{Instant, sleep};

use crate::load::{self, LoadOutcome, Shape};
use crate::procfs::{self, SysCpu};
use crate::topology::{PathKind, Rig};

#[derive(Debug, Clone, Copy)]
pub struct QuietPolicy {
    /// Busy share (all CPUs, percent) under which the machine counts as quiet while the rig is idle.
    pub max_busy_pct: f64,
    /// Consecutive quiet seconds required.
    pub quiet_secs: u32,
    /// How long to wait for that; 0 = never wait.
    pub max_wait: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet {
    /// Time spent in the check, including the required quiet seconds.
    pub waited_s: f64,
    /// Busy share in the last one-second sample.
    pub busy_pct: f64,
    /// False when the wait timed out and the run went ahead on a busy machine.
    pub ok: bool,
}

/// Waits (bounded) until the machine has been mostly idle for `quiet_secs` consecutive one-second samples of
/// `/proc/stat`. Other people's builds on a shared 2-core box move every number, and a single quiet second is
/// often just the gap between two compiler jobs; a run that starts busy is flagged in the report.
pub async fn wait_quiet(p: QuietPolicy) -> Result<Quiet> {
    if p.max_wait.is_zero() {
        return Ok(Quiet {
            ok: true,
            ..Quiet::default()
        });
    }
    let start = Instant::now();
    let mut announced = false;
    let mut quiet_run = 0;
    let mut a = SysCpu::read()?;
    loop {
        sleep(Duration::from_secs(1)).await;
        let b = SysCpu::read()?;
        let busy = b.since(&a).busy_pct();
        a = b;
        let waited = start.elapsed().as_secs_f64();
        quiet_run = if busy <= p.max_busy_pct { quiet_run + 1 } else { 0 };
        if quiet_run >= p.quiet_secs.max(1) {
            if announced {
                eprintln!("[rig] quiet again after {waited:.0} s");
            }
            return Ok(Quiet {
                waited_s: waited,
                busy_pct: busy,
                ok: true,
            });
        }
        if busy > p.max_busy_pct && !announced {
            eprintln!(
                "[rig] machine {busy:.0}% busy while the rig is idle (someone else's load?); waiting up to {} s",
                p.max_wait.as_secs()
            );
            announced = true;
        }
        if start.elapsed() >= p.max_wait {
            eprintln!("[rig] WARNING: not quiet after {waited:.0} s ({busy:.0}% busy); measuring anyway");
            return Ok(Quiet {
                waited_s: waited,
                busy_pct: busy,
                ok: false,
            });
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub shape: String,
    pub path: PathKind,
    pub rep: u32,
    pub load: LoadOutcome,
    pub wall_s: f64,
    /// The active waypoint's CPU (utime + stime, whole process) during the measured interval.
    pub wp_cpu_s: Option<f64>,
    /// max(VmHWM after a reset right before the measured interval, VmRSS sampled every 100 ms): this run's peak.
    pub wp_peak_rss_kib: Option<u64>,
    pub wp_rss_after_kib: Option<u64>,
    pub src_zt_cpu_s: f64,
    pub dest_zt_cpu_s: f64,
    pub backend_cpu_s: f64,
    pub loadgen_cpu_s: f64,
    /// CPU of processes outside the rig (and of the idle waypoint, reported apart), in cores.
    pub others_cores: f64,
    pub idle_wp_cores: f64,
    /// irq + softirq (loopback networking, charged to no process), in cores.
    pub irq_cores: f64,
    pub busy_pct: f64,
    pub steal_pct: f64,
    pub quiet: Quiet,
}

impl RunResult {
    pub fn wp_ms_per_1k(&self) -> Option<f64> {
        Some(self.wp_cpu_s? * 1000.0 / self.k_requests())
    }

    /// Requests served per CPU-second of the waypoint.
    pub fn req_per_wp_cpu_s(&self) -> Option<f64> {
        let cpu = self.wp_cpu_s?;
        (cpu > 0.0).then(|| self.load.requests as f64 / cpu)
    }

    pub fn ms_per_1k(&self, cpu_s: f64) -> f64 {
        cpu_s * 1000.0 / self.k_requests()
    }

    fn k_requests(&self) -> f64 {
        (self.load.requests as f64 / 1000.0).max(1e-9)
    }
}

struct Sample {
    at: Instant,
    ticks: Vec<u64>,
    children: u64,
    me: u64,
    sys: SysCpu,
}

fn sample(pids: &[u32]) -> Result<Sample> {
    // Process times first and the machine total last, so the "others" difference cannot go negative by much.
    let ticks = pids.iter().map(|p| procfs::cpu_ticks(*p)).collect::<Result<Vec<_>>>()?;
    Ok(Sample {
        at: Instant::now(),
        ticks,
        children: procfs::self_children_ticks()?,
        me: procfs::self_ticks()?,
        sys: SysCpu::read()?,
    })
}

/// Samples VmRSS every 100 ms into `peak`, forever. The kernel updates VmHWM lazily (RSS counters are cached per
/// thread and the high-water mark is refreshed only on some paths), so the reported peak is the larger of the two.
pub async fn sample_rss(pid: Option<u32>, peak: &Cell<u64>) {
    loop {
        if let Some(rss) = pid.and_then(|p| procfs::status_kib(p, "VmRSS").ok()) {
            peak.set(peak.get().max(rss));
        }
        sleep(Duration::from_millis(100)).await;
    }
}

pub struct RunSpec<'a> {
    pub shape: &'a Shape,
    pub path: PathKind,
    pub rep: u32,
    pub duration: u64,
    pub warmup: u64,
    pub wrk_threads: u32,
    pub out_dir: &'a Path,
    pub quiet: QuietPolicy,
}

pub async fn run_one(rig: &mut Rig, s: &RunSpec<'_>) -> Result<RunResult> {
    let target = rig.target(s.path, s.shape.is_h2());
    let tag = format!("{}_{}_r{}", s.shape.id, s.path.id(), s.rep);
    let quiet = wait_quiet(s.quiet).await?;
    if s.warmup > 0 {
        // Warm-up with the same shape: pools, tunnels and caches exist before the measured interval.
        if let Err(e) = load::run(
            s.shape,
            target,
            s.warmup,
            s.wrk_threads,
            s.out_dir,
            &format!("{tag}_warmup"),
        )
        .await
        {
            eprintln!("[rig] warm-up {tag}: {e:#}");
        }
        sleep(Duration::from_millis(300)).await;
    }
    let wp = rig.waypoint_pid(s.path);
    if let Some(pid) = wp {
        procfs::reset_peak_rss(pid)?;
    }
    // Order: ours, envoy, src_zt, dest_zt, backend (Rig::pids).
    let pids: Vec<u32> = rig.pids().into_iter().map(|(_, p)| p).collect();
    let before = sample(&pids)?;
    let outcome = load::run(s.shape, target, s.duration, s.wrk_threads, s.out_dir, &tag).await;
    let after = sample(&pids)?;
    let (peak, rss) = match wp {
        Some(pid) => (
            Some(procfs::status_kib(pid, "VmHWM")?),
            Some(procfs::status_kib(pid, "VmRSS")?),
        ),
        None => (None, None),
    };
    rig.check_alive()?;
    let load = outcome?;

    let tck = procfs::clk_tck();
    let d: Vec<f64> = before
        .ticks
        .iter()
        .zip(&after.ticks)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / tck)
        .collect();
    let cpu = |i: usize| d.get(i).copied().unwrap_or(0.0);
    let (ours_s, envoy_s, src_s, dest_s, backend_s) = (cpu(0), cpu(1), cpu(2), cpu(3), cpu(4));
    let loadgen_s = after.children.saturating_sub(before.children) as f64 / tck;
    let me_s = after.me.saturating_sub(before.me) as f64 / tck;
    let wall = (after.at - before.at).as_secs_f64().max(1e-9);
    let sys = after.sys.since(&before.sys);
    let sys_process_s = sys.process as f64 / tck;
    let (wp_cpu, idle_wp) = match s.path {
        PathKind::Ours => (Some(ours_s), envoy_s),
        PathKind::Envoy => (Some(envoy_s), ours_s),
        PathKind::NoWaypoint => (None, ours_s + envoy_s),
    };
    let rig_s = ours_s + envoy_s + src_s + dest_s + backend_s + loadgen_s + me_s;
    let result = RunResult {
        shape: s.shape.id.clone(),
        path: s.path,
        rep: s.rep,
        wall_s: wall,
        wp_cpu_s: wp_cpu,
        wp_peak_rss_kib: peak,
        wp_rss_after_kib: rss,
        src_zt_cpu_s: src_s,
        dest_zt_cpu_s: dest_s,
        backend_cpu_s: backend_s,
        loadgen_cpu_s: loadgen_s,
        others_cores: ((sys_process_s - rig_s) / wall).max(0.0),
        idle_wp_cores: idle_wp / wall,
        irq_cores: sys.irq as f64 / tck / wall,
        busy_pct: sys.busy_pct(),
        steal_pct: sys.steal_pct(),
        quiet,
        load,
    };
    eprintln!(
        "[rig] r{} {:<13} {:<11} rps={:>8.0} p50={:.3}ms p99={:.3}ms err={} wp={} busy={:.0}% others={:.2} cores",
        s.rep,
        s.shape.id,
        s.path.label(),
        result.load.rps,
        result.load.p50_ms,
        result.load.p99_ms,
        result.load.errors(),
        result
            .wp_ms_per_1k()
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms/1k req")),
        result.busy_pct,
        result.others_cores
    );
    Ok(result)
}
