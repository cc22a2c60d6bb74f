//! Envoy as the waypoint to beat, configured the way istiod configures an ambient waypoint (minus Istio's
//! telemetry, metadata-exchange and authorization filters, so it is a lower bound on a real waypoint's cost):
//!
//! ```text
//! connect_terminate (podIP:15008, mTLS, HTTP/2 CONNECT)
//!   set_filter_state: :authority -> original_dst.local_ip (shared with the upstream internal connection)
//!   -> internal listener main_internal: original_dst listener filter restores VIP:port,
//!      filter_chain_match on VIP/32 + port picks the service's chain: HCM (AUTO codec) routes "/" -> cluster
//!   -> service cluster: one internal endpoint per pod, carrying podIP:port as original_dst metadata
//!   -> internal listener connect_originate: tcp_proxy tunnels to an ORIGINAL_DST cluster (port override 15008)
//!      with CONNECT :authority = %DOWNSTREAM_LOCAL_ADDRESS% (podIP:port), mTLS as the waypoint identity
//! ```

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};

pub const CERT_FILE: &str = "waypoint.pem";
pub const KEY_FILE: &str = "waypoint-key.pem";
pub const ROOTS_FILE: &str = "root.pem";

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const SET_FILTER_STATE: &str = "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config";
const ORIGINAL_DST: &str = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const TCP_PROXY: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const INTERNAL_LISTENER: &str = "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener";
const INTERNAL_UPSTREAM: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport";
const RAW_BUFFER: &str = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
const HTTP_OPTIONS: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const DOWNSTREAM_CONNECTIONS: &str =
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

/// Metadata namespace the original_dst listener filter reads on an internal connection.
const ORIGINAL_DST_NS: &str = "envoy.filters.listener.original_dst";

pub struct Service {
    pub name: String,
    pub vip: SocketAddr,
    /// podIP:targetPort of each endpoint (all reached over HBONE on podIP:hbone_port).
    pub endpoints: Vec<SocketAddr>,
}

pub struct EnvoyWaypoint {
    /// Where HBONE is terminated (the waypoint's podIP:15008).
    pub listen: SocketAddr,
    pub admin_ip: IpAddr,
    pub trust_domain: String,
    /// SPIFFE ID the destination ztunnel must present.
    pub dest_identity: String,
    pub hbone_port: u16,
    pub services: Vec<Service>,
}

/// TLS as ztunnel and Istio's waypoint speak it: 1.3 only, ALPN h2, our cert, peers checked against the roots and a
/// URI SAN matcher.
fn tls_context(san_matcher: Value) -> Value {
    json!({
        "alpn_protocols": ["h2"],
        "tls_params": { "tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3" },
        "tls_certificates": [{
            "certificate_chain": { "filename": CERT_FILE },
            "private_key": { "filename": KEY_FILE }
        }],
        "validation_context": {
            "trusted_ca": { "filename": ROOTS_FILE },
            "match_typed_subject_alt_names": [{ "san_type": "URI", "matcher": san_matcher }]
        }
    })
}

fn socket_address(a: SocketAddr) -> Value {
    json!({ "socket_address": { "address": a.ip().to_string(), "port_value": a.port() } })
}

fn router() -> Value {
    json!({ "name": "envoy.filters.http.router", "typed_config": { "@type": ROUTER } })
}

fn internal_upstream(passthrough: bool) -> Value {
    let mut t = json!({
        "@type": INTERNAL_UPSTREAM,
        "transport_socket": { "name": "envoy.transport_sockets.raw_buffer", "typed_config": { "@type": RAW_BUFFER } }
    });
    if passthrough {
        // Hands the endpoint's metadata (the pod address) to the internal listener's original_dst filter.
        t["passthrough_metadata"] = json!([{ "kind": { "host": {} }, "name": ORIGINAL_DST_NS }]);
    }
    json!({ "name": "envoy.transport_sockets.internal_upstream", "typed_config": t })
}

fn original_dst_filter() -> Value {
    json!([{ "name": ORIGINAL_DST_NS, "typed_config": { "@type": ORIGINAL_DST } }])
}

fn cluster_name(s: &Service) -> String {
    format!("outbound|{}||{}", s.vip.port(), s.name)
}

impl EnvoyWaypoint {
    pub fn render(&self) -> Value {
        json!({
            "node": { "id": "waypoint-bench-envoy", "cluster": "waypoint-bench" },
            "admin": { "address": socket_address(SocketAddr::new(self.admin_ip, 0)) },
            "bootstrap_extensions": [{
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": { "@type": INTERNAL_LISTENER }
            }],
            "static_resources": {
                "listeners": [self.connect_terminate(), self.main_internal(), self.connect_originate()],
                "clusters": self.clusters(),
            },
            // Silences the "no global connection limit" startup warning; far above anything the rig opens.
            "overload_manager": { "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": { "@type": DOWNSTREAM_CONNECTIONS, "max_active_downstream_connections": 100000 }
            }]}
        })
    }

    fn connect_terminate(&self) -> Value {
        // Every CONNECT stream becomes one internal connection; its :authority (VIP:port) travels as filter state
        // and is restored as that connection's local address by main_internal's original_dst filter.
        let state = |key: &str, fmt: &str| {
            json!({
                "object_key": format!("{ORIGINAL_DST_NS}.{key}"),
                "format_string": { "text_format_source": { "inline_string": fmt } },
                "shared_with_upstream": "ONCE"
            })
        };
        let hcm = json!({
            "@type": HCM,
            "stat_prefix": "connect_terminate",
            "codec_type": "HTTP2",
            "http2_protocol_options": {
                "allow_connect": true,
                // ztunnel's windows, as Istio's waypoint advertises them to ztunnel.
                "initial_stream_window_size": 4 * 1024 * 1024,
                "initial_connection_window_size": 16 * 1024 * 1024
            },
            "upgrade_configs": [{ "upgrade_type": "CONNECT" }],
            // A tunnel carries a keep-alive connection of arbitrary length.
            "stream_idle_timeout": "0s",
            "route_config": {
                "name": "connect_terminate",
                "virtual_hosts": [{
                    "name": "connect",
                    "domains": ["*"],
                    "routes": [{
                        "match": { "connect_matcher": {} },
                        "route": {
                            "cluster": "main_internal",
                            "timeout": "0s",
                            "upgrade_configs": [{ "upgrade_type": "CONNECT", "connect_config": {} }]
                        }
                    }]
                }]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.set_filter_state",
                    "typed_config": {
                        "@type": SET_FILTER_STATE,
                        "on_request_headers": [
                            state("local_ip", "%REQ(:AUTHORITY)%"),
                            state("remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%")
                        ]
                    }
                },
                router()
            ]
        });
        json!({
            "name": "connect_terminate",
            "address": socket_address(self.listen),
            "filter_chains": [{
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": DOWNSTREAM_TLS,
                        "require_client_certificate": true,
                        "common_tls_context": tls_context(
                            json!({ "prefix": format!("spiffe://{}/", self.trust_domain) })
                        )
                    }
                },
                "filters": [{ "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm }]
            }]
        })
    }

    fn main_internal(&self) -> Value {
        let chains: Vec<Value> = self
            .services
            .iter()
            .map(|s| {
                let hcm = json!({
                    "@type": HCM,
                    "stat_prefix": format!("inbound_{}", s.name),
                    // HTTP/1.1 or HTTP/2 prior knowledge, whichever the app speaks inside the tunnel.
                    "codec_type": "AUTO",
                    "route_config": {
                        "name": s.name,
                        "virtual_hosts": [{
                            "name": s.name,
                            "domains": ["*"],
                            // Istio's default: no route timeout.
                            "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster_name(s), "timeout": "0s" } }]
                        }]
                    },
                    "http_filters": [router()]
                });
                json!({
                    "name": format!("{}_{}", s.vip.ip(), s.vip.port()),
                    "filter_chain_match": {
                        "prefix_ranges": [{ "address_prefix": s.vip.ip().to_string(), "prefix_len": 32 }],
                        "destination_port": s.vip.port()
                    },
                    "filters": [{ "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm }]
                })
            })
            .collect();
        json!({
            "name": "main_internal",
            "internal_listener": {},
            "listener_filters": original_dst_filter(),
            "filter_chains": chains
        })
    }

    fn connect_originate(&self) -> Value {
        json!({
            "name": "connect_originate",
            "internal_listener": {},
            "listener_filters": original_dst_filter(),
            "filter_chains": [{ "filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": TCP_PROXY,
                    "stat_prefix": "connect_originate",
                    "cluster": "connect_originate",
                    // The local address restored from the endpoint metadata: podIP:targetPort.
                    "tunneling_config": { "hostname": "%DOWNSTREAM_LOCAL_ADDRESS%" }
                }
            }]}]
        })
    }

    fn clusters(&self) -> Vec<Value> {
        let mut clusters = vec![json!({
            "name": "main_internal",
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": "main_internal",
                "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                    "envoy_internal_address": { "server_listener_name": "main_internal" }
                }}}]}]
            },
            "transport_socket": internal_upstream(false)
        })];
        for s in &self.services {
            let endpoints: Vec<Value> = s
                .endpoints
                .iter()
                .map(|ep| {
                    json!({
                        "endpoint": { "address": { "envoy_internal_address": {
                            "server_listener_name": "connect_originate",
                            "endpoint_id": ep.to_string()
                        }}},
                        "metadata": { "filter_metadata": { ORIGINAL_DST_NS: { "local": ep.to_string() } } }
                    })
                })
                .collect();
            let name = cluster_name(s);
            clusters.push(json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "5s",
                "load_assignment": { "cluster_name": name, "endpoints": [{ "lb_endpoints": endpoints }] },
                "transport_socket": internal_upstream(true)
            }));
        }
        // The endpoint's ztunnel: the pod address with the port replaced by 15008, as Istio does.
        clusters.push(json!({
            "name": "connect_originate",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": { "upstream_port_override": self.hbone_port },
            "connect_timeout": "5s",
            // Dial from the waypoint's own address, as a waypoint pod would; it also tells the two waypoints'
            // tunnels apart in the destination ztunnel's access log.
            "upstream_bind_config": { "source_address": { "address": self.listen.ip().to_string(), "port_value": 0 } },
            "typed_extension_protocol_options": { "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": { "http2_protocol_options": {
                    "max_concurrent_streams": 100,
                    "initial_stream_window_size": 4 * 1024 * 1024,
                    "initial_connection_window_size": 16 * 1024 * 1024
                }}
            }},
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": UPSTREAM_TLS,
                    "common_tls_context": tls_context(json!({ "exact": self.dest_identity }))
                }
            }
        }));
        clusters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chain_and_cluster_per_service() {
        let wp = EnvoyWaypoint {
            listen: "127.1.2.3:15008".parse().unwrap(),
            admin_ip: "127.1.2.4".parse().unwrap(),
            trust_domain: "cluster.local".into(),
            dest_identity: "spiffe://cluster.local/ns/default/sa/server".into(),
            hbone_port: 15008,
            services: vec![Service {
                name: "backend".into(),
                vip: "127.9.9.9:80".parse().unwrap(),
                endpoints: vec!["127.5.5.5:8080".parse().unwrap()],
            }],
        };
        let v = wp.render();
        let chains = &v["static_resources"]["listeners"][1]["filter_chains"];
        assert_eq!(
            chains[0]["filter_chain_match"]["prefix_ranges"][0]["address_prefix"],
            "127.9.9.9"
        );
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        assert_eq!(clusters.len(), 3);
        assert_eq!(
            clusters[1]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"]["filter_metadata"]
                [ORIGINAL_DST_NS]["local"],
            "127.5.5.5:8080"
        );
        assert_eq!(clusters[2]["original_dst_lb_config"]["upstream_port_override"], 15008);
    }
}
