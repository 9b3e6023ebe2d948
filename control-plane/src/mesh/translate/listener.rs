//! Listeners: the outbound capture listener (`use_original_dst`) with one filter chain per
//! service port matched on `VIP/32` and port — HTTP through a connection manager using the
//! port's route configuration, TCP through tcp_proxy — and a passthrough chain for every other
//! destination; or, in the port-listener layout, one `bind_to_port: false` listener per
//! `VIP:port`. And the inbound capture listener (`original_dst`) with one filter chain per app
//! port, forwarding to the app on localhost.

use std::net::IpAddr;

use xds_api::envoy::config::core::v3::TrafficDirection;
use xds_api::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use xds_api::envoy::config::route::v3::route::Action;
use xds_api::envoy::config::route::v3::route_action::ClusterSpecifier as RouteCluster;
use xds_api::envoy::config::route::v3::route_match::PathSpecifier;
use xds_api::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use xds_api::envoy::extensions::filters::http::router::v3::Router;
use xds_api::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use xds_api::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    RouteSpecifier, Tracing,
};
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_filter,
};
use xds_api::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use xds_api::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as TcpCluster;
use xds_api::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use xds_api::envoy::r#type::v3::Percent;

use crate::mesh::model::Protocol;
use crate::mesh::names;
use crate::mesh::policy::{Effective, MtlsMode};
use crate::mesh::translate::cluster::mesh_tls_context;
use crate::mesh::translate::{ads, disabled, host_cidr, socket_address, tls_socket, typed};

/// Stat prefix of every outbound HTTP connection manager and tcp_proxy
/// (`http.outbound.downstream_rq_total`); per-service numbers are the clusters'.
pub const OUTBOUND_STATS: &str = "outbound";
/// Stat prefix of every inbound HTTP connection manager and tcp_proxy.
pub const INBOUND_STATS: &str = "inbound";

fn network_filter<M: prost::Message + prost::Name>(name: &str, config: &M) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(typed(config))),
    }
}

fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(typed(
            &Router::default(),
        ))),
        ..Default::default()
    }
}

fn connection_manager(
    stat_prefix: &str,
    routes: RouteSpecifier,
    tracing: Option<Tracing>,
) -> Filter {
    network_filter(
        "envoy.filters.network.http_connection_manager",
        &HttpConnectionManager {
            stat_prefix: stat_prefix.to_string(),
            route_specifier: Some(routes),
            http_filters: vec![router()],
            tracing,
            ..Default::default()
        },
    )
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Filter {
    network_filter(
        "envoy.filters.network.tcp_proxy",
        &TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(TcpCluster::Cluster(cluster.to_string())),
            ..Default::default()
        },
    )
}

/// The filters that carry one service port's traffic to its cluster (`name` is also the
/// route configuration's name).
fn outbound_filter(name: &str, protocol: Protocol, policy: &Effective) -> Filter {
    if protocol.is_http() {
        let tracing = policy.tracing.as_ref().map(|tracing| Tracing {
            random_sampling: Some(Percent {
                value: tracing.sampling_percent,
            }),
            ..Default::default()
        });
        connection_manager(
            OUTBOUND_STATS,
            RouteSpecifier::Rds(Rds {
                config_source: Some(ads()),
                route_config_name: name.to_string(),
            }),
            tracing,
        )
    } else {
        tcp_proxy(OUTBOUND_STATS, name)
    }
}

/// The filter chain of one service port inside the outbound capture listener.
pub fn outbound_chain(
    name: &str,
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    policy: &Effective,
) -> FilterChain {
    FilterChain {
        name: name.to_string(),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: Some(u32::from(port)),
            prefix_ranges: vec![host_cidr(vip)],
            ..Default::default()
        }),
        filters: vec![outbound_filter(name, protocol, policy)],
        ..Default::default()
    }
}

/// The listener of one service port in the port-listener layout: never bound, handed
/// connections by the capture listener.
pub fn port_listener(
    name: &str,
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    policy: &Effective,
) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(&vip.to_string(), port)),
        bind_to_port: Some(false),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![outbound_filter(name, protocol, policy)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The outbound capture listener on `port` with the service chains (sorted by name, so the
/// same services always give the same bytes) and the passthrough.
pub fn outbound_listener(port: u16, chains: Vec<FilterChain>) -> Listener {
    Listener {
        name: names::OUTBOUND_LISTENER.to_string(),
        address: Some(socket_address("0.0.0.0", port)),
        use_original_dst: Some(true),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: chains,
        default_filter_chain: Some(FilterChain {
            name: names::PASSTHROUGH_CLUSTER.to_string(),
            filters: vec![tcp_proxy(
                names::PASSTHROUGH_CLUSTER,
                names::PASSTHROUGH_CLUSTER,
            )],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One app port of the sidecar's pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundPort {
    pub port: u16,
    pub protocol: Protocol,
    pub mtls: MtlsMode,
}

fn inbound_filter(port: &InboundPort) -> Filter {
    let cluster = names::inbound(port.port, port.protocol);
    if !port.protocol.is_http() {
        return tcp_proxy(INBOUND_STATS, &cluster);
    }
    let routes = RouteConfiguration {
        name: cluster.clone(),
        virtual_hosts: vec![VirtualHost {
            name: cluster.clone(),
            domains: vec!["*".to_string()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix("/".to_string())),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(RouteCluster::Cluster(cluster)),
                    // The caller's sidecar enforces the timeout; the app's side adds none.
                    timeout: Some(disabled()),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    connection_manager(INBOUND_STATS, RouteSpecifier::RouteConfig(routes), None)
}

/// The inbound capture listener on `listen_port` with a chain (two in permissive mTLS) per
/// app port.
pub fn inbound_listener(listen_port: u16, ports: &[InboundPort]) -> Listener {
    let mut listener_filters = vec![ListenerFilter {
        name: "envoy.filters.listener.original_dst".to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(typed(
            &OriginalDst::default(),
        ))),
        ..Default::default()
    }];
    if ports.iter().any(|port| port.mtls == MtlsMode::Permissive) {
        listener_filters.push(ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".to_string(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(typed(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        });
    }
    let mut chains = Vec::new();
    for port in ports {
        let name = names::inbound(port.port, port.protocol);
        let on_port = |transport: &str| FilterChainMatch {
            destination_port: Some(u32::from(port.port)),
            transport_protocol: transport.to_string(),
            ..Default::default()
        };
        let tls = || {
            tls_socket(&DownstreamTlsContext {
                common_tls_context: Some(mesh_tls_context()),
                require_client_certificate: Some(true),
                ..Default::default()
            })
        };
        match port.mtls {
            MtlsMode::Disable => chains.push(FilterChain {
                name,
                filter_chain_match: Some(on_port("")),
                filters: vec![inbound_filter(port)],
                ..Default::default()
            }),
            MtlsMode::Strict => chains.push(FilterChain {
                name,
                filter_chain_match: Some(on_port("")),
                filters: vec![inbound_filter(port)],
                transport_socket: Some(tls()),
                ..Default::default()
            }),
            MtlsMode::Permissive => {
                chains.push(FilterChain {
                    name: format!("{name}:tls"),
                    filter_chain_match: Some(on_port("tls")),
                    filters: vec![inbound_filter(port)],
                    transport_socket: Some(tls()),
                    ..Default::default()
                });
                chains.push(FilterChain {
                    name,
                    filter_chain_match: Some(on_port("")),
                    filters: vec![inbound_filter(port)],
                    ..Default::default()
                });
            }
        }
    }
    Listener {
        name: names::INBOUND_LISTENER.to_string(),
        address: Some(socket_address("0.0.0.0", listen_port)),
        listener_filters,
        traffic_direction: TrafficDirection::Inbound as i32,
        filter_chains: chains,
        ..Default::default()
    }
}
