//! RESULTS.md: medians with their spread per load shape, the ours/Envoy ratios against the targets (computed per
//! repetition from runs taken back to back, so slow drift of a shared machine cancels), and the config-scale case.

use std::fmt::Write as _;

use crate::load::Shape;
use crate::measure::RunResult;
use crate::scale::ScaleResult;
use crate::topology::PathKind;

pub struct Machine {
    pub nproc: String,
    pub cpu_model: String,
    pub kernel: String,
    pub memory: String,
    pub envoy: String,
    pub rustc: String,
    pub wrk: String,
    pub h2load: String,
    pub backend: String,
    pub waypoint_bin: String,
    pub git: String,
}

pub struct Report<'a> {
    pub command: String,
    pub started: String,
    pub finished: String,
    pub machine: &'a Machine,
    pub settings: Vec<String>,
    pub e2e: &'a [String],
    pub shapes: &'a [Shape],
    pub results: &'a [RunResult],
    pub scale: Option<&'a ScaleResult>,
    pub scale_error: Option<String>,
    pub notes: &'a [String],
}

/// Targets for ours relative to Envoy.
pub const TARGET_REQ_PER_CPU: f64 = 2.0;
pub const TARGET_ADDED_P99: f64 = 0.5;
pub const TARGET_RSS: f64 = 0.25;

const PATHS: [PathKind; 3] = [PathKind::NoWaypoint, PathKind::Ours, PathKind::Envoy];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

fn num(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

/// `median (min–max)`, or just the value for a single run; `—` when there is nothing.
fn cell(values: &[f64], decimals: usize) -> String {
    match spread(values) {
        None => "—".into(),
        Some(s) if s.n == 1 || (s.min == s.max) => num(s.median, decimals),
        Some(s) => format!(
            "{} ({}–{})",
            num(s.median, decimals),
            num(s.min, decimals),
            num(s.max, decimals)
        ),
    }
}

fn runs<'a>(results: &'a [RunResult], shape: &str, path: PathKind) -> Vec<&'a RunResult> {
    results.iter().filter(|r| r.shape == shape && r.path == path).collect()
}

fn run_at<'a>(results: &'a [RunResult], shape: &str, path: PathKind, rep: u32) -> Option<&'a RunResult> {
    results
        .iter()
        .find(|r| r.shape == shape && r.path == path && r.rep == rep)
}

/// Per-repetition ratios ours/Envoy for one shape.
#[derive(Debug, Default)]
pub struct Ratios {
    pub req_per_cpu: Vec<f64>,
    pub added_p99_ours: Vec<f64>,
    pub added_p99_envoy: Vec<f64>,
    pub added_p99: Vec<f64>,
    pub rss: Vec<f64>,
    /// Repetitions where Envoy added no p99 latency, so the ratio is undefined.
    pub p99_undefined: usize,
}

pub fn ratios(results: &[RunResult], shape: &str) -> Ratios {
    let mut r = Ratios::default();
    let mut reps: Vec<u32> = results.iter().filter(|x| x.shape == shape).map(|x| x.rep).collect();
    reps.sort_unstable();
    reps.dedup();
    for rep in reps {
        let (Some(o), Some(e)) = (
            run_at(results, shape, PathKind::Ours, rep),
            run_at(results, shape, PathKind::Envoy, rep),
        ) else {
            continue;
        };
        if let (Some(a), Some(b)) = (o.req_per_wp_cpu_s(), e.req_per_wp_cpu_s()) {
            r.req_per_cpu.push(a / b);
        }
        if let (Some(a), Some(b)) = (o.wp_peak_rss_kib, e.wp_peak_rss_kib)
            && b > 0
        {
            r.rss.push(a as f64 / b as f64);
        }
        if let Some(n) = run_at(results, shape, PathKind::NoWaypoint, rep) {
            let (ao, ae) = (o.load.p99_ms - n.load.p99_ms, e.load.p99_ms - n.load.p99_ms);
            r.added_p99_ours.push(ao);
            r.added_p99_envoy.push(ae);
            // A ratio against a non-positive baseline says nothing (Envoy added no latency in that rep).
            if ae > 0.0 {
                r.added_p99.push(ao.max(0.0) / ae);
            } else {
                r.p99_undefined += 1;
            }
        }
    }
    r
}

fn verdict(values: &[f64], target: f64, higher_is_better: bool) -> String {
    let Some(s) = spread(values) else {
        return "—".into();
    };
    let meets = |v: f64| if higher_is_better { v >= target } else { v <= target };
    match (meets(s.median), meets(s.min) && meets(s.max)) {
        (true, true) => "met (every rep)".into(),
        (true, false) => "met (median; not every rep)".into(),
        (false, _) => "**missed**".into(),
    }
}

fn ratio_cell(values: &[f64]) -> String {
    match spread(values) {
        None => "—".into(),
        Some(s) if s.n == 1 => format!("{:.2}×", s.median),
        Some(s) => format!("{:.2}× ({:.2}–{:.2})", s.median, s.min, s.max),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Report<'_> {
    pub fn render(&self) -> String {
        let mut o = String::new();
        let m = self.machine;
        let _ = writeln!(o, "# Waypoint end-to-end benchmark: ours vs Envoy\n");
        let _ = writeln!(
            o,
            "Generated by `benches/src/bin/rig` — do not edit by hand; rerun the command below.\n"
        );
        let _ = writeln!(o, "```\n{}\n```\n", self.command);
        let _ = writeln!(o, "Run {} → {}.\n", self.started, self.finished);
        let _ = writeln!(o, "## Machine\n");
        for (k, v) in [
            ("CPUs (`nproc`)", &m.nproc),
            ("CPU model", &m.cpu_model),
            ("kernel", &m.kernel),
            ("memory", &m.memory),
            ("Envoy", &m.envoy),
            ("rustc", &m.rustc),
            ("wrk", &m.wrk),
            ("h2load", &m.h2load),
            ("backend", &m.backend),
            ("our waypoint", &m.waypoint_bin),
            ("workspace", &m.git),
        ] {
            let _ = writeln!(o, "- {k}: {v}");
        }
        let _ = writeln!(o, "\n## Setup\n");
        for s in &self.settings {
            let _ = writeln!(o, "- {s}");
        }
        let _ = writeln!(o, "\nEnd-to-end check before measuring:\n\n```");
        for l in self.e2e {
            let _ = writeln!(o, "{l}");
        }
        let _ = writeln!(o, "```\n");
        if !self.notes.is_empty() {
            let _ = writeln!(o, "## Warnings\n");
            for n in self.notes {
                let _ = writeln!(o, "- {n}");
            }
            let _ = writeln!(o);
        }

        self.ratios_section(&mut o);
        self.shapes_section(&mut o);
        self.scale_section(&mut o);
        self.legend(&mut o);
        self.raw_section(&mut o);
        o
    }

    fn ratios_section(&self, o: &mut String) {
        let _ = writeln!(o, "## Ours / Envoy\n");
        let _ = writeln!(
            o,
            "Ratios are computed per repetition (ours, Envoy and the no-waypoint path ran back to back), then the \
             median and (min–max) over repetitions are shown.\n"
        );
        let _ = writeln!(
            o,
            "| shape | requests per waypoint CPU-second, ours/Envoy (target ≥ {TARGET_REQ_PER_CPU}×) | verdict | added p99 ours, ms | added p99 Envoy, ms | added p99 ours/Envoy (target ≤ {TARGET_ADDED_P99}×) | verdict | peak RSS ours/Envoy (target ≤ {TARGET_RSS}×) | verdict |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        for shape in self.shapes {
            let r = ratios(self.results, &shape.id);
            let mut p99_cell = ratio_cell(&r.added_p99);
            if r.p99_undefined > 0 {
                let _ = write!(p99_cell, " [{} rep(s): Envoy added ≤ 0 ms, no ratio]", r.p99_undefined);
            }
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                shape.id,
                ratio_cell(&r.req_per_cpu),
                verdict(&r.req_per_cpu, TARGET_REQ_PER_CPU, true),
                cell(&r.added_p99_ours, 3),
                cell(&r.added_p99_envoy, 3),
                p99_cell,
                verdict(&r.added_p99, TARGET_ADDED_P99, false),
                ratio_cell(&r.rss),
                verdict(&r.rss, TARGET_RSS, false),
            );
        }
        let _ = writeln!(o);
    }

    fn shapes_section(&self, o: &mut String) {
        let _ = writeln!(o, "## Per load shape\n");
        let _ = writeln!(
            o,
            "Medians over repetitions, (min–max) when they differ. Column meanings below.\n"
        );
        for shape in self.shapes {
            let _ = writeln!(o, "### `{}` — {}\n", shape.id, shape.title);
            let _ = writeln!(
                o,
                "| path | req/s | p50 ms | p90 ms | p99 ms | errors | wp CPU ms/1k req | req per wp CPU-s | wp peak RSS MiB | wp RSS after MiB | src-zt ms/1k | dest-zt ms/1k | backend ms/1k | load tool cores | idle wp cores | others cores | irq cores | busy % |"
            );
            let _ = writeln!(
                o,
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for path in PATHS {
                let rs = runs(self.results, &shape.id, path);
                if rs.is_empty() {
                    continue;
                }
                let f =
                    |g: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<f64> { rs.iter().filter_map(|r| g(r)).collect() };
                let errors: u64 = rs.iter().map(|r| r.load.errors()).sum();
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    path.label(),
                    cell(&f(&|r| Some(r.load.rps)), 0),
                    cell(&f(&|r| Some(r.load.p50_ms)), 3),
                    cell(&f(&|r| Some(r.load.p90_ms)), 3),
                    cell(&f(&|r| Some(r.load.p99_ms)), 3),
                    errors,
                    cell(&f(&|r| r.wp_ms_per_1k()), 1),
                    cell(&f(&|r| r.req_per_wp_cpu_s()), 0),
                    cell(&f(&|r| r.wp_peak_rss_kib.map(mib)), 1),
                    cell(&f(&|r| r.wp_rss_after_kib.map(mib)), 1),
                    cell(&f(&|r| Some(r.ms_per_1k(r.src_zt_cpu_s))), 1),
                    cell(&f(&|r| Some(r.ms_per_1k(r.dest_zt_cpu_s))), 1),
                    cell(&f(&|r| Some(r.ms_per_1k(r.backend_cpu_s))), 1),
                    cell(&f(&|r| Some(r.loadgen_cpu_s / r.wall_s)), 2),
                    cell(&f(&|r| Some(r.idle_wp_cores)), 2),
                    cell(&f(&|r| Some(r.others_cores)), 2),
                    cell(&f(&|r| Some(r.irq_cores)), 2),
                    cell(&f(&|r| Some(r.busy_pct)), 0),
                );
            }
            let _ = writeln!(o);
        }
    }

    fn scale_section(&self, o: &mut String) {
        let _ = writeln!(o, "## Config scale (our waypoint)\n");
        if let Some(e) = &self.scale_error {
            let _ = writeln!(o, "**Failed:** {e}\n");
        }
        let Some(s) = self.scale else {
            if self.scale_error.is_none() {
                let _ = writeln!(o, "Not run (`--scale-services 0`).\n");
            }
            return;
        };
        let _ = writeln!(
            o,
            "{} Services{}, all selecting the benchmarked pod. The file goes 1 → {} → {} (every route changed) → 1 \
             service, {} time(s), while wrk (HTTP/1.1, 16 keep-alive connections, {} s) drives the benchmarked \
             service through our waypoint. Apply time = from the atomic rename of the file to the first \
             `/config_dump` showing the next `snapshot.generation` (polled every 20 ms); it includes up to one file \
             poll interval (`spec.watchInterval: {}`). Median (min–max) over the cycles. The Envoy waypoint has no \
             equivalent here (a live change would need an xDS server).\n",
            s.n,
            if s.routes_applied {
                " each with one HTTPRoute (gateway.networking.k8s.io/v1, parentRef kind Service)"
            } else {
                " (HTTPRoutes not in force, see the notes below)"
            },
            s.n,
            s.n,
            s.cycles,
            s.window_s,
            s.watch_interval
        );
        let _ = writeln!(
            o,
            "| swap | file size | apply time ms | services after | RSS after MiB |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|");
        let mut kinds: Vec<&str> = Vec::new();
        for st in &s.steps {
            if !kinds.contains(&st.what.as_str()) {
                kinds.push(&st.what);
            }
        }
        for kind in kinds {
            let steps: Vec<_> = s.steps.iter().filter(|st| st.what == kind).collect();
            let applied: Vec<f64> = steps.iter().filter_map(|st| st.apply_ms).collect();
            let mut apply = cell(&applied, 0);
            let rejected = steps.iter().filter(|st| st.apply_ms.is_none()).count();
            if rejected > 0 {
                let why = steps
                    .iter()
                    .find_map(|st| st.rejection.as_deref())
                    .unwrap_or("never applied");
                let _ = write!(
                    apply,
                    " — rejected {rejected}×: {}",
                    why.lines().next().unwrap_or_default()
                );
            }
            let rss: Vec<f64> = steps.iter().map(|st| mib(st.rss_after_kib)).collect();
            let _ = writeln!(
                o,
                "| {} | {:.0} KiB | {} | {} | {} |",
                kind,
                steps.first().map_or(0.0, |st| st.file_bytes as f64 / 1024.0),
                apply,
                steps.last().map_or(0, |st| st.services_after),
                cell(&rss, 1)
            );
        }
        let _ = writeln!(
            o,
            "\nRSS before the swaps: {:.1} MiB; peak RSS during the window (max of VmHWM and 100 ms VmRSS samples): {:.1} MiB.\n",
            mib(s.rss_before_kib),
            mib(s.peak_rss_kib)
        );
        match (&s.load, &s.load_error) {
            (Some(l), _) => {
                let _ = writeln!(
                    o,
                    "Load during the swaps: {} requests, {:.0} req/s, p99 {:.3} ms, **{} errors** ({} socket errors, {} non-2xx){}.\n",
                    l.requests,
                    l.rps,
                    l.p99_ms,
                    l.errors(),
                    l.socket_errors,
                    l.non_2xx,
                    if l.errors() == 0 {
                        " — requests kept succeeding"
                    } else {
                        ""
                    }
                );
            }
            (None, Some(e)) => {
                let _ = writeln!(o, "Load during the swaps failed: {e}\n");
            }
            (None, None) => {}
        }
        for n in &s.notes {
            let _ = writeln!(o, "- {n}");
        }
        let _ = writeln!(o);
    }

    fn legend(&self, o: &mut String) {
        let _ = writeln!(
            o,
            r#"## Columns

- **path**: *no waypoint* = source ztunnel → destination ztunnel directly (authority podIP:port); *ours* / *Envoy* =
  source ztunnel → that waypoint → destination ztunnel. All three use the same Envoy ztunnels and backend.
- **req/s**, **p50/p90/p99 ms**: from the load tool over the measured interval (wrk `--latency`; for h2load the
  percentiles come from its per-request log). Closed loop: the load tool sends as fast as answers come back.
- **errors**: socket errors (connect/read/write/timeout, failed streams) + non-2xx/3xx responses, summed over all runs.
- **wp CPU ms/1k req**: the waypoint process's utime+stime (all threads, `/proc/PID/stat`) during the interval,
  per 1,000 requests. **req per wp CPU-s** is the same as requests per CPU-second (higher is better).
- **wp peak RSS**: the larger of VmHWM (reset through `/proc/PID/clear_refs` = 5 right before the interval, read
  after it) and VmRSS sampled every 100 ms during the interval; **RSS after**: VmRSS at the end. Both waypoints
  live for the whole invocation, so RSS also holds what earlier shapes left behind (allocator caches, pools).
- **src-zt / dest-zt / backend ms/1k**: CPU of the Envoy source ztunnel, Envoy destination ztunnel and backend per
  1,000 requests. **load tool cores**: wrk/h2load CPU ÷ wall time.
- **idle wp cores**: the other (unused) waypoint's background CPU. **others cores**: CPU charged to processes
  outside the rig during the run (other people's work on a shared machine; > 0.1 means the run was disturbed).
  **irq cores**: irq + softirq time (loopback networking). **busy %**: share of all CPUs busy during the run.
- **added p99** = waypoint p99 − no-waypoint p99 of the same repetition (ours is counted as 0 in the ratio when
  it is negative; the ratio is undefined when Envoy's is ≤ 0). Targets: ours ≥ 2× Envoy's requests per
  CPU-second, ≤ 0.5× Envoy's added p99, ≤ 0.25× Envoy's peak RSS.
"#
        );
    }

    fn raw_section(&self, o: &mut String) {
        let _ = writeln!(o, "## Every run\n");
        let _ = writeln!(
            o,
            "| rep | shape | path | requests | req/s | p50 ms | p90 ms | p99 ms | errors | wp CPU s | wp ms/1k | peak RSS MiB | others cores | busy % | steal % | quiet wait s (busy % before) |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in self.results {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.2} | {:.0} | {:.1} | {:.0} ({:.0}){} |",
                r.rep,
                r.shape,
                r.path.label(),
                r.load.requests,
                r.load.rps,
                r.load.p50_ms,
                r.load.p90_ms,
                r.load.p99_ms,
                r.load.errors(),
                r.wp_cpu_s.map_or("—".into(), |v| format!("{v:.2}")),
                r.wp_ms_per_1k().map_or("—".into(), |v| format!("{v:.1}")),
                r.wp_peak_rss_kib.map_or("—".into(), |v| format!("{:.1}", mib(v))),
                r.others_cores,
                r.busy_pct,
                r.steal_pct,
                r.quiet.waited_s,
                r.quiet.busy_pct,
                if r.quiet.ok { "" } else { " (not quiet)" },
            );
        }
        let _ = writeln!(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LoadOutcome;
    use crate::measure::Quiet;

    fn run(path: PathKind, rep: u32, p99: f64, cpu: Option<f64>, rss: Option<u64>) -> RunResult {
        RunResult {
            shape: "s".into(),
            path,
            rep,
            load: LoadOutcome {
                requests: 10_000,
                rps: 1000.0,
                p99_ms: p99,
                ..LoadOutcome::default()
            },
            wall_s: 10.0,
            wp_cpu_s: cpu,
            wp_peak_rss_kib: rss,
            wp_rss_after_kib: rss,
            src_zt_cpu_s: 0.0,
            dest_zt_cpu_s: 0.0,
            backend_cpu_s: 0.0,
            loadgen_cpu_s: 0.0,
            others_cores: 0.0,
            idle_wp_cores: 0.0,
            irq_cores: 0.0,
            busy_pct: 0.0,
            steal_pct: 0.0,
            quiet: Quiet::default(),
        }
    }

    #[test]
    fn spread_and_cells() {
        let s = spread(&[3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(spread(&[1.0, 2.0]).unwrap().median, 1.5);
        assert_eq!(cell(&[1.0, 2.0, 3.0], 1), "2.0 (1.0–3.0)");
        assert_eq!(cell(&[], 1), "—");
    }

    #[test]
    fn per_rep_ratios() {
        let results = vec![
            run(PathKind::NoWaypoint, 1, 1.0, None, None),
            run(PathKind::Ours, 1, 1.2, Some(1.0), Some(10_240)),
            run(PathKind::Envoy, 1, 2.0, Some(3.0), Some(40_960)),
            run(PathKind::NoWaypoint, 2, 1.0, None, None),
            run(PathKind::Ours, 2, 1.1, Some(1.0), Some(10_240)),
            run(PathKind::Envoy, 2, 0.9, Some(2.0), Some(40_960)),
        ];
        let r = ratios(&results, "s");
        assert_eq!(r.req_per_cpu, vec![3.0, 2.0]);
        assert_eq!(r.rss, vec![0.25, 0.25]);
        assert_eq!(r.added_p99.len(), 1);
        assert!((r.added_p99[0] - 0.2).abs() < 1e-9);
        assert_eq!(r.p99_undefined, 1);
        assert_eq!(verdict(&r.req_per_cpu, 2.0, true), "met (every rep)");
        assert_eq!(verdict(&[1.0, 3.0, 3.0], 2.0, true), "met (median; not every rep)");
        assert_eq!(verdict(&[0.6], 0.5, false), "**missed**");
    }
}
