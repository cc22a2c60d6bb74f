//! The rewrite layer (Gateway API `URLRewrite`, Istio `rewrite`): changes the host and/or path the upstream
//! sees; the query is kept. A rewrite on the rule wins over one on the chosen backendRef.
//!
//! The hostname replaces the whole `Host` (and the URI authority when the request carries one, as HTTP/2
//! does): Envoy's `host_rewrite_literal`, so any port goes too. Paths follow `path_modifier`.

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use thiserror::Error;
use tower::{Layer, Service};

use crate::context::ActiveFilters;
use crate::path_modifier::{modified_path, with_query};
use crate::reply::local_reply;
use crate::route::{Filter, Matched, Rewrite};
use crate::service::{HttpService, call_ready};
use crate::{Body, ResponseFuture};

#[derive(Debug, Error)]
pub enum RewriteError {
    #[error("rewritten hostname {0:?} is not a valid authority")]
    InvalidHostname(String),
    #[error("rewritten path {0:?} is not a valid request target")]
    InvalidPath(String),
    #[error("rewritten URI is invalid: {0}")]
    InvalidUri(#[from] http::uri::InvalidUriParts),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RewriteLayer;

impl RewriteLayer {
    pub fn new() -> RewriteLayer {
        RewriteLayer
    }
}

impl<S> Layer<S> for RewriteLayer {
    type Service = RewriteService<S>;

    fn layer(&self, inner: S) -> RewriteService<S> {
        RewriteService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RewriteService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for RewriteService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> ResponseFuture {
        let rewrite = ActiveFilters::of(&req).and_then(|filters| {
            filters.iter().find_map(|f| match f {
                Filter::Rewrite(r) => Some(r.clone()),
                _ => None,
            })
        });
        if let Some(rewrite) = rewrite
            && let Err(err) = apply(&rewrite, &mut req)
        {
            tracing::warn!(%err, "cannot apply URL rewrite");
            let reply = local_reply(StatusCode::INTERNAL_SERVER_ERROR, None, "invalid rewrite");
            return Box::pin(std::future::ready(Ok(reply)));
        }
        call_ready(&mut self.inner, req)
    }
}

pub fn apply<B>(rewrite: &Rewrite, req: &mut Request<B>) -> Result<(), RewriteError> {
    let mut parts = req.uri().clone().into_parts();
    let mut changed = false;
    if let Some(hostname) = &rewrite.hostname {
        let invalid = || RewriteError::InvalidHostname(hostname.clone());
        let authority = Authority::try_from(hostname.as_str()).map_err(|_| invalid())?;
        let value = HeaderValue::from_str(hostname).map_err(|_| invalid())?;
        if parts.authority.is_some() {
            parts.authority = Some(authority);
            changed = true;
        }
        if parts.authority.is_none() || req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, value);
        }
    }
    if let (Some(modifier), Some(matched)) = (&rewrite.path, req.extensions().get::<Matched>()) {
        let path = modified_path(modifier, req.uri().path(), matched);
        let target = with_query(&path, req.uri().query());
        parts.path_and_query =
            Some(PathAndQuery::try_from(target.as_str()).map_err(|_| RewriteError::InvalidPath(target.clone()))?);
        changed = true;
    }
    if changed {
        *req.uri_mut() = Uri::from_parts(parts)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::empty_body;
    use crate::route::PathModifier;
    use tower::ServiceExt;

    fn matched(rewrite: Rewrite, prefix: &str) -> Matched {
        crate::test_support::matched(vec![Filter::Rewrite(rewrite)], vec![], Some(prefix))
    }

    /// Answers with "<host header> <uri>".
    fn echo() -> impl HttpService {
        tower::service_fn(|req: Request<Body>| async move {
            let host = req
                .headers()
                .get(header::HOST)
                .map(|h| h.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let text = format!("{host} {}", req.uri());
            Ok::<_, Infallible>(Response::new(crate::reply::full_body(text)))
        })
    }

    async fn send(rewrite: Rewrite, prefix: &str, uri: &str, host: Option<&str>) -> String {
        use http_body_util::BodyExt;
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        let mut req = builder.body(empty_body()).unwrap();
        req.extensions_mut().insert(matched(rewrite, prefix));
        let res = RewriteLayer.layer(echo()).oneshot(req).await.unwrap();
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    fn path(modifier: PathModifier) -> Rewrite {
        Rewrite {
            hostname: None,
            path: Some(modifier),
        }
    }

    #[tokio::test]
    async fn conformance_paths() {
        let prefix = |p: &str| path(PathModifier::ReplacePrefixMatch(p.into()));
        let full = |p: &str| path(PathModifier::ReplaceFullPath(p.into()));
        let gw = Some("gw");
        assert_eq!(
            send(prefix("/one"), "/prefix/one", "/prefix/one/two", gw).await,
            "gw /one/two"
        );
        assert_eq!(
            send(prefix("/"), "/strip-prefix", "/strip-prefix/three", gw).await,
            "gw /three"
        );
        assert_eq!(send(prefix("/"), "/strip-prefix", "/strip-prefix", gw).await, "gw /");
        assert_eq!(send(full("/one"), "/full/one", "/full/one/two", gw).await, "gw /one");
        assert_eq!(
            send(
                prefix("/prefix"),
                "/prefix/rewrite-path-and-modify-headers",
                "/prefix/rewrite-path-and-modify-headers/one",
                gw
            )
            .await,
            "gw /prefix/one"
        );
        assert_eq!(
            send(full("/one"), "/full", "/full/x?a=1&b=2", gw).await,
            "gw /one?a=1&b=2"
        );
    }

    #[tokio::test]
    async fn hostname() {
        let host = Rewrite {
            hostname: Some("new.example".into()),
            path: None,
        };
        assert_eq!(
            send(host.clone(), "/", "/a?q", Some("old.example:8080")).await,
            "new.example /a?q"
        );
        assert_eq!(
            send(host.clone(), "/", "http://old.example:8080/a", None).await,
            " http://new.example/a"
        );
        let invalid = Rewrite {
            hostname: Some("bad host".into()),
            path: None,
        };
        assert_eq!(send(invalid, "/", "/a", Some("h")).await, "invalid rewrite");
    }
}
