//! Write coalescing for HBONE connections: fewer TLS records and fewer `writev`s.
//!
//! Without it every frame h2 writes becomes its own TLS record and its own system call, and on the rig the
//! HBONE connections' write path (loopback TCP included) was over a third of the waypoint's CPU at about one
//! `writev` per request. Here small writes are gathered in one buffer, and a flush first lets the worker run
//! every other task that is already runnable (those are the streams about to queue their own frames), then
//! writes what all of them produced at once. The delay is one pass over the worker's run queue, never a timer.
//! A write of a full TLS record or more (bulk DATA frames) goes straight through after what is buffered: it
//! would gain nothing from company and only cost a copy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes that trigger a write without waiting for a flush: four full TLS records.
pub const CAPACITY: usize = 64 * 1024;
/// Writes this large are not buffered: one TLS record's worth of plaintext.
pub const DIRECT: usize = 16 * 1024;
/// A buffer grown past this by a burst is released once written out, so idle connections stay small.
const KEEP: usize = 16 * 1024;

pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `inner`.
    written: usize,
    /// The current flush already let other tasks run once.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            written: 0,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Hands everything buffered to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes; false when they are to be written through instead.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        let direct = len >= DIRECT;
        if direct || self.buf.len() + len > CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(!direct))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !ready!(this.poll_room(cx, data.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if !ready!(this.poll_room(cx, total))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.written < this.buf.len() && !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};
    use std::task::Waker;

    use super::*;

    /// Records every write it is given; accepts at most `limit` bytes per call.
    #[derive(Default, Clone)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        flushes: Arc<Mutex<usize>>,
        limit: usize,
    }

    impl Recorder {
        fn with_limit(limit: usize) -> Self {
            Recorder {
                limit,
                ..Default::default()
            }
        }
        fn writes(&self) -> Vec<Vec<u8>> {
            self.writes.lock().unwrap().clone()
        }
        fn bytes(&self) -> Vec<u8> {
            self.writes().concat()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let n = data.len().min(self.limit);
            self.writes.lock().unwrap().push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            *self.flushes.lock().unwrap() += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    fn write(c: &mut Coalesce<Recorder>, data: &[u8]) -> usize {
        match Pin::new(c).poll_write(&mut cx(), data) {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => panic!("write pending"),
        }
    }

    #[test]
    fn small_writes_wait_for_the_second_flush_and_leave_as_one() {
        let rec = Recorder::with_limit(usize::MAX);
        let mut c = Coalesce::new(rec.clone());
        assert_eq!(write(&mut c, b"frame one "), 10);
        let v = [io::IoSlice::new(b"frame "), io::IoSlice::new(b"two")];
        assert!(matches!(
            Pin::new(&mut c).poll_write_vectored(&mut cx(), &v),
            Poll::Ready(Ok(9))
        ));
        assert!(rec.writes().is_empty(), "nothing reaches the socket before a flush");
        // The first flush lets the other runnable tasks add their frames; it asks to be polled again.
        assert!(Pin::new(&mut c).poll_flush(&mut cx()).is_pending());
        assert!(rec.writes().is_empty());
        assert_eq!(write(&mut c, b" three"), 6);
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx()), Poll::Ready(Ok(()))));
        assert_eq!(rec.writes(), vec![b"frame one frame two three".to_vec()]);
        assert_eq!(*rec.flushes.lock().unwrap(), 1);
        // Nothing buffered: a flush goes straight through.
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx()), Poll::Ready(Ok(()))));
        assert_eq!(*rec.flushes.lock().unwrap(), 2);
    }

    #[test]
    fn a_full_buffer_is_written_without_a_flush_and_large_writes_pass_through_in_order() {
        let rec = Recorder::with_limit(usize::MAX);
        let mut c = Coalesce::new(rec.clone());
        let chunk = vec![7u8; DIRECT - 1];
        let fit = CAPACITY / chunk.len();
        for _ in 0..fit {
            write(&mut c, &chunk);
        }
        assert!(rec.writes().is_empty());
        // One more would overflow: what is buffered goes out as one write, the new chunk waits.
        write(&mut c, &chunk);
        assert_eq!(rec.writes().len(), 1);
        assert_eq!(rec.writes()[0].len(), fit * chunk.len());
        let big: Vec<u8> = (0..DIRECT as u32).map(|i| i as u8).collect();
        assert_eq!(write(&mut c, &big), big.len());
        let writes = rec.writes();
        assert_eq!(writes.len(), 3, "the buffered chunk first, then the large write itself");
        assert_eq!(writes[1], chunk);
        assert_eq!(writes[2], big);
    }

    #[test]
    fn partial_writes_lose_nothing() {
        let rec = Recorder::with_limit(5);
        let mut c = Coalesce::new(rec.clone());
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for part in data.chunks(37) {
            write(&mut c, part);
        }
        let mut polls = 0;
        while Pin::new(&mut c).poll_flush(&mut cx()).is_pending() {
            polls += 1;
            assert!(polls < 3, "flush keeps yielding");
        }
        assert_eq!(rec.bytes(), data);
        assert!(rec.writes().iter().all(|w| w.len() <= 5));
    }

    #[test]
    fn shutdown_writes_what_is_buffered_without_yielding() {
        let rec = Recorder::with_limit(usize::MAX);
        let mut c = Coalesce::new(rec.clone());
        write(&mut c, b"last words");
        assert!(matches!(Pin::new(&mut c).poll_shutdown(&mut cx()), Poll::Ready(Ok(()))));
        assert_eq!(rec.bytes(), b"last words");
    }

    #[tokio::test]
    async fn http2_over_coalesced_streams_carries_concurrent_exchanges() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(Coalesce::new(b)).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let path = req.uri().path().to_string();
                let mut send = respond.send_response(http::Response::new(()), false).unwrap();
                send.send_data(bytes::Bytes::from(path), true).unwrap();
            }
        });
        let (client, conn) = h2::client::handshake(Coalesce::new(a)).await.unwrap();
        tokio::spawn(conn);
        let mut tasks = Vec::new();
        for i in 0..50 {
            let mut client = client.clone().ready().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let req = http::Request::get(format!("http://x/{i}")).body(()).unwrap();
                let (resp, _) = client.send_request(req, true).unwrap();
                let mut body = resp.await.unwrap().into_body();
                let mut got = Vec::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    body.flow_control().release_capacity(chunk.len()).unwrap();
                    got.extend_from_slice(&chunk);
                }
                assert_eq!(got, format!("/{i}").into_bytes());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(client);
        server.abort();
    }
}
