//! A throw-away PKI shaped like Istio's: one self-signed root per mesh and leaf certificates whose only
//! identity is a SPIFFE URI SAN (empty subject, SAN critical), usable for both TLS client and server auth.
//!
//! Leaves can be ECDSA P-256 (what ztunnel requests) or RSA 2048 (istio-agent's default), because a waypoint
//! must accept both. Keys are PKCS#8 PEM so every consumer (rustls, Envoy, the waypoint) can read them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("PEM: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("x509 parse: {0}")]
    X509(String),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Key algorithm of an issued leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyKind {
    #[default]
    EcdsaP256,
    Rsa2048,
}

/// An issued workload certificate.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The leaf certificate alone.
    pub cert_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// What a workload presents: the leaf (the test CA has no intermediates, so this equals `cert_pem`).
    pub chain_pem: String,
    /// The first URI SAN (empty if the leaf was issued without any).
    pub spiffe_id: String,
    pub kind: KeyKind,
}

/// A self-signed mesh root (ECDSA P-256) that issues SPIFFE leaves for one trust domain.
pub struct TestCa {
    trust_domain: String,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

impl TestCa {
    /// A fresh root. Panics only if the crypto provider cannot generate a P-256 key, which is an
    /// environment failure no test can recover from.
    pub fn new(trust_domain: &str) -> TestCa {
        match Self::try_new(trust_domain) {
            Ok(ca) => ca,
            Err(e) => panic!("cannot create the test CA: {e}"),
        }
    }

    pub fn try_new(trust_domain: &str) -> Result<TestCa, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "waypoint-conformance test root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, HOUR, 3650 * 24 * HOUR);
        let root = params.self_signed(&key)?;
        Ok(TestCa {
            trust_domain: trust_domain.to_string(),
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn root_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        Ok(CertificateDer::from_pem_slice(self.root_pem.as_bytes())?)
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!("spiffe://{}/ns/{namespace}/sa/{service_account}", self.trust_domain)
    }

    /// An Istio-like workload leaf for `namespace`/`service_account`.
    pub fn issue(&self, namespace: &str, service_account: &str, kind: KeyKind) -> Result<Leaf, PkiError> {
        self.issue_with_uris(&[self.spiffe_id(namespace, service_account)], kind)
    }

    /// A leaf carrying exactly `uris` as URI SANs (none, several, a foreign trust domain ...).
    pub fn issue_with_uris(&self, uris: &[String], kind: KeyKind) -> Result<Leaf, PkiError> {
        let key = generate_key(kind)?;
        let params = leaf_params(uris)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_pem = cert.pem();
        Ok(Leaf {
            chain_pem: cert_pem.clone(),
            cert_pem,
            key_pem: key.serialize_pem(),
            spiffe_id: uris.first().cloned().unwrap_or_default(),
            kind,
        })
    }

    /// Writes the root as PEM to `dir/name` and returns the path.
    pub fn write_root(&self, dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
        write_file(&dir.join(name), &self.root_pem)
    }
}

impl Leaf {
    /// Writes `<name>.pem` (the chain) and `<name>-key.pem` into `dir`; returns (cert path, key path).
    pub fn write_to(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert = write_file(&dir.join(format!("{name}.pem")), &self.chain_pem)?;
        let key = write_file(&dir.join(format!("{name}-key.pem")), &self.key_pem)?;
        Ok((cert, key))
    }

    pub fn chain_der(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        let certs = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        Ok(certs)
    }

    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        Ok(PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())?)
    }
}

/// Every URI SAN of a DER certificate, in order.
pub fn uri_sans(cert_der: &[u8]) -> Result<Vec<String>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::X509(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::X509(e.to_string()))?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

fn leaf_params(uris: &[String]) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    // Istio leaves carry no subject: the SPIFFE URI is the identity (rcgen then marks the SAN critical).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|uri| Ok(SanType::URI(uri.as_str().try_into()?)))
        .collect::<Result<Vec<_>, rcgen::Error>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()));
    set_validity(&mut params, HOUR, 24 * HOUR);
    Ok(params)
}

fn generate_key(kind: KeyKind) -> Result<KeyPair, PkiError> {
    Ok(match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyKind::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?,
    })
}

fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    fastrand::fill(&mut serial);
    // Positive and without a leading zero byte, so the DER INTEGER keeps all 16 bytes.
    serial[0] = (serial[0] & 0x7f) | 0x01;
    serial
}

/// Valid from `now - before` to `now + after`. Computed from rcgen's own date type so that we need not
/// depend on the `time` crate.
fn set_validity(params: &mut CertificateParams, before: Duration, after: Duration) {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - before;
    params.not_after = now + after;
}

fn write_file(path: &Path, contents: &str) -> Result<PathBuf, PkiError> {
    fs::write(path, contents).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_leaf(ca: &TestCa, leaf: &Leaf, expected_uri: &str) {
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        assert_eq!(uri_sans(&der).unwrap(), vec![expected_uri.to_string()]);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(cert.validity().is_valid());
        // Chains to the root: rustls' own verifier is the judge.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root_der().unwrap()).unwrap();
        let parsed = rustls::server::ParsedCertificate::try_from(&der).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls_pki_types::UnixTime::now(),
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .unwrap();
        leaf.key_der().unwrap();
    }

    #[test]
    fn issues_ecdsa_and_rsa_leaves_with_spiffe_san() {
        let ca = TestCa::new("cluster.local");
        let ec = ca.issue("ns1", "echo", KeyKind::EcdsaP256).unwrap();
        assert_eq!(ec.spiffe_id, "spiffe://cluster.local/ns/ns1/sa/echo");
        check_leaf(&ca, &ec, "spiffe://cluster.local/ns/ns1/sa/echo");
        assert!(ec.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));

        let rsa = ca.issue("ns2", "client", KeyKind::Rsa2048).unwrap();
        check_leaf(&ca, &rsa, "spiffe://cluster.local/ns/ns2/sa/client");
        assert!(rsa.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn issues_odd_san_sets_and_writes_files() {
        let ca = TestCa::new("cluster.local");
        let uris = vec![
            "spiffe://other.domain/ns/a/sa/b".to_string(),
            "spiffe://cluster.local/ns/x/sa/y".to_string(),
        ];
        let leaf = ca.issue_with_uris(&uris, KeyKind::EcdsaP256).unwrap();
        let der = leaf.chain_der().unwrap();
        assert_eq!(uri_sans(&der[0]).unwrap(), uris);

        let none = ca.issue_with_uris(&[], KeyKind::EcdsaP256).unwrap();
        assert!(none.spiffe_id.is_empty());
        assert!(uri_sans(&none.chain_der().unwrap()[0]).unwrap().is_empty());

        let dir = std::env::temp_dir().join(format!("pki-test-{}", fastrand::u64(..)));
        fs::create_dir_all(&dir).unwrap();
        let (cert, key) = leaf.write_to(&dir, "waypoint").unwrap();
        assert_eq!(cert.file_name().unwrap(), "waypoint.pem");
        assert_eq!(key.file_name().unwrap(), "waypoint-key.pem");
        assert_eq!(fs::read_to_string(&key).unwrap(), leaf.key_pem);
        ca.write_root(&dir, "root.pem").unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
