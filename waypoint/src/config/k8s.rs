//! The few fields of Kubernetes / Istio objects the waypoint reads, as plain serde structs.
//!
//! k8s-openapi and gateway-api cost minutes of compile for thousands of fields we never read, so each kind
//! here declares only what the translator uses. Unknown fields are ignored on upstream kinds (a manifest
//! copied from a cluster carries `status`, `managedFields` …) but rejected on our own `WaypointConfig`, where
//! a misspelt key is almost certainly a mistake.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// `targetPort` is either a number or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

// ---------------------------------------------------------------- v1 Service

#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP", default)]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i64,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub app_protocol: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
}

// ---------------------------------------------------------------- v1 Pod

#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(rename = "podIP", default)]
    pub pod_ip: Option<String>,
    #[serde(default)]
    pub phase: Option<String>,
}

// ---------------------------------------------------------------- networking.istio.io WorkloadEntry

#[derive(Debug, Clone, Deserialize)]
pub struct WorkloadEntry {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEntrySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: Option<String>,
    /// Service port name → port on this workload (Istio: overrides the Service's targetPort).
    #[serde(default)]
    pub ports: BTreeMap<String, i64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<i64>,
}

// ---------------------------------------------------------------- our WaypointConfig

#[derive(Debug, Clone, Deserialize)]
pub struct WaypointConfig {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WaypointConfigSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointConfigSpec {
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub cluster_domain: Option<String>,
    #[serde(default)]
    pub listeners: Listeners,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub destination_hbone_port: Option<i64>,
    #[serde(default)]
    pub drain_timeout: Option<String>,
    #[serde(default)]
    pub protocol_detection_timeout: Option<String>,
    #[serde(default)]
    pub watch_interval: Option<String>,
    #[serde(default)]
    pub memory_release_interval: Option<String>,
    #[serde(default)]
    pub security: Option<super::security::SecuritySettingsSpec>,
    /// `region/zone/subzone` of the node the waypoint runs on.
    #[serde(default)]
    pub locality: Option<String>,
    /// The waypoint's own labels (its pod's, in a cluster), for `failoverPriority`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listeners {
    #[serde(default)]
    pub hbone: Option<String>,
    #[serde(default)]
    pub readiness: Option<String>,
    #[serde(default)]
    pub admin: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: String,
    pub key_file: String,
    pub roots_file: String,
}
