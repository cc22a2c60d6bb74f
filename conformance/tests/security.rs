//! RequestAuthentication and AuthorizationPolicy through the real waypoint: tokens signed by a key set that a
//! JWKS server on loopback rotates, peers with distinct SPIFFE identities, and TCP tunnels closed when the
//! policy changes under them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint_conformance::client::{self, empty};
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};

const NS: &str = "app";
const ISSUER: &str = "https://issuer.waypoint.test";

struct Key {
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
}

fn new_key(kid: &str) -> Key {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let encoding = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    Key {
        kid: kid.to_string(),
        encoding,
        jwk,
    }
}

fn token(key: &Key, sub: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({"iss": ISSUER, "sub": sub, "aud": "shop", "iat": now, "exp": now + 600});
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap()
}

/// A JWKS endpoint on its own loopback address; `publish` replaces the key set it serves.
struct JwksServer {
    addr: SocketAddr,
    keys: Arc<Mutex<JwkSet>>,
}

impl JwksServer {
    async fn start(initial: &Key) -> JwksServer {
        let ip = waypoint_conformance::net::unique_loopback_ip();
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let keys = Arc::new(Mutex::new(JwkSet {
            keys: vec![initial.jwk.clone()],
        }));
        let served = keys.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let served = served.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let body = serde_json::to_vec(&*served.lock().unwrap()).unwrap();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        JwksServer { addr, keys }
    }

    fn publish(&self, key: &Key) {
        *self.keys.lock().unwrap() = JwkSet {
            keys: vec![key.jwk.clone()],
        };
    }
}

fn policies(jwks: SocketAddr) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: {NS}}}
spec:
  targetRefs: [{{group: '', kind: Service, name: api}}]
  jwtRules:
  - issuer: {ISSUER}
    audiences: [shop]
    jwksUri: http://{jwks}/jwks.json
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: post-needs-jwt, namespace: {NS}}}
spec:
  targetRefs: [{{group: '', kind: Service, name: api}}]
  action: DENY
  rules:
  - from: [{{source: {{notRequestPrincipals: ['*']}}}}]
    to: [{{operation: {{methods: [POST]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: admin-from-frontend, namespace: {NS}}}
spec:
  targetRefs: [{{group: '', kind: Service, name: api}}]
  action: DENY
  rules:
  - from: [{{source: {{notNamespaces: [frontend]}}}}]
    to: [{{operation: {{paths: [/admin, /admin/*]}}}}]
"
    )
}

async fn mesh(extra: &str) -> Mesh {
    Mesh::builder()
        .service(
            ServiceSpec::new(NS, "api", Ipv4Addr::new(10, 96, 9, 1))
                .port(PortSpec::http(80, 8080))
                .port(PortSpec::tcp(9000, 9000)),
        )
        .pod(PodSpec::new(NS, "api-0").labels(&[("app", "api")]))
        .extra_config(extra)
        .start()
        .await
        .expect("mesh starts")
}

async fn call(mesh: &Mesh, ns: &str, method: &str, path: &str, bearer: Option<&str>) -> client::Reply {
    let source = mesh.source(ns, "client").unwrap();
    let mut req = Request::builder().method(method).uri(path).header("host", "api");
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    client::request(&source, &mesh.authority(NS, "api", 80), req.body(empty()).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_and_authorization_policy_end_to_end_with_key_rotation() {
    let k1 = new_key("k1");
    let jwks = JwksServer::start(&k1).await;
    let mesh = mesh(&policies(jwks.addr)).await;

    assert_eq!(call(&mesh, "web", "GET", "/public", None).await.status, StatusCode::OK);
    let denied = call(&mesh, "web", "POST", "/orders", None).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN, "POST without a token");
    assert_eq!(denied.text(), "RBAC: access denied");
    let ok = call(&mesh, "web", "POST", "/orders", Some(&token(&k1, "alice"))).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let bad = call(&mesh, "web", "POST", "/orders", Some("not.a.jwt")).await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert!(bad.headers.contains_key("www-authenticate"));

    // Only namespace frontend may reach /admin, whatever the token.
    assert_eq!(
        call(&mesh, "frontend", "GET", "/admin/users", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&mesh, "web", "GET", "/admin", None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&mesh, "web", "GET", "/administrator", None).await.status,
        StatusCode::OK
    );

    // The issuer rotates to a new key: a token with the unknown kid makes the waypoint refetch the set.
    let k2 = new_key("k2");
    jwks.publish(&k2);
    let rotated = call(&mesh, "web", "POST", "/orders", Some(&token(&k2, "bob"))).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    // The retired key is gone from the set the waypoint now holds.
    let old = call(&mesh, "web", "POST", "/orders", Some(&token(&k1, "alice"))).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_tunnels_are_judged_at_open_and_closed_when_policy_turns_against_them() {
    let mesh = mesh("").await;
    let app = mesh.app().unwrap();
    let mut changes = app.config().subscribe();
    let source = mesh.source("web", "client").unwrap();
    let mut tunnel = source.connect(&mesh.authority(NS, "api", 9000)).await.unwrap();
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    let deny_web = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-web, namespace: {NS}}}
spec:
  targetRefs: [{{group: '', kind: Service, name: api}}]
  action: DENY
  rules: [{{from: [{{source: {{namespaces: [web]}}}}]}}]
"
    );
    mesh.rewrite_config(&[&deny_web]).unwrap();
    changes.wait_for(|(g, _)| *g >= 2).await.unwrap();
    // The live tunnel is closed by the waypoint: the read ends instead of echoing.
    let _ = tunnel.write_all(b"more").await;
    let mut rest = Vec::new();
    let read = tunnel.read_to_end(&mut rest).await;
    assert!(read.is_err() || rest.is_empty(), "tunnel must be closed, got {rest:?}");

    // New tunnels from web are refused at CONNECT; other namespaces still get through.
    let err = source
        .connect(&mesh.authority(NS, "api", 9000))
        .await
        .map(|_| ())
        .expect_err("refused");
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN));
    let other = mesh.source("batch", "client").unwrap();
    let mut t = other.connect(&mesh.authority(NS, "api", 9000)).await.unwrap();
    t.write_all(b"ok").await.unwrap();
    t.read_exact(&mut buf[..2]).await.unwrap();
    assert_eq!(&buf[..2], b"ok");
}

#[tokio::test]
async fn invalid_policy_fields_are_rejected_naming_the_field() {
    let mesh = mesh("").await;
    let app = mesh.app().unwrap();
    let mut changes = app.config().subscribe();
    let bad = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: bad, namespace: {NS}}}
spec:
  targetRefs: [{{group: '', kind: Service, name: api}}]
  rules: [{{when: [{{key: experimental.envoy.filters.foo, values: [x]}}]}}]
"
    );
    mesh.rewrite_config(&[&bad]).unwrap();
    changes.wait_for(|(_, rejected)| *rejected >= 1).await.unwrap();
    let err = app.config().last_error().unwrap();
    assert!(
        err.contains("AuthorizationPolicy app/bad") && err.contains("when"),
        "{err}"
    );
}
