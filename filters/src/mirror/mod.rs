//! The mirror layer (Gateway API `RequestMirror`, Istio `mirror` / `mirrors`): hands a copy of the request to
//! the waypoint's [`MirrorSink`] for each mirror filter that samples this request, fire-and-forget.
//!
//! The copy has the method, URI, version and headers as they are here, i.e. after the request header filters
//! and the URL rewrite ran (Gateway API mirrors see the modified headers). Its body is the request body teed
//! frame by frame (see [`tee`]); a mirror that cannot keep up is dropped, the primary request never waits.
//! Mirrors with an unresolved backend, or requests without a sink in their extensions, are skipped.

mod tee;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use tower::{Layer, Service};

pub use tee::{TAP_CAPACITY, TapBody, TapError, TeeBody, tee};

use crate::context::{ActiveFilters, MirrorSink};
use crate::reply::empty_body;
use crate::route::{BackendId, Filter, Mirror};
use crate::service::{HttpService, call_ready};
use crate::{Body, ResponseFuture};

#[derive(Debug, Clone, Copy, Default)]
pub struct MirrorLayer;

impl MirrorLayer {
    pub fn new() -> MirrorLayer {
        MirrorLayer
    }
}

impl<S> Layer<S> for MirrorLayer {
    type Service = MirrorService<S>;

    fn layer(&self, inner: S) -> MirrorService<S> {
        MirrorService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct MirrorService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for MirrorService<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let targets: Vec<BackendId> = ActiveFilters::of(&req).map_or_else(Vec::new, |filters| {
            filters
                .iter()
                .filter_map(|f| match f {
                    Filter::Mirror(m) if sampled(m) => m.backend,
                    _ => None,
                })
                .collect()
        });
        let sink = req.extensions().get::<Arc<dyn MirrorSink>>().cloned();
        let (Some(sink), false) = (sink, targets.is_empty()) else {
            return call_ready(&mut self.inner, req);
        };
        let (parts, body) = req.into_parts();
        let copy = |body: Body| {
            let mut copy = Request::new(body);
            *copy.method_mut() = parts.method.clone();
            *copy.uri_mut() = parts.uri.clone();
            *copy.version_mut() = parts.version;
            *copy.headers_mut() = parts.headers.clone();
            copy
        };
        let body = if body.is_end_stream() {
            for backend in targets {
                sink.mirror(backend, copy(empty_body()));
            }
            body
        } else {
            let (primary, taps) = tee(body, targets.len());
            for (backend, tap) in targets.into_iter().zip(taps) {
                sink.mirror(backend, copy(tap.boxed()));
            }
            primary.boxed()
        };
        call_ready(&mut self.inner, Request::from_parts(parts, body))
    }
}

/// Whether this request is mirrored: `numerator / denominator` of requests are (none for a zero denominator).
fn sampled(m: &Mirror) -> bool {
    m.denominator > 0 && (m.numerator >= m.denominator || fastrand::u32(..m.denominator) < m.numerator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ChosenBackend;
    use crate::headers::RequestHeadersLayer;
    use crate::route::{HeaderModifier, Matched};
    use crate::test_support::{body_bytes, chunked};
    use http::{HeaderName, HeaderValue};
    use std::sync::Mutex;
    use tower::ServiceExt;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(BackendId, Request<Body>)>>);

    impl MirrorSink for Recorder {
        fn mirror(&self, backend: BackendId, req: Request<Body>) {
            self.0.lock().unwrap().push((backend, req));
        }
    }

    fn mirror(backend: Option<usize>, numerator: u32, denominator: u32) -> Filter {
        Filter::Mirror(Mirror {
            backend: backend.map(BackendId),
            numerator,
            denominator,
        })
    }

    fn matched(filters: Vec<Filter>, backend_filters: Vec<Filter>) -> Matched {
        crate::test_support::matched(filters, backend_filters, None)
    }

    /// Reads the whole body, answers with it.
    fn echo_body() -> impl HttpService {
        tower::service_fn(|req: Request<Body>| async move {
            let bytes = body_bytes(req.into_body()).await;
            Ok::<_, Infallible>(Response::new(crate::reply::full_body(bytes)))
        })
    }

    fn request(m: Matched, body: Body, sink: &Arc<Recorder>) -> Request<Body> {
        let mut req = Request::builder()
            .uri("/mirror?id=1")
            .header("x-header-remove", "r")
            .body(body)
            .unwrap();
        req.extensions_mut().insert(m);
        req.extensions_mut().insert(ChosenBackend {
            backend: None,
            index: Some(0),
        });
        let sink: Arc<dyn MirrorSink> = sink.clone();
        req.extensions_mut().insert(sink);
        req
    }

    #[tokio::test]
    async fn mirrors_see_modified_headers_and_the_body() {
        let modifier = HeaderModifier {
            set: vec![(HeaderName::from_static("x-header-set"), HeaderValue::from_static("set"))],
            remove: vec![HeaderName::from_static("x-header-remove")],
            ..Default::default()
        };
        let m = matched(
            vec![Filter::RequestHeaders(modifier), mirror(Some(2), 100, 100)],
            vec![mirror(Some(3), 1, 1)],
        );
        let sink = Arc::new(Recorder::default());
        let svc = RequestHeadersLayer.layer(MirrorLayer.layer(echo_body()));
        let res = svc
            .oneshot(request(m, chunked(&["hello ", "mirror"]), &sink))
            .await
            .unwrap();
        assert_eq!(body_bytes(res.into_body()).await, "hello mirror");

        let mirrored = std::mem::take(&mut *sink.0.lock().unwrap());
        assert_eq!(mirrored.iter().map(|(b, _)| b.0).collect::<Vec<_>>(), [2, 3]);
        for (_, req) in mirrored {
            assert_eq!(req.uri(), "/mirror?id=1");
            assert_eq!(req.headers()["x-header-set"], "set");
            assert!(!req.headers().contains_key("x-header-remove"));
            assert_eq!(body_bytes(req.into_body()).await, "hello mirror");
        }
    }

    #[tokio::test]
    async fn empty_body_and_skips() {
        let m = matched(
            vec![
                mirror(Some(1), 1, 1),
                mirror(None, 1, 1),
                mirror(Some(2), 0, 100),
                mirror(Some(3), 1, 0),
            ],
            vec![],
        );
        let sink = Arc::new(Recorder::default());
        let res = MirrorLayer
            .layer(echo_body())
            .oneshot(request(m, empty_body(), &sink))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let mirrored = std::mem::take(&mut *sink.0.lock().unwrap());
        assert_eq!(mirrored.len(), 1);
        assert!(mirrored[0].1.body().is_end_stream());
    }

    #[test]
    fn sampling_rate() {
        let m = Mirror {
            backend: Some(BackendId(0)),
            numerator: 20,
            denominator: 100,
        };
        let hits = (0..10_000).filter(|_| sampled(&m)).count();
        assert!((1_700..2_300).contains(&hits), "{hits}");
    }
}
