//! Harnesses that judge many requests together:
//!
//! - `weighted_distribution` / `mesh_weighted_distribution`: warm up (3 in a row), then rounds of N samples
//!   (concurrently); a round passes when the backend shares match the weights; one passing round passes.
//! - `repeated_invariant`: warm up, then N requests that must each satisfy the stated invariants.
//! - `mirror_distribution`: warm up on the plain path, then rounds of N requests sharing one request id; the
//!   mirror backend's log lines for that id must fall in the accepted band.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream;
use serde_json::json;

use super::cases::{CaseSpec, ExpectSpec};
use super::channel::{Channel, Prepared};
use super::consistency::await_consistent;
use super::distribution::{self, backend_name};
use super::harness::{
    CaseResult, Ctx, converge, count_log_lines, default_namespace, echo_log_needle, require_expect, uuid,
};
use super::headers;
use super::observe::Observed;

const DEFAULT_CONCURRENCY: usize = 10;
/// The query parameter the upstream harness adds to recognise mirrored copies.
const REQUEST_ID_PARAM: &str = "gateway-api-conformance-request-id";

/// Warms up on `warmup_expect` (or `expect`), 3 consecutive successes as any case.
async fn warm_up(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec) -> Result<u32, CaseResult> {
    let Some(expect) = case.warmup_expect.clone().or_else(|| case.expect.clone()) else {
        return Ok(0);
    };
    let warm = CaseSpec {
        expect: Some(expect),
        ..case.clone()
    };
    let result = converge(ctx, channel, &warm, ctx.settings.consistency).await;
    match result.verdict {
        super::report::Verdict::Pass => Ok(result.attempts),
        _ => Err(CaseResult::fail(
            result.attempts,
            format!("warm-up: {}", result.detail.unwrap_or_default()),
        )),
    }
}

/// Sends `count` copies of `prepared` with `concurrency` in flight; `vary` may alter each copy, `judge` maps
/// each response to a value or the reason the request failed.
async fn sample<T, V, J>(
    ctx: Ctx<'_>,
    channel: &Channel,
    prepared: &Prepared,
    count: usize,
    concurrency: usize,
    vary: &V,
    judge: &J,
) -> Vec<Result<T, String>>
where
    V: Fn(&mut Prepared),
    J: Fn(&Prepared, Observed) -> Result<T, String>,
{
    let timeout = ctx.settings.request_timeout;
    stream::iter(0..count)
        .map(|_| async move {
            let mut p = prepared.clone();
            vary(&mut p);
            let observed = channel.exchange(ctx.world, &p, timeout).await?;
            judge(&p, observed)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

fn check_each(prepared: &Prepared, expect: &ExpectSpec, observed: &Observed) -> Result<(), String> {
    if prepared.mesh {
        super::expect::check_mesh(expect, observed, &prepared.facts(), &[])
    } else {
        super::expect::check_gateway(expect, observed, &prepared.facts())
    }
}

/// The header named in the `entropy` prose (`… carries header X-Jitter: <random …>`).
fn entropy_header(prose: &str) -> String {
    prose
        .split("header ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .map(str::trim)
        .filter(|h| !h.is_empty() && !h.contains(' '))
        .unwrap_or("X-Jitter")
        .to_string()
}

pub async fn weighted(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec) -> CaseResult {
    let Some(dist) = &case.distribution else {
        return CaseResult::fail(0, "the case has no distribution block");
    };
    let mut attempts = match warm_up(ctx, channel, case).await {
        Ok(n) => n,
        Err(result) => return result,
    };
    let prepared = match channel.prepare(ctx.world, &case.request) {
        Ok(p) => p,
        Err(e) => return CaseResult::fail(attempts, e),
    };
    let entropy = dist.entropy.as_deref().map(entropy_header);
    let per_request = dist
        .per_request_check
        .as_ref()
        .and_then(|_| case.warmup_expect.as_ref().or(case.expect.as_ref()));
    let vary = |p: &mut Prepared| {
        if let Some(name) = &entropy
            && fastrand::bool()
        {
            headers::set(&mut p.http.headers, name, &fastrand::u32(0..10_000).to_string());
        }
    };
    let judge = |p: &Prepared, observed: Observed| {
        if let Some(expect) = per_request {
            check_each(p, expect, &observed)?;
        }
        Ok(backend_name(&observed.echo.pod))
    };
    let rounds = dist.max_attempts.unwrap_or(1).max(1);
    let concurrency = dist.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    let mut last = String::new();
    for round in 1..=rounds {
        let results = sample(ctx, channel, &prepared, dist.samples, concurrency, &vary, &judge).await;
        attempts += results.len() as u32;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut first_error = None;
        for result in results {
            match result {
                Ok(backend) => *counts.entry(backend).or_default() += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let verdict = match first_error {
            Some(e) => Err(format!("a sample failed: {e}")),
            None => distribution::check(&counts, dist),
        };
        match verdict {
            Ok(()) => {
                return CaseResult::pass(attempts).with_info(json!({"round": round, "counts": counts}));
            }
            Err(e) => last = format!("round {round}/{rounds}: {e}"),
        }
    }
    CaseResult::fail(attempts, last)
}

/// An invariant from `repeat.each_response_must`. The file states them in prose; the runner knows the shapes
/// below and refuses any other rather than passing it unchecked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Invariant {
    /// "… carries exactly one value for header 'Backend' …"
    SingleHeaderValue(String),
    /// "echo 'pod' field starts with that header value …" (the header of the previous invariant).
    FieldStartsWithHeader { field: String, header: String },
}

fn quoted_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &text[text.find(marker)? + marker.len()..];
    rest.split('\'').next()
}

fn parse_invariants(lines: &[String]) -> Result<Vec<Invariant>, String> {
    let mut out = Vec::new();
    let mut last_header: Option<String> = None;
    for line in lines {
        if line.contains("exactly one value for header '") {
            let header = quoted_after(line, "header '").ok_or_else(|| format!("cannot read {line:?}"))?;
            last_header = Some(header.to_string());
            out.push(Invariant::SingleHeaderValue(header.to_string()));
        } else if line.contains("starts with that header value") {
            let field = quoted_after(line, "echo '").ok_or_else(|| format!("cannot read {line:?}"))?;
            let header = last_header
                .clone()
                .ok_or_else(|| format!("{line:?} refers to a header no earlier invariant names"))?;
            out.push(Invariant::FieldStartsWithHeader {
                field: field.to_string(),
                header,
            });
        } else {
            return Err(format!("unsupported invariant {line:?}"));
        }
    }
    Ok(out)
}

fn check_invariants(invariants: &[Invariant], observed: &Observed) -> Result<(), String> {
    let echo = &observed.echo;
    for invariant in invariants {
        match invariant {
            Invariant::SingleHeaderValue(header) => match echo.header(header) {
                Some(values) if values.len() == 1 => {}
                other => {
                    return Err(format!(
                        "backend request header {header}: expected exactly one value, got {other:?} (status {})",
                        observed.status
                    ));
                }
            },
            Invariant::FieldStartsWithHeader { field, header } => {
                let value = echo.header(header).and_then(|v| v.first()).cloned().unwrap_or_default();
                let actual = match field.as_str() {
                    "pod" => &echo.pod,
                    "path" => &echo.path,
                    "host" => &echo.host,
                    "method" => &echo.method,
                    "namespace" => &echo.namespace,
                    other => return Err(format!("unsupported echo field {other:?} in an invariant")),
                };
                if !actual.starts_with(&value) {
                    return Err(format!(
                        "echo {field} {actual:?} does not start with header {header} value {value:?}"
                    ));
                }
            }
        }
    }
    Ok(())
}

pub async fn repeated(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec) -> CaseResult {
    let Some(repeat) = &case.repeat else {
        return CaseResult::fail(0, "the case has no repeat block");
    };
    let invariants = match parse_invariants(&repeat.each_response_must) {
        Ok(i) => i,
        Err(e) => return CaseResult::fail(0, e),
    };
    let mut attempts = match warm_up(ctx, channel, case).await {
        Ok(n) => n,
        Err(result) => return result,
    };
    let prepared = match channel.prepare(ctx.world, &case.request) {
        Ok(p) => p,
        Err(e) => return CaseResult::fail(attempts, e),
    };
    let status_expect = (!repeat.status_not_checked)
        .then(|| case.expect.as_ref().or(case.warmup_expect.as_ref()))
        .flatten();
    let judge = |p: &Prepared, observed: Observed| {
        if let Some(expect) = status_expect {
            check_each(p, expect, &observed)?;
        }
        check_invariants(&invariants, &observed)
    };
    // Sequential, like the upstream loop.
    let results = sample(ctx, channel, &prepared, repeat.count, 1, &|_: &mut Prepared| {}, &judge).await;
    attempts += results.len() as u32;
    match results
        .into_iter()
        .enumerate()
        .find_map(|(i, r)| r.err().map(|e| (i, e)))
    {
        Some((i, e)) => CaseResult::fail(attempts, format!("request {}/{}: {e}", i + 1, repeat.count)),
        None => CaseResult::pass(attempts),
    }
}

/// `path` with `name=value` added to its query, keys sorted (what Go's `url.Values.Encode` produces).
fn with_query_param(path: &str, name: &str, value: &str) -> String {
    let (base, query) = path.split_once('?').unwrap_or((path, ""));
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    let added = format!("{name}={value}");
    pairs.push(&added);
    pairs.sort_by_key(|p| p.split('=').next().unwrap_or_default().to_string());
    format!("{base}?{}", pairs.join("&"))
}

pub async fn mirror_distribution(ctx: Ctx<'_>, channel: &Channel, case: &CaseSpec) -> CaseResult {
    let Some(md) = &case.mirror_distribution else {
        return CaseResult::fail(0, "the case has no mirror_distribution block");
    };
    let expect = match require_expect(case) {
        Ok(e) => e,
        Err(result) => return result,
    };
    if expect.mirrored_to.is_empty() {
        return CaseResult::fail(0, "expect.mirrored_to is empty");
    }
    // The warm-up uses the plain path and the default consistency.
    let mut attempts = match converge(ctx, channel, case, ctx.settings.consistency).await {
        r if r.verdict == super::report::Verdict::Pass => r.attempts,
        r => {
            return CaseResult::fail(r.attempts, format!("warm-up: {}", r.detail.unwrap_or_default()));
        }
    };
    let concurrency = md.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    let pause = Duration::from_secs_f64(md.pause_between_failed_rounds_s.unwrap_or(2.0));
    let rounds = md.rounds_max.max(1);
    let mut last = String::new();
    for round in 1..=rounds {
        let id = uuid();
        let mut round_case = case.clone();
        let path = case.request.path.clone().unwrap_or_else(|| "/".into());
        round_case.request.path = Some(with_query_param(&path, REQUEST_ID_PARAM, &id));
        if let Some(Some(br)) = round_case.expect.as_mut().and_then(|e| e.backend_request.as_mut())
            && let Some(p) = &br.path
        {
            br.path = Some(with_query_param(p, REQUEST_ID_PARAM, &id));
        }
        let Some(round_expect) = round_case.expect.clone() else {
            return CaseResult::fail(attempts, "the case has no expect block");
        };
        let prepared = match channel.prepare(ctx.world, &round_case.request) {
            Ok(p) => p,
            Err(e) => return CaseResult::fail(attempts, e),
        };
        // Each request must satisfy `expect`, retried until it does once.
        let once = ctx.settings.consistency.with_required(1);
        let (world, timeout, p, e) = (ctx.world, ctx.settings.request_timeout, &prepared, &round_expect);
        let outcomes: Vec<_> = stream::iter(0..md.requests_per_round)
            .map(|_| {
                await_consistent(once, move |_| async move {
                    channel.exchange_and_check(world, p, e, &[], timeout).await.map(|_| ())
                })
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        attempts += outcomes.iter().map(|o| o.attempts).sum::<u32>();
        if let Some(failed) = outcomes.iter().find(|o| !o.passed) {
            return CaseResult::fail(
                attempts,
                format!("round {round}: a request failed: {}", failed.failure(1)),
            );
        }
        let needle = echo_log_needle(&prepared.http.path);
        let mut counts = BTreeMap::new();
        let mut verdict = Ok(());
        for target in &expect.mirrored_to {
            let namespace = target.namespace.clone().unwrap_or_else(|| default_namespace(channel));
            let count = match settled_count(ctx, &namespace, &target.service, &needle).await {
                Ok(c) => c,
                Err(e) => return CaseResult::fail(attempts, e),
            };
            counts.insert(format!("{namespace}/{}", target.service), count);
            if verdict.is_ok() {
                verdict = distribution::check_band(count, &md.accept_count_between)
                    .map_err(|e| format!("{namespace}/{}: {e}", target.service));
            }
        }
        match verdict {
            Ok(()) => {
                return CaseResult::pass(attempts).with_info(json!({"round": round, "mirrored": counts}));
            }
            Err(e) => last = format!("round {round}/{rounds}: {e}"),
        }
        if round < rounds {
            tokio::time::sleep(pause).await;
        }
    }
    CaseResult::fail(attempts, last)
}

/// Mirrored copies are sent asynchronously: count until the number stops moving (or 5 s pass).
async fn settled_count(ctx: Ctx<'_>, namespace: &str, service: &str, needle: &str) -> Result<usize, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = count_log_lines(ctx, namespace, service, needle)?;
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count_log_lines(ctx, namespace, service, needle)?;
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(500) || Instant::now() >= deadline {
            return Ok(now);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::runner::observe::EchoView;

    #[test]
    fn invariants_from_the_shared_prose() {
        let lines = vec![
            "backend request carries exactly one value for header 'Backend' (looked up by the canonical key 'Backend' in the echo headers map)".to_string(),
            "echo 'pod' field starts with that header value (infra-backend-v1 or infra-backend-v2)".to_string(),
        ];
        let invariants = parse_invariants(&lines).unwrap();
        assert_eq!(
            invariants,
            vec![
                Invariant::SingleHeaderValue("Backend".into()),
                Invariant::FieldStartsWithHeader {
                    field: "pod".into(),
                    header: "Backend".into()
                }
            ]
        );
        let observed = |values: &[&str], pod: &str| Observed {
            status: 200,
            headers: Vec::new(),
            echo: EchoView {
                pod: pod.into(),
                headers: BTreeMap::from([("backend".to_string(), values.iter().map(|v| v.to_string()).collect())]),
                ..EchoView::default()
            },
            grpc_status: None,
        };
        check_invariants(&invariants, &observed(&["infra-backend-v1"], "infra-backend-v1-a-b")).unwrap();
        assert!(check_invariants(&invariants, &observed(&["infra-backend-v2"], "infra-backend-v1-a-b")).is_err());
        assert!(check_invariants(&invariants, &observed(&["a", "b"], "a-x-y")).is_err());
        assert!(parse_invariants(&["the moon is full".to_string()]).is_err());
    }

    #[test]
    fn request_id_queries_and_entropy() {
        assert_eq!(
            with_query_param("/percent-mirror", REQUEST_ID_PARAM, "u"),
            "/percent-mirror?gateway-api-conformance-request-id=u"
        );
        assert_eq!(with_query_param("/p?z=1&a=2", "m", "u"), "/p?a=2&m=u&z=1");
        assert_eq!(
            entropy_header("each sample, with probability 1/2, carries header X-Jitter: <random integer 0..9999>"),
            "X-Jitter"
        );
        assert_eq!(entropy_header("random"), "X-Jitter");
    }
}
