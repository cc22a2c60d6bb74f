//! Local config file → [`Snapshot`]: split documents, parse each kind, validate, resolve selectors.
//!
//! Every problem is collected (not just the first) and names the file, the document (number, kind, name and
//! line) and the field, so an operator can fix a whole file in one pass. A file with any error produces no
//! snapshot: the caller keeps serving the last good one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use waypoint_filters::route::{BackendId, Route, RouteKind, RouteTable, Rule, WeightedBackend};

use super::destination_rule as dr;
use super::gateway_api::{self as gw, BackendResolver, FieldError, Grants, TranslateCx};
use super::k8s::{self, IntOrString};
use super::policy::Locality;
use super::security::{
    self as sec, JwksSource, NoFetch, SecurityCx, SecurityIndex, SecuritySettings, security_settings,
};
use super::virtual_service as vs;
use super::{
    Backend, BindingKind, Endpoint, PortProtocol, RouteSet, ServiceBinding, Settings, Snapshot, TlsPaths, duration,
};
use crate::identity::SpiffeId;

/// One problem in one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based document number in the file (0 = the file as a whole).
    pub document: usize,
    pub line: usize,
    /// `Kind namespace/name` when known.
    pub object: Option<String>,
    /// Dotted path of the offending field, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.document > 0 {
            write!(f, ": document {} (line {}", self.document, self.line)?;
            if let Some(o) = &self.object {
                write!(f, ", {o}")?;
            }
            write!(f, ")")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// All problems found in one load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Read and compile a config file. `generation` is stamped on the snapshot.
pub fn load_file(path: &Path, generation: u64) -> Result<Snapshot, ConfigErrors> {
    load_file_with(path, generation, &NoFetch)
}

/// [`load_file`] with the JWKS source that fills `jwksUri` keys (the running waypoint's fetcher).
pub fn load_file_with(path: &Path, generation: u64, jwks: &dyn JwksSource) -> Result<Snapshot, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            document: 0,
            line: 0,
            object: None,
            field: None,
            reason: format!("cannot read: {e}"),
        }])
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse_config_with(&path.display().to_string(), &base, &text, generation, jwks)
}

/// Compile config text. Relative certificate paths resolve against `base_dir`.
pub fn parse_config(file: &str, base_dir: &Path, text: &str, generation: u64) -> Result<Snapshot, ConfigErrors> {
    parse_config_with(file, base_dir, text, generation, &NoFetch)
}

pub fn parse_config_with(
    file: &str,
    base_dir: &Path,
    text: &str,
    generation: u64,
    jwks: &dyn JwksSource,
) -> Result<Snapshot, ConfigErrors> {
    let mut cx = Ctx {
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
        doc: 0,
        line: 0,
        object: None,
    };
    let mut objects = Objects::default();
    for (doc_no, (line, doc)) in split_documents(text).into_iter().enumerate() {
        cx.doc = doc_no + 1;
        cx.line = line;
        cx.object = None;
        let value: serde_json::Value = match serde_saphyr::from_str::<Option<serde_json::Value>>(doc) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                cx.error(None, format!("invalid YAML: {}", first_line(&e.to_string())));
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        objects.add(&mut cx, value);
    }
    cx.doc = 0;
    cx.object = None;
    let snapshot = compile(&mut cx, base_dir, objects, generation, jwks);
    if cx.errors.is_empty()
        && let Some(s) = snapshot
    {
        return Ok(s);
    }
    let mut errors = cx.errors;
    errors.sort_by_key(|e| e.document);
    Err(ConfigErrors(errors))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Split on `---` document markers at column 0, remembering each document's first line (1-based).
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1usize;
    let mut offset = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end_matches(['\n', '\r']);
        let is_marker =
            trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---\t") || trimmed == "...";
        if is_marker {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

struct Ctx<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
    /// Rendered like errors; kept in the snapshot and logged.
    warnings: Vec<String>,
    doc: usize,
    line: usize,
    object: Option<String>,
}

impl Ctx<'_> {
    fn error(&mut self, field: Option<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            document: self.doc,
            line: self.line,
            object: self.object.clone(),
            field,
            reason: reason.into(),
        });
    }

    fn field_error(&mut self, field: &str, reason: impl Into<String>) {
        self.error(Some(field.to_string()), reason);
    }

    /// Something accepted but not acted on, or an object that does not apply: logged and kept in the snapshot.
    fn warn(&mut self, field: Option<&str>, reason: impl Into<String>) {
        let line = ConfigError {
            file: self.file.to_string(),
            document: self.doc,
            line: self.line,
            object: self.object.clone(),
            field: field.map(str::to_string),
            reason: reason.into(),
        }
        .to_string();
        tracing::warn!("{line}");
        if !self.warnings.contains(&line) {
            self.warnings.push(line);
        }
    }
}

/// Where an object came from, for errors raised after parsing (while resolving references).
#[derive(Clone)]
struct Origin {
    doc: usize,
    line: usize,
    object: String,
}

#[derive(Default)]
struct Objects {
    waypoint: Vec<(Origin, k8s::WaypointConfig)>,
    services: Vec<(Origin, k8s::Service)>,
    pods: Vec<(Origin, k8s::Pod)>,
    workload_entries: Vec<(Origin, k8s::WorkloadEntry)>,
    namespaces: Vec<(Origin, gw::Namespace)>,
    gateways: Vec<(Origin, gw::Gateway)>,
    http_routes: Vec<(Origin, gw::HttpRoute)>,
    grpc_routes: Vec<(Origin, gw::GrpcRoute)>,
    grants: Vec<(Origin, gw::ReferenceGrant)>,
    virtual_services: Vec<(Origin, vs::VirtualService)>,
    destination_rules: Vec<(Origin, dr::DestinationRule)>,
    authorization_policies: Vec<(Origin, sec::AuthorizationPolicy)>,
    request_authentications: Vec<(Origin, sec::RequestAuthentication)>,
    skipped: Vec<String>,
}

impl Objects {
    fn add(&mut self, cx: &mut Ctx<'_>, value: serde_json::Value) {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let meta = value.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        cx.object = Some(format!("{kind} {ns}/{name}"));
        if kind.is_empty() {
            cx.field_error("kind", "missing");
            return;
        }
        if api_version.is_empty() {
            cx.field_error("apiVersion", "missing");
            return;
        }
        if name.is_empty() {
            cx.field_error("metadata.name", "missing");
            return;
        }
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let origin = Origin {
            doc: cx.doc,
            line: cx.line,
            object: cx.object.clone().unwrap_or_default(),
        };
        match (group, kind.as_str()) {
            ("", "Service") => push(cx, &mut self.services, origin, value),
            ("", "Pod") => push(cx, &mut self.pods, origin, value),
            ("networking.istio.io", "WorkloadEntry") => push(cx, &mut self.workload_entries, origin, value),
            ("waypoint.istio.io", "WaypointConfig") => push(cx, &mut self.waypoint, origin, value),
            ("", "Namespace") => push(cx, &mut self.namespaces, origin, value),
            ("gateway.networking.k8s.io", "Gateway") => push(cx, &mut self.gateways, origin, value),
            ("gateway.networking.k8s.io", "HTTPRoute") => push(cx, &mut self.http_routes, origin, value),
            ("gateway.networking.k8s.io", "GRPCRoute") => push(cx, &mut self.grpc_routes, origin, value),
            ("gateway.networking.k8s.io", "ReferenceGrant") => push(cx, &mut self.grants, origin, value),
            ("networking.istio.io", "VirtualService") => push(cx, &mut self.virtual_services, origin, value),
            ("networking.istio.io", "DestinationRule") => push(cx, &mut self.destination_rules, origin, value),
            ("security.istio.io", "AuthorizationPolicy") => push(cx, &mut self.authorization_policies, origin, value),
            ("security.istio.io", "RequestAuthentication") => {
                push(cx, &mut self.request_authentications, origin, value)
            }
            _ => {
                tracing::warn!(file = cx.file, document = cx.doc, %api_version, %kind, %name, "kind not supported by this waypoint; skipped");
                self.skipped.push(format!("{api_version}/{kind} {ns}/{name}"));
            }
        }
    }
}

fn push<T: DeserializeOwned>(cx: &mut Ctx<'_>, into: &mut Vec<(Origin, T)>, origin: Origin, value: serde_json::Value) {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(obj) => into.push((origin, obj)),
        Err(e) => {
            let path = e.path().to_string();
            cx.error(if path == "." { None } else { Some(path) }, e.into_inner().to_string());
        }
    }
}

fn with_origin<R>(cx: &mut Ctx<'_>, origin: &Origin, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
    cx.doc = origin.doc;
    cx.line = origin.line;
    cx.object = Some(origin.object.clone());
    f(cx)
}

/// [`with_origin`] for a report about another object than the one being compiled: the current origin is
/// restored afterwards.
fn with_origin_keep<R>(cx: &mut Ctx<'_>, origin: &Origin, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
    let here = (cx.doc, cx.line, cx.object.clone());
    let out = with_origin(cx, origin, f);
    (cx.doc, cx.line, cx.object) = here;
    out
}

/// Validate every DestinationRule (an invalid one fails the load even if it applies to nothing) and index the
/// ones that may apply to this waypoint.
fn destination_rules(cx: &mut Ctx<'_>, settings: &Settings, objects: &Objects) -> dr::DrIndex {
    let mut index = dr::DrIndex::default();
    for (origin, rule) in &objects.destination_rules {
        with_origin(cx, origin, |cx| {
            match dr::translate(rule, &settings.cluster_domain, &settings.namespace, origin.doc) {
                Err(errors) => {
                    for e in errors {
                        cx.field_error(&e.field, e.reason);
                    }
                }
                Ok(t) => {
                    for w in t.warnings {
                        cx.warn(Some(&w.field), w.reason);
                    }
                    match t.outcome {
                        dr::Outcome::Applies(rule) => index.add(*rule),
                        dr::Outcome::Skipped(reason) => {
                            cx.warn(None, format!("does not apply to this waypoint: {reason}"))
                        }
                    }
                }
            }
        });
    }
    index
}

fn dr_origin<'a>(objects: &'a Objects, rule: &dr::CompiledRule) -> Option<&'a Origin> {
    objects
        .destination_rules
        .iter()
        .find(|(_, d)| d.metadata.name == rule.name && ns_of(&d.metadata) == rule.namespace)
        .map(|(o, _)| o)
}

fn compile(
    cx: &mut Ctx<'_>,
    base_dir: &Path,
    objects: Objects,
    generation: u64,
    jwks: &dyn JwksSource,
) -> Option<Snapshot> {
    let settings = match objects.waypoint.as_slice() {
        [] => {
            cx.error(
                None,
                "no WaypointConfig document (apiVersion waypoint.istio.io/v1alpha1): one is required",
            );
            None
        }
        [(origin, wc)] => with_origin(cx, origin, |cx| settings_from(cx, base_dir, wc)),
        [_, (origin, _), ..] => {
            with_origin(cx, origin, |cx| cx.error(None, "more than one WaypointConfig document"));
            None
        }
    };
    let settings = settings?;
    let security_settings = match objects.waypoint.first() {
        Some((origin, wc)) => with_origin(cx, origin, |cx| match &wc.spec.security {
            None => SecuritySettings::default(),
            Some(spec) => security_settings(spec, "spec.security").unwrap_or_else(|e| {
                cx.field_error(&e.field, e.reason);
                SecuritySettings::default()
            }),
        }),
        None => SecuritySettings::default(),
    };
    let mut security = security_index(cx, &settings, &security_settings, &objects, jwks);
    let workloads = workloads(cx, &settings, &objects);
    let drs = destination_rules(cx, &settings, &objects);
    let lookup = [settings.namespace.as_str(), security_settings.root_namespace.as_str()];
    let mut used_rules: HashSet<(String, String)> = HashSet::new();

    // Every Service port becomes a backend first: bindings, routes and mirrors all refer to them by id.
    let mut index = BackendIndex::default();
    let mut ports_of_service: Vec<Vec<(SvcPort, BackendId)>> = Vec::new();
    for (origin, svc) in &objects.services {
        let ns = ns_of(&svc.metadata);
        let selection = drs.select(
            ns,
            &svc.metadata.name,
            &settings.cluster_domain,
            &[ns, lookup[0], lookup[1]],
        );
        for rule in &selection.candidates {
            used_rules.insert((rule.namespace.clone(), rule.name.clone()));
        }
        if let Some(rule) = selection.rule {
            tracing::debug!(service = %format!("{ns}/{}", svc.metadata.name), rule = %rule.object(), "DestinationRule applies");
        }
        for shadowed in &selection.shadowed {
            if let (Some(rule), Some(o)) = (selection.rule, dr_origin(&objects, shadowed)) {
                let reason = format!(
                    "ignored for Service {ns}/{}: {} for the same host is older and applies",
                    svc.metadata.name,
                    rule.object()
                );
                with_origin_keep(cx, o, |cx| cx.warn(Some("spec.host"), reason));
            }
        }
        let ports = with_origin(cx, origin, |cx| {
            service_ports(cx, &settings, svc, &workloads, &mut index, selection.rule)
        });
        ports_of_service.push(ports);
    }
    for rule in drs.rules() {
        if !used_rules.contains(&(rule.namespace.clone(), rule.name.clone()))
            && let Some(o) = dr_origin(&objects, rule)
        {
            let reason = format!(
                "host {:?} selects no Service of this waypoint (looked up in the Service's namespace, {:?} and {:?})",
                rule.host, lookup[0], lookup[1]
            );
            with_origin_keep(cx, o, |cx| cx.warn(Some("spec.host"), reason));
        }
    }

    let routes = with_routes(cx, &objects, &index);
    let mut vs_errors: HashSet<(usize, String)> = HashSet::new();

    let mut services: HashMap<SocketAddr, Arc<ServiceBinding>> = HashMap::new();
    let mut owners: HashMap<SocketAddr, String> = HashMap::new();
    let mut bind = |cx: &mut Ctx<'_>, origin: &Origin, binding: ServiceBinding| {
        let vip = binding.vip;
        if let Some(owner) = owners.get(&vip) {
            cx.error(None, format!("address {vip} is already bound by {owner}"));
            return;
        }
        owners.insert(vip, origin.object.clone());
        services.insert(vip, Arc::new(binding));
    };
    for ((origin, svc), ports) in objects.services.iter().zip(&ports_of_service) {
        with_origin(cx, origin, |cx| {
            let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
            let vips = service_vips(cx, svc);
            if vips.is_empty() {
                tracing::warn!(service = %format!("{ns}/{}", svc.metadata.name), "service has no cluster IP; nothing can address it through the waypoint");
            }
            let vss: Vec<&(Origin, vs::VirtualService)> = objects
                .virtual_services
                .iter()
                .filter(|(_, v)| {
                    v.applies_to_mesh()
                        && v.visible_from(&settings.namespace)
                        && v.host_services(&settings.cluster_domain)
                            .iter()
                            .any(|(n, s)| n == ns && *s == svc.metadata.name)
                })
                .collect();
            for (port, id) in ports {
                let mut set = routes.for_service(ns, &svc.metadata.name, port.port);
                if !vss.is_empty() {
                    if set.is_some() {
                        // Istio: for a Service bound to a waypoint, Gateway API routes take precedence over
                        // VirtualServices (the VirtualService is ignored for it).
                        tracing::warn!(service = %format!("{ns}/{}", svc.metadata.name), port = port.port, "both HTTPRoute/GRPCRoute and VirtualService bind this service; the Gateway API route wins");
                    } else {
                        let mut compiled = Vec::new();
                        for (vorigin, v) in &vss {
                            let mut warnings: Vec<FieldError> = Vec::new();
                            let translated = vs::translate(
                                v,
                                port.port,
                                &settings.cluster_domain,
                                &index,
                                vorigin.doc,
                                &mut warnings,
                            );
                            for w in warnings {
                                with_origin_keep(cx, vorigin, |cx| cx.warn(Some(&w.field), w.reason));
                            }
                            match translated {
                                Ok(r) => compiled.push(Arc::new(r)),
                                Err(e) => {
                                    if vs_errors.insert((vorigin.doc, e.field.clone())) {
                                        let here = (cx.doc, cx.line, cx.object.clone());
                                        with_origin(cx, vorigin, |cx| cx.field_error(&e.field, e.reason));
                                        (cx.doc, cx.line, cx.object) = here;
                                    }
                                }
                            }
                        }
                        if !compiled.is_empty() {
                            set = Some(Arc::new(RouteSet {
                                producer: Some(Arc::new(RouteTable::new(compiled))),
                                consumers: HashMap::new(),
                            }));
                        }
                    }
                }
                for vip in &vips {
                    let svc_security = security.for_service(ns, &svc.metadata.name);
                    // The policy layers (security, and the circuit breakers of a DestinationRule) sit in the routed
                    // pipeline: an address without routes gets a one-rule table to run them.
                    let default_table = (svc_security.jwt.is_some()
                        || svc_security.authz.is_some()
                        || index.backends[id.0].policy.needs_pipeline())
                    .then(|| default_table(ns, &svc.metadata.name, *id));
                    let binding = ServiceBinding {
                        default_table,
                        security: svc_security,
                        kind: BindingKind::Service,
                        name: svc.metadata.name.as_str().into(),
                        namespace: ns.into(),
                        hostname: format!("{}.{ns}.svc.{}", svc.metadata.name, settings.cluster_domain).into(),
                        vip: SocketAddr::new(*vip, port.port),
                        port_name: port.name.clone(),
                        protocol: port.protocol,
                        backend: index.backends[id.0].clone(),
                        routes: set.clone(),
                    };
                    bind(cx, origin, binding);
                }
            }
        });
    }
    for (origin, gateway) in &objects.gateways {
        with_origin(cx, origin, |cx| {
            let gw_security = security.for_service(ns_of(&gateway.metadata), &gateway.metadata.name);
            for mut binding in gateway_bindings(cx, gateway, &routes) {
                binding.security = gw_security.clone();
                bind(cx, origin, binding);
            }
        });
    }
    let workload_map = workloads
        .iter()
        .map(|w| {
            let ep = Arc::new(Endpoint {
                addr: SocketAddr::new(w.ip, 0),
                hbone: w.hbone.then(|| SocketAddr::new(w.ip, settings.destination_hbone_port)),
                identity: w.identity.clone(),
                workload: w.name.clone(),
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
                locality: w.locality.clone(),
            });
            (w.ip, ep)
        })
        .collect();
    Some(Snapshot {
        generation,
        source: cx.file.to_string(),
        settings,
        services,
        backends: index.backends,
        workloads: workload_map,
        skipped: objects.skipped,
        warnings: std::mem::take(&mut cx.warnings),
        security: security_settings,
    })
}

/// Backends by (namespace, service, port); the resolver routes use for `backendRefs`.
#[derive(Default)]
struct BackendIndex {
    backends: Vec<Arc<Backend>>,
    by_port: HashMap<(String, String, u16), BackendId>,
    /// DestinationRule subsets: (namespace, service, port, subset).
    by_subset: HashMap<(String, String, u16, String), BackendId>,
    /// Ports per service, for refs that omit the port (valid when the Service has exactly one).
    ports: HashMap<(String, String), Vec<u16>>,
}

impl BackendIndex {
    fn port_of(&self, namespace: &str, name: &str, port: Option<u16>) -> Option<u16> {
        match port {
            Some(p) => Some(p),
            None => match self
                .ports
                .get(&(namespace.to_string(), name.to_string()))
                .map(Vec::as_slice)
            {
                Some([only]) => Some(*only),
                _ => None,
            },
        }
    }
}

impl BackendResolver for BackendIndex {
    fn backend(&self, namespace: &str, name: &str, port: Option<u16>) -> Option<BackendId> {
        let port = self.port_of(namespace, name, port)?;
        self.by_port
            .get(&(namespace.to_string(), name.to_string(), port))
            .copied()
    }

    fn subset(&self, namespace: &str, name: &str, port: Option<u16>, subset: &str) -> Option<BackendId> {
        let port = self.port_of(namespace, name, port)?;
        self.by_subset
            .get(&(namespace.to_string(), name.to_string(), port, subset.to_string()))
            .copied()
    }
}

/// A route attached to one Service port (`None` = every port).
type PortRoute = (Option<u16>, Arc<Route>);

/// Route tables per parent, built from every HTTPRoute and GRPCRoute.
#[derive(Default)]
struct Routes {
    /// (service namespace, service name) → [(parent port or all, route namespace, route)]
    service: HashMap<(String, String), Vec<PortRoute>>,
    /// (gateway namespace, gateway name, listener name) → routes with hostnames narrowed to the listener.
    listener: HashMap<(String, String, String), Vec<Arc<Route>>>,
}

impl Routes {
    fn for_service(&self, ns: &str, name: &str, port: u16) -> Option<Arc<RouteSet>> {
        let attached = self.service.get(&(ns.to_string(), name.to_string()))?;
        let mut producer = Vec::new();
        let mut consumers: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        for (p, route) in attached {
            if p.is_some_and(|p| p != port) {
                continue;
            }
            if route.namespace == ns {
                producer.push(route.clone());
            } else {
                consumers
                    .entry(route.namespace.clone())
                    .or_default()
                    .push(route.clone());
            }
        }
        if producer.is_empty() && consumers.is_empty() {
            return None;
        }
        Some(Arc::new(RouteSet {
            producer: (!producer.is_empty()).then(|| Arc::new(RouteTable::new(producer))),
            consumers: consumers
                .into_iter()
                .map(|(ns, r)| (ns, Arc::new(RouteTable::new(r))))
                .collect(),
        }))
    }
}

fn with_routes(cx: &mut Ctx<'_>, objects: &Objects, index: &BackendIndex) -> Routes {
    let mut grants = Grants::default();
    for (_, g) in &objects.grants {
        grants.add(g);
    }
    let tcx = TranslateCx {
        resolver: index,
        grants: &grants,
    };
    let namespace_labels: HashMap<String, BTreeMap<String, String>> = objects
        .namespaces
        .iter()
        .map(|(_, n)| (n.metadata.name.clone(), n.metadata.labels.clone()))
        .collect();
    let mut out = Routes::default();
    let http = objects
        .http_routes
        .iter()
        .map(|(o, r)| (o, &r.metadata, &r.spec.parent_refs, Either::Http(r)));
    let grpc = objects
        .grpc_routes
        .iter()
        .map(|(o, r)| (o, &r.metadata, &r.spec.parent_refs, Either::Grpc(r)));
    for (origin, meta, parents, route) in http.chain(grpc) {
        with_origin(cx, origin, |cx| {
            let compiled = match route {
                Either::Http(r) => tcx.http_route(r, origin.doc),
                Either::Grpc(r) => tcx.grpc_route(r, origin.doc),
            };
            let compiled = match compiled {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    cx.field_error(&e.field, e.reason);
                    return;
                }
            };
            let route_ns = meta.namespace.as_deref().unwrap_or("default");
            for (pi, parent) in parents.iter().enumerate() {
                let group = parent.group.as_deref().unwrap_or("gateway.networking.k8s.io");
                let kind = parent.kind.as_deref().unwrap_or("Gateway");
                let parent_ns = parent.namespace.clone().unwrap_or_else(|| route_ns.to_string());
                match (group, kind) {
                    ("" | "core", "Service") => {
                        let port = match parent.port.map(u16::try_from) {
                            None => None,
                            Some(Ok(p)) if p > 0 => Some(p),
                            Some(_) => {
                                cx.field_error(&format!("spec.parentRefs[{pi}].port"), "must be a port 1-65535");
                                continue;
                            }
                        };
                        // GAMMA: the Service named by the HBONE authority selects the route; Host plays no part.
                        let route = if compiled.hostnames.is_empty() {
                            compiled.clone()
                        } else {
                            Arc::new(with_hostnames(&compiled, Vec::new()))
                        };
                        out.service
                            .entry((parent_ns, parent.name.clone()))
                            .or_default()
                            .push((port, route));
                    }
                    ("gateway.networking.k8s.io", "Gateway") => {
                        let Some((_, gateway)) = objects.gateways.iter().find(|(_, g)| {
                            g.metadata.name == parent.name
                                && g.metadata.namespace.as_deref().unwrap_or("default") == parent_ns
                        }) else {
                            tracing::warn!(route = %origin.object, gateway = %format!("{parent_ns}/{}", parent.name), "parent Gateway not found; route not attached");
                            continue;
                        };
                        for listener in gw::selected_listeners(gateway, parent, route_ns, &namespace_labels) {
                            let Some(hostnames) = gw::effective_hostnames(listener, &compiled.hostnames) else {
                                continue;
                            };
                            let narrowed = if hostnames == compiled.hostnames {
                                compiled.clone()
                            } else {
                                Arc::new(with_hostnames(&compiled, hostnames))
                            };
                            out.listener
                                .entry((parent_ns.clone(), parent.name.clone(), listener.name.clone()))
                                .or_default()
                                .push(narrowed);
                        }
                    }
                    _ => tracing::warn!(route = %origin.object, %group, %kind, "unsupported parentRef kind; ignored"),
                }
            }
        });
    }
    out
}

fn ns_of(meta: &k8s::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// The route every request takes when an address has no routes: its own backend, nothing else.
fn default_table(ns: &str, name: &str, backend: BackendId) -> Arc<RouteTable> {
    let rule = Rule {
        backends: vec![WeightedBackend {
            backend: Some(backend),
            weight: 1,
            filters: Vec::new(),
        }],
        ..Default::default()
    };
    Arc::new(RouteTable::new(vec![Arc::new(Route {
        kind: RouteKind::Http,
        namespace: ns.to_string(),
        name: format!("{name}-default"),
        creation_timestamp: None,
        source_order: 0,
        hostnames: Vec::new(),
        rules: vec![Arc::new(rule)],
    })]))
}

/// Translate every AuthorizationPolicy and RequestAuthentication, reporting field errors per document.
fn security_index(
    cx: &mut Ctx<'_>,
    settings: &Settings,
    security: &SecuritySettings,
    objects: &Objects,
    jwks: &dyn JwksSource,
) -> SecurityIndex {
    let providers: Vec<&str> = security.extension_providers.keys().map(String::as_str).collect();
    let scx = SecurityCx {
        root_namespace: &security.root_namespace,
        waypoint: Some((settings.namespace.as_str(), settings.name.as_str())),
        ext_authz_providers: &providers,
    };
    let mut index = SecurityIndex::new(security.authz);
    for (origin, ap) in &objects.authorization_policies {
        with_origin(cx, origin, |cx| match sec::authorization_policy(ap, &scx) {
            Ok(sec::Attachment::Applies { target, compiled }) => index.add_authorization_policy(target, compiled),
            Ok(sec::Attachment::Skipped { reason }) => {
                tracing::warn!(policy = %origin.object, %reason, "AuthorizationPolicy does not apply to this waypoint")
            }
            Err(e) => cx.field_error(&e.field, e.reason),
        });
    }
    for (origin, ra) in &objects.request_authentications {
        with_origin(cx, origin, |cx| match sec::request_authentication(ra, &scx, jwks) {
            Ok(sec::Attachment::Applies { target, compiled }) => index.add_request_authentication(target, compiled),
            Ok(sec::Attachment::Skipped { reason }) => {
                tracing::warn!(policy = %origin.object, %reason, "RequestAuthentication does not apply to this waypoint")
            }
            Err(e) => cx.field_error(&e.field, e.reason),
        });
    }
    index
}

fn with_hostnames(route: &Route, hostnames: Vec<String>) -> Route {
    Route {
        kind: route.kind,
        namespace: route.namespace.clone(),
        name: route.name.clone(),
        creation_timestamp: route.creation_timestamp.clone(),
        source_order: route.source_order,
        hostnames,
        rules: route.rules.clone(),
    }
}

enum Either<'a> {
    Http(&'a gw::HttpRoute),
    Grpc(&'a gw::GrpcRoute),
}

/// One binding per (Gateway address, listener port); listeners sharing a port share a table, told apart by the
/// route hostnames (each route's hostnames were narrowed to its listener's).
fn gateway_bindings(cx: &mut Ctx<'_>, gateway: &gw::Gateway, routes: &Routes) -> Vec<ServiceBinding> {
    let ns = gateway.metadata.namespace.as_deref().unwrap_or("default");
    let mut addrs = Vec::new();
    for (i, a) in gateway.spec.addresses.iter().enumerate() {
        if a.kind.as_deref().is_some_and(|k| k != "IPAddress") {
            continue;
        }
        match a.value.parse::<IpAddr>() {
            Ok(ip) => addrs.push(ip),
            Err(_) => cx.field_error(
                &format!("spec.addresses[{i}].value"),
                format!("{:?} is not an IP address", a.value),
            ),
        }
    }
    let mut by_port: BTreeMap<u16, Vec<Arc<Route>>> = BTreeMap::new();
    for (li, l) in gateway.spec.listeners.iter().enumerate() {
        let Some(port) = port_or_error(cx, &format!("spec.listeners[{li}].port"), l.port) else {
            continue;
        };
        if !matches!(l.protocol.as_str(), "HTTP" | "HBONE") {
            tracing::warn!(gateway = %format!("{ns}/{}", gateway.metadata.name), listener = %l.name, protocol = %l.protocol, "listener protocol not served by a waypoint (no TLS termination); skipped");
            continue;
        }
        if l.protocol == "HBONE" {
            continue;
        }
        let attached = routes
            .listener
            .get(&(ns.to_string(), gateway.metadata.name.clone(), l.name.clone()));
        by_port
            .entry(port)
            .or_default()
            .extend(attached.into_iter().flatten().cloned());
    }
    let empty_backend = Arc::new(Backend::new(
        gateway.metadata.name.as_str().into(),
        ns.into(),
        0,
        PortProtocol::Http,
        Vec::new(),
    ));
    let mut out = Vec::new();
    for (port, list) in by_port {
        let set = Arc::new(RouteSet {
            producer: Some(Arc::new(RouteTable::new(list))),
            consumers: HashMap::new(),
        });
        for ip in &addrs {
            out.push(ServiceBinding {
                kind: BindingKind::GatewayListener,
                name: gateway.metadata.name.as_str().into(),
                namespace: ns.into(),
                hostname: gateway.metadata.name.as_str().into(),
                vip: SocketAddr::new(*ip, port),
                port_name: None,
                protocol: PortProtocol::Http,
                backend: empty_backend.clone(),
                routes: Some(set.clone()),
                default_table: None,
                security: Default::default(),
            });
        }
    }
    out
}

fn parse_duration_field(cx: &mut Ctx<'_>, field: &str, v: Option<&str>, default: Duration) -> Duration {
    match v.map(duration::parse) {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            cx.field_error(field, e.to_string());
            default
        }
    }
}

fn parse_addr_field(cx: &mut Ctx<'_>, field: &str, v: Option<&str>, default: &str) -> Option<SocketAddr> {
    let s = v.unwrap_or(default);
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            cx.field_error(field, format!("{s:?} is not an ip:port socket address"));
            None
        }
    }
}

fn settings_from(cx: &mut Ctx<'_>, base_dir: &Path, wc: &k8s::WaypointConfig) -> Option<Settings> {
    let spec = &wc.spec;
    let hbone = parse_addr_field(
        cx,
        "spec.listeners.hbone",
        spec.listeners.hbone.as_deref(),
        "0.0.0.0:15008",
    );
    let readiness = parse_addr_field(
        cx,
        "spec.listeners.readiness",
        spec.listeners.readiness.as_deref(),
        "0.0.0.0:15021",
    );
    let admin = parse_addr_field(
        cx,
        "spec.listeners.admin",
        spec.listeners.admin.as_deref(),
        "127.0.0.1:15000",
    );
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { base_dir.join(p) }
    };
    let tls = match &spec.tls {
        Some(t) => {
            for (field, v) in [
                ("certFile", &t.cert_file),
                ("keyFile", &t.key_file),
                ("rootsFile", &t.roots_file),
            ] {
                if v.is_empty() {
                    cx.field_error(&format!("spec.tls.{field}"), "must not be empty");
                }
            }
            Some(TlsPaths {
                cert_file: resolve(&t.cert_file),
                key_file: resolve(&t.key_file),
                roots_file: resolve(&t.roots_file),
            })
        }
        None => {
            cx.field_error("spec.tls", "required: certFile, keyFile and rootsFile (PEM)");
            None
        }
    };
    let trust_domain = spec.trust_domain.clone().unwrap_or_else(|| "cluster.local".to_string());
    if trust_domain.is_empty() || trust_domain.contains('/') {
        cx.field_error("spec.trustDomain", format!("{trust_domain:?} is not a trust domain"));
    }
    let dest_port = match spec.destination_hbone_port {
        None => 15008,
        Some(p) => port_or_error(cx, "spec.destinationHbonePort", p).unwrap_or(15008),
    };
    let drain_timeout = parse_duration_field(
        cx,
        "spec.drainTimeout",
        spec.drain_timeout.as_deref(),
        Duration::from_secs(30),
    );
    let protocol_detection_timeout = parse_duration_field(
        cx,
        "spec.protocolDetectionTimeout",
        spec.protocol_detection_timeout.as_deref(),
        Duration::from_millis(100),
    );
    let watch_interval = parse_duration_field(
        cx,
        "spec.watchInterval",
        spec.watch_interval.as_deref(),
        Duration::from_millis(500),
    );
    if watch_interval.is_zero() {
        cx.field_error("spec.watchInterval", "must be greater than zero");
    }
    let memory_release_interval = parse_duration_field(
        cx,
        "spec.memoryReleaseInterval",
        spec.memory_release_interval.as_deref(),
        Duration::from_secs(10),
    );
    let locality = match spec.locality.as_deref().map(parse_locality) {
        None => Locality::default(),
        Some(Ok(l)) => l,
        Some(Err(reason)) => {
            cx.field_error("spec.locality", reason);
            Locality::default()
        }
    };
    let mut labels = spec.labels.clone();
    locality.add_labels(&mut labels);
    Some(Settings {
        name: wc.metadata.name.clone(),
        namespace: wc.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        trust_domain,
        cluster_domain: spec.cluster_domain.clone().unwrap_or_else(|| "cluster.local".into()),
        hbone_addr: hbone?,
        readiness_addr: readiness?,
        admin_addr: admin?,
        tls: tls?,
        destination_hbone_port: dest_port,
        drain_timeout,
        protocol_detection_timeout,
        watch_interval,
        memory_release_interval,
        jwks_roots_file: spec
            .security
            .as_ref()
            .and_then(|s| s.jwks_roots_file.as_deref())
            .map(resolve),
        locality,
        labels,
    })
}

/// `region/zone/subzone` (trailing parts may be omitted), as WorkloadEntry `locality` and Istio write it.
fn parse_locality(s: &str) -> Result<Locality, String> {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() > 3 {
        return Err(format!("{s:?} is not region/zone/subzone"));
    }
    if parts.iter().any(|p| p.contains('*')) {
        return Err(format!("{s:?}: a locality has no wildcards"));
    }
    Ok(Locality::parse(s))
}

fn port_or_error(cx: &mut Ctx<'_>, field: &str, p: i64) -> Option<u16> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            cx.field_error(field, format!("must be a port number 1-65535, got {p}"));
            None
        }
    }
}

/// A pod or WorkloadEntry reduced to what endpoint resolution needs.
struct Workload {
    name: Arc<str>,
    namespace: Arc<str>,
    ip: IpAddr,
    labels: BTreeMap<String, String>,
    identity: SpiffeId,
    hbone: bool,
    locality: Locality,
    /// Named container ports (Pod) or service-port-name overrides (WorkloadEntry).
    named_ports: BTreeMap<String, u16>,
    /// WorkloadEntry `ports` override the Service targetPort by service port *name*; Pod names are container
    /// port names matched against a string targetPort.
    port_overrides_by_service_port_name: bool,
}

/// Istio marks an endpoint as HBONE-capable when the pod is captured by ztunnel (istio-cni annotates it) or
/// when it carries the tunnel label (istiod `supportTunnel`).
fn speaks_hbone(labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>) -> bool {
    annotations.get("ambient.istio.io/redirection").map(String::as_str) == Some("enabled")
        || labels.get("networking.istio.io/tunnel").map(String::as_str) == Some("http")
}

fn workloads(cx: &mut Ctx<'_>, settings: &Settings, objects: &Objects) -> Vec<Workload> {
    let mut out = Vec::new();
    for (origin, pod) in &objects.pods {
        with_origin(cx, origin, |cx| {
            if matches!(pod.status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
                return;
            }
            let Some(ip_s) = pod.status.pod_ip.as_deref() else {
                tracing::debug!(pod = %origin.object, "pod has no status.podIP yet; not an endpoint");
                return;
            };
            let Ok(ip) = ip_s.parse::<IpAddr>() else {
                cx.field_error("status.podIP", format!("{ip_s:?} is not an IP address"));
                return;
            };
            let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let sa = pod
                .spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into());
            let mut named_ports = BTreeMap::new();
            for (ci, c) in pod.spec.containers.iter().enumerate() {
                for (pi, p) in c.ports.iter().enumerate() {
                    let field = format!("spec.containers[{ci}].ports[{pi}].containerPort");
                    if let (Some(name), Some(port)) = (&p.name, port_or_error(cx, &field, p.container_port)) {
                        named_ports.insert(name.clone(), port);
                    }
                }
            }
            out.push(Workload {
                name: pod.metadata.name.as_str().into(),
                identity: SpiffeId::new(&settings.trust_domain, &ns, &sa),
                namespace: ns.into(),
                ip,
                labels: pod.metadata.labels.clone(),
                // In a cluster these are node labels; the pod carries them here.
                locality: Locality::from_labels(&pod.metadata.labels),
                hbone: speaks_hbone(&pod.metadata.labels, &pod.metadata.annotations),
                named_ports,
                port_overrides_by_service_port_name: false,
            });
        });
    }
    for (origin, we) in &objects.workload_entries {
        with_origin(cx, origin, |cx| {
            let Some(addr) = we.spec.address.as_deref() else {
                cx.field_error("spec.address", "required");
                return;
            };
            let Ok(ip) = addr.parse::<IpAddr>() else {
                cx.field_error(
                    "spec.address",
                    format!("{addr:?} is not an IP address (DNS addresses are not supported)"),
                );
                return;
            };
            let ns = we.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let sa = we.spec.service_account.clone().unwrap_or_else(|| "default".into());
            let mut labels = if we.spec.labels.is_empty() {
                we.metadata.labels.clone()
            } else {
                we.spec.labels.clone()
            };
            let locality = match we.spec.locality.as_deref().filter(|l| !l.is_empty()) {
                None => Locality::from_labels(&labels),
                Some(l) => match parse_locality(l) {
                    Ok(loc) => {
                        loc.add_labels(&mut labels);
                        loc
                    }
                    Err(reason) => {
                        cx.field_error("spec.locality", reason);
                        return;
                    }
                },
            };
            let mut named_ports = BTreeMap::new();
            for (name, p) in &we.spec.ports {
                if let Some(port) = port_or_error(cx, &format!("spec.ports.{name}"), *p) {
                    named_ports.insert(name.clone(), port);
                }
            }
            out.push(Workload {
                name: we.metadata.name.as_str().into(),
                identity: SpiffeId::new(&settings.trust_domain, &ns, &sa),
                namespace: ns.into(),
                ip,
                hbone: speaks_hbone(&labels, &we.metadata.annotations),
                labels,
                locality,
                named_ports,
                port_overrides_by_service_port_name: true,
            });
        });
    }
    out
}

/// One Service port, as bindings need it.
struct SvcPort {
    name: Option<String>,
    port: u16,
    protocol: PortProtocol,
}

fn service_vips(cx: &mut Ctx<'_>, svc: &k8s::Service) -> Vec<IpAddr> {
    let mut vips: Vec<IpAddr> = Vec::new();
    let mut ip_strings: Vec<(String, &str)> = Vec::new();
    if let Some(ip) = &svc.spec.cluster_ip {
        ip_strings.push(("spec.clusterIP".into(), ip));
    }
    for (i, ip) in svc.spec.cluster_ips.iter().enumerate() {
        ip_strings.push((format!("spec.clusterIPs[{i}]"), ip));
    }
    for (field, s) in ip_strings {
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            continue;
        }
        match s.parse::<IpAddr>() {
            Ok(ip) if !vips.contains(&ip) => vips.push(ip),
            Ok(_) => {}
            Err(_) => cx.field_error(&field, format!("{s:?} is not an IP address")),
        }
    }
    vips
}

/// Resolve every port of a Service to its endpoints and register each as a backend, with the traffic policy of
/// `rule` (the DestinationRule that applies to the Service) and one more backend per subset of that rule.
fn service_ports(
    cx: &mut Ctx<'_>,
    settings: &Settings,
    svc: &k8s::Service,
    workloads: &[Workload],
    index: &mut BackendIndex,
    rule: Option<&dr::CompiledRule>,
) -> Vec<(SvcPort, BackendId)> {
    let ns: Arc<str> = svc.metadata.namespace.as_deref().unwrap_or("default").into();
    let name: Arc<str> = svc.metadata.name.as_str().into();
    let selector = svc.spec.selector.clone().unwrap_or_default();
    let selected: Vec<&Workload> = if selector.is_empty() {
        // Without a selector Kubernetes expects manually managed endpoints, which this file format has no kind for.
        Vec::new()
    } else {
        workloads
            .iter()
            .filter(|w| *w.namespace == *ns && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .collect()
    };
    let mut out = Vec::new();
    for (pi, port) in svc.spec.ports.iter().enumerate() {
        let Some(svc_port) = port_or_error(cx, &format!("spec.ports[{pi}].port"), port.port) else {
            continue;
        };
        if let Some(p) = &port.protocol
            && !p.eq_ignore_ascii_case("TCP")
        {
            // UDP/SCTP never reach a waypoint: HBONE carries TCP only.
            continue;
        }
        let target = match &port.target_port {
            None => IntOrString::Int(svc_port.into()),
            Some(IntOrString::Int(p)) => match port_or_error(cx, &format!("spec.ports[{pi}].targetPort"), *p) {
                Some(p) => IntOrString::Int(p.into()),
                None => continue,
            },
            Some(IntOrString::String(s)) if s.is_empty() => {
                cx.field_error(&format!("spec.ports[{pi}].targetPort"), "must not be empty");
                continue;
            }
            Some(t @ IntOrString::String(_)) => t.clone(),
        };
        let mut endpoints = Vec::new();
        for w in &selected {
            let resolved = if w.port_overrides_by_service_port_name {
                port.name
                    .as_ref()
                    .and_then(|n| w.named_ports.get(n).copied())
                    .or(match &target {
                        IntOrString::Int(p) => u16::try_from(*p).ok(),
                        IntOrString::String(_) => None,
                    })
            } else {
                match &target {
                    IntOrString::Int(p) => u16::try_from(*p).ok(),
                    IntOrString::String(s) => w.named_ports.get(s).copied(),
                }
            };
            let Some(tp) = resolved else {
                tracing::warn!(service = %format!("{ns}/{name}"), workload = %w.name, "workload has no port named by targetPort; skipped as endpoint");
                continue;
            };
            endpoints.push(Arc::new(Endpoint {
                addr: SocketAddr::new(w.ip, tp),
                hbone: w.hbone.then(|| SocketAddr::new(w.ip, settings.destination_hbone_port)),
                identity: w.identity.clone(),
                workload: w.name.clone(),
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
                locality: w.locality.clone(),
            }));
        }
        let protocol = PortProtocol::from_port(port.app_protocol.as_deref(), port.name.as_deref());
        if let Some(rule) = rule {
            for subset in &rule.subsets {
                let eps: Vec<Arc<Endpoint>> = endpoints
                    .iter()
                    .filter(|e| subset.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                    .cloned()
                    .collect();
                if eps.is_empty() {
                    tracing::debug!(service = %format!("{ns}/{name}"), port = svc_port, subset = %subset.name, "no endpoint has the subset's labels");
                }
                let mut backend = Backend::new(name.clone(), ns.clone(), svc_port, protocol, eps);
                backend.subset = Some(subset.name.as_str().into());
                backend.policy = Arc::new(rule.policy(svc_port, Some(&subset.name)));
                let sid = BackendId(index.backends.len());
                index.backends.push(Arc::new(backend));
                index
                    .by_subset
                    .insert((ns.to_string(), name.to_string(), svc_port, subset.name.clone()), sid);
            }
        }
        let id = BackendId(index.backends.len());
        let mut backend = Backend::new(name.clone(), ns.clone(), svc_port, protocol, endpoints);
        if let Some(rule) = rule {
            backend.policy = Arc::new(rule.policy(svc_port, None));
        }
        index.backends.push(Arc::new(backend));
        index.by_port.insert((ns.to_string(), name.to_string(), svc_port), id);
        index
            .ports
            .entry((ns.to_string(), name.to_string()))
            .or_default()
            .push(svc_port);
        out.push((
            SvcPort {
                name: port.name.clone(),
                port: svc_port,
                protocol,
            },
            id,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "apiVersion: waypoint.istio.io/v1alpha1
kind: WaypointConfig
metadata: {name: wp, namespace: infra}
spec:
  listeners: {hbone: 127.0.0.1:15008}
  tls: {certFile: c.pem, keyFile: k.pem, rootsFile: r.pem}
";

    fn parse(text: &str) -> Result<Snapshot, ConfigErrors> {
        parse_config("test.yaml", Path::new("/etc/wp"), text, 1)
    }

    #[test]
    fn resolves_services_pods_and_workload_entries() {
        let text = format!(
            "{HEADER}---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: ns1}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: echo}}
  ports:
  - {{name: http, port: 80, targetPort: web}}
  - {{name: tcp-db, port: 5432}}
  - {{name: grpc, port: 7070, targetPort: 7070, appProtocol: kubernetes.io/h2c}}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-1
  namespace: ns1
  labels: {{app: echo}}
  annotations: {{ambient.istio.io/redirection: enabled}}
spec:
  serviceAccountName: echo-sa
  containers: [{{name: c, ports: [{{name: web, containerPort: 8080}}]}}]
status: {{podIP: 127.1.0.1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: vm-1, namespace: ns1}}
spec:
  address: 127.1.0.2
  labels: {{app: echo}}
  ports: {{http: 9090}}
---
apiVersion: v1
kind: Pod
metadata: {{name: other, namespace: ns2, labels: {{app: echo}}}}
status: {{podIP: 127.1.0.3}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo, namespace: ns1, labels: {{app: not-selected}}}}
status: {{podIP: 127.1.0.4}}
"
        );
        let snap = parse(&text).unwrap();
        assert_eq!(snap.settings.tls.cert_file, PathBuf::from("/etc/wp/c.pem"));
        let http = snap.service(&"10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(http.protocol, PortProtocol::Http);
        assert_eq!(&*http.hostname, "echo.ns1.svc.cluster.local");
        let eps: Vec<String> = http.backend.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(
            eps,
            vec!["127.1.0.1:8080", "127.1.0.2:9090"],
            "named targetPort and WorkloadEntry port override"
        );
        let pod = &http.backend.endpoints[0];
        assert_eq!(pod.identity.to_string(), "spiffe://cluster.local/ns/ns1/sa/echo-sa");
        assert_eq!(pod.hbone, Some("127.1.0.1:15008".parse().unwrap()));
        assert_eq!(http.backend.endpoints[1].hbone, None, "no tunnel capability: plain TCP");
        let db = snap.service(&"10.96.0.10:5432".parse().unwrap()).unwrap();
        assert_eq!(db.protocol, PortProtocol::Tcp);
        // The pod has no container port 5432 declared, but a numeric targetPort needs none.
        assert_eq!(db.backend.endpoints.len(), 2);
        let grpc = snap.service(&"10.96.0.10:7070".parse().unwrap()).unwrap();
        assert_eq!(grpc.protocol, PortProtocol::Http2);
        // A workload-addressed backend never shares runtime state (breaker, ejections) with a Service's.
        let direct = snap.resolve(&"127.1.0.4:80".parse().unwrap()).unwrap();
        assert_eq!(direct.kind, BindingKind::Workload);
        let service_keys: Vec<String> = snap.backends.iter().map(|b| b.key()).collect();
        assert!(
            !service_keys.contains(&direct.backend.key()),
            "{}",
            direct.backend.key()
        );
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let text = format!(
            "{HEADER}---
apiVersion: v1
kind: Service
metadata: {{name: bad, namespace: ns1}}
spec:
  clusterIP: 10.96.0.11
  ports:
  - {{name: http, port: 70000}}
---
apiVersion: v1
kind: Service
metadata: {{name: worse, namespace: ns1}}
spec:
  ports:
  - {{name: http, port: eighty}}
"
        );
        let errs = parse(&text).unwrap_err();
        let msgs: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs[0].starts_with("test.yaml: document 2 (line 8, Service ns1/bad): field spec.ports[0].port:"),
            "{}",
            msgs[0]
        );
        assert!(msgs[0].contains("70000"));
        assert!(msgs[1].contains("document 3"), "{}", msgs[1]);
        assert!(msgs[1].contains("field spec.ports[0].port"), "{}", msgs[1]);
    }

    #[test]
    fn memory_release_interval_defaults_parses_and_names_the_field_when_invalid() {
        assert_eq!(
            parse(HEADER).unwrap().settings.memory_release_interval,
            Duration::from_secs(10)
        );
        let off = parse(&format!("{HEADER}  memoryReleaseInterval: 0s\n")).unwrap();
        assert_eq!(off.settings.memory_release_interval, Duration::ZERO);
        let errs = parse(&format!("{HEADER}  memoryReleaseInterval: often\n")).unwrap_err();
        assert!(errs.to_string().contains("spec.memoryReleaseInterval"), "{errs}");
    }

    #[test]
    fn unknown_kinds_are_skipped_and_reported() {
        let text = format!("{HEADER}---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {{name: w}}\n");
        let snap = parse(&text).unwrap();
        assert_eq!(snap.skipped, vec!["example.com/v1/Widget default/w"]);
    }

    #[test]
    fn requires_exactly_one_waypoint_config_and_valid_yaml() {
        let errs = parse("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n").unwrap_err();
        assert!(errs.to_string().contains("no WaypointConfig"), "{errs}");
        let errs = parse(&format!("{HEADER}---\n{HEADER}")).unwrap_err();
        assert!(errs.to_string().contains("more than one WaypointConfig"), "{errs}");
        let errs = parse(&format!("{HEADER}---\nkind: [unclosed\n")).unwrap_err();
        assert!(
            errs.to_string().contains("document 2") && errs.to_string().contains("invalid YAML"),
            "{errs}"
        );
        let errs = parse(&HEADER.replace("listeners:", "listners:")).unwrap_err();
        assert!(errs.to_string().contains("listners"), "{errs}");
    }

    #[test]
    fn duplicate_vip_port_is_rejected() {
        let svc = |n: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: 80}}]}}\n"
            )
        };
        let errs = parse(&format!("{HEADER}{}{}", svc("a"), svc("b"))).unwrap_err();
        assert!(
            errs.to_string()
                .contains("10.0.0.1:80 is already bound by Service default/a"),
            "{errs}"
        );
    }

    #[test]
    fn protocol_from_app_protocol_and_name() {
        use PortProtocol::*;
        assert_eq!(PortProtocol::from_port(Some("HTTP"), None), Http);
        assert_eq!(PortProtocol::from_port(None, Some("grpc-web")), Http2);
        assert_eq!(PortProtocol::from_port(None, Some("http2-foo")), Http2);
        assert_eq!(PortProtocol::from_port(None, Some("tcp-mysql")), Tcp);
        assert_eq!(PortProtocol::from_port(None, Some("tls")), Tcp);
        assert_eq!(PortProtocol::from_port(None, Some("web")), Detect);
        assert_eq!(PortProtocol::from_port(Some("kubernetes.io/h2c"), Some("http")), Http2);
    }
}
