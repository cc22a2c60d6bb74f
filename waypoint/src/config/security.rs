//! security.istio.io (v1 and v1beta1) `RequestAuthentication` and `AuthorizationPolicy`: the fields the waypoint
//! reads, and their translation into the compiled types of `waypoint_filters::{jwt, authz}`.
//!
//! Which policies a waypoint enforces (Istio ambient):
//! - `targetRefs` (or the older `targetRef`) of kind `Service` (or `ServiceEntry`) in the policy's namespace:
//!   that service;
//! - kind `Gateway` naming this waypoint, or kind `GatewayClass` `istio-waypoint` (root namespace only): every
//!   service of the waypoint;
//! - no `targetRefs` and no `selector`, in the root namespace (`istio-system` by default): every service;
//! - `selector` policies apply to workloads (sidecars, ztunnel), never to a waypoint: reported and skipped, as is
//!   a namespace-wide policy outside the root namespace (ztunnel enforces those).
//!
//! Wiring (for the loader): parse the kinds with serde, call [`authorization_policy`] / [`request_authentication`]
//! per object (a [`FieldError`] names the offending field; [`Attachment::Skipped`] is a warning, not an error),
//! feed the results to a [`SecurityIndex`], and ask it [`SecurityIndex::for_service`] for each service binding.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use waypoint_filters::authz::{
    self, Action, AuthzPolicies, AuthzSettings, Cidr, Condition, Operation, PathMatch, PathNormalization,
    PrincipalMatch, Rule, Source, StringMatch,
};
use waypoint_filters::jwt::{ClaimToHeader, FromHeader, JwkSet, JwksHandle, JwtPolicy, JwtRule, KeySet};

use super::duration;
use super::gateway_api::{FieldError, ferr, header_name};
use super::k8s::{IntOrString, ObjectMeta};

// ------------------------------------------------------------------------------------------------ objects

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RequestAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRuleSpec {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default, alias = "jwks_uri")]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeaderSpec>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeaderSpec>,
    #[serde(default)]
    pub forward_original_token: bool,
    /// Timeout of one `jwksUri` fetch.
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct JwtHeaderSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClaimToHeaderSpec {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub claim: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub provider: Option<ProviderSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProviderSpec {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<SourceSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<OperationSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Istio writes ports as strings; numbers are accepted too.
    #[serde(default)]
    pub ports: Vec<IntOrString>,
    #[serde(default)]
    pub not_ports: Vec<IntOrString>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionSpec {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// Security settings of the waypoint (meant as `WaypointConfig.spec.security`; every field optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecuritySettingsSpec {
    /// Istio's root namespace (`istio-system`): policies there without targetRefs apply to every service.
    #[serde(default)]
    pub root_namespace: Option<String>,
    /// Envoy's `xff_num_trusted_hops`, for `remoteIpBlocks` / `remote.ip`.
    #[serde(default)]
    pub xff_num_trusted_hops: Option<u32>,
    /// `NONE`, `BASE` (default), `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`.
    #[serde(default)]
    pub path_normalization: Option<String>,
    /// PEM CAs trusted for HTTPS `jwksUri` fetches (relative to the config file). Without it only `http://`
    /// JWKS URIs can be fetched: there is deliberately no built-in public root store.
    #[serde(default)]
    pub jwks_roots_file: Option<String>,
    /// Istio's `meshConfig.extensionProviders`: the ext_authz servers CUSTOM policies name.
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProviderSpec>,
}

/// One of Istio's `meshConfig.extensionProviders`. Only the ext_authz kinds mean anything to a waypoint's
/// authorization; another kind (tracing, access log) is accepted and only refused when a CUSTOM policy names it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProviderSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub envoy_ext_authz_http: Option<ExtAuthzHttpSpec>,
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpcSpec>,
}

/// Istio's `EnvoyExternalAuthorizationHttpProvider`. Unknown fields (`includeRequestBodyInCheck`, …) are refused
/// rather than ignored: a check must never be weaker than the config says.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzHttpSpec {
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    /// Istio writes it as a string (`"503"`).
    #[serde(default)]
    pub status_on_error: Option<IntOrString>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    /// Istio's deprecated name for `includeRequestHeadersInCheck`.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
}

/// Istio's `EnvoyExternalAuthorizationGrpcProvider`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzGrpcSpec {
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: Option<IntOrString>,
}

/// Where an ext_authz server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderTarget {
    /// An IP literal: dialled directly over plain TCP.
    Addr(SocketAddr),
    /// A Service of the snapshot, reached through one of its endpoints like any upstream (TCP or HBONE).
    Service { namespace: String, name: String, port: u16 },
}

/// A compiled ext_authz provider.
#[derive(Debug, Clone)]
pub struct ExtAuthzProvider {
    pub name: String,
    pub target: ProviderTarget,
    /// `service:port`, the authority of check requests.
    pub authority: String,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: StatusCode,
    pub kind: ExtAuthzKind,
}

#[derive(Debug, Clone)]
pub enum ExtAuthzKind {
    Http(HttpCheckSettings),
    Grpc,
}

/// The HTTP-only settings; header lists hold lower-cased exact/prefix/suffix patterns.
#[derive(Debug, Clone, Default)]
pub struct HttpCheckSettings {
    pub path_prefix: String,
    pub include_request_headers: Vec<StringMatch>,
    pub additional_headers: Vec<(HeaderName, HeaderValue)>,
    pub headers_to_upstream_on_allow: Vec<StringMatch>,
    pub headers_to_downstream_on_deny: Vec<StringMatch>,
    pub headers_to_downstream_on_allow: Vec<StringMatch>,
}

/// Istio's default provider timeout.
const EXT_AUTHZ_DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The compiled [`SecuritySettingsSpec`].
#[derive(Debug, Clone)]
pub struct SecuritySettings {
    pub root_namespace: String,
    pub authz: AuthzSettings,
    /// ext_authz providers by name.
    pub extension_providers: HashMap<String, Arc<ExtAuthzProvider>>,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        SecuritySettings {
            root_namespace: "istio-system".to_string(),
            authz: AuthzSettings::default(),
            extension_providers: HashMap::new(),
        }
    }
}

/// `field` is the path of the spec in the document (e.g. `spec.security`).
pub fn security_settings(spec: &SecuritySettingsSpec, field: &str) -> Result<SecuritySettings, FieldError> {
    let mut out = SecuritySettings::default();
    if let Some(ns) = &spec.root_namespace {
        if ns.is_empty() {
            return Err(ferr(format!("{field}.rootNamespace"), "must not be empty"));
        }
        out.root_namespace = ns.clone();
    }
    out.authz.xff_num_trusted_hops = spec.xff_num_trusted_hops.unwrap_or(0);
    out.authz.path_normalization = match spec.path_normalization.as_deref() {
        None | Some("BASE" | "DEFAULT") => PathNormalization::Base,
        Some("NONE") => PathNormalization::None,
        Some("MERGE_SLASHES") => PathNormalization::MergeSlashes,
        Some("DECODE_AND_MERGE_SLASHES") => PathNormalization::DecodeAndMergeSlashes,
        Some(other) => {
            return Err(ferr(
                format!("{field}.pathNormalization"),
                format!("{other:?}: expected NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES"),
            ));
        }
    };
    for (i, p) in spec.extension_providers.iter().enumerate() {
        let field = format!("{field}.extensionProviders[{i}]");
        if p.name.is_empty() {
            return Err(ferr(format!("{field}.name"), "required"));
        }
        let provider = match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
            (Some(_), Some(_)) => {
                return Err(ferr(
                    field,
                    "envoyExtAuthzHttp and envoyExtAuthzGrpc are mutually exclusive",
                ));
            }
            (Some(h), None) => Some(http_provider(&p.name, h, &format!("{field}.envoyExtAuthzHttp"))?),
            (None, Some(g)) => Some(grpc_provider(&p.name, g, &format!("{field}.envoyExtAuthzGrpc"))?),
            // Another kind of provider (tracing, logging): not ours.
            (None, None) => None,
        };
        if out.extension_providers.contains_key(&p.name) {
            return Err(ferr(
                format!("{field}.name"),
                format!("duplicate provider {:?}", p.name),
            ));
        }
        if let Some(provider) = provider {
            out.extension_providers.insert(p.name.clone(), Arc::new(provider));
        }
    }
    Ok(out)
}

/// `service` as Istio takes it: `name.ns.svc.<domain>`, `name.ns`, optionally behind `ns/`, or an IP literal.
fn provider_target(service: &str, port: Option<u32>, field: &str) -> Result<(ProviderTarget, String), FieldError> {
    let port = match port {
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ferr(format!("{field}.port"), "must be a port number 1-65535"))?,
        None => return Err(ferr(format!("{field}.port"), "required")),
    };
    let host = service.rsplit_once('/').map_or(service, |(_, h)| h);
    if host.is_empty() {
        return Err(ferr(format!("{field}.service"), "required"));
    }
    let authority = format!("{host}:{port}");
    let bare_ip = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare_ip.parse::<std::net::IpAddr>() {
        return Ok((ProviderTarget::Addr(SocketAddr::new(ip, port)), authority));
    }
    let mut labels = host.split('.');
    match (labels.next(), labels.next(), labels.next()) {
        (Some(name), Some(ns), None | Some("svc")) if !name.is_empty() && !ns.is_empty() => Ok((
            ProviderTarget::Service {
                namespace: ns.to_string(),
                name: name.to_string(),
                port,
            },
            authority,
        )),
        _ => Err(ferr(
            format!("{field}.service"),
            format!("{service:?}: expected <name>.<namespace>.svc.<domain>, <name>.<namespace> or an IP address"),
        )),
    }
}

fn provider_timeout(timeout: &Option<String>, field: &str) -> Result<Duration, FieldError> {
    match timeout {
        None => Ok(EXT_AUTHZ_DEFAULT_TIMEOUT),
        Some(t) => match duration::parse(t) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(ferr(format!("{field}.timeout"), "must be positive")),
            Err(e) => Err(ferr(format!("{field}.timeout"), e.to_string())),
        },
    }
}

fn status_on_error(v: &Option<IntOrString>, field: &str) -> Result<StatusCode, FieldError> {
    let code = match v {
        None => return Ok(StatusCode::FORBIDDEN),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(s)) => s.trim().parse().ok(),
    };
    code.and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|c| c.as_u16() >= 200)
        .ok_or_else(|| ferr(format!("{field}.statusOnError"), "must be an HTTP status code 200-999"))
}

fn header_patterns(list: &[String], field: &str) -> Result<Vec<StringMatch>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            if v.is_empty() {
                Err(ferr(format!("{field}[{i}]"), "must not be empty"))
            } else {
                Ok(StringMatch::parse_lowercase(v))
            }
        })
        .collect()
}

fn http_provider(name: &str, h: &ExtAuthzHttpSpec, field: &str) -> Result<ExtAuthzProvider, FieldError> {
    let (target, authority) = provider_target(&h.service, h.port, field)?;
    let path_prefix = h.path_prefix.clone().unwrap_or_default();
    if !path_prefix.is_empty() && !path_prefix.starts_with('/') {
        return Err(ferr(format!("{field}.pathPrefix"), "must start with /"));
    }
    let mut include = header_patterns(
        &h.include_request_headers_in_check,
        &format!("{field}.includeRequestHeadersInCheck"),
    )?;
    include.extend(header_patterns(
        &h.include_headers_in_check,
        &format!("{field}.includeHeadersInCheck"),
    )?);
    let additional_headers = h
        .include_additional_headers_in_check
        .iter()
        .map(|(k, v)| {
            let f = format!("{field}.includeAdditionalHeadersInCheck[{k}]");
            let name = header_name(k, &f)?;
            let value = HeaderValue::try_from(v.as_str()).map_err(|_| ferr(&f, "not a valid header value"))?;
            Ok((name, value))
        })
        .collect::<Result<_, FieldError>>()?;
    Ok(ExtAuthzProvider {
        name: name.to_string(),
        target,
        authority,
        timeout: provider_timeout(&h.timeout, field)?,
        fail_open: h.fail_open,
        status_on_error: status_on_error(&h.status_on_error, field)?,
        kind: ExtAuthzKind::Http(HttpCheckSettings {
            path_prefix,
            include_request_headers: include,
            additional_headers,
            headers_to_upstream_on_allow: header_patterns(
                &h.headers_to_upstream_on_allow,
                &format!("{field}.headersToUpstreamOnAllow"),
            )?,
            headers_to_downstream_on_deny: header_patterns(
                &h.headers_to_downstream_on_deny,
                &format!("{field}.headersToDownstreamOnDeny"),
            )?,
            headers_to_downstream_on_allow: header_patterns(
                &h.headers_to_downstream_on_allow,
                &format!("{field}.headersToDownstreamOnAllow"),
            )?,
        }),
    })
}

fn grpc_provider(name: &str, g: &ExtAuthzGrpcSpec, field: &str) -> Result<ExtAuthzProvider, FieldError> {
    let (target, authority) = provider_target(&g.service, g.port, field)?;
    Ok(ExtAuthzProvider {
        name: name.to_string(),
        target,
        authority,
        timeout: provider_timeout(&g.timeout, field)?,
        fail_open: g.fail_open,
        status_on_error: status_on_error(&g.status_on_error, field)?,
        kind: ExtAuthzKind::Grpc,
    })
}

// ------------------------------------------------------------------------------------------------ attachment

/// Who a policy is for, besides its own fields: the waypoint's identity and Istio's root namespace.
#[derive(Debug, Clone)]
pub struct SecurityCx<'a> {
    pub root_namespace: &'a str,
    /// (namespace, name) of this waypoint's Gateway; `None` = any `Gateway` targetRef is taken to mean us.
    pub waypoint: Option<(&'a str, &'a str)>,
    /// Names of the configured ext_authz providers (`spec.security.extensionProviders`).
    pub ext_authz_providers: &'a [&'a str],
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every service of this waypoint.
    AllServices,
    Services(Vec<ServiceRef>),
}

impl Target {
    fn covers(&self, namespace: &str, name: &str) -> bool {
        match self {
            Target::AllServices => true,
            Target::Services(list) => list.iter().any(|s| s.namespace == namespace && s.name == name),
        }
    }
}

/// What translating one policy gave.
#[derive(Debug)]
pub enum Attachment<T> {
    Applies {
        target: Target,
        compiled: T,
    },
    /// Valid but not for this waypoint (the reason is worth a warning).
    Skipped {
        reason: String,
    },
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn attachment(
    meta: &ObjectMeta,
    selector: Option<&WorkloadSelector>,
    target_ref: Option<&PolicyTargetRef>,
    target_refs: &[PolicyTargetRef],
    cx: &SecurityCx<'_>,
) -> Result<Result<Target, String>, FieldError> {
    let ns = namespace_of(meta);
    let refs: Vec<(String, &PolicyTargetRef)> = target_ref
        .map(|r| ("spec.targetRef".to_string(), r))
        .into_iter()
        .chain(
            target_refs
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
        )
        .collect();
    if refs.is_empty() {
        if selector.is_some() {
            return Ok(Err(
                "selector-based policies apply to workloads (sidecars, ztunnel), not to a waypoint".into(),
            ));
        }
        if ns == cx.root_namespace {
            return Ok(Ok(Target::AllServices));
        }
        return Ok(Err(format!(
            "a namespace-wide policy without targetRefs is enforced by ztunnel, not by a waypoint (only policies in the root namespace {:?} apply to every service)",
            cx.root_namespace
        )));
    }
    if selector.is_some() {
        return Err(ferr("spec.selector", "selector and targetRefs are mutually exclusive"));
    }
    let mut services = Vec::new();
    let mut all = false;
    for (field, r) in refs {
        if r.name.is_empty() {
            return Err(ferr(format!("{field}.name"), "required"));
        }
        if r.namespace.as_deref().is_some_and(|n| n != ns) {
            return Err(ferr(format!("{field}.namespace"), "must be the policy's own namespace"));
        }
        match (r.group.as_deref().unwrap_or(""), r.kind.as_str()) {
            ("" | "core", "Service") | ("networking.istio.io", "ServiceEntry") => services.push(ServiceRef {
                namespace: ns.to_string(),
                name: r.name.clone(),
            }),
            ("gateway.networking.k8s.io", "Gateway") => {
                all |= cx.waypoint.is_none_or(|(wns, wname)| wns == ns && wname == r.name);
            }
            ("gateway.networking.k8s.io", "GatewayClass") => {
                if ns != cx.root_namespace {
                    return Err(ferr(
                        format!("{field}.kind"),
                        format!(
                            "GatewayClass targets are only allowed in the root namespace {:?}",
                            cx.root_namespace
                        ),
                    ));
                }
                all |= r.name == "istio-waypoint";
            }
            (group, kind) => {
                return Err(ferr(
                    format!("{field}.kind"),
                    format!("{group}/{kind}: expected Service, ServiceEntry, Gateway or GatewayClass"),
                ));
            }
        }
    }
    Ok(if all {
        Ok(Target::AllServices)
    } else if services.is_empty() {
        Err("targets no Service or Gateway of this waypoint".into())
    } else {
        Ok(Target::Services(services))
    })
}

// ------------------------------------------------------------------------------------------------ RequestAuthentication

/// Hands out the shared key handle of a `jwksUri`, so every rule (and every snapshot) naming the same URI uses
/// the keys one fetcher keeps fresh. `crate::jwks::JwksFetcher` implements it; [`NoFetch`] is for `check`.
pub trait JwksSource {
    fn remote(&self, uri: &str, timeout: Option<Duration>) -> Arc<JwksHandle>;
}

/// Empty handles that nobody fills (validation only).
pub struct NoFetch;

impl JwksSource for NoFetch {
    fn remote(&self, uri: &str, _timeout: Option<Duration>) -> Arc<JwksHandle> {
        Arc::new(JwksHandle::remote(uri))
    }
}

pub fn request_authentication(
    ra: &RequestAuthentication,
    cx: &SecurityCx<'_>,
    jwks: &dyn JwksSource,
) -> Result<Attachment<Vec<JwtRule>>, FieldError> {
    let spec = &ra.spec;
    let target = match attachment(
        &ra.metadata,
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        cx,
    )? {
        Ok(t) => t,
        Err(reason) => return Ok(Attachment::Skipped { reason }),
    };
    let rules = spec
        .jwt_rules
        .iter()
        .enumerate()
        .map(|(i, r)| jwt_rule(r, &format!("spec.jwtRules[{i}]"), jwks))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Attachment::Applies {
        target,
        compiled: rules,
    })
}

fn jwt_rule(r: &JwtRuleSpec, field: &str, jwks: &dyn JwksSource) -> Result<JwtRule, FieldError> {
    if r.issuer.is_empty() {
        return Err(ferr(format!("{field}.issuer"), "required"));
    }
    let timeout = match &r.timeout {
        None => None,
        Some(t) => Some(duration::parse(t).map_err(|e| ferr(format!("{field}.timeout"), e.to_string()))?),
    };
    // Istio: inline `jwks` wins over `jwksUri`.
    let handle = match (&r.jwks, &r.jwks_uri) {
        (Some(inline), _) if !inline.trim().is_empty() => {
            let set: JwkSet = serde_json::from_str(inline)
                .map_err(|e| ferr(format!("{field}.jwks"), format!("invalid JWKS: {e}")))?;
            if KeySet::compile(&set).is_empty() {
                return Err(ferr(
                    format!("{field}.jwks"),
                    "no usable key (RSA, EC P-256/P-384 or Ed25519; HMAC keys are not accepted)",
                ));
            }
            Arc::new(JwksHandle::inline(&set))
        }
        (_, Some(uri)) if !uri.is_empty() => {
            let ok = uri
                .parse::<http::Uri>()
                .ok()
                .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !ok {
                return Err(ferr(
                    format!("{field}.jwksUri"),
                    format!("{uri:?} is not an http(s) URL"),
                ));
            }
            jwks.remote(uri, timeout)
        }
        _ => {
            return Err(ferr(
                format!("{field}.jwksUri"),
                "jwks or jwksUri is required (OpenID discovery from the issuer is not supported)",
            ));
        }
    };
    let mut rule = JwtRule::new(r.issuer.clone(), handle);
    rule.audiences = r.audiences.clone();
    rule.from_headers = r
        .from_headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Ok(FromHeader {
                name: header_name(&h.name, &format!("{field}.fromHeaders[{i}].name"))?,
                prefix: h.prefix.clone().unwrap_or_default(),
            })
        })
        .collect::<Result<_, FieldError>>()?;
    for (i, p) in r.from_params.iter().chain(&r.from_cookies).enumerate() {
        if p.is_empty() {
            let (list, j) = if i < r.from_params.len() {
                ("fromParams", i)
            } else {
                ("fromCookies", i - r.from_params.len())
            };
            return Err(ferr(format!("{field}.{list}[{j}]"), "must not be empty"));
        }
    }
    rule.from_params = r.from_params.clone();
    rule.from_cookies = r.from_cookies.clone();
    rule.output_payload_to_header = match &r.output_payload_to_header {
        Some(h) if !h.is_empty() => Some(header_name(h, &format!("{field}.outputPayloadToHeader"))?),
        _ => None,
    };
    rule.output_claim_to_headers = r
        .output_claim_to_headers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.claim.is_empty() {
                return Err(ferr(format!("{field}.outputClaimToHeaders[{i}].claim"), "required"));
            }
            Ok(ClaimToHeader {
                header: header_name(&c.header, &format!("{field}.outputClaimToHeaders[{i}].header"))?,
                claim: c.claim.clone(),
            })
        })
        .collect::<Result<_, FieldError>>()?;
    rule.forward_original_token = r.forward_original_token;
    Ok(rule)
}

// ------------------------------------------------------------------------------------------------ AuthorizationPolicy

pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

pub fn authorization_policy(
    ap: &AuthorizationPolicy,
    cx: &SecurityCx<'_>,
) -> Result<Attachment<authz::AuthorizationPolicy>, FieldError> {
    let spec = &ap.spec;
    // Attachment first: a policy meant for sidecars or ztunnel (even a CUSTOM one) is not ours to reject.
    let target = match attachment(
        &ap.metadata,
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        cx,
    )? {
        Ok(t) => t,
        Err(reason) => return Ok(Attachment::Skipped { reason }),
    };
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            // Never silently allow what an ext_authz server was supposed to judge: an unknown provider is an error.
            let name = spec.provider.as_ref().map(|p| p.name.as_str()).unwrap_or_default();
            if name.is_empty() {
                return Err(ferr("spec.provider.name", "required with action CUSTOM"));
            }
            if !cx.ext_authz_providers.contains(&name) {
                return Err(ferr(
                    "spec.provider.name",
                    format!(
                        "{name:?} is not an ext_authz provider in spec.security.extensionProviders of the WaypointConfig"
                    ),
                ));
            }
            Action::Custom {
                provider: name.to_string(),
            }
        }
        Some(other) => {
            return Err(ferr(
                "spec.action",
                format!("{other:?}: expected ALLOW, DENY, AUDIT or CUSTOM"),
            ));
        }
    };
    if spec.provider.is_some() && !matches!(action, Action::Custom { .. }) {
        return Err(ferr("spec.provider", "only allowed with action CUSTOM"));
    }
    let dry_run = match ap.metadata.annotations.get(DRY_RUN_ANNOTATION) {
        None => false,
        Some(v) => v.parse::<bool>().map_err(|_| {
            ferr(
                format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                format!("{v:?}: expected \"true\" or \"false\""),
            )
        })?,
    };
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r, &format!("spec.rules[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Attachment::Applies {
        target,
        compiled: authz::AuthorizationPolicy {
            name: ap.metadata.name.clone(),
            namespace: namespace_of(&ap.metadata).to_string(),
            action,
            rules,
            dry_run,
        },
    })
}

fn strings(list: &[String]) -> Vec<StringMatch> {
    list.iter().map(|v| StringMatch::parse(v)).collect()
}

fn cidrs(list: &[String], field: &str) -> Result<Vec<Cidr>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse()
                .map_err(|e: authz::cidr::CidrError| ferr(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

fn ports(list: &[IntOrString], field: &str) -> Result<Vec<u16>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let port = match v {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(s) => s.parse().ok(),
            };
            port.ok_or_else(|| ferr(format!("{field}[{i}]"), "must be a port number 0-65535"))
        })
        .collect()
}

fn paths(list: &[String], field: &str) -> Result<Vec<PathMatch>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, v)| PathMatch::parse(v).map_err(|e| ferr(format!("{field}[{i}]"), e)))
        .collect()
}

fn rule(r: &RuleSpec, field: &str) -> Result<Rule, FieldError> {
    let mut from = Vec::with_capacity(r.from.len());
    for (i, f) in r.from.iter().enumerate() {
        let field = format!("{field}.from[{i}].source");
        let s = f.source.as_ref().ok_or_else(|| ferr(&field, "required"))?;
        let source = Source {
            principals: strings(&s.principals),
            not_principals: strings(&s.not_principals),
            request_principals: s.request_principals.iter().map(|v| PrincipalMatch::parse(v)).collect(),
            not_request_principals: s
                .not_request_principals
                .iter()
                .map(|v| PrincipalMatch::parse(v))
                .collect(),
            namespaces: strings(&s.namespaces),
            not_namespaces: strings(&s.not_namespaces),
            ip_blocks: cidrs(&s.ip_blocks, &format!("{field}.ipBlocks"))?,
            not_ip_blocks: cidrs(&s.not_ip_blocks, &format!("{field}.notIpBlocks"))?,
            remote_ip_blocks: cidrs(&s.remote_ip_blocks, &format!("{field}.remoteIpBlocks"))?,
            not_remote_ip_blocks: cidrs(&s.not_remote_ip_blocks, &format!("{field}.notRemoteIpBlocks"))?,
        };
        if source.is_empty() {
            return Err(ferr(field, "must not be empty"));
        }
        from.push(source);
    }
    let mut to = Vec::with_capacity(r.to.len());
    for (i, t) in r.to.iter().enumerate() {
        let field = format!("{field}.to[{i}].operation");
        let o = t.operation.as_ref().ok_or_else(|| ferr(&field, "required"))?;
        let operation = Operation {
            hosts: o.hosts.iter().map(|v| StringMatch::parse_lowercase(v)).collect(),
            not_hosts: o.not_hosts.iter().map(|v| StringMatch::parse_lowercase(v)).collect(),
            ports: ports(&o.ports, &format!("{field}.ports"))?,
            not_ports: ports(&o.not_ports, &format!("{field}.notPorts"))?,
            methods: strings(&o.methods),
            not_methods: strings(&o.not_methods),
            paths: paths(&o.paths, &format!("{field}.paths"))?,
            not_paths: paths(&o.not_paths, &format!("{field}.notPaths"))?,
        };
        if operation.is_empty() {
            return Err(ferr(field, "must not be empty"));
        }
        to.push(operation);
    }
    let when = r
        .when
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Condition::parse(&c.key, &c.values, &c.not_values)
                .map_err(|e| ferr(format!("{field}.when[{i}]"), format!("key {:?}: {e}", c.key)))
        })
        .collect::<Result<_, _>>()?;
    Ok(Rule { from, to, when })
}

// ------------------------------------------------------------------------------------------------ per service

/// The security config of one service binding: what the waypoint inserts into each request's extensions.
#[derive(Debug, Clone, Default)]
pub struct ServiceSecurity {
    pub jwt: Option<Arc<JwtPolicy>>,
    pub authz: Option<Arc<AuthzPolicies>>,
}

/// Every attached policy, queried per service when the snapshot is built.
#[derive(Debug, Default)]
pub struct SecurityIndex {
    settings: AuthzSettings,
    authz: Vec<(Target, authz::AuthorizationPolicy)>,
    jwt: Vec<(Target, Vec<JwtRule>)>,
    cache: HashMap<(String, String), ServiceSecurity>,
}

impl SecurityIndex {
    pub fn new(settings: AuthzSettings) -> SecurityIndex {
        SecurityIndex {
            settings,
            ..Default::default()
        }
    }

    pub fn add_authorization_policy(&mut self, target: Target, policy: authz::AuthorizationPolicy) {
        self.cache.clear();
        self.authz.push((target, policy));
    }

    pub fn add_request_authentication(&mut self, target: Target, rules: Vec<JwtRule>) {
        self.cache.clear();
        self.jwt.push((target, rules));
    }

    /// The merged JWT rules and the policies of a service (shared between its ports and VIPs).
    pub fn for_service(&mut self, namespace: &str, name: &str) -> ServiceSecurity {
        let key = (namespace.to_string(), name.to_string());
        if let Some(hit) = self.cache.get(&key) {
            return hit.clone();
        }
        let rules: Vec<JwtRule> = self
            .jwt
            .iter()
            .filter(|(t, _)| t.covers(namespace, name))
            .flat_map(|(_, r)| r.iter().cloned())
            .collect();
        let policies: Vec<authz::AuthorizationPolicy> = self
            .authz
            .iter()
            .filter(|(t, _)| t.covers(namespace, name))
            .map(|(_, p)| p.clone())
            .collect();
        let out = ServiceSecurity {
            jwt: (!rules.is_empty()).then(|| Arc::new(JwtPolicy::new(rules))),
            authz: (!policies.is_empty()).then(|| Arc::new(AuthzPolicies::new(policies).with_settings(self.settings))),
        };
        self.cache.insert(key, out.clone());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypoint_filters::authz::{AuthzRequest, HttpAttributes};

    const CX: SecurityCx<'static> = SecurityCx {
        root_namespace: "istio-system",
        waypoint: Some(("gateway-conformance-mesh", "waypoint")),
        ext_authz_providers: &["ext"],
    };

    fn docs<T: serde::de::DeserializeOwned>(yaml: &str, kind: &str) -> Vec<T> {
        yaml.split("\n---\n")
            .filter(|d| d.contains(&format!("kind: {kind}")))
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect()
    }

    fn ap(yaml: &str) -> Result<Attachment<authz::AuthorizationPolicy>, FieldError> {
        authorization_policy(&serde_saphyr::from_str(yaml).unwrap(), &CX)
    }

    fn err(yaml: &str) -> FieldError {
        match ap(yaml) {
            Err(e) => e,
            Ok(a) => panic!("expected an error, got {a:?}"),
        }
    }

    const HEAD: &str =
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: ns\n";

    fn spec(body: &str) -> String {
        format!("{HEAD}spec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: echo\n{body}")
    }

    fn view<'a>(
        peer: &'a str,
        path: &'a str,
        headers: &'a http::HeaderMap,
        auth: Option<&'a waypoint_filters::jwt::RequestAuth>,
    ) -> AuthzRequest<'a> {
        AuthzRequest {
            peer: Some(peer),
            source_ip: "10.0.0.1".parse().ok(),
            remote_ip: "10.0.0.1".parse().ok(),
            destination: "10.96.0.1:80".parse().ok(),
            sni: None,
            http: Some(HttpAttributes {
                host_lower: "echo",
                method: "GET",
                path,
                headers,
                auth,
            }),
        }
    }

    #[test]
    fn conformance_manifests_translate_and_decide() {
        let base = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/conformance/manifests/istio/");
        let Ok(deny) = std::fs::read_to_string(format!("{base}authz-deny-path.yaml")) else {
            return; // shared/ is beside the work tree in sessions and CI; nothing to check without it
        };
        let mut index = SecurityIndex::new(AuthzSettings::default());
        for file in ["authz-deny-path.yaml", "authz-allow-namespace.yaml", "jwt-basic.yaml"] {
            let text = if file == "authz-deny-path.yaml" {
                deny.clone()
            } else {
                std::fs::read_to_string(format!("{base}{file}")).unwrap()
            };
            for p in docs::<AuthorizationPolicy>(&text, "AuthorizationPolicy") {
                match authorization_policy(&p, &CX).unwrap() {
                    Attachment::Applies { target, compiled } => index.add_authorization_policy(target, compiled),
                    Attachment::Skipped { reason } => panic!("{reason}"),
                }
            }
            for r in docs::<RequestAuthentication>(&text, "RequestAuthentication") {
                match request_authentication(&r, &CX, &NoFetch).unwrap() {
                    Attachment::Applies { target, compiled } => index.add_request_authentication(target, compiled),
                    Attachment::Skipped { reason } => panic!("{reason}"),
                }
            }
        }
        let h = http::HeaderMap::new();
        let same = "cluster.local/ns/gateway-conformance-mesh/sa/default";
        let other = "cluster.local/ns/gateway-conformance-mesh-consumer/sa/default";
        let echo = index.for_service("gateway-conformance-mesh", "echo");
        let echo = echo.authz.unwrap();
        assert!(echo.jwt_free_check(same, "/public", &h));
        assert!(!echo.jwt_free_check(same, "/admin", &h));
        assert!(!echo.jwt_free_check(same, "/admin/users", &h));
        assert!(echo.jwt_free_check(same, "/administrator", &h));
        assert!(index.for_service("gateway-conformance-mesh", "echo-v1").jwt.is_some());
        let v2 = index.for_service("gateway-conformance-mesh", "echo-v2").authz.unwrap();
        assert!(v2.jwt_free_check(same, "/", &h));
        assert!(!v2.jwt_free_check(other, "/", &h));
        let v1 = index.for_service("gateway-conformance-mesh", "echo-v1");
        let v1_authz = v1.authz.unwrap();
        assert!(!v1_authz.jwt_free_check(same, "/", &h));
        let alice = waypoint_filters::jwt::RequestAuth {
            principal: "https://issuer.waypoint.test/alice".into(),
            issuer: "https://issuer.waypoint.test".into(),
            subject: Some("alice".into()),
            audiences: vec![],
            presenter: None,
            claims: Arc::new(serde_json::json!({})),
        };
        assert!(v1_authz.evaluate(&view(same, "/", &h, Some(&alice))).allowed);
        assert!(index.for_service("other", "echo").authz.is_none());
    }

    trait Check {
        fn jwt_free_check(&self, peer: &str, path: &str, h: &http::HeaderMap) -> bool;
    }

    impl Check for AuthzPolicies {
        fn jwt_free_check(&self, peer: &str, path: &str, h: &http::HeaderMap) -> bool {
            self.evaluate(&view(peer, path, h, None)).allowed
        }
    }

    #[test]
    fn attachment_rules() {
        let target = |yaml: &str| match ap(yaml).unwrap() {
            Attachment::Applies { target, .. } => Some(target),
            Attachment::Skipped { .. } => None,
        };
        assert_eq!(
            target(&spec("")),
            Some(Target::Services(vec![ServiceRef {
                namespace: "ns".into(),
                name: "echo".into()
            }]))
        );
        let gw = |ns: &str, name: &str| {
            format!(
                "{}spec:\n  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: {name}\n",
                HEAD.replace("namespace: ns", &format!("namespace: {ns}"))
            )
        };
        assert_eq!(
            target(&gw("gateway-conformance-mesh", "waypoint")),
            Some(Target::AllServices)
        );
        assert_eq!(target(&gw("gateway-conformance-mesh", "other")), None);
        let class = |ns: &str, name: &str| {
            format!(
                "{}spec:\n  targetRefs:\n  - kind: GatewayClass\n    group: gateway.networking.k8s.io\n    name: {name}\n",
                HEAD.replace("namespace: ns", &format!("namespace: {ns}"))
            )
        };
        assert_eq!(
            target(&class("istio-system", "istio-waypoint")),
            Some(Target::AllServices)
        );
        assert_eq!(target(&class("istio-system", "istio")), None);
        assert_eq!(err(&class("ns", "istio-waypoint")).field, "spec.targetRefs[0].kind");
        let root = HEAD.replace("namespace: ns", "namespace: istio-system");
        assert_eq!(target(&format!("{root}spec: {{}}\n")), Some(Target::AllServices));
        assert_eq!(target(&format!("{HEAD}spec: {{}}\n")), None);
        assert_eq!(
            target(&format!("{root}spec:\n  selector:\n    matchLabels:\n      app: x\n")),
            None
        );
        let both = format!("{}  selector:\n    matchLabels:\n      app: x\n", spec(""));
        assert_eq!(err(&both).field, "spec.selector");
        let other_ns = spec("").replace("    name: echo\n", "    name: echo\n    namespace: elsewhere\n");
        assert_eq!(err(&other_ns).field, "spec.targetRefs[0].namespace");
        // A CUSTOM policy for sidecars is not ours: skipped, not an error.
        let custom = format!(
            "{HEAD}spec:\n  selector:\n    matchLabels:\n      app: x\n  action: CUSTOM\n  provider:\n    name: ext\n"
        );
        assert_eq!(target(&custom), None);
        let bad_kind = spec("").replace("kind: Service", "kind: Deployment");
        assert_eq!(err(&bad_kind).field, "spec.targetRefs[0].kind");
    }

    #[test]
    fn policy_field_errors_name_the_field() {
        // CUSTOM needs a configured ext_authz provider.
        let Ok(Attachment::Applies { compiled, .. }) =
            ap(&spec("  action: CUSTOM\n  provider:\n    name: ext\n  rules: [{}]\n"))
        else {
            panic!("CUSTOM with a known provider compiles");
        };
        assert_eq!(compiled.action, Action::Custom { provider: "ext".into() });
        let e = err(&spec("  action: CUSTOM\n  provider:\n    name: other\n"));
        assert_eq!(e.field, "spec.provider.name");
        assert!(e.reason.contains("extensionProviders"), "{}", e.reason);
        assert_eq!(err(&spec("  action: CUSTOM\n")).field, "spec.provider.name");
        assert_eq!(err(&spec("  action: MAYBE\n")).field, "spec.action");
        assert_eq!(err(&spec("  provider:\n    name: ext\n")).field, "spec.provider");
        let cases = [
            (
                "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/99\"]\n",
                "spec.rules[0].from[0].source.ipBlocks[0]",
            ),
            (
                "  rules:\n  - from:\n    - source:\n        notRemoteIpBlocks: [\"x\"]\n",
                "spec.rules[0].from[0].source.notRemoteIpBlocks[0]",
            ),
            (
                "  rules:\n  - from:\n    - source: {}\n",
                "spec.rules[0].from[0].source",
            ),
            ("  rules:\n  - from:\n    - {}\n", "spec.rules[0].from[0].source"),
            (
                "  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
                "spec.rules[0].to[0].operation.ports[0]",
            ),
            (
                "  rules:\n  - to:\n    - operation:\n        notPorts: [70000]\n",
                "spec.rules[0].to[0].operation.notPorts[0]",
            ),
            (
                "  rules:\n  - to:\n    - operation:\n        paths: [\"/a/{**}/b\"]\n",
                "spec.rules[0].to[0].operation.paths[0]",
            ),
            (
                "  rules:\n  - to:\n    - operation: {}\n",
                "spec.rules[0].to[0].operation",
            ),
            (
                "  rules:\n  - {}\n  - when:\n    - key: experimental.envoy.filters.network.mysql_proxy[db.table]\n      values: [\"[update]\"]\n",
                "spec.rules[1].when[0]",
            ),
            (
                "  rules:\n  - when:\n    - key: request.nope\n      values: [\"x\"]\n",
                "spec.rules[0].when[0]",
            ),
            ("  rules:\n  - when:\n    - key: source.ip\n", "spec.rules[0].when[0]"),
        ];
        for (body, field) in cases {
            assert_eq!(err(&spec(body)).field, field, "{body}");
        }
        let dry = spec("").replace(
            "  namespace: ns\n",
            "  namespace: ns\n  annotations:\n    istio.io/dry-run: \"maybe\"\n",
        );
        assert_eq!(err(&dry).field, "metadata.annotations[istio.io/dry-run]");
    }

    #[test]
    fn policy_compiles_every_field() {
        let yaml = spec(concat!(
            "  action: DENY\n",
            "  rules:\n",
            "  - from:\n",
            "    - source:\n",
            "        principals: [\"cluster.local/ns/a/sa/b\"]\n",
            "        notPrincipals: [\"*/sa/x\"]\n",
            "        requestPrincipals: [\"iss/sub\"]\n",
            "        notRequestPrincipals: [\"other/*\"]\n",
            "        namespaces: [\"a\"]\n",
            "        notNamespaces: [\"b\"]\n",
            "        ipBlocks: [\"10.0.0.0/8\"]\n",
            "        notIpBlocks: [\"10.9.0.0/16\"]\n",
            "        remoteIpBlocks: [\"192.0.2.0/24\"]\n",
            "        notRemoteIpBlocks: [\"192.0.2.9\"]\n",
            "    to:\n",
            "    - operation:\n",
            "        hosts: [\"Echo.NS\"]\n",
            "        notHosts: [\"x\"]\n",
            "        ports: [\"80\", 8080]\n",
            "        notPorts: [\"9090\"]\n",
            "        methods: [\"GET\"]\n",
            "        notMethods: [\"POST\"]\n",
            "        paths: [\"/a/*\", \"/b/{*}\"]\n",
            "        notPaths: [\"/a/x\"]\n",
            "    when:\n",
            "    - key: request.auth.claims[org][team]\n",
            "      values: [\"pay\"]\n",
            "      notValues: [\"x\"]\n",
        ));
        let Attachment::Applies { compiled, .. } = ap(&yaml).unwrap() else {
            panic!("not attached");
        };
        assert_eq!(compiled.action, Action::Deny);
        let r = &compiled.rules[0];
        let s = &r.from[0];
        assert_eq!(
            (s.principals.len(), s.not_principals.len(), s.request_principals.len()),
            (1, 1, 1)
        );
        assert_eq!(
            (
                s.not_request_principals.len(),
                s.namespaces.len(),
                s.not_namespaces.len()
            ),
            (1, 1, 1)
        );
        assert_eq!(
            (
                s.ip_blocks.len(),
                s.not_ip_blocks.len(),
                s.remote_ip_blocks.len(),
                s.not_remote_ip_blocks.len()
            ),
            (1, 1, 1, 1)
        );
        let o = &r.to[0];
        assert_eq!(o.hosts, vec![StringMatch::Exact("echo.ns".into())]);
        assert_eq!(o.ports, vec![80, 8080]);
        assert_eq!(o.not_ports, vec![9090]);
        assert_eq!(
            (
                o.methods.len(),
                o.not_methods.len(),
                o.paths.len(),
                o.not_paths.len(),
                o.not_hosts.len()
            ),
            (1, 1, 2, 1, 1)
        );
        assert_eq!(r.when.len(), 1);
    }

    fn ra(yaml_rules: &str) -> Result<Attachment<Vec<JwtRule>>, FieldError> {
        let yaml = format!(
            "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata:\n  name: r\n  namespace: ns\nspec:\n  targetRefs:\n  - kind: Service\n    name: echo\n  jwtRules:\n{yaml_rules}"
        );
        request_authentication(&serde_saphyr::from_str(&yaml).unwrap(), &CX, &NoFetch)
    }

    #[test]
    fn request_authentication_fields() {
        let rules = ra(concat!(
            "  - issuer: https://i\n",
            "    audiences: [a]\n",
            "    jwksUri: https://i/jwks\n",
            "    timeout: 3s\n",
            "    fromHeaders:\n",
            "    - name: X-Jwt\n",
            "      prefix: \"Token \"\n",
            "    fromParams: [tok]\n",
            "    fromCookies: [session]\n",
            "    outputPayloadToHeader: x-payload\n",
            "    outputClaimToHeaders:\n",
            "    - header: x-team\n",
            "      claim: org.team\n",
            "    forwardOriginalToken: true\n",
        ))
        .unwrap();
        let Attachment::Applies { compiled, .. } = rules else {
            panic!()
        };
        let r = &compiled[0];
        assert_eq!(r.issuer, "https://i");
        assert_eq!(r.jwks.uri(), Some("https://i/jwks"));
        assert_eq!(r.from_headers[0].name, "x-jwt");
        assert_eq!(r.from_headers[0].prefix, "Token ");
        assert_eq!((r.from_params.len(), r.from_cookies.len()), (1, 1));
        assert_eq!(
            r.output_payload_to_header.as_ref().map(|h| h.as_str()),
            Some("x-payload")
        );
        assert_eq!(r.output_claim_to_headers[0].claim, "org.team");
        assert!(r.forward_original_token);

        let e = |rules: &str| ra(rules).unwrap_err().field;
        assert_eq!(e("  - jwksUri: https://i/jwks\n"), "spec.jwtRules[0].issuer");
        assert_eq!(e("  - issuer: i\n"), "spec.jwtRules[0].jwksUri");
        assert_eq!(e("  - issuer: i\n    jwksUri: ftp://x/y\n"), "spec.jwtRules[0].jwksUri");
        assert_eq!(e("  - issuer: i\n    jwks: '{\"keys\": 5}'\n"), "spec.jwtRules[0].jwks");
        assert_eq!(
            e("  - issuer: i\n    jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}'\n"),
            "spec.jwtRules[0].jwks"
        );
        assert_eq!(
            e("  - issuer: i\n    jwksUri: http://i/j\n    timeout: soon\n"),
            "spec.jwtRules[0].timeout"
        );
        assert_eq!(
            e("  - issuer: i\n    jwksUri: http://i/j\n    fromHeaders:\n    - name: \"bad name\"\n"),
            "spec.jwtRules[0].fromHeaders[0].name"
        );
        assert_eq!(
            e("  - issuer: i\n    jwksUri: http://i/j\n    fromCookies: [\"\"]\n"),
            "spec.jwtRules[0].fromCookies[0]"
        );
        assert_eq!(
            e("  - issuer: i\n    jwksUri: http://i/j\n    outputClaimToHeaders:\n    - header: x\n"),
            "spec.jwtRules[0].outputClaimToHeaders[0].claim"
        );
    }

    #[test]
    fn settings() {
        let s = security_settings(&SecuritySettingsSpec::default(), "spec.security").unwrap();
        assert_eq!(s.root_namespace, "istio-system");
        assert_eq!(s.authz.path_normalization, PathNormalization::Base);
        let spec = SecuritySettingsSpec {
            root_namespace: Some("mesh-root".into()),
            xff_num_trusted_hops: Some(2),
            path_normalization: Some("MERGE_SLASHES".into()),
            jwks_roots_file: None,
            extension_providers: Vec::new(),
        };
        let s = security_settings(&spec, "spec.security").unwrap();
        assert_eq!(
            (s.root_namespace.as_str(), s.authz.xff_num_trusted_hops),
            ("mesh-root", 2)
        );
        let bad = SecuritySettingsSpec {
            path_normalization: Some("WEIRD".into()),
            ..Default::default()
        };
        assert_eq!(
            security_settings(&bad, "spec.security").unwrap_err().field,
            "spec.security.pathNormalization"
        );
    }

    fn providers(yaml: &str) -> Result<SecuritySettings, FieldError> {
        let spec: SecuritySettingsSpec = serde_saphyr::from_str(yaml).unwrap();
        security_settings(&spec, "spec.security")
    }

    #[test]
    fn extension_providers() {
        let s = providers(
            "extensionProviders:
- name: http
  envoyExtAuthzHttp:
    service: ext-authz.auth.svc.cluster.local
    port: 8000
    timeout: 2s
    pathPrefix: /check
    failOpen: true
    statusOnError: '503'
    includeRequestHeadersInCheck: [authorization, X-Ext-*]
    includeAdditionalHeadersInCheck: {x-from: waypoint}
    headersToUpstreamOnAllow: [x-user]
    headersToDownstreamOnDeny: [x-reason]
- name: grpc
  envoyExtAuthzGrpc: {service: 127.0.0.9, port: 9000}
- name: tracing
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
",
        )
        .unwrap();
        assert_eq!(s.extension_providers.len(), 2);
        let http = &s.extension_providers["http"];
        assert_eq!(
            http.target,
            ProviderTarget::Service {
                namespace: "auth".into(),
                name: "ext-authz".into(),
                port: 8000
            }
        );
        assert_eq!(http.authority, "ext-authz.auth.svc.cluster.local:8000");
        assert_eq!(http.timeout, Duration::from_secs(2));
        assert!(http.fail_open);
        assert_eq!(http.status_on_error, StatusCode::SERVICE_UNAVAILABLE);
        let ExtAuthzKind::Http(h) = &http.kind else {
            panic!("http provider")
        };
        assert_eq!(h.path_prefix, "/check");
        assert!(h.include_request_headers[1].matches("x-ext-id"));
        assert_eq!(h.additional_headers.len(), 1);
        let grpc = &s.extension_providers["grpc"];
        assert_eq!(grpc.target, ProviderTarget::Addr("127.0.0.9:9000".parse().unwrap()));
        assert_eq!(grpc.status_on_error, StatusCode::FORBIDDEN);
        assert_eq!(grpc.timeout, Duration::from_secs(600));
        assert!(matches!(grpc.kind, ExtAuthzKind::Grpc));

        let field = |yaml: &str| providers(yaml).unwrap_err().field;
        assert_eq!(
            field("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a.b}}]"),
            "spec.security.extensionProviders[0].envoyExtAuthzHttp.port"
        );
        assert_eq!(
            field("extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: authz, port: 1}}]"),
            "spec.security.extensionProviders[0].envoyExtAuthzGrpc.service"
        );
        assert_eq!(
            field("extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: a.b, port: 1, statusOnError: x}}]"),
            "spec.security.extensionProviders[0].envoyExtAuthzGrpc.statusOnError"
        );
        assert_eq!(
            field("extensionProviders: [{envoyExtAuthzGrpc: {service: a.b, port: 1}}]"),
            "spec.security.extensionProviders[0].name"
        );
        assert_eq!(
            field(
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: a.b, port: 1}}, {name: a, envoyExtAuthzGrpc: {service: a.b, port: 1}}]"
            ),
            "spec.security.extensionProviders[1].name"
        );
        // A field this waypoint does not implement is refused, never ignored.
        assert!(
            serde_saphyr::from_str::<SecuritySettingsSpec>(
                "extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a.b, port: 1, includeRequestBodyInCheck: {maxRequestBytes: 10}}}]"
            )
            .is_err()
        );
    }
}
