//! What the rig reads from `/proc`: per-process CPU time and memory, the machine-wide CPU split, and which
//! sockets a process owns (to prove that nothing left 127.0.0.0/8).

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// Clock ticks per second of the `/proc/*/stat` time fields (USER_HZ; 100 on every Linux we run on, but asked for
/// rather than assumed).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The fields of a `/proc/PID/stat` line after the command name (which may contain spaces and parentheses):
/// index 0 is field 3 (`state`), so field N of proc(5) is index N - 3.
fn stat_fields(text: &str) -> Result<Vec<u64>> {
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("no ')' in stat line")?;
    // `state` is a letter; keep the positions by mapping non-numbers to 0.
    Ok(rest.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0)).collect())
}

fn read_stat(pid: &str) -> Result<Vec<u64>> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    stat_fields(&text)
}

/// utime + stime of a whole process (every thread is included), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let f = read_stat(&pid.to_string())?;
    Ok(f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
}

/// utime + stime of this process.
pub fn self_ticks() -> Result<u64> {
    let f = read_stat("self")?;
    Ok(f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
}

/// cutime + cstime of this process: CPU of children that have been waited for. A load tool's CPU is read as the
/// difference across its run, because it is reaped before we could read its own stat file.
pub fn self_children_ticks() -> Result<u64> {
    let f = read_stat("self")?;
    Ok(f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0))
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM` ...), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_status_kib(&text, key).with_context(|| format!("{key} in {path}"))
}

fn parse_status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resets `VmHWM` to the current RSS (proc(5): writing 5 to clear_refs), so the next `VmHWM` read is the peak of
/// the interval in between rather than of the process's whole life.
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    fs::write(&path, "5").with_context(|| format!("write {path}"))
}

/// Aggregate CPU time of the machine from the first line of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SysCpu {
    /// user + nice + system: time that some process was charged for.
    pub process: u64,
    /// irq + softirq: network stack work on loopback, charged to no process.
    pub irq: u64,
    /// idle + iowait.
    pub idle: u64,
    pub steal: u64,
}

impl SysCpu {
    pub fn read() -> Result<SysCpu> {
        let text = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        parse_sys_cpu(&text).context("no aggregate cpu line in /proc/stat")
    }

    pub fn since(&self, before: &SysCpu) -> SysCpu {
        SysCpu {
            process: self.process.saturating_sub(before.process),
            irq: self.irq.saturating_sub(before.irq),
            idle: self.idle.saturating_sub(before.idle),
            steal: self.steal.saturating_sub(before.steal),
        }
    }

    pub fn total(&self) -> u64 {
        self.process + self.irq + self.idle + self.steal
    }

    /// Share of the interval (all CPUs) that was busy, in percent.
    pub fn busy_pct(&self) -> f64 {
        pct(self.process + self.irq, self.total())
    }

    pub fn steal_pct(&self) -> f64 {
        pct(self.steal, self.total())
    }
}

fn pct(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * part as f64 / total as f64
    }
}

fn parse_sys_cpu(text: &str) -> Option<SysCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already included in user).
    Some(SysCpu {
        process: at(0) + at(1) + at(2),
        irq: at(5) + at(6),
        idle: at(3) + at(4),
        steal: at(7),
    })
}

// ------------------------------------------------------------------------------------------------ sockets

/// Socket inodes a process holds open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TcpEntry {
    local: SocketAddr,
    remote: SocketAddr,
    inode: u64,
}

/// Parses `/proc/net/tcp` or `/proc/net/tcp6` (addresses are the kernel's in-memory words printed as hex).
fn parse_net_tcp(text: &str) -> Vec<TcpEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(TcpEntry {
                local: parse_hex_addr(f.get(1)?)?,
                remote: parse_hex_addr(f.get(2)?)?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 32-bit word is printed as a host-order integer; on little-endian hosts its bytes are reversed.
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_le_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// TCP sockets of `pids` whose local address is not loopback, or whose peer is neither loopback nor unset (a
/// listener's peer is `0.0.0.0:0`). Empty when the rig stayed on 127.0.0.0/8.
pub fn non_loopback_sockets(pids: &[u32]) -> Result<Vec<String>> {
    let inodes: HashSet<u64> = pids.iter().flat_map(|p| socket_inodes(*p)).collect();
    let mut bad = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).with_context(|| format!("read {table}"))?;
        for e in parse_net_tcp(&text) {
            if !inodes.contains(&e.inode) {
                continue;
            }
            let remote_ok = is_loopback(e.remote.ip()) || (e.remote.ip().is_unspecified() && e.remote.port() == 0);
            if !is_loopback(e.local.ip()) || !remote_ok {
                bad.push(format!("{} -> {}", e.local, e.remote));
            }
        }
    }
    if inodes.is_empty() {
        bail!("no sockets found for pids {pids:?}: cannot check addresses");
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_parens_in_name() {
        let line = "1234 (we (ird) name) S 1 2 3 4 5 6 7 8 9 10 111 222 333 444 20 0 8 0";
        let f = stat_fields(line).unwrap();
        assert_eq!(f[11], 111); // utime (field 14)
        assert_eq!(f[12], 222); // stime
        assert_eq!(f[13], 333); // cutime
        assert_eq!(f[14], 444); // cstime
    }

    #[test]
    fn status_fields() {
        let text = "Name:\tx\nVmHWM:\t   12345 kB\nVmRSS:\t    2345 kB\n";
        assert_eq!(parse_status_kib(text, "VmHWM"), Some(12345));
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(2345));
        assert_eq!(parse_status_kib(text, "VmSwap"), None);
    }

    #[test]
    fn proc_stat_cpu_line() {
        let text = "cpu  10 1 5 100 4 2 3 7 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        let c = parse_sys_cpu(text).unwrap();
        assert_eq!(
            c,
            SysCpu {
                process: 16,
                irq: 5,
                idle: 104,
                steal: 7
            }
        );
        assert_eq!(c.total(), 132);
    }

    #[test]
    fn net_tcp_addresses() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n";
        let e = parse_net_tcp(v4);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(e[0].remote, "0.0.0.0:0".parse().unwrap());
        assert_eq!(e[0].inode, 4242);
        assert_eq!(
            parse_hex_addr("00000000000000000000000001000000:0050").unwrap(),
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            parse_hex_addr("0000000000000000FFFF00000100007F:0050").unwrap(),
            "[::ffff:127.0.0.1]:80".parse().unwrap()
        );
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
    }
}
