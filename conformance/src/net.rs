//! Loopback addressing for tests that run in parallel (threads and processes).
//!
//! Every pod and waypoint gets its own address in 127.0.0.0/8 so that well-known ports (15008, 15021 ...)
//! can be used as in a cluster without clashing. Linux answers on the whole /8 without any setup.
//! 127.0.0.0/16 is left alone because other software on the machine tends to live there.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Ports probed on every candidate address: 15008 because pods and the waypoint listen there, 0 because
/// a failing wildcard-port bind means the address itself is unusable.
const DEFAULT_PROBE_PORTS: &[u16] = &[15008, 0];
const MAX_ATTEMPTS: usize = 1000;

fn handed_out() -> &'static Mutex<HashSet<Ipv4Addr>> {
    static SET: OnceLock<Mutex<HashSet<Ipv4Addr>>> = OnceLock::new();
    SET.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback address no one in this process got before and on which 15008 is free right now.
/// Panics only when 1000 random candidates were all taken, which means the machine is broken.
pub fn unique_loopback_ip() -> Ipv4Addr {
    unique_loopback_ip_with_ports(&[])
}

/// Like [`unique_loopback_ip`], additionally requiring each of `ports` to be free on the address.
pub fn unique_loopback_ip_with_ports(ports: &[u16]) -> Ipv4Addr {
    for _ in 0..MAX_ATTEMPTS {
        let ip = random_candidate();
        if !reserve(ip) {
            continue;
        }
        if DEFAULT_PROBE_PORTS.iter().chain(ports).all(|port| can_bind(ip, *port)) {
            return ip;
        }
        // Taken by another process: keep it in the set so we do not probe it again.
    }
    panic!("no free loopback address after {MAX_ATTEMPTS} attempts")
}

fn random_candidate() -> Ipv4Addr {
    Ipv4Addr::new(127, fastrand::u8(1..=254), fastrand::u8(..), fastrand::u8(1..=254))
}

/// Marks `ip` as ours; false if this process already handed it out.
fn reserve(ip: Ipv4Addr) -> bool {
    match handed_out().lock() {
        Ok(mut set) => set.insert(ip),
        Err(poisoned) => poisoned.into_inner().insert(ip),
    }
}

fn can_bind(ip: Ipv4Addr, port: u16) -> bool {
    std::net::TcpListener::bind((ip, port)).is_ok()
}

/// Binds `ip` on an ephemeral port.
pub async fn bind_any(ip: impl Into<IpAddr>) -> io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(ip.into(), 0)).await
}

/// Binds 127.0.0.1 on an ephemeral port.
pub async fn bind_localhost() -> io::Result<TcpListener> {
    bind_any(Ipv4Addr::LOCALHOST).await
}

/// The next accepted connection, or `None` once `stop` is cancelled. Accept errors (EMFILE, a connection
/// aborted before accept) are logged and retried after a short pause rather than in a hot loop.
pub async fn accept_until(listener: &TcpListener, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => return Some(connection),
                Err(e) => {
                    tracing::warn!(addr = ?listener.local_addr().ok(), "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            () = stop.cancelled() => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_in_range_and_bindable() {
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let ip = unique_loopback_ip();
            let [a, b, _, d] = ip.octets();
            assert_eq!(a, 127);
            assert_ne!(b, 0);
            assert!(d != 0 && d != 255);
            assert!(seen.insert(ip), "{ip} handed out twice");
        }
    }

    #[tokio::test]
    async fn bind_any_uses_the_address() {
        let ip = unique_loopback_ip_with_ports(&[15021, 15000]);
        let listener = bind_any(ip).await.unwrap();
        assert_eq!(listener.local_addr().unwrap().ip(), IpAddr::V4(ip));
        assert_ne!(listener.local_addr().unwrap().port(), 0);
    }
}
