//! Fixed test keys (generated once with openssl) and helpers to sign tokens and publish their JWKs.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

pub const RSA_PEM: &str = include_str!("testdata/rsa.pem");
pub const EC256_PEM: &str = include_str!("testdata/ec256.pem");
pub const EC384_PEM: &str = include_str!("testdata/ec384.pem");
pub const ED25519_PEM: &str = include_str!("testdata/ed25519.pem");

pub fn encoding_key(alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC256_PEM.as_bytes()).unwrap(),
        Algorithm::ES384 => EncodingKey::from_ec_pem(EC384_PEM.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED25519_PEM.as_bytes()).unwrap(),
        _ => EncodingKey::from_secret(b"secret"),
    }
}

/// The public JWK of the test key for `alg`, with `kid`. `pin_alg` keeps the JWK's `alg`.
pub fn jwk(alg: Algorithm, kid: &str, pin_alg: bool) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(&encoding_key(alg), alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    if !pin_alg {
        jwk.common.key_algorithm = None;
    }
    jwk
}

pub fn jwks(keys: Vec<Jwk>) -> JwkSet {
    JwkSet { keys }
}

pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &encoding_key(alg)).unwrap()
}
