//! Verifying one compact JWS token against the rule of its issuer, with Envoy's `jwt_authn` semantics.
//!
//! Order of checks (as Envoy's authenticator): shape and size → header (`alg` must be one we accept, so `none`
//! and HMAC never get further) → payload JSON → issuer picks the rule → `exp`/`nbf` with the clock skew →
//! audiences → key lookup by kid/alg → signature. Time and audience come before the key lookup so an expired
//! token with an unknown kid does not make the fetcher refresh for nothing. Every failure maps to Envoy's status
//! text, which becomes the 401 body.

use std::sync::Arc;

use base64::Engine;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::Algorithm;
use serde_json::Value;

use super::keys::accepted_algorithm;
use super::{JwtRule, RequestAuth};

/// Tokens longer than this are refused before any decoding (Envoy has no fixed bound; real tokens are a few KiB,
/// and a bound keeps base64/JSON work per request small).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Envoy's default `clock_skew_seconds`.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// Base64url, with or without padding (some issuers pad).
const B64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a token was refused; the text is Envoy's (`jwt_verify_lib` status strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtFailure {
    TooLarge,
    BadFormat,
    HeaderBadBase64,
    HeaderBadJson,
    AlgNotAccepted,
    PayloadBadBase64,
    PayloadBadJson,
    IssNotString,
    SubNotString,
    AudNotStringOrList,
    ExpNotInteger,
    NbfNotInteger,
    SignatureBadBase64,
    UnknownIssuer,
    NoMatchingKey,
    VerificationFails,
    Expired,
    NotYetValid,
    AudienceNotAllowed,
}

impl JwtFailure {
    pub const fn text(self) -> &'static str {
        match self {
            JwtFailure::TooLarge => "Jwt is too large",
            JwtFailure::BadFormat => "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            JwtFailure::HeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
            JwtFailure::HeaderBadJson => "Jwt header is an invalid JSON",
            JwtFailure::AlgNotAccepted => "Jwt header [alg] is not supported",
            JwtFailure::PayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
            JwtFailure::PayloadBadJson => "Jwt payload is an invalid JSON",
            JwtFailure::IssNotString => "Jwt payload [iss] field is not a string",
            JwtFailure::SubNotString => "Jwt payload [sub] field is not a string",
            JwtFailure::AudNotStringOrList => "Jwt payload [aud] field is not a string or string list",
            JwtFailure::ExpNotInteger => "Jwt payload [exp] field is not an integer",
            JwtFailure::NbfNotInteger => "Jwt payload [nbf] field is not an integer",
            JwtFailure::SignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
            JwtFailure::UnknownIssuer => "Jwt issuer is not configured",
            JwtFailure::NoMatchingKey => "Jwks doesn't have key to match kid or alg from Jwt",
            JwtFailure::VerificationFails => "Jwt verification fails",
            JwtFailure::Expired => "Jwt is expired",
            JwtFailure::NotYetValid => "Jwt not yet valid",
            JwtFailure::AudienceNotAllowed => "Audiences in Jwt are not allowed",
        }
    }

    /// Envoy answers 403 for a wrong audience (the token is genuine, just not for us) and 401 otherwise.
    pub fn status(self) -> http::StatusCode {
        match self {
            JwtFailure::AudienceNotAllowed => http::StatusCode::FORBIDDEN,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

impl std::fmt::Display for JwtFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

impl std::error::Error for JwtFailure {}

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub struct ParsedToken<'t> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub claims: Value,
    /// `header.payload`: the signed message.
    pub message: &'t str,
    pub payload_b64: &'t str,
    pub signature_b64: &'t str,
}

impl ParsedToken<'_> {
    /// The `iss` claim; a token without one matches no rule.
    pub fn issuer(&self) -> Result<Option<&str>, JwtFailure> {
        match self.claims.get("iss") {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(JwtFailure::IssNotString),
        }
    }
}

/// Splits and decodes a token. Never panics on any input (fuzzed).
pub fn parse(token: &str) -> Result<ParsedToken<'_>, JwtFailure> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtFailure::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtFailure::BadFormat);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(JwtFailure::BadFormat);
    }
    let header_json = B64.decode(header).map_err(|_| JwtFailure::HeaderBadBase64)?;
    let header_value: Value = serde_json::from_slice(&header_json).map_err(|_| JwtFailure::HeaderBadJson)?;
    let Value::Object(header_map) = header_value else {
        return Err(JwtFailure::HeaderBadJson);
    };
    let alg = header_map
        .get("alg")
        .and_then(Value::as_str)
        .and_then(accepted_algorithm)
        .ok_or(JwtFailure::AlgNotAccepted)?;
    let kid = match header_map.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(JwtFailure::HeaderBadJson),
    };
    let payload_json = B64.decode(payload).map_err(|_| JwtFailure::PayloadBadBase64)?;
    let claims: Value = serde_json::from_slice(&payload_json).map_err(|_| JwtFailure::PayloadBadJson)?;
    if !claims.is_object() {
        return Err(JwtFailure::PayloadBadJson);
    }
    if signature.is_empty() || B64.decode(signature).is_err() {
        return Err(JwtFailure::SignatureBadBase64);
    }
    Ok(ParsedToken {
        alg,
        kid,
        claims,
        message: &token[..header.len() + 1 + payload.len()],
        payload_b64: payload,
        signature_b64: signature,
    })
}

/// A NumericDate claim: an integer (a float is accepted and truncated, as many issuers write `1.7e9`-style
/// values); absent is fine (no constraint), anything else is malformed.
fn numeric_date(claims: &Value, name: &str, err: JwtFailure) -> Result<Option<u64>, JwtFailure> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite() && *f >= 0.0) {
                Ok(Some(f as u64))
            } else {
                Err(err)
            }
        }
        Some(_) => Err(err),
    }
}

fn audiences(claims: &Value) -> Result<Vec<String>, JwtFailure> {
    match claims.get("aud") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or(JwtFailure::AudNotStringOrList))
            .collect(),
        Some(_) => Err(JwtFailure::AudNotStringOrList),
    }
}

/// Checks a parsed token against its issuer's rule at time `now` (seconds since the epoch) and returns the
/// identity it proves.
pub fn verify(token: &ParsedToken<'_>, rule: &JwtRule, now: u64) -> Result<RequestAuth, JwtFailure> {
    let issuer = token.issuer()?.ok_or(JwtFailure::UnknownIssuer)?;
    if issuer != rule.issuer {
        return Err(JwtFailure::UnknownIssuer);
    }
    let subject = match token.claims.get("sub") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(JwtFailure::SubNotString),
    };
    let exp = numeric_date(&token.claims, "exp", JwtFailure::ExpNotInteger)?;
    let nbf = numeric_date(&token.claims, "nbf", JwtFailure::NbfNotInteger)?;
    if let Some(nbf) = nbf
        && now.saturating_add(CLOCK_SKEW_SECS) < nbf
    {
        return Err(JwtFailure::NotYetValid);
    }
    if let Some(exp) = exp
        && now > exp.saturating_add(CLOCK_SKEW_SECS)
    {
        return Err(JwtFailure::Expired);
    }
    let auds = audiences(&token.claims)?;
    if !rule.audiences.is_empty() && !auds.iter().any(|a| rule.audiences.contains(a)) {
        return Err(JwtFailure::AudienceNotAllowed);
    }

    let keys = rule.jwks.load();
    let mut tried = false;
    for key in keys.candidates(token.kid.as_deref(), token.alg) {
        tried = true;
        if let Ok(true) =
            jsonwebtoken::crypto::verify(token.signature_b64, token.message.as_bytes(), &key.key, token.alg)
        {
            let presenter = token.claims.get("azp").and_then(Value::as_str).map(str::to_string);
            return Ok(RequestAuth {
                principal: format!("{issuer}/{}", subject.as_deref().unwrap_or_default()),
                issuer: issuer.to_string(),
                subject,
                audiences: auds,
                presenter,
                claims: Arc::new(token.claims.clone()),
            });
        }
    }
    if !tried {
        // A kid the set lacks may be a rotation the fetcher has not seen yet (or the first fetch is pending).
        if keys.is_empty() || token.kid.as_deref().is_some_and(|kid| !keys.has_kid(kid)) {
            rule.jwks.request_refresh();
        }
        return Err(JwtFailure::NoMatchingKey);
    }
    Err(JwtFailure::VerificationFails)
}
