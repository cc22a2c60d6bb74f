//! Misbehaviours on demand for the echo backends, and the record of every exchange, so traffic-policy tests
//! (timeouts, retries, circuit breaking, outlier detection, load balancing) can make a backend fail in a
//! chosen way and then count how many attempts reached it.
//!
//! A backend is told to misbehave through its [`crate::echo::EchoHandle`] (until told to behave again, or for
//! the next N requests), or per request with `?misbehave=<what>` or an `X-Echo-Misbehave: <what>` header,
//! where `<what>` is `reset`, `hang`, `close-after-headers`, `status:<code>` or `delay:<go duration>`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, Method, Version};
use tokio::sync::watch;

use crate::echo::parse_go_duration;

/// The per-request header form of `?misbehave=`.
pub const MISBEHAVE_HEADER: &str = "x-echo-misbehave";
/// Exchanges kept for [`crate::echo::EchoHandle::exchanges`]; older ones are forgotten (long demo runs).
const MAX_RECORDED: usize = 10_000;

/// What a backend does instead of answering normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Wait this long, then answer as usual.
    Delay(Duration),
    /// Answer this status with an empty body (after reading the request body).
    Status(u16),
    /// Read the request, then reset instead of answering: HTTP/1.1 closes the TCP connection with RST, HTTP/2
    /// resets just the stream (RST_STREAM).
    Reset,
    /// Send 200 headers announcing a longer body than follows, a few bytes, then abort (HTTP/1.1: the
    /// connection closes; HTTP/2: RST_STREAM): a truncated response.
    CloseAfterHeaders,
    /// Never answer; the exchange ends only when the peer gives up (counted in
    /// [`crate::echo::EchoHandle::cancelled`]) or the server stops.
    Hang,
    /// Stop accepting: the listening socket is closed, so new connections are refused (ECONNREFUSED) until
    /// [`crate::echo::EchoHandle::behave`]. Established connections carry on.
    RefuseConnections,
    /// Accept new connections and close them at once with RST, before reading a byte.
    DropConnections,
}

impl Misbehaviour {
    /// The per-request form: `reset`, `hang`, `close-after-headers`, `status:503`, `delay:250ms`.
    pub fn parse(text: &str) -> Option<Misbehaviour> {
        let text = text.trim();
        let (what, arg) = text.split_once(':').unwrap_or((text, ""));
        Some(match (what.trim().to_ascii_lowercase().as_str(), arg.trim()) {
            ("reset", "") => Misbehaviour::Reset,
            ("hang", "") => Misbehaviour::Hang,
            ("close-after-headers", "") => Misbehaviour::CloseAfterHeaders,
            ("status", code) => Misbehaviour::Status(code.parse().ok().filter(|c| (100..=999).contains(c))?),
            ("delay", d) => Misbehaviour::Delay(parse_go_duration(d)?),
            _ => return None,
        })
    }

    /// Acts on connections rather than on requests.
    pub fn is_connection_level(&self) -> bool {
        matches!(self, Misbehaviour::RefuseConnections | Misbehaviour::DropConnections)
    }
}

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// 1-based, in arrival order.
    pub seq: usize,
    /// Which accepted connection carried it (1-based, in accept order).
    pub connection: usize,
    pub remote: SocketAddr,
    pub version: Version,
    pub method: Method,
    /// The request target as received.
    pub uri: String,
    pub headers: HeaderMap,
    /// What the backend did instead of answering normally, if anything.
    pub misbehaviour: Option<Misbehaviour>,
}

impl Exchange {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug, Clone)]
struct Armed {
    what: Misbehaviour,
    /// `None` = until cleared.
    remaining: Option<usize>,
}

impl Armed {
    /// The misbehaviour for one more request or connection, counting it down.
    fn take(slot: &mut Option<Armed>) -> Option<Misbehaviour> {
        let armed = slot.as_mut()?;
        let what = armed.what.clone();
        match &mut armed.remaining {
            None => {}
            Some(0) => {
                *slot = None;
                return None;
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    *slot = None;
                }
            }
        }
        Some(what)
    }
}

/// Misbehaviour switches and exchange counters of one echo server.
pub(crate) struct Controls {
    request: Mutex<Option<Armed>>,
    drop_connections: Mutex<Option<Armed>>,
    /// True while connections must be refused; the accept loop follows it.
    pub(crate) refuse: watch::Sender<bool>,
    /// Whether the listening socket is open (the accept loop reports it).
    pub(crate) listening: watch::Sender<bool>,
    exchanges: Mutex<VecDeque<Exchange>>,
    received: watch::Sender<usize>,
    connections: watch::Sender<usize>,
    open_connections: watch::Sender<usize>,
    in_flight: watch::Sender<usize>,
    cancelled: watch::Sender<usize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Controls {
    pub(crate) fn new() -> Controls {
        Controls {
            request: Mutex::new(None),
            drop_connections: Mutex::new(None),
            refuse: watch::Sender::new(false),
            listening: watch::Sender::new(true),
            exchanges: Mutex::new(VecDeque::new()),
            received: watch::Sender::new(0),
            connections: watch::Sender::new(0),
            open_connections: watch::Sender::new(0),
            in_flight: watch::Sender::new(0),
            cancelled: watch::Sender::new(0),
        }
    }

    /// Arms `what` for `times` requests (or connections), or until cleared when `None`. Replaces the earlier
    /// misbehaviour of the same level.
    pub(crate) fn arm(&self, what: Misbehaviour, times: Option<usize>) {
        let armed = Armed { what, remaining: times };
        match armed.what {
            Misbehaviour::RefuseConnections => {
                self.refuse.send_replace(true);
            }
            Misbehaviour::DropConnections => *lock(&self.drop_connections) = Some(armed),
            _ => *lock(&self.request) = Some(armed),
        }
    }

    pub(crate) fn clear(&self) {
        *lock(&self.request) = None;
        *lock(&self.drop_connections) = None;
        self.refuse.send_replace(false);
    }

    /// The armed request misbehaviour for one more request, if any.
    pub(crate) fn take_for_request(&self) -> Option<Misbehaviour> {
        Armed::take(&mut lock(&self.request))
    }

    /// Counts an accepted connection; true when it must be dropped at once.
    pub(crate) fn accept_connection(&self) -> (usize, bool) {
        let mut id = 0;
        self.connections.send_modify(|n| {
            *n += 1;
            id = *n;
        });
        (id, Armed::take(&mut lock(&self.drop_connections)).is_some())
    }

    /// Records an arriving request; returns its sequence number.
    pub(crate) fn record(&self, mut exchange: Exchange) -> usize {
        let mut seq = 0;
        self.received.send_modify(|n| {
            *n += 1;
            seq = *n;
        });
        exchange.seq = seq;
        let mut exchanges = lock(&self.exchanges);
        if exchanges.len() == MAX_RECORDED {
            exchanges.pop_front();
        }
        exchanges.push_back(exchange);
        seq
    }

    pub(crate) fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.exchanges).iter().cloned().collect()
    }

    pub(crate) fn received(&self) -> &watch::Sender<usize> {
        &self.received
    }

    pub(crate) fn connections(&self) -> &watch::Sender<usize> {
        &self.connections
    }

    pub(crate) fn open_connections(&self) -> &watch::Sender<usize> {
        &self.open_connections
    }

    pub(crate) fn in_flight(&self) -> &watch::Sender<usize> {
        &self.in_flight
    }

    pub(crate) fn cancelled(&self) -> &watch::Sender<usize> {
        &self.cancelled
    }
}

/// An accepted connection being served: counted open until dropped.
pub(crate) struct OpenConnection<'a>(&'a Controls);

impl<'a> OpenConnection<'a> {
    pub(crate) fn start(controls: &'a Controls) -> OpenConnection<'a> {
        controls.open_connections.send_modify(|n| *n += 1);
        OpenConnection(controls)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open_connections.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A request being handled: counted in flight until dropped; dropped before [`InFlight::finish`] means the
/// peer went away first (the exchange was cancelled).
pub(crate) struct InFlight<'a> {
    controls: &'a Controls,
    finished: bool,
}

impl<'a> InFlight<'a> {
    pub(crate) fn start(controls: &'a Controls) -> InFlight<'a> {
        controls.in_flight.send_modify(|n| *n += 1);
        InFlight {
            controls,
            finished: false,
        }
    }

    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.controls.in_flight.send_modify(|n| *n = n.saturating_sub(1));
        if !self.finished {
            self.controls.cancelled.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_request_forms() {
        assert_eq!(Misbehaviour::parse("reset"), Some(Misbehaviour::Reset));
        assert_eq!(Misbehaviour::parse(" Hang "), Some(Misbehaviour::Hang));
        assert_eq!(
            Misbehaviour::parse("close-after-headers"),
            Some(Misbehaviour::CloseAfterHeaders)
        );
        assert_eq!(Misbehaviour::parse("status:503"), Some(Misbehaviour::Status(503)));
        assert_eq!(
            Misbehaviour::parse("delay:250ms"),
            Some(Misbehaviour::Delay(Duration::from_millis(250)))
        );
        for bad in ["status:5", "status:abc", "delay:soon", "reset:1", "explode", ""] {
            assert_eq!(Misbehaviour::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn counted_misbehaviour_runs_out_and_unbounded_one_stays() {
        let controls = Controls::new();
        controls.arm(Misbehaviour::Status(503), Some(2));
        assert_eq!(controls.take_for_request(), Some(Misbehaviour::Status(503)));
        assert_eq!(controls.take_for_request(), Some(Misbehaviour::Status(503)));
        assert_eq!(controls.take_for_request(), None);
        controls.arm(Misbehaviour::Reset, Some(0));
        assert_eq!(controls.take_for_request(), None);
        controls.arm(Misbehaviour::Hang, None);
        for _ in 0..5 {
            assert_eq!(controls.take_for_request(), Some(Misbehaviour::Hang));
        }
        controls.arm(Misbehaviour::DropConnections, Some(1));
        assert_eq!(controls.accept_connection(), (1, true));
        assert_eq!(controls.accept_connection(), (2, false));
        controls.clear();
        assert_eq!(controls.take_for_request(), None);
    }

    #[test]
    fn in_flight_guard_tells_cancelled_from_finished() {
        let controls = Controls::new();
        let a = InFlight::start(&controls);
        let b = InFlight::start(&controls);
        assert_eq!(*controls.in_flight().borrow(), 2);
        a.finish();
        drop(b);
        assert_eq!(*controls.in_flight().borrow(), 0);
        assert_eq!(*controls.cancelled().borrow(), 1);
    }
}
