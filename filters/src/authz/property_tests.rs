//! Random requests against random policy sets: evaluation never panics, a matching DENY always wins over any
//! ALLOW, no ALLOW policy means allow unless denied, and dry-run policies never change the verdict.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use fastrand::Rng;
use http::HeaderMap;
use serde_json::json;

use super::*;
use crate::jwt::RequestAuth;

const PEERS: &[&str] = &[
    "cluster.local/ns/front/sa/web",
    "cluster.local/ns/back/sa/default",
    "td/ns/x/sa/y",
    "garbage",
    "",
];
const PATHS: &[&str] = &[
    "/",
    "/admin",
    "/admin/users",
    "/api/v1/x",
    "/administrator",
    "/a/b/c",
    "",
];
const METHODS: &[&str] = &["GET", "POST", "DELETE", "PUT"];
const HOSTS: &[&str] = &["echo", "echo.ns:80", "other.example.com", ""];
const IPS: &[&str] = &["10.0.0.1", "10.1.2.3", "192.0.2.9", "2001:db8::1", "::ffff:10.0.0.1"];
const CIDRS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.2.3",
    "192.0.2.0/24",
    "2001:db8::/32",
    "0.0.0.0/0",
    "::/0",
];
const STRINGS: &[&str] = &[
    "*",
    "front",
    "back",
    "fr*",
    "*ack",
    "cluster.local/ns/front/sa/web",
    "*/sa/default",
    "GET",
    "POST",
    "/admin",
    "/admin/*",
    "*/users",
    "echo*",
    "x",
];
const KEYS: &[&str] = &[
    "request.headers[x-a]",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[groups]",
    "request.auth.claims[org][team]",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
    from[rng.usize(..from.len())]
}

fn list<T>(rng: &mut Rng, mut f: impl FnMut(&mut Rng) -> T) -> Vec<T> {
    let n = if rng.u8(..4) == 0 { rng.usize(1..3) } else { 0 };
    (0..n).map(|_| f(rng)).collect()
}

fn strings(rng: &mut Rng) -> Vec<StringMatch> {
    list(rng, |r| StringMatch::parse(pick(r, STRINGS)))
}

fn cidrs(rng: &mut Rng) -> Vec<Cidr> {
    list(rng, |r| pick(r, CIDRS).parse().unwrap())
}

fn rule(rng: &mut Rng) -> Rule {
    let from = list(rng, |r| Source {
        principals: strings(r),
        not_principals: strings(r),
        request_principals: list(r, |r| {
            PrincipalMatch::parse(pick(r, &["*", "https://iss/alice", "https://iss/*", "*/bob"]))
        }),
        not_request_principals: list(r, |r| PrincipalMatch::parse(pick(r, &["*", "https://iss/alice"]))),
        namespaces: strings(r),
        not_namespaces: strings(r),
        ip_blocks: cidrs(r),
        not_ip_blocks: cidrs(r),
        remote_ip_blocks: cidrs(r),
        not_remote_ip_blocks: cidrs(r),
    });
    let to = list(rng, |r| Operation {
        hosts: list(r, |r| StringMatch::parse_lowercase(pick(r, STRINGS))),
        not_hosts: list(r, |r| StringMatch::parse_lowercase(pick(r, STRINGS))),
        ports: list(r, |r| r.choice([80u16, 8080, 443]).unwrap_or(80)),
        not_ports: list(r, |r| r.choice([80u16, 8080]).unwrap_or(80)),
        methods: strings(r),
        not_methods: strings(r),
        paths: list(r, |r| {
            PathMatch::parse(pick(r, &["/admin", "/admin/*", "*", "/{*}/users", "/api/{**}"])).unwrap()
        }),
        not_paths: list(r, |r| PathMatch::parse(pick(r, &["/admin", "*/x"])).unwrap()),
    });
    let when = list(rng, |r| {
        let key = pick(r, KEYS);
        let value = |r: &mut Rng| -> String {
            match key {
                "source.ip" | "remote.ip" | "destination.ip" => pick(r, CIDRS).to_string(),
                "destination.port" => pick(r, &["80", "8080"]).to_string(),
                _ => pick(r, STRINGS).to_string(),
            }
        };
        let mut values = list(r, value);
        let not_values = list(r, value);
        if values.is_empty() && not_values.is_empty() {
            values.push(value(r));
        }
        Condition::parse(key, &values, &not_values).unwrap()
    });
    Rule { from, to, when }
}

fn policies(rng: &mut Rng) -> Vec<AuthorizationPolicy> {
    (0..rng.usize(0..6))
        .map(|i| AuthorizationPolicy {
            name: format!("p{i}"),
            namespace: "ns".into(),
            action: match rng.u8(..8) {
                0..=2 => Action::Allow,
                3..=5 => Action::Deny,
                6 => Action::Audit,
                _ => Action::Custom { provider: "ext".into() },
            },
            rules: (0..rng.usize(0..3)).map(|_| rule(rng)).collect(),
            dry_run: rng.u8(..5) == 0,
        })
        .collect()
}

fn ip(rng: &mut Rng) -> Option<IpAddr> {
    (rng.u8(..5) != 0).then(|| pick(rng, IPS).parse().unwrap())
}

#[test]
fn random_requests_and_policies() {
    let mut rng = Rng::with_seed(0x5eed);
    let auths = [
        None,
        Some(RequestAuth {
            principal: "https://iss/alice".into(),
            issuer: "https://iss".into(),
            subject: Some("alice".into()),
            audiences: vec!["aud".into()],
            presenter: None,
            claims: Arc::new(json!({"groups": ["front", "x"], "org": {"team": "back"}})),
        }),
    ];
    for _ in 0..5000 {
        let set = policies(&mut rng);
        let mut headers = HeaderMap::new();
        if rng.bool() {
            headers.insert("x-a", pick(&mut rng, STRINGS).parse().unwrap());
        }
        let auth = auths[rng.usize(..2)].clone();
        let host = pick(&mut rng, HOSTS);
        let http = HttpAttributes {
            host_lower: host,
            method: pick(&mut rng, METHODS),
            path: pick(&mut rng, PATHS),
            headers: &headers,
            auth: auth.as_ref(),
        };
        let peer = pick(&mut rng, PEERS);
        let req = AuthzRequest {
            peer: (!peer.is_empty()).then_some(peer),
            source_ip: ip(&mut rng),
            remote_ip: ip(&mut rng),
            destination: ip(&mut rng).map(|i| SocketAddr::new(i, rng.choice([80u16, 8080]).unwrap_or(80))),
            sni: rng.bool().then_some("sni"),
            http: rng.u8(..4).ne(&0).then_some(http),
        };

        let compiled = AuthzPolicies::new(set.clone());
        let decision = compiled.evaluate(&req);
        let enforced: Vec<&AuthorizationPolicy> = set.iter().filter(|p| !p.dry_run).collect();
        let deny_hit = enforced
            .iter()
            .any(|p| matches!(p.action, Action::Deny | Action::Custom { .. }) && p.matches(&req).is_some());
        if deny_hit {
            assert!(!decision.allowed, "a matching DENY must win: {set:#?}");
        }
        let has_allow = enforced.iter().any(|p| p.action == Action::Allow);
        if !deny_hit && !has_allow {
            assert!(decision.allowed);
        }
        if !deny_hit && has_allow {
            let allow_hit = enforced
                .iter()
                .any(|p| p.action == Action::Allow && p.matches(&req).is_some());
            assert_eq!(decision.allowed, allow_hit);
        }
        let without_dry = AuthzPolicies::new(set.iter().filter(|p| !p.dry_run).cloned()).evaluate(&req);
        assert_eq!(decision.allowed, without_dry.allowed, "dry-run changed the verdict");
    }
}
