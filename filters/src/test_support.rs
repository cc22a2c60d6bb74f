//! Bodies for tests: streamed in chunks, with no length known up front (like a chunked upload).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;

use crate::{Body, BoxError};

struct Chunked(VecDeque<Bytes>);

impl HttpBody for Chunked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

pub fn chunked(chunks: &[&str]) -> Body {
    Chunked(chunks.iter().map(|c| Bytes::copy_from_slice(c.as_bytes())).collect()).boxed()
}

pub async fn body_bytes(body: Body) -> Bytes {
    body.collect().await.map(|c| c.to_bytes()).unwrap_or_default()
}

/// What the route layer would leave for a rule with `filters` whose single backendRef carries
/// `backend_filters`; `prefix` is the matched `PathPrefix`, if any.
pub fn matched(
    filters: Vec<crate::route::Filter>,
    backend_filters: Vec<crate::route::Filter>,
    prefix: Option<&str>,
) -> crate::route::Matched {
    use std::sync::Arc;

    use crate::route::{Matched, Route, RouteKind, Rule, WeightedBackend};
    let rule = Rule {
        filters,
        backends: vec![WeightedBackend {
            backend: None,
            weight: 1,
            filters: backend_filters,
        }],
        ..Default::default()
    };
    Matched {
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
        matched_prefix: prefix.map(Arc::from),
        rule_index: 0,
        match_index: 0,
    }
}
