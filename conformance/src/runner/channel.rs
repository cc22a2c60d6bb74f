//! How a case's requests travel: through a Gateway (`entry`: a client outside the mesh's workloads, speaking to
//! the Gateway address) or from a mesh workload (`client`: the first pod matching a selector, whose ztunnel
//! carries the request to the waypoint). Builds the wire request from the case as the conventions say, sends
//! it, follows redirects when asked, and turns the response into an [`Observed`].

use std::net::Ipv4Addr;
use std::time::Duration;

use super::cases::{CaseSpec, ClientSpec, Entry, RequestSpec, Selector, TestSpec};
use super::env::Environment;
use super::expect::{self, RequestFacts, is_redirect};
use super::headers;
use super::location;
use super::observe::{self, Observed};
use super::request::{self, GRPC_ECHO_PATH, HttpRequest, Wire};
use super::target::{self, gateway_host, split_host_port};
use super::world::{PodInfo, TestWorld, parse_selector};
use crate::source_ztunnel::SourceZtunnel;

/// Go's http.Client gives up after 10 redirects.
const MAX_REDIRECTS: usize = 10;

/// Why a case cannot run at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRunnable {
    /// A true limit of a waypoint; the case is skipped with this reason.
    Skip(String),
    Fail(String),
}

#[derive(Clone)]
pub enum Channel {
    Gateway {
        entry: Entry,
        vip: Ipv4Addr,
        source: SourceZtunnel,
    },
    Mesh {
        client: PodInfo,
        source: SourceZtunnel,
    },
}

/// A request ready to send, with what the checks need to know about it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub http: HttpRequest,
    pub scheme: String,
    pub follow_redirects: bool,
    pub mesh: bool,
}

impl Prepared {
    pub fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            method: &self.http.method,
            scheme: &self.scheme,
            path: &self.http.path,
        }
    }
}

impl Channel {
    pub fn for_case(
        env: &Environment,
        world: &TestWorld,
        test: &TestSpec,
        case: &CaseSpec,
    ) -> Result<Channel, NotRunnable> {
        let fail = |e: String| NotRunnable::Fail(e);
        let entry = case
            .entry
            .as_ref()
            .or(case.request.entry.as_ref())
            .or(test.entry.as_ref().and_then(|e| e.given()));
        let client = case
            .request
            .client
            .as_ref()
            .or(test.client.as_ref().and_then(|c| c.given()));
        if let Some(entry) = entry {
            let gateway = world.gateway(&entry.namespace, &entry.gateway).ok_or_else(|| {
                fail(format!(
                    "Gateway {}/{} is not in the test's manifests",
                    entry.namespace, entry.gateway
                ))
            })?;
            let listener = gateway.listeners.iter().find(|l| l.port == entry.listener_port);
            let tls_listener = listener.is_some_and(|l| matches!(l.protocol.as_str(), "HTTPS" | "TLS"));
            let https = entry.scheme.eq_ignore_ascii_case("https")
                || case.request.protocol.as_deref() == Some("HTTPS")
                || entry.tls.is_some();
            if tls_listener || https {
                return Err(NotRunnable::Skip(format!(
                    "Gateway {}/{} port {} terminates client TLS; a waypoint receives mTLS HBONE tunnels from \
                     ztunnel and has no client-facing TLS listener",
                    entry.namespace, entry.gateway, entry.listener_port
                )));
            }
            return Ok(Channel::Gateway {
                entry: entry.clone(),
                vip: gateway.vip,
                source: env.gateway_source().map_err(fail)?,
            });
        }
        let Some(client) = client else {
            return Err(fail(
                "the case names neither an entry (Gateway) nor a client (mesh workload)".into(),
            ));
        };
        let pod = select_client(world, client).map_err(fail)?;
        Ok(Channel::Mesh {
            source: env.pod_source(&pod).map_err(fail)?,
            client: pod,
        })
    }

    pub fn source(&self) -> &SourceZtunnel {
        match self {
            Channel::Gateway { source, .. } | Channel::Mesh { source, .. } => source,
        }
    }

    /// The Gateway address as a Go client would write it in a URL (`vip`, or `vip:port` off the default port).
    pub fn gateway_address(&self) -> Option<String> {
        match self {
            Channel::Gateway { entry, vip, .. } => Some(gateway_host(*vip, entry.listener_port, &entry.scheme)),
            Channel::Mesh { .. } => None,
        }
    }

    /// The CONNECT authority of the Gateway listener.
    pub fn gateway_authority(&self) -> Option<String> {
        match self {
            Channel::Gateway { entry, vip, .. } => Some(format!("{vip}:{}", entry.listener_port)),
            Channel::Mesh { .. } => None,
        }
    }

    pub fn prepare(&self, world: &TestWorld, request: &RequestSpec) -> Result<Prepared, String> {
        match self {
            Channel::Gateway { entry, vip, .. } => prepare_gateway(entry, *vip, request),
            Channel::Mesh { client, .. } => prepare_mesh(client, world, request),
        }
    }

    /// Sends `prepared` (following redirects when it asks to) and observes the final response.
    pub async fn exchange(
        &self,
        world: &TestWorld,
        prepared: &Prepared,
        timeout: Duration,
    ) -> Result<Observed, String> {
        let mut current = prepared.http.clone();
        for _ in 0..=MAX_REDIRECTS {
            let response = request::send(self.source(), &current, timeout)
                .await
                .map_err(|e| format!("{} {} via {}: {e}", current.method, current.path, current.authority))?;
            let observed = if prepared.mesh {
                observe::mesh(response, current.wire == Wire::Grpc)
            } else {
                observe::gateway(response, &current.method)
            };
            if !prepared.follow_redirects || !is_redirect(observed.status) {
                return Ok(observed);
            }
            let Some(location) = observed.location() else {
                return Ok(observed);
            };
            current = self.follow(world, &current, observed.status, location)?;
        }
        Err(format!("stopped after {MAX_REDIRECTS} redirects"))
    }

    /// Sends, then checks `expect` the way this channel's profile compares.
    pub async fn exchange_and_check(
        &self,
        world: &TestWorld,
        prepared: &Prepared,
        expect: &super::cases::ExpectSpec,
        not_asserted_upstream: &[String],
        timeout: Duration,
    ) -> Result<Observed, String> {
        let observed = self.exchange(world, prepared, timeout).await?;
        if prepared.mesh {
            expect::check_mesh(expect, &observed, &prepared.facts(), not_asserted_upstream)?;
        } else {
            expect::check_gateway(expect, &observed, &prepared.facts())?;
        }
        Ok(observed)
    }

    /// The request a client makes after a redirect: only to addresses this mesh has (the Gateway itself, or a
    /// mesh Service / pod); Go switches to GET after 301/302/303.
    fn follow(&self, world: &TestWorld, current: &HttpRequest, status: u16, raw: &str) -> Result<HttpRequest, String> {
        let loc = location::parse(raw);
        let scheme = if loc.scheme.is_empty() {
            "http"
        } else {
            loc.scheme.as_str()
        };
        if scheme != "http" {
            return Err(format!(
                "redirected to {raw:?}: only http redirects can be followed here"
            ));
        }
        let mut next = current.clone();
        if !loc.host.is_empty() {
            let authority = if loc.port.is_empty() {
                loc.host.clone()
            } else {
                format!("{}:{}", loc.host, loc.port)
            };
            match self {
                Channel::Gateway { entry, vip, .. } => {
                    let (current_host, _) = split_host_port(&current.host);
                    let port = if loc.port.is_empty() {
                        80
                    } else {
                        loc.port.parse().unwrap_or(0)
                    };
                    if (loc.host != current_host && loc.host != vip.to_string()) || port != entry.listener_port {
                        return Err(format!("redirected to {raw:?}, which is not this Gateway listener"));
                    }
                }
                Channel::Mesh { client, .. } => {
                    let resolved = target::resolve(&authority, "http", &client.namespace, world)
                        .map_err(|e| format!("redirected to {raw:?}: {e}"))?;
                    next.authority = resolved.authority;
                }
            }
            next.host = authority;
        }
        next.path = if loc.request_target.is_empty() {
            "/".into()
        } else {
            loc.request_target.clone()
        };
        if matches!(status, 301..=303) && current.method != "HEAD" {
            next.method = "GET".into();
        }
        Ok(next)
    }
}

fn select_client(world: &TestWorld, client: &ClientSpec) -> Result<PodInfo, String> {
    let selector = match &client.pod_selector {
        Selector::Text(text) => parse_selector(text)?,
        Selector::Map(map) => map.clone(),
    };
    world
        .select_pod(&client.namespace, &selector)
        .cloned()
        .ok_or_else(|| format!("no pod in {} matches {selector:?}", client.namespace))
}

fn prepare_gateway(entry: &Entry, vip: Ipv4Addr, request: &RequestSpec) -> Result<Prepared, String> {
    let mut headers_out = Vec::new();
    let mut host_header = None;
    for (name, value) in &request.headers {
        if name.eq_ignore_ascii_case("host") {
            host_header = Some(value.clone());
        } else {
            headers::set(&mut headers_out, name, value);
        }
    }
    let echo_set: Vec<String> = request
        .echo_set_response_headers
        .iter()
        .map(|(n, v)| format!("{n}:{v}"))
        .collect();
    headers::set(&mut headers_out, "X-Echo-Set-Header", &echo_set.join(","));
    let wire = match request.protocol.as_deref() {
        None | Some("") | Some("HTTP") | Some("HTTP/1.1") => Wire::Http1,
        Some("H2C_PRIOR_KNOWLEDGE") => Wire::H2c,
        Some(other) => return Err(format!("request protocol {other:?} is not supported")),
    };
    let host = request
        .host
        .clone()
        .or(host_header)
        .unwrap_or_else(|| gateway_host(vip, entry.listener_port, &entry.scheme));
    Ok(Prepared {
        http: HttpRequest {
            authority: format!("{vip}:{}", entry.listener_port),
            method: request.method.clone().unwrap_or_else(|| "GET".into()),
            host,
            path: request
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
            headers: headers_out,
            wire,
            connection_close: wire == Wire::Http1,
        },
        scheme: entry.scheme.clone(),
        follow_redirects: request.follow_redirects.unwrap_or(true),
        mesh: false,
    })
}

fn prepare_mesh(client: &PodInfo, world: &TestWorld, request: &RequestSpec) -> Result<Prepared, String> {
    let scheme = request.scheme.clone().unwrap_or_else(|| "http".into());
    let wire = match scheme.as_str() {
        "http" => Wire::Http1,
        "grpc" => Wire::Grpc,
        other => return Err(format!("scheme {other:?} is not supported by the mesh client")),
    };
    let target = request.target.as_deref().ok_or("the request has no target")?;
    let resolved = match target::resolve(target, &scheme, &client.namespace, world) {
        Ok(resolved) => resolved,
        Err(e) => resolve_by_addresses(target, request, world).ok_or(e)?,
    };
    let mut headers_out = Vec::new();
    let mut host = request.host.clone().unwrap_or_else(|| resolved.host.clone());
    for (name, value) in &request.headers {
        if name.eq_ignore_ascii_case("host") {
            host = value.clone();
        } else if wire == Wire::Grpc {
            // gRPC metadata keys are lower-case on the wire.
            headers_out.push((name.to_ascii_lowercase(), value.clone()));
        } else {
            headers::set(&mut headers_out, name, value);
        }
    }
    let (method, path) = if wire == Wire::Grpc {
        ("POST".to_string(), GRPC_ECHO_PATH.to_string())
    } else {
        (
            request.method.clone().unwrap_or_else(|| "GET".into()),
            request
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
        )
    };
    Ok(Prepared {
        http: HttpRequest {
            authority: resolved.authority,
            method,
            host,
            path,
            headers: headers_out,
            wire,
            connection_close: false,
        },
        scheme,
        // The Istio echo client returns a redirect as is unless told otherwise; Go's http.Client follows.
        follow_redirects: request.follow_redirects.unwrap_or(false),
        mesh: true,
    })
}

/// When cluster DNS finds nothing for the target, the case's `addresses` (the Service the file's author says
/// the target designates) decide, so a file whose target and addresses disagree still tests what it means.
fn resolve_by_addresses(target: &str, request: &RequestSpec, world: &TestWorld) -> Option<target::ResolvedTarget> {
    let addresses = request.addresses.as_ref()?;
    let (namespace, name) = addresses.service.as_deref()?.split_once('/')?;
    let vip = world.service(namespace, name)?.vip?;
    let port = addresses.port?;
    Some(target::ResolvedTarget {
        authority: format!("{vip}:{port}"),
        host: target.to_string(),
        kind: target::TargetKind::Service {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port,
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::runner::world::ServiceInfo;
    use std::collections::BTreeMap;

    fn entry(port: u16) -> Entry {
        Entry {
            gateway: "same-namespace".into(),
            namespace: "infra".into(),
            listener_port: port,
            scheme: "http".into(),
            tls: None,
        }
    }

    #[test]
    fn gateway_requests_follow_the_conventions() {
        let request = RequestSpec {
            method: Some("OPTIONS".into()),
            path: Some("/cors-1?a=b".into()),
            headers: vec![
                ("Origin".into(), "https://www.foo.com".into()),
                ("access-control-request-method".into(), "GET".into()),
            ],
            echo_set_response_headers: vec![("X-A".into(), "1".into()), ("X-B".into(), "2".into())],
            ..RequestSpec::default()
        };
        let vip = Ipv4Addr::new(10, 200, 0, 1);
        let p = prepare_gateway(&entry(80), vip, &request).unwrap();
        assert_eq!(p.http.authority, "10.200.0.1:80");
        assert_eq!(p.http.host, "10.200.0.1");
        assert_eq!(p.http.method, "OPTIONS");
        assert_eq!(p.http.path, "/cors-1?a=b");
        assert_eq!(
            p.http.headers,
            vec![
                ("Origin".to_string(), "https://www.foo.com".to_string()),
                ("Access-Control-Request-Method".to_string(), "GET".to_string()),
                ("X-Echo-Set-Header".to_string(), "X-A:1,X-B:2".to_string()),
            ]
        );
        assert!(p.http.connection_close && p.follow_redirects && !p.mesh);
        let p = prepare_gateway(&entry(8080), vip, &RequestSpec::default()).unwrap();
        assert_eq!((p.http.host.as_str(), p.http.path.as_str()), ("10.200.0.1:8080", "/"));
        assert_eq!(p.http.headers, vec![("X-Echo-Set-Header".to_string(), String::new())]);
        let h2c = RequestSpec {
            protocol: Some("H2C_PRIOR_KNOWLEDGE".into()),
            host: Some("example.com".into()),
            ..RequestSpec::default()
        };
        let p = prepare_gateway(&entry(80), vip, &h2c).unwrap();
        assert_eq!((p.http.wire, p.http.host.as_str()), (Wire::H2c, "example.com"));
    }

    #[test]
    fn mesh_requests_resolve_targets_and_grpc() {
        let client = PodInfo {
            name: "echo-v1-a-b".into(),
            namespace: "mesh".into(),
            deployment: "echo-v1".into(),
            labels: BTreeMap::new(),
            service_account: "default".into(),
            ip: Ipv4Addr::new(127, 9, 0, 1),
        };
        let world = TestWorld {
            pods: vec![client.clone()],
            services: vec![ServiceInfo {
                namespace: "mesh".into(),
                name: "echo".into(),
                vip: Some(Ipv4Addr::new(10, 96, 0, 10)),
                selector: BTreeMap::new(),
            }],
            ..TestWorld::default()
        };
        let http = RequestSpec {
            target: Some("echo".into()),
            path: Some(String::new()),
            headers: vec![("Host".into(), "other".into()), ("x-a".into(), "1".into())],
            ..RequestSpec::default()
        };
        let p = prepare_mesh(&client, &world, &http).unwrap();
        assert_eq!(p.http.authority, "10.96.0.10:80");
        assert_eq!((p.http.host.as_str(), p.http.path.as_str()), ("other", "/"));
        assert_eq!(p.http.headers, vec![("X-A".to_string(), "1".to_string())]);
        assert!(p.mesh && !p.follow_redirects);
        let grpc = RequestSpec {
            scheme: Some("grpc".into()),
            target: Some("echo:7070".into()),
            headers: vec![("X-Test-Case".into(), "set".into())],
            ..RequestSpec::default()
        };
        let p = prepare_mesh(&client, &world, &grpc).unwrap();
        assert_eq!((p.http.wire, p.http.method.as_str()), (Wire::Grpc, "POST"));
        assert_eq!(
            (p.http.authority.as_str(), p.http.host.as_str()),
            ("10.96.0.10:7070", "echo:7070")
        );
        assert_eq!(p.http.path, GRPC_ECHO_PATH);
        assert_eq!(p.http.headers, vec![("x-test-case".to_string(), "set".to_string())]);
        let https = RequestSpec {
            scheme: Some("https".into()),
            ..http.clone()
        };
        assert!(prepare_mesh(&client, &world, &https).is_err());

        // A target cluster DNS cannot resolve falls back to the Service the case's addresses name.
        let elsewhere = RequestSpec {
            target: Some("echo".into()),
            addresses: Some(crate::runner::cases::Addresses {
                service: Some("mesh/echo".into()),
                pod: None,
                port: Some(8080),
            }),
            ..RequestSpec::default()
        };
        let mut consumer = client.clone();
        consumer.namespace = "consumer".into();
        let p = prepare_mesh(&consumer, &world, &elsewhere).unwrap();
        assert_eq!(
            (p.http.authority.as_str(), p.http.host.as_str()),
            ("10.96.0.10:8080", "echo")
        );
        let unresolvable = RequestSpec {
            target: Some("echo".into()),
            ..RequestSpec::default()
        };
        assert!(prepare_mesh(&consumer, &world, &unresolvable).is_err());
    }

    fn source() -> SourceZtunnel {
        let ca = crate::pki::TestCa::new("cluster.local");
        let leaf = ca.issue("ns", "sa", crate::pki::KeyKind::EcdsaP256).unwrap();
        let config = crate::source_ztunnel::SourceZtunnelConfig::new(
            "127.0.0.1:15008".parse().unwrap(),
            "spiffe://cluster.local/ns/default/sa/waypoint",
            leaf,
            ca.root_pem(),
        );
        SourceZtunnel::new(config).unwrap()
    }

    #[test]
    fn redirects_are_followed_only_to_reachable_addresses() {
        let vip = Ipv4Addr::new(10, 200, 0, 1);
        let channel = Channel::Gateway {
            entry: entry(80),
            vip,
            source: source(),
        };
        let world = TestWorld::default();
        let post = HttpRequest {
            method: "POST".into(),
            ..prepare_gateway(&entry(80), vip, &RequestSpec::default()).unwrap().http
        };
        let next = channel.follow(&world, &post, 302, "/elsewhere?x=1").unwrap();
        assert_eq!((next.method.as_str(), next.path.as_str()), ("GET", "/elsewhere?x=1"));
        assert_eq!(next.authority, "10.200.0.1:80");
        let next = channel.follow(&world, &post, 307, "http://10.200.0.1/p").unwrap();
        assert_eq!((next.method.as_str(), next.host.as_str()), ("POST", "10.200.0.1"));
        assert!(channel.follow(&world, &post, 302, "http://example.org/p").is_err());
        assert!(channel.follow(&world, &post, 302, "https://10.200.0.1/p").is_err());
        assert!(channel.follow(&world, &post, 302, "http://10.200.0.1:8080/p").is_err());
    }
}
