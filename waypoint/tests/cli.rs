//! `waypoint check` and start-up failures, through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_waypoint");

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("waypoint-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const HEADER: &str = "apiVersion: waypoint.istio.io/v1alpha1
kind: WaypointConfig
metadata: {name: wp, namespace: ns}
spec:
  listeners: {hbone: 127.0.0.1:0, readiness: 127.0.0.1:0, admin: 127.0.0.1:0}
  tls: {certFile: missing.pem, keyFile: missing-key.pem, rootsFile: missing-root.pem}
";

#[test]
fn check_accepts_the_example_and_rejects_bad_files_naming_the_field() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/waypoint.yaml");
    let out = Command::new(BIN).args(["check", example]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (3 service addresses)"));

    let dir = tempdir("check");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        format!("{HEADER}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec:\n  clusterIP: 10.0.0.300\n  ports: [{{port: 80}}]\n"),
    )
    .unwrap();
    let out = Command::new(BIN).args(["check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml: document 2 (line 8, Service ns/s): field spec.clusterIP"),
        "{stderr}"
    );
    assert!(stderr.contains("1 error(s)"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `waypoint run --config <cfg>`, which must fail; returns its stderr.
fn run_failing(cfg: &std::path::Path) -> String {
    let out = Command::new(BIN).args(["run", "--config"]).arg(cfg).output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_fails_fast_with_a_clear_message_when_certificates_are_missing() {
    let dir = tempdir("run");
    let cfg = dir.join("wp.yaml");
    std::fs::write(&cfg, HEADER).unwrap();
    let stderr = run_failing(&cfg);
    assert!(
        stderr.contains("cannot read certificate file") && stderr.contains("missing.pem"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("cannot read certificate file").count(),
        1,
        "the reason is printed once: {stderr}"
    );

    let stderr = run_failing(&dir.join("absent.yaml"));
    assert!(
        stderr.contains("invalid config") && stderr.contains("absent.yaml"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("cannot read").count(),
        1,
        "the reason is printed once: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
