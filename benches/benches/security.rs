//! L7 security: JWT verification (RS256 and ES256, a valid token through `JwtPolicy::verify_request`, the same
//! path the jwt layer takes) and AuthorizationPolicy evaluation of 100 policies against one request.
//!
//! The policy set is the costly shape: 20 DENY policies that do not match, then 80 ALLOW policies of which only
//! the last matches, each with sources, operations and a condition, so evaluation walks everything.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Request};
use waypoint_filters::authz::{
    Action, AuthorizationPolicy, AuthzPolicies, AuthzRequest, Condition, HttpAttributes, Operation, PathMatch,
    PrincipalMatch, Rule, Source, StringMatch,
};
use waypoint_filters::jwt::jsonwebtoken::jwk::Jwk;
use waypoint_filters::jwt::jsonwebtoken::{self, Algorithm, EncodingKey, Header};
use waypoint_filters::jwt::{JwkSet, JwksHandle, JwtPolicy, JwtRule};

const RSA_PEM: &str = include_str!("../../filters/src/jwt/testdata/rsa.pem");
const EC_PEM: &str = include_str!("../../filters/src/jwt/testdata/ec256.pem");
const ISS: &str = "https://issuer.bench";

fn jwt_case(alg: Algorithm, key: EncodingKey) -> (JwtPolicy, Request<()>) {
    let mut jwk = Jwk::from_encoding_key(&key, alg).expect("jwk");
    jwk.common.key_id = Some("k1".into());
    let handle = Arc::new(JwksHandle::inline(&JwkSet { keys: vec![jwk] }));
    let mut rule = JwtRule::new(ISS, handle);
    rule.audiences = vec!["svc".into()];
    let policy = JwtPolicy::new(vec![rule]);
    let mut header = Header::new(alg);
    header.kid = Some("k1".into());
    // No `exp`: a token without one never expires, so the bench does not depend on the clock.
    let claims: BTreeMap<&str, &str> = [("iss", ISS), ("sub", "alice"), ("aud", "svc"), ("azp", "web")].into();
    let token = jsonwebtoken::encode(&header, &claims, &key).expect("sign");
    let req = Request::get("/api")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .expect("request");
    (policy, req)
}

fn bench_jwt(c: &mut Criterion) {
    let cases = [
        (
            "jwt_verify_rs256",
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).expect("rsa key"),
        ),
        (
            "jwt_verify_es256",
            Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_PEM.as_bytes()).expect("ec key"),
        ),
    ];
    for (name, alg, key) in cases {
        let (policy, req) = jwt_case(alg, key);
        assert!(policy.verify_request(&req, 1_800_000_000).expect("valid").is_some());
        c.bench_function(name, |b| {
            b.iter(|| black_box(policy.verify_request(black_box(&req), 1_800_000_000)))
        });
    }
}

fn strings(v: &[&str]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::parse(s)).collect()
}

fn policy(i: usize, action: Action, matching: bool) -> AuthorizationPolicy {
    let ns = if matching {
        "front".to_string()
    } else {
        format!("team-{i}")
    };
    let rule = Rule {
        from: vec![Source {
            namespaces: strings(&[&ns]),
            not_principals: strings(&["*/sa/blocked"]),
            request_principals: vec![PrincipalMatch::parse("*")],
            ..Default::default()
        }],
        to: vec![Operation {
            methods: strings(&["GET", "POST"]),
            paths: vec![
                PathMatch::parse(&format!("/api/{i}/*")).expect("path"),
                PathMatch::parse("/api").expect("path"),
            ],
            ports: vec![80, 8080],
            ..Default::default()
        }],
        when: vec![Condition::parse("request.headers[x-tenant]", &["acme".to_string()], &[]).expect("condition")],
    };
    AuthorizationPolicy {
        name: format!("p{i}"),
        namespace: "bench".into(),
        action,
        rules: vec![rule],
        dry_run: false,
    }
}

fn bench_authz(c: &mut Criterion) {
    let policies: Vec<AuthorizationPolicy> = (0..100)
        .map(|i| {
            if i < 20 {
                policy(i, Action::Deny, false)
            } else {
                policy(i, Action::Allow, i == 99)
            }
        })
        .collect();
    let policies = AuthzPolicies::new(policies);
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "acme".parse().expect("value"));
    let auth = waypoint_filters::jwt::RequestAuth {
        principal: format!("{ISS}/alice"),
        issuer: ISS.into(),
        subject: Some("alice".into()),
        audiences: vec!["svc".into()],
        presenter: None,
        claims: Arc::new(Default::default()),
    };
    let req = AuthzRequest {
        peer: Some("cluster.local/ns/front/sa/web"),
        source_ip: "10.0.0.1".parse().ok(),
        remote_ip: "10.0.0.1".parse().ok(),
        destination: "10.96.0.1:80".parse().ok(),
        sni: None,
        http: Some(HttpAttributes {
            host_lower: "echo.bench.svc.cluster.local",
            method: "GET",
            path: "/api",
            headers: &headers,
            auth: Some(&auth),
        }),
    };
    let decision = policies.evaluate(&req);
    assert!(
        decision.allowed && decision.policy.as_deref() == Some("bench/p99"),
        "{decision:?}"
    );
    c.bench_function("authz_eval_100_policies", |b| {
        b.iter(|| black_box(policies.evaluate(black_box(&req))))
    });
}

criterion_group!(benches, bench_jwt, bench_authz);
criterion_main!(benches);
