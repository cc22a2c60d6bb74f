//! Route matching: `RouteTable::find` over a table of 1,000 HTTPRoute rules with mixed matches (exact paths,
//! prefixes of varied lengths, regexes, headers, query parameters, methods), for a handful of request shapes.
//!
//! Before measuring, every shape is checked to make no heap allocation per lookup: the returned `Matched` is
//! built from `Arc` clones only. The check counts allocations with `stats_alloc`'s instrumented global
//! allocator (safe to install, so the workspace's `unsafe_code = "deny"` holds here too).

use std::alloc::System;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use waypoint_filters::route::{
    HeaderMatch, PathMatch, QueryMatch, RequestView, Route, RouteKind, RouteMatch, RouteTable, Rule, StringMatch,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const ROUTES: usize = 100;
const RULES_PER_ROUTE: usize = 10;
const LOOKUPS_CHECKED: usize = 1_000;

fn rule_match(i: usize) -> RouteMatch {
    let prefix = |p: String| Some(PathMatch::Prefix(p));
    let header = |name: &'static str, value: StringMatch| HeaderMatch {
        name: HeaderName::from_static(name),
        value,
        invert: false,
    };
    match i % 8 {
        0 => RouteMatch {
            path: Some(PathMatch::Exact(format!("/exact/{i}"))),
            ..Default::default()
        },
        1 => RouteMatch {
            path: prefix(format!("/p{i}")),
            ..Default::default()
        },
        2 => RouteMatch {
            path: prefix(format!("/service/{i}/api/v1/resources")),
            ..Default::default()
        },
        3 => RouteMatch {
            path: Some(PathMatch::Regex(
                Regex::new(&format!("/re/{i}/[0-9]+/items")).expect("valid regex"),
            )),
            ..Default::default()
        },
        4 => RouteMatch {
            path: prefix(format!("/h/{i}")),
            headers: vec![header("x-tenant", StringMatch::Exact(format!("tenant-{i}")))],
            ..Default::default()
        },
        5 => RouteMatch {
            path: prefix(format!("/q/{i}")),
            query: vec![QueryMatch {
                name: "version".into(),
                value: StringMatch::Exact(format!("v{i}")),
            }],
            ..Default::default()
        },
        6 => RouteMatch {
            path: prefix(format!("/m/{i}")),
            method: Some(Method::POST),
            ..Default::default()
        },
        _ => RouteMatch {
            path: prefix(format!("/mix/{i}")),
            method: Some(Method::GET),
            headers: vec![header("x-canary", StringMatch::Prefix("yes".into()))],
            query: vec![QueryMatch {
                name: "user id".into(),
                value: StringMatch::Regex(Regex::new("[a-z]+[0-9]*").expect("valid regex")),
            }],
            ..Default::default()
        },
    }
}

fn table() -> RouteTable {
    let routes = (0..ROUTES)
        .map(|r| {
            let rules = (0..RULES_PER_ROUTE)
                .map(|k| {
                    Arc::new(Rule {
                        matches: vec![rule_match(r * RULES_PER_ROUTE + k)],
                        ..Default::default()
                    })
                })
                .collect();
            Arc::new(Route {
                kind: RouteKind::Http,
                namespace: "bench".into(),
                name: format!("route-{r:03}"),
                creation_timestamp: None,
                source_order: r,
                hostnames: vec![],
                rules,
            })
        })
        .collect();
    RouteTable::new(routes)
}

struct Shape {
    name: &'static str,
    method: Method,
    path: &'static str,
    query: Option<&'static str>,
    headers: HeaderMap,
    hits: bool,
}

fn shapes() -> Vec<Shape> {
    let headers = |pairs: &[(&'static str, &'static str)]| {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect::<HeaderMap>()
    };
    let shape = |name, method, path, query, h: &[(&'static str, &'static str)], hits| Shape {
        name,
        method,
        path,
        query,
        headers: headers(h),
        hits,
    };
    vec![
        shape("exact", Method::GET, "/exact/800", None, &[], true),
        shape(
            "long_prefix",
            Method::GET,
            "/service/994/api/v1/resources/42",
            None,
            &[("user-agent", "bench")],
            true,
        ),
        shape("short_prefix", Method::GET, "/p993/x", None, &[], true),
        shape("regex", Method::GET, "/re/995/12345/items", None, &[], true),
        shape(
            "header",
            Method::GET,
            "/h/996/x",
            None,
            &[("x-tenant", "tenant-996")],
            true,
        ),
        shape(
            "query_decoded",
            Method::GET,
            "/q/997",
            Some("a=1&version=v997&b=%20"),
            &[],
            true,
        ),
        shape("method", Method::POST, "/m/998/x", None, &[], true),
        shape(
            "mixed",
            Method::GET,
            "/mix/999",
            Some("user%20id=bob42"),
            &[("x-canary", "yes-please")],
            true,
        ),
        shape(
            "miss",
            Method::GET,
            "/nothing/here",
            Some("version=v5"),
            &[("x-tenant", "none")],
            false,
        ),
    ]
}

fn view(s: &Shape) -> RequestView<'_> {
    RequestView {
        method: &s.method,
        path: s.path,
        query: s.query,
        host: None,
        headers: &s.headers,
    }
}

/// Fails the run if a lookup allocates; prints the count per lookup.
fn check_no_allocation(table: &RouteTable, shapes: &[Shape]) {
    let canary = Region::new(GLOBAL);
    black_box(vec![0u8; 16]);
    assert!(
        canary.change().allocations > 0,
        "the counting allocator is not installed"
    );
    for s in shapes {
        let v = view(s);
        // The regex engine builds its per-thread search cache on first use: warm it up outside the region.
        assert_eq!(
            table.find(&v).is_some(),
            s.hits,
            "shape {} should hit: {}",
            s.name,
            s.hits
        );
        let region = Region::new(GLOBAL);
        for _ in 0..LOOKUPS_CHECKED {
            black_box(table.find(black_box(&v)));
        }
        let change = region.change();
        let per_lookup = (change.allocations + change.reallocations) as f64 / LOOKUPS_CHECKED as f64;
        println!("route_match/{}: {per_lookup} heap allocations per lookup", s.name);
        assert_eq!(
            change.allocations + change.reallocations,
            0,
            "route lookup for {} allocated",
            s.name
        );
    }
}

fn bench_find(c: &mut Criterion) {
    let table = table();
    assert_eq!(table.len(), ROUTES * RULES_PER_ROUTE);
    let shapes = shapes();
    check_no_allocation(&table, &shapes);
    let mut group = c.benchmark_group("route_match");
    for s in &shapes {
        let v = view(s);
        group.bench_function(s.name, |b| b.iter(|| table.find(black_box(&v))));
    }
    group.finish();
}

criterion_group!(benches, bench_find);
criterion_main!(benches);
