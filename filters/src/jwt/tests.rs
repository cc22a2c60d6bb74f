use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderName, Request, StatusCode};
use jsonwebtoken::Algorithm;
use serde_json::json;
use tower::{Layer, ServiceExt};

use super::test_keys::{jwk, jwks, sign};
use super::*;
use crate::reply::{empty_body, full_body};
use crate::test_support::body_bytes;

const ISS: &str = "https://issuer.example";
const NOW: u64 = 1_800_000_000;

fn rule_with(alg: Algorithm) -> JwtRule {
    let handle = Arc::new(JwksHandle::inline(&jwks(vec![jwk(alg, "k1", true)])));
    JwtRule::new(ISS, handle)
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"iss": ISS, "sub": sub, "aud": ["svc"], "exp": NOW + 3600, "azp": "web", "groups": ["a", "b"], "org": {"team": "pay"}})
}

fn bearer(token: &str) -> Request<()> {
    Request::builder()
        .uri("/p?x=1")
        .header("host", "svc.ns")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
}

fn check(policy: &JwtPolicy, token: &str) -> Result<Option<Authenticated>, JwtFailure> {
    policy.verify_request(&bearer(token), NOW)
}

#[test]
fn every_algorithm_family_verifies() {
    for alg in [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ] {
        let policy = JwtPolicy::new(vec![rule_with(alg)]);
        let token = sign(alg, Some("k1"), &claims("alice"));
        let done = check(&policy, &token)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"))
            .unwrap();
        assert_eq!(done.auth.principal, format!("{ISS}/alice"), "{alg:?}");
        assert_eq!(done.auth.audiences, vec!["svc".to_string()]);
        assert_eq!(done.auth.presenter.as_deref(), Some("web"));
        assert_eq!(done.auth.claim(&["org", "team"]), Some(&json!("pay")));
    }
}

#[test]
fn key_of_other_family_or_pinned_alg_does_not_verify() {
    // RSA key published for RS256 only: a PS256 token with the same key is refused (alg pinned by the JWK).
    let policy = JwtPolicy::new(vec![rule_with(Algorithm::RS256)]);
    let token = sign(Algorithm::PS256, Some("k1"), &claims("alice"));
    assert_eq!(check(&policy, &token).unwrap_err(), JwtFailure::NoMatchingKey);
    // An EC token against an RSA JWKS.
    let token = sign(Algorithm::ES256, Some("k1"), &claims("alice"));
    assert_eq!(check(&policy, &token).unwrap_err(), JwtFailure::NoMatchingKey);
    // Without a pinned alg the RSA key serves RS and PS alike.
    let handle = Arc::new(JwksHandle::inline(&jwks(vec![jwk(Algorithm::RS256, "k1", false)])));
    let policy = JwtPolicy::new(vec![JwtRule::new(ISS, handle)]);
    let token = sign(Algorithm::PS384, Some("k1"), &claims("alice"));
    assert!(check(&policy, &token).unwrap().is_some());
}

#[test]
fn token_without_kid_tries_every_key() {
    let set = jwks(vec![
        jwk(Algorithm::ES256, "other", true),
        jwk(Algorithm::RS256, "k1", true),
    ]);
    let policy = JwtPolicy::new(vec![JwtRule::new(ISS, Arc::new(JwksHandle::inline(&set)))]);
    let token = sign(Algorithm::RS256, None, &claims("alice"));
    assert!(check(&policy, &token).unwrap().is_some());
}

#[test]
fn time_constraints_use_60s_skew() {
    let policy = JwtPolicy::new(vec![rule_with(Algorithm::ES256)]);
    let t = |c: serde_json::Value| check(&policy, &sign(Algorithm::ES256, Some("k1"), &c));
    assert!(t(json!({"iss": ISS, "sub": "a", "exp": NOW - 30})).is_ok());
    assert_eq!(
        t(json!({"iss": ISS, "sub": "a", "exp": NOW - 61})).unwrap_err(),
        JwtFailure::Expired
    );
    assert!(t(json!({"iss": ISS, "sub": "a", "nbf": NOW + 30})).is_ok());
    assert_eq!(
        t(json!({"iss": ISS, "sub": "a", "nbf": NOW + 61})).unwrap_err(),
        JwtFailure::NotYetValid
    );
    assert_eq!(
        t(json!({"iss": ISS, "sub": "a", "exp": "soon"})).unwrap_err(),
        JwtFailure::ExpNotInteger
    );
    // No exp: the token does not expire (Envoy).
    assert!(t(json!({"iss": ISS, "sub": "a"})).is_ok());
}

#[test]
fn audiences_issuer_and_subject() {
    let mut rule = rule_with(Algorithm::ES256);
    rule.audiences = vec!["svc".into(), "other".into()];
    let policy = JwtPolicy::new(vec![rule]);
    let t = |c: serde_json::Value| check(&policy, &sign(Algorithm::ES256, Some("k1"), &c));
    assert!(t(json!({"iss": ISS, "sub": "a", "aud": "other"})).is_ok());
    let err = t(json!({"iss": ISS, "sub": "a", "aud": ["x"]})).unwrap_err();
    assert_eq!(err, JwtFailure::AudienceNotAllowed);
    assert_eq!(err.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        t(json!({"iss": ISS, "sub": "a"})).unwrap_err(),
        JwtFailure::AudienceNotAllowed
    );
    assert_eq!(
        t(json!({"iss": "https://evil", "sub": "a", "aud": "svc"})).unwrap_err(),
        JwtFailure::UnknownIssuer
    );
    assert_eq!(
        t(json!({"sub": "a", "aud": "svc"})).unwrap_err(),
        JwtFailure::UnknownIssuer
    );
    assert_eq!(
        t(json!({"iss": ISS, "sub": 5, "aud": "svc"})).unwrap_err(),
        JwtFailure::SubNotString
    );
}

#[test]
fn several_rules_token_checked_by_its_issuer() {
    let a = rule_with(Algorithm::RS256);
    let mut b = JwtRule::new(
        "https://b.example",
        Arc::new(JwksHandle::inline(&jwks(vec![jwk(Algorithm::ES256, "kb", true)]))),
    );
    b.audiences = vec!["b".into()];
    let policy = JwtPolicy::new(vec![a, b]);
    let tok_b = sign(
        Algorithm::ES256,
        Some("kb"),
        &json!({"iss": "https://b.example", "sub": "bob", "aud": "b"}),
    );
    assert_eq!(
        check(&policy, &tok_b).unwrap().unwrap().auth.principal,
        "https://b.example/bob"
    );
    // Signed by b's key but claiming a's issuer: checked with a's keys and refused.
    let forged = sign(Algorithm::ES256, Some("kb"), &json!({"iss": ISS, "sub": "bob"}));
    assert_eq!(check(&policy, &forged).unwrap_err(), JwtFailure::NoMatchingKey);
}

#[test]
fn malformed_none_hmac_oversized_and_unknown_kid_refused() {
    let policy = JwtPolicy::new(vec![rule_with(Algorithm::RS256)]);
    let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let payload = b64(claims("alice"));
    let none = format!("{}.{payload}.", b64(json!({"alg": "none"})));
    assert_eq!(check(&policy, &none).unwrap_err(), JwtFailure::AlgNotAccepted);
    let none_sig = format!("{}.{payload}.c2ln", b64(json!({"alg": "none"})));
    assert_eq!(check(&policy, &none_sig).unwrap_err(), JwtFailure::AlgNotAccepted);
    let hs = sign(Algorithm::HS256, Some("k1"), &claims("alice"));
    assert_eq!(check(&policy, &hs).unwrap_err(), JwtFailure::AlgNotAccepted);
    assert_eq!(check(&policy, "abc").unwrap_err(), JwtFailure::BadFormat);
    assert_eq!(check(&policy, "a.b.c.d").unwrap_err(), JwtFailure::BadFormat);
    assert_eq!(check(&policy, "!!!.e30.c2ln").unwrap_err(), JwtFailure::HeaderBadBase64);
    assert_eq!(check(&policy, "e30.e30.c2ln").unwrap_err(), JwtFailure::AlgNotAccepted);
    let hdr = b64(json!({"alg": "RS256"}));
    assert_eq!(
        check(&policy, &format!("{hdr}.bm90anNvbg.c2ln")).unwrap_err(),
        JwtFailure::PayloadBadJson
    );
    assert_eq!(
        check(&policy, &format!("{hdr}.{}.c2ln", b64(json!([1])))).unwrap_err(),
        JwtFailure::PayloadBadJson
    );
    assert_eq!(
        check(&policy, &format!("{hdr}.{payload}.***")).unwrap_err(),
        JwtFailure::SignatureBadBase64
    );
    let big = format!("{hdr}.{}.c2ln", "A".repeat(MAX_TOKEN_BYTES));
    assert_eq!(check(&policy, &big).unwrap_err(), JwtFailure::TooLarge);
    let unknown = sign(Algorithm::RS256, Some("rotated"), &claims("alice"));
    assert_eq!(check(&policy, &unknown).unwrap_err(), JwtFailure::NoMatchingKey);
    // A valid token with one flipped signature byte.
    let good = sign(Algorithm::RS256, Some("k1"), &claims("alice"));
    let (msg, sig) = good.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[10] ^= 1;
    let bad = format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(check(&policy, &bad).unwrap_err(), JwtFailure::VerificationFails);
    // Random garbage never panics.
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..2000 {
        let len = rng.usize(0..200);
        let s: String = (0..len)
            .map(|_| {
                rng.choice(b"eyJhbGciOi.-_=AZaz09{}\"".iter())
                    .map_or('x', |b| *b as char)
            })
            .collect();
        let _ = check(&policy, &s);
        let _ = check(&policy, &format!("{hdr}.{s}"));
    }
}

#[tokio::test]
async fn unknown_kid_requests_refresh_of_remote_keys() {
    let handle = Arc::new(JwksHandle::remote("http://127.0.0.1:1/jwks"));
    let policy = JwtPolicy::new(vec![JwtRule::new(ISS, handle.clone())]);
    let token = sign(Algorithm::RS256, Some("k9"), &claims("alice"));
    assert_eq!(check(&policy, &token).unwrap_err(), JwtFailure::NoMatchingKey);
    // The permit is stored: the fetcher sees it even though it was not waiting yet.
    tokio::time::timeout(std::time::Duration::from_secs(1), handle.refresh_requested())
        .await
        .unwrap();
    handle.store(&jwks(vec![jwk(Algorithm::RS256, "k9", true)]));
    assert!(check(&policy, &token).unwrap().is_some());
}

#[test]
fn locations_headers_params_cookies() {
    let mut rule = rule_with(Algorithm::ES256);
    rule.from_headers = vec![FromHeader {
        name: HeaderName::from_static("x-jwt"),
        prefix: String::new(),
    }];
    rule.from_params = vec!["tok".into()];
    rule.from_cookies = vec!["session".into()];
    let policy = JwtPolicy::new(vec![rule]);
    let token = sign(Algorithm::ES256, Some("k1"), &claims("alice"));
    for req in [
        Request::builder()
            .uri("/")
            .header("x-jwt", token.as_str())
            .body(())
            .unwrap(),
        Request::builder().uri(format!("/?tok={token}")).body(()).unwrap(),
        Request::builder()
            .uri("/")
            .header("cookie", format!("a=b; session={token}"))
            .body(())
            .unwrap(),
    ] {
        assert!(policy.verify_request(&req, NOW).unwrap().is_some());
    }
    // The default locations are not looked at once a rule names its own.
    assert!(check(&policy, &token).unwrap().is_none());
    let req = Request::builder()
        .uri(format!("/?access_token={token}"))
        .body(())
        .unwrap();
    assert!(policy.verify_request(&req, NOW).unwrap().is_none());
}

#[test]
fn outputs_and_token_removal() {
    let mut rule = rule_with(Algorithm::ES256);
    rule.output_payload_to_header = Some(HeaderName::from_static("x-payload"));
    rule.output_claim_to_headers = vec![
        ClaimToHeader {
            header: HeaderName::from_static("x-team"),
            claim: "org.team".into(),
        },
        ClaimToHeader {
            header: HeaderName::from_static("x-exp"),
            claim: "exp".into(),
        },
        ClaimToHeader {
            header: HeaderName::from_static("x-groups"),
            claim: "groups".into(),
        },
    ];
    let policy = JwtPolicy::new(vec![rule.clone()]);
    let token = sign(Algorithm::ES256, Some("k1"), &claims("alice"));
    let mut req = bearer(&token);
    let done = policy.verify_request(&req, NOW).unwrap().unwrap();
    policy.apply(&mut req, &done);
    assert!(req.headers().get("authorization").is_none());
    assert_eq!(req.headers()["x-payload"], token.split('.').nth(1).unwrap());
    assert_eq!(req.headers()["x-team"], "pay");
    assert_eq!(req.headers()["x-exp"], (NOW + 3600).to_string().as_str());
    assert!(req.headers().get("x-groups").is_none());

    rule.forward_original_token = true;
    let policy = JwtPolicy::new(vec![rule]);
    let mut req = bearer(&token);
    let done = policy.verify_request(&req, NOW).unwrap().unwrap();
    policy.apply(&mut req, &done);
    assert!(req.headers().get("authorization").is_some());
}

/// The conformance manifest's inline JWKS and tokens (istio-cases.yaml, IstioJwtBasic).
#[test]
fn conformance_tokens() {
    let jwks_json = r#"{"keys":[{"kty":"RSA","alg":"RS256","use":"sig","kid":"k1","n":"5__vwGxFcfQQusxoa96yn8USyKlRBYjfiMsGkUpP-imIhO44mxsh4ZDRBgcdcjbxTFXHvNyVIl4dmppfMareOUokD4C4-Mbmjn1NH-wL6-_z7rPHnZU2_LXpyMcK4arF4yAade3ziUIFst0p2Aovv9oOZyTtYymFculsjLIWKK-FnVwKMja6xIIpNMPm8ZKR6w-oQKfnN83qjhaSOTBs6n1Mj5UfwKQgPOqHA5inDc_KLj7ZaG4SvJlHw669yvvh4iXh4zrtad3klnRlGFUDJCgDYl-6EqGpzk6SD_WBueboDOUNApmjyyzfUi4I-d3IXll8Rp8CpBCyMoA5pVVzTQ","e":"AQAB"}]}"#;
    let set: JwkSet = serde_json::from_str(jwks_json).unwrap();
    let mut rule = JwtRule::new("https://issuer.waypoint.test", Arc::new(JwksHandle::inline(&set)));
    rule.audiences = vec!["waypoint-tests".into()];
    let policy = JwtPolicy::new(vec![rule]);
    let now = 1_764_000_100;
    let alice = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL2lzc3Vlci53YXlwb2ludC50ZXN0Iiwic3ViIjoiYWxpY2UiLCJhdWQiOlsid2F5cG9pbnQtdGVzdHMiXSwiaWF0IjoxNzY0MDAwMDAwLCJleHAiOjQxMDI0NDQ4MDAsImdyb3VwcyI6WyJhZG1pbnMiXSwib3JnIjp7InRlYW0iOiJwYXltZW50cyJ9fQ.IVqNanFs0VY-XdbxUK_HwCSWFDWVAwGXAQUBadB30hsDQa2do48L28i2SY31gw0S505822Bl13JgKnyvv__fem-tTuQxGh2asrfjb16VFueAeRDQI0FtA-zJ1WrvWNG8KXOA4kGSfHwKHgZ3Ecqsx0ZolKLw-fqyUW8kG2AM8jL_S2NXNqa2n2_F9DFOvAnos2Y-jdI0fXfZ-2xGhd85o48vdbAn6R8cet489h3ETcjJKgfx4zT6np7EceN4mDqP13pE1rz-AYx-_CIwirauICNJfJqlcj3G-VhB9ZV-aG1FgQAyWLv_IFONFdqt3D4jHcCI-7bPhkhDHawvW7Fq0Q";
    let expired = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL2lzc3Vlci53YXlwb2ludC50ZXN0Iiwic3ViIjoiYWxpY2UiLCJhdWQiOlsid2F5cG9pbnQtdGVzdHMiXSwiaWF0IjoxNzY0MDAwMDAwLCJleHAiOjEwMDAwMDAwMDAsImdyb3VwcyI6WyJhZG1pbnMiXX0.Z3FvW1AARIs5uGsW89UvAwKR_MQBkUV-ZO6KeB-3_qJyDn7--zW7MfZjgqd1sXWbi_ukPBEc0o6sonbuCQBDwZBM_xy9ae8NT_KbPg7Q-3fOk_CQgSHKdVy-0HDL7YBCq515BZo1LtHcaELGOpFHe5_HG5ls0X_maga8_S11ZKpLKLWpDotpG9BiA86KahDT8ODV3dYyM9u7dNR48hPv2x5sPIW8U9E1VZcIqoG4Z_6s2QBwz-Y4gPBgdoAEBlFST7oUhK7Olpion-VQw5CYgOAsNDOh4ZCsi7d3-rBaKLQjsER46cgEAXeTx0zA9zMSRMe8fYx3mxUCZl3gbhqlQA";
    let bad_sig = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL2lzc3Vlci53YXlwb2ludC50ZXN0Iiwic3ViIjoiYWxpY2UiLCJhdWQiOlsid2F5cG9pbnQtdGVzdHMiXSwiaWF0IjoxNzY0MDAwMDAwLCJleHAiOjQxMDI0NDQ4MDAsImdyb3VwcyI6WyJhZG1pbnMiXX0.imT8UGcwAQHIyGR-xRVzPBbflXDNHBnoLsXViojrkVS8A8PU2zYP12RDr5ABfvRTMbz9gfDDG9r9_iC8RF8nEX-RakbuGNQsrcHMXA8H0ZpezCTcU3XBslkg8csEJAbiEOJZiRAMHAtroSOoA9MbfStwpfdvDb8Sh3m6EdzWkFpr-ePgYh84ZXB-lk3YpU0vCj3qsxvB8Pzw0Db2OGgjnxs-GacCS679SiQtPT62j_uV_8xHZPPyQwxaA48TgfgxZ2rAaZNeRZgKyoS37MbaEiZdmEylRmEF0Ee_RAW8y-qgjshCOVtnpLH8l6lWa4jgExffcbXdYzLJT2U-Q8ZzLQ";
    let done = policy.verify_request(&bearer(alice), now).unwrap().unwrap();
    assert_eq!(done.auth.principal, "https://issuer.waypoint.test/alice");
    assert_eq!(
        policy.verify_request(&bearer(expired), now).unwrap_err(),
        JwtFailure::Expired
    );
    assert_eq!(
        policy.verify_request(&bearer(bad_sig), now).unwrap_err(),
        JwtFailure::VerificationFails
    );
}

#[tokio::test]
async fn layer_refuses_401_and_passes_identity() {
    let echo = tower::service_fn(|req: Request<crate::Body>| async move {
        let p = req
            .extensions()
            .get::<RequestAuth>()
            .map(|a| a.principal.clone())
            .unwrap_or_default();
        Ok::<_, std::convert::Infallible>(http::Response::new(full_body(p)))
    });
    let svc = JwtLayer::new().layer(echo);
    let policy = Arc::new(JwtPolicy::new(vec![rule_with(Algorithm::ES256)]));
    let token = sign(
        Algorithm::ES256,
        Some("k1"),
        &json!({"iss": ISS, "sub": "alice", "exp": 4_102_444_800u64}),
    );

    let mut req = Request::builder()
        .uri("/x?y=1")
        .header("host", "svc.ns:8080")
        .header("authorization", format!("Bearer {token}"))
        .body(empty_body())
        .unwrap();
    req.extensions_mut().insert(policy.clone());
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_bytes(res.into_body()).await, format!("{ISS}/alice"));

    let mut req = Request::builder()
        .uri("/x?y=1")
        .header("host", "svc.ns:8080")
        .header("authorization", "Bearer a.b.c")
        .body(empty_body())
        .unwrap();
    req.extensions_mut().insert(policy.clone());
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.headers()["www-authenticate"],
        "Bearer realm=\"http://svc.ns:8080/x?y=1\", error=\"invalid_token\""
    );
    assert!(res.extensions().get::<crate::context::ResponseFlag>().is_none());
    assert_eq!(
        body_bytes(res.into_body()).await,
        "Jwt header is an invalid Base64url encoded"
    );

    // No token, or no policy: passes without identity.
    let mut req = Request::builder().uri("/").body(empty_body()).unwrap();
    req.extensions_mut().insert(policy);
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_bytes(res.into_body()).await, "");
    let req = Request::builder()
        .uri("/")
        .header("authorization", "Bearer junk")
        .body(empty_body())
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
}
