//! The backend layer: picks one of the rule's `backendRefs` by weight and records it as [`ChosenBackend`].
//!
//! - A rule with `direct_response` is answered here.
//! - A rule with a rule-level redirect needs no backend (Gateway API redirect rules usually have none); it
//!   passes on with `ChosenBackend { backend: None, .. }` for the redirect layer to answer.
//! - Weight 0 is never chosen. No backends, all weights 0, or a chosen ref that did not resolve answer 500
//!   (Gateway API: requests for an invalid backendRef get a 500), flagged `NC` (Envoy: no cluster). For a
//!   VirtualService route the answer is 503 `NC` instead: Istio leaves it to Envoy, whose router answers a
//!   missing cluster with `cluster_not_found_response_code`, 503 by default.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::context::ChosenBackend;
use crate::reply::{empty_body, full_body, local_reply};
use crate::route::{DirectResponse, Filter, Matched, RouteKind, WeightedBackend};
use crate::service::{HttpService, call_ready};
use crate::{Body, ResponseFuture};

#[derive(Debug, Clone, Copy, Default)]
pub struct BackendLayer;

impl BackendLayer {
    pub fn new() -> BackendLayer {
        BackendLayer
    }
}

impl<S> Layer<S> for BackendLayer {
    type Service = BackendService<S>;

    fn layer(&self, inner: S) -> BackendService<S> {
        BackendService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct BackendService<S> {
    inner: S,
}

enum Decision {
    Forward(ChosenBackend),
    Direct(DirectResponse),
    Fail(&'static str),
}

impl<S: HttpService> Service<Request<Body>> for BackendService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> ResponseFuture {
        let (decision, kind) = match req.extensions().get::<Matched>() {
            None => (Decision::Fail("no route selected"), None),
            Some(m) => (decide(m), Some(m.route.kind)),
        };
        let response = match decision {
            Decision::Forward(chosen) => {
                req.extensions_mut().insert(chosen);
                return call_ready(&mut self.inner, req);
            }
            Decision::Direct(direct) => {
                let mut reply = direct_reply(&direct);
                // Envoy's router applies the route's response header edits to direct responses as well.
                if let Some(m) = req.extensions().get::<Matched>() {
                    for f in &m.rule.filters {
                        if let Filter::ResponseHeaders(modifier) = f {
                            crate::headers::apply(modifier, reply.headers_mut());
                        }
                    }
                }
                reply
            }
            Decision::Fail(reason) => {
                let status = match kind {
                    Some(RouteKind::VirtualService) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                local_reply(status, Some("NC"), reason)
            }
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

fn decide(m: &Matched) -> Decision {
    if let Some(direct) = &m.rule.direct_response {
        return Decision::Direct(direct.clone());
    }
    if m.rule.filters.iter().any(|f| matches!(f, Filter::Redirect(_))) {
        return Decision::Forward(ChosenBackend {
            backend: None,
            index: None,
        });
    }
    match pick(&m.rule.backends, fastrand::u64(..)) {
        None => Decision::Fail("no backend for this route"),
        Some(index) => match m.rule.backends.get(index).and_then(|b| b.backend) {
            None => Decision::Fail("backend not found"),
            Some(backend) => Decision::Forward(ChosenBackend {
                backend: Some(backend),
                index: Some(index),
            }),
        },
    }
}

/// Index of the backend `random` lands on, each backend owning a share of the range equal to its weight.
fn pick(backends: &[WeightedBackend], random: u64) -> Option<usize> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = random % total;
    for (i, b) in backends.iter().enumerate() {
        let weight = u64::from(b.weight);
        if point < weight {
            return Some(i);
        }
        point -= weight;
    }
    None
}

fn direct_reply(direct: &DirectResponse) -> Response<Body> {
    let body = direct
        .body
        .clone()
        .filter(|b: &Bytes| !b.is_empty())
        .map_or_else(empty_body, full_body);
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(direct.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ResponseFlag;
    use crate::route::{BackendId, Redirect, Route, RouteKind, Rule};
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tower::ServiceExt;

    fn wb(id: Option<usize>, weight: u32) -> WeightedBackend {
        WeightedBackend {
            backend: id.map(BackendId),
            weight,
            filters: vec![],
        }
    }

    fn matched_kind(kind: RouteKind, rule: Rule) -> Matched {
        Matched {
            route: Arc::new(Route {
                kind,
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
        }
    }

    fn chosen_echo() -> impl HttpService {
        tower::service_fn(|req: Request<Body>| async move {
            let chosen = req.extensions().get::<ChosenBackend>().copied();
            let text = format!("{:?}", chosen.map(|c| (c.backend.map(|b| b.0), c.index)));
            Ok::<_, Infallible>(Response::new(full_body(text)))
        })
    }

    async fn call(rule: Rule) -> Response<Body> {
        call_kind(RouteKind::Http, rule).await
    }

    async fn call_kind(kind: RouteKind, rule: Rule) -> Response<Body> {
        let mut req = Request::new(empty_body());
        req.extensions_mut().insert(matched_kind(kind, rule));
        BackendLayer.layer(chosen_echo()).oneshot(req).await.unwrap()
    }

    async fn text(res: Response<Body>) -> String {
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[test]
    fn pick_respects_weights() {
        let backends = [wb(Some(0), 7), wb(Some(1), 0), wb(Some(2), 3)];
        let picks: Vec<_> = (0..10).map(|r| pick(&backends, r).unwrap()).collect();
        assert_eq!(picks, [0, 0, 0, 0, 0, 0, 0, 2, 2, 2]);
        assert_eq!(pick(&[wb(Some(0), 0)], 5), None);
        assert_eq!(pick(&[], 5), None);
    }

    #[test]
    fn weighted_distribution_is_roughly_right() {
        let backends = [wb(Some(0), 70), wb(Some(1), 30), wb(Some(2), 0)];
        let mut counts = [0usize; 3];
        for _ in 0..10_000 {
            counts[pick(&backends, fastrand::u64(..)).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!((6_500..7_500).contains(&counts[0]), "{counts:?}");
    }

    #[tokio::test]
    async fn forwards_with_the_chosen_backend() {
        let res = call(Rule {
            backends: vec![wb(Some(4), 0), wb(Some(9), 1)],
            ..Default::default()
        })
        .await;
        assert_eq!(text(res).await, "Some((Some(9), Some(1)))");
    }

    fn failing_rules() -> [Rule; 3] {
        [
            Rule::default(),
            Rule {
                backends: vec![wb(Some(1), 0)],
                ..Default::default()
            },
            Rule {
                backends: vec![wb(None, 1)],
                ..Default::default()
            },
        ]
    }

    #[tokio::test]
    async fn failures_are_500() {
        for kind in [RouteKind::Http, RouteKind::Grpc] {
            for rule in failing_rules() {
                let res = call_kind(kind, rule).await;
                assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
                assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("NC")));
            }
        }
        let mut req = Request::new(empty_body());
        req.extensions_mut().insert(());
        let res = BackendLayer.layer(chosen_echo()).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn virtual_service_failures_are_503() {
        for rule in failing_rules() {
            let res = call_kind(RouteKind::VirtualService, rule).await;
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(res.extensions().get::<ResponseFlag>(), Some(&ResponseFlag("NC")));
        }
        // A resolved destination is still forwarded.
        let res = call_kind(
            RouteKind::VirtualService,
            Rule {
                backends: vec![wb(None, 0), wb(Some(3), 1)],
                ..Default::default()
            },
        )
        .await;
        assert_eq!(text(res).await, "Some((Some(3), Some(1)))");
    }

    #[tokio::test]
    async fn redirect_rule_needs_no_backend() {
        let rule = Rule {
            filters: vec![Filter::Redirect(Redirect::default())],
            ..Default::default()
        };
        assert_eq!(text(call(rule).await).await, "Some((None, None))");
    }

    #[tokio::test]
    async fn direct_response() {
        let direct = DirectResponse {
            status: 418,
            body: Some(Bytes::from_static(b"teapot")),
        };
        let res = call(Rule {
            direct_response: Some(direct),
            ..Default::default()
        })
        .await;
        assert_eq!(res.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(text(res).await, "teapot");
    }

    #[tokio::test]
    async fn direct_response_carries_the_rule_response_header_edits() {
        let modifier = crate::route::HeaderModifier {
            set: vec![(
                http::HeaderName::from_static("x-direct"),
                http::HeaderValue::from_static("yes"),
            )],
            ..Default::default()
        };
        let res = call(Rule {
            direct_response: Some(DirectResponse {
                status: 200,
                body: None,
            }),
            filters: vec![Filter::ResponseHeaders(modifier)],
            ..Default::default()
        })
        .await;
        assert_eq!(res.headers().get("x-direct").unwrap(), "yes");
    }
}
