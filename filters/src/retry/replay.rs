//! Making a request body replayable for retries: buffer it whole up to a limit, or give back a body that still
//! streams everything (the part read so far first) when it is larger.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::{Body, BoxError};

/// Bodies up to this size are buffered so the request can be retried (Envoy's default per-request buffer).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A complete request body kept for replay.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

pub enum Buffered {
    Replayable(Replay),
    /// Too large (or of unknown size past the limit): send it once; nothing was lost.
    Once(Body),
    /// The client's body failed while it was being read.
    Failed(BoxError),
}

pub async fn buffer(mut body: Body, limit: usize) -> Buffered {
    if body.is_end_stream() {
        return Buffered::Replayable(Replay::default());
    }
    if body.size_hint().lower() > limit as u64 {
        return Buffered::Once(body);
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0;
    loop {
        match body.frame().await {
            None => {
                return Buffered::Replayable(Replay {
                    data: concat(chunks, size),
                    trailers: None,
                });
            }
            Some(Err(err)) => return Buffered::Failed(err),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    size += data.len();
                    chunks.push(data);
                    if size > limit {
                        return Buffered::Once(
                            Prefixed {
                                read: chunks.into(),
                                rest: body,
                            }
                            .boxed(),
                        );
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Buffered::Replayable(Replay {
                            data: concat(chunks, size),
                            trailers: Some(trailers),
                        });
                    }
                }
            },
        }
    }
}

fn concat(chunks: Vec<Bytes>, size: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.into_iter().next().unwrap_or_default();
    }
    let mut all = BytesMut::with_capacity(size);
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    all.freeze()
}

impl Replay {
    pub fn body(&self) -> Body {
        ReplayBody {
            data: Some(self.data.clone()).filter(|d| !d.is_empty()),
            trailers: self.trailers.clone(),
        }
        .boxed()
    }
}

struct ReplayBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// The chunks read while trying to buffer, then the rest of the original body.
struct Prefixed {
    read: VecDeque<Bytes>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.read.iter().map(|c| c.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + read);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + read);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{empty_body, full_body};
    use crate::test_support::{body_bytes, chunked};

    #[tokio::test]
    async fn small_bodies_replay() {
        let Buffered::Replayable(replay) = buffer(chunked(&["ab", "cd"]), 8).await else {
            panic!("not buffered")
        };
        assert_eq!(body_bytes(replay.body()).await, "abcd");
        assert_eq!(body_bytes(replay.body()).await, "abcd");
        assert!(matches!(buffer(empty_body(), 8).await, Buffered::Replayable(_)));
    }

    #[tokio::test]
    async fn large_bodies_go_once_and_whole() {
        let Buffered::Once(body) = buffer(chunked(&["abcd", "efgh", "ij"]), 6).await else {
            panic!("buffered")
        };
        assert_eq!(body_bytes(body).await, "abcdefghij");
        // A known length over the limit is not read at all.
        let Buffered::Once(body) = buffer(full_body("0123456789"), 6).await else {
            panic!("buffered")
        };
        assert_eq!(body_bytes(body).await, "0123456789");
    }
}
