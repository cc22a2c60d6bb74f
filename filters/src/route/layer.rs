//! The route layer: picks the rule for a request from the service's `Arc<RouteTable>` (put in the request
//! extensions by the waypoint) and records it as [`Matched`]; no table or no match answers 404 `NR`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use super::table::{Matched, RequestView, RouteTable};
use crate::authority::{request_authority, split_host_port};
use crate::reply::local_reply;
use crate::service::{HttpService, call_ready};
use crate::{Body, ResponseFuture};

#[derive(Debug, Clone, Copy, Default)]
pub struct RouteLayer;

impl RouteLayer {
    pub fn new() -> RouteLayer {
        RouteLayer
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;

    fn layer(&self, inner: S) -> RouteService<S> {
        RouteService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RouteService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for RouteService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> ResponseFuture {
        match find(&req) {
            Some(matched) => {
                req.extensions_mut().insert(matched);
                call_ready(&mut self.inner, req)
            }
            None => Box::pin(std::future::ready(Ok(local_reply(
                StatusCode::NOT_FOUND,
                Some("NR"),
                "route not found",
            )))),
        }
    }
}

fn find<B>(req: &Request<B>) -> Option<Matched> {
    let table = req.extensions().get::<Arc<RouteTable>>()?;
    let host = request_host(req);
    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        host: host.as_deref(),
        headers: req.headers(),
    };
    table.find(&view)
}

/// Host without port or trailing dot, lower-cased (allocating only when the client sent upper-case letters).
fn request_host<B>(req: &Request<B>) -> Option<Cow<'_, str>> {
    let (host, _) = split_host_port(request_authority(req)?);
    let host = host.strip_suffix('.').unwrap_or(host);
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ResponseFlag;
    use crate::reply::empty_body;
    use crate::route::model::{PathMatch, Route, RouteKind, RouteMatch, Rule};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn table() -> Arc<RouteTable> {
        let rule = Rule {
            matches: vec![RouteMatch {
                path: Some(PathMatch::Prefix("/app".into())),
                ..Default::default()
            }],
            ..Default::default()
        };
        let route = Route {
            kind: RouteKind::Http,
            namespace: "ns".into(),
            name: "app".into(),
            creation_timestamp: None,
            source_order: 0,
            hostnames: vec!["app.example.com".into()],
            rules: vec![Arc::new(rule)],
        };
        Arc::new(RouteTable::new(vec![Arc::new(route)]))
    }

    fn echo_route_name() -> impl HttpService {
        tower::service_fn(|req: Request<Body>| async move {
            let name = req
                .extensions()
                .get::<Matched>()
                .map(|m| m.route.name.clone())
                .unwrap_or_default();
            Ok::<_, Infallible>(Response::new(crate::reply::full_body(name)))
        })
    }

    async fn body_text(res: Response<Body>) -> String {
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn inserts_matched_using_host_header_or_authority() {
        let svc = RouteLayer.layer(echo_route_name());
        let mut req = Request::builder()
            .uri("/app/x")
            .header("host", "App.Example.com:8080")
            .body(empty_body())
            .unwrap();
        req.extensions_mut().insert(table());
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(body_text(res).await, "app");

        let mut req = Request::builder()
            .uri("http://app.example.com/app")
            .body(empty_body())
            .unwrap();
        req.extensions_mut().insert(table());
        assert_eq!(body_text(svc.oneshot(req).await.unwrap()).await, "app");
    }

    #[tokio::test]
    async fn no_match_or_no_table_is_404_nr() {
        let svc = RouteLayer.layer(echo_route_name());
        let mut req = Request::builder()
            .uri("/other")
            .header("host", "app.example.com")
            .body(empty_body())
            .unwrap();
        req.extensions_mut().insert(table());
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("NR")));
        assert_eq!(body_text(res).await, "route not found");

        let req = Request::builder()
            .uri("/app")
            .header("host", "app.example.com")
            .body(empty_body())
            .unwrap();
        assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::NOT_FOUND);
    }
}
