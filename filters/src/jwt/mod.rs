//! Request authentication (Istio `RequestAuthentication`, Envoy `jwt_authn`): verify the JWTs a request carries
//! and hand the proven identity to authorization.
//!
//! Semantics, as Istio configures Envoy (`requires_any` of one provider per issuer, plus `allow_missing`):
//! - No token anywhere the rules look → the request passes unauthenticated; requiring a token is the business of
//!   an AuthorizationPolicy (`requestPrincipals`).
//! - Every token found must verify with the rule of its `iss` (among the rules that look at that location). A
//!   token from an issuer no rule names, a bad signature, an expired token … → 401 with Envoy's status text as
//!   the body and `www-authenticate: Bearer realm="<url>", error="invalid_token"`; a wrong audience → 403.
//! - On success the identity becomes a [`RequestAuth`] request extension (principal `iss/sub`, audiences,
//!   presenter `azp`, all claims); the rule's outputs (payload/claims to headers) are applied and, unless
//!   `forwardOriginalToken`, the header that carried the token is removed.
//!
//! Envoy sets no response flag for JWT failures (its access log shows `-`); our replies carry none either.

pub mod extract;
pub mod keys;
pub mod layer;
pub mod verify;

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request};
use serde_json::Value;

pub use extract::TokenLocation;
pub use jsonwebtoken;
pub use jsonwebtoken::jwk::JwkSet;
pub use keys::{JwksHandle, KeySet};
pub use layer::{JwtLayer, JwtService};
pub use verify::{CLOCK_SKEW_SECS, JwtFailure, MAX_TOKEN_BYTES};

/// One `jwtRules` entry, compiled.
#[derive(Debug, Clone)]
pub struct JwtRule {
    pub issuer: String,
    /// Accepted `aud` values; empty = any audience.
    pub audiences: Vec<String>,
    /// The issuer's keys (inline, or kept fresh by the waypoint's fetcher for `jwksUri`).
    pub jwks: Arc<JwksHandle>,
    pub from_headers: Vec<FromHeader>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    /// Header that receives the verified payload (base64url, as in the token).
    pub output_payload_to_header: Option<HeaderName>,
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    pub forward_original_token: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromHeader {
    pub name: HeaderName,
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToHeader {
    pub header: HeaderName,
    /// Claim name; dots select nested claims (`org.team`).
    pub claim: String,
}

impl JwtRule {
    /// A rule with Istio's defaults: any audience, token in `Authorization: Bearer` or `?access_token=`, token
    /// removed before forwarding, no outputs.
    pub fn new(issuer: impl Into<String>, jwks: Arc<JwksHandle>) -> JwtRule {
        JwtRule {
            issuer: issuer.into(),
            audiences: Vec::new(),
            jwks,
            from_headers: Vec::new(),
            from_params: Vec::new(),
            from_cookies: Vec::new(),
            output_payload_to_header: None,
            output_claim_to_headers: Vec::new(),
            forward_original_token: false,
        }
    }

    /// Where this rule looks for tokens (Envoy's defaults when the rule names none).
    pub fn locations(&self) -> Vec<TokenLocation> {
        if self.from_headers.is_empty() && self.from_params.is_empty() && self.from_cookies.is_empty() {
            return TokenLocation::defaults();
        }
        let headers = self.from_headers.iter().map(|h| TokenLocation::Header {
            name: h.name.clone(),
            prefix: h.prefix.clone(),
        });
        let params = self.from_params.iter().cloned().map(TokenLocation::Param);
        let cookies = self.from_cookies.iter().cloned().map(TokenLocation::Cookie);
        headers.chain(params).chain(cookies).collect()
    }
}

/// The identity a verified token proves; put in the request extensions for the authz layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestAuth {
    /// `iss/sub`, Istio's request principal.
    pub principal: String,
    pub issuer: String,
    pub subject: Option<String>,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// The whole payload (a JSON object).
    pub claims: Arc<Value>,
}

impl RequestAuth {
    /// A claim by path (`["org", "team"]`); `None` when any step is missing or not an object.
    pub fn claim(&self, path: &[impl AsRef<str>]) -> Option<&Value> {
        path.iter()
            .try_fold(self.claims.as_ref(), |v, key| v.as_object()?.get(key.as_ref()))
    }
}

/// All the JWT rules that apply to one service (every RequestAuthentication targeting it, merged).
#[derive(Debug, Clone)]
pub struct JwtPolicy {
    rules: Vec<JwtRule>,
    /// Each distinct location, with the rules (indices) that look there: a location shared by several rules is
    /// read once, and its token is checked by the rule of its issuer.
    locations: Vec<(TokenLocation, Vec<usize>)>,
}

/// What verifying a request produced.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub auth: RequestAuth,
    /// The rule that verified the first token (its outputs are applied).
    pub rule: usize,
    pub location: TokenLocation,
    /// The token's payload segment, for `outputPayloadToHeader`.
    pub payload_b64: String,
}

impl JwtPolicy {
    pub fn new(rules: Vec<JwtRule>) -> JwtPolicy {
        let mut locations: Vec<(TokenLocation, Vec<usize>)> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            for loc in rule.locations() {
                match locations.iter_mut().find(|(l, _)| *l == loc) {
                    Some((_, idx)) => idx.push(i),
                    None => locations.push((loc, vec![i])),
                }
            }
        }
        JwtPolicy { rules, locations }
    }

    pub fn rules(&self) -> &[JwtRule] {
        &self.rules
    }

    /// Verifies every token the request carries at `now` (seconds since the epoch). `Ok(None)`: no token.
    pub fn verify_request<B>(&self, req: &Request<B>, now: u64) -> Result<Option<Authenticated>, JwtFailure> {
        let mut first: Option<Authenticated> = None;
        for (location, rule_ids) in &self.locations {
            let Some(token) = location.extract(req) else {
                continue;
            };
            let parsed = verify::parse(token)?;
            let issuer = parsed.issuer()?.ok_or(JwtFailure::UnknownIssuer)?;
            let Some(&rule_id) = rule_ids.iter().find(|&&i| self.rules[i].issuer == issuer) else {
                return Err(JwtFailure::UnknownIssuer);
            };
            let auth = verify::verify(&parsed, &self.rules[rule_id], now)?;
            if first.is_none() {
                first = Some(Authenticated {
                    auth,
                    rule: rule_id,
                    location: location.clone(),
                    payload_b64: parsed.payload_b64.to_string(),
                });
            }
        }
        Ok(first)
    }

    /// Applies the verifying rule's outputs to the request: payload and claims to headers, and the token's header
    /// removed unless the rule forwards the original token.
    pub fn apply<B>(&self, req: &mut Request<B>, done: &Authenticated) {
        let Some(rule) = self.rules.get(done.rule) else {
            return;
        };
        if !rule.forward_original_token
            && let TokenLocation::Header { name, .. } = &done.location
        {
            req.headers_mut().remove(name);
        }
        if let Some(h) = &rule.output_payload_to_header
            && let Ok(v) = HeaderValue::from_str(&done.payload_b64)
        {
            req.headers_mut().insert(h.clone(), v);
        }
        for out in &rule.output_claim_to_headers {
            let path: Vec<&str> = out.claim.split('.').collect();
            let value = match done.auth.claim(&path) {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                _ => continue,
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                req.headers_mut().insert(out.header.clone(), v);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_keys;
#[cfg(test)]
mod tests;
