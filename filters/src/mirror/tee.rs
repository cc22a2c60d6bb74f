//! Copying a request body to mirrors while it streams to the primary upstream.
//!
//! The primary body is wrapped in a [`TeeBody`] that offers every frame to each mirror through a bounded
//! channel with `try_send`: the primary never waits. A mirror whose channel is full (it fell behind) or closed
//! is dropped from the tee on the spot; its [`TapBody`] then ends with an error instead of a clean end, so the
//! mirrored request is aborted rather than sent truncated. The tee marks a complete body with an explicit
//! `End`, so "the sender went away" always means "incomplete".

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::{Body, BoxError};

/// Frames a mirror may buffer before it counts as fallen behind.
pub const TAP_CAPACITY: usize = 32;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("mirror dropped: it fell behind the request body, or the request body did not complete")]
    Incomplete,
}

#[derive(Clone)]
enum Chunk {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

pub struct TeeBody {
    inner: Body,
    taps: Vec<mpsc::Sender<Chunk>>,
}

pub struct TapBody {
    rx: mpsc::Receiver<Chunk>,
    done: bool,
}

/// Wraps `inner` and returns one body per mirror that replays what the primary reads.
pub fn tee(inner: Body, mirrors: usize) -> (TeeBody, Vec<TapBody>) {
    let (taps, bodies) = (0..mirrors)
        .map(|_| {
            let (tx, rx) = mpsc::channel(TAP_CAPACITY);
            (tx, TapBody { rx, done: false })
        })
        .unzip();
    (TeeBody { inner, taps }, bodies)
}

impl TeeBody {
    fn offer(&mut self, chunk: &Chunk) {
        self.taps.retain(|tx| tx.try_send(chunk.clone()).is_ok());
    }

    fn finish(&mut self) {
        self.offer(&Chunk::End);
        self.taps.clear();
    }
}

impl HttpBody for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.offer(&Chunk::Data(data.clone()));
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.offer(&Chunk::Trailers(trailers.clone()));
                }
                // The primary may stop polling once the body reports its end; tell the mirrors now.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Some(Err(_)) => this.taps.clear(),
            None => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl HttpBody for TapBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let chunk = ready!(self.rx.poll_recv(cx));
        Poll::Ready(match chunk {
            Some(Chunk::Data(data)) => Some(Ok(Frame::data(data))),
            Some(Chunk::Trailers(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Some(Chunk::End) => {
                self.done = true;
                None
            }
            None => {
                self.done = true;
                Some(Err(Box::new(TapError::Incomplete)))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::chunked;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn mirror_sees_the_same_bytes() {
        let (tee, mut taps) = tee(chunked(&["a", "bc", "def"]), 1);
        let primary = tee.collect().await.unwrap().to_bytes();
        let mirrored = taps.pop().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(primary, "abcdef");
        assert_eq!(mirrored, "abcdef");
    }

    #[tokio::test]
    async fn a_mirror_that_falls_behind_is_dropped_and_errors() {
        let chunks = vec!["x"; TAP_CAPACITY * 2];
        let (tee, mut taps) = tee(chunked(&chunks), 1);
        // The primary reads everything without the mirror reading anything.
        assert_eq!(tee.collect().await.unwrap().to_bytes().len(), TAP_CAPACITY * 2);
        let mirrored = taps.pop().unwrap().collect().await;
        assert!(mirrored.is_err());
    }
}
