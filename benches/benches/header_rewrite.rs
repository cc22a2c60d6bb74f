//! Header and URL rewriting on a typical mesh request: the Gateway API `RequestHeaderModifier` (remove, set, add)
//! and `URLRewrite` (hostname + `ReplacePrefixMatch`), as the filter layers apply them per request.
//!
//! The request is rebuilt for every iteration outside the timed part (`iter_batched`), so only the rewrite is
//! measured.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark setup: a failed unwrap is a broken bench

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use std::hint::black_box;
use waypoint_filters::route::{Filter, HeaderModifier, PathModifier, Rewrite};
use waypoint_filters::{headers, rewrite, test_support};

/// The headers a request carries after the source ztunnel and an Istio-instrumented client: 16 lines.
fn mesh_request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "reviews.bookinfo.svc.cluster.local:9080"),
        ("user-agent", "Go-http-client/1.1"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip"),
        ("x-request-id", "5b9cd9e1-2c0f-4f4e-9a4c-7d2f8f0e6a11"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("x-b3-spanid", "00f067aa0ba902b7"),
        ("x-b3-sampled", "1"),
        ("x-forwarded-proto", "http"),
        ("x-envoy-attempt-count", "1"),
        ("x-tenant", "blue"),
        ("x-debug", "off"),
        ("cookie", "session=abc123; theme=dark"),
        ("authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"),
        ("content-length", "0"),
    ] {
        h.append(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    h
}

fn header_modifier() -> HeaderModifier {
    let name = HeaderName::from_static;
    let value = HeaderValue::from_static;
    HeaderModifier {
        set: vec![(name("x-tenant"), value("green")), (name("x-canary"), value("true"))],
        add: vec![
            (name("x-route"), value("reviews-v2")),
            (name("x-debug"), value("verbose")),
        ],
        remove: vec![name("cookie"), name("x-envoy-attempt-count")],
    }
}

fn bench_headers(c: &mut Criterion) {
    let modifier = header_modifier();
    // What the bench measures must be the filter's semantics: remove, then set, then add.
    let mut check = mesh_request_headers();
    headers::apply(&modifier, &mut check);
    assert!(check.get("cookie").is_none());
    assert_eq!(check["x-tenant"], "green");
    assert_eq!(check.get_all("x-debug").iter().count(), 2);

    c.bench_function("headers/request_modifier_remove2_set2_add2", |b| {
        b.iter_batched(
            mesh_request_headers,
            |mut h| {
                headers::apply(black_box(&modifier), &mut h);
                h
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_url_rewrite(c: &mut Criterion) {
    let rule = Rewrite {
        hostname: Some("reviews-v2.bookinfo.svc.cluster.local".into()),
        path: Some(PathModifier::ReplacePrefixMatch("/api/v2".into())),
    };
    let matched = test_support::matched(vec![Filter::Rewrite(rule.clone())], vec![], Some("/reviews"));
    let request = || {
        let mut req = Request::get("/reviews/0/ratings?stars=5&sort=desc").body(()).unwrap();
        *req.headers_mut() = mesh_request_headers();
        req.extensions_mut().insert(matched.clone());
        req
    };
    let mut check = request();
    rewrite::apply(&rule, &mut check).unwrap();
    assert_eq!(check.uri(), "/api/v2/0/ratings?stars=5&sort=desc");
    assert_eq!(check.headers()["host"], "reviews-v2.bookinfo.svc.cluster.local");

    c.bench_function("rewrite/hostname_and_prefix", |b| {
        b.iter_batched(
            request,
            |mut req| {
                rewrite::apply(black_box(&rule), &mut req).unwrap();
                req
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench_headers, bench_url_rewrite);
criterion_main!(benches);
