//! One HTTP/2 CONNECT stream as `AsyncRead + AsyncWrite`.
//!
//! End-of-stream semantics follow ztunnel: our write-half shutdown sends an empty DATA frame with END_STREAM;
//! reading END_STREAM, or a RST_STREAM with NO_ERROR or CANCEL, is EOF; any other reset is an error. Received
//! flow-control capacity is released as soon as a chunk is taken, so the window is refilled while the consumer
//! works on it (at most one chunk is held here).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one read gathers from received chunks.
const FILL: usize = 64 * 1024;
/// How long a stream we finished keeps reading for the peer's END_STREAM (see `Drop`).
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

pub struct H2Stream {
    send: SendStream<Bytes>,
    /// Always `Some` until `Drop` takes it.
    recv: Option<RecvStream>,
    pending: Bytes,
    write_closed: bool,
    /// Dropped with the stream: releases a pool slot or a drain guard.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv: Some(recv),
            pending: Bytes::new(),
            write_closed: false,
            _guard: None,
        }
    }

    pub fn with_guard(mut self, guard: Box<dyn Send + Sync>) -> Self {
        self._guard = Some(guard);
        self
    }
}

pub fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 io error"));
    }
    match e.reason() {
        Some(Reason::STREAM_CLOSED) => io::Error::new(io::ErrorKind::BrokenPipe, e),
        _ => io::Error::new(io::ErrorKind::ConnectionReset, e),
    }
}

fn is_graceful(e: &h2::Error) -> bool {
    matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL))
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // Every chunk already received goes out in this one read (up to FILL): each read becomes one body chunk
        // for the HTTP layer above, and each of those costs task wake-ups on the way out.
        let start = buf.filled().len();
        loop {
            let got = buf.filled().len() - start;
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                if buf.remaining() == 0 || got + n >= FILL {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let Some(recv) = self.recv.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            // Errors and the end wait for the next read when this one already carries data: h2 reports them again.
            match recv.poll_data(cx) {
                Poll::Pending if got == 0 => return Poll::Pending,
                Poll::Pending => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Ok(chunk))) => {
                    let _ = recv.flow_control().release_capacity(chunk.len());
                    self.pending = chunk;
                }
                Poll::Ready(_) if got > 0 => return Poll::Ready(Ok(())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) if is_graceful(&e) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    /// hyper queues body chunks beside the head instead of flattening them into its own buffer when the transport
    /// takes vectored writes; gathering here makes one copy of each byte instead of two.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(total);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(total);
                    let mut out = BytesMut::with_capacity(n);
                    for b in bufs {
                        let take = b.len().min(n - out.len());
                        out.extend_from_slice(&b[..take]);
                        if out.len() == n {
                            break;
                        }
                    }
                    self.send.send_data(out.freeze(), false).map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            // The peer may already have reset the stream; a half-close then has nothing left to tell it.
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for H2Stream {
    /// When our side is finished (END_STREAM sent) and the peer's is not, dropping the receive half would reset
    /// the stream (RST_STREAM CANCEL) while the peer's own END_STREAM is usually already on its way. h2 remembers
    /// only the last 50 streams it reset; a frame for an older one is answered with a reset h2 counts as the
    /// peer's protocol error, and after 1,024 of those over a connection's life it closes the whole connection
    /// (GOAWAY ENHANCE_YOUR_CALM) — with thousands of short tunnels a second on one long-lived HBONE connection,
    /// that happened within a minute on the rig. Like a lingering TCP close, the receive half is kept for a
    /// moment, reading and discarding, so the stream ends cleanly.
    fn drop(&mut self) {
        let Some(mut recv) = self.recv.take() else {
            return;
        };
        if !self.write_closed || recv.is_end_stream() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let drain = async {
                while let Some(Ok(chunk)) = recv.data().await {
                    let _ = recv.flow_control().release_capacity(chunk.len());
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client and a server H2Stream over one in-memory HTTP/2 connection.
    async fn pair() -> (H2Stream, H2Stream) {
        let (send, recv, server) = raw_client_pair().await;
        (H2Stream::new(send, recv), server)
    }

    /// The reset the peer sees on `send` within `wait` (virtual time), if any.
    async fn reset_seen(send: &mut SendStream<Bytes>, wait: std::time::Duration) -> Option<Reason> {
        let reset = std::future::poll_fn(|cx| send.poll_reset(cx));
        match tokio::time::timeout(wait, reset).await {
            Ok(Ok(reason)) => Some(reason),
            Ok(Err(e)) => panic!("poll_reset failed: {e}"),
            Err(_) => None,
        }
    }

    /// A CONNECT stream whose server half we hold as an H2Stream, and the client's raw h2 halves.
    async fn raw_client_pair() -> (SendStream<Bytes>, RecvStream, H2Stream) {
        let (c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Stream::new(send, req.into_body())
        });
        let (client, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let server = server.await.unwrap();
        (send, resp.await.unwrap().into_body(), server)
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_stream_waits_for_the_peers_end_instead_of_resetting() {
        let (mut send, mut recv, mut server) = raw_client_pair().await;
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        let mut got = Vec::new();
        while let Some(chunk) = recv.data().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"reply");
        // Still within the linger: no RST_STREAM, and our late data and END_STREAM are accepted.
        assert_eq!(reset_seen(&mut send, LINGER / 2).await, None);
        send.send_data(Bytes::from_static(b"late"), true).unwrap();
        assert_eq!(reset_seen(&mut send, LINGER * 2).await, None, "stream closed cleanly");
    }

    #[tokio::test(start_paused = true)]
    async fn one_read_gathers_every_chunk_already_received() {
        let (mut send, _recv, mut server) = raw_client_pair().await;
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 16 * 1024]).collect();
        for c in &chunks {
            send.send_data(Bytes::from(c.clone()), false).unwrap();
        }
        send.send_data(Bytes::new(), true).unwrap();
        // With the clock paused this returns once every other task is idle: all three chunks are in h2's buffer.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        let mut space = vec![0u8; 256 * 1024];
        let n = server.read(&mut space).await.unwrap();
        assert_eq!(n, 3 * 16 * 1024, "one read, three chunks");
        assert!(space[..n] == chunks.concat()[..], "in order");
        assert_eq!(server.read(&mut space).await.unwrap(), 0, "then the end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_ends_is_reset_after_the_linger() {
        let (mut send, _recv, mut server) = raw_client_pair().await;
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(reset_seen(&mut send, LINGER / 2).await, None);
        // Our side had ended, so the reset only tells the peer to stop sending (RFC 9113 §8.1).
        assert_eq!(reset_seen(&mut send, LINGER).await, Some(Reason::NO_ERROR));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_dropped_before_its_end_is_reset_at_once() {
        let (mut send, _recv, server) = raw_client_pair().await;
        drop(server);
        assert_eq!(reset_seen(&mut send, LINGER / 10).await, Some(Reason::CANCEL));
    }

    #[tokio::test]
    async fn vectored_writes_arrive_in_order_and_shutdown_is_eof() {
        let (mut client, mut server) = pair().await;
        assert!(client.is_write_vectored());
        let parts: [&[u8]; 3] = [b"head ", b"", b"and body"];
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut written = 0;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        while written < total {
            let n = client.write_vectored(&slices).await.unwrap();
            written += n;
            io::IoSlice::advance_slices(&mut slices.as_mut_slice(), n);
        }
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"head and body");
    }

    #[tokio::test]
    async fn large_writes_wait_for_window_and_lose_nothing() {
        let (mut client, mut server) = pair().await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let writer = tokio::spawn(async move {
            let half = data.len() / 2;
            let bufs = [io::IoSlice::new(&data[..half]), io::IoSlice::new(&data[half..])];
            let mut slices: &mut [io::IoSlice<'_>] = &mut bufs.clone();
            let mut left = data.len();
            while left > 0 {
                let n = client.write_vectored(slices).await.unwrap();
                left -= n;
                io::IoSlice::advance_slices(&mut slices, n);
            }
            client.shutdown().await.unwrap();
            // Dropping a stream the peer has not finished resets it and discards what h2 still queues, so a
            // splice holds both halves until the peer's END_STREAM, as here.
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.shutdown().await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "bytes differ");
    }
}
