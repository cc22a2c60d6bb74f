//! Results: one line per test for people, a JSON report with every case for tools.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub name: String,
    pub verdict: Verdict,
    /// Requests (or rounds, for distributions) made.
    pub attempts: u32,
    pub duration_ms: u64,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extra data: distribution counts, mirrored request counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    pub name: String,
    pub harness: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub verdict: Verdict,
    /// Test-level failure or skip reason (config rejected, unsupported harness …); case failures are in `cases`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Objects of the test the waypoint reported as not acted on (kinds it does not support).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignored_by_waypoint: Vec<String>,
    pub duration_ms: u64,
    pub cases: Vec<CaseReport>,
}

impl TestReport {
    /// The verdict from the cases: any failure fails, all skipped skips, otherwise passes.
    pub fn from_cases(
        name: &str,
        harness: &str,
        profile: Option<String>,
        cases: Vec<CaseReport>,
        duration_ms: u64,
    ) -> TestReport {
        let verdict = if cases.iter().any(|c| c.verdict == Verdict::Fail) {
            Verdict::Fail
        } else if !cases.is_empty() && cases.iter().all(|c| c.verdict == Verdict::Skip) {
            Verdict::Skip
        } else {
            Verdict::Pass
        };
        TestReport {
            name: name.to_string(),
            harness: harness.to_string(),
            profile,
            verdict,
            reason: None,
            ignored_by_waypoint: Vec::new(),
            duration_ms,
            cases,
        }
    }

    pub fn failed(name: &str, harness: &str, profile: Option<String>, reason: String, duration_ms: u64) -> TestReport {
        TestReport {
            name: name.to_string(),
            harness: harness.to_string(),
            profile,
            verdict: Verdict::Fail,
            reason: Some(reason),
            ignored_by_waypoint: Vec::new(),
            duration_ms,
            cases: Vec::new(),
        }
    }

    /// `PASS name (n cases)`, `FAIL name: <first failing case and why>`, `SKIP name: reason`.
    pub fn line(&self) -> String {
        match self.verdict {
            Verdict::Pass => {
                let skipped = self.cases.iter().filter(|c| c.verdict == Verdict::Skip).count();
                let passed = self.cases.len() - skipped;
                if skipped > 0 {
                    format!("PASS {} ({passed} cases, {skipped} skipped)", self.name)
                } else {
                    format!("PASS {} ({passed} cases)", self.name)
                }
            }
            Verdict::Fail => {
                let why = match (&self.reason, self.cases.iter().find(|c| c.verdict == Verdict::Fail)) {
                    (Some(reason), _) => reason.clone(),
                    (None, Some(case)) => {
                        format!("case {:?}: {}", case.name, case.detail.as_deref().unwrap_or("failed"))
                    }
                    (None, None) => "failed".into(),
                };
                let ignored = match self.ignored_by_waypoint.as_slice() {
                    [] => String::new(),
                    objects => format!(" [the waypoint ignored {}]", objects.join(", ")),
                };
                format!("FAIL {}: {}{ignored}", self.name, one_line(&why))
            }
            Verdict::Skip => {
                let why = self
                    .reason
                    .clone()
                    .or_else(|| self.cases.iter().find_map(|c| c.detail.clone()))
                    .unwrap_or_default();
                format!("SKIP {}: {}", self.name, one_line(&why))
            }
        }
    }
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub format: String,
    pub cases_file: String,
    /// The manifest directories, in lookup order.
    pub manifests_dirs: Vec<String>,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub duration_ms: u64,
    pub tests: Vec<TestReport>,
}

impl RunReport {
    pub fn new(
        format: &str,
        cases_file: &Path,
        manifests_dirs: &[PathBuf],
        tests: Vec<TestReport>,
        duration_ms: u64,
    ) -> Self {
        let count = |v| tests.iter().filter(|t| t.verdict == v).count();
        RunReport {
            format: format.to_string(),
            cases_file: cases_file.display().to_string(),
            manifests_dirs: manifests_dirs.iter().map(|d| d.display().to_string()).collect(),
            passed: count(Verdict::Pass),
            failed: count(Verdict::Fail),
            skipped: count(Verdict::Skip),
            duration_ms,
            tests,
        }
    }

    /// `N passed, N failed, N skipped`.
    pub fn summary_line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text + "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, verdict: Verdict, detail: Option<&str>) -> CaseReport {
        CaseReport {
            name: name.into(),
            verdict,
            attempts: 1,
            duration_ms: 0,
            detail: detail.map(str::to_string),
            info: None,
        }
    }

    #[test]
    fn lines_and_summary() {
        let pass = TestReport::from_cases("A", "h", None, vec![case("c", Verdict::Pass, None)], 1);
        assert_eq!(pass.line(), "PASS A (1 cases)");
        let fail = TestReport::from_cases(
            "B",
            "h",
            None,
            vec![
                case("ok", Verdict::Pass, None),
                case("bad", Verdict::Fail, Some("expected 200\ngot 404")),
            ],
            1,
        );
        assert_eq!(fail.line(), "FAIL B: case \"bad\": expected 200 | got 404");
        let skip = TestReport::from_cases("C", "h", None, vec![case("s", Verdict::Skip, Some("TLS"))], 1);
        assert_eq!(skip.line(), "SKIP C: TLS");
        let broken = TestReport::failed("D", "x", None, "unsupported harness x".into(), 0);
        assert_eq!(broken.line(), "FAIL D: unsupported harness x");
        let mut ignored = fail.clone();
        ignored.ignored_by_waypoint = vec!["security.istio.io/v1/AuthorizationPolicy ns/p".into()];
        assert!(
            ignored
                .line()
                .ends_with(" [the waypoint ignored security.istio.io/v1/AuthorizationPolicy ns/p]")
        );
        let run = RunReport::new(
            "f",
            Path::new("c"),
            &[PathBuf::from("m")],
            vec![pass, fail, skip, broken],
            5,
        );
        assert_eq!(run.summary_line(), "1 passed, 2 failed, 1 skipped");
        let json = serde_json::to_value(&run).unwrap_or_default();
        assert_eq!(json["tests"][1]["cases"][1]["verdict"], "fail");
        assert_eq!(json["tests"][1]["cases"][1]["detail"], "expected 200\ngot 404");
    }
}
