//! The redirect layer (Gateway API `RequestRedirect`, Istio `redirect`): answers with a `Location` built from
//! the request, never calling the inner service. A redirect on the rule wins over one on the chosen backendRef.
//!
//! `Location` = scheme `://` host [`:` port] path [`?` query]:
//! - scheme: the filter's, else the request's (`http` when the request does not say, as inside a tunnel);
//! - host: the filter's hostname, else the request's host (without its port);
//! - port: the filter's; else, when the filter sets a scheme, that scheme's well-known port (Gateway API:
//!   "If redirect scheme is not-empty, the redirect port MUST be the well-known port associated with the
//!   redirect scheme"); else the request's port, if it had one. Port 80 with http and 443 with https are left
//!   out;
//! - path: `ReplaceFullPath`, `ReplacePrefixMatch` (see `path_modifier`), else the request path; the query is
//!   kept;
//! - status: the filter's (301, 302, 303, 307, 308), else 302.
//!
//! With no host at all (no Host header, no authority, no filter hostname), `Location` is the bare path.

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode, header};
use thiserror::Error;
use tower::{Layer, Service};

use crate::authority::{default_port, request_authority, split_host_port};
use crate::context::ActiveFilters;
use crate::path_modifier::{modified_path, with_query};
use crate::reply::{empty_body, local_reply};
use crate::route::{Filter, Matched, Redirect};
use crate::service::{HttpService, call_ready};
use crate::{Body, ResponseFuture};

#[derive(Debug, Error)]
pub enum RedirectError {
    #[error("redirect location {0:?} is not a valid header value")]
    InvalidLocation(String),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RedirectLayer;

impl RedirectLayer {
    pub fn new() -> RedirectLayer {
        RedirectLayer
    }
}

impl<S> Layer<S> for RedirectLayer {
    type Service = RedirectService<S>;

    fn layer(&self, inner: S) -> RedirectService<S> {
        RedirectService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RedirectService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for RedirectService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let redirect = ActiveFilters::of(&req).and_then(|filters| {
            filters.iter().find_map(|f| match f {
                Filter::Redirect(r) => Some(r.clone()),
                _ => None,
            })
        });
        let (Some(redirect), Some(matched)) = (redirect, req.extensions().get::<Matched>()) else {
            return call_ready(&mut self.inner, req);
        };
        let response = match redirect_response(&redirect, &req, matched) {
            Ok(response) => response,
            Err(err) => {
                tracing::warn!(%err, "cannot build redirect");
                local_reply(StatusCode::INTERNAL_SERVER_ERROR, None, "invalid redirect")
            }
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

fn redirect_response<B>(
    redirect: &Redirect,
    req: &Request<B>,
    matched: &Matched,
) -> Result<Response<Body>, RedirectError> {
    let location = location(redirect, req, matched);
    let value = HeaderValue::from_str(&location).map_err(|_| RedirectError::InvalidLocation(location.clone()))?;
    let mut response = Response::new(empty_body());
    *response.status_mut() = match redirect.status {
        301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND),
        _ => StatusCode::FOUND,
    };
    response.headers_mut().insert(header::LOCATION, value);
    Ok(response)
}

pub fn location<B>(redirect: &Redirect, req: &Request<B>, matched: &Matched) -> String {
    let request_scheme = req.uri().scheme_str().unwrap_or("http");
    let scheme = redirect.scheme.as_deref().unwrap_or(request_scheme);
    let (request_host, request_port) = request_authority(req).map_or((None, None), |a| {
        let (host, port) = split_host_port(a);
        (Some(host), port)
    });
    let host = redirect.hostname.as_deref().or(request_host);
    let port = match (redirect.port, &redirect.scheme) {
        (Some(port), _) => Some(port),
        (None, Some(_)) => None,
        (None, None) => request_port,
    }
    .filter(|p| Some(*p) != default_port(scheme));
    let path = match &redirect.path {
        Some(modifier) => modified_path(modifier, req.uri().path(), matched),
        None => req.uri().path().into(),
    };
    let path_and_query = with_query(&path, req.uri().query());
    match (host, port) {
        (None, _) => path_and_query,
        (Some(host), None) => format!("{scheme}://{host}{path_and_query}"),
        (Some(host), Some(port)) => format!("{scheme}://{host}:{port}{path_and_query}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ChosenBackend;
    use crate::route::PathModifier;
    use tower::ServiceExt;

    fn matched(filters: Vec<Filter>, backend_filters: Vec<Filter>, prefix: &str) -> Matched {
        crate::test_support::matched(filters, backend_filters, Some(prefix))
    }

    fn redirect(f: impl FnOnce(&mut Redirect)) -> Filter {
        let mut r = Redirect::default();
        f(&mut r);
        Filter::Redirect(r)
    }

    async fn send(m: Matched, uri: &str, host: &str) -> Response<Body> {
        let mut req = Request::builder()
            .uri(uri)
            .header("host", host)
            .body(empty_body())
            .unwrap();
        req.extensions_mut().insert(m);
        req.extensions_mut().insert(ChosenBackend {
            backend: None,
            index: Some(0),
        });
        let inner = tower::service_fn(|_req: Request<Body>| async { Ok::<_, Infallible>(Response::new(empty_body())) });
        RedirectLayer.layer(inner).oneshot(req).await.unwrap()
    }

    async fn loc(filter: Filter, prefix: &str, uri: &str, host: &str) -> (u16, String) {
        let res = send(matched(vec![filter], vec![], prefix), uri, host).await;
        let location = res
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (res.status().as_u16(), location)
    }

    #[tokio::test]
    async fn conformance_locations() {
        let gw = "10.0.0.1";
        let full = |p: &str| Some(PathModifier::ReplaceFullPath(p.into()));
        let prefix = |p: &str| Some(PathModifier::ReplacePrefixMatch(p.into()));
        let cases = [
            (
                redirect(|r| r.status = 303),
                "/see-other",
                "/see-other",
                (303, "http://10.0.0.1/see-other"),
            ),
            (
                redirect(|r| r.hostname = Some("example.org".into())),
                "/h",
                "/h",
                (302, "http://example.org/h"),
            ),
            (
                redirect(|r| r.path = prefix("/replacement-prefix")),
                "/original-prefix",
                "/original-prefix/lemon",
                (302, "http://10.0.0.1/replacement-prefix/lemon"),
            ),
            (
                redirect(|r| r.path = full("/full-path-replacement")),
                "/full",
                "/full/path/original",
                (302, "http://10.0.0.1/full-path-replacement"),
            ),
            (
                redirect(|r| {
                    r.path = prefix("/replacement-prefix");
                    r.status = 301;
                }),
                "/path-and-status",
                "/path-and-status",
                (301, "http://10.0.0.1/replacement-prefix"),
            ),
            (
                redirect(|r| r.port = Some(8083)),
                "/port",
                "/port",
                (302, "http://10.0.0.1:8083/port"),
            ),
            (
                redirect(|r| r.scheme = Some("https".into())),
                "/scheme",
                "/scheme",
                (302, "https://10.0.0.1/scheme"),
            ),
            (
                redirect(|r| {
                    r.scheme = Some("https".into());
                    r.hostname = Some("example.org".into());
                }),
                "/s",
                "/s?x=1",
                (302, "https://example.org/s?x=1"),
            ),
        ];
        for (filter, matched_prefix, uri, (status, want)) in cases {
            assert_eq!(
                loc(filter, matched_prefix, uri, gw).await,
                (status, want.to_owned()),
                "{uri}"
            );
        }
    }

    #[tokio::test]
    async fn ports() {
        let none = redirect(|_| {});
        // The request's port is kept when nothing changes; a default port is left out.
        assert_eq!(loc(none.clone(), "/", "/a", "svc:8080").await.1, "http://svc:8080/a");
        assert_eq!(loc(none, "/", "/a", "svc:80").await.1, "http://svc/a");
        // A new scheme brings its own default port.
        let https = redirect(|r| r.scheme = Some("https".into()));
        assert_eq!(loc(https, "/", "/a", "svc:8080").await.1, "https://svc/a");
        let https_port = redirect(|r| {
            r.scheme = Some("https".into());
            r.port = Some(443);
        });
        assert_eq!(loc(https_port, "/", "/a", "svc:8080").await.1, "https://svc/a");
        let http_443 = redirect(|r| r.port = Some(443));
        assert_eq!(loc(http_443, "/", "/a", "svc").await.1, "http://svc:443/a");
    }

    #[tokio::test]
    async fn backend_level_redirect_and_passthrough() {
        let m = matched(
            vec![],
            vec![redirect(|r| {
                r.path = Some(PathModifier::ReplacePrefixMatch("/redirected-prefix".into()))
            })],
            "/prefix",
        );
        let res = send(m, "/prefix/original", "gw").await;
        assert_eq!(res.headers()[header::LOCATION], "http://gw/redirected-prefix/original");
        let res = send(matched(vec![], vec![], "/"), "/x", "gw").await;
        assert_eq!(res.status(), StatusCode::OK);
    }
}
