//! The harness kinds of the case format, each mapped onto what the upstream Go harness does for it:
//!
//! | harness | run as |
//! |---|---|
//! | `http_roundtrip`, `mesh_exec_client` | one request, checked; eventually consistent (3 in a row within 30 s) |
//! | `http_roundtrip_with_mirror` | the same with a fresh `{request_id}`, then the mirror Service's echo logs |
//! | `retry_probe` | each probe with a fresh `{uuid}` (a new retry-simulator counter), 3 in a row |
//! | `websocket` | RFC 6455 handshake and echoed frames, 3 dials in a row |
//! | `weighted_distribution`, `mesh_weighted_distribution`, `repeated_invariant`, `mirror_distribution` | see [`super::sampling`] |

use std::time::{Duration, Instant};

use serde_json::json;

use super::cases::{CaseSpec, ExpectSpec, TestSpec};
use super::channel::{Channel, NotRunnable};
use super::consistency::{Consistency, Outcome, await_consistent};
use super::env::Environment;
use super::report::{CaseReport, Verdict};
use super::sampling;
use super::websocket::{self, Handshake};
use super::world::TestWorld;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Harness {
    HttpRoundtrip,
    HttpRoundtripWithMirror,
    MirrorDistribution,
    WeightedDistribution,
    MeshWeightedDistribution,
    RepeatedInvariant,
    RetryProbe,
    Websocket,
    MeshExecClient,
}

impl Harness {
    pub fn parse(name: &str) -> Option<Harness> {
        Some(match name {
            "http_roundtrip" => Harness::HttpRoundtrip,
            "http_roundtrip_with_mirror" => Harness::HttpRoundtripWithMirror,
            "mirror_distribution" => Harness::MirrorDistribution,
            "weighted_distribution" => Harness::WeightedDistribution,
            "mesh_weighted_distribution" => Harness::MeshWeightedDistribution,
            "repeated_invariant" => Harness::RepeatedInvariant,
            "retry_probe" => Harness::RetryProbe,
            "websocket" => Harness::Websocket,
            "mesh_exec_client" => Harness::MeshExecClient,
            _ => return None,
        })
    }
}

/// Timing knobs; [`Settings::UPSTREAM`] are the upstream suite's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub consistency: Consistency,
    /// `RequestTimeout`: one round trip.
    pub request_timeout: Duration,
    /// How long a mirrored copy may take to show up in the mirror backend's log.
    pub mirror_timeout: Duration,
}

impl Settings {
    pub const UPSTREAM: Settings = Settings {
        consistency: Consistency::UPSTREAM,
        request_timeout: Duration::from_secs(10),
        mirror_timeout: Duration::from_secs(10),
    };
}

/// Everything a case runs against.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub env: &'a Environment,
    pub world: &'a TestWorld,
    pub test: &'a TestSpec,
    pub settings: &'a Settings,
}

/// A case's result before timing is added.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub verdict: Verdict,
    pub attempts: u32,
    pub detail: Option<String>,
    pub info: Option<serde_json::Value>,
}

impl CaseResult {
    pub fn pass(attempts: u32) -> CaseResult {
        CaseResult {
            verdict: Verdict::Pass,
            attempts,
            detail: None,
            info: None,
        }
    }

    pub fn fail(attempts: u32, detail: impl Into<String>) -> CaseResult {
        CaseResult {
            verdict: Verdict::Fail,
            attempts,
            detail: Some(detail.into()),
            info: None,
        }
    }

    pub fn from_outcome(outcome: Outcome, required: u32) -> CaseResult {
        if outcome.passed {
            CaseResult::pass(outcome.attempts)
        } else {
            CaseResult::fail(outcome.attempts, outcome.failure(required))
        }
    }

    pub fn with_info(mut self, info: serde_json::Value) -> CaseResult {
        self.info = Some(info);
        self
    }
}

pub async fn run_case(ctx: Ctx<'_>, harness: Harness, case: &CaseSpec) -> CaseReport {
    let start = Instant::now();
    let result = match Channel::for_case(ctx.env, ctx.world, ctx.test, case) {
        Err(NotRunnable::Skip(reason)) => CaseResult {
            verdict: Verdict::Skip,
            attempts: 0,
            detail: Some(reason),
            info: None,
        },
        Err(NotRunnable::Fail(reason)) => CaseResult::fail(0, reason),
        Ok(channel) => match harness {
            Harness::HttpRoundtrip | Harness::MeshExecClient => roundtrip(ctx, &channel, case).await,
            Harness::HttpRoundtripWithMirror => roundtrip_with_mirror(ctx, &channel, case).await,
            Harness::RetryProbe => retry_probe(ctx, &channel, case).await,
            Harness::Websocket => websocket(ctx, &channel, case).await,
            Harness::WeightedDistribution | Harness::MeshWeightedDistribution => {
                sampling::weighted(ctx, &channel, case).await
            }
            Harness::RepeatedInvariant => sampling::repeated(ctx, &channel, case).await,
            Harness::MirrorDistribution => sampling::mirror_distribution(ctx, &channel, case).await,
        },
    };
    CaseReport {
        name: case.name.clone(),
        verdict: result.verdict,
        attempts: result.attempts,
        duration_ms: start.elapsed().as_millis() as u64,
        detail: result.detail,
        info: result.info,
    }
}

pub fn require_expect(case: &CaseSpec) -> Result<&ExpectSpec, CaseResult> {
    case.expect
        .as_ref()
        .ok_or_else(|| CaseResult::fail(0, "the case has no expect block"))
}

/// One request, checked, until it passed `consistency.required` times in a row.
pub async fn converge(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec, consistency: Consistency) -> CaseResult {
    let expect = match require_expect(case) {
        Ok(e) => e,
        Err(result) => return result,
    };
    let prepared = match channel.prepare(ctx.world, &case.request) {
        Ok(p) => p,
        Err(e) => return CaseResult::fail(0, e),
    };
    let (world, prepared, timeout) = (ctx.world, &prepared, ctx.settings.request_timeout);
    let not_asserted = case.not_asserted_upstream.as_slice();
    let outcome = await_consistent(consistency, move |_| async move {
        channel
            .exchange_and_check(world, prepared, expect, not_asserted, timeout)
            .await
            .map(|_| ())
    })
    .await;
    CaseResult::from_outcome(outcome, consistency.required)
}

async fn roundtrip(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec) -> CaseResult {
    converge(ctx, channel, case, ctx.settings.consistency).await
}

/// `{request_id}` is one UUID per case, reused by every attempt; the mirrored copy is recognised in the mirror
/// Service's echo log by that request target.
async fn roundtrip_with_mirror(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec) -> CaseResult {
    let id = uuid();
    let case = case.substitute(&[("request_id", &id)]);
    let result = roundtrip(ctx, channel, &case).await;
    if result.verdict != Verdict::Pass {
        return result;
    }
    let (Ok(expect), Ok(prepared)) = (require_expect(&case), channel.prepare(ctx.world, &case.request)) else {
        return CaseResult::fail(result.attempts, "cannot rebuild the request for mirror detection");
    };
    let needle = echo_log_needle(&prepared.http.path);
    for target in &expect.mirrored_to {
        let namespace = target.namespace.clone().unwrap_or_else(|| default_namespace(channel));
        let found = wait_for_log(ctx, &namespace, &target.service, &needle, ctx.settings.mirror_timeout).await;
        if let Err(e) = found {
            return CaseResult::fail(result.attempts, e);
        }
    }
    result
}

/// The line echo-basic logs for a request target.
pub fn echo_log_needle(request_target: &str) -> String {
    format!("Echoing back request made to {request_target} to client")
}

/// Where a Service named without a namespace lives: the entry's or the client's namespace.
pub fn default_namespace(channel: &Channel) -> String {
    match channel {
        Channel::Gateway { entry, .. } => entry.namespace.clone(),
        Channel::Mesh { client, .. } => client.namespace.clone(),
    }
}

/// Lines containing `needle` across the pods of Service `namespace/service`.
pub fn count_log_lines(ctx: Ctx<'_>, namespace: &str, service: &str, needle: &str) -> Result<usize, String> {
    let pods = ctx.world.pods_of_service(namespace, service);
    if pods.is_empty() {
        return Err(format!("Service {namespace}/{service} has no pods to read logs from"));
    }
    Ok(pods
        .iter()
        .map(|p| ctx.env.log_lines(&p.name).iter().filter(|l| l.contains(needle)).count())
        .sum())
}

async fn wait_for_log(
    ctx: Ctx<'_>,
    namespace: &str,
    service: &str,
    needle: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if count_log_lines(ctx, namespace, service, needle)? > 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no mirrored request reached {namespace}/{service} within {timeout:?} (looked for {needle:?})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every probe gets a fresh `{uuid}`, so the retry simulator counts its attempts from zero.
async fn retry_probe(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec) -> CaseResult {
    if let Err(result) = require_expect(case) {
        return result;
    }
    let (world, timeout) = (ctx.world, ctx.settings.request_timeout);
    let consistency = ctx.settings.consistency;
    let outcome = await_consistent(consistency, move |_| async move {
        let id = uuid();
        let probe = case.substitute(&[("uuid", &id), ("request_id", &id)]);
        let prepared = channel.prepare(world, &probe.request)?;
        let expect = probe.expect.as_ref().ok_or("the case has no expect block")?;
        channel
            .exchange_and_check(world, &prepared, expect, &probe.not_asserted_upstream, timeout)
            .await
            .map(|_| ())
    })
    .await;
    CaseResult::from_outcome(outcome, consistency.required)
}

async fn websocket(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec) -> CaseResult {
    let ws = case.websocket.clone().unwrap_or_default();
    if let Some(handshake) = case.expect.as_ref().and_then(|e| e.handshake.as_deref())
        && !handshake.contains("101")
    {
        return CaseResult::fail(0, format!("unsupported handshake expectation {handshake:?}"));
    }
    let (Some(authority), Some(address)) = (channel.gateway_authority(), channel.gateway_address()) else {
        return CaseResult::fail(0, "the websocket harness needs a Gateway entry");
    };
    let url = ws
        .url
        .clone()
        .unwrap_or_else(|| "ws://<gateway-address>/ws".into())
        .replace("<gateway-address>", &address);
    let Some(rest) = url.strip_prefix("ws://") else {
        return CaseResult::fail(0, format!("unsupported WebSocket URL {url:?} (ws:// only)"));
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    // The file states the Origin with an explanation after it; the header is the first word.
    let origin = ws.origin.as_deref().and_then(|o| o.split_whitespace().next());
    let handshake = Handshake {
        host,
        path,
        origin,
        subprotocol: ws.subprotocol.as_deref(),
    };
    let (source, timeout) = (channel.source(), ctx.settings.request_timeout);
    let (handshake, exchange, authority) = (&handshake, ws.exchange.as_slice(), authority.as_str());
    let consistency = ctx.settings.consistency;
    let outcome = await_consistent(consistency, move |_| async move {
        let session = async {
            let tunnel = source.connect(authority).await.map_err(|e| e.to_string())?;
            websocket::client_session(tunnel, handshake, exchange).await
        };
        tokio::time::timeout(timeout, session)
            .await
            .map_err(|_| format!("no WebSocket exchange within {timeout:?}"))?
    })
    .await;
    CaseResult::from_outcome(outcome, consistency.required).with_info(json!({"url": url}))
}

/// A random RFC 4122 version 4 UUID.
pub fn uuid() -> String {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4() {
        let a = uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(a, uuid());
    }

    #[test]
    fn harness_names() {
        for name in [
            "http_roundtrip",
            "http_roundtrip_with_mirror",
            "mirror_distribution",
            "weighted_distribution",
            "mesh_weighted_distribution",
            "repeated_invariant",
            "retry_probe",
            "websocket",
            "mesh_exec_client",
        ] {
            assert!(Harness::parse(name).is_some(), "{name}");
        }
        assert!(Harness::parse("grpc_roundtrip").is_none());
    }
}
