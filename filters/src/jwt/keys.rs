//! The verification keys of one JWT issuer, shared between the config snapshots and the waypoint's JWKS fetcher.
//!
//! A JWKS is compiled once into [`KeySet`] (decoding keys with their kid, algorithm and curve), so a request pays
//! one atomic load and a short scan, never JSON or base64 work. [`JwksHandle`] is what a [`super::JwtRule`]
//! holds: the fetcher swaps a new set in (`store`) and waits on [`JwksHandle::refresh_requested`], which the
//! verifier signals when a token names a `kid` the set does not have (the issuer may have rotated its keys).
//! Keys that cannot verify any accepted algorithm (HMAC secrets, unknown `kty`, curves we do not verify) are
//! dropped at compile time, so an `oct` key in a JWKS can never be used to accept an `HS256` token.

use std::sync::Arc;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Notify;

/// What a key can verify: the family decides which `alg` values may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    pub fn accepts(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (
                KeyKind::Rsa,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyKind::EcP256, Algorithm::ES256)
                | (KeyKind::EcP384, Algorithm::ES384)
                | (KeyKind::Ed25519, Algorithm::EdDSA)
        )
    }
}

/// One usable public key.
#[derive(Clone)]
pub struct CompiledKey {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    pub kind: KeyKind,
    pub key: DecodingKey,
}

impl std::fmt::Debug for CompiledKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish()
    }
}

/// The compiled keys of one JWKS.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<CompiledKey>,
}

impl KeySet {
    /// Compiles the keys we can use; the others are skipped (they could never verify an accepted token).
    pub fn compile(set: &JwkSet) -> KeySet {
        KeySet {
            keys: set.keys.iter().filter_map(compile_key).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether some key carries this `kid` (a kid-less key does not count: it says nothing about rotation).
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// The keys Envoy would try for a token: same kid (kid-less keys match any token), a JWK `alg` equal to the
    /// token's when the JWK pins one, and a key type able to verify that algorithm.
    pub fn candidates<'a>(&'a self, kid: Option<&'a str>, alg: Algorithm) -> impl Iterator<Item = &'a CompiledKey> {
        self.keys.iter().filter(move |k| {
            let kid_ok = match (kid, k.kid.as_deref()) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            };
            kid_ok && k.alg.is_none_or(|a| a == alg) && k.kind.accepts(alg)
        })
    }
}

fn compile_key(jwk: &Jwk) -> Option<CompiledKey> {
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(accepted_key_algorithm(a)?),
    };
    let (kind, key) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => (KeyKind::Rsa, DecodingKey::from_rsa_components(&p.n, &p.e).ok()?),
        AlgorithmParameters::EllipticCurve(p) => {
            let kind = match p.curve {
                EllipticCurve::P256 => KeyKind::EcP256,
                EllipticCurve::P384 => KeyKind::EcP384,
                _ => return None,
            };
            (kind, DecodingKey::from_ec_components(&p.x, &p.y).ok()?)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (KeyKind::Ed25519, DecodingKey::from_ed_components(&p.x).ok()?)
        }
        // HMAC secrets (`oct`) and anything else: never used, so HS* and exotic algorithms cannot verify.
        _ => return None,
    };
    if alg.is_some_and(|a| !kind.accepts(a)) {
        return None;
    }
    Some(CompiledKey {
        kid: jwk.common.key_id.clone(),
        alg,
        kind,
        key,
    })
}

/// The signature algorithms a token may use (`none` and HMAC are refused: a shared secret in a JWKS is a
/// misconfiguration, and `none` is no signature at all).
pub fn accepted_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

fn accepted_key_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The current keys of one issuer, swapped atomically by whoever owns the source (inline config or fetcher).
pub struct JwksHandle {
    keys: ArcSwap<KeySet>,
    refresh: Arc<Notify>,
    /// Bumped by every `store`: a request held for a rotation waits on it.
    stored: tokio::sync::watch::Sender<u64>,
    /// Where the keys come from (`jwksUri`), `None` for inline keys: only remote sets can be refreshed.
    uri: Option<String>,
}

impl std::fmt::Debug for JwksHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksHandle")
            .field("uri", &self.uri)
            .field("keys", &self.keys.load().len())
            .finish()
    }
}

impl JwksHandle {
    /// Keys given inline (`jwks`): never refreshed.
    pub fn inline(set: &JwkSet) -> JwksHandle {
        JwksHandle {
            keys: ArcSwap::from_pointee(KeySet::compile(set)),
            refresh: Arc::new(Notify::new()),
            stored: tokio::sync::watch::Sender::new(0),
            uri: None,
        }
    }

    /// Keys fetched from `uri`: empty until the fetcher stores the first set.
    pub fn remote(uri: impl Into<String>) -> JwksHandle {
        JwksHandle {
            keys: ArcSwap::from_pointee(KeySet::default()),
            refresh: Arc::new(Notify::new()),
            stored: tokio::sync::watch::Sender::new(0),
            uri: Some(uri.into()),
        }
    }

    pub fn uri(&self) -> Option<&str> {
        self.uri.as_deref()
    }

    pub fn load(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Replaces the keys; returns how many were usable.
    pub fn store(&self, set: &JwkSet) -> usize {
        let compiled = KeySet::compile(set);
        let n = compiled.len();
        self.keys.store(Arc::new(compiled));
        self.stored.send_modify(|g| *g += 1);
        n
    }

    /// How many sets have been stored so far.
    pub fn generation(&self) -> u64 {
        *self.stored.borrow()
    }

    /// Resolves once a set newer than `seen` has been stored (immediately if one already has).
    pub async fn stored_after(&self, seen: u64) {
        let mut rx = self.stored.subscribe();
        let _ = rx.wait_for(|g| *g > seen).await;
    }

    /// Called by the verifier when a token names a kid the set lacks. Coalesces: one stored permit however
    /// many requests ask, so a burst of unknown-kid tokens costs one fetch (the fetcher also rate-limits).
    pub fn request_refresh(&self) {
        if self.uri.is_some() {
            self.refresh.notify_one();
        }
    }

    /// Resolves when a refresh was requested since the last time this returned.
    pub async fn refresh_requested(&self) {
        self.refresh.notified().await
    }

    /// The refresh signal on its own, so a fetcher can wait for it without keeping the handle alive.
    pub fn refresh_signal(&self) -> Arc<Notify> {
        self.refresh.clone()
    }
}
