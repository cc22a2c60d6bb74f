//! The Gateway API conformance cases (and our Istio policy and traffic cases) run against the waypoint through the
//! runner's library entry point. The data lives outside the repository (`../shared/conformance` from the repo
//! root, or `$WAYPOINT_CONFORMANCE_DIR`); without it these tests say so and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use waypoint_conformance::runner::{self, RunOptions, Verdict};

fn conformance_dir() -> Option<PathBuf> {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = runner::shared_conformance_dir(&repo_root);
    if dir.is_none() {
        println!(
            "skipping: no conformance data (set WAYPOINT_CONFORMANCE_DIR or provide {})",
            repo_root.join("../shared/conformance").display()
        );
    }
    dir
}

async fn run_case_file(file: &str) {
    let Some(dir) = conformance_dir() else { return };
    run_options(file, RunOptions::new(dir.join(file), dir.join("manifests"))).await;
}

async fn run_options(file: &str, mut options: RunOptions) {
    options.progress = true;
    let report = runner::run(&options).await.expect("the run starts");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{file}.report.json"));
    report.write_json(&path).expect("report written");
    println!("{}", report.summary_line());
    println!("report: {}", path.display());
    let failed: Vec<String> = report
        .tests
        .iter()
        .filter(|t| t.verdict == Verdict::Fail)
        .map(|t| t.line())
        .collect();
    assert!(failed.is_empty(), "{} failed:\n{}", failed.len(), failed.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_api_cases_pass() {
    run_case_file("cases.yaml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istio_policy_cases_pass() {
    run_case_file("istio-cases.yaml").await;
}

/// Our own VirtualService / DestinationRule cases (`conformance/cases/`): their manifests live beside them,
/// the mesh base manifest is the shared upstream one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istio_traffic_cases_pass() {
    let Some(shared) = conformance_dir() else { return };
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("cases");
    let options =
        RunOptions::new(own.join("istio-traffic.yaml"), own.join("manifests")).manifests_dir(shared.join("manifests"));
    run_options("istio-traffic.yaml", options).await;
}
