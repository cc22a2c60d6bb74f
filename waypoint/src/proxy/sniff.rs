//! Protocol detection on the first bytes of a tunnel whose service port does not declare a protocol.
//!
//! HTTP/2 prior knowledge starts with the fixed preface; HTTP/1.x with `METHOD SP target SP HTTP/1.x`. Anything
//! else — a TLS ClientHello, a database handshake — is opaque TCP. Server-first protocols send nothing, so
//! detection gives up after a timeout and treats the tunnel as TCP (the bytes read so far are replayed).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest request line we wait for before calling the stream opaque.
const MAX_SNIFF: usize = 8 * 1024;

/// Classify what has been read so far; `None` = need more bytes.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    // Method token: RFC 9110 tchar, in practice upper-case letters; anything else cannot be HTTP/1.
    let method_len = buf
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
        .count();
    if method_len == 0 || method_len > 24 {
        return Some(Detected::Opaque);
    }
    if method_len == buf.len() {
        return None;
    }
    if buf[method_len] != b' ' {
        return Some(Detected::Opaque);
    }
    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
        return if buf.len() >= MAX_SNIFF {
            Some(Detected::Opaque)
        } else {
            None
        };
    };
    let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
    let is_http1 = line.len() > 9 && line.ends_with(b"HTTP/1.1") || line.ends_with(b"HTTP/1.0");
    Some(if is_http1 { Detected::Http1 } else { Detected::Opaque })
}

/// Read until the protocol is known (or `timeout` passes). Returns the classification and the stream with the
/// consumed bytes put back in front.
pub async fn detect<IO: AsyncRead + Unpin>(mut io: IO, timeout: Duration) -> io::Result<(Detected, Rewind<IO>)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let detected = loop {
        if let Some(d) = classify(&buf) {
            break d;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => break Detected::Opaque,
            Ok(Ok(0)) => break Detected::Opaque,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((detected, Rewind { prefix: buf, inner: io }))
}

/// A stream with some already-read bytes replayed first.
pub struct Rewind<IO> {
    prefix: BytesMut,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_async_write!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST /x?y=1 HTTP/1.0\n"), Some(Detected::Http1));
        assert_eq!(classify(b"GET / HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Some(Detected::Opaque),
            "TLS ClientHello"
        );
        assert_eq!(classify(b"hello world\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"GET / SMTP\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"PING\r\n"), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn rewinds_what_it_read() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"GET /x HTTP/1.1\r\n\r\n").await.unwrap();
        drop(a);
        let (d, mut io) = detect(b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET /x HTTP/1.1\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn server_first_protocols_time_out_to_opaque() {
        let (_a, b) = tokio::io::duplex(64);
        let (d, _) = detect(b, Duration::from_millis(100)).await.unwrap();
        assert_eq!(d, Detected::Opaque);
    }
}
