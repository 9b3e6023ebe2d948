//! Clusters: how hosts are found (STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST), how one
//! is picked, how connections to them are made (timeouts, keepalive, TLS, HTTP/1.1 or HTTP/2)
//! and the circuit breakers that bound them.

use std::net::SocketAddr;
use std::time::Duration;

use xds_api::envoy::config::cluster::v3 as cluster_pb;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::extensions::upstreams::http::v3 as upstream_http_pb;
use xds_api::type_urls;

use crate::common::{
    CommonHttpOptions, ConfigSource, Http1Options, Http2Options, TcpKeepalive, common_http_options,
    config_source, duration, http1_options, http2_options, opt_duration, tcp_keepalive, unpack,
};
use crate::endpoint::{LoadAssignment, load_assignment};
use crate::error::{ConfigResult, entry, err, field};
use crate::raw::RawConfig;
use crate::tls::UpstreamTls;
use crate::unsupported;

/// How a cluster finds its hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryType {
    Static,
    StrictDns,
    /// One logical host: its name is resolved in the background and new connections go to the
    /// first address of the latest answer (Envoy's LOGICAL_DNS).
    LogicalDns,
    Eds {
        service_name: String,
        source: ConfigSource,
    },
    /// The downstream connection's original destination (before an iptables REDIRECT).
    OriginalDst,
}

/// How a host is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// Weighted round robin.
    RoundRobin,
    /// The cluster picks (ORIGINAL_DST).
    ClusterProvided,
}

/// Circuit breakers of one priority (Envoy's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// Which addresses a DNS answer contributes (Envoy's `dns_lookup_family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsLookupFamily {
    /// IPv6 if any, else IPv4.
    Auto,
    V4Only,
    V6Only,
    /// IPv4 if any, else IPv6.
    V4Preferred,
    All,
}

impl DnsLookupFamily {
    /// Filters resolved addresses as Envoy would.
    pub fn select(self, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) =
            addrs.into_iter().partition(SocketAddr::is_ipv4);
        match self {
            DnsLookupFamily::V4Only => v4,
            DnsLookupFamily::V6Only => v6,
            DnsLookupFamily::Auto => {
                if v6.is_empty() {
                    v4
                } else {
                    v6
                }
            }
            DnsLookupFamily::V4Preferred => {
                if v4.is_empty() {
                    v6
                } else {
                    v4
                }
            }
            DnsLookupFamily::All => v4.into_iter().chain(v6).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// How connections to a cluster's hosts are made: what the HTTP pools and `tcp_proxy` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// `upstream_connection_options.tcp_keepalive`.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// TLS origination (`transport_socket` with an UpstreamTlsContext).
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub discovery: DiscoveryType,
    pub lb_policy: LbPolicy,
    pub load_assignment: LoadAssignment,
    pub connect: ConnectOptions,
    pub protocol: UpstreamProtocol,
    /// The DEFAULT priority's circuit breakers.
    pub thresholds: Thresholds,
    /// The HIGH priority circuit breakers, shown by `/clusters` (no route uses HIGH yet).
    pub thresholds_high: Thresholds,
    pub dns_refresh_rate: Duration,
    pub dns_lookup_family: DnsLookupFamily,
    /// `common_http_protocol_options.idle_timeout`: an upstream connection unused this long
    /// is closed (Envoy's default 1 h; `None`: never).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_headers_count`, for upstream responses.
    pub max_headers_count: u32,
    pub http2: Http2Options,
    pub raw: RawConfig,
}

pub fn cluster(proto: &cluster_pb::Cluster, path: &str) -> ConfigResult<Cluster> {
    let cluster_pb::Cluster {
        transport_socket_matches,
        name,
        alt_stat_name,
        eds_cluster_config,
        connect_timeout,
        per_connection_buffer_limit_bytes,
        lb_policy,
        load_assignment: assignment,
        health_checks,
        max_requests_per_connection,
        circuit_breakers,
        upstream_http_protocol_options,
        common_http_protocol_options,
        http_protocol_options,
        http2_protocol_options,
        typed_extension_protocol_options,
        dns_refresh_rate,
        dns_jitter,
        dns_failure_refresh_rate,
        respect_dns_ttl,
        dns_lookup_family,
        dns_resolvers,
        use_tcp_for_dns_lookups,
        wait_for_warm_on_init,
        outlier_detection,
        cleanup_interval,
        upstream_bind_config,
        common_lb_config,
        transport_socket,
        metadata,
        protocol_selection,
        upstream_connection_options,
        close_connections_on_host_health_failure,
        ignore_health_on_host_removal,
        connection_pool_per_downstream_connection,
        cluster_discovery_type,
        lb_config,
    } = proto;
    unsupported!(
        path,
        transport_socket_matches,
        alt_stat_name,
        per_connection_buffer_limit_bytes,
        health_checks,
        max_requests_per_connection,
        upstream_http_protocol_options,
        common_http_protocol_options,
        http_protocol_options,
        dns_jitter,
        dns_failure_refresh_rate,
        respect_dns_ttl,
        dns_resolvers,
        use_tcp_for_dns_lookups,
        wait_for_warm_on_init,
        outlier_detection,
        cleanup_interval,
        upstream_bind_config,
        common_lb_config,
        metadata,
        protocol_selection,
        close_connections_on_host_health_failure,
        ignore_health_on_host_removal,
        connection_pool_per_downstream_connection,
        lb_config,
    );
    if name.is_empty() {
        return err(field(path, "name"), "must not be empty");
    }
    let discovery = discovery(cluster_discovery_type, eds_cluster_config, name, path)?;
    let lb_policy = match cluster_pb::cluster::LbPolicy::try_from(*lb_policy) {
        Ok(cluster_pb::cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(cluster_pb::cluster::LbPolicy::ClusterProvided)
            if discovery == DiscoveryType::OriginalDst =>
        {
            LbPolicy::ClusterProvided
        }
        Ok(other) => {
            return err(
                field(path, "lb_policy"),
                format!("{} is not supported", other.as_str_name()),
            );
        }
        Err(_) => return err(field(path, "lb_policy"), "unknown value"),
    };
    let connect_timeout = match connect_timeout {
        Some(value) => duration(value, &field(path, "connect_timeout"))?,
        None => Duration::from_secs(5),
    };
    if connect_timeout.is_zero() {
        return err(field(path, "connect_timeout"), "must be greater than 0");
    }
    let dns = matches!(
        discovery,
        DiscoveryType::StrictDns | DiscoveryType::LogicalDns
    );
    let load_assignment = match assignment {
        Some(cla) => {
            if matches!(
                discovery,
                DiscoveryType::Eds { .. } | DiscoveryType::OriginalDst
            ) {
                return err(
                    field(path, "load_assignment"),
                    "not allowed for EDS and ORIGINAL_DST clusters",
                );
            }
            let resolved = load_assignment(cla, &field(path, "load_assignment"), dns)?;
            if discovery == DiscoveryType::LogicalDns && resolved.endpoints.len() != 1 {
                return err(
                    field(path, "load_assignment"),
                    "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single \
                     lb_endpoint",
                );
            }
            resolved
        }
        None => LoadAssignment::default(),
    };
    let mut protocol = UpstreamProtocol::Http1;
    let mut http2 = Http2Options::default();
    let mut http2_path = field(path, "http2_protocol_options");
    if let Some(options) = http2_protocol_options {
        protocol = UpstreamProtocol::Http2;
        http2 = http2_options(options, &http2_path)?;
    }
    let mut common_options = CommonHttpOptions::default();
    for (key, any) in typed_extension_protocol_options {
        let kpath = entry(path, "typed_extension_protocol_options", key);
        if key != type_urls::UPSTREAM_HTTP_PROTOCOL_OPTIONS_KEY
            && any.type_url != type_urls::UPSTREAM_HTTP_PROTOCOL_OPTIONS
        {
            return err(
                kpath,
                "only envoy.extensions.upstreams.http.v3.HttpProtocolOptions is supported",
            );
        }
        let upstream_http_pb::HttpProtocolOptions {
            common_http_protocol_options,
            upstream_http_protocol_options,
            upstream_protocol_options,
        } = unpack(any, &kpath)?;
        unsupported!(&kpath, upstream_http_protocol_options);
        use upstream_http_pb::http_protocol_options as hpo;
        match upstream_protocol_options {
            Some(hpo::UpstreamProtocolOptions::ExplicitHttpConfig(hpo::ExplicitHttpConfig {
                protocol_config,
            })) => {
                let epath = field(&kpath, "explicit_http_config");
                use hpo::explicit_http_config::ProtocolConfig;
                match protocol_config {
                    Some(ProtocolConfig::Http2ProtocolOptions(options)) => {
                        protocol = UpstreamProtocol::Http2;
                        http2_path = field(&epath, "http2_protocol_options");
                        http2 = http2_options(&options, &http2_path)?;
                    }
                    Some(ProtocolConfig::HttpProtocolOptions(options)) => {
                        let hpath = field(&epath, "http_protocol_options");
                        let options = http1_options(&options, &hpath)?;
                        let Http1Options {
                            allow_chunked_length,
                            accept_http_10,
                            default_host_for_http_10,
                            allow_custom_methods,
                        } = options;
                        const SERVER_SIDE: &str =
                            "applies to requests a listener receives, not to upstreams";
                        crate::unsupported_because!(&hpath, allow_chunked_length, SERVER_SIDE);
                        crate::unsupported_because!(&hpath, accept_http_10, SERVER_SIDE);
                        crate::unsupported_because!(&hpath, default_host_for_http_10, SERVER_SIDE);
                        crate::unsupported_because!(&hpath, allow_custom_methods, SERVER_SIDE);
                        protocol = UpstreamProtocol::Http1;
                    }
                    None => {
                        return err(
                            epath,
                            "http_protocol_options or http2_protocol_options is required",
                        );
                    }
                }
            }
            Some(hpo::UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => {
                return err(
                    field(&kpath, "use_downstream_protocol_config"),
                    "is not supported (use explicit_http_config)",
                );
            }
            Some(hpo::UpstreamProtocolOptions::AutoConfig(_)) => {
                return err(
                    field(&kpath, "auto_config"),
                    "is not supported (use explicit_http_config)",
                );
            }
            None => {}
        }
        if let Some(common) = common_http_protocol_options {
            common_options =
                common_http_options(&common, &field(&kpath, "common_http_protocol_options"))?;
        }
    }
    if http2.max_concurrent_streams.is_some() {
        // Envoy opens another connection when one reaches the limit; Remora's pool keeps one
        // HTTP/2 connection per endpoint and worker, so it cannot honour the field.
        return err(
            field(&http2_path, "max_concurrent_streams"),
            "is not supported on clusters (Remora keeps one HTTP/2 connection per endpoint and \
             worker, bounded by the upstream's own SETTINGS_MAX_CONCURRENT_STREAMS)",
        );
    }
    let (thresholds, thresholds_high) = breakers(circuit_breakers, path)?;
    let dns_refresh_rate = opt_duration(dns_refresh_rate, &field(path, "dns_refresh_rate"))?
        .unwrap_or(Duration::from_secs(5));
    let tls = transport_socket
        .as_ref()
        .map(|socket| crate::tls::upstream(socket, &field(path, "transport_socket")))
        .transpose()?;
    let tcp_keepalive = match upstream_connection_options {
        Some(cluster_pb::UpstreamConnectionOptions {
            tcp_keepalive: keepalive,
            set_local_interface_name_on_upstream_connections,
        }) => {
            let opath = field(path, "upstream_connection_options");
            unsupported!(&opath, set_local_interface_name_on_upstream_connections);
            keepalive
                .as_ref()
                .map(|k| tcp_keepalive(k, &field(&opath, "tcp_keepalive")))
                .transpose()?
        }
        None => None,
    };
    use cluster_pb::cluster::DnsLookupFamily as F;
    let dns_lookup_family = match F::try_from(*dns_lookup_family) {
        Ok(F::Auto) => DnsLookupFamily::Auto,
        Ok(F::V4Only) => DnsLookupFamily::V4Only,
        Ok(F::V6Only) => DnsLookupFamily::V6Only,
        Ok(F::V4Preferred) => DnsLookupFamily::V4Preferred,
        Ok(F::All) => DnsLookupFamily::All,
        Err(_) => return err(field(path, "dns_lookup_family"), "unknown value"),
    };
    Ok(Cluster {
        name: name.clone(),
        discovery,
        lb_policy,
        load_assignment,
        connect: ConnectOptions {
            connect_timeout,
            tcp_keepalive,
            tls,
        },
        protocol,
        thresholds,
        thresholds_high,
        dns_refresh_rate: dns_refresh_rate.max(Duration::from_millis(1)),
        dns_lookup_family,
        idle_timeout: common_options.idle_timeout,
        max_headers_count: common_options.max_headers_count,
        http2,
        raw: RawConfig::of(proto),
    })
}

fn discovery(
    kind: &Option<cluster_pb::cluster::ClusterDiscoveryType>,
    eds: &Option<cluster_pb::cluster::EdsClusterConfig>,
    name: &str,
    path: &str,
) -> ConfigResult<DiscoveryType> {
    use cluster_pb::cluster::DiscoveryType as T;
    let kind = match kind {
        None => T::Static,
        Some(cluster_pb::cluster::ClusterDiscoveryType::Type(t)) => {
            T::try_from(*t).or_else(|_| err(field(path, "type"), "unknown value"))?
        }
        Some(cluster_pb::cluster::ClusterDiscoveryType::ClusterType(_)) => {
            return err(
                field(path, "cluster_type"),
                "custom cluster types are not supported",
            );
        }
    };
    let eds_path = field(path, "eds_cluster_config");
    if kind != T::Eds && eds.is_some() {
        return err(eds_path, "only EDS clusters have an eds_cluster_config");
    }
    Ok(match kind {
        T::Static => DiscoveryType::Static,
        T::StrictDns => DiscoveryType::StrictDns,
        T::LogicalDns => DiscoveryType::LogicalDns,
        T::OriginalDst => DiscoveryType::OriginalDst,
        T::Eds => {
            let Some(cluster_pb::cluster::EdsClusterConfig {
                eds_config,
                service_name,
            }) = eds
            else {
                return err(eds_path, "required for EDS clusters");
            };
            DiscoveryType::Eds {
                service_name: if service_name.is_empty() {
                    name.to_string()
                } else {
                    service_name.clone()
                },
                source: config_source(eds_config, &field(&eds_path, "eds_config"))?,
            }
        }
    })
}

/// The DEFAULT and HIGH thresholds.
fn breakers(
    proto: &Option<cluster_pb::CircuitBreakers>,
    path: &str,
) -> ConfigResult<(Thresholds, Thresholds)> {
    let (mut default, mut high) = (Thresholds::default(), Thresholds::default());
    let Some(cluster_pb::CircuitBreakers {
        thresholds,
        per_host_thresholds,
    }) = proto
    else {
        return Ok((default, high));
    };
    let bpath = field(path, "circuit_breakers");
    unsupported!(&bpath, per_host_thresholds);
    for (index, t) in thresholds.iter().enumerate() {
        let tpath = crate::error::item(&bpath, "thresholds", index);
        let cluster_pb::circuit_breakers::Thresholds {
            priority,
            max_connections,
            max_pending_requests,
            max_requests,
            max_retries,
            retry_budget,
            track_remaining,
            max_connection_pools,
        } = t;
        unsupported!(&tpath, retry_budget, track_remaining, max_connection_pools);
        let set = Thresholds {
            max_connections: max_connections.unwrap_or(1024),
            max_pending_requests: max_pending_requests.unwrap_or(1024),
            max_requests: max_requests.unwrap_or(1024),
            max_retries: max_retries.unwrap_or(3),
        };
        match core_pb::RoutingPriority::try_from(*priority) {
            Ok(core_pb::RoutingPriority::Default) => default = set,
            Ok(core_pb::RoutingPriority::High) => high = set,
            Err(_) => return err(field(&tpath, "priority"), "unknown value"),
        }
    }
    Ok((default, high))
}
