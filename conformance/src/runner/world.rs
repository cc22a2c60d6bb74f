//! What one test sees of the environment: its objects (as handed to the waypoint, with addresses filled in),
//! the pods of its Deployments, and lookups over them. Plain data, so target resolution and selection are
//! unit-tested without starting anything.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::Value;

use super::manifests::{Object, string_map};

#[derive(Debug, Clone, Default)]
pub struct TestWorld {
    /// The objects written into the waypoint config for this test (Deployments etc. excluded).
    pub objects: Vec<Object>,
    /// Sorted by name, so "the first matching pod" is stable.
    pub pods: Vec<PodInfo>,
    pub services: Vec<ServiceInfo>,
    pub gateways: Vec<GatewayInfo>,
    /// Namespace name → labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Objects the applied waypoint config reported as not acted on (`<apiVersion>/<Kind> <ns>/<name>`).
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub deployment: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `None` for a headless Service.
    pub vip: Option<Ipv4Addr>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayInfo {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub listeners: Vec<ListenerInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerInfo {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

impl GatewayInfo {
    pub fn from_object(object: &Object, vip: Ipv4Addr) -> GatewayInfo {
        let listeners = object
            .value
            .pointer("/spec/listeners")
            .and_then(Value::as_array)
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| {
                        Some(ListenerInfo {
                            name: l.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                            port: l
                                .get("port")
                                .and_then(Value::as_u64)
                                .and_then(|p| u16::try_from(p).ok())?,
                            protocol: l
                                .get("protocol")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        GatewayInfo {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            vip,
            listeners,
        }
    }
}

impl ServiceInfo {
    pub fn from_object(object: &Object, vip: Option<Ipv4Addr>) -> ServiceInfo {
        ServiceInfo {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            vip,
            selector: string_map(object.value.pointer("/spec/selector")),
        }
    }

    pub fn selects(&self, pod: &PodInfo) -> bool {
        pod.namespace == self.namespace
            && !self.selector.is_empty()
            && self.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

impl TestWorld {
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    pub fn gateway(&self, namespace: &str, name: &str) -> Option<&GatewayInfo> {
        self.gateways
            .iter()
            .find(|g| g.namespace == namespace && g.name == name)
    }

    /// The first pod (by name) in `namespace` carrying every label of `selector`.
    pub fn select_pod(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
    }

    /// Pods backing a Service: its selector, or (no such Service) the pods labelled `app=<name>`.
    pub fn pods_of_service(&self, namespace: &str, name: &str) -> Vec<&PodInfo> {
        match self.service(namespace, name) {
            Some(service) => self.pods.iter().filter(|p| service.selects(p)).collect(),
            None => self
                .pods
                .iter()
                .filter(|p| p.namespace == namespace && p.labels.get("app").map(String::as_str) == Some(name))
                .collect(),
        }
    }

    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&PodInfo> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    /// The first pod of a Deployment, preferring `namespace`.
    pub fn pod_of_deployment(&self, namespace: &str, deployment: &str) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.deployment == deployment)
            .or_else(|| self.pods.iter().find(|p| p.deployment == deployment))
    }

    /// Whether the waypoint reported `kind` (any when `None`) `namespace/name` as not acted on.
    pub fn was_skipped(&self, kind_suffix: &str, namespace_name: &str) -> Option<&str> {
        self.skipped
            .iter()
            .find(|entry| {
                let Some((gvk, object)) = entry.split_once(' ') else {
                    return false;
                };
                let kind = gvk.rsplit('/').next().unwrap_or_default();
                object == namespace_name && kind.ends_with(kind_suffix)
            })
            .map(String::as_str)
    }

    pub fn has_object(&self, kind_suffix: &str, namespace_name: &str) -> bool {
        self.objects
            .iter()
            .any(|o| o.kind.ends_with(kind_suffix) && format!("{}/{}", o.namespace, o.name) == namespace_name)
    }
}

/// `app=echo,version=v1` → map. Only equality terms: that is all the files use, and silently matching
/// something else would be worse than refusing.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| format!("selector term {term:?} is not key=value"))?;
        if k.trim().ends_with('!') {
            return Err(format!("selector term {term:?}: only equality is supported"));
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}
