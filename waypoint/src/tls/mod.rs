//! Workload TLS for HBONE: the waypoint's own certificate, the mesh roots, and the two verifiers Istio uses.
//!
//! * Inbound (from ztunnel): client certificate required, chain verified against the roots, and at least one
//!   URI SAN must be a SPIFFE ID in our trust domain (ztunnel's `TrustDomainVerifier`). Which service account
//!   may call is authorization's business, not the handshake's.
//! * Outbound (to a destination ztunnel): chain verified against the roots with *no* hostname check, then a URI
//!   SAN must equal the endpoint's identity exactly (ztunnel's `IdentityVerifier`). No SNI is sent.
//!
//! TLS 1.3 only with AES-GCM suites, ALPN `h2`, one crypto provider (aws-lc-rs).

pub mod reload;

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::TlsPaths;
use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} file {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("building TLS config: {0}")]
    Build(String),
}

/// Why a peer certificate was refused; carried inside rustls' error so the log says exactly what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("no URI SAN of the peer certificate is a SPIFFE ID in trust domain {trust_domain:?} (SANs: {sans:?})")]
    ForeignTrustDomain { trust_domain: String, sans: Vec<String> },
    #[error("server identity mismatch: expected {expected}, certificate has {sans:?}")]
    IdentityMismatch { expected: String, sans: Vec<String> },
    #[error("unparsable certificate: {0}")]
    Unparsable(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    let mut p = aws_lc_rs::default_provider();
    // ztunnel offers exactly these two; AES-128 first because it is the cheaper of the two for bulk data.
    p.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// The waypoint's certificate chain, key and the roots it trusts, as loaded from PEM.
pub struct Material {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    /// The SPIFFE ID in our own leaf, when it has one.
    pub identity: Option<SpiffeId>,
}

impl Material {
    pub fn load(paths: &TlsPaths) -> Result<Material, TlsError> {
        let chain = read_certs("certificate", &paths.cert_file)?;
        let key_pem = read_file("key", &paths.key_file)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
            what: "key",
            path: paths.key_file.display().to_string(),
            reason: format!("no usable PEM private key (PKCS#8, SEC1 or PKCS#1): {e}"),
        })?;
        let roots_der = read_certs("roots", &paths.roots_file)?;
        let mut roots = RootCertStore::empty();
        for (i, c) in roots_der.into_iter().enumerate() {
            roots.add(c).map_err(|e| TlsError::Invalid {
                what: "roots",
                path: paths.roots_file.display().to_string(),
                reason: format!("certificate {i} is not a usable trust anchor: {e}"),
            })?;
        }
        let identity = chain
            .first()
            .and_then(|leaf| san_uris(leaf).ok()?.iter().find_map(|u| u.parse::<SpiffeId>().ok()));
        let provider = provider();
        // Fail at load time, not at the first handshake, if the key does not fit the provider.
        provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::Invalid {
                what: "key",
                path: paths.key_file.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Material {
            chain,
            key,
            roots: Arc::new(roots),
            identity,
        })
    }

    /// Inbound HBONE server config.
    pub fn server_config(&self, trust_domain: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Build(e.to_string()))?;
        let verifier = Arc::new(TrustDomainVerifier {
            inner,
            trust_domain: trust_domain.to_string(),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Build(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Build(e.to_string()))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Outbound HBONE client config that accepts only a server presenting `expected`.
    pub fn client_config(&self, expected: &SpiffeId) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = provider();
        let verifier = Arc::new(IdentityVerifier {
            roots: self.roots.clone(),
            expected: expected.to_string(),
            provider: provider.clone(),
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Build(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Build(e.to_string()))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg.enable_sni = false;
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

pub fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| TlsError::Invalid {
        what,
        path: path.display().to_string(),
        reason: format!("bad PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            what,
            path: path.display().to_string(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// All URI SANs of a certificate.
pub fn san_uris(cert: &CertificateDer<'_>) -> Result<Vec<String>, PeerIdentityError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| PeerIdentityError::Unparsable(e.to_string()))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                out.push((*u).to_string());
            }
        }
    }
    Ok(out)
}

/// The peer's SPIFFE identity: the first URI SAN that parses as one in `trust_domain`.
pub fn peer_identity(leaf: &CertificateDer<'_>, trust_domain: &str) -> Option<SpiffeId> {
    san_uris(leaf)
        .ok()?
        .iter()
        .filter_map(|u| u.parse::<SpiffeId>().ok())
        .find(|id| id.trust_domain() == trust_domain)
}

fn other(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let sans = san_uris(end_entity).map_err(other)?;
        let ok = sans
            .iter()
            .filter_map(|u| u.parse::<SpiffeId>().ok())
            .any(|id| id.trust_domain() == self.trust_domain);
        if !ok {
            return Err(other(PeerIdentityError::ForeignTrustDomain {
                trust_domain: self.trust_domain.clone(),
                sans,
            }));
        }
        Ok(ClientCertVerified::assertion())
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

#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for IdentityVerifier {
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
            self.provider.signature_verification_algorithms.all,
        )?;
        let sans = san_uris(end_entity).map_err(other)?;
        if !sans.contains(&self.expected) {
            return Err(other(PeerIdentityError::IdentityMismatch {
                expected: self.expected.clone(),
                sans,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
