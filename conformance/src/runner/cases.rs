//! The case file (`format: gateway-api-conformance-cases/1`) as serde structs.
//!
//! Unknown fields are ignored everywhere: the files carry prose (`notes`, `description`, `band_rule` …) and
//! future files may add fields this runner does not act on. Tests are parsed one by one, so one malformed
//! test is reported as a failed test instead of making the whole file unusable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use serde_json::Value;

pub const FORMAT: &str = "gateway-api-conformance-cases/1";

#[derive(Debug, thiserror::Error)]
pub enum CaseFileError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid YAML: {reason}")]
    Yaml { path: PathBuf, reason: String },
    #[error("{path}: format is {found:?}, this runner reads {FORMAT:?}")]
    Format { path: PathBuf, found: String },
    #[error("{path}: no `tests` list")]
    NoTests { path: PathBuf },
}

/// A parsed case file.
#[derive(Debug, Clone)]
pub struct CaseFile {
    pub path: PathBuf,
    pub format: String,
    pub tests: Vec<TestEntry>,
}

/// One test of the file: parsed, or the reason it could not be.
#[derive(Debug, Clone)]
pub enum TestEntry {
    Parsed(Box<TestSpec>),
    Invalid { name: String, reason: String },
}

impl TestEntry {
    pub fn name(&self) -> &str {
        match self {
            TestEntry::Parsed(test) => &test.name,
            TestEntry::Invalid { name, .. } => name,
        }
    }
}

pub fn load(path: &Path) -> Result<CaseFile, CaseFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaseFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<CaseFile, CaseFileError> {
    let root: Value = serde_saphyr::from_str(text).map_err(|e| CaseFileError::Yaml {
        path: path.to_path_buf(),
        reason: e.to_string().lines().next().unwrap_or_default().to_string(),
    })?;
    let format = root
        .get("format")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if format != FORMAT {
        return Err(CaseFileError::Format {
            path: path.to_path_buf(),
            found: format,
        });
    }
    let Some(raw_tests) = root.get("tests").and_then(Value::as_array) else {
        return Err(CaseFileError::NoTests {
            path: path.to_path_buf(),
        });
    };
    let tests = raw_tests
        .iter()
        .enumerate()
        .map(
            |(i, raw)| match serde_path_to_error::deserialize::<_, TestSpec>(raw.clone()) {
                Ok(test) => TestEntry::Parsed(Box::new(test)),
                Err(e) => TestEntry::Invalid {
                    name: raw
                        .get("name")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("tests[{i}]")),
                    reason: format!("cannot parse the test: field {}: {}", e.path(), e.inner()),
                },
            },
        )
        .collect();
    Ok(CaseFile {
        path: path.to_path_buf(),
        format,
        tests,
    })
}

#[derive(Debug, Clone, Deserialize)]
pub struct TestSpec {
    pub name: String,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub features: Vec<String>,
    /// Relative to the manifests directory.
    #[serde(default)]
    pub manifests: Vec<String>,
    #[serde(default)]
    pub preconditions_k8s: Option<Preconditions>,
    pub harness: String,
    /// Gateway profile: where requests enter.
    #[serde(default)]
    pub entry: Option<PerCase<Entry>>,
    /// Mesh profile: which workload sends the requests.
    #[serde(default)]
    pub client: Option<PerCase<ClientSpec>>,
    #[serde(default)]
    pub notes: Option<String>,
    #[serde(default)]
    pub cases: Vec<CaseSpec>,
}

/// A test-level block, or the marker (`per_case`) saying each case carries its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerCase<T> {
    Given(T),
    Marker(String),
}

impl<T> PerCase<T> {
    pub fn given(&self) -> Option<&T> {
        match self {
            PerCase::Given(t) => Some(t),
            PerCase::Marker(_) => None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Preconditions {
    #[serde(default)]
    pub gateway_accepted_and_programmed: Vec<String>,
    #[serde(default)]
    pub routes_accepted: Vec<String>,
    #[serde(default)]
    pub routes_resolved_refs: Vec<String>,
    #[serde(default)]
    pub mesh_namespaces_ready: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    pub gateway: String,
    pub namespace: String,
    pub listener_port: u16,
    #[serde(default = "default_scheme")]
    pub scheme: String,
    #[serde(default)]
    pub tls: Option<Value>,
}

fn default_scheme() -> String {
    "http".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClientSpec {
    pub namespace: String,
    pub pod_selector: Selector,
}

/// `app=echo,version=v1`, or the same as a map.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Selector {
    Text(String),
    Map(BTreeMap<String, String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CaseSpec {
    pub name: String,
    /// Per-case entry when the test says `entry: per_case` (also accepted inside `request`).
    #[serde(default)]
    pub entry: Option<Entry>,
    #[serde(default)]
    pub request: RequestSpec,
    #[serde(default)]
    pub expect: Option<ExpectSpec>,
    #[serde(default)]
    pub warmup_expect: Option<ExpectSpec>,
    #[serde(default)]
    pub distribution: Option<DistributionSpec>,
    #[serde(default)]
    pub mirror_distribution: Option<MirrorDistributionSpec>,
    #[serde(default)]
    pub repeat: Option<RepeatSpec>,
    #[serde(default)]
    pub websocket: Option<WebsocketSpec>,
    /// Dotted expectation paths (`expect.backend.namespace`) the upstream harness does not compare.
    #[serde(default)]
    pub not_asserted_upstream: Vec<String>,
    #[serde(default)]
    pub notes: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RequestSpec {
    #[serde(default)]
    pub method: Option<String>,
    /// `null` = the address as dialled.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default, deserialize_with = "string_pairs")]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub follow_redirects: Option<bool>,
    /// Absent = HTTP/1.1; `H2C_PRIOR_KNOWLEDGE`; `HTTPS`.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default, deserialize_with = "string_pairs")]
    pub echo_set_response_headers: Vec<(String, String)>,
    // Mesh profile.
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub client: Option<ClientSpec>,
    /// Informational (derived from `target` by the file's author); the runner resolves `target` itself.
    #[serde(default)]
    pub addresses: Option<Addresses>,
    #[serde(default)]
    pub entry: Option<Entry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Addresses {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub pod: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExpectSpec {
    #[serde(default, deserialize_with = "one_or_many")]
    pub status: Vec<u16>,
    #[serde(default)]
    pub status_equivalents: Vec<u16>,
    #[serde(default)]
    pub proxied: Option<bool>,
    #[serde(default)]
    pub backend: Option<BackendSpec>,
    /// Absent (`None`), explicitly `null` (`Some(None)`: the proxy must answer itself), or given.
    #[serde(default, deserialize_with = "explicit_null")]
    pub backend_request: Option<Option<BackendRequestSpec>>,
    #[serde(default)]
    pub redirect: Option<RedirectSpec>,
    #[serde(default, deserialize_with = "string_pairs")]
    pub response_headers: Vec<(String, String)>,
    #[serde(default, deserialize_with = "string_lists")]
    pub response_header_one_of: Vec<(String, Vec<String>)>,
    #[serde(default)]
    pub response_absent_headers: Vec<String>,
    #[serde(default)]
    pub ignore_whitespace_in_response_headers: bool,
    #[serde(default)]
    pub mirrored_to: Vec<MirrorTarget>,
    /// WebSocket: e.g. `succeeds (101)`.
    #[serde(default)]
    pub handshake: Option<String>,
    #[serde(default)]
    pub echoed_frames_equal: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BackendSpec {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BackendRequestSpec {
    #[serde(default)]
    pub path: Option<String>,
    /// Where the file marks an upstream slip in `path`: what the test means.
    #[serde(default)]
    pub path_as_intended: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default, deserialize_with = "string_pairs")]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub absent_headers: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    /// `null` = not checked.
    #[serde(default)]
    pub host: Option<String>,
    /// `null` = no port or the scheme's default.
    #[serde(default, deserialize_with = "scalar_string")]
    pub port: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MirrorTarget {
    pub service: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub percent: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DistributionSpec {
    pub samples: usize,
    #[serde(default)]
    pub concurrency: Option<usize>,
    pub expected_fractions: BTreeMap<String, f64>,
    pub tolerance_abs: f64,
    #[serde(default)]
    pub backends_receiving_traffic_exactly: Option<Vec<String>>,
    #[serde(default)]
    pub max_attempts: Option<usize>,
    /// Prose naming a random header sent with half of the samples.
    #[serde(default)]
    pub entropy: Option<String>,
    /// Prose; present means every sample must also satisfy `warmup_expect`.
    #[serde(default)]
    pub per_request_check: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MirrorDistributionSpec {
    pub rounds_max: usize,
    pub requests_per_round: usize,
    #[serde(default)]
    pub concurrency: Option<usize>,
    pub accept_count_between: Vec<f64>,
    #[serde(default)]
    pub pause_between_failed_rounds_s: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RepeatSpec {
    pub count: usize,
    #[serde(default)]
    pub each_response_must: Vec<String>,
    #[serde(default)]
    pub status_not_checked: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct WebsocketSpec {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub origin: Option<String>,
    #[serde(default)]
    pub subprotocol: Option<String>,
    #[serde(default)]
    pub exchange: Vec<WsExchange>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct WsExchange {
    #[serde(default)]
    pub send_text: Option<String>,
    #[serde(default)]
    pub send_binary_hex: Option<String>,
    #[serde(default)]
    pub expect_text: Option<String>,
    #[serde(default)]
    pub expect_binary_hex: Option<String>,
}

// ------------------------------------------------------------------------------------- field helpers

/// A YAML scalar as the string a header value or port would be (`1` and `'1'` alike).
fn scalar_to_string(value: Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Value>::deserialize(d)?.and_then(scalar_to_string))
}

/// A map of scalars as (name, value) pairs; `null` values become empty strings.
fn string_pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    let map = Option::<BTreeMap<String, Value>>::deserialize(d)?.unwrap_or_default();
    Ok(map
        .into_iter()
        .map(|(k, v)| (k, scalar_to_string(v).unwrap_or_default()))
        .collect())
}

/// A map of scalar lists (a single scalar counts as a list of one).
fn string_lists<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, Vec<String>)>, D::Error> {
    let map = Option::<BTreeMap<String, Value>>::deserialize(d)?.unwrap_or_default();
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let values = match v {
                Value::Array(items) => items.into_iter().filter_map(scalar_to_string).collect(),
                other => scalar_to_string(other).into_iter().collect(),
            };
            (k, values)
        })
        .collect())
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u16),
        Many(Vec<u16>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(code)) => vec![code],
        Some(OneOrMany::Many(codes)) => codes,
    })
}

/// With `#[serde(default)]`: absent → `None`, `null` → `Some(None)`.
fn explicit_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

// ------------------------------------------------------------------------------------- placeholders

impl CaseSpec {
    /// A copy with `{name}` placeholders replaced in everything a request or a comparison reads.
    pub fn substitute(&self, vars: &[(&str, &str)]) -> CaseSpec {
        let sub = |s: &str| -> String {
            vars.iter().fold(s.to_string(), |acc, (name, value)| {
                acc.replace(&format!("{{{name}}}"), value)
            })
        };
        let sub_opt = |s: &Option<String>| s.as_deref().map(sub);
        let sub_pairs = |pairs: &[(String, String)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.clone(), sub(v))).collect()
        };
        let sub_expect = |e: &ExpectSpec| -> ExpectSpec {
            let mut e = e.clone();
            if let Some(Some(br)) = &mut e.backend_request {
                br.path = sub_opt(&br.path);
                br.path_as_intended = sub_opt(&br.path_as_intended);
                br.host = sub_opt(&br.host);
                br.headers = sub_pairs(&br.headers);
            }
            e.response_headers = sub_pairs(&e.response_headers);
            if let Some(r) = &mut e.redirect {
                r.path = sub_opt(&r.path);
                r.host = sub_opt(&r.host);
            }
            e
        };
        let mut case = self.clone();
        let r = &mut case.request;
        r.path = sub_opt(&r.path);
        r.host = sub_opt(&r.host);
        r.target = sub_opt(&r.target);
        r.headers = sub_pairs(&r.headers);
        r.echo_set_response_headers = sub_pairs(&r.echo_set_response_headers);
        case.expect = case.expect.as_ref().map(sub_expect);
        case.warmup_expect = case.warmup_expect.as_ref().map(sub_expect);
        if let Some(ws) = &mut case.websocket {
            ws.url = sub_opt(&ws.url);
        }
        case
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MINI: &str = r#"
format: gateway-api-conformance-cases/1
conventions: {anything: goes}
tests:
- name: Roundtrip
  harness: http_roundtrip
  manifests: [base/manifests.yaml]
  entry: {gateway: same-namespace, namespace: infra, listener_port: 80, scheme: http}
  unknown_field: 1
  cases:
  - name: c0
    request: {method: GET, host: null, path: /x?a=b, headers: {x-drop: 1, Version: two}, follow_redirects: false}
    expect:
      status: [200]
      backend: {service: null, namespace: infra}
      backend_request: {path: /x?a=b, headers: {X-A: v}, absent_headers: [X-B]}
      response_header_one_of: {access-control-max-age: ['3600'], x-one: single}
  - name: preflight
    request: {method: OPTIONS, path: /cors}
    expect: {status: [200, 204], backend_request: null}
  - name: redirect
    request: {path: /r}
    expect: {status: 302, redirect: {scheme: http, host: null, port: '8083', path: /p}}
- name: Mesh
  harness: mesh_exec_client
  client: per_case
  cases:
  - name: grpc
    request:
      client: {pod_selector: 'app=echo,version=v1', namespace: mesh}
      scheme: grpc
      target: echo:7070
      headers: {x-test-case: set}
    expect: {status: [200], backend: {service: echo-v1}}
    not_asserted_upstream: [expect.backend.namespace]
- name: Weights
  harness: weighted_distribution
  client: {pod_selector: {app: echo}, namespace: mesh}
  cases:
  - name: w
    request: {path: /}
    warmup_expect: {status: [200]}
    distribution: {samples: 500, concurrency: 10, expected_fractions: {a: 0.7, b: 0.3}, tolerance_abs: 0.05, max_attempts: 10}
- name: Broken
  harness: 17
"#;

    #[test]
    fn parses_every_field_shape() {
        let file = parse(Path::new("mini.yaml"), MINI).unwrap();
        assert_eq!(file.tests.len(), 4);
        let TestEntry::Parsed(t) = &file.tests[0] else { panic!() };
        assert_eq!(t.entry.as_ref().unwrap().given().unwrap().listener_port, 80);
        let c = &t.cases[0];
        assert_eq!(c.request.host, None);
        assert_eq!(
            c.request.headers,
            vec![("Version".into(), "two".into()), ("x-drop".into(), "1".into())]
        );
        let e = c.expect.as_ref().unwrap();
        assert_eq!(e.backend.as_ref().unwrap().service, None);
        let br = e.backend_request.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(br.absent_headers, vec!["X-B"]);
        assert_eq!(e.response_header_one_of[1], ("x-one".into(), vec!["single".into()]));
        let preflight = t.cases[1].expect.as_ref().unwrap();
        assert!(matches!(preflight.backend_request, Some(None)));
        assert!(t.cases[0].expect.as_ref().unwrap().backend_request.is_some());
        let redirect = t.cases[2].expect.as_ref().unwrap();
        assert_eq!(redirect.status, vec![302]);
        assert_eq!(redirect.redirect.as_ref().unwrap().port.as_deref(), Some("8083"));

        let TestEntry::Parsed(m) = &file.tests[1] else { panic!() };
        assert!(matches!(&m.client, Some(PerCase::Marker(s)) if s == "per_case"));
        assert_eq!(m.cases[0].request.client.as_ref().unwrap().namespace, "mesh");
        assert_eq!(m.cases[0].not_asserted_upstream, vec!["expect.backend.namespace"]);

        let TestEntry::Parsed(w) = &file.tests[2] else { panic!() };
        assert!(matches!(
            &w.client.as_ref().unwrap().given().unwrap().pod_selector,
            Selector::Map(m) if m["app"] == "echo"
        ));
        assert_eq!(w.cases[0].distribution.as_ref().unwrap().samples, 500);

        let TestEntry::Invalid { name, reason } = &file.tests[3] else {
            panic!()
        };
        assert_eq!(name, "Broken");
        assert!(reason.contains("harness"), "{reason}");
    }

    #[test]
    fn rejects_other_formats() {
        let err = parse(Path::new("x.yaml"), "format: other/2\ntests: []\n").unwrap_err();
        assert!(err.to_string().contains("other/2"), "{err}");
    }

    #[test]
    fn placeholders_are_substituted_in_requests_and_expectations() {
        let file = parse(
            Path::new("p.yaml"),
            r#"
format: gateway-api-conformance-cases/1
tests:
- name: T
  harness: retry_probe
  cases:
  - name: c
    request: {path: '/retry?uuid={uuid}'}
    expect: {status: [200], backend_request: {path: '/retry?uuid={uuid}'}}
"#,
        )
        .unwrap();
        let TestEntry::Parsed(t) = &file.tests[0] else { panic!() };
        let c = t.cases[0].substitute(&[("uuid", "u-1")]);
        assert_eq!(c.request.path.as_deref(), Some("/retry?uuid=u-1"));
        let br = c.expect.unwrap().backend_request.unwrap().unwrap();
        assert_eq!(br.path.as_deref(), Some("/retry?uuid=u-1"));
    }

    /// Our own case files parse completely, each harness finds its block, and their manifests exist.
    #[test]
    fn own_case_files_parse_completely() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cases");
        let harnesses = check_case_files(&dir, &["istio-traffic.yaml"]);
        assert!(harnesses.contains("mesh_weighted_distribution") && harnesses.contains("retry_probe"));
        let file = load(&dir.join("istio-traffic.yaml")).unwrap();
        for test in &file.tests {
            let TestEntry::Parsed(t) = test else { unreachable!() };
            for manifest in t.manifests.iter().filter(|m| m.starts_with("istio/")) {
                assert!(dir.join("manifests").join(manifest).is_file(), "{}: {manifest}", t.name);
            }
        }
    }

    /// Both shared files parse completely, and every harness kind they name is one the runner knows.
    #[test]
    fn shared_case_files_parse_completely() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance");
        if !dir.exists() {
            eprintln!("skipping: {} is absent", dir.display());
            return;
        }
        let harnesses = check_case_files(&dir, &["cases.yaml", "istio-cases.yaml"]);
        assert!(harnesses.len() >= 9, "{harnesses:?}");
    }

    fn check_case_files(dir: &Path, names: &[&str]) -> std::collections::BTreeSet<String> {
        let mut harnesses = std::collections::BTreeSet::new();
        for name in names {
            let file = load(&dir.join(name)).unwrap();
            assert!(!file.tests.is_empty());
            for test in &file.tests {
                let TestEntry::Parsed(t) = test else {
                    panic!("{name}: {test:?}")
                };
                assert!(!t.cases.is_empty(), "{}", t.name);
                harnesses.insert(t.harness.clone());
                // Each harness finds the block it reads.
                for c in &t.cases {
                    let what = format!("{}: {}", t.name, c.name);
                    match t.harness.as_str() {
                        "weighted_distribution" | "mesh_weighted_distribution" => {
                            let d = c.distribution.as_ref().expect(&what);
                            assert!(d.samples > 0 && !d.expected_fractions.is_empty(), "{what}");
                            assert!(c.warmup_expect.is_some(), "{what}");
                        }
                        "mirror_distribution" => {
                            let m = c.mirror_distribution.as_ref().expect(&what);
                            assert_eq!(m.accept_count_between.len(), 2, "{what}");
                            assert!(!c.expect.as_ref().expect(&what).mirrored_to.is_empty(), "{what}");
                        }
                        "http_roundtrip_with_mirror" => {
                            assert!(c.request.path.as_ref().expect(&what).contains("{request_id}"), "{what}");
                            assert!(!c.expect.as_ref().expect(&what).mirrored_to.is_empty(), "{what}");
                        }
                        "repeated_invariant" => {
                            assert!(!c.repeat.as_ref().expect(&what).each_response_must.is_empty(), "{what}")
                        }
                        "retry_probe" => {
                            assert!(c.request.path.as_ref().expect(&what).contains("{uuid}"), "{what}")
                        }
                        "websocket" => {
                            let ws = c.websocket.as_ref().expect(&what);
                            assert_eq!(ws.exchange.len(), 2, "{what}");
                        }
                        "http_roundtrip" => {
                            assert!(!c.expect.as_ref().expect(&what).status.is_empty(), "{what}");
                            assert!(t.entry.is_some(), "{what}");
                        }
                        "mesh_exec_client" => {
                            assert!(c.request.target.is_some(), "{what}");
                            let client = c.request.client.as_ref().or(t.client.as_ref().and_then(PerCase::given));
                            assert!(client.is_some(), "{what}");
                        }
                        other => panic!("{what}: harness {other} not covered by this test"),
                    }
                }
            }
        }
        for h in &harnesses {
            assert!(
                crate::runner::harness::Harness::parse(h).is_some(),
                "unknown harness {h}"
            );
        }
        harnesses
    }
}
