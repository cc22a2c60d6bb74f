//! Large socket reads under TLS while bulk data flows in.
//!
//! rustls reads at most one record's worth (about 16 KiB) per call, so a connection carrying a 1 MiB body made
//! some 70 `recv` calls per MiB, each paying the system call and the TCP receive bookkeeping. Once a read fills
//! the whole buffer it was given (more is likely waiting), reads go through a [`SIZE`] buffer instead, and TLS
//! is served from it. A read that brings in little turns this off again and frees the buffer, so connections
//! carrying small messages read straight into TLS's buffer and hold nothing extra.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes asked of the socket per read in bulk mode.
pub const SIZE: usize = 64 * 1024;
/// A bulk-mode read bringing in less than this ends bulk mode.
const SMALL: usize = SIZE / 4;

pub struct ReadAhead<T> {
    inner: T,
    buf: BytesMut,
    bulk: bool,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
            bulk: false,
        }
    }

    fn serve(&mut self, out: &mut ReadBuf<'_>) {
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        if self.buf.is_empty() && !self.bulk {
            self.buf = BytesMut::new();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.buf.is_empty() {
            this.serve(out);
            return Poll::Ready(Ok(()));
        }
        if !this.bulk || out.remaining() >= SIZE {
            let asked = out.remaining();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            this.bulk = asked > 0 && out.remaining() == 0;
            return Poll::Ready(Ok(()));
        }
        this.buf.reserve(SIZE);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut this.inner),
            cx,
            &mut this.buf
        ))?;
        if n < SMALL {
            this.bulk = false;
        }
        this.serve(out);
        Poll::Ready(Ok(()))
    }
}

forward_async_write!(ReadAhead);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::task::Waker;

    use super::*;

    /// A socket holding `pending` bytes; records how much each read asked for and got.
    #[derive(Clone, Default)]
    struct Socket {
        pending: Arc<Mutex<VecDeque<u8>>>,
        reads: Arc<Mutex<Vec<(usize, usize)>>>,
    }

    impl Socket {
        fn push(&self, data: &[u8]) {
            self.pending.lock().unwrap().extend(data);
        }
        fn reads(&self) -> Vec<(usize, usize)> {
            self.reads.lock().unwrap().clone()
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let mut p = self.pending.lock().unwrap();
            if p.is_empty() {
                return Poll::Pending;
            }
            let n = p.len().min(out.remaining());
            let bytes: Vec<u8> = p.drain(..n).collect();
            out.put_slice(&bytes);
            self.reads.lock().unwrap().push((out.capacity(), n));
            Poll::Ready(Ok(()))
        }
    }

    /// One read of at most `max` bytes, as rustls asks.
    fn read(r: &mut ReadAhead<Socket>, max: usize) -> Option<Vec<u8>> {
        let mut space = vec![0u8; max];
        let mut out = ReadBuf::new(&mut space);
        match Pin::new(r).poll_read(&mut Context::from_waker(Waker::noop()), &mut out) {
            Poll::Ready(r) => {
                r.unwrap();
                Some(out.filled().to_vec())
            }
            Poll::Pending => None,
        }
    }

    #[test]
    fn small_messages_are_read_straight_through() {
        let sock = Socket::default();
        let mut r = ReadAhead::new(sock.clone());
        for i in 0..3u8 {
            sock.push(&[i; 1000]);
            assert_eq!(read(&mut r, 16 * 1024).unwrap(), vec![i; 1000]);
        }
        assert!(read(&mut r, 16 * 1024).is_none());
        assert!(
            sock.reads().iter().all(|&(asked, _)| asked == 16 * 1024),
            "no read-ahead buffer in between"
        );
        assert_eq!(r.buf.capacity(), 0);
    }

    #[test]
    fn bulk_data_is_read_in_large_reads_and_lands_in_order() {
        let sock = Socket::default();
        let mut r = ReadAhead::new(sock.clone());
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        sock.push(&data);
        let mut got = Vec::new();
        while let Some(chunk) = read(&mut r, 16 * 1024 + 300) {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, data);
        let reads = sock.reads();
        // The first read filled TLS's buffer; from then on the socket is asked for SIZE at a time.
        assert_eq!(reads[0].0, 16 * 1024 + 300);
        assert!(reads[1..].iter().all(|&(asked, _)| asked >= SIZE));
        assert!(reads.len() <= 1 + data.len().div_ceil(SIZE));
    }

    #[test]
    fn a_small_read_ends_bulk_mode_and_frees_the_buffer() {
        let sock = Socket::default();
        let mut r = ReadAhead::new(sock.clone());
        sock.push(&[1u8; 20_000]);
        assert_eq!(read(&mut r, 8 * 1024).unwrap().len(), 8 * 1024);
        assert!(r.bulk);
        // The rest arrives through the buffer; it was a short read, so bulk mode ends once it is served.
        let mut rest = 0;
        while let Some(chunk) = read(&mut r, 8 * 1024) {
            rest += chunk.len();
        }
        assert_eq!(rest, 20_000 - 8 * 1024);
        assert!(!r.bulk);
        assert_eq!(r.buf.capacity(), 0);
        sock.push(&[2u8; 100]);
        assert_eq!(read(&mut r, 8 * 1024).unwrap(), vec![2u8; 100]);
        assert_eq!(sock.reads().last().unwrap().0, 8 * 1024, "straight through again");
    }
}
