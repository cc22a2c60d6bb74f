//! Arbitrary policies against arbitrary requests: the input bytes pick every field value (strings, IPs, CIDRs,
//! ports, condition keys) so the compilers and the evaluator see hostile shapes. Must never panic, and a matching
//! enforced DENY must always deny.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use waypoint_filters::authz::{
    Action, AuthorizationPolicy, AuthzPolicies, AuthzRequest, Condition, HttpAttributes, Operation, PathMatch,
    PathNormalization, PrincipalMatch, Rule, Source, StringMatch, normalize_path,
};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn string(&mut self) -> String {
        let n = usize::from(self.byte() % 16);
        let take = n.min(self.0.len());
        let (s, rest) = self.0.split_at(take);
        self.0 = rest;
        String::from_utf8_lossy(s).into_owned()
    }
    fn strings(&mut self) -> Vec<String> {
        (0..self.byte() % 3).map(|_| self.string()).collect()
    }
    fn ip(&mut self) -> IpAddr {
        if self.byte().is_multiple_of(2) {
            IpAddr::V4(Ipv4Addr::new(self.byte(), self.byte(), self.byte(), self.byte()))
        } else {
            IpAddr::V6(Ipv6Addr::new(
                u16::from(self.byte()),
                0,
                0,
                0,
                0,
                0xffff,
                u16::from(self.byte()),
                1,
            ))
        }
    }
}

const KEYS: &[&str] = &[
    "request.headers[x-a]",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[a][b]",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "experimental.envoy.filters.x[y]",
];

fn rule(b: &mut Bytes<'_>) -> Rule {
    let sm = |b: &mut Bytes<'_>| b.strings().iter().map(|s| StringMatch::parse(s)).collect::<Vec<_>>();
    let cidrs = |b: &mut Bytes<'_>| b.strings().iter().filter_map(|s| s.parse().ok()).collect::<Vec<_>>();
    let paths = |b: &mut Bytes<'_>| {
        b.strings()
            .iter()
            .filter_map(|s| PathMatch::parse(s).ok())
            .collect::<Vec<_>>()
    };
    let source = Source {
        principals: sm(b),
        not_principals: sm(b),
        request_principals: b.strings().iter().map(|s| PrincipalMatch::parse(s)).collect(),
        not_request_principals: b.strings().iter().map(|s| PrincipalMatch::parse(s)).collect(),
        namespaces: sm(b),
        not_namespaces: sm(b),
        ip_blocks: cidrs(b),
        not_ip_blocks: cidrs(b),
        remote_ip_blocks: cidrs(b),
        not_remote_ip_blocks: cidrs(b),
    };
    let operation = Operation {
        hosts: b.strings().iter().map(|s| StringMatch::parse_lowercase(s)).collect(),
        not_hosts: sm(b),
        ports: (0..b.byte() % 2).map(|_| u16::from(b.byte())).collect(),
        not_ports: (0..b.byte() % 2).map(|_| u16::from(b.byte())).collect(),
        methods: sm(b),
        not_methods: sm(b),
        paths: paths(b),
        not_paths: paths(b),
    };
    let when = (0..b.byte() % 3)
        .filter_map(|_| {
            let key = KEYS[usize::from(b.byte()) % KEYS.len()];
            let (values, not_values) = (b.strings(), b.strings());
            Condition::parse(key, &values, &not_values).ok()
        })
        .collect();
    Rule {
        from: if b.byte().is_multiple_of(2) {
            vec![source]
        } else {
            vec![]
        },
        to: if b.byte().is_multiple_of(2) {
            vec![operation]
        } else {
            vec![]
        },
        when,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let policies: Vec<AuthorizationPolicy> = (0..b.byte() % 5)
        .map(|i| AuthorizationPolicy {
            name: format!("p{i}"),
            namespace: "ns".into(),
            action: match b.byte() % 4 {
                0 => Action::Allow,
                1 => Action::Deny,
                2 => Action::Audit,
                _ => Action::Custom { provider: "x".into() },
            },
            rules: (0..b.byte() % 3).map(|_| rule(&mut b)).collect(),
            dry_run: b.byte() % 4 == 0,
        })
        .collect();
    let peer = b.string();
    let host = b.string().to_ascii_lowercase();
    let method = b.string();
    let raw_path = b.string();
    let path = normalize_path(&raw_path, PathNormalization::DecodeAndMergeSlashes);
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&b.string()) {
        headers.insert("x-a", v);
    }
    let http = HttpAttributes {
        host_lower: &host,
        method: &method,
        path: &path,
        headers: &headers,
        auth: None,
    };
    let req = AuthzRequest {
        peer: Some(peer.as_str()),
        source_ip: Some(b.ip()),
        remote_ip: Some(b.ip()),
        destination: Some(SocketAddr::new(b.ip(), u16::from(b.byte()))),
        sni: None,
        http: (b.byte() % 4 != 0).then_some(http),
    };
    let deny_hit = policies
        .iter()
        .any(|p| !p.dry_run && matches!(p.action, Action::Deny | Action::Custom { .. }) && p.matches(&req).is_some());
    let decision = AuthzPolicies::new(policies).evaluate(&req);
    assert!(!(deny_hit && decision.allowed), "a matching DENY must deny");
});
