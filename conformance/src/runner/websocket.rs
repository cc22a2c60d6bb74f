//! A minimal RFC 6455 WebSocket: the opening handshake (client side) and frame codec used by the runner's
//! `websocket` harness, and the frame echo behind the echo server's `/ws`.
//!
//! Only what the conformance exchange needs: single-frame messages, masking, ping/pong, close. No extensions,
//! no subprotocol negotiation beyond sending and checking the header.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::cases::WsExchange;

/// RFC 6455 §1.3.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Larger frames are refused rather than buffered.
const MAX_PAYLOAD: u64 = 16 * 1024 * 1024;
const MAX_HEAD: usize = 16 * 1024;

pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xa;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> Frame {
        Frame {
            fin: true,
            opcode,
            payload: payload.into(),
        }
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64(digest.as_ref())
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn hex_decode(hex: &str) -> Result<Vec<u8>, String> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        return Err(format!("odd-length hex {hex:?}"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| format!("bad hex {hex:?}")))
        .collect()
}

pub fn encode(frame: &Frame, mask: Option<[u8; 4]>) -> Vec<u8> {
    let len = frame.payload.len();
    let mut out = Vec::with_capacity(len + 14);
    out.push(if frame.fin { 0x80 } else { 0 } | (frame.opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(frame.payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(&frame.payload),
    }
    out
}

/// Reads one frame; returns it unmasked, with whether it was masked.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<(Frame, bool)> {
    let mut head = [0u8; 2];
    reader.read_exact(&mut head).await?;
    let fin = head[0] & 0x80 != 0;
    let opcode = head[0] & 0x0f;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7f {
        126 => u64::from(reader.read_u16().await?),
        127 => reader.read_u64().await?,
        n => u64::from(n),
    };
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut key = [0u8; 4];
    if masked {
        reader.read_exact(&mut key).await?;
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Ok((Frame { fin, opcode, payload }, masked))
}

/// The echo server's side after the 101: every data frame comes back as sent (unmasked), pings get pongs, a
/// close is answered with a close.
pub async fn serve_echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> io::Result<()> {
    loop {
        let (frame, _) = match read_frame(&mut io).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let reply = match frame.opcode {
            opcode::TEXT | opcode::BINARY | opcode::CONTINUATION => frame,
            opcode::PING => Frame::new(opcode::PONG, frame.payload),
            opcode::PONG => continue,
            opcode::CLOSE => {
                io.write_all(&encode(&Frame::new(opcode::CLOSE, frame.payload), None))
                    .await?;
                io.flush().await?;
                return Ok(());
            }
            other => {
                let reason = format!("unknown opcode {other}");
                return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
            }
        };
        io.write_all(&encode(&reply, None)).await?;
        io.flush().await?;
    }
}

/// What the client asks for in the opening handshake.
#[derive(Debug, Clone)]
pub struct Handshake<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub origin: Option<&'a str>,
    pub subprotocol: Option<&'a str>,
}

/// Opening handshake, then each exchange (send one message, expect it echoed), then a clean close.
pub async fn client_session<S>(io: S, handshake: &Handshake<'_>, exchange: &[WsExchange]) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = BufReader::new(io);
    let key = base64(&fastrand::u128(..).to_be_bytes());
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        handshake.path, handshake.host
    );
    if let Some(origin) = handshake.origin {
        request.push_str(&format!("Origin: {origin}\r\n"));
    }
    if let Some(protocol) = handshake.subprotocol.filter(|p| !p.is_empty()) {
        request.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
    }
    request.push_str("\r\n");
    let io_err = |what: &str, e: io::Error| format!("{what}: {e}");
    io.get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|e| io_err("sending the handshake", e))?;
    io.get_mut()
        .flush()
        .await
        .map_err(|e| io_err("sending the handshake", e))?;

    let (status, headers) = read_head(&mut io).await?;
    if status != 101 {
        return Err(format!("handshake answered {status}, expected 101"));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(format!("101 without Upgrade: websocket ({:?})", header("upgrade")));
    }
    if !header("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))) {
        return Err(format!("101 without Connection: Upgrade ({:?})", header("connection")));
    }
    let expected = accept_key(&key);
    if header("sec-websocket-accept") != Some(expected.as_str()) {
        return Err(format!(
            "Sec-WebSocket-Accept {:?}, expected {expected:?}",
            header("sec-websocket-accept")
        ));
    }

    for (i, step) in exchange.iter().enumerate() {
        let (send, expected) = if let Some(text) = &step.send_text {
            let expected = step.expect_text.as_ref().map(|t| t.as_bytes().to_vec());
            (Frame::new(opcode::TEXT, text.as_bytes()), expected)
        } else if let Some(hex) = &step.send_binary_hex {
            let expected = step.expect_binary_hex.as_deref().map(hex_decode).transpose()?;
            (Frame::new(opcode::BINARY, hex_decode(hex)?), expected)
        } else {
            return Err(format!("exchange[{i}] sends nothing"));
        };
        // Without an explicit expectation, an echo means the same message back.
        let expected = expected.unwrap_or_else(|| send.payload.clone());
        io.get_mut()
            .write_all(&encode(&send, Some(fastrand::u32(..).to_be_bytes())))
            .await
            .map_err(|e| io_err("sending a frame", e))?;
        io.get_mut().flush().await.map_err(|e| io_err("sending a frame", e))?;
        let reply = read_data_frame(&mut io).await?;
        if reply.opcode != send.opcode || reply.payload != expected {
            return Err(format!(
                "exchange[{i}]: expected opcode {} {:?}, got opcode {} {:?}",
                send.opcode,
                String::from_utf8_lossy(&expected),
                reply.opcode,
                String::from_utf8_lossy(&reply.payload)
            ));
        }
    }
    // A clean close (1000); the peer's close reply is not required.
    let close = Frame::new(opcode::CLOSE, 1000u16.to_be_bytes());
    let _ = io
        .get_mut()
        .write_all(&encode(&close, Some(fastrand::u32(..).to_be_bytes())))
        .await;
    let _ = io.get_mut().flush().await;
    Ok(())
}

/// The next text or binary frame, answering pings on the way.
async fn read_data_frame<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufReader<S>) -> Result<Frame, String> {
    loop {
        let (frame, masked) = read_frame(io).await.map_err(|e| format!("reading a frame: {e}"))?;
        if masked {
            return Err("the server sent a masked frame".into());
        }
        match frame.opcode {
            opcode::PING => {
                let pong = encode(
                    &Frame::new(opcode::PONG, frame.payload),
                    Some(fastrand::u32(..).to_be_bytes()),
                );
                io.get_mut()
                    .write_all(&pong)
                    .await
                    .map_err(|e| format!("answering a ping: {e}"))?;
            }
            opcode::PONG => {}
            opcode::CLOSE => return Err("the server closed the WebSocket".into()),
            _ => return Ok(frame),
        }
    }
}

/// Status code and headers of an HTTP/1.1 response head.
async fn read_head<R: AsyncRead + Unpin>(io: &mut BufReader<R>) -> Result<(u16, Vec<(String, String)>), String> {
    let mut total = 0;
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = io
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading the handshake response: {e}"))?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        total += n;
        if total > MAX_HEAD {
            return Err("handshake response head too large".into());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let status_line = lines.first().ok_or("empty handshake response")?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::echo::{EchoConfig, EchoServer};
    use crate::net::unique_loopback_ip;
    use std::net::SocketAddr;
    use tokio::net::TcpStream;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(hex_decode("01020a").unwrap(), vec![1, 2, 10]);
        assert!(hex_decode("012").is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_at_every_length_encoding() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let frame = Frame::new(opcode::BINARY, vec![7u8; len]);
            for mask in [None, Some([1, 2, 3, 4])] {
                let bytes = encode(&frame, mask);
                let (decoded, masked) = read_frame(&mut bytes.as_slice()).await.unwrap();
                assert_eq!(decoded, frame);
                assert_eq!(masked, mask.is_some());
            }
        }
        // RFC 6455 §5.7: a masked "Hello".
        let masked = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (frame, _) = read_frame(&mut &masked[..]).await.unwrap();
        assert_eq!(frame.payload, b"Hello");
        assert_eq!(encode(&frame, Some([0x37, 0xfa, 0x21, 0x3d])), masked);
    }

    #[tokio::test]
    async fn exchanges_with_the_echo_server_ws_endpoint() {
        let echo = EchoServer::start(EchoConfig::new(SocketAddr::new(unique_loopback_ip().into(), 3000)))
            .await
            .unwrap();
        let exchange = vec![
            WsExchange {
                send_text: Some("Websocket Support!".into()),
                expect_text: Some("Websocket Support!".into()),
                ..WsExchange::default()
            },
            WsExchange {
                send_binary_hex: Some("01020304050607".into()),
                expect_binary_hex: Some("01020304050607".into()),
                ..WsExchange::default()
            },
        ];
        let handshake = Handshake {
            host: "gateway",
            path: "/ws",
            origin: Some("ws://gateway/test"),
            subprotocol: Some(""),
        };
        let tcp = TcpStream::connect(echo.addr()).await.unwrap();
        client_session(tcp, &handshake, &exchange).await.unwrap();

        // A mismatch is reported, not passed.
        let wrong = vec![WsExchange {
            send_text: Some("a".into()),
            expect_text: Some("b".into()),
            ..WsExchange::default()
        }];
        let tcp = TcpStream::connect(echo.addr()).await.unwrap();
        let err = client_session(tcp, &handshake, &wrong).await.unwrap_err();
        assert!(err.contains("exchange[0]"), "{err}");

        // /ws without the upgrade headers is an error, and other paths do not upgrade.
        let other = Handshake {
            path: "/not-ws",
            ..handshake.clone()
        };
        let tcp = TcpStream::connect(echo.addr()).await.unwrap();
        let err = client_session(tcp, &other, &exchange).await.unwrap_err();
        assert!(err.contains("expected 101"), "{err}");
        let mut tcp = TcpStream::connect(echo.addr()).await.unwrap();
        tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut reader = BufReader::new(tcp);
        let (status, _) = read_head(&mut reader).await.unwrap();
        assert_eq!(status, 400);
    }
}
