//! Where a request goes: the CONNECT authority the source ztunnel sends to the waypoint, and the `Host` the
//! HTTP request inside carries.
//!
//! Mesh targets resolve as cluster DNS would from the client's namespace (`echo`, `echo.other-ns`,
//! `echo.ns.svc.cluster.local`, optional `:port`, default port by scheme); `{pod_ip:<deployment>}` stands for a
//! pod IP, which makes the request workload-addressed (authority `podIP:port`). Gateway requests go to the
//! Gateway's address and listener port.

use std::net::{IpAddr, Ipv4Addr};

use super::world::TestWorld;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// `ip:port` for the CONNECT.
    pub authority: String,
    /// The target as written, placeholders filled in: the `Host` / `:authority` of the request.
    pub host: String,
    pub kind: TargetKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    Service { namespace: String, name: String, port: u16 },
    Pod { namespace: String, name: String, port: u16 },
}

pub fn default_port(scheme: &str) -> u16 {
    match scheme {
        "https" | "wss" => 443,
        _ => 80,
    }
}

/// The Host a Go client sends for `scheme://<vip>:<port>`: the default port is dropped.
pub fn gateway_host(vip: Ipv4Addr, port: u16, scheme: &str) -> String {
    if port == default_port(scheme) {
        vip.to_string()
    } else {
        format!("{vip}:{port}")
    }
}

/// Replaces every `{pod_ip:<deployment>}` with that Deployment's first pod IP (preferring `namespace`).
pub fn fill_pod_ips(text: &str, namespace: &str, world: &TestWorld) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{pod_ip:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "{pod_ip:".len()..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated placeholder in {text:?}"))?;
        let deployment = &after[..end];
        let pod = world
            .pod_of_deployment(namespace, deployment)
            .ok_or_else(|| format!("{{pod_ip:{deployment}}}: no pod of a Deployment {deployment:?}"))?;
        out.push_str(&pod.ip.to_string());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Splits `host[:port]` (IPv6 in brackets) without interpreting the host.
pub fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(inner) = authority.strip_prefix('[')
        && let Some((host, rest)) = inner.split_once(']')
    {
        return (host, rest.strip_prefix(':'));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (authority, None),
    }
}

/// Resolves a mesh target (`echo`, `echo:8080`, `echo.ns`, `{pod_ip:echo-v2}:8080`) as seen from `client_ns`.
pub fn resolve(target: &str, scheme: &str, client_ns: &str, world: &TestWorld) -> Result<ResolvedTarget, String> {
    let host_header = fill_pod_ips(target, client_ns, world)?;
    let (host, port) = split_host_port(&host_header);
    let port = match port {
        None => default_port(scheme),
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("target {target:?}: bad port {p:?}"))?,
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        let IpAddr::V4(ip) = ip else {
            return Err(format!("target {target:?}: only IPv4 pods exist here"));
        };
        let pod = world
            .pod_by_ip(ip)
            .ok_or_else(|| format!("target {target:?}: no pod has IP {ip}"))?;
        return Ok(ResolvedTarget {
            authority: format!("{ip}:{port}"),
            host: host_header.clone(),
            kind: TargetKind::Pod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                port,
            },
        });
    }
    let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
    let (name, namespace) = match labels.as_slice() {
        [name] => (*name, client_ns),
        [name, ns] => (*name, *ns),
        [name, ns, "svc", ..] => (*name, *ns),
        _ => return Err(format!("target {target:?}: {host:?} is not a Service name")),
    };
    let service = world
        .service(namespace, name)
        .ok_or_else(|| format!("target {target:?}: no Service {namespace}/{name}"))?;
    let vip = service
        .vip
        .ok_or_else(|| format!("target {target:?}: Service {namespace}/{name} is headless"))?;
    Ok(ResolvedTarget {
        authority: format!("{vip}:{port}"),
        host: host_header.clone(),
        kind: TargetKind::Service {
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
    use crate::runner::world::{PodInfo, ServiceInfo, parse_selector};
    use std::collections::BTreeMap;

    fn world() -> TestWorld {
        let pod = |ns: &str, name: &str, deployment: &str, version: &str, ip: [u8; 4]| PodInfo {
            name: name.into(),
            namespace: ns.into(),
            deployment: deployment.into(),
            labels: BTreeMap::from([("app".into(), "echo".into()), ("version".into(), version.into())]),
            service_account: "default".into(),
            ip: Ipv4Addr::from(ip),
        };
        let service = |ns: &str, name: &str, vip: [u8; 4]| ServiceInfo {
            namespace: ns.into(),
            name: name.into(),
            vip: Some(Ipv4Addr::from(vip)),
            selector: BTreeMap::from([("app".into(), "echo".into())]),
        };
        TestWorld {
            pods: vec![
                pod("mesh", "echo-v1-aaaaaaaaaa-aaaaa", "echo-v1", "v1", [127, 5, 0, 1]),
                pod("mesh", "echo-v2-bbbbbbbbbb-bbbbb", "echo-v2", "v2", [127, 5, 0, 2]),
                pod("consumer", "echo-v1-cccccccccc-ccccc", "echo-v1", "v1", [127, 5, 0, 3]),
            ],
            services: vec![
                service("mesh", "echo", [10, 96, 0, 10]),
                service("other", "echo", [10, 96, 0, 11]),
            ],
            ..TestWorld::default()
        }
    }

    #[test]
    fn services_resolve_through_cluster_dns_rules() {
        let w = world();
        let t = resolve("echo", "http", "mesh", &w).unwrap();
        assert_eq!((t.authority.as_str(), t.host.as_str()), ("10.96.0.10:80", "echo"));
        let t = resolve("echo:8080", "http", "mesh", &w).unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str()),
            ("10.96.0.10:8080", "echo:8080")
        );
        assert_eq!(
            resolve("echo:7070", "grpc", "mesh", &w).unwrap().authority,
            "10.96.0.10:7070"
        );
        assert_eq!(
            resolve("echo.other", "http", "mesh", &w).unwrap().authority,
            "10.96.0.11:80"
        );
        assert_eq!(
            resolve("echo.other.svc.cluster.local:81", "http", "mesh", &w)
                .unwrap()
                .authority,
            "10.96.0.11:81"
        );
        assert_eq!(
            resolve("echo", "https", "mesh", &w).unwrap().authority,
            "10.96.0.10:443"
        );
        assert!(
            resolve("echo", "http", "consumer", &w)
                .unwrap_err()
                .contains("no Service consumer/echo")
        );
        assert!(resolve("echo:x", "http", "mesh", &w).is_err());
    }

    #[test]
    fn pod_ip_placeholders_address_the_workload() {
        let w = world();
        let t = resolve("{pod_ip:echo-v2}:8080", "http", "mesh", &w).unwrap();
        assert_eq!(t.authority, "127.5.0.2:8080");
        assert_eq!(t.host, "127.5.0.2:8080");
        assert!(matches!(t.kind, TargetKind::Pod { ref name, port: 8080, .. } if name.starts_with("echo-v2-")));
        // The client's namespace wins when several namespaces run the Deployment.
        assert_eq!(fill_pod_ips("{pod_ip:echo-v1}", "consumer", &w).unwrap(), "127.5.0.3");
        assert!(fill_pod_ips("{pod_ip:nope}", "mesh", &w).is_err());
        assert!(resolve("127.9.9.9:80", "http", "mesh", &w).is_err());
    }

    #[test]
    fn pod_selection_and_gateway_hosts() {
        let w = world();
        let sel = parse_selector("app=echo,version=v2").unwrap();
        assert_eq!(w.select_pod("mesh", &sel).unwrap().deployment, "echo-v2");
        assert!(w.select_pod("consumer", &sel).is_none());
        assert!(parse_selector("app!=echo").is_err());
        assert!(parse_selector("app").is_err());
        let vip = Ipv4Addr::new(10, 200, 0, 1);
        assert_eq!(gateway_host(vip, 80, "http"), "10.200.0.1");
        assert_eq!(gateway_host(vip, 8080, "http"), "10.200.0.1:8080");
        assert_eq!(gateway_host(vip, 443, "https"), "10.200.0.1");
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some("80")));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }

    /// Every mesh target of the shared case files resolves to the address the file says it designates.
    #[test]
    fn shared_files_targets_match_their_addresses() {
        use crate::runner::cases::{self, PerCase, Selector, TestEntry};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance");
        if !dir.exists() {
            eprintln!("skipping: {} is absent", dir.display());
            return;
        }
        let mut w = world();
        w.services = ["echo", "echo-v1", "echo-v2"]
            .iter()
            .enumerate()
            .map(|(i, name)| ServiceInfo {
                namespace: "gateway-conformance-mesh".into(),
                name: name.to_string(),
                vip: Some(Ipv4Addr::new(10, 96, 1, i as u8)),
                selector: BTreeMap::new(),
            })
            .collect();
        for p in &mut w.pods {
            if p.namespace == "mesh" {
                p.namespace = "gateway-conformance-mesh".into();
            }
        }
        let mut checked = 0;
        let mut mismatches = Vec::new();
        for file in ["cases.yaml", "istio-cases.yaml"] {
            for test in cases::load(&dir.join(file)).unwrap().tests {
                let TestEntry::Parsed(test) = test else { panic!() };
                for case in &test.cases {
                    let (Some(target), Some(addresses)) = (&case.request.target, &case.request.addresses) else {
                        continue;
                    };
                    let client = case
                        .request
                        .client
                        .as_ref()
                        .or(test.client.as_ref().and_then(PerCase::given))
                        .unwrap();
                    assert!(matches!(client.pod_selector, Selector::Text(_)));
                    let scheme = case.request.scheme.as_deref().unwrap_or("http");
                    let Ok(t) = resolve(target, scheme, &client.namespace, &w) else {
                        // A file whose target cluster DNS cannot resolve (the runner falls back to addresses).
                        mismatches.push(format!("{}: {target} from {}", case.name, client.namespace));
                        continue;
                    };
                    match (&t.kind, addresses) {
                        (TargetKind::Service { namespace, name, port }, a) => {
                            assert_eq!(a.service.as_deref(), Some(format!("{namespace}/{name}").as_str()));
                            assert_eq!(a.port, Some(*port));
                        }
                        (TargetKind::Pod { namespace, port, .. }, a) => {
                            assert!(a.pod.as_deref().unwrap().starts_with(namespace.as_str()));
                            assert_eq!(a.port, Some(*port));
                        }
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 50, "{checked}");
        eprintln!("targets cluster DNS cannot resolve: {mismatches:?}");
        assert!(mismatches.len() <= 2, "{mismatches:?}");
    }
}
