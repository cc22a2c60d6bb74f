use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, Request, StatusCode};
use serde_json::json;
use tower::{Layer, ServiceExt};

use super::*;
use crate::jwt::RequestAuth;
use crate::reply::{empty_body, full_body};
use crate::test_support::body_bytes;

pub(super) fn s(v: &[&str]) -> Vec<StringMatch> {
    v.iter().map(|x| StringMatch::parse(x)).collect()
}

fn paths(v: &[&str]) -> Vec<PathMatch> {
    v.iter().map(|p| PathMatch::parse(p).unwrap()).collect()
}

fn cidrs(v: &[&str]) -> Vec<Cidr> {
    v.iter().map(|x| x.parse().unwrap()).collect()
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: name.into(),
        namespace: "ns".into(),
        action,
        rules,
        dry_run: false,
    }
}

fn from(src: Source) -> Rule {
    Rule {
        from: vec![src],
        ..Default::default()
    }
}

fn to(op: Operation) -> Rule {
    Rule {
        to: vec![op],
        ..Default::default()
    }
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> Rule {
    let v = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    Rule {
        when: vec![Condition::parse(key, &v(values), &v(not_values)).unwrap()],
        ..Default::default()
    }
}

struct Req {
    peer: Option<&'static str>,
    source: Option<IpAddr>,
    remote: Option<IpAddr>,
    dest: Option<SocketAddr>,
    host: &'static str,
    method: &'static str,
    path: &'static str,
    headers: HeaderMap,
    auth: Option<RequestAuth>,
}

impl Default for Req {
    fn default() -> Req {
        Req {
            peer: Some("cluster.local/ns/front/sa/web"),
            source: "10.1.0.5".parse().ok(),
            remote: "192.0.2.7".parse().ok(),
            dest: "10.96.0.10:80".parse().ok(),
            host: "echo.ns.svc.cluster.local",
            method: "GET",
            path: "/api/v1",
            headers: HeaderMap::new(),
            auth: None,
        }
    }
}

impl Req {
    fn view(&self) -> AuthzRequest<'_> {
        AuthzRequest {
            peer: self.peer,
            source_ip: self.source,
            remote_ip: self.remote,
            destination: self.dest,
            sni: Some("sni.example"),
            http: Some(HttpAttributes {
                host_lower: self.host,
                method: self.method,
                path: self.path,
                headers: &self.headers,
                auth: self.auth.as_ref(),
            }),
        }
    }
    fn tcp(&self) -> AuthzRequest<'_> {
        AuthzRequest {
            http: None,
            ..self.view()
        }
    }
}

fn auth(iss: &str, sub: &str, claims: serde_json::Value) -> RequestAuth {
    RequestAuth {
        principal: format!("{iss}/{sub}"),
        issuer: iss.into(),
        subject: Some(sub.into()),
        audiences: vec!["aud1".into()],
        presenter: Some("web-app".into()),
        claims: Arc::new(claims),
    }
}

fn allowed(p: Vec<AuthorizationPolicy>, r: &Req) -> bool {
    AuthzPolicies::new(p).evaluate(&r.view()).allowed
}

fn rule_matches(rule: Rule, r: &Req) -> bool {
    rule.matches(&r.view(), Mode::Allow)
}

#[test]
fn istio_order_and_empty_policies() {
    let r = Req::default();
    assert!(allowed(vec![], &r));
    // ALLOW without rules denies everything; `rules: [{}]` allows everything.
    assert!(!allowed(vec![policy("a", Action::Allow, vec![])], &r));
    assert!(allowed(vec![policy("a", Action::Allow, vec![Rule::default()])], &r));
    // DENY without rules does nothing; with `[{}]` denies everything, even with an allow-all.
    assert!(allowed(vec![policy("d", Action::Deny, vec![])], &r));
    let d = AuthzPolicies::new(vec![
        policy("all", Action::Allow, vec![Rule::default()]),
        policy("d", Action::Deny, vec![Rule::default()]),
    ])
    .evaluate(&r.view());
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::DenyMatched);
    assert_eq!(d.policy.as_deref(), Some("ns/d"));
    // An ALLOW policy that does not match denies; another one that matches allows.
    let no = policy(
        "no",
        Action::Allow,
        vec![to(Operation {
            paths: vec![PathMatch::parse("/x").unwrap()],
            ..Default::default()
        })],
    );
    assert!(!allowed(vec![no.clone()], &r));
    assert!(allowed(
        vec![no, policy("yes", Action::Allow, vec![Rule::default()])],
        &r
    ));
    // AUDIT records only.
    let d = AuthzPolicies::new(vec![policy("au", Action::Audit, vec![Rule::default()])]).evaluate(&r.view());
    assert!(d.allowed);
    assert_eq!(d.audited_by.as_deref(), Some("ns/au"));
    // CUSTOM fails closed when it matches.
    let c = policy("c", Action::Custom { provider: "ext".into() }, vec![Rule::default()]);
    assert!(!allowed(vec![c], &r));
}

#[test]
fn dry_run_never_enforces() {
    let r = Req::default();
    let mut d = policy("d", Action::Deny, vec![Rule::default()]);
    d.dry_run = true;
    let decision = AuthzPolicies::new(vec![d]).evaluate(&r.view());
    assert!(decision.allowed);
    let dry = decision.dry_run.unwrap();
    assert!(!dry.allowed);
    assert_eq!(dry.policy.as_deref(), Some("ns/d"));
    let mut a = policy("a", Action::Allow, vec![]);
    a.dry_run = true;
    let decision = AuthzPolicies::new(vec![a]).evaluate(&r.view());
    assert!(decision.allowed);
    assert!(!decision.dry_run.unwrap().allowed);
}

#[test]
fn source_fields() {
    let r = Req::default();
    let src = |f: fn(&mut Source)| {
        let mut s = Source::default();
        f(&mut s);
        from(s)
    };
    assert!(rule_matches(
        src(|s| s.principals = super::tests::s(&["cluster.local/ns/front/sa/web"])),
        &r
    ));
    assert!(rule_matches(src(|s| s.principals = super::tests::s(&["*/sa/web"])), &r));
    assert!(rule_matches(src(|s| s.principals = super::tests::s(&["*"])), &r));
    assert!(!rule_matches(
        src(|s| s.principals = super::tests::s(&["cluster.local/ns/back/sa/web"])),
        &r
    ));
    assert!(!rule_matches(
        src(|s| s.not_principals = super::tests::s(&["cluster.local/ns/front/*"])),
        &r
    ));
    assert!(rule_matches(
        src(|s| s.not_principals = super::tests::s(&["cluster.local/ns/back/*"])),
        &r
    ));
    assert!(rule_matches(src(|s| s.namespaces = super::tests::s(&["front"])), &r));
    assert!(rule_matches(src(|s| s.namespaces = super::tests::s(&["fr*"])), &r));
    assert!(!rule_matches(src(|s| s.namespaces = super::tests::s(&["back"])), &r));
    assert!(!rule_matches(
        src(|s| s.not_namespaces = super::tests::s(&["front"])),
        &r
    ));
    assert!(rule_matches(src(|s| s.ip_blocks = cidrs(&["10.1.0.0/16"])), &r));
    assert!(!rule_matches(src(|s| s.ip_blocks = cidrs(&["10.2.0.0/16"])), &r));
    assert!(!rule_matches(src(|s| s.not_ip_blocks = cidrs(&["10.1.0.5"])), &r));
    assert!(rule_matches(src(|s| s.remote_ip_blocks = cidrs(&["192.0.2.0/24"])), &r));
    assert!(!rule_matches(
        src(|s| s.not_remote_ip_blocks = cidrs(&["192.0.2.0/24"])),
        &r
    ));
    assert!(!rule_matches(src(|s| s.remote_ip_blocks = cidrs(&["10.1.0.5"])), &r));
    // No peer identity: principals and namespaces cannot match, their `not` forms do.
    let anon = Req {
        peer: None,
        ..Req::default()
    };
    assert!(!rule_matches(src(|s| s.principals = super::tests::s(&["*"])), &anon));
    assert!(!rule_matches(src(|s| s.namespaces = super::tests::s(&["*"])), &anon));
    assert!(rule_matches(
        src(|s| s.not_namespaces = super::tests::s(&["front"])),
        &anon
    ));
}

#[test]
fn request_principals() {
    let rp = |v: &[&str], not: &[&str]| {
        from(Source {
            request_principals: v.iter().map(|x| PrincipalMatch::parse(x)).collect(),
            not_request_principals: not.iter().map(|x| PrincipalMatch::parse(x)).collect(),
            ..Default::default()
        })
    };
    let anon = Req::default();
    let alice = Req {
        auth: Some(auth("https://iss", "alice", json!({}))),
        ..Req::default()
    };
    assert!(!rule_matches(rp(&["*"], &[]), &anon));
    assert!(rule_matches(rp(&["*"], &[]), &alice));
    assert!(rule_matches(rp(&["https://iss/alice"], &[]), &alice));
    assert!(!rule_matches(rp(&["https://iss/bob"], &[]), &alice));
    // DENY notRequestPrincipals ["*"] = "deny requests without a token".
    assert!(rule_matches(rp(&[], &["*"]), &anon));
    assert!(!rule_matches(rp(&[], &["*"]), &alice));
}

#[test]
fn operation_fields() {
    let r = Req {
        host: "echo.ns:8080",
        method: "POST",
        path: "/admin/users",
        ..Req::default()
    };
    let op = |f: fn(&mut Operation)| {
        let mut o = Operation::default();
        f(&mut o);
        to(o)
    };
    assert!(rule_matches(
        op(|o| o.hosts = vec![StringMatch::parse_lowercase("ECHO.ns:8080")]),
        &r
    ));
    assert!(rule_matches(
        op(|o| o.hosts = vec![StringMatch::parse_lowercase("echo.ns*")]),
        &r
    ));
    assert!(!rule_matches(
        op(|o| o.hosts = vec![StringMatch::parse_lowercase("echo.ns")]),
        &r
    ));
    assert!(!rule_matches(
        op(|o| o.not_hosts = vec![StringMatch::parse_lowercase("*:8080")]),
        &r
    ));
    assert!(rule_matches(op(|o| o.ports = vec![80]), &r));
    assert!(!rule_matches(op(|o| o.ports = vec![8080]), &r));
    assert!(!rule_matches(op(|o| o.not_ports = vec![80]), &r));
    assert!(rule_matches(op(|o| o.methods = s(&["GET", "POST"])), &r));
    assert!(rule_matches(op(|o| o.methods = s(&["*"])), &r));
    assert!(!rule_matches(op(|o| o.not_methods = s(&["POST"])), &r));
    assert!(rule_matches(op(|o| o.paths = paths(&["/admin", "/admin/*"])), &r));
    assert!(rule_matches(op(|o| o.paths = paths(&["*/users"])), &r));
    assert!(rule_matches(op(|o| o.paths = paths(&["/{*}/users"])), &r));
    assert!(!rule_matches(op(|o| o.paths = paths(&["/admin"])), &r));
    assert!(!rule_matches(op(|o| o.not_paths = paths(&["/admin/*"])), &r));
    // Several values within a field are OR, several fields are AND, several operations are OR.
    let both = Rule {
        to: vec![
            Operation {
                methods: s(&["GET"]),
                ..Default::default()
            },
            Operation {
                methods: s(&["POST"]),
                paths: paths(&["/admin/*"]),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    assert!(rule_matches(both, &r));
    let and = to(Operation {
        methods: s(&["POST"]),
        paths: paths(&["/public"]),
        ..Default::default()
    });
    assert!(!rule_matches(and, &r));
}

#[test]
fn conditions() {
    let mut headers = HeaderMap::new();
    headers.append("x-team", "a".parse().unwrap());
    headers.append("x-team", "pay".parse().unwrap());
    headers.insert("user-agent", "Mozilla/5.0".parse().unwrap());
    let claims = json!({"groups": ["admins", "dev"], "org": {"team": "payments"}, "scope": "read write", "level": 3});
    let r = Req {
        headers,
        auth: Some(auth("https://iss", "alice", claims)),
        ..Req::default()
    };
    let ok = |key: &str, v: &[&str]| rule_matches(when(key, v, &[]), &r);
    let not = |key: &str, v: &[&str]| rule_matches(when(key, &[], v), &r);
    assert!(ok("request.headers[User-Agent]", &["Mozilla/*"]));
    assert!(ok("request.headers[x-team]", &["pay"]));
    assert!(ok("request.headers[x-team]", &["a,pay"]));
    assert!(ok("request.headers[x-team]", &["*"]));
    assert!(!ok("request.headers[x-missing]", &["*"]));
    assert!(not("request.headers[x-missing]", &["*"]));
    assert!(ok("source.ip", &["10.1.0.0/16"]));
    assert!(ok("remote.ip", &["192.0.2.7"]));
    assert!(!ok("remote.ip", &["10.1.0.5"]));
    assert!(ok("source.namespace", &["front"]));
    assert!(ok("source.principal", &["cluster.local/ns/front/sa/web"]));
    assert!(not("source.principal", &["cluster.local/ns/back/*"]));
    assert!(ok("request.auth.principal", &["https://iss/alice"]));
    assert!(ok("request.auth.principal", &["*"]));
    assert!(ok("request.auth.audiences", &["aud1"]));
    assert!(!ok("request.auth.audiences", &["aud2"]));
    assert!(ok("request.auth.presenter", &["web-*"]));
    assert!(ok("request.auth.claims[groups]", &["admins"]));
    assert!(!ok("request.auth.claims[groups]", &["ops"]));
    assert!(ok("request.auth.claims[org][team]", &["payments"]));
    assert!(!ok("request.auth.claims[org]", &["payments"]));
    assert!(ok("request.auth.claims[scope]", &["write"]));
    assert!(!ok("request.auth.claims[level]", &["3"]));
    assert!(ok("destination.ip", &["10.96.0.0/12"]));
    assert!(ok("destination.port", &["80"]));
    assert!(not("destination.port", &["8080"]));
    assert!(ok("connection.sni", &["*.example"]));
    // No token: request.auth.* never match; their notValues do.
    let anon = Req::default();
    assert!(!rule_matches(
        when("request.auth.claims[groups]", &["admins"], &[]),
        &anon
    ));
    assert!(rule_matches(when("request.auth.principal", &[], &["*"]), &anon));
}

#[test]
fn condition_errors() {
    let e = |k: &str, v: &[&str]| {
        Condition::parse(k, &v.iter().map(|x| x.to_string()).collect::<Vec<_>>(), &[]).unwrap_err()
    };
    assert_eq!(
        e("experimental.envoy.filters.http.foo[bar]", &["x"]),
        ConditionError::EnvoyMetadata
    );
    assert!(matches!(e("request.other", &["x"]), ConditionError::UnknownKey(_)));
    assert!(matches!(e("request.headers", &["x"]), ConditionError::Brackets(..)));
    assert!(matches!(e("request.headers[]", &["x"]), ConditionError::Brackets(..)));
    assert!(matches!(
        e("request.headers[bad name]", &["x"]),
        ConditionError::HeaderName(_)
    ));
    assert!(matches!(
        e("request.auth.claims[a][]", &["x"]),
        ConditionError::Brackets(..)
    ));
    assert!(matches!(e("source.ip", &["10.0.0.0/40"]), ConditionError::Value(_)));
    assert!(matches!(e("destination.port", &["http"]), ConditionError::Value(_)));
    assert_eq!(e("source.ip", &[]), ConditionError::NoValues);
}

#[test]
fn tcp_streams_follow_istio() {
    let r = Req::default();
    let http_rule = to(Operation {
        paths: vec![PathMatch::parse("/admin").unwrap()],
        ..Default::default()
    });
    // An ALLOW rule with HTTP fields never matches a TCP stream…
    let p = AuthzPolicies::new(vec![policy("a", Action::Allow, vec![http_rule.clone()])]);
    assert!(!p.evaluate(&r.tcp()).allowed);
    // …and a DENY rule ignores them (denies the stream).
    let p = AuthzPolicies::new(vec![policy("d", Action::Deny, vec![http_rule])]);
    assert!(!p.evaluate(&r.tcp()).allowed);
    assert!(p.evaluate(&r.view()).allowed);
    let ns = from(Source {
        namespaces: s(&["front"]),
        ..Default::default()
    });
    let p = AuthzPolicies::new(vec![policy("a", Action::Allow, vec![ns])]);
    assert!(p.evaluate(&r.tcp()).allowed);
    let conn = ConnectionInfo {
        peer_principal: Some("cluster.local/ns/back/sa/x".into()),
        ..Default::default()
    };
    assert!(!p.evaluate(&conn.tcp_request()).allowed);
}

#[tokio::test]
async fn layer_denies_403_rbac_and_normalizes() {
    let echo = tower::service_fn(|req: Request<crate::Body>| async move {
        Ok::<_, std::convert::Infallible>(http::Response::new(full_body(req.uri().to_string())))
    });
    let counters = Arc::new(DecisionCounters::default());
    let svc = AuthzLayer::with_observer(counters.clone()).layer(echo);
    let deny_admin = policy(
        "deny-admin",
        Action::Deny,
        vec![to(Operation {
            paths: vec![
                PathMatch::parse("/admin").unwrap(),
                PathMatch::parse("/admin/*").unwrap(),
            ],
            ..Default::default()
        })],
    );
    let allow_front = policy(
        "front",
        Action::Allow,
        vec![from(Source {
            namespaces: s(&["front"]),
            ..Default::default()
        })],
    );
    let policies = Arc::new(AuthzPolicies::new(vec![deny_admin, allow_front]));
    let conn = |ns: &str| ConnectionInfo {
        peer_principal: Some(format!("cluster.local/ns/{ns}/sa/default").into()),
        source_ip: "10.0.0.1".parse().ok(),
        destination: "10.96.0.1:80".parse().ok(),
        sni: None,
    };
    let send = |path: &str, ns: &str| {
        let mut req = Request::builder()
            .uri(path)
            .header("host", "echo")
            .body(empty_body())
            .unwrap();
        req.extensions_mut().insert(policies.clone());
        req.extensions_mut().insert(conn(ns));
        svc.clone().oneshot(req)
    };
    let res = send("/admin", "front").await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        res.extensions().get::<crate::context::ResponseFlag>(),
        Some(&crate::context::ResponseFlag("RBAC"))
    );
    assert_eq!(body_bytes(res.into_body()).await, "RBAC: access denied");
    assert_eq!(
        send("/public/../admin/x", "front").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let res = send("/public/./a?q=1", "front").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_bytes(res.into_body()).await, "/public/a?q=1");
    assert_eq!(send("/administrator", "front").await.unwrap().status(), StatusCode::OK);
    assert_eq!(send("/public", "other").await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(counters.allowed.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(counters.denied.load(std::sync::atomic::Ordering::Relaxed), 3);
    // No policies: passes.
    let req = Request::builder().uri("/admin").body(empty_body()).unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
}

/// An ext_authz server stand-in: decides by path, records what it was asked.
struct FakeExtAuthz {
    seen: std::sync::Mutex<Vec<(String, CheckInput)>>,
}

impl ExtAuthz for FakeExtAuthz {
    fn check(&self, provider: &str, req: CheckInput) -> BoxFuture<CheckOutcome> {
        let outcome = match req.path.as_str() {
            p if p.starts_with("/allow") => CheckOutcome::Allow {
                upstream: HeaderEdits {
                    set: vec![("x-user".parse().unwrap(), "alice".parse().unwrap())],
                    ..Default::default()
                },
                downstream: HeaderEdits {
                    append: vec![("x-authz".parse().unwrap(), "ok".parse().unwrap())],
                    ..Default::default()
                },
            },
            p if p.starts_with("/deny") => {
                let mut headers = HeaderMap::new();
                headers.insert("x-reason", "nope".parse().unwrap());
                CheckOutcome::Deny {
                    status: StatusCode::UNAUTHORIZED,
                    headers,
                    body: bytes::Bytes::from_static(b"go away"),
                }
            }
            p => CheckOutcome::Error {
                reason: "unreachable".into(),
                fail_open: p.starts_with("/open"),
                status_on_error: StatusCode::SERVICE_UNAVAILABLE,
            },
        };
        self.seen.lock().unwrap().push((provider.to_string(), req));
        Box::pin(std::future::ready(outcome))
    }
}

struct CustomCase {
    svc: AuthzService<
        tower::util::BoxCloneSyncService<Request<crate::Body>, http::Response<crate::Body>, std::convert::Infallible>,
    >,
    policies: Arc<AuthzPolicies>,
    fake: Arc<FakeExtAuthz>,
    counters: Arc<DecisionCounters>,
}

impl CustomCase {
    /// CUSTOM on every path but `/skip*`; DENY on `*/secret`. The upstream echoes `x-user`.
    fn new() -> CustomCase {
        let echo = tower::service_fn(|req: Request<crate::Body>| async move {
            let user = req.headers().get("x-user").cloned();
            let mut resp = http::Response::new(full_body(req.uri().to_string()));
            if let Some(u) = user {
                resp.headers_mut().insert("x-user-seen", u);
            }
            Ok::<_, std::convert::Infallible>(resp)
        });
        let counters = Arc::new(DecisionCounters::default());
        let svc = AuthzLayer::with_observer(counters.clone()).layer(tower::util::BoxCloneSyncService::new(echo));
        let custom = policy(
            "ext",
            Action::Custom {
                provider: "my-ext".into(),
            },
            vec![to(Operation {
                not_paths: paths(&["/skip*"]),
                ..Default::default()
            })],
        );
        let deny = policy(
            "deny-secret",
            Action::Deny,
            vec![to(Operation {
                paths: paths(&["*/secret"]),
                ..Default::default()
            })],
        );
        CustomCase {
            svc,
            policies: Arc::new(AuthzPolicies::new(vec![deny, custom])),
            fake: Arc::new(FakeExtAuthz {
                seen: Default::default(),
            }),
            counters,
        }
    }

    async fn send(&self, path: &str) -> http::Response<crate::Body> {
        let mut req = Request::builder()
            .uri(path)
            .header("host", "echo")
            .header("authorization", "Bearer t")
            .body(empty_body())
            .unwrap();
        req.extensions_mut().insert(self.policies.clone());
        req.extensions_mut().insert(ConnectionInfo {
            peer_principal: Some("cluster.local/ns/front/sa/web".into()),
            source_ip: "10.0.0.1".parse().ok(),
            destination: "10.96.0.1:80".parse().ok(),
            sni: None,
        });
        let client: Arc<dyn ExtAuthz> = self.fake.clone();
        req.extensions_mut().insert(client);
        self.svc.clone().oneshot(req).await.unwrap()
    }

    fn asked(&self) -> usize {
        self.fake.seen.lock().unwrap().len()
    }
}

fn flag(res: &http::Response<crate::Body>) -> Option<&'static str> {
    res.extensions().get::<crate::context::ResponseFlag>().map(|f| f.0)
}

#[tokio::test]
async fn custom_allow_adds_headers_upstream_and_downstream() {
    let case = CustomCase::new();
    let res = case.send("/allow/x?q=1").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-user-seen"], "alice");
    assert_eq!(res.headers()["x-authz"], "ok");
    assert_eq!(body_bytes(res.into_body()).await, "/allow/x?q=1");
    let seen = case.fake.seen.lock().unwrap();
    let (provider, input) = &seen[0];
    assert_eq!(provider, "my-ext");
    assert_eq!(input.path, "/allow/x?q=1");
    assert_eq!(input.host, "echo");
    assert_eq!(input.method, http::Method::GET);
    assert_eq!(input.headers["authorization"], "Bearer t");
    assert_eq!(input.peer_principal.as_deref(), Some("cluster.local/ns/front/sa/web"));
    assert_eq!(input.destination, "10.96.0.1:80".parse().ok());
}

#[tokio::test]
async fn custom_deny_returns_the_servers_reply() {
    let case = CustomCase::new();
    let res = case.send("/deny").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(flag(&res), Some("UAEX"));
    assert_eq!(res.headers()["x-reason"], "nope");
    assert_eq!(body_bytes(res.into_body()).await, "go away");
    assert_eq!(case.counters.denied.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn custom_error_fail_open_continues_and_fail_closed_refuses() {
    let case = CustomCase::new();
    let res = case.send("/open").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("x-user-seen").is_none());
    let res = case.send("/closed").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flag(&res), Some("UAEX"));
}

#[tokio::test]
async fn custom_runs_before_deny_and_only_when_it_matches() {
    let case = CustomCase::new();
    // The ext_authz server refuses first: its reply, not RBAC's.
    let res = case.send("/deny/secret").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(flag(&res), Some("UAEX"));
    // Allowed by the server, then refused by the DENY policy.
    let res = case.send("/allow/secret").await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(flag(&res), Some("RBAC"));
    assert_eq!(case.asked(), 2);
    // The CUSTOM policy does not match: the server is not asked.
    let res = case.send("/skip").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(case.asked(), 2);
    let res = case.send("/skip/secret").await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(case.asked(), 2);
}

#[tokio::test]
async fn custom_without_client_fails_closed() {
    let case = CustomCase::new();
    let mut req = Request::builder().uri("/allow").body(empty_body()).unwrap();
    req.extensions_mut().insert(case.policies.clone());
    let res = case.svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(flag(&res), Some("UAEX"));
}
