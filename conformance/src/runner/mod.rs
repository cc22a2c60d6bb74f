//! The Gateway API conformance runner: executes a case file (`format: gateway-api-conformance-cases/1`) with
//! its manifests against the waypoint, in process, on loopback.
//!
//! One environment per run ([`env::Environment`]): the waypoint, a PKI, and the pods of the Deployments the
//! tests need (started on first use, kept running). Tests run one after another; for each, its manifests
//! become the waypoint's config (Services with a ClusterIP, Gateways with an address, pods with their IPs and
//! identities, everything else verbatim), the runner waits until the waypoint applied it, checks the test's
//! preconditions against what the waypoint accepted, and runs the cases through the harness the test names.
//!
//! ```text
//! source ztunnel (client identity) ──HBONE CONNECT vip:port──▶ waypoint ──HBONE──▶ dest ztunnel ──▶ echo
//! ```

pub mod cases;
pub mod channel;
pub mod consistency;
pub mod distribution;
pub mod env;
pub mod expect;
pub mod harness;
pub mod headers;
pub mod location;
pub mod manifests;
pub mod observe;
pub mod report;
pub mod request;
pub mod sampling;
pub mod target;
pub mod websocket;
pub mod workload;
pub mod world;

use std::path::{Path, PathBuf};
use std::time::Instant;

use cases::{CaseFileError, TestEntry, TestSpec};
use env::{EnvError, Environment};
use harness::{Ctx, Harness, run_case};
use manifests::ManifestCache;
use world::TestWorld;

pub use harness::Settings;
pub use report::{CaseReport, RunReport, TestReport, Verdict};

/// Where the JSON report goes when the caller does not say.
pub const DEFAULT_REPORT: &str = "conformance-report.json";

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub cases: PathBuf,
    /// Where the case file's manifest paths are looked up, in order: the first directory holding a path wins
    /// (e.g. a project's own manifests, then the shared upstream ones).
    pub manifests: Vec<PathBuf>,
    /// Run only these tests (by exact name); all when empty.
    pub only: Vec<String>,
    pub settings: Settings,
    /// Print each test's line to stdout as it finishes.
    pub progress: bool,
}

impl RunOptions {
    pub fn new(cases: impl Into<PathBuf>, manifests: impl Into<PathBuf>) -> RunOptions {
        RunOptions {
            cases: cases.into(),
            manifests: vec![manifests.into()],
            only: Vec::new(),
            settings: Settings::UPSTREAM,
            progress: false,
        }
    }

    /// Also look up manifests in `dir`, after the directories given so far.
    pub fn manifests_dir(mut self, dir: impl Into<PathBuf>) -> RunOptions {
        self.manifests.push(dir.into());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Cases(#[from] CaseFileError),
    #[error("manifests directory {0} does not exist")]
    NoManifests(PathBuf),
    #[error("no test named {0:?} in the case file")]
    UnknownTest(String),
    #[error("starting the environment: {0}")]
    Environment(#[from] EnvError),
}

/// Runs the selected tests of a case file. Test and case failures are in the report; an error means the run
/// itself could not happen (unreadable case file, no manifests directory, the waypoint did not start).
pub async fn run(options: &RunOptions) -> Result<RunReport, RunnerError> {
    let start = Instant::now();
    let file = cases::load(&options.cases)?;
    if options.manifests.is_empty() {
        return Err(RunnerError::NoManifests(PathBuf::new()));
    }
    if let Some(missing) = options.manifests.iter().find(|dir| !dir.is_dir()) {
        return Err(RunnerError::NoManifests(missing.clone()));
    }
    if let Some(unknown) = options
        .only
        .iter()
        .find(|name| !file.tests.iter().any(|t| t.name() == name.as_str()))
    {
        return Err(RunnerError::UnknownTest(unknown.clone()));
    }
    let selected: Vec<&TestEntry> = file
        .tests
        .iter()
        .filter(|t| options.only.is_empty() || options.only.iter().any(|n| n == t.name()))
        .collect();
    let mut env = Environment::start().await?;
    let mut cache = ManifestCache::with_dirs(&options.manifests);
    let mut reports = Vec::with_capacity(selected.len());
    for entry in selected {
        let report = run_test(&mut env, &mut cache, entry, &options.settings).await;
        if options.progress {
            println!("{}", report.line());
        }
        reports.push(report);
    }
    env.shutdown().await;
    Ok(RunReport::new(
        &file.format,
        &options.cases,
        &options.manifests,
        reports,
        start.elapsed().as_millis() as u64,
    ))
}

async fn run_test(
    env: &mut Environment,
    cache: &mut ManifestCache,
    entry: &TestEntry,
    settings: &Settings,
) -> TestReport {
    let start = Instant::now();
    let test = match entry {
        TestEntry::Invalid { name, reason } => return TestReport::failed(name, "", None, reason.clone(), 0),
        TestEntry::Parsed(test) => test,
    };
    let fail = |reason: String| {
        TestReport::failed(
            &test.name,
            &test.harness,
            test.profile.clone(),
            reason,
            start.elapsed().as_millis() as u64,
        )
    };
    let Some(harness) = Harness::parse(&test.harness) else {
        return fail(format!("unsupported harness {}", test.harness));
    };
    if test.cases.is_empty() {
        return fail("the test has no cases".into());
    }
    let objects = match cache.merged(&test.manifests) {
        Ok(objects) => objects,
        Err(e) => return fail(e.to_string()),
    };
    let world = match env.prepare(&test.name, &objects).await {
        Ok(world) => world,
        Err(e) => return fail(e.to_string()),
    };
    if let Err(e) = check_preconditions(test, &world) {
        return fail(format!("precondition: {e}"));
    }
    let ctx = Ctx {
        env: &*env,
        world: &world,
        test,
        settings,
    };
    let mut cases = Vec::with_capacity(test.cases.len());
    for case in &test.cases {
        cases.push(run_case(ctx, harness, case).await);
    }
    let mut report = TestReport::from_cases(
        &test.name,
        &test.harness,
        test.profile.clone(),
        cases,
        start.elapsed().as_millis() as u64,
    );
    report.ignored_by_waypoint = world.skipped.clone();
    report
}

/// `preconditions_k8s` mapped onto "the waypoint accepted the config": the objects exist in the test's
/// manifests and the applied config did not report them as ignored.
fn check_preconditions(test: &TestSpec, world: &TestWorld) -> Result<(), String> {
    let Some(p) = &test.preconditions_k8s else {
        return Ok(());
    };
    let objects = p.gateway_accepted_and_programmed.iter().map(|g| ("Gateway", g)).chain(
        p.routes_accepted
            .iter()
            .chain(&p.routes_resolved_refs)
            .map(|r| ("Route", r)),
    );
    for (kind, name) in objects {
        if !world.has_object(kind, name) {
            return Err(format!("{kind} {name} is not in the test's manifests"));
        }
        if let Some(skipped) = world.was_skipped(kind, name) {
            return Err(format!("{kind} {name} not accepted: the waypoint ignored {skipped}"));
        }
    }
    for namespace in &p.mesh_namespaces_ready {
        if !world.namespaces.contains_key(namespace) {
            return Err(format!("namespace {namespace} is not in the test's manifests"));
        }
    }
    Ok(())
}

/// The conformance data shipped with the project: `$WAYPOINT_CONFORMANCE_DIR`, else
/// `<repo>/../shared/conformance`. `None` when it does not exist.
pub fn shared_conformance_dir(repo_root: &Path) -> Option<PathBuf> {
    let dir = std::env::var_os("WAYPOINT_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root.join("../shared/conformance"));
    dir.is_dir().then_some(dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::runner::manifests::parse;

    fn test_with(preconditions: &str) -> TestSpec {
        let yaml = format!(
            "format: gateway-api-conformance-cases/1\ntests:\n- name: T\n  harness: http_roundtrip\n  preconditions_k8s: {preconditions}\n  cases: [{{name: c}}]\n"
        );
        let file = cases::parse(Path::new("t.yaml"), &yaml).unwrap();
        match file.tests.into_iter().next().unwrap() {
            TestEntry::Parsed(t) => *t,
            TestEntry::Invalid { reason, .. } => panic!("{reason}"),
        }
    }

    #[test]
    fn preconditions_map_to_accepted_objects() {
        let objects = parse(
            Path::new("m.yaml"),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: infra}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: infra}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: infra}\n",
        )
        .unwrap();
        let mut world = TestWorld {
            objects,
            ..TestWorld::default()
        };
        world.namespaces.insert("infra".into(), Default::default());
        let test = test_with(
            "{gateway_accepted_and_programmed: [infra/gw], routes_accepted: [infra/r], mesh_namespaces_ready: [infra]}",
        );
        check_preconditions(&test, &world).unwrap();
        world.skipped = vec!["gateway.networking.k8s.io/v1/HTTPRoute infra/r".into()];
        let err = check_preconditions(&test, &world).unwrap_err();
        assert!(err.contains("Route infra/r not accepted"), "{err}");
        let err = check_preconditions(&test_with("{routes_accepted: [infra/other]}"), &world).unwrap_err();
        assert!(err.contains("not in the test's manifests"), "{err}");
        let err = check_preconditions(&test_with("{mesh_namespaces_ready: [mesh]}"), &world).unwrap_err();
        assert!(err.contains("namespace mesh"), "{err}");
    }
}
