//! What the two ztunnel stand-ins share: the byte-stream view of an HTTP/2 CONNECT stream, ztunnel's HTTP/2
//! settings, and ztunnel's TLS rules (reference §1.2–1.3).
//!
//! TLS is TLS 1.3 only, ALPN `h2`, aws-lc-rs as the one provider. The server side demands a client
//! certificate chained to the mesh root whose URI SAN is in the trust domain; the client side never checks a
//! DNS name (no SNI is sent) and instead requires an exact SPIFFE ID. Both checks sit inside the certificate
//! verifiers, as in ztunnel, so a wrong peer fails the handshake itself.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::Reason;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::pki::{Leaf, PkiError, uri_sans};

/// ztunnel's `HTTP2_STREAM_WINDOW_SIZE`.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// ztunnel's `HTTP2_CONNECTION_WINDOW_SIZE`.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// ztunnel's `HTTP2_FRAME_SIZE`.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// ztunnel's `POOL_MAX_STREAMS_PER_CONNECTION`.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("root certificate: {0}")]
    Root(String),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// An h2 server builder with ztunnel's inbound settings.
pub fn h2_server_builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(200)
        .max_send_buffer_size(400 * 1024);
    builder
}

/// An h2 client builder with ztunnel's outbound settings.
pub fn h2_client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .enable_push(false);
    builder
}

/// One HTTP/2 stream seen as a byte pipe, with ztunnel's EOF rules: END_STREAM or RST_STREAM with
/// NO_ERROR/CANCEL read as EOF; shutdown sends an empty DATA frame with END_STREAM (a TCP half-close).
/// Dropping it without shutdown resets the stream (CANCEL), the analogue of an aborted TCP connection.
pub struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// Received but not yet handed to the reader; its flow-control capacity is released once consumed.
    leftover: Bytes,
    read_eof: bool,
    write_closed: bool,
}

impl fmt::Debug for H2Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Io")
            .field("stream", &self.send.stream_id())
            .field("leftover", &self.leftover.len())
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl H2Io {
    pub fn new(send: h2::SendStream<Bytes>, recv: h2::RecvStream) -> H2Io {
        H2Io {
            send,
            recv,
            leftover: Bytes::new(),
            read_eof: false,
            write_closed: false,
        }
    }

    /// Resets the stream with `reason` (what a failing peer does), instead of a clean close.
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }

    fn take_leftover(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.leftover.len().min(buf.remaining());
        buf.put_slice(&self.leftover[..n]);
        self.leftover.advance(n);
        // An error only means the stream is already gone; the reader learns that on its next poll.
        let _ = self.recv.flow_control().release_capacity(n);
    }

    fn closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(io::ErrorKind::BrokenPipe, format!("stream reset: {reason}")),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
        }
    }
}

fn is_clean_reset(e: &h2::Error) -> bool {
    e.is_reset() && matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL))
}

/// Maps an h2 error onto the io error a TCP socket would give in the same situation.
pub fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.leftover.is_empty() {
                this.take_leftover(buf);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.leftover = data,
                None => this.read_eof = true,
                Some(Err(e)) if is_clean_reset(&e) => this.read_eof = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(capacity)) => {
                let n = capacity.min(buf.len());
                match this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(_) => Poll::Ready(Err(this.closed_error(cx))),
                }
            }
            Some(Err(_)) | None => Poll::Ready(Err(this.closed_error(cx))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The h2 connection task writes frames out; there is nothing buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        if this.send.send_data(Bytes::new(), true).is_ok() {
            return Poll::Ready(Ok(()));
        }
        // The peer already ended the stream; a clean reset is as good as our END_STREAM.
        match this.send.poll_reset(cx) {
            Poll::Ready(Ok(Reason::NO_ERROR | Reason::CANCEL)) => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(this.closed_error(cx))),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// TLS

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The mesh root(s) from PEM (several concatenated roots are allowed, as in Istio's root bundle).
pub fn root_store(root_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Root(e.to_string()))?;
        roots.add(cert).map_err(|e| TlsError::Root(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Root("no certificate in root PEM".into()));
    }
    Ok(roots)
}

/// The first SPIFFE URI SAN of the peer's leaf certificate, if any.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certs?.first()?;
    uri_sans(leaf)
        .ok()?
        .into_iter()
        .find(|uri| uri.starts_with("spiffe://"))
}

/// What ztunnel uses as ServerName: an IP, so rustls sends no SNI.
pub fn no_sni_server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
}

/// TLS config of an HBONE server (a destination ztunnel) presenting `leaf`.
pub fn server_tls_config(
    leaf: &Leaf,
    root_pem: &str,
    trust_domain: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(root_pem)?), provider.clone()).build()?;
    let verifier = Arc::new(TrustDomainVerifier {
        inner,
        prefix: format!("spiffe://{trust_domain}/"),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(leaf.chain_der()?, leaf.key_der()?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS config of an HBONE client (a source ztunnel) presenting `leaf` and accepting only a server whose
/// certificate carries the URI SAN `expected_identity`.
pub fn client_tls_config(
    leaf: &Leaf,
    root_pem: &str,
    expected_identity: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = client_builder(root_pem, expected_identity)?;
    finish_client(builder.with_client_auth_cert(leaf.chain_der()?, leaf.key_der()?)?)
}

/// Like [`client_tls_config`] but presenting no certificate (to test that servers refuse it).
pub fn anonymous_client_tls_config(
    root_pem: &str,
    expected_identity: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    finish_client(client_builder(root_pem, expected_identity)?.with_no_client_auth())
}

fn client_builder(
    root_pem: &str,
    expected_identity: &str,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: root_store(root_pem)?,
        expected: vec![expected_identity.to_string()],
        algorithms: provider.signature_verification_algorithms,
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

fn finish_client(mut config: rustls::ClientConfig) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// TLS-connects `tcp` as ztunnel does (no SNI).
pub async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tokio_rustls::TlsConnector::from(config)
        .connect(no_sni_server_name(), tcp)
        .await
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct IdentityRejected(String);

fn identity_rejected(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(IdentityRejected(
        message,
    )))))
}

fn uris_of(cert: &CertificateDer<'_>) -> Result<Vec<String>, rustls::Error> {
    uri_sans(cert).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

/// ztunnel's `TrustDomainVerifier`: WebPKI chain validation plus "some URI SAN is in our trust domain".
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    prefix: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let uris = uris_of(end_entity)?;
        if uris.iter().any(|uri| uri.starts_with(&self.prefix)) {
            Ok(verified)
        } else {
            Err(identity_rejected(format!(
                "client identities {uris:?} are outside trust domain {}",
                self.prefix
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// ztunnel's `IdentityVerifier`: chain validation without any DNS-name check, then an exact URI SAN match.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected: Vec<String>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let uris = uris_of(end_entity)?;
        if uris.iter().any(|uri| self.expected.contains(uri)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(identity_rejected(format!(
                "server identities {uris:?}, expected one of {:?}",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{KeyKind, TestCa};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An h2 client and server over an in-memory pipe; returns the client's end of one stream and the
    /// server's end of the same stream.
    async fn stream_pair() -> (H2Io, H2Io) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2_server_builder().handshake::<_, Bytes>(server_io).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Io::new(send, request.into_body())
        });
        let (client, conn) = h2_client_builder().handshake::<_, Bytes>(client_io).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let request = http::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, send) = client.send_request(request, false).unwrap();
        let server_end = server.await.unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        (H2Io::new(send, response.into_body()), server_end)
    }

    #[tokio::test]
    async fn bytes_flow_beyond_the_windows_and_half_close_is_eof() {
        let (mut client, mut server) = stream_pair().await;
        // More than the 16 MiB connection window, so flow-control capacity must be released as we read.
        let total = 20 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 100_000];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                client.write_all(&chunk[..n]).await.unwrap();
                sent += n;
            }
            client.shutdown().await.unwrap();
            // Half-closed: the other direction still works.
            let mut reply = String::new();
            client.read_to_string(&mut reply).await.unwrap();
            reply
        });
        let mut received = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(buf[..n].iter().all(|b| *b == 7));
            received += n;
        }
        assert_eq!(received, total);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), "done");
    }

    #[tokio::test]
    async fn reset_with_cancel_reads_as_eof_and_other_resets_as_errors() {
        let (mut client, mut server) = stream_pair().await;
        client.reset(Reason::CANCEL);
        let mut buf = [0u8; 8];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);

        let (mut client, mut server) = stream_pair().await;
        client.reset(Reason::INTERNAL_ERROR);
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (io::Result<Option<String>>, io::Result<Option<String>>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let tls = tokio_rustls::TlsAcceptor::from(server).accept(server_io).await?;
            let identity = peer_identity(tls.get_ref().1.peer_certificates());
            let mut tls = tls;
            // Drive the handshake to completion for the client (TLS 1.3 client auth ends with our read).
            let _ = tls.write_all(b"x").await;
            let _ = tls.flush().await;
            Ok(identity)
        });
        let client = async move {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(no_sni_server_name(), client_io)
                .await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            Ok(peer_identity(tls.get_ref().1.peer_certificates()))
        }
        .await;
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn mtls_checks_identities_both_ways() {
        let ca = TestCa::new("cluster.local");
        let server_leaf = ca.issue("ns1", "echo", KeyKind::EcdsaP256).unwrap();
        let client_leaf = ca.issue("ns2", "client", KeyKind::Rsa2048).unwrap();
        let server = server_tls_config(&server_leaf, ca.root_pem(), "cluster.local").unwrap();

        let good = client_tls_config(&client_leaf, ca.root_pem(), &server_leaf.spiffe_id).unwrap();
        let (client, server_side) = handshake(server.clone(), good).await;
        assert_eq!(client.unwrap().as_deref(), Some(server_leaf.spiffe_id.as_str()));
        assert_eq!(server_side.unwrap().as_deref(), Some(client_leaf.spiffe_id.as_str()));

        // Client expects another identity.
        let wrong_expectation =
            client_tls_config(&client_leaf, ca.root_pem(), "spiffe://cluster.local/ns/x/sa/y").unwrap();
        let (client, _) = handshake(server.clone(), wrong_expectation).await;
        assert!(client.is_err());

        // Client identity from a foreign trust domain, signed by the right root.
        let foreign = ca
            .issue_with_uris(&["spiffe://evil.org/ns/a/sa/b".to_string()], KeyKind::EcdsaP256)
            .unwrap();
        let foreign = client_tls_config(&foreign, ca.root_pem(), &server_leaf.spiffe_id).unwrap();
        let (_, server_side) = handshake(server.clone(), foreign).await;
        assert!(server_side.is_err());

        // Client signed by another root.
        let other_ca = TestCa::new("cluster.local");
        let stranger = other_ca.issue("ns2", "client", KeyKind::EcdsaP256).unwrap();
        let stranger = client_tls_config(&stranger, ca.root_pem(), &server_leaf.spiffe_id).unwrap();
        let (_, server_side) = handshake(server.clone(), stranger).await;
        assert!(server_side.is_err());

        // No client certificate at all.
        let anonymous = anonymous_client_tls_config(ca.root_pem(), &server_leaf.spiffe_id).unwrap();
        let (_, server_side) = handshake(server, anonymous).await;
        assert!(server_side.is_err());
    }
}
