//! The CORS layer (Gateway API `HTTPCORSFilter`, also what Istio `corsPolicy` compiles to).
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered here and never
//!   forwarded: 200 with the CORS headers when the origin is allowed, 200 without them when it is not (the
//!   first of the two answers the Gateway API allows; the browser then refuses the actual request).
//! - Any other request with an allowed `Origin` is forwarded and the response gets `access-control-allow-origin`,
//!   `-allow-credentials` and `-expose-headers`. Requests from other origins pass untouched.
//!
//! Header values, as the Gateway API spec and the HTTPRouteCORS conformance cases want them:
//! - allow-origin: `*` when the allowed origins are `*` and credentials are off, else the request's origin
//!   (with `Vary: Origin`, since the answer then depends on it).
//! - allow-methods: the configured list joined with `, `; for `*`, the requested method (valid with and
//!   without credentials).
//! - allow-headers: the configured list; for `*`, the requested headers, or `*` when none were requested and
//!   credentials are off.
//! - expose-headers: the configured list, on preflights too (the conformance cases expect it there); `*` when
//!   credentials are off; with credentials, `*` becomes the names of the actual response's headers (and is
//!   left out of preflights).
//! - max-age when configured; allow-credentials `true` when enabled.
//!
//! Origins match exactly, by `*`, or by a host wildcard (`https://*.bar.com`: scheme and port must match, `*`
//! stands for one or more labels). A missing port is the scheme's default, so `https://a.com:443` and
//! `https://a.com` are the same origin. Scheme and host compare case-insensitively.

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::authority::{default_port, split_host_port};
use crate::context::ActiveFilters;
use crate::reply::empty_body;
use crate::route::{CorsPolicy, Filter};
use crate::service::{HttpService, call_ready};
use crate::{Body, ResponseFuture};

#[derive(Debug, Clone, Copy, Default)]
pub struct CorsLayer;

impl CorsLayer {
    pub fn new() -> CorsLayer {
        CorsLayer
    }
}

impl<S> Layer<S> for CorsLayer {
    type Service = CorsService<S>;

    fn layer(&self, inner: S) -> CorsService<S> {
        CorsService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct CorsService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for CorsService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let policy = ActiveFilters::of(&req).and_then(|filters| {
            filters.iter().find_map(|f| match f {
                Filter::Cors(policy) => Some(policy.clone()),
                _ => None,
            })
        });
        let origin = req.headers().get(ORIGIN).cloned();
        let (Some(policy), Some(origin)) = (policy, origin) else {
            return call_ready(&mut self.inner, req);
        };
        let allowed = origin.to_str().is_ok_and(|o| origin_allowed(&policy, o));

        if req.method() == Method::OPTIONS && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
            let mut response = Response::new(empty_body());
            *response.status_mut() = StatusCode::OK;
            if allowed {
                preflight_headers(&policy, &origin, req.headers(), response.headers_mut());
            }
            return Box::pin(std::future::ready(Ok(response)));
        }
        if !allowed {
            return call_ready(&mut self.inner, req);
        }
        let fut = call_ready(&mut self.inner, req);
        Box::pin(async move {
            let mut response = fut.await?;
            actual_headers(&policy, &origin, response.headers_mut());
            Ok(response)
        })
    }
}

fn has_wildcard(list: &[String]) -> bool {
    list.iter().any(|v| v == "*")
}

fn joined(list: &[String]) -> Option<HeaderValue> {
    if list.is_empty() {
        return None;
    }
    HeaderValue::from_str(&list.join(", ")).ok()
}

fn allow_origin(policy: &CorsPolicy, origin: &HeaderValue, out: &mut HeaderMap) {
    if has_wildcard(&policy.allow_origins) && !policy.allow_credentials {
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    } else {
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        out.append(VARY, HeaderValue::from_static("origin"));
    }
    if policy.allow_credentials {
        out.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
}

fn preflight_headers(policy: &CorsPolicy, origin: &HeaderValue, request: &HeaderMap, out: &mut HeaderMap) {
    allow_origin(policy, origin, out);
    let methods = if has_wildcard(&policy.allow_methods) {
        request.get(ACCESS_CONTROL_REQUEST_METHOD).cloned()
    } else {
        joined(&policy.allow_methods)
    };
    if let Some(methods) = methods {
        out.insert(ACCESS_CONTROL_ALLOW_METHODS, methods);
    }
    let headers = if has_wildcard(&policy.allow_headers) {
        match request.get(ACCESS_CONTROL_REQUEST_HEADERS) {
            Some(requested) => Some(requested.clone()),
            None => (!policy.allow_credentials).then_some(HeaderValue::from_static("*")),
        }
    } else {
        joined(&policy.allow_headers)
    };
    if let Some(headers) = headers {
        out.insert(ACCESS_CONTROL_ALLOW_HEADERS, headers);
    }
    let expose = if has_wildcard(&policy.expose_headers) {
        (!policy.allow_credentials).then_some(HeaderValue::from_static("*"))
    } else {
        joined(&policy.expose_headers)
    };
    if let Some(expose) = expose {
        out.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose);
    }
    if let Some(max_age) = policy.max_age {
        out.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(max_age));
    }
}

fn actual_headers(policy: &CorsPolicy, origin: &HeaderValue, out: &mut HeaderMap) {
    let expose = if !has_wildcard(&policy.expose_headers) {
        joined(&policy.expose_headers)
    } else if !policy.allow_credentials {
        Some(HeaderValue::from_static("*"))
    } else {
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        (!names.is_empty())
            .then(|| HeaderValue::from_str(&names.join(", ")).ok())
            .flatten()
    };
    allow_origin(policy, origin, out);
    if let Some(expose) = expose {
        out.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose);
    }
}

pub fn origin_allowed(policy: &CorsPolicy, origin: &str) -> bool {
    policy
        .allow_origins
        .iter()
        .any(|pattern| origin_matches(pattern, origin))
}

struct Origin<'a> {
    scheme: &'a str,
    host: &'a str,
    port: Option<u16>,
}

fn parse_origin(s: &str) -> Option<Origin<'_>> {
    let (scheme, rest) = s.split_once("://")?;
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    let (host, port) = split_host_port(rest);
    Some(Origin {
        scheme,
        host,
        port: port.or_else(|| default_port(scheme)),
    })
}

fn origin_matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (Some(p), Some(o)) = (parse_origin(pattern), parse_origin(origin)) else {
        return false;
    };
    if !p.scheme.eq_ignore_ascii_case(o.scheme) || p.port != o.port {
        return false;
    }
    if p.host == "*" {
        return true;
    }
    match p.host.strip_prefix('*') {
        Some(suffix) => {
            o.host.len() > suffix.len()
                && o.host.as_bytes()[o.host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => p.host.eq_ignore_ascii_case(o.host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Matched, Route, RouteKind, Rule};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The four policies of the HTTPRouteCORS conformance manifest.
    fn cors_1() -> CorsPolicy {
        CorsPolicy {
            allow_origins: strings(&["https://www.foo.com", "https://*.bar.com"]),
            allow_methods: strings(&["GET", "OPTIONS"]),
            allow_headers: strings(&["x-header-1", "x-header-2"]),
            expose_headers: strings(&["x-header-3", "x-header-4"]),
            allow_credentials: true,
            max_age: Some(3600),
        }
    }
    fn cors_2() -> CorsPolicy {
        CorsPolicy {
            allow_origins: strings(&["https://www.foo.com"]),
            allow_methods: strings(&["*"]),
            max_age: Some(5),
            ..Default::default()
        }
    }
    fn wildcard_origin() -> CorsPolicy {
        CorsPolicy {
            allow_origins: strings(&["*"]),
            allow_methods: strings(&["PUT"]),
            ..Default::default()
        }
    }
    fn wildcard_all(credentials: bool) -> CorsPolicy {
        CorsPolicy {
            allow_origins: strings(&["*"]),
            allow_methods: strings(&["*"]),
            allow_headers: strings(&["*"]),
            allow_credentials: credentials,
            ..Default::default()
        }
    }

    struct Run {
        response: Response<Body>,
        forwarded: usize,
    }

    async fn exchange(policy: CorsPolicy, method: Method, headers: &[(&str, &str)]) -> Run {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let inner = tower::service_fn(move |_req: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                let mut res = Response::new(empty_body());
                res.headers_mut().insert("x-backend", HeaderValue::from_static("1"));
                Ok::<_, Infallible>(res)
            }
        });
        let mut builder = Request::builder().method(method).uri("/cors");
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        let mut req = builder.body(empty_body()).unwrap();
        let rule = Rule {
            filters: vec![Filter::Cors(Arc::new(policy))],
            ..Default::default()
        };
        req.extensions_mut().insert(Matched {
            route: Arc::new(Route {
                kind: RouteKind::Http,
                namespace: "ns".into(),
                name: "r".into(),
                creation_timestamp: None,
                source_order: 0,
                hostnames: vec![],
                rules: vec![],
            }),
            rule: Arc::new(rule),
            matched_prefix: None,
            rule_index: 0,
            match_index: 0,
        });
        let response = CorsLayer.layer(inner).oneshot(req).await.unwrap();
        Run {
            response,
            forwarded: calls.load(Ordering::SeqCst),
        }
    }

    fn header<'a>(run: &'a Run, name: &str) -> Option<&'a str> {
        run.response.headers().get(name).map(|v| v.to_str().unwrap())
    }

    fn preflight<'a>(origin: &'a str, method: &'a str, headers: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
        let mut h = vec![("origin", origin), ("access-control-request-method", method)];
        if let Some(headers) = headers {
            h.push(("access-control-request-headers", headers));
        }
        h
    }

    #[tokio::test]
    async fn preflight_from_allowed_origins() {
        for origin in ["https://www.foo.com", "https://www.bar.com", "https://xpto.www.bar.com"] {
            let run = exchange(
                cors_1(),
                Method::OPTIONS,
                &preflight(origin, "GET", Some("x-header-1, x-header-2")),
            )
            .await;
            assert_eq!(run.forwarded, 0);
            assert_eq!(run.response.status(), StatusCode::OK);
            assert_eq!(header(&run, "access-control-allow-origin"), Some(origin));
            assert_eq!(header(&run, "access-control-allow-methods"), Some("GET, OPTIONS"));
            assert_eq!(
                header(&run, "access-control-allow-headers"),
                Some("x-header-1, x-header-2")
            );
            assert_eq!(
                header(&run, "access-control-expose-headers"),
                Some("x-header-3, x-header-4")
            );
            assert_eq!(header(&run, "access-control-max-age"), Some("3600"));
            assert_eq!(header(&run, "access-control-allow-credentials"), Some("true"));
        }
    }

    #[tokio::test]
    async fn preflight_from_other_origin_is_answered_without_cors_headers() {
        let run = exchange(cors_1(), Method::OPTIONS, &preflight("https://foobar.com", "GET", None)).await;
        assert_eq!(run.forwarded, 0);
        assert_eq!(run.response.status(), StatusCode::OK);
        assert_eq!(header(&run, "access-control-allow-origin"), None);
        // "https://bar.com" is not "*.bar.com".
        let run = exchange(cors_1(), Method::OPTIONS, &preflight("https://bar.com", "GET", None)).await;
        assert_eq!(header(&run, "access-control-allow-origin"), None);
    }

    #[tokio::test]
    async fn actual_requests() {
        for origin in ["https://www.foo.com", "https://www.bar.com"] {
            let run = exchange(
                cors_1(),
                Method::GET,
                &[("origin", origin), ("access-control-request-method", "GET")],
            )
            .await;
            assert_eq!(run.forwarded, 1);
            assert_eq!(header(&run, "access-control-allow-origin"), Some(origin));
            assert_eq!(header(&run, "access-control-allow-credentials"), Some("true"));
            assert_eq!(
                header(&run, "access-control-expose-headers"),
                Some("x-header-3, x-header-4")
            );
            assert_eq!(header(&run, "x-backend"), Some("1"));
        }
        let run = exchange(cors_1(), Method::GET, &[("origin", "https://foobar.com")]).await;
        assert_eq!(run.forwarded, 1);
        assert_eq!(header(&run, "access-control-allow-origin"), None);
        // No Origin: not a CORS request.
        let run = exchange(cors_1(), Method::OPTIONS, &[("access-control-request-method", "GET")]).await;
        assert_eq!(run.forwarded, 1);
    }

    #[tokio::test]
    async fn wildcard_methods_echo_the_requested_method() {
        let run = exchange(
            cors_2(),
            Method::OPTIONS,
            &preflight("https://www.foo.com", "POST", None),
        )
        .await;
        assert_eq!(header(&run, "access-control-allow-origin"), Some("https://www.foo.com"));
        assert_eq!(header(&run, "access-control-allow-methods"), Some("POST"));
        assert_eq!(header(&run, "access-control-allow-credentials"), None);
    }

    #[tokio::test]
    async fn wildcard_origin_without_credentials_answers_star() {
        for origin in ["https://foobar.com", "https://foobar.com:12345"] {
            let run = exchange(wildcard_origin(), Method::OPTIONS, &preflight(origin, "PUT", None)).await;
            assert_eq!(header(&run, "access-control-allow-origin"), Some("*"));
            assert_eq!(header(&run, "access-control-allow-methods"), Some("PUT"));
            assert_eq!(header(&run, "access-control-allow-credentials"), None);
            let run = exchange(wildcard_origin(), Method::PUT, &[("origin", origin)]).await;
            assert_eq!(run.forwarded, 1);
            assert_eq!(header(&run, "access-control-allow-origin"), Some("*"));
            assert_eq!(header(&run, "access-control-allow-credentials"), None);
        }
    }

    #[tokio::test]
    async fn wildcards_with_credentials_echo_the_request() {
        let h = preflight("https://other.foo.com", "PUT", Some("x-header-1, x-header-2"));
        let run = exchange(wildcard_all(true), Method::OPTIONS, &h).await;
        assert_eq!(
            header(&run, "access-control-allow-origin"),
            Some("https://other.foo.com")
        );
        assert_eq!(header(&run, "access-control-allow-methods"), Some("PUT"));
        assert_eq!(
            header(&run, "access-control-allow-headers"),
            Some("x-header-1, x-header-2")
        );
        assert_eq!(header(&run, "access-control-allow-credentials"), Some("true"));
        assert_eq!(header(&run, "vary"), Some("origin"));

        let run = exchange(wildcard_all(false), Method::OPTIONS, &h).await;
        assert_eq!(header(&run, "access-control-allow-origin"), Some("*"));
        assert_eq!(
            header(&run, "access-control-allow-headers"),
            Some("x-header-1, x-header-2")
        );
        assert_eq!(header(&run, "access-control-allow-credentials"), None);

        let run = exchange(wildcard_all(true), Method::GET, &[("origin", "https://other.foo.com")]).await;
        assert_eq!(
            header(&run, "access-control-allow-origin"),
            Some("https://other.foo.com")
        );
        assert_eq!(header(&run, "access-control-allow-credentials"), Some("true"));
        let run = exchange(wildcard_all(false), Method::GET, &[("origin", "https://other.foo.com")]).await;
        assert_eq!(header(&run, "access-control-allow-credentials"), None);
    }

    #[tokio::test]
    async fn wildcard_expose_with_credentials_lists_response_headers() {
        let policy = CorsPolicy {
            allow_origins: strings(&["https://a.com"]),
            expose_headers: strings(&["*"]),
            allow_credentials: true,
            ..Default::default()
        };
        let run = exchange(policy, Method::GET, &[("origin", "https://a.com")]).await;
        assert_eq!(header(&run, "access-control-expose-headers"), Some("x-backend"));
    }

    #[test]
    fn origin_patterns() {
        assert!(origin_matches("https://www.foo.com", "https://www.foo.com"));
        assert!(origin_matches("https://www.foo.com", "HTTPS://WWW.FOO.COM"));
        assert!(origin_matches("https://www.foo.com", "https://www.foo.com:443"));
        assert!(!origin_matches("https://www.foo.com", "http://www.foo.com"));
        assert!(!origin_matches("https://www.foo.com", "https://www.foo.com:8443"));
        assert!(origin_matches("https://*.bar.com", "https://a.b.bar.com"));
        assert!(!origin_matches("https://*.bar.com", "http://a.bar.com"));
        assert!(!origin_matches("https://*.bar.com", "https://bar.com"));
        assert!(!origin_matches("https://*.bar.com", "https://abar.com"));
        assert!(origin_matches("http://*.bar.com:8080", "http://x.bar.com:8080"));
        assert!(!origin_matches("http://*.bar.com:8080", "http://x.bar.com"));
        assert!(origin_matches("*", "null"));
        assert!(!origin_matches("https://a.com", "null"));
    }
}
