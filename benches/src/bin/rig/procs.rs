//! Long-running processes of the rig (backend, Envoys, our waypoint): started with their output in a log file,
//! stopped by their own PID when dropped, whatever way the harness exits.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::time::{Instant, sleep};

use crate::http1;

pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout + stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        eprintln!("[rig] started {name} (pid {})", child.id());
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of its log when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail(30)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = read_tail(&self.log, 64 * 1024);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGKILL: nothing here needs a graceful drain, and the measurements are over when a process is dropped.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        eprintln!("[rig] stopped {} (pid {})", self.name, self.child.id());
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

/// `name` on `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// First line of `bin args` (stdout, else stderr), for version strings.
pub fn version_of(bin: &Path, args: &[&str]) -> String {
    match Command::new(bin).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            let text = String::from_utf8_lossy(&text);
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or_default()
                .to_owned()
        }
        Err(e) => format!("unavailable ({e})"),
    }
}

// ------------------------------------------------------------------------------------------------ Envoy

/// An Envoy started from a bootstrap the rig generated (or rendered through `waypoint_conformance::envoy`), with a
/// configurable `--concurrency`: the conformance helper runs Envoy with one worker, the baseline needs two.
pub struct EnvoyProc {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

pub struct EnvoyLaunch<'a> {
    pub bin: &'a Path,
    pub role: &'a str,
    pub dir: PathBuf,
    pub bootstrap: &'a Value,
    /// (file name in `dir`, contents): PEM files the bootstrap names relative to its working directory.
    pub files: &'a [(&'a str, &'a str)],
    pub concurrency: u32,
}

impl EnvoyLaunch<'_> {
    /// Writes the files, checks the bootstrap with `envoy --mode validate`, starts Envoy and waits until its admin
    /// endpoint says LIVE.
    pub async fn start(self) -> Result<EnvoyProc> {
        fs::create_dir_all(&self.dir).with_context(|| format!("create {}", self.dir.display()))?;
        for (name, contents) in self.files {
            fs::write(self.dir.join(name), contents).with_context(|| format!("write {name}"))?;
        }
        // Every file the bootstrap names must be one we wrote: a renamed PEM file in the rendering code would
        // otherwise surface as an obscure Envoy startup error.
        let mut named = Vec::new();
        collect_filenames(self.bootstrap, &mut named);
        for f in &named {
            if !Path::new(f).is_absolute() && !self.files.iter().any(|(n, _)| n == f) {
                bail!("{} bootstrap names file {f:?}, which the rig did not write", self.role);
            }
        }
        let config = self.dir.join("envoy.json");
        fs::write(&config, serde_json::to_string_pretty(self.bootstrap)?)?;

        let validate = Command::new(self.bin)
            .args(["--mode", "validate", "-c", "envoy.json", "--log-level", "error"])
            .current_dir(&self.dir)
            .output()
            .with_context(|| format!("run {} --mode validate", self.bin.display()))?;
        if !validate.status.success() {
            bail!(
                "{}: envoy --mode validate -c {} failed:\n{}{}",
                self.role,
                config.display(),
                String::from_utf8_lossy(&validate.stdout),
                String::from_utf8_lossy(&validate.stderr)
            );
        }

        let admin_file = self.dir.join("admin-address");
        let _ = fs::remove_file(&admin_file);
        let mut cmd = Command::new(self.bin);
        cmd.args(["-c", "envoy.json"])
            // Several Envoys on one host: no shared-memory hot-restart state to collide on.
            .arg("--disable-hot-restart")
            .args(["--concurrency", &self.concurrency.to_string()])
            .args(["--log-level", "warning"])
            // Access logs are buffered; the end-to-end check reads the destination's log within a second.
            .args(["--file-flush-interval-msec", "200"])
            .args(["--admin-address-path", "admin-address"])
            .current_dir(&self.dir);
        let mut proc = Proc::spawn(self.role, &mut cmd, &self.dir.join("envoy.log"))?;
        let admin = wait_envoy_live(&mut proc, &admin_file).await?;
        Ok(EnvoyProc {
            proc,
            admin,
            dir: self.dir,
        })
    }
}

fn collect_filenames(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("filename", Value::String(s)) => out.push(s.clone()),
                    _ => collect_filenames(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_filenames(v, out)),
        _ => {}
    }
}

async fn wait_envoy_live(proc: &mut Proc, admin_file: &Path) -> Result<SocketAddr> {
    let start = Instant::now();
    let mut last = String::from("admin address not written yet");
    while start.elapsed() < Duration::from_secs(30) {
        proc.check_alive()?;
        if let Some(addr) = fs::read_to_string(admin_file)
            .ok()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok())
        {
            match http1::get(addr, "/ready", Duration::from_secs(2)).await {
                Ok(r) if r.text().trim() == "LIVE" => return Ok(addr),
                Ok(r) => last = format!("/ready: {} {:?}", r.status, r.text().trim()),
                Err(e) => last = format!("{e:#}"),
            }
        }
        sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} not LIVE after 30 s ({last}); log:\n{}",
        proc.name,
        proc.log_tail(30)
    )
}

impl EnvoyProc {
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        let r = http1::get(self.admin, path, Duration::from_secs(5)).await?;
        if r.status != 200 {
            bail!("{} admin {path}: status {}", self.proc.name, r.status);
        }
        Ok(r.text())
    }

    /// Bound address of each static listener, by name.
    pub async fn listeners(&self) -> Result<Vec<(String, SocketAddr)>> {
        let v: Value = serde_json::from_str(&self.admin_get("/listeners?format=json").await?)?;
        let mut out = Vec::new();
        for l in v["listener_statuses"].as_array().into_iter().flatten() {
            let sa = &l["local_address"]["socket_address"];
            if let (Some(name), Some(ip), Some(port)) =
                (l["name"].as_str(), sa["address"].as_str(), sa["port_value"].as_u64())
            {
                let ip: IpAddr = ip.parse()?;
                out.push((name.to_owned(), SocketAddr::new(ip, u16::try_from(port)?)));
            }
        }
        Ok(out)
    }

    /// Counters and gauges whose name contains `filter` (Envoy treats it as a regex).
    pub async fn stats(&self, filter: &str) -> Result<Vec<(String, u64)>> {
        let body = self.admin_get(&format!("/stats?filter={filter}")).await?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(n, v)| Some((n.to_owned(), v.trim().parse().ok()?)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_named_files() {
        let v = serde_json::json!({"a": [{"filename": "x.pem"}, {"b": {"filename": "/abs/y"}}], "filename": 3});
        let mut out = Vec::new();
        collect_filenames(&v, &mut out);
        out.sort();
        assert_eq!(out, vec!["/abs/y".to_owned(), "x.pem".to_owned()]);
    }
}
