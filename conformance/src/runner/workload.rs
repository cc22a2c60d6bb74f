//! Deployments → what their pods run, decided from the manifest alone (no I/O here, so it is unit-tested).
//!
//! The conformance images are recognised by name: echo-basic (Gateway profile, JSON echo on `HTTP_PORT` and an
//! h2c-only listener on `H2C_PORT`) and echo-advanced (mesh profile, Istio-style text echo on every port it
//! is told about, a byte echo on its `--tcp` ports). Any other image gets a pod (an IP, an identity, an HBONE
//! endpoint) but no server, which is what a container that is not ready to answer looks like from outside.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::manifests::{Object, string_map};
use crate::echo::EchoFormat;

/// echo-basic's defaults when the env does not set them.
const ECHO_BASIC_HTTP_PORT: u16 = 3000;
const ECHO_BASIC_H2C_PORT: u16 = 3001;

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentPlan {
    pub namespace: String,
    pub name: String,
    pub replicas: u32,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// `spec.template.spec.containers` with only name and ports kept, for the Pod objects.
    pub containers: Value,
    pub images: Vec<ImagePlan>,
    /// Changes when anything that shapes the pods changes; equal fingerprints reuse running pods.
    pub fingerprint: String,
}

/// One container, as far as the runner can imitate it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePlan {
    pub image: String,
    pub servers: Vec<ServerPlan>,
    /// `POD_NAME` / `NAMESPACE` from the env, resolved per pod (`None` when the env does not set them).
    pub env: Vec<(String, EnvValue)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EnvValue {
    Literal(String),
    /// `valueFrom.fieldRef.fieldPath`.
    Field(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerPlan {
    pub port: u16,
    pub kind: ServerKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Http { format: EchoFormat, h2c_only: bool },
    Tcp,
}

/// What a field reference resolves to for one pod.
pub struct PodFields<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub ip: &'a str,
    pub service_account: &'a str,
}

impl ImagePlan {
    /// An env var of this container for one pod: the literal, or the field it references (`""` when the
    /// variable is not set at all, as `os.Getenv` sees it).
    pub fn env_for(&self, name: &str, pod: &PodFields<'_>) -> String {
        match self.env.iter().find(|(n, _)| n == name).map(|(_, v)| v) {
            None => String::new(),
            Some(EnvValue::Literal(v)) => v.clone(),
            Some(EnvValue::Field(path)) => match path.as_str() {
                "metadata.name" => pod.name.to_string(),
                "metadata.namespace" => pod.namespace.to_string(),
                "status.podIP" => pod.ip.to_string(),
                "spec.serviceAccountName" => pod.service_account.to_string(),
                _ => String::new(),
            },
        }
    }
}

pub fn plan(deployment: &Object) -> Result<DeploymentPlan, String> {
    let spec = deployment.value.get("spec").ok_or("no spec")?;
    let replicas = match spec.get("replicas") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("spec.replicas {v} is not a count"))?,
    };
    let template = spec.get("template").ok_or("no spec.template")?;
    let labels = string_map(template.pointer("/metadata/labels"));
    let pod_spec = template.get("spec").ok_or("no spec.template.spec")?;
    let service_account = pod_spec
        .get("serviceAccountName")
        .or_else(|| pod_spec.get("serviceAccount"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let raw_containers = pod_spec
        .get("containers")
        .and_then(Value::as_array)
        .ok_or("no spec.template.spec.containers")?;
    let mut containers = Vec::new();
    let mut images = Vec::new();
    for (i, c) in raw_containers.iter().enumerate() {
        let ports = container_ports(c).map_err(|e| format!("containers[{i}]: {e}"))?;
        let mut kept = json!({"name": c.get("name").cloned().unwrap_or(Value::Null)});
        if let Some(p) = c.get("ports") {
            kept["ports"] = p.clone();
        }
        containers.push(kept);
        images.push(image_plan(c, &ports));
    }
    let fingerprint = serde_json::to_string(&json!({"replicas": replicas, "template": template})).unwrap_or_default();
    Ok(DeploymentPlan {
        namespace: deployment.namespace.clone(),
        name: deployment.name.clone(),
        replicas,
        labels,
        service_account,
        containers: Value::Array(containers),
        images,
        fingerprint,
    })
}

/// Declared container ports: (name, port).
fn container_ports(container: &Value) -> Result<Vec<(Option<String>, u16)>, String> {
    let Some(ports) = container.get("ports").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    ports
        .iter()
        .map(|p| {
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("containerPort {:?} is not a port", p.get("containerPort")))?;
            Ok((p.get("name").and_then(Value::as_str).map(str::to_string), port))
        })
        .collect()
}

fn env_of(container: &Value) -> Vec<(String, EnvValue)> {
    let Some(env) = container.get("env").and_then(Value::as_array) else {
        return Vec::new();
    };
    env.iter()
        .filter_map(|e| {
            let name = e.get("name")?.as_str()?.to_string();
            if let Some(v) = e.get("value") {
                let literal = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                return Some((name, EnvValue::Literal(literal)));
            }
            let path = e.pointer("/valueFrom/fieldRef/fieldPath")?.as_str()?.to_string();
            Some((name, EnvValue::Field(path)))
        })
        .collect()
}

fn image_plan(container: &Value, ports: &[(Option<String>, u16)]) -> ImagePlan {
    let image = container
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let env = env_of(container);
    let mut servers: Vec<ServerPlan> = Vec::new();
    let mut add = |port: u16, kind: ServerKind| {
        if !servers.iter().any(|s| s.port == port) {
            servers.push(ServerPlan { port, kind });
        }
    };
    if image.contains("/echo-basic") {
        let literal_port = |name: &str, default: u16| {
            env.iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| match v {
                    EnvValue::Literal(s) => s.parse::<u16>().ok(),
                    EnvValue::Field(_) => None,
                })
                .unwrap_or(default)
        };
        let http = literal_port("HTTP_PORT", ECHO_BASIC_HTTP_PORT);
        let h2c = literal_port("H2C_PORT", ECHO_BASIC_H2C_PORT);
        let json = |h2c_only| ServerKind::Http {
            format: EchoFormat::Json,
            h2c_only,
        };
        add(http, json(false));
        add(h2c, json(true));
        // Declared ports beyond the two listeners (e.g. the HTTPS one, which we cannot serve with TLS) get the
        // plain echo, so a test at least sees who answered.
        for (_, port) in ports {
            add(*port, json(false));
        }
    } else if image.contains("/echo-advanced") {
        let args = args_of(container);
        let tcp_ports: Vec<u16> = flag_values(&args, "tcp");
        let text = ServerKind::Http {
            format: EchoFormat::Text,
            h2c_only: false,
        };
        for port in &tcp_ports {
            add(*port, ServerKind::Tcp);
        }
        for (name, port) in ports {
            if name.as_deref().is_some_and(|n| n.starts_with("tcp")) {
                add(*port, ServerKind::Tcp);
            } else {
                add(*port, text);
            }
        }
        // Ports only named by flags: HTTP (`--port`), gRPC (`--grpc`: the echo answers gRPC-looking requests
        // on any port), TLS (`--tls`: served in the clear, nothing here dials it).
        for flag in ["port", "grpc", "tls"] {
            for port in flag_values(&args, flag) {
                add(port, text);
            }
        }
    }
    ImagePlan { image, servers, env }
}

fn args_of(container: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .filter_map(|k| container.get(*k).and_then(Value::as_array))
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// Values of `--flag=N` and `--flag N` that are ports.
fn flag_values(args: &[String], flag: &str) -> Vec<u16> {
    let long = format!("--{flag}");
    let mut out = Vec::new();
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        let value = if let Some(v) = arg.strip_prefix(&format!("{long}=")) {
            Some(v.to_string())
        } else if *arg == long {
            iter.next().cloned()
        } else {
            None
        };
        if let Some(port) = value.and_then(|v| v.parse::<u16>().ok()) {
            out.push(port);
        }
    }
    out
}

/// `<deployment>-<10 lowercase alnum>-<5 lowercase alnum>`, like a ReplicaSet pod (the suffixes are what the
/// weight tests strip to find the backend name).
pub fn pod_name(deployment: &str) -> String {
    format!("{deployment}-{}-{}", random_alnum(10), random_alnum(5))
}

fn random_alnum(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::runner::manifests::parse;
    use std::path::Path;

    const ECHO_BASIC: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: infra-backend-v1, namespace: infra}
spec:
  replicas: 2
  template:
    metadata: {labels: {app: infra-backend-v1}}
    spec:
      containers:
      - name: infra-backend-v1
        image: registry.k8s.io/gateway-api/conformance/echo-basic:v0.1.0
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - name: NAMESPACE
          valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
"#;

    const ECHO_ADVANCED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo-v1, namespace: mesh}
spec:
  template:
    metadata: {labels: {app: echo, version: v1}}
    spec:
      serviceAccountName: echo
      containers:
      - name: echo
        image: registry.k8s.io/gateway-api/conformance/echo-advanced:v0.1.0
        args: [--tcp=9090, --port=8080, --grpc=7070, --port=8443, --tls=8443]
        ports:
        - containerPort: 8080
        - containerPort: 8443
        - containerPort: 9090
        - {containerPort: 7070, name: grpc}
        - {containerPort: 9091, name: tcp-extra}
      - name: sidecar
        image: example.com/other:1
"#;

    fn deployment(text: &str) -> Object {
        parse(Path::new("d.yaml"), text).unwrap().remove(0)
    }

    #[test]
    fn echo_basic_listens_on_http_and_h2c_ports() {
        let plan = plan(&deployment(ECHO_BASIC)).unwrap();
        assert_eq!((plan.replicas, plan.service_account.as_str()), (2, "default"));
        assert_eq!(plan.labels["app"], "infra-backend-v1");
        let image = &plan.images[0];
        let json = |h2c_only| ServerKind::Http {
            format: EchoFormat::Json,
            h2c_only,
        };
        assert_eq!(
            image.servers,
            vec![
                ServerPlan {
                    port: 3000,
                    kind: json(false)
                },
                ServerPlan {
                    port: 3001,
                    kind: json(true)
                }
            ]
        );
        let fields = PodFields {
            name: "infra-backend-v1-abc-def",
            namespace: "infra",
            ip: "127.1.2.3",
            service_account: "default",
        };
        assert_eq!(image.env_for("POD_NAME", &fields), "infra-backend-v1-abc-def");
        assert_eq!(image.env_for("NAMESPACE", &fields), "infra");
        assert_eq!(image.env_for("INGRESS_NAME", &fields), "");

        let h2c = ECHO_BASIC.replace(
            "        env:\n",
            "        env:\n        - {name: H2C_PORT, value: \"4001\"}\n",
        );
        let plan = super::plan(&deployment(&h2c)).unwrap();
        assert_eq!(plan.images[0].servers[1].port, 4001);
    }

    #[test]
    fn echo_advanced_serves_text_and_tcp() {
        let plan = plan(&deployment(ECHO_ADVANCED)).unwrap();
        assert_eq!((plan.replicas, plan.service_account.as_str()), (1, "echo"));
        let servers = &plan.images[0].servers;
        let kind_of = |port| servers.iter().find(|s| s.port == port).unwrap().kind;
        assert_eq!(kind_of(9090), ServerKind::Tcp);
        assert_eq!(kind_of(9091), ServerKind::Tcp);
        for port in [8080, 8443, 7070] {
            assert_eq!(
                kind_of(port),
                ServerKind::Http {
                    format: EchoFormat::Text,
                    h2c_only: false
                }
            );
        }
        assert_eq!(servers.len(), 5);
        assert!(plan.images[1].servers.is_empty(), "unknown images run nothing");
        assert_eq!(plan.containers[0]["ports"][3]["name"], "grpc");
        assert_eq!(plan.containers[1]["name"], "sidecar");
        assert_ne!(
            plan.fingerprint,
            super::plan(&deployment(ECHO_BASIC)).unwrap().fingerprint
        );
    }

    #[test]
    fn pod_names_look_like_replica_set_pods() {
        let name = pod_name("echo-v1");
        let parts: Vec<&str> = name.rsplitn(3, '-').collect();
        assert_eq!(parts[2], "echo-v1");
        assert_eq!((parts[1].len(), parts[0].len()), (10, 5));
        assert!(
            name.chars()
                .all(|c| c == '-' || c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }
}
