//! Listeners: the address, listener filters (`tls_inspector`, `original_dst`), filter chains
//! with their match, TLS, any RBAC network filters and one terminal network filter (`tcp_proxy`
//! or the HTTP connection manager).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::listener::v3 as listener_pb;
use xds_api::type_urls;

use crate::common::{CidrRange, cidrs, duration, socket_address, unpack};
use crate::error::{ConfigResult, err, field, item};
use crate::hcm::{HttpConnectionManager, http_connection_manager};
use crate::raw::RawConfig;
use crate::rbac::{NetworkRbac, network_rbac};
use crate::route::Files;
use crate::tcp_proxy::{TcpProxy, tcp_proxy};
use crate::tls::DownstreamTls;
use crate::unsupported;

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    /// `ignore_global_conn_limit`: its connections neither count towards nor are refused by
    /// the global downstream connection limit.
    pub ignores_global_limit: bool,
    pub address: SocketAddr,
    pub stat_prefix: String,
    pub filter_chains: Vec<Arc<FilterChain>>,
    pub default_filter_chain: Option<Arc<FilterChain>>,
    pub use_original_dst: bool,
    pub tls_inspector: bool,
    pub listener_filters_timeout: Duration,
    pub continue_on_listener_filters_timeout: bool,
    /// `traffic_direction: INBOUND`: drained by `/drain_listeners?inboundonly`.
    pub inbound: bool,
    /// `traffic_direction: OUTBOUND`: its spans are named `egress HOST`, not `ingress`.
    pub outbound: bool,
    /// The resource as received, for `/config_dump`; equal bytes tell a resend from an update.
    pub raw: RawConfig,
}

impl Listener {
    /// Whether `other` is another listener on this one's address. Envoy refuses the second of
    /// two such listeners: their sockets would share the port and split its connections
    /// between two configs. Port 0 gives each listener a port of its own.
    pub fn collides_with(&self, other: &Listener) -> bool {
        self.name != other.name && self.address == other.address && self.address.port() != 0
    }

    /// Every filter chain, the default one last.
    pub fn chains(&self) -> impl Iterator<Item = &Arc<FilterChain>> {
        self.filter_chains
            .iter()
            .chain(self.default_filter_chain.iter())
    }

    /// The SDS secrets its chains' TLS contexts name.
    pub fn sds_secrets(&self) -> impl Iterator<Item = &crate::tls::SdsSecret> {
        self.chains()
            .filter_map(|chain| chain.tls.as_ref())
            .flat_map(|tls| tls.common.sds_secrets())
    }

    /// The HTTP connection managers of its chains.
    pub fn connection_managers(&self) -> impl Iterator<Item = &Arc<HttpConnectionManager>> {
        self.chains().filter_map(|chain| match &chain.filter {
            NetworkFilter::Http(hcm) => Some(hcm),
            NetworkFilter::TcpProxy(_) => None,
        })
    }

    /// The names of the clusters its `tcp_proxy` filters name.
    pub fn tcp_clusters(&self) -> Vec<&str> {
        let mut names = Vec::new();
        for chain in self.chains() {
            if let NetworkFilter::TcpProxy(tcp) = &chain.filter {
                names.extend(tcp.clusters.names());
            }
        }
        names
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceType {
    #[default]
    Any,
    SameIpOrLoopback,
    External,
}

#[derive(Debug, Clone, Default)]
pub struct FilterChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<CidrRange>,
    pub direct_source_prefix_ranges: Vec<CidrRange>,
    pub source_type: SourceType,
    pub source_prefix_ranges: Vec<CidrRange>,
    pub source_ports: Vec<u16>,
    pub server_names: Vec<String>,
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct FilterChain {
    pub name: String,
    pub filter_match: FilterChainMatch,
    /// `envoy.filters.network.rbac` filters, in order, before the terminal filter.
    pub rbac: Vec<Arc<NetworkRbac>>,
    pub filter: NetworkFilter,
    /// TLS termination (`transport_socket` with a DownstreamTlsContext).
    pub tls: Option<DownstreamTls>,
    /// Where the chain sits in its listener, for errors found when it is built.
    pub path: String,
}

#[derive(Debug, Clone)]
pub enum NetworkFilter {
    TcpProxy(Arc<TcpProxy>),
    Http(Arc<HttpConnectionManager>),
}

pub fn listener(proto: &listener_pb::Listener, path: &str, files: Files) -> ConfigResult<Listener> {
    let listener_pb::Listener {
        name,
        address,
        additional_addresses,
        stat_prefix,
        filter_chains,
        use_original_dst,
        default_filter_chain,
        per_connection_buffer_limit_bytes,
        metadata,
        drain_type,
        listener_filters,
        listener_filters_timeout,
        continue_on_listener_filters_timeout,
        transparent,
        freebind,
        tcp_fast_open_queue_length,
        traffic_direction,
        api_listener,
        connection_balance_config,
        enable_reuse_port,
        access_log,
        tcp_backlog_size,
        max_connections_to_accept_per_socket_event,
        bind_to_port,
        ignore_global_conn_limit,
        // Remora takes no overload actions, so there is nothing to bypass.
        bypass_overload_manager: _,
    } = proto;
    unsupported!(
        path,
        additional_addresses,
        per_connection_buffer_limit_bytes,
        metadata,
        drain_type,
        transparent,
        freebind,
        tcp_fast_open_queue_length,
        api_listener,
        connection_balance_config,
        access_log,
        tcp_backlog_size,
        max_connections_to_accept_per_socket_event,
    );
    // Remora always binds one SO_REUSEPORT socket per worker, Envoy's default.
    if *enable_reuse_port == Some(false) {
        return err(
            field(path, "enable_reuse_port"),
            "only true (the default) is supported",
        );
    }
    if *bind_to_port == Some(false) {
        return err(
            field(path, "bind_to_port"),
            "only true (the default) is supported",
        );
    }
    if name.is_empty() {
        return err(field(path, "name"), "must not be empty");
    }
    let address = socket_address(address, &field(path, "address"))?;
    let mut tls_inspector = false;
    let mut original_dst = false;
    for (index, filter) in listener_filters.iter().enumerate() {
        let fpath = item(path, "listener_filters", index);
        let listener_pb::ListenerFilter {
            name,
            filter_disabled,
            config_type,
        } = filter;
        unsupported!(&fpath, filter_disabled);
        let type_url = match config_type {
            Some(listener_pb::listener_filter::ConfigType::TypedConfig(any)) => {
                any.type_url.as_str()
            }
            None => "",
        };
        match (type_url, name.as_str()) {
            (type_urls::TLS_INSPECTOR, _) | ("", "envoy.filters.listener.tls_inspector") => {
                tls_inspector = true
            }
            (type_urls::ORIGINAL_DST, _) | ("", "envoy.filters.listener.original_dst") => {
                original_dst = true
            }
            _ => {
                return err(
                    fpath,
                    format!("listener filter {name:?} ({type_url}) is not supported"),
                );
            }
        }
    }
    let chains = filter_chains
        .iter()
        .enumerate()
        .map(|(index, chain)| {
            filter_chain(chain, &item(path, "filter_chains", index), files).map(Arc::new)
        })
        .collect::<ConfigResult<Vec<_>>>()?;
    let default_filter_chain = default_filter_chain
        .as_ref()
        .map(|chain| filter_chain(chain, &field(path, "default_filter_chain"), files).map(Arc::new))
        .transpose()?;
    if chains.is_empty() && default_filter_chain.is_none() {
        return err(
            field(path, "filter_chains"),
            "at least one filter chain is required",
        );
    }
    // Envoy rejects two chains with identical matches.
    for (i, a) in filter_chains.iter().enumerate() {
        for b in filter_chains.iter().skip(i + 1) {
            if a.filter_chain_match == b.filter_chain_match {
                return err(
                    field(&item(path, "filter_chains", i), "filter_chain_match"),
                    "multiple filter chains with the same matching rules",
                );
            }
        }
    }
    let listener_filters_timeout = match listener_filters_timeout {
        Some(value) => duration(value, &field(path, "listener_filters_timeout"))?,
        None => Duration::from_secs(15),
    };
    let Ok(direction) = core_pb::TrafficDirection::try_from(*traffic_direction) else {
        return err(field(path, "traffic_direction"), "unknown value");
    };
    let inbound = direction == core_pb::TrafficDirection::Inbound;
    let outbound = direction == core_pb::TrafficDirection::Outbound;
    Ok(Listener {
        ignores_global_limit: *ignore_global_conn_limit,
        name: name.clone(),
        address,
        stat_prefix: if stat_prefix.is_empty() {
            address.to_string()
        } else {
            stat_prefix.clone()
        },
        filter_chains: chains,
        default_filter_chain,
        use_original_dst: use_original_dst.unwrap_or(false) || original_dst,
        tls_inspector,
        listener_filters_timeout,
        continue_on_listener_filters_timeout: *continue_on_listener_filters_timeout,
        inbound,
        outbound,
        raw: RawConfig::of(proto),
    })
}

fn chain_match(m: &listener_pb::FilterChainMatch, mpath: &str) -> ConfigResult<FilterChainMatch> {
    let listener_pb::FilterChainMatch {
        destination_port,
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        server_names,
        transport_protocol,
        application_protocols,
    } = m;
    unsupported!(mpath, address_suffix, suffix_len);
    let destination_port = match destination_port {
        Some(port) if (1..=65535).contains(port) => Some(*port as u16),
        Some(_) => return err(field(mpath, "destination_port"), "must be in 1..65535"),
        None => None,
    };
    use listener_pb::filter_chain_match::ConnectionSourceType as T;
    let source_type = match T::try_from(*source_type) {
        Ok(T::Any) => SourceType::Any,
        Ok(T::SameIpOrLoopback) => SourceType::SameIpOrLoopback,
        Ok(T::External) => SourceType::External,
        Err(_) => return err(field(mpath, "source_type"), "unknown value"),
    };
    let source_ports = source_ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            u16::try_from(*p).or_else(|_| err(item(mpath, "source_ports", i), "must be ≤ 65535"))
        })
        .collect::<ConfigResult<Vec<_>>>()?;
    Ok(FilterChainMatch {
        destination_port,
        prefix_ranges: cidrs(prefix_ranges, mpath, "prefix_ranges")?,
        direct_source_prefix_ranges: cidrs(
            direct_source_prefix_ranges,
            mpath,
            "direct_source_prefix_ranges",
        )?,
        source_type,
        source_prefix_ranges: cidrs(source_prefix_ranges, mpath, "source_prefix_ranges")?,
        source_ports,
        server_names: server_names
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect(),
        transport_protocol: (!transport_protocol.is_empty()).then(|| transport_protocol.clone()),
        application_protocols: application_protocols.clone(),
    })
}

fn filter_chain(
    proto: &listener_pb::FilterChain,
    path: &str,
    files: Files,
) -> ConfigResult<FilterChain> {
    let listener_pb::FilterChain {
        filter_chain_match,
        filters,
        use_proxy_proto,
        metadata,
        transport_socket,
        transport_socket_connect_timeout,
        name,
    } = proto;
    unsupported!(
        path,
        use_proxy_proto,
        metadata,
        transport_socket_connect_timeout
    );
    let filter_match = match filter_chain_match {
        Some(m) => chain_match(m, &field(path, "filter_chain_match"))?,
        None => FilterChainMatch::default(),
    };
    let (rbac, filter) = network_filters(filters, path, files)?;
    let tls = transport_socket
        .as_ref()
        .filter(|socket| !crate::tls::is_raw_buffer(socket))
        .map(|socket| crate::tls::downstream(socket, &field(path, "transport_socket")))
        .transpose()?;
    Ok(FilterChain {
        name: name.clone(),
        filter_match,
        rbac,
        filter,
        tls,
        path: path.to_string(),
    })
}

/// A chain's `filters`: any RBAC filters, then exactly one terminal filter (`tcp_proxy` or the
/// HTTP connection manager), last.
fn network_filters(
    filters: &[listener_pb::Filter],
    path: &str,
    files: Files,
) -> ConfigResult<(Vec<Arc<NetworkRbac>>, NetworkFilter)> {
    const SHAPE: &str = "network filters must be zero or more envoy.filters.network.rbac followed \
                         by exactly one tcp_proxy or http_connection_manager";
    let mut rbac = Vec::new();
    for (index, filter) in filters.iter().enumerate() {
        let fpath = item(path, "filters", index);
        let listener_pb::Filter {
            name: _,
            config_type,
        } = filter;
        let Some(listener_pb::filter::ConfigType::TypedConfig(any)) = config_type else {
            return err(field(&fpath, "typed_config"), "typed_config is required");
        };
        let tpath = field(&fpath, "typed_config");
        let last = index + 1 == filters.len();
        let terminal = match any.type_url.as_str() {
            crate::rbac::NETWORK_TYPE_URL if !last => {
                rbac.push(Arc::new(network_rbac(any, &tpath)?));
                continue;
            }
            type_urls::TCP_PROXY if last => {
                NetworkFilter::TcpProxy(Arc::new(tcp_proxy(&unpack(any, &tpath)?, &tpath)?))
            }
            type_urls::HTTP_CONNECTION_MANAGER if last => NetworkFilter::Http(Arc::new(
                http_connection_manager(&unpack(any, &tpath)?, &tpath, files)?,
            )),
            crate::rbac::NETWORK_TYPE_URL
            | type_urls::TCP_PROXY
            | type_urls::HTTP_CONNECTION_MANAGER => {
                return err(fpath, SHAPE);
            }
            other => {
                return err(
                    tpath,
                    format!("network filter {other:?} is not supported ({SHAPE})"),
                );
            }
        };
        return Ok((rbac, terminal));
    }
    err(field(path, "filters"), SHAPE)
}
