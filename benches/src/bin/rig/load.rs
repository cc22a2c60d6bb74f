//! Load shapes and the load tools that drive them: `wrk` for HTTP/1.1 and `h2load` for HTTP/2 (h2c with prior
//! knowledge, many streams on one connection), both parsed into one outcome type.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;
use tokio::time::timeout;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// HTTP/1.1, `conns` keep-alive connections (or one request per connection with `close`).
    Wrk { conns: u32, close: bool },
    /// HTTP/2 prior knowledge: `conns` connections with up to `streams` concurrent streams each.
    H2load { conns: u32, streams: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub id: String,
    pub title: String,
    pub tool: Tool,
    /// Request path: "/" answers 1 KiB, "/1m" 1 MiB.
    pub path: &'static str,
}

pub const SMALL_PATH: &str = "/";
pub const LARGE_PATH: &str = "/1m";

/// Every shape the rig knows, in run order.
pub fn all_shapes(h2_streams: u32) -> Vec<Shape> {
    let wrk = |id: &str, title: &str, conns, close, path| Shape {
        id: id.into(),
        title: title.into(),
        tool: Tool::Wrk { conns, close },
        path,
    };
    vec![
        wrk(
            "h1-c1",
            "HTTP/1.1 keep-alive, 1 connection, 1 KiB",
            1,
            false,
            SMALL_PATH,
        ),
        wrk(
            "h1-c16",
            "HTTP/1.1 keep-alive, 16 connections, 1 KiB",
            16,
            false,
            SMALL_PATH,
        ),
        wrk(
            "h1-c64",
            "HTTP/1.1 keep-alive, 64 connections, 1 KiB",
            64,
            false,
            SMALL_PATH,
        ),
        wrk(
            "h1-close-c16",
            "HTTP/1.1 Connection: close, 16 connections, 1 KiB (one tunnel per request)",
            16,
            true,
            SMALL_PATH,
        ),
        wrk(
            "h1-1mib-c16",
            "HTTP/1.1 keep-alive, 16 connections, 1 MiB",
            16,
            false,
            LARGE_PATH,
        ),
        Shape {
            id: "h2-m".to_owned() + &h2_streams.to_string(),
            title: format!("HTTP/2 (h2c prior knowledge), 1 connection, {h2_streams} concurrent streams, 1 KiB"),
            tool: Tool::H2load {
                conns: 1,
                streams: h2_streams,
            },
            path: SMALL_PATH,
        },
    ]
}

impl Shape {
    pub fn is_h2(&self) -> bool {
        matches!(self.tool, Tool::H2load { .. })
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOutcome {
    /// Completed responses in the measured interval (any status).
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Connect/read/write errors, timeouts, failed streams.
    pub socket_errors: u64,
    /// Responses that were not 2xx/3xx.
    pub non_2xx: u64,
}

impl LoadOutcome {
    pub fn errors(&self) -> u64 {
        self.socket_errors + self.non_2xx
    }
}

/// Runs `shape` against `target` for `secs` seconds; the tool's raw output is kept in `out_dir/<tag>.txt`.
pub async fn run(
    shape: &Shape,
    target: SocketAddr,
    secs: u64,
    wrk_threads: u32,
    out_dir: &Path,
    tag: &str,
) -> Result<LoadOutcome> {
    let url = format!("http://{target}{}", shape.path);
    let raw_path = out_dir.join(format!("{tag}.txt"));
    let mut cmd;
    let mut h2_log = None;
    match shape.tool {
        Tool::Wrk { conns, close } => {
            cmd = Command::new("wrk");
            // wrk refuses more threads than connections.
            let threads = wrk_threads.clamp(1, conns);
            cmd.args([format!("-t{threads}"), format!("-c{conns}"), format!("-d{secs}s")])
                .args(["--latency", "--timeout", "5s"]);
            if close {
                cmd.args(["-H", "Connection: close"]);
            }
            cmd.arg(&url);
        }
        Tool::H2load { conns, streams } => {
            // h2load prints no percentiles; they come from its per-request log.
            let log = out_dir.join(format!("{tag}.h2log"));
            cmd = Command::new("h2load");
            cmd.args([
                format!("-c{conns}"),
                format!("-m{streams}"),
                "-t1".to_owned(),
                format!("-D{secs}"),
            ])
            .arg(format!("--log-file={}", log.display()))
            .arg(&url);
            h2_log = Some(log);
        }
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = timeout(Duration::from_secs(secs + 60), cmd.output())
        .await
        .with_context(|| format!("{tag}: load tool still running {} s after its duration", 60))?
        .with_context(|| format!("{tag}: run load tool"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&raw_path, &text).with_context(|| format!("write {}", raw_path.display()))?;
    if !out.status.success() {
        bail!("{tag}: load tool exited with {}:\n{text}", out.status);
    }
    let parsed = match &h2_log {
        None => parse_wrk(&text),
        Some(log) => {
            let log_text = std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
            let r = parse_h2load(&text, &log_text);
            // The per-request log is large and fully summarised by the percentiles.
            let _ = std::fs::remove_file(log);
            r
        }
    };
    parsed.with_context(|| format!("{tag}: cannot parse load tool output (kept in {})", raw_path.display()))
}

/// A latency as wrk prints it (`812.00us`, `1.23ms`, `2.01s`, `1.00m`) in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

pub fn parse_wrk(text: &str) -> Result<LoadOutcome> {
    let mut o = LoadOutcome::default();
    let (mut have_req, mut have_rps) = (false, false);
    for line in text.lines() {
        let t = line.trim();
        let f: Vec<&str> = t.split_whitespace().collect();
        match f.as_slice() {
            ["50%", v] => o.p50_ms = wrk_ms(v).context("p50")?,
            ["90%", v] => o.p90_ms = wrk_ms(v).context("p90")?,
            ["99%", v] => o.p99_ms = wrk_ms(v).context("p99")?,
            [n, "requests", "in", ..] => {
                o.requests = n.parse().context("request count")?;
                have_req = true;
            }
            ["Requests/sec:", v] => {
                o.rps = v.parse().context("requests/sec")?;
                have_rps = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => o.non_2xx = n.parse().context("non-2xx")?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                o.socket_errors = rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    if !have_req || !have_rps {
        bail!("no request count / rate in wrk output");
    }
    Ok(o)
}

pub fn parse_h2load(summary: &str, log: &str) -> Result<LoadOutcome> {
    let mut o = LoadOutcome::default();
    let mut seen = (false, false);
    for line in summary.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in ") {
            // "finished in 10.00s, 12345.60 req/s, 13.02MB/s"
            let rate = rest.split(", ").nth(1).and_then(|r| r.strip_suffix(" req/s"));
            o.rps = rate.context("req/s")?.parse()?;
            seen.0 = true;
        } else if let Some(rest) = t.strip_prefix("requests: ") {
            // "N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            for part in rest.split(", ") {
                let mut it = part.split_whitespace();
                let (Some(n), Some(what)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: u64 = n.parse().with_context(|| format!("requests field {part:?}"))?;
                match what {
                    "done" => o.requests = n,
                    // h2load's "failed" already includes the errored and timed-out streams.
                    "failed" => o.socket_errors = n,
                    _ => {}
                }
            }
            seen.1 = true;
        } else if let Some(rest) = t.strip_prefix("status codes: ") {
            // "N 2xx, N 3xx, N 4xx, N 5xx"
            for part in rest.split(", ") {
                let mut it = part.split_whitespace();
                if let (Some(n), Some("4xx" | "5xx")) = (it.next(), it.next()) {
                    o.non_2xx += n.parse::<u64>()?;
                }
            }
        }
    }
    if !(seen.0 && seen.1) {
        bail!("no 'finished in' / 'requests:' lines in h2load output");
    }
    let mut lat: Vec<f64> = Vec::new();
    for line in log.lines() {
        let mut f = line.split('\t');
        let (_, Some(status), Some(us)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if status.trim() == "-1" {
            continue;
        }
        if let Ok(us) = us.trim().parse::<f64>() {
            lat.push(us / 1000.0);
        }
    }
    if lat.is_empty() {
        bail!("h2load per-request log has no completed requests");
    }
    lat.sort_by(f64::total_cmp);
    o.p50_ms = percentile(&lat, 50.0);
    o.p90_ms = percentile(&lat, 90.0);
    o.p99_ms = percentile(&lat, 99.0);
    Ok(o)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 2s test @ http://127.0.0.1:15001/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   806.34us  331.66us   8.00ms   83.28%
    Req/Sec    10.02k   602.54    11.17k    72.50%
  Latency Distribution
     50%  752.00us
     75%    0.92ms
     90%    1.12ms
     99%    1.61s
  39862 requests in 2.00s, 44.26MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  19920.83
Transfer/sec:     22.12MB
";

    #[test]
    fn wrk_output() {
        let o = parse_wrk(WRK).unwrap();
        assert_eq!(o.requests, 39862);
        assert!((o.rps - 19920.83).abs() < 1e-9);
        assert!((o.p50_ms - 0.752).abs() < 1e-9);
        assert!((o.p90_ms - 1.12).abs() < 1e-9);
        assert!((o.p99_ms - 1610.0).abs() < 1e-9);
        assert_eq!((o.socket_errors, o.non_2xx, o.errors()), (5, 7, 12));
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn h2load_output() {
        let summary = "starting benchmark...
finished in 2.00s, 25000.50 req/s, 27.10MB/s
requests: 50001 total, 50001 started, 50001 done, 49990 succeeded, 11 failed, 11 errored, 0 timeout
status codes: 49990 2xx, 0 3xx, 1 4xx, 0 5xx
";
        let mut log = String::new();
        for i in 1..=100 {
            log.push_str(&format!("1700000000000000\t200\t{}\n", i * 1000));
        }
        log.push_str("1700000000000000\t-1\t999999999\n");
        let o = parse_h2load(summary, &log).unwrap();
        assert_eq!(o.requests, 50001);
        assert!((o.rps - 25000.5).abs() < 1e-9);
        assert_eq!((o.socket_errors, o.non_2xx), (11, 1));
        assert_eq!((o.p50_ms, o.p90_ms, o.p99_ms), (50.0, 90.0, 99.0));
    }

    #[test]
    fn nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.0);
        assert_eq!(percentile(&v, 99.0), 4.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
    }
}
