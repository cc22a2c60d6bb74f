//! The header modifier layers (Gateway API `RequestHeaderModifier` / `ResponseHeaderModifier`, Istio
//! `headers.request` / `headers.response`). The rule's filters apply first, then the chosen backendRef's.
//!
//! Within one modifier, `remove` runs first, then `set` (replaces every value), then `add` (appends a new
//! header line, so the backend sees `old,new` once joined) — Envoy's order for `headers_to_remove` and
//! `headers_to_add`, which is what Istio translates these filters into.

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use tower::{Layer, Service};

use crate::context::ActiveFilters;
use crate::route::{Filter, HeaderModifier};
use crate::service::{HttpService, call_ready};
use crate::{Body, ResponseFuture};

pub fn apply(modifier: &HeaderModifier, headers: &mut HeaderMap) {
    for name in &modifier.remove {
        headers.remove(name);
    }
    for (name, value) in &modifier.set {
        headers.insert(name, value.clone());
    }
    for (name, value) in &modifier.add {
        headers.append(name, value.clone());
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHeadersLayer;

impl RequestHeadersLayer {
    pub fn new() -> RequestHeadersLayer {
        RequestHeadersLayer
    }
}

impl<S> Layer<S> for RequestHeadersLayer {
    type Service = RequestHeadersService<S>;

    fn layer(&self, inner: S) -> RequestHeadersService<S> {
        RequestHeadersService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestHeadersService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for RequestHeadersService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> ResponseFuture {
        if let Some(filters) = ActiveFilters::of(&req) {
            for filter in filters.iter() {
                if let Filter::RequestHeaders(modifier) = filter {
                    apply(modifier, req.headers_mut());
                }
            }
        }
        call_ready(&mut self.inner, req)
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseHeadersLayer;

impl ResponseHeadersLayer {
    pub fn new() -> ResponseHeadersLayer {
        ResponseHeadersLayer
    }
}

impl<S> Layer<S> for ResponseHeadersLayer {
    type Service = ResponseHeadersService<S>;

    fn layer(&self, inner: S) -> ResponseHeadersService<S> {
        ResponseHeadersService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ResponseHeadersService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for ResponseHeadersService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let filters =
            ActiveFilters::of(&req).filter(|filters| filters.iter().any(|f| matches!(f, Filter::ResponseHeaders(_))));
        let fut = call_ready(&mut self.inner, req);
        let Some(filters) = filters else {
            return fut;
        };
        Box::pin(async move {
            let mut response = fut.await?;
            for filter in filters.iter() {
                if let Filter::ResponseHeaders(modifier) = filter {
                    apply(modifier, response.headers_mut());
                }
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ChosenBackend;
    use crate::reply::empty_body;
    use crate::route::Matched;
    use http::{HeaderName, HeaderValue};
    use tower::ServiceExt;

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    fn hn(s: &'static str) -> HeaderName {
        HeaderName::from_static(s)
    }

    fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
        let values: Vec<_> = headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    /// The rewrite-path conformance modifier.
    fn conformance_modifier() -> HeaderModifier {
        HeaderModifier {
            set: vec![(hn("x-header-set"), hv("set-overwrites-values"))],
            add: vec![
                (hn("x-header-add"), hv("header-val-1")),
                (hn("x-header-add-append"), hv("header-val-2")),
            ],
            remove: vec![hn("x-header-remove")],
        }
    }

    #[test]
    fn set_add_remove() {
        let mut headers = HeaderMap::new();
        headers.insert("x-header-remove", hv("remove-val"));
        headers.insert("x-header-add-append", hv("append-val-1"));
        headers.append("x-header-set", hv("set-val"));
        headers.append("x-header-set", hv("set-val-2"));
        apply(&conformance_modifier(), &mut headers);
        assert_eq!(joined(&headers, "x-header-add").as_deref(), Some("header-val-1"));
        assert_eq!(
            joined(&headers, "x-header-add-append").as_deref(),
            Some("append-val-1,header-val-2")
        );
        assert_eq!(
            joined(&headers, "x-header-set").as_deref(),
            Some("set-overwrites-values")
        );
        assert_eq!(joined(&headers, "x-header-remove"), None);
    }

    fn matched(rule_filters: Vec<Filter>, backend_filters: Vec<Filter>) -> Matched {
        crate::test_support::matched(rule_filters, backend_filters, None)
    }

    /// Echoes request headers as response headers, so one response shows both directions.
    fn echo() -> impl HttpService {
        tower::service_fn(|req: Request<Body>| async move {
            let mut res = Response::new(empty_body());
            *res.headers_mut() = req.headers().clone();
            res.headers_mut().insert("x-from-backend", hv("b"));
            Ok::<_, Infallible>(res)
        })
    }

    #[tokio::test]
    async fn request_modifiers_rule_then_backend() {
        let rule = Filter::RequestHeaders(HeaderModifier {
            set: vec![(hn("x-order"), hv("rule"))],
            ..Default::default()
        });
        let backend = Filter::RequestHeaders(HeaderModifier {
            add: vec![(hn("x-order"), hv("backend"))],
            ..Default::default()
        });
        let mut req = Request::new(empty_body());
        req.extensions_mut().insert(matched(vec![rule], vec![backend]));
        req.extensions_mut().insert(ChosenBackend {
            backend: None,
            index: Some(0),
        });
        let res = RequestHeadersLayer.layer(echo()).oneshot(req).await.unwrap();
        assert_eq!(joined(res.headers(), "x-order").as_deref(), Some("rule,backend"));
    }

    #[tokio::test]
    async fn backend_filters_need_the_chosen_backend() {
        let backend = Filter::RequestHeaders(HeaderModifier {
            add: vec![(hn("x-order"), hv("backend"))],
            ..Default::default()
        });
        let mut req = Request::new(empty_body());
        req.extensions_mut().insert(matched(vec![], vec![backend]));
        let res = RequestHeadersLayer.layer(echo()).oneshot(req).await.unwrap();
        assert_eq!(joined(res.headers(), "x-order"), None);
    }

    #[tokio::test]
    async fn response_modifiers() {
        let modifier = HeaderModifier {
            set: vec![(hn("x-from-backend"), hv("overwritten"))],
            add: vec![(hn("x-added"), hv("1"))],
            remove: vec![hn("x-request")],
        };
        let mut req = Request::builder().header("x-request", "r").body(empty_body()).unwrap();
        req.extensions_mut()
            .insert(matched(vec![Filter::ResponseHeaders(modifier)], vec![]));
        let res = ResponseHeadersLayer.layer(echo()).oneshot(req).await.unwrap();
        assert_eq!(joined(res.headers(), "x-from-backend").as_deref(), Some("overwritten"));
        assert_eq!(joined(res.headers(), "x-added").as_deref(), Some("1"));
        assert_eq!(joined(res.headers(), "x-request"), None);
    }
}
