//! Write coalescing for HBONE connections: fewer TLS records and fewer `writev`s.
//!
//! Without it every frame h2 writes becomes its own TLS record and its own system call. On the rig the HBONE
//! write path (loopback TCP included) was over a third of the waypoint's CPU at about one `writev` per request,
//! and a 16 KiB DATA frame plus its 9-byte header went out as a full record, a 9-byte record and a `writev`.
//!
//! Two things change that:
//! - Plaintext is handed to TLS in whole records only. What is left over (small frames, the tail of a large
//!   write) waits in a buffer below one record until more arrives or the connection is flushed.
//! - A flush does not reach the socket in the same poll of the connection task. h2 flushes after every DATA
//!   frame and at the end of every poll; the first flush of a poll wakes the task and returns at once, the
//!   records pile up (up to [`BATCH`]), and the first flush of the *next* poll writes them in one `writev`.
//!   The delay is one pass over the worker's run queue, never a timer: the other tasks that run in between are
//!   the streams about to queue their own frames. [`Ticks`] is how the writer tells the two polls apart.
//!
//! This relies on h2 flushing its codec at the end of every poll of the connection (it does: `poll_complete`
//! ends with a flush whenever no frame is left), so data never waits for a poll that does not come.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Plaintext of one full TLS record.
pub const RECORD: usize = 16 * 1024;
/// Plaintext handed to TLS since the socket last took everything; past this the socket is written first.
pub const BATCH: usize = 64 * 1024;
/// A buffer grown past this is released once emptied, so idle connections stay small.
const KEEP: usize = RECORD;
/// Most slices handed to TLS in one call: the leftover buffer plus h2's header and payload, with room to spare.
const MAX_SLICES: usize = 8;

/// A TLS stream that can take plaintext without touching the socket: it encrypts into records queued for the
/// next flush.
pub trait PlainWrite {
    /// Encrypts up to the whole of `bufs`; `Ok(0)` when the record queue is full.
    fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl<IO> PlainWrite for tokio_rustls::server::TlsStream<IO> {
    fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        io::Write::write_vectored(&mut self.get_mut().1.writer(), bufs)
    }
}

impl<IO> PlainWrite for tokio_rustls::client::TlsStream<IO> {
    fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        io::Write::write_vectored(&mut self.get_mut().1.writer(), bufs)
    }
}

/// Counts the polls of the task that drives one HBONE connection.
#[derive(Clone, Default, Debug)]
pub struct Ticks(Arc<AtomicU64>);

impl Ticks {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn advance(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `fut` (the code that polls the h2 connection), counting its polls.
    pub async fn drive<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            self.advance();
            fut.as_mut().poll(cx)
        })
        .await
    }
}

pub struct Coalesce<T> {
    inner: T,
    /// Plaintext not yet handed to TLS; always less than one record.
    buf: Vec<u8>,
    /// Plaintext handed to TLS since the socket last took everything.
    queued: usize,
    ticks: Ticks,
    /// The poll in which a flush was deferred; the next poll's flush writes.
    owed: Option<u64>,
}

impl<T> Coalesce<T> {
    /// `ticks` must count the polls of the task that polls the connection using this stream.
    pub fn new(inner: T, ticks: Ticks) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            queued: 0,
            ticks,
            owed: None,
        }
    }
}

/// Writes every queued record to the socket.
fn poll_send<T: AsyncWrite + Unpin>(inner: &mut T, queued: &mut usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    ready!(Pin::new(inner).poll_flush(cx))?;
    *queued = 0;
    Poll::Ready(Ok(()))
}

/// Hands `slices` to TLS, writing the socket first when TLS refuses. Returns how many
/// bytes TLS took (never 0).
fn poll_encrypt<T: AsyncWrite + PlainWrite + Unpin>(
    inner: &mut T,
    queued: &mut usize,
    cx: &mut Context<'_>,
    slices: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        let n = inner.write_plain(slices)?;
        if n > 0 {
            *queued += n;
            return Poll::Ready(Ok(n));
        }
        if *queued == 0 {
            // TLS refuses with nothing queued: it will not take more (closed for writing).
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        ready!(poll_send(inner, queued, cx))?;
    }
}

impl<T: AsyncWrite + PlainWrite + Unpin> Coalesce<T> {
    /// Takes bytes from `data`: buffered when they and the leftover stay below a record, otherwise encrypted
    /// in whole records with the remainder buffered. Returns how many bytes of `data` were taken.
    fn poll_take(&mut self, cx: &mut Context<'_>, data: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let total: usize = data.iter().map(|d| d.len()).sum();
        loop {
            if self.buf.len() + total < RECORD {
                for d in data {
                    self.buf.extend_from_slice(d);
                }
                return Poll::Ready(Ok(total));
            }
            let whole = (self.buf.len() + total) / RECORD * RECORD;
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut used = 0;
            let mut room = whole;
            for part in std::iter::once(&self.buf[..]).chain(data.iter().map(|d| &d[..])) {
                if room == 0 || used == MAX_SLICES {
                    break;
                }
                let take = part.len().min(room);
                if take > 0 {
                    slices[used] = IoSlice::new(&part[..take]);
                    used += 1;
                    room -= take;
                }
            }
            if self.queued >= BATCH {
                ready!(poll_send(&mut self.inner, &mut self.queued, cx))?;
            }
            let n = ready!(poll_encrypt(&mut self.inner, &mut self.queued, cx, &slices[..used]))?;
            let from_buf = n.min(self.buf.len());
            self.buf.drain(..from_buf);
            let taken = n - from_buf;
            if taken == 0 {
                continue;
            }
            let rest = total - taken;
            if rest < RECORD {
                let mut skip = taken;
                for d in data {
                    let s = skip.min(d.len());
                    self.buf.extend_from_slice(&d[s..]);
                    skip -= s;
                }
                return Poll::Ready(Ok(total));
            }
            return Poll::Ready(Ok(taken));
        }
    }

    /// Hands the leftover to TLS and writes every queued record to the socket.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let n = ready!(poll_encrypt(
                &mut self.inner,
                &mut self.queued,
                cx,
                &[IoSlice::new(&self.buf)]
            ))?;
            self.buf.drain(..n);
        }
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        }
        poll_send(&mut self.inner, &mut self.queued, cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + PlainWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_take(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_take(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() && this.queued == 0 {
            this.owed = None;
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        let now = this.ticks.now();
        match this.owed {
            Some(since) if since != now => {}
            Some(_) => return Poll::Ready(Ok(())),
            None => {
                // Reported as flushed: the wake guarantees the next poll of this task, whose flush writes.
                this.owed = Some(now);
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
        }
        ready!(this.poll_write_out(cx))?;
        this.owed = None;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_out(cx))?;
        this.owed = None;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    use super::*;

    /// Stands in for a TLS stream: plaintext handed over is queued (up to `limit` bytes, as rustls bounds its
    /// record queue) and reaches `socket` only on a flush.
    struct Tls<S> {
        socket: S,
        queue: Vec<u8>,
        limit: usize,
        /// Length of every `write_plain` that TLS took.
        plain: Arc<Mutex<Vec<usize>>>,
    }

    impl<S> Tls<S> {
        fn new(socket: S, limit: usize) -> Self {
            Tls {
                socket,
                queue: Vec::new(),
                limit,
                plain: Arc::default(),
            }
        }
    }

    impl<S> PlainWrite for Tls<S> {
        fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let room = self.limit - self.queue.len();
            let mut n = 0;
            for b in bufs {
                let t = b.len().min(room - n);
                self.queue.extend_from_slice(&b[..t]);
                n += t;
            }
            if n > 0 {
                self.plain.lock().unwrap().push(n);
            }
            Ok(n)
        }
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Tls<S> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.socket).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Tls<S> {
        fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, _data: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::other("plaintext goes through write_plain")))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = &mut *self;
            while !this.queue.is_empty() {
                let n = ready!(Pin::new(&mut this.socket).poll_write(cx, &this.queue))?;
                this.queue.drain(..n);
            }
            Pin::new(&mut this.socket).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            ready!(self.as_mut().poll_flush(cx))?;
            Pin::new(&mut self.socket).poll_shutdown(cx)
        }
    }

    /// A socket that records every write; with `busy` set, every other write finds it full.
    #[derive(Default, Clone)]
    struct Socket {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        busy: bool,
        calls: Arc<AtomicUsize>,
    }

    impl Socket {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.writes.lock().unwrap().clone()
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            if self.busy && self.calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.writes.lock().unwrap().push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Harness {
        c: Coalesce<Tls<Socket>>,
        ticks: Ticks,
        socket: Socket,
        plain: Arc<Mutex<Vec<usize>>>,
        wakes: Arc<Wakes>,
    }

    impl Harness {
        fn new(limit: usize, busy: bool) -> Self {
            let socket = Socket {
                busy,
                ..Default::default()
            };
            let tls = Tls::new(socket.clone(), limit);
            let plain = tls.plain.clone();
            let ticks = Ticks::default();
            Harness {
                c: Coalesce::new(tls, ticks.clone()),
                ticks,
                socket,
                plain,
                wakes: Arc::default(),
            }
        }
        fn waker(&self) -> Waker {
            Waker::from(self.wakes.clone())
        }
        fn write_vectored(&mut self, parts: &[&[u8]]) -> Poll<io::Result<usize>> {
            let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            let waker = self.waker();
            Pin::new(&mut self.c).poll_write_vectored(&mut Context::from_waker(&waker), &slices)
        }
        fn write(&mut self, data: &[u8]) -> usize {
            match self.write_vectored(&[data]) {
                Poll::Ready(r) => r.unwrap(),
                Poll::Pending => panic!("write pending"),
            }
        }
        fn flush(&mut self) -> Poll<io::Result<()>> {
            let waker = self.waker();
            Pin::new(&mut self.c).poll_flush(&mut Context::from_waker(&waker))
        }
        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::Relaxed)
        }
        fn sent(&self) -> Vec<u8> {
            self.socket.writes().concat()
        }
    }

    #[test]
    fn small_frames_leave_together_on_the_next_poll() {
        let mut h = Harness::new(usize::MAX, false);
        assert_eq!(h.write(b"frame one "), 10);
        assert!(matches!(h.write_vectored(&[b"frame ", b"two"]), Poll::Ready(Ok(9))));
        // The first flush of a poll reports success, asks for another poll and writes nothing yet.
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.wakes(), 1);
        assert!(
            h.plain.lock().unwrap().is_empty(),
            "nothing is encrypted before the next poll"
        );
        // Later in the same poll: still nothing written, no second wake.
        assert_eq!(h.write(b" three"), 6);
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.wakes(), 1);
        assert!(h.socket.writes().is_empty());
        h.ticks.advance();
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(*h.plain.lock().unwrap(), vec![25], "one record");
        assert_eq!(h.socket.writes(), vec![b"frame one frame two three".to_vec()]);
        // Nothing left: a flush neither writes nor asks for another poll.
        h.ticks.advance();
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.wakes(), 1);
        assert_eq!(h.socket.writes().len(), 1);
    }

    #[test]
    fn data_frames_are_encrypted_in_whole_records_and_sent_in_one_write() {
        let mut h = Harness::new(usize::MAX, false);
        let mut expect = Vec::new();
        for i in 0..4u8 {
            let head = [i; 9];
            let payload = vec![i + 100; RECORD];
            // h2 hands over a frame header and its payload as two slices.
            assert!(matches!(h.write_vectored(&[&head, &payload]), Poll::Ready(Ok(n)) if n == 9 + RECORD));
            expect.extend_from_slice(&head);
            expect.extend_from_slice(&payload);
            assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        }
        assert!(h.socket.writes().is_empty(), "records wait for the next poll");
        let plain = h.plain.lock().unwrap().clone();
        assert_eq!(plain, vec![RECORD; 4], "no short record per frame header");
        h.ticks.advance();
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.socket.writes().len(), 1, "four frames, one write");
        assert_eq!(h.sent(), expect);
        assert_eq!(
            h.plain.lock().unwrap().last(),
            Some(&36),
            "the headers' bytes close the run"
        );
    }

    #[test]
    fn a_full_batch_reaches_the_socket_before_more_is_taken() {
        let mut h = Harness::new(usize::MAX, false);
        let chunk = vec![1u8; RECORD];
        for _ in 0..BATCH / RECORD {
            h.write(&chunk);
        }
        assert!(h.socket.writes().is_empty());
        h.write(&chunk);
        assert_eq!(h.socket.writes().len(), 1);
        assert_eq!(h.socket.writes()[0].len(), BATCH);
    }

    #[test]
    fn a_full_tls_queue_and_a_busy_socket_lose_nothing() {
        let mut h = Harness::new(20_000, true);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut rest = &data[..];
        let mut sizes = [37usize, 9, 16_384, 40_000, 5, 16_393, 1].iter().cycle();
        while !rest.is_empty() {
            let size = (*sizes.next().unwrap()).min(rest.len());
            match h.write_vectored(&[&rest[..size]]) {
                Poll::Ready(Ok(n)) => {
                    assert!(n > 0 && n <= size);
                    rest = &rest[n..];
                }
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => h.ticks.advance(),
            }
        }
        let mut polls = 0;
        loop {
            h.ticks.advance();
            if h.flush().is_ready() && h.c.buf.is_empty() && h.c.queued == 0 {
                break;
            }
            polls += 1;
            assert!(polls < 10, "flush makes no progress");
        }
        assert_eq!(h.sent(), data);
    }

    #[test]
    fn shutdown_writes_the_leftover_at_once() {
        let mut h = Harness::new(usize::MAX, false);
        h.write(b"last words");
        let waker = h.waker();
        let r = Pin::new(&mut h.c).poll_shutdown(&mut Context::from_waker(&waker));
        assert!(matches!(r, Poll::Ready(Ok(()))));
        assert_eq!(h.sent(), b"last words");
    }

    #[test]
    fn tls_refusing_with_nothing_queued_is_an_error_not_a_spin() {
        let mut h = Harness::new(0, false);
        let r = h.write_vectored(&[&[0u8; 2 * RECORD]]);
        assert!(matches!(r, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::WriteZero));
    }

    /// h2 on both ends, each connection driven under its own [`Ticks`], over an in-memory pipe.
    async fn h2_pair() -> (h2::client::SendRequest<bytes::Bytes>, tokio::task::JoinHandle<()>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let ticks = Ticks::default();
            let io = Coalesce::new(Tls::new(b, 64 * 1024), ticks.clone());
            ticks
                .drive(async move {
                    let mut conn = h2::server::handshake(io).await.unwrap();
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        tokio::spawn(async move {
                            let path = req.uri().path().to_string();
                            let size: usize = path.trim_start_matches('/').parse().unwrap_or(0);
                            let mut send = respond.send_response(http::Response::new(()), false).unwrap();
                            let body: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
                            send.send_data(bytes::Bytes::from(body), true).unwrap();
                        });
                    }
                })
                .await
        });
        let ticks = Ticks::default();
        let io = Coalesce::new(Tls::new(a, 64 * 1024), ticks.clone());
        let (client, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(async move { ticks.drive(conn).await });
        (client, server)
    }

    async fn fetch(client: &h2::client::SendRequest<bytes::Bytes>, size: usize) -> Vec<u8> {
        let mut client = client.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://x/{size}")).body(()).unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let mut body = resp.await.unwrap().into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        got
    }

    #[tokio::test]
    async fn http2_over_coalesced_streams_carries_small_and_bulk_exchanges_at_once() {
        let (client, server) = h2_pair().await;
        let mut tasks = Vec::new();
        for i in 0..40usize {
            let client = client.clone();
            // Every fourth exchange is a bulk body (up to 1 MiB) among small ones.
            let size = if i % 4 == 0 { (i + 1) * 26_000 } else { i };
            tasks.push(tokio::spawn(async move {
                let got = fetch(&client, size).await;
                let want: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
                assert!(got == want, "exchange {i}: {} bytes, want {size}", got.len());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(client);
        server.abort();
    }
}
