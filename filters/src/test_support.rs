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
