//! Proto → model conversion. Assumes [`super::strict`] has already rejected unsupported fields;
//! here values are checked (required fields, enum values Remora implements, ranges) and every
//! error names its path.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use xds_api::envoy::config::bootstrap::v3 as bootstrap_pb;
use xds_api::envoy::config::cluster::v3 as cluster_pb;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::endpoint::v3 as endpoint_pb;
use xds_api::envoy::config::listener::v3 as listener_pb;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use xds_api::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_pb;
use xds_api::type_urls;

use super::*;
use crate::http::access_log::{AccessLogConfig, Target};
use crate::http::router::RouteTable;

type R<T> = ConfigResult<T>;

fn err<T>(path: impl Into<String>, reason: impl Into<String>) -> R<T> {
    Err(ConfigError::new(path, reason))
}

/// A protobuf duration as a std duration (negative → error).
pub fn duration(value: &prost_types::Duration, path: &str) -> R<Duration> {
    if value.seconds < 0 || value.nanos < 0 {
        return err(path, "must not be negative");
    }
    Ok(Duration::new(value.seconds as u64, value.nanos as u32))
}

fn opt_duration(value: &Option<prost_types::Duration>, path: &str) -> R<Option<Duration>> {
    value
        .as_ref()
        .map(|value| duration(value, path))
        .transpose()
}

/// Envoy's convention: an explicit zero disables a timeout.
fn timeout_or(
    value: &Option<prost_types::Duration>,
    path: &str,
    default: Option<Duration>,
) -> R<Option<Duration>> {
    Ok(match opt_duration(value, path)? {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => default,
    })
}

/// `Http2ProtocolOptions`, with Envoy's bounds.
fn http2_options(proto: &Option<core_pb::Http2ProtocolOptions>, path: &str) -> R<Http2Options> {
    let Some(proto) = proto else {
        return Ok(Http2Options::default());
    };
    let bounded = |value: Option<u32>, field: &str, min: u32| -> R<Option<u32>> {
        match value {
            Some(v) if v < min || v > i32::MAX as u32 => err(
                format!("{path}.{field}"),
                format!("must be in {min}..{}", i32::MAX),
            ),
            other => Ok(other),
        }
    };
    let keepalive = match &proto.connection_keepalive {
        None => None,
        Some(k) => {
            let kpath = format!("{path}.connection_keepalive");
            let timeout =
                opt_duration(&k.timeout, &format!("{kpath}.timeout"))?.filter(|t| !t.is_zero());
            let Some(timeout) = timeout else {
                return err(
                    format!("{kpath}.timeout"),
                    "is required and must be positive",
                );
            };
            // Envoy: without an interval, PINGs are sent only on connections idle that long;
            // hyper pings on a fixed interval, so the timeout stands in for it.
            let interval = opt_duration(&k.interval, &format!("{kpath}.interval"))?
                .filter(|i| !i.is_zero())
                .unwrap_or(timeout);
            Some(Http2Keepalive { interval, timeout })
        }
    };
    Ok(Http2Options {
        max_concurrent_streams: bounded(proto.max_concurrent_streams, "max_concurrent_streams", 1)?,
        initial_stream_window_size: bounded(
            proto.initial_stream_window_size,
            "initial_stream_window_size",
            65535,
        )?,
        initial_connection_window_size: bounded(
            proto.initial_connection_window_size,
            "initial_connection_window_size",
            65535,
        )?,
        keepalive,
    })
}

/// The bootstrap's `layered_runtime`: static layers merged in order; an admin layer is
/// accepted and stays empty (Remora has no `/runtime_modify`). A key Remora does not act on is
/// an error, not a setting that silently does nothing.
fn runtime(proto: &Option<bootstrap_pb::LayeredRuntime>) -> R<Runtime> {
    use bootstrap_pb::runtime_layer::LayerSpecifier;
    let mut runtime = Runtime::default();
    for (index, layer) in proto.iter().flat_map(|r| r.layers.iter()).enumerate() {
        let path = format!("layered_runtime.layers[{index}]");
        match &layer.layer_specifier {
            Some(LayerSpecifier::StaticLayer(values)) => {
                let mut flat = Vec::new();
                flatten_struct(values, "", &mut flat);
                for (key, value) in flat {
                    set_runtime_key(&mut runtime, &key, value, &format!("{path}.static_layer"))?;
                }
            }
            Some(LayerSpecifier::AdminLayer(_)) => {}
            None => return err(path, "a static_layer or an admin_layer is required"),
        }
    }
    Ok(runtime)
}

/// A Struct as Envoy's runtime sees it: dotted keys to leaf values.
fn flatten_struct<'a>(
    values: &'a prost_types::Struct,
    prefix: &str,
    out: &mut Vec<(String, &'a prost_types::Value)>,
) {
    for (name, value) in &values.fields {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match &value.kind {
            Some(prost_types::value::Kind::StructValue(inner)) => flatten_struct(inner, &key, out),
            _ => out.push((key, value)),
        }
    }
}

fn set_runtime_key(
    runtime: &mut Runtime,
    key: &str,
    value: &prost_types::Value,
    path: &str,
) -> R<()> {
    let count = || -> R<u64> {
        match &value.kind {
            Some(prost_types::value::Kind::NumberValue(n)) if *n >= 0.0 && n.fract() == 0.0 => {
                Ok(*n as u64)
            }
            Some(prost_types::value::Kind::StringValue(s)) if s.parse::<u64>().is_ok() => {
                Ok(s.parse().unwrap_or_default())
            }
            _ => err(format!("{path}.{key}"), "must be a non-negative integer"),
        }
    };
    if key == "overload.global_downstream_max_connections" {
        runtime.global_max_connections = Some(count()?);
    } else if let Some(listener) = key
        .strip_prefix("envoy.resource_limits.listener.")
        .and_then(|rest| rest.strip_suffix(".connection_limit"))
    {
        runtime
            .listener_connection_limits
            .insert(listener.to_string(), count()?);
    } else {
        return err(
            format!("{path}.{key}"),
            "runtime key not supported (Remora acts on overload.global_downstream_max_connections \
             and envoy.resource_limits.listener.NAME.connection_limit)",
        );
    }
    Ok(())
}

/// Unpacks an `Any` holding `M`, comparing against the `type.googleapis.com/` URL (prost's
/// `Name::type_url()` has no host part, so `xds_api::any::unpack` rejects real Envoy Anys).
pub fn unpack<M: Message + prost::Name + Default>(any: &prost_types::Any) -> Result<M, String> {
    let expected = format!("{}{}", type_urls::PREFIX, M::full_name());
    if any.type_url != expected {
        return Err(format!("expected {expected} but found {}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {expected}: {e}"))
}

pub fn socket_address(address: &Option<core_pb::Address>, path: &str) -> R<SocketAddr> {
    match resolve_address(address, path)? {
        EndpointAddress::Ip(addr) => Ok(addr),
        EndpointAddress::Dns { host, .. } => err(
            format!("{path}.socket_address.address"),
            format!("{host:?} is not an IP address"),
        ),
    }
}

fn resolve_address(address: &Option<core_pb::Address>, path: &str) -> R<EndpointAddress> {
    let Some(address) = address else {
        return err(path, "address is required");
    };
    let Some(core_pb::address::Address::SocketAddress(socket)) = &address.address else {
        return err(path, "only socket_address is supported");
    };
    let sock_path = format!("{path}.socket_address");
    if socket.protocol != core_pb::socket_address::Protocol::Tcp as i32 {
        return err(format!("{sock_path}.protocol"), "only TCP is supported");
    }
    let port = match &socket.port_specifier {
        Some(core_pb::socket_address::PortSpecifier::PortValue(port)) => *port,
        Some(_) => {
            return err(
                format!("{sock_path}.named_port"),
                "named ports are not supported",
            );
        }
        None => 0,
    };
    let port = u16::try_from(port)
        .map_err(|_| ConfigError::new(format!("{sock_path}.port_value"), "must be ≤ 65535"))?;
    if socket.address.is_empty() {
        return err(format!("{sock_path}.address"), "must not be empty");
    }
    Ok(match socket.address.parse::<IpAddr>() {
        Ok(ip) => EndpointAddress::Ip(SocketAddr::new(ip, port)),
        Err(_) => EndpointAddress::Dns {
            host: socket.address.clone(),
            port,
        },
    })
}

fn config_source(source: &Option<core_pb::ConfigSource>, path: &str) -> R<ConfigSource> {
    let Some(source) = source else {
        return err(path, "config source is required");
    };
    match &source.config_source_specifier {
        Some(core_pb::config_source::ConfigSourceSpecifier::Ads(_)) => {}
        _ => return err(path, "only `ads: {}` config sources are supported"),
    }
    let initial_fetch_timeout = match &source.initial_fetch_timeout {
        Some(value) => duration(value, &format!("{path}.initial_fetch_timeout"))?,
        None => Duration::from_secs(15),
    };
    Ok(ConfigSource {
        initial_fetch_timeout,
    })
}

// === Bootstrap ===

pub fn bootstrap(proto: &xds_api::envoy::config::bootstrap::v3::Bootstrap) -> R<Bootstrap> {
    super::strict::check(proto, "")?;
    let node = proto
        .node
        .as_ref()
        .map(|node| Node {
            id: node.id.clone(),
            cluster: node.cluster.clone(),
            proto: node.clone(),
        })
        .unwrap_or_default();
    let admin = match &proto.admin {
        Some(admin) => Some(socket_address(&admin.address, "admin.address")?),
        None => None,
    };
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    if let Some(statics) = &proto.static_resources {
        for (index, listener_proto) in statics.listeners.iter().enumerate() {
            let path = format!("static_resources.listeners[{index}]");
            let named;
            let listener_proto = if listener_proto.name.is_empty() {
                // As Envoy does: a static listener without a name gets a random UUID.
                named = listener_pb::Listener {
                    name: crate::uuid::v4_string(),
                    ..listener_proto.clone()
                };
                &named
            } else {
                listener_proto
            };
            let model = listener(listener_proto, &path)?;
            if listeners
                .iter()
                .any(|other: &Arc<Listener>| other.name == model.name)
            {
                return err(
                    format!("{path}.name"),
                    format!("duplicate listener name {:?}", model.name),
                );
            }
            listeners.push(Arc::new(model));
        }
        for (index, cluster_proto) in statics.clusters.iter().enumerate() {
            let path = format!("static_resources.clusters[{index}]");
            let model = cluster(cluster_proto, &path)?;
            if clusters
                .iter()
                .any(|other: &Arc<Cluster>| other.name == model.name)
            {
                return err(
                    format!("{path}.name"),
                    format!("duplicate cluster name {:?}", model.name),
                );
            }
            clusters.push(Arc::new(model));
        }
    }
    let runtime = runtime(&proto.layered_runtime)?;
    let dynamic = match &proto.dynamic_resources {
        Some(dynamic) => {
            let Some(ads) = &dynamic.ads_config else {
                return err(
                    "dynamic_resources.ads_config",
                    "required: only ADS is supported",
                );
            };
            let flavor = match core_pb::api_config_source::ApiType::try_from(ads.api_type) {
                Ok(core_pb::api_config_source::ApiType::Grpc) => AdsFlavor::StateOfTheWorld,
                Ok(core_pb::api_config_source::ApiType::DeltaGrpc) => AdsFlavor::Delta,
                _ => {
                    return err(
                        "dynamic_resources.ads_config.api_type",
                        "only GRPC and DELTA_GRPC are supported",
                    );
                }
            };
            let [service] = ads.grpc_services.as_slice() else {
                return err(
                    "dynamic_resources.ads_config.grpc_services",
                    "exactly one grpc service is required",
                );
            };
            let Some(core_pb::grpc_service::TargetSpecifier::EnvoyGrpc(target)) =
                &service.target_specifier
            else {
                return err(
                    "dynamic_resources.ads_config.grpc_services[0]",
                    "envoy_grpc is required",
                );
            };
            if !clusters.iter().any(|c| c.name == target.cluster_name) {
                return err(
                    "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
                    format!("unknown static cluster {:?}", target.cluster_name),
                );
            }
            let lds = dynamic
                .lds_config
                .as_ref()
                .map(|_| config_source(&dynamic.lds_config, "dynamic_resources.lds_config"))
                .transpose()?;
            let cds = dynamic
                .cds_config
                .as_ref()
                .map(|_| config_source(&dynamic.cds_config, "dynamic_resources.cds_config"))
                .transpose()?;
            Some(DynamicResources {
                ads_cluster: target.cluster_name.clone(),
                flavor,
                lds,
                cds,
            })
        }
        None => None,
    };
    // Every cluster a static listener names must exist, unless clusters come from CDS.
    if dynamic.as_ref().is_none_or(|d| d.cds.is_none()) {
        for (index, listener) in listeners.iter().enumerate() {
            for chain in listener
                .filter_chains
                .iter()
                .chain(listener.default_filter_chain.iter())
            {
                let NetworkFilter::Http(hcm) = &chain.filter else {
                    continue;
                };
                let RouteSource::Inline(table) = &hcm.routes else {
                    continue;
                };
                if table.validate_clusters == Some(false) {
                    continue;
                }
                if let Some(name) = table
                    .clusters
                    .iter()
                    .find(|name| !clusters.iter().any(|c| &c.name == *name))
                {
                    return err(
                        format!("static_resources.listeners[{index}]"),
                        format!("route: unknown cluster {name:?}"),
                    );
                }
            }
            for name in listener_clusters(listener) {
                if !clusters.iter().any(|c| c.name == name) {
                    return err(
                        format!("static_resources.listeners[{index}]"),
                        format!("tcp_proxy names unknown cluster {name:?}"),
                    );
                }
            }
        }
    }
    Ok(Bootstrap {
        node,
        admin,
        admin_ignores_global_limit: proto
            .admin
            .as_ref()
            .is_some_and(|a| a.ignore_global_conn_limit),
        listeners,
        clusters,
        dynamic,
        runtime,
        raw: RawConfig::of(proto),
    })
}

fn listener_clusters(listener: &Listener) -> Vec<String> {
    let mut names = Vec::new();
    for chain in listener
        .filter_chains
        .iter()
        .chain(listener.default_filter_chain.iter())
    {
        if let NetworkFilter::TcpProxy(tcp) = &chain.filter {
            match &tcp.clusters {
                TcpClusters::One(name) => names.push(name.clone()),
                TcpClusters::Weighted(list) => names.extend(list.iter().map(|w| w.name.clone())),
            }
        }
    }
    names
}

// === Listener ===

fn sub(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

pub fn listener(proto: &listener_pb::Listener, path: &str) -> R<Listener> {
    if proto.name.is_empty() {
        return err(sub(path, "name"), "must not be empty");
    }
    let address = socket_address(&proto.address, &sub(path, "address"))?;
    let mut tls_inspector = false;
    let mut original_dst = false;
    for (index, filter) in proto.listener_filters.iter().enumerate() {
        let fpath = format!("{}[{index}]", sub(path, "listener_filters"));
        let type_url = match &filter.config_type {
            Some(listener_pb::listener_filter::ConfigType::TypedConfig(any)) => {
                any.type_url.as_str()
            }
            None => "",
        };
        match (type_url, filter.name.as_str()) {
            (type_urls::TLS_INSPECTOR, _) | ("", "envoy.filters.listener.tls_inspector") => {
                tls_inspector = true
            }
            (type_urls::ORIGINAL_DST, _) | ("", "envoy.filters.listener.original_dst") => {
                original_dst = true
            }
            _ => {
                return err(
                    fpath,
                    format!(
                        "listener filter {:?} ({type_url}) is not supported",
                        filter.name
                    ),
                );
            }
        }
    }
    let mut filter_chains = Vec::new();
    for (index, chain) in proto.filter_chains.iter().enumerate() {
        filter_chains.push(Arc::new(filter_chain(
            chain,
            &format!("{}[{index}]", sub(path, "filter_chains")),
        )?));
    }
    let default_filter_chain = proto
        .default_filter_chain
        .as_ref()
        .map(|chain| filter_chain(chain, &sub(path, "default_filter_chain")).map(Arc::new))
        .transpose()?;
    if filter_chains.is_empty() && default_filter_chain.is_none() {
        return err(
            sub(path, "filter_chains"),
            "at least one filter chain is required",
        );
    }
    // Envoy rejects two chains with identical matches.
    for (i, a) in proto.filter_chains.iter().enumerate() {
        for b in proto.filter_chains.iter().skip(i + 1) {
            if a.filter_chain_match == b.filter_chain_match {
                return err(
                    format!("{}[{i}].filter_chain_match", sub(path, "filter_chains")),
                    "multiple filter chains with the same matching rules",
                );
            }
        }
    }
    let listener_filters_timeout = match &proto.listener_filters_timeout {
        Some(value) => duration(value, &sub(path, "listener_filters_timeout"))?,
        None => Duration::from_secs(15),
    };
    Ok(Listener {
        name: proto.name.clone(),
        address,
        stat_prefix: if proto.stat_prefix.is_empty() {
            address.to_string()
        } else {
            proto.stat_prefix.clone()
        },
        filter_chains,
        default_filter_chain,
        use_original_dst: proto.use_original_dst.unwrap_or(false) || original_dst,
        tls_inspector,
        listener_filters_timeout,
        continue_on_listener_filters_timeout: proto.continue_on_listener_filters_timeout,
        // core.v3.TrafficDirection: 1 is INBOUND.
        inbound: proto.traffic_direction == 1,
        raw: RawConfig::of(proto),
    })
}

fn cidr(range: &core_pb::CidrRange, path: &str) -> R<CidrRange> {
    let addr: IpAddr = range.address_prefix.parse().map_err(|_| {
        ConfigError::new(
            format!("{path}.address_prefix"),
            format!("{:?} is not an IP address", range.address_prefix),
        )
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = range.prefix_len.unwrap_or(max);
    if len > max {
        return err(format!("{path}.prefix_len"), format!("must be ≤ {max}"));
    }
    Ok(CidrRange {
        addr,
        len: len as u8,
    })
}

fn cidrs(ranges: &[core_pb::CidrRange], path: &str) -> R<Vec<CidrRange>> {
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| cidr(r, &format!("{path}[{i}]")))
        .collect()
}

fn filter_chain(proto: &listener_pb::FilterChain, path: &str) -> R<FilterChain> {
    let filter_match = match &proto.filter_chain_match {
        Some(m) => {
            let mpath = sub(path, "filter_chain_match");
            let destination_port = match m.destination_port {
                Some(port) if (1..=65535).contains(&port) => Some(port as u16),
                Some(_) => return err(format!("{mpath}.destination_port"), "must be in 1..65535"),
                None => None,
            };
            let source_type = match listener_pb::filter_chain_match::ConnectionSourceType::try_from(
                m.source_type,
            ) {
                Ok(listener_pb::filter_chain_match::ConnectionSourceType::Any) => SourceType::Any,
                Ok(listener_pb::filter_chain_match::ConnectionSourceType::SameIpOrLoopback) => {
                    SourceType::SameIpOrLoopback
                }
                Ok(listener_pb::filter_chain_match::ConnectionSourceType::External) => {
                    SourceType::External
                }
                Err(_) => return err(format!("{mpath}.source_type"), "unknown value"),
            };
            let source_ports = m
                .source_ports
                .iter()
                .map(|p| {
                    u16::try_from(*p).map_err(|_| {
                        ConfigError::new(format!("{mpath}.source_ports"), "must be ≤ 65535")
                    })
                })
                .collect::<R<Vec<_>>>()?;
            FilterChainMatch {
                destination_port,
                prefix_ranges: cidrs(&m.prefix_ranges, &format!("{mpath}.prefix_ranges"))?,
                direct_source_prefix_ranges: cidrs(
                    &m.direct_source_prefix_ranges,
                    &format!("{mpath}.direct_source_prefix_ranges"),
                )?,
                source_type,
                source_prefix_ranges: cidrs(
                    &m.source_prefix_ranges,
                    &format!("{mpath}.source_prefix_ranges"),
                )?,
                source_ports,
                server_names: m
                    .server_names
                    .iter()
                    .map(|s| s.to_ascii_lowercase())
                    .collect(),
                transport_protocol: (!m.transport_protocol.is_empty())
                    .then(|| m.transport_protocol.clone()),
                application_protocols: m.application_protocols.clone(),
            }
        }
        None => FilterChainMatch::default(),
    };
    let [filter] = proto.filters.as_slice() else {
        return err(
            sub(path, "filters"),
            "exactly one network filter (tcp_proxy or http_connection_manager) is supported",
        );
    };
    let fpath = format!("{}[0]", sub(path, "filters"));
    let Some(listener_pb::filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        return err(format!("{fpath}.typed_config"), "typed_config is required");
    };
    let tpath = format!("{fpath}.typed_config");
    let filter = match any.type_url.as_str() {
        type_urls::TCP_PROXY => {
            let proto: tcp_pb::TcpProxy = unpack(any).map_err(|e| ConfigError::new(&tpath, e))?;
            NetworkFilter::TcpProxy(Arc::new(tcp_proxy(&proto, &tpath)?))
        }
        type_urls::HTTP_CONNECTION_MANAGER => {
            let proto: hcm_pb::HttpConnectionManager =
                unpack(any).map_err(|e| ConfigError::new(&tpath, e))?;
            NetworkFilter::Http(Arc::new(http_connection_manager(&proto, &tpath)?))
        }
        other => return err(tpath, format!("network filter {other:?} is not supported")),
    };
    let tls = match &proto.transport_socket {
        Some(socket) => {
            let spath = sub(path, "transport_socket");
            let any = crate::tls::transport_socket(socket, crate::tls::DOWNSTREAM, &spath)?;
            let context: xds_api::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext =
                unpack(any).map_err(|e| ConfigError::new(format!("{spath}.typed_config"), e))?;
            Some(crate::tls::server_config(
                &context,
                &format!("{spath}.typed_config"),
            )?)
        }
        None => None,
    };
    Ok(FilterChain {
        name: proto.name.clone(),
        filter_match,
        filter,
        tls,
    })
}

fn tcp_proxy(proto: &tcp_pb::TcpProxy, path: &str) -> R<TcpProxy> {
    if proto.stat_prefix.is_empty() {
        return err(format!("{path}.stat_prefix"), "must not be empty");
    }
    let clusters = match &proto.cluster_specifier {
        Some(tcp_pb::tcp_proxy::ClusterSpecifier::Cluster(name)) => TcpClusters::One(name.clone()),
        Some(tcp_pb::tcp_proxy::ClusterSpecifier::WeightedClusters(weighted)) => {
            if weighted.clusters.is_empty() {
                return err(
                    format!("{path}.weighted_clusters.clusters"),
                    "at least one cluster is required",
                );
            }
            let mut list = Vec::new();
            for (i, c) in weighted.clusters.iter().enumerate() {
                if c.weight == 0 {
                    return err(
                        format!("{path}.weighted_clusters.clusters[{i}].weight"),
                        "must be ≥ 1",
                    );
                }
                list.push(WeightedName {
                    name: c.name.clone(),
                    weight: c.weight,
                });
            }
            TcpClusters::Weighted(list)
        }
        None => return err(path, "cluster or weighted_clusters is required"),
    };
    Ok(TcpProxy {
        stat_prefix: proto.stat_prefix.clone(),
        clusters,
        idle_timeout: timeout_or(
            &proto.idle_timeout,
            &format!("{path}.idle_timeout"),
            Some(Duration::from_secs(3600)),
        )?,
        max_connect_attempts: proto.max_connect_attempts.unwrap_or(1).max(1),
    })
}

/// One HCM `access_log` entry: the stdout, stderr or file logger with Envoy's default format or
/// a text format.
fn access_log(
    proto: &xds_api::envoy::config::accesslog::v3::AccessLog,
    path: &str,
) -> R<AccessLogConfig> {
    use xds_api::envoy::config::accesslog::v3::access_log::ConfigType;
    use xds_api::envoy::extensions::access_loggers::{
        file::v3 as file_pb, stream::v3 as stream_pb,
    };
    let Some(ConfigType::TypedConfig(any)) = &proto.config_type else {
        return err(format!("{path}.typed_config"), "required");
    };
    let typed = format!("{path}.typed_config");
    let (target, format) = match any.type_url.as_str() {
        type_urls::STDOUT_ACCESS_LOG => {
            let log: stream_pb::StdoutAccessLog =
                unpack(any).map_err(|e| ConfigError::new(&typed, e))?;
            let format = log.access_log_format.map(|f| match f {
                stream_pb::stdout_access_log::AccessLogFormat::LogFormat(format) => format,
            });
            (Target::Stdout, format)
        }
        type_urls::STDERR_ACCESS_LOG => {
            let log: stream_pb::StderrAccessLog =
                unpack(any).map_err(|e| ConfigError::new(&typed, e))?;
            let format = log.access_log_format.map(|f| match f {
                stream_pb::stderr_access_log::AccessLogFormat::LogFormat(format) => format,
            });
            (Target::Stderr, format)
        }
        type_urls::FILE_ACCESS_LOG => {
            let log: file_pb::FileAccessLog =
                unpack(any).map_err(|e| ConfigError::new(&typed, e))?;
            if log.path.is_empty() {
                return err(format!("{typed}.path"), "must not be empty");
            }
            // Fail the config, not the first request, when the file cannot be written.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log.path)
                .map_err(|e| {
                    ConfigError::new(
                        format!("{typed}.path"),
                        format!("cannot open {}: {e}", log.path),
                    )
                })?;
            let format = match log.access_log_format {
                None => None,
                Some(file_pb::file_access_log::AccessLogFormat::LogFormat(format)) => Some(format),
                Some(_) => {
                    return err(
                        typed,
                        "only log_format is supported (not format, json_format)",
                    );
                }
            };
            (Target::File(log.path.into()), format)
        }
        other => {
            return err(typed, format!("access logger {other} is not supported"));
        }
    };
    use crate::http::access_log::{LogFormat, parse_format, parse_json_format};
    use core_pb::substitution_format_string::Format;
    let fpath = format!("{typed}.log_format");
    let omit_empty = format.as_ref().is_some_and(|f| f.omit_empty_values);
    let text = match format.and_then(|f| f.format) {
        None => crate::http::access_log::DEFAULT_FORMAT.to_string(),
        Some(Format::TextFormat(text)) => text,
        Some(Format::TextFormatSource(source)) => match source.specifier {
            Some(core_pb::data_source::Specifier::InlineString(text)) => text,
            _ => {
                return err(
                    format!("{fpath}.text_format_source"),
                    "only inline_string is supported",
                );
            }
        },
        Some(Format::JsonFormat(object)) => {
            let fields = parse_json_format(&object.fields)
                .map_err(|e| ConfigError::new(format!("{fpath}.json_format"), e))?;
            let format = LogFormat::Json { fields, omit_empty };
            return Ok(AccessLogConfig { target, format });
        }
    };
    let tokens = parse_format(&text).map_err(|e| ConfigError::new(&fpath, e))?;
    let format = LogFormat::Text { tokens, omit_empty };
    Ok(AccessLogConfig { target, format })
}

fn http_connection_manager(
    proto: &hcm_pb::HttpConnectionManager,
    path: &str,
) -> R<HttpConnectionManager> {
    if proto.stat_prefix.is_empty() {
        return err(format!("{path}.stat_prefix"), "must not be empty");
    }
    let codec = match hcm_pb::http_connection_manager::CodecType::try_from(proto.codec_type) {
        Ok(hcm_pb::http_connection_manager::CodecType::Auto) => Codec::Auto,
        Ok(hcm_pb::http_connection_manager::CodecType::Http1) => Codec::Http1,
        Ok(hcm_pb::http_connection_manager::CodecType::Http2) => Codec::Http2,
        _ => {
            return err(
                format!("{path}.codec_type"),
                "only AUTO, HTTP1 and HTTP2 are supported",
            );
        }
    };
    let routes = match &proto.route_specifier {
        Some(hcm_pb::http_connection_manager::RouteSpecifier::RouteConfig(config)) => {
            RouteSource::Inline(Arc::new(RouteTable::compile(
                config,
                &format!("{path}.route_config"),
            )?))
        }
        Some(hcm_pb::http_connection_manager::RouteSpecifier::Rds(rds)) => {
            if rds.route_config_name.is_empty() {
                return err(format!("{path}.rds.route_config_name"), "must not be empty");
            }
            RouteSource::Rds {
                name: rds.route_config_name.clone(),
                source: config_source(&rds.config_source, &format!("{path}.rds.config_source"))?,
            }
        }
        #[allow(unreachable_patterns)]
        _ => return err(path, "route_config or rds is required"),
    };
    // The filter list: optionally the CORS filter, then the router, last (as Envoy requires).
    let filter_type = |filter: &hcm_pb::HttpFilter| match &filter.config_type {
        Some(hcm_pb::http_filter::ConfigType::TypedConfig(any)) => any.type_url.clone(),
        _ => match filter.name.as_str() {
            "envoy.filters.http.router" => type_urls::ROUTER.to_string(),
            "envoy.filters.http.cors" => type_urls::CORS.to_string(),
            _ => String::new(),
        },
    };
    let mut cors = false;
    let mut router = false;
    let filters = &proto.http_filters;
    for (index, filter) in filters.iter().enumerate() {
        let fpath = format!("{path}.http_filters[{index}]");
        let kind = filter_type(filter);
        let last = index + 1 == filters.len();
        match kind.as_str() {
            type_urls::ROUTER if last => router = true,
            type_urls::ROUTER => return err(fpath, "the router must be the last http filter"),
            type_urls::CORS if !cors => cors = true,
            type_urls::CORS => return err(fpath, "the CORS filter appears twice"),
            _ => {
                return err(
                    fpath,
                    format!(
                        "http filter {:?} is not supported (Remora has the CORS filter and the \
                         router)",
                        filter.name
                    ),
                );
            }
        }
    }
    if !router {
        return err(
            format!("{path}.http_filters"),
            "the router filter is required, last",
        );
    }
    let mut upgrades = Vec::new();
    for upgrade in &proto.upgrade_configs {
        if upgrade.enabled.unwrap_or(true) {
            upgrades.push(upgrade.upgrade_type.to_ascii_lowercase());
        }
    }
    let common = proto.common_http_protocol_options.unwrap_or_default();
    let access_logs = proto
        .access_log
        .iter()
        .enumerate()
        .map(|(i, log)| access_log(log, &format!("{path}.access_log[{i}]")))
        .collect::<R<Vec<_>>>()?;
    Ok(HttpConnectionManager {
        access_logs,
        active_logs: Default::default(),
        stat_prefix: proto.stat_prefix.clone(),
        codec,
        routes,
        server_name: if proto.server_name.is_empty() {
            "envoy".into()
        } else {
            proto.server_name.clone()
        },
        use_remote_address: proto.use_remote_address.unwrap_or(false),
        skip_xff_append: proto.skip_xff_append,
        xff_num_trusted_hops: proto.xff_num_trusted_hops,
        generate_request_id: proto.generate_request_id.unwrap_or(true),
        preserve_external_request_id: proto.preserve_external_request_id,
        always_set_request_id_in_response: proto.always_set_request_id_in_response,
        request_timeout: timeout_or(
            &proto.request_timeout,
            &format!("{path}.request_timeout"),
            None,
        )?,
        stream_idle_timeout: timeout_or(
            &proto.stream_idle_timeout,
            &format!("{path}.stream_idle_timeout"),
            Some(Duration::from_secs(300)),
        )?,
        idle_timeout: timeout_or(
            &common.idle_timeout,
            &format!("{path}.common_http_protocol_options.idle_timeout"),
            Some(Duration::from_secs(3600)),
        )?,
        request_headers_timeout: timeout_or(
            &proto.request_headers_timeout,
            &format!("{path}.request_headers_timeout"),
            None,
        )?,
        drain_timeout: opt_duration(&proto.drain_timeout, &format!("{path}.drain_timeout"))?
            .unwrap_or(Duration::from_secs(5)),
        max_request_headers_kb: match proto.max_request_headers_kb {
            Some(kb) if (1..=8192).contains(&kb) => kb,
            Some(_) => {
                return err(
                    format!("{path}.max_request_headers_kb"),
                    "must be in 1..8192",
                );
            }
            None => 60,
        },
        max_headers_count: common.max_headers_count.unwrap_or(100).max(1),
        http2: http2_options(
            &proto.http2_protocol_options,
            &format!("{path}.http2_protocol_options"),
        )?,
        upgrades,
        cors,
        strip_any_host_port: matches!(
            proto.strip_port_mode,
            Some(hcm_pb::http_connection_manager::StripPortMode::StripAnyHostPort(true))
        ),
        strip_matching_host_port: proto.strip_matching_host_port,
    })
}

// === Cluster ===

pub fn cluster(proto: &cluster_pb::Cluster, path: &str) -> R<Cluster> {
    if proto.name.is_empty() {
        return err(sub(path, "name"), "must not be empty");
    }
    let kind = match &proto.cluster_discovery_type {
        None => cluster_pb::cluster::DiscoveryType::Static,
        Some(cluster_pb::cluster::ClusterDiscoveryType::Type(t)) => {
            cluster_pb::cluster::DiscoveryType::try_from(*t)
                .map_err(|_| ConfigError::new(sub(path, "type"), "unknown value"))?
        }
        Some(_) => {
            return err(
                sub(path, "cluster_type"),
                "custom cluster types are not supported",
            );
        }
    };
    let discovery = match kind {
        cluster_pb::cluster::DiscoveryType::Static => DiscoveryType::Static,
        cluster_pb::cluster::DiscoveryType::StrictDns => DiscoveryType::StrictDns,
        cluster_pb::cluster::DiscoveryType::LogicalDns => DiscoveryType::LogicalDns,
        cluster_pb::cluster::DiscoveryType::OriginalDst => DiscoveryType::OriginalDst,
        cluster_pb::cluster::DiscoveryType::Eds => {
            let Some(eds) = &proto.eds_cluster_config else {
                return err(sub(path, "eds_cluster_config"), "required for EDS clusters");
            };
            DiscoveryType::Eds {
                service_name: if eds.service_name.is_empty() {
                    proto.name.clone()
                } else {
                    eds.service_name.clone()
                },
                source: config_source(
                    &eds.eds_config,
                    &sub(path, "eds_cluster_config.eds_config"),
                )?,
            }
        }
    };
    match cluster_pb::cluster::LbPolicy::try_from(proto.lb_policy) {
        Ok(cluster_pb::cluster::LbPolicy::RoundRobin) => {}
        Ok(cluster_pb::cluster::LbPolicy::ClusterProvided)
            if discovery == DiscoveryType::OriginalDst => {}
        Ok(other) => {
            return err(
                sub(path, "lb_policy"),
                format!("{} is not supported", other.as_str_name()),
            );
        }
        Err(_) => return err(sub(path, "lb_policy"), "unknown value"),
    }
    let connect_timeout = match &proto.connect_timeout {
        Some(value) => duration(value, &sub(path, "connect_timeout"))?,
        None => Duration::from_secs(5),
    };
    if connect_timeout.is_zero() {
        return err(sub(path, "connect_timeout"), "must be greater than 0");
    }
    let load_assignment = match &proto.load_assignment {
        Some(cla) => {
            if matches!(
                discovery,
                DiscoveryType::Eds { .. } | DiscoveryType::OriginalDst
            ) {
                return err(
                    sub(path, "load_assignment"),
                    "not allowed for EDS and ORIGINAL_DST clusters",
                );
            }
            let resolved = load_assignment(
                cla,
                &sub(path, "load_assignment"),
                matches!(
                    discovery,
                    DiscoveryType::StrictDns | DiscoveryType::LogicalDns
                ),
            )?;
            if discovery == DiscoveryType::LogicalDns && resolved.endpoints.len() != 1 {
                return err(
                    sub(path, "load_assignment"),
                    "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single \
                     lb_endpoint",
                );
            }
            resolved
        }
        None => LoadAssignment::default(),
    };
    let mut protocol = if proto.http2_protocol_options.is_some() {
        UpstreamProtocol::Http2
    } else {
        UpstreamProtocol::Http1
    };
    let mut http2_path = sub(path, "http2_protocol_options");
    let mut http2 = http2_options(&proto.http2_protocol_options, &http2_path)?;
    let mut common = core_pb::HttpProtocolOptions::default();
    for (key, any) in &proto.typed_extension_protocol_options {
        let kpath = format!("{}[{key:?}]", sub(path, "typed_extension_protocol_options"));
        if key != type_urls::UPSTREAM_HTTP_PROTOCOL_OPTIONS_KEY
            && any.type_url != type_urls::UPSTREAM_HTTP_PROTOCOL_OPTIONS
        {
            return err(
                kpath,
                "only envoy.extensions.upstreams.http.v3.HttpProtocolOptions is supported",
            );
        }
        let options: xds_api::envoy::extensions::upstreams::http::v3::HttpProtocolOptions =
            unpack(any).map_err(|e| ConfigError::new(&kpath, e))?;
        use xds_api::envoy::extensions::upstreams::http::v3::http_protocol_options as hpo;
        match &options.upstream_protocol_options {
            Some(hpo::UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => {
                match &explicit.protocol_config {
                    Some(hpo::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        options,
                    )) => {
                        protocol = UpstreamProtocol::Http2;
                        http2_path = format!("{kpath}.explicit_http_config.http2_protocol_options");
                        http2 = http2_options(&Some(options.clone()), &http2_path)?;
                    }
                    Some(hpo::explicit_http_config::ProtocolConfig::HttpProtocolOptions(_)) => {
                        protocol = UpstreamProtocol::Http1
                    }
                    _ => {
                        return err(
                            format!("{kpath}.explicit_http_config"),
                            "http_protocol_options or http2_protocol_options is required",
                        );
                    }
                }
            }
            Some(_) => return err(kpath, "only explicit_http_config is supported"),
            None => {}
        }
        if let Some(options) = &options.common_http_protocol_options {
            common = *options;
        }
    }
    if http2.max_concurrent_streams.is_some() {
        // Envoy opens another connection when one reaches the limit; Remora's pool keeps one
        // HTTP/2 connection per endpoint and worker, so it cannot honour the field.
        return err(
            format!("{http2_path}.max_concurrent_streams"),
            "is not supported on clusters (Remora keeps one HTTP/2 connection per endpoint and \
             worker, bounded by the upstream's own SETTINGS_MAX_CONCURRENT_STREAMS)",
        );
    }
    let common_path = format!(
        "{}[{:?}].common_http_protocol_options",
        sub(path, "typed_extension_protocol_options"),
        type_urls::UPSTREAM_HTTP_PROTOCOL_OPTIONS_KEY
    );
    // HIGH priority thresholds are kept for `/clusters` only: no route asks for that priority.
    let (mut thresholds, mut thresholds_high) = (Thresholds::default(), Thresholds::default());
    if let Some(breakers) = &proto.circuit_breakers {
        for t in &breakers.thresholds {
            let set = Thresholds {
                max_connections: t.max_connections.unwrap_or(1024),
                max_pending_requests: t.max_pending_requests.unwrap_or(1024),
                max_requests: t.max_requests.unwrap_or(1024),
                max_retries: t.max_retries.unwrap_or(3),
            };
            if t.priority == 0 {
                thresholds = set;
            } else {
                thresholds_high = set;
            }
        }
    }
    let dns_refresh_rate = opt_duration(&proto.dns_refresh_rate, &sub(path, "dns_refresh_rate"))?
        .unwrap_or(Duration::from_secs(5));
    let tls = match &proto.transport_socket {
        Some(socket) => {
            let spath = sub(path, "transport_socket");
            let any = crate::tls::transport_socket(socket, crate::tls::UPSTREAM, &spath)?;
            let context: xds_api::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext =
                unpack(any).map_err(|e| ConfigError::new(format!("{spath}.typed_config"), e))?;
            Some(crate::tls::client_config(
                &context,
                &format!("{spath}.typed_config"),
            )?)
        }
        None => None,
    };
    Ok(Cluster {
        tls,
        name: proto.name.clone(),
        discovery,
        connect_timeout,
        load_assignment,
        protocol,
        thresholds,
        thresholds_high,
        dns_refresh_rate: dns_refresh_rate.max(Duration::from_millis(1)),
        dns_lookup_family: match cluster_pb::cluster::DnsLookupFamily::try_from(
            proto.dns_lookup_family,
        ) {
            Ok(cluster_pb::cluster::DnsLookupFamily::Auto) => DnsLookupFamily::Auto,
            Ok(cluster_pb::cluster::DnsLookupFamily::V4Only) => DnsLookupFamily::V4Only,
            Ok(cluster_pb::cluster::DnsLookupFamily::V6Only) => DnsLookupFamily::V6Only,
            Ok(cluster_pb::cluster::DnsLookupFamily::V4Preferred) => DnsLookupFamily::V4Preferred,
            Ok(cluster_pb::cluster::DnsLookupFamily::All) => DnsLookupFamily::All,
            Err(_) => return err(sub(path, "dns_lookup_family"), "unknown value"),
        },
        tcp_keepalive: proto
            .upstream_connection_options
            .as_ref()
            .is_some_and(|o| o.tcp_keepalive.is_some()),
        idle_timeout: timeout_or(
            &common.idle_timeout,
            &format!("{common_path}.idle_timeout"),
            Some(Duration::from_secs(3600)),
        )?,
        max_headers_count: common.max_headers_count.unwrap_or(100).max(1),
        http2,
        raw: RawConfig::of(proto),
    })
}

/// Converts an EDS ClusterLoadAssignment resource. Its supported fields are checked on the
/// wire bytes before decoding (`strict::check_bytes` in `xds`).
pub fn load_assignment_resource(proto: &endpoint_pb::ClusterLoadAssignment) -> R<LoadAssignment> {
    if proto.cluster_name.is_empty() {
        return err("cluster_name", "must not be empty");
    }
    load_assignment(proto, "", false)
}

pub fn load_assignment(
    proto: &endpoint_pb::ClusterLoadAssignment,
    path: &str,
    allow_dns: bool,
) -> R<LoadAssignment> {
    let mut endpoints = Vec::new();
    for (li, locality) in proto.endpoints.iter().enumerate() {
        let lpath = format!("{}[{li}]", sub(path, "endpoints"));
        if locality.priority > 128 {
            return err(format!("{lpath}.priority"), "must be ≤ 128");
        }
        if locality.load_balancing_weight == Some(0) {
            return err(format!("{lpath}.load_balancing_weight"), "must be ≥ 1");
        }
        for (ei, lb) in locality.lb_endpoints.iter().enumerate() {
            let epath = format!("{lpath}.lb_endpoints[{ei}]");
            let Some(endpoint_pb::lb_endpoint::HostIdentifier::Endpoint(endpoint)) =
                &lb.host_identifier
            else {
                return err(format!("{epath}.endpoint"), "endpoint is required");
            };
            let address = resolve_address(&endpoint.address, &format!("{epath}.endpoint.address"))?;
            if matches!(address, EndpointAddress::Dns { .. }) && !allow_dns {
                return err(
                    format!("{epath}.endpoint.address.socket_address.address"),
                    "must be an IP address (names only in STRICT_DNS and LOGICAL_DNS clusters)",
                );
            }
            let weight = match lb.load_balancing_weight {
                Some(0) => return err(format!("{epath}.load_balancing_weight"), "must be ≥ 1"),
                Some(w) => w,
                None => 1,
            };
            let health = match core_pb::HealthStatus::try_from(lb.health_status) {
                Ok(core_pb::HealthStatus::Unknown) => HealthStatus::Unknown,
                Ok(core_pb::HealthStatus::Healthy) => HealthStatus::Healthy,
                Ok(core_pb::HealthStatus::Unhealthy) => HealthStatus::Unhealthy,
                Ok(core_pb::HealthStatus::Draining) => HealthStatus::Draining,
                Ok(core_pb::HealthStatus::Timeout) => HealthStatus::Timeout,
                Ok(core_pb::HealthStatus::Degraded) => HealthStatus::Degraded,
                Err(_) => return err(format!("{epath}.health_status"), "unknown value"),
            };
            let hostname = match (&address, endpoint.hostname.is_empty()) {
                (_, false) => endpoint.hostname.clone(),
                (EndpointAddress::Dns { host, .. }, true) => host.clone(),
                _ => String::new(),
            };
            endpoints.push(LbEndpoint {
                address,
                hostname,
                weight,
                health,
                priority: locality.priority,
            });
        }
    }
    Ok(LoadAssignment { endpoints })
}
