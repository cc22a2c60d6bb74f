//! Arbitrary bytes as a bearer token (and as a cookie), through the same path the jwt layer takes: extraction,
//! base64/JSON decoding, issuer/claim checks, key lookup and signature verification. Must never panic.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use waypoint_filters::jwt::{JwkSet, JwksHandle, JwtPolicy, JwtRule};

const JWKS: &str = r#"{"keys":[
 {"kty":"RSA","alg":"RS256","kid":"k1","n":"5__vwGxFcfQQusxoa96yn8USyKlRBYjfiMsGkUpP-imIhO44mxsh4ZDRBgcdcjbxTFXHvNyVIl4dmppfMareOUokD4C4-Mbmjn1NH-wL6-_z7rPHnZU2_LXpyMcK4arF4yAade3ziUIFst0p2Aovv9oOZyTtYymFculsjLIWKK-FnVwKMja6xIIpNMPm8ZKR6w-oQKfnN83qjhaSOTBs6n1Mj5UfwKQgPOqHA5inDc_KLj7ZaG4SvJlHw669yvvh4iXh4zrtad3klnRlGFUDJCgDYl-6EqGpzk6SD_WBueboDOUNApmjyyzfUi4I-d3IXll8Rp8CpBCyMoA5pVVzTQ","e":"AQAB"},
 {"kty":"EC","crv":"P-256","kid":"k2","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
 {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
 {"kty":"oct","k":"c2VjcmV0"}
]}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(set) = serde_json::from_str::<JwkSet>(JWKS) else {
        return;
    };
    let mut rule = JwtRule::new("https://issuer.waypoint.test", Arc::new(JwksHandle::inline(&set)));
    rule.from_cookies = vec!["session".into()];
    rule.from_headers = vec![waypoint_filters::jwt::FromHeader {
        name: http::header::AUTHORIZATION,
        prefix: "Bearer ".into(),
    }];
    let policy = JwtPolicy::new(vec![
        rule,
        JwtRule::new("other", Arc::new(JwksHandle::remote("http://x/jwks"))),
    ]);
    let text = String::from_utf8_lossy(data);
    for (name, value) in [
        ("authorization", format!("Bearer {text}")),
        ("cookie", format!("session={text}")),
    ] {
        let Ok(req) = http::Request::builder().uri("/").header(name, value).body(()) else {
            continue;
        };
        if let Ok(Some(done)) = policy.verify_request(&req, 1_800_000_000) {
            let mut req = req;
            policy.apply(&mut req, &done);
        }
    }
});
