//! Expectations, compared exactly as the case file's `conventions` describe: `gateway_expect` for requests
//! through a Gateway, `mesh_expect` for requests from a mesh workload. The mesh comparison is stricter than the
//! upstream harness: it also checks the fields the file lists under `not_asserted_upstream` (namespace, path,
//! redirect), using `path_as_intended` where the file marks an upstream slip.

use super::cases::{BackendRequestSpec, ExpectSpec, RedirectSpec};
use super::headers::{self, without_spaces};
use super::location;
use super::observe::{EchoView, Observed};
use super::target::default_port;

/// The timeout codes the harness treats as one (`IsTimeoutError`).
const TIMEOUT_CODES: [u16; 2] = [408, 504];

/// What was sent, for defaults and redirect checks.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    /// Path with query, as sent.
    pub path: &'a str,
}

/// No status in the expectation means 200, as in the upstream `ExpectedResponse` (never "anything goes").
fn expected_statuses(expect: &ExpectSpec) -> &[u16] {
    if expect.status.is_empty() {
        &[200]
    } else {
        &expect.status
    }
}

pub fn status_ok(expect: &ExpectSpec, actual: u16) -> bool {
    let expected = expected_statuses(expect);
    if expected.contains(&actual) {
        return true;
    }
    let classes: [&[u16]; 2] = [&expect.status_equivalents, &TIMEOUT_CODES];
    classes
        .iter()
        .any(|class| class.contains(&actual) && expected.iter().any(|s| class.contains(s)))
}

fn check_status(expect: &ExpectSpec, actual: u16) -> Result<(), String> {
    if status_ok(expect, actual) {
        Ok(())
    } else {
        Err(format!("expected status {:?}, got {actual}", expected_statuses(expect)))
    }
}

pub fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// `gateway_expect`.
pub fn check_gateway(expect: &ExpectSpec, observed: &Observed, request: &RequestFacts<'_>) -> Result<(), String> {
    check_status(expect, observed.status)?;
    let echo = &observed.echo;
    if matches!(observed.status, 200 | 204) {
        let namespace = expect
            .backend
            .as_ref()
            .and_then(|b| b.namespace.as_deref())
            .unwrap_or("");
        match &expect.backend_request {
            // The proxy must answer itself: nothing may look like an echo.
            Some(None) => {
                compare("echo path (the proxy must answer itself)", "", &echo.path)?;
                compare(
                    "echo namespace (the proxy must answer itself)",
                    namespace,
                    &echo.namespace,
                )?;
            }
            given => {
                let defaults = BackendRequestSpec {
                    path: Some(request.path.to_string()),
                    method: Some(request.method.to_string()),
                    ..BackendRequestSpec::default()
                };
                let br = given.as_ref().and_then(Option::as_ref).unwrap_or(&defaults);
                if let Some(host) = &br.host {
                    compare("backend host", host, &echo.host)?;
                }
                compare("backend path", br.path.as_deref().unwrap_or(request.path), &echo.path)?;
                compare("backend method", br.method.as_deref().unwrap_or("GET"), &echo.method)?;
                compare("backend namespace", namespace, &echo.namespace)?;
                check_backend_headers(br, echo)?;
            }
        }
        if let Some(service) = expect.backend.as_ref().and_then(|b| b.service.as_deref())
            && !echo.pod.starts_with(service)
        {
            return Err(format!("expected backend {service}, answered by pod {:?}", echo.pod));
        }
        check_response_headers(expect, observed, HeaderValues::Joined)?;
    } else if is_redirect(observed.status)
        && let Some(redirect) = &expect.redirect
    {
        check_redirect(redirect, observed.location(), request)?;
    }
    Ok(())
}

/// `mesh_expect`, plus the `not_asserted_upstream` fields.
pub fn check_mesh(
    expect: &ExpectSpec,
    observed: &Observed,
    request: &RequestFacts<'_>,
    not_asserted_upstream: &[String],
) -> Result<(), String> {
    check_status(expect, observed.status)?;
    let echo = &observed.echo;
    if let Some(service) = expect.backend.as_ref().and_then(|b| b.service.as_deref())
        && !echo.pod.starts_with(service)
    {
        return Err(format!("expected backend {service}, answered by {:?}", echo.pod));
    }
    if let Some(Some(br)) = &expect.backend_request {
        check_backend_headers(br, echo)?;
    }
    check_response_headers(expect, observed, HeaderValues::First)?;

    // Stricter than upstream from here on: the intended behaviour the file transcribes.
    let strict = |field: &str, result: Result<(), String>| {
        result.map_err(|e| {
            if not_asserted_upstream.iter().any(|f| f == field) {
                format!("{e} (checked beyond upstream: {field})")
            } else {
                e
            }
        })
    };
    if let Some(namespace) = expect.backend.as_ref().and_then(|b| b.namespace.as_deref())
        && !echo.pod.is_empty()
    {
        strict(
            "expect.backend.namespace",
            compare("backend namespace", namespace, &echo.namespace),
        )?;
    }
    if let Some(Some(br)) = &expect.backend_request {
        if let Some(path) = br.path_as_intended.as_deref().or(br.path.as_deref()) {
            strict("expect.backend_request.path", compare("backend path", path, &echo.path))?;
        }
        if let Some(method) = &br.method {
            strict(
                "expect.backend_request.method",
                compare("backend method", method, &echo.method),
            )?;
        }
        if let Some(host) = &br.host {
            strict("expect.backend_request.host", compare("backend host", host, &echo.host))?;
        }
    }
    if is_redirect(observed.status)
        && let Some(redirect) = &expect.redirect
    {
        strict(
            "expect.redirect",
            check_redirect(redirect, observed.location(), request),
        )?;
    }
    Ok(())
}

fn compare(what: &str, expected: &str, actual: &str) -> Result<(), String> {
    if expected == actual {
        Ok(())
    } else {
        Err(format!("{what}: expected {expected:?}, got {actual:?}"))
    }
}

fn check_backend_headers(br: &BackendRequestSpec, echo: &EchoView) -> Result<(), String> {
    for (name, expected) in &br.headers {
        match echo.header(name) {
            None => return Err(format!("backend request header {name}: expected {expected:?}, absent")),
            Some(values) if values.join(",") != *expected => {
                return Err(format!(
                    "backend request header {name}: expected {expected:?}, got {:?}",
                    values.join(",")
                ));
            }
            Some(_) => {}
        }
    }
    for name in &br.absent_headers {
        if let Some(values) = echo.header(name) {
            return Err(format!(
                "backend request header {name} should be absent, got {:?}",
                values.join(",")
            ));
        }
    }
    Ok(())
}

/// Gateway compares all values joined with `,`; the mesh harness reads the header's first value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HeaderValues {
    Joined,
    First,
}

fn check_response_headers(expect: &ExpectSpec, observed: &Observed, mode: HeaderValues) -> Result<(), String> {
    let normalise = |s: &str| {
        if expect.ignore_whitespace_in_response_headers {
            without_spaces(s)
        } else {
            s.to_string()
        }
    };
    let actual = |name: &str| -> Option<String> {
        match mode {
            HeaderValues::Joined => headers::joined(&observed.headers, name),
            HeaderValues::First => headers::values(&observed.headers, name).first().map(|v| v.to_string()),
        }
    };
    for (name, expected) in &expect.response_headers {
        match actual(name) {
            None => return Err(format!("response header {name}: expected {expected:?}, absent")),
            Some(got) if normalise(&got) != normalise(expected) => {
                return Err(format!("response header {name}: expected {expected:?}, got {got:?}"));
            }
            Some(_) => {}
        }
    }
    for (name, allowed) in &expect.response_header_one_of {
        let Some(got) = actual(name) else {
            return Err(format!("response header {name}: expected one of {allowed:?}, absent"));
        };
        if !allowed.iter().any(|a| normalise(a) == normalise(&got)) {
            return Err(format!(
                "response header {name}: expected one of {allowed:?}, got {got:?}"
            ));
        }
    }
    for name in &expect.response_absent_headers {
        if let Some(got) = headers::joined(&observed.headers, name) {
            return Err(format!("response header {name} should be absent, got {got:?}"));
        }
    }
    Ok(())
}

/// `when_status_is_a_redirect`: scheme and path default to the request's, `host: null` is not checked,
/// `port: null` means no port or the scheme's default.
pub fn check_redirect(
    redirect: &RedirectSpec,
    location: Option<&str>,
    request: &RequestFacts<'_>,
) -> Result<(), String> {
    let Some(raw) = location else {
        return Err("redirect without a Location header".into());
    };
    let loc = location::parse(raw);
    let context = |e: String| format!("{e} (Location {raw:?})");
    if let Some(host) = &redirect.host {
        compare("redirect host", host, &loc.host).map_err(context)?;
    }
    let scheme = redirect.scheme.as_deref().unwrap_or(request.scheme);
    compare("redirect scheme", scheme, &loc.scheme).map_err(context)?;
    let request_path = request.path.split('?').next().unwrap_or_default();
    let path = redirect.path.as_deref().unwrap_or(request_path);
    compare("redirect path", path, &loc.path).map_err(context)?;
    match &redirect.port {
        Some(port) => compare("redirect port", port, &loc.port).map_err(context)?,
        None => {
            let default = default_port(&loc.scheme).to_string();
            if !loc.port.is_empty() && loc.port != default {
                return Err(context(format!(
                    "redirect port: expected none or {default}, got {:?}",
                    loc.port
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::runner::cases::BackendSpec;
    use std::collections::BTreeMap;

    const GET_ROOT: RequestFacts<'static> = RequestFacts {
        method: "GET",
        scheme: "http",
        path: "/v2?x=1",
    };

    fn echo(path: &str, pod: &str, headers: &[(&str, &str)]) -> EchoView {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (n, v) in headers {
            map.entry(n.to_ascii_lowercase()).or_default().push(v.to_string());
        }
        EchoView {
            path: path.into(),
            method: "GET".into(),
            namespace: "infra".into(),
            pod: pod.into(),
            headers: map,
            ..EchoView::default()
        }
    }

    fn observed(status: u16, headers: &[(&str, &str)], echo: EchoView) -> Observed {
        Observed {
            status,
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            echo,
            grpc_status: None,
        }
    }

    fn expect_backend(service: Option<&str>) -> ExpectSpec {
        ExpectSpec {
            status: vec![200],
            backend: Some(BackendSpec {
                service: service.map(str::to_string),
                namespace: Some("infra".into()),
            }),
            backend_request: Some(Some(BackendRequestSpec {
                path: Some("/v2?x=1".into()),
                method: Some("GET".into()),
                headers: vec![("X-Header-Add".into(), "a,b".into())],
                absent_headers: vec!["X-Gone".into()],
                ..BackendRequestSpec::default()
            })),
            ..ExpectSpec::default()
        }
    }

    #[test]
    fn statuses_with_timeout_equivalence() {
        let mut e = ExpectSpec {
            status: vec![504],
            ..ExpectSpec::default()
        };
        assert!(status_ok(&e, 504) && status_ok(&e, 408) && !status_ok(&e, 500));
        e.status = vec![500, 503];
        assert!(status_ok(&e, 503) && !status_ok(&e, 504));
        e.status = vec![200, 204];
        e.status_equivalents = vec![200, 204, 206];
        assert!(status_ok(&e, 206));
        let unspecified = ExpectSpec::default();
        assert!(status_ok(&unspecified, 200) && !status_ok(&unspecified, 404));
    }

    #[test]
    fn gateway_backend_and_headers() {
        let e = expect_backend(Some("infra-backend-v2"));
        let good = echo(
            "/v2?x=1",
            "infra-backend-v2-abc-def",
            &[("X-Header-Add", "a"), ("x-header-add", "b")],
        );
        check_gateway(&e, &observed(200, &[], good.clone()), &GET_ROOT).unwrap();
        let wrong_pod = EchoView {
            pod: "infra-backend-v1-abc-def".into(),
            ..good.clone()
        };
        let err = check_gateway(&e, &observed(200, &[], wrong_pod), &GET_ROOT).unwrap_err();
        assert!(err.contains("infra-backend-v2"), "{err}");
        let spaced = echo("/v2?x=1", "infra-backend-v2-a-b", &[("X-Header-Add", "a, b")]);
        assert!(check_gateway(&e, &observed(200, &[], spaced), &GET_ROOT).is_err());
        let mut leaked = good.clone();
        leaked.headers.insert("x-gone".into(), vec!["1".into()]);
        assert!(check_gateway(&e, &observed(200, &[], leaked), &GET_ROOT).is_err());
        // Not 2xx: only the status counts.
        let e404 = ExpectSpec {
            status: vec![404],
            ..e.clone()
        };
        check_gateway(&e404, &observed(404, &[], EchoView::default()), &GET_ROOT).unwrap();
        assert!(check_gateway(&e, &observed(404, &[], good), &GET_ROOT).is_err());
    }

    #[test]
    fn gateway_preflight_must_not_reach_a_backend() {
        let e = ExpectSpec {
            status: vec![200, 204],
            backend_request: Some(None),
            response_header_one_of: vec![(
                "access-control-allow-methods".into(),
                vec!["GET, OPTIONS".into(), "OPTIONS, GET".into()],
            )],
            ignore_whitespace_in_response_headers: true,
            response_absent_headers: vec!["Access-Control-Allow-Credentials".into()],
            ..ExpectSpec::default()
        };
        let facts = RequestFacts {
            method: "OPTIONS",
            scheme: "http",
            path: "/cors",
        };
        let own = EchoView {
            method: "OPTIONS".into(),
            ..EchoView::default()
        };
        check_gateway(
            &e,
            &observed(204, &[("access-control-allow-methods", "OPTIONS,GET")], own.clone()),
            &facts,
        )
        .unwrap();
        let forwarded = EchoView {
            path: "/cors".into(),
            namespace: "infra".into(),
            ..own.clone()
        };
        assert!(
            check_gateway(
                &e,
                &observed(200, &[("access-control-allow-methods", "GET")], forwarded),
                &facts
            )
            .is_err()
        );
        let err = check_gateway(
            &e,
            &observed(
                204,
                &[
                    ("access-control-allow-methods", "GET,OPTIONS"),
                    ("access-control-allow-credentials", "true"),
                ],
                own,
            ),
            &facts,
        )
        .unwrap_err();
        assert!(err.contains("absent"), "{err}");
    }

    #[test]
    fn response_headers_join_values() {
        let e = ExpectSpec {
            status: vec![200],
            backend_request: Some(Some(BackendRequestSpec::default())),
            response_headers: vec![("X-Header-Add".into(), "some-other-value,add-appends-values".into())],
            ..ExpectSpec::default()
        };
        let facts = RequestFacts {
            method: "GET",
            scheme: "http",
            path: "",
        };
        let mut ok = echo("", "p", &[]);
        ok.namespace.clear();
        let two = observed(
            200,
            &[
                ("x-header-add", "some-other-value"),
                ("x-header-add", "add-appends-values"),
            ],
            ok.clone(),
        );
        check_gateway(&e, &two, &facts).unwrap();
        let spaced = observed(200, &[("x-header-add", "some-other-value, add-appends-values")], ok);
        assert!(check_gateway(&e, &spaced, &facts).is_err());
    }

    #[test]
    fn redirects_follow_the_conventions() {
        let r = RedirectSpec {
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: Some("/scheme".into()),
        };
        let facts = RequestFacts {
            method: "GET",
            scheme: "http",
            path: "/scheme?x=1",
        };
        check_redirect(&r, Some("https://10.200.0.1/scheme"), &facts).unwrap();
        check_redirect(&r, Some("https://10.200.0.1:443/scheme"), &facts).unwrap();
        assert!(check_redirect(&r, Some("https://10.200.0.1:8443/scheme"), &facts).is_err());
        assert!(
            check_redirect(&r, Some("/scheme"), &facts).is_err(),
            "relative: no scheme"
        );
        assert!(check_redirect(&r, None, &facts).is_err());
        let port = RedirectSpec {
            scheme: None,
            host: Some("example.org".into()),
            port: Some("8083".into()),
            path: None,
        };
        check_redirect(&port, Some("http://example.org:8083/scheme"), &facts).unwrap();
        assert!(check_redirect(&port, Some("http://example.org/scheme"), &facts).is_err());
        let e = ExpectSpec {
            status: vec![302],
            redirect: Some(r),
            ..ExpectSpec::default()
        };
        let o = observed(302, &[("location", "https://x/scheme")], EchoView::default());
        check_gateway(&e, &o, &facts).unwrap();
    }

    #[test]
    fn mesh_checks_upstream_fields_and_the_intended_ones() {
        let mut e = expect_backend(Some("echo-v1"));
        e.backend = Some(BackendSpec {
            service: Some("echo-v1".into()),
            namespace: Some("mesh".into()),
        });
        e.response_headers = vec![("X-Header-Set".into(), "v1".into())];
        let mut view = echo(
            "/v2?x=1",
            "echo-v1-a-b",
            &[("X-Header-Add", "a"), ("X-Header-Add", "b")],
        );
        view.namespace = "mesh".into();
        let o = observed(200, &[("x-header-set", "v1"), ("x-header-set", "other")], view.clone());
        check_mesh(&e, &o, &GET_ROOT, &[]).unwrap();

        let mut elsewhere = view.clone();
        elsewhere.namespace = "other".into();
        let err = check_mesh(
            &e,
            &observed(200, &[("x-header-set", "v1")], elsewhere),
            &GET_ROOT,
            &["expect.backend.namespace".into()],
        )
        .unwrap_err();
        assert!(err.contains("beyond upstream"), "{err}");

        // The upstream slip: the literal says /named, the file says /unnamed is meant.
        if let Some(Some(br)) = &mut e.backend_request {
            br.path = Some("/named".into());
            br.path_as_intended = Some("/v2?x=1".into());
        }
        check_mesh(&e, &o, &GET_ROOT, &["expect.backend_request.path".into()]).unwrap();

        // A redirect answered by the proxy has no Hostname: any backend is fine when none is named.
        let redirect = ExpectSpec {
            status: vec![301],
            redirect: Some(RedirectSpec {
                scheme: Some("http".into()),
                host: Some("example.org".into()),
                port: None,
                path: Some("/p".into()),
            }),
            ..ExpectSpec::default()
        };
        let facts = RequestFacts {
            method: "GET",
            scheme: "http",
            path: "/p",
        };
        let o = observed(301, &[("location", "http://example.org/p")], EchoView::default());
        check_mesh(&redirect, &o, &facts, &["expect.redirect".into()]).unwrap();
        let o = observed(301, &[("location", "http://example.com/p")], EchoView::default());
        assert!(check_mesh(&redirect, &o, &facts, &[]).is_err());
    }
}
