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
use crate::health_check::{HealthCheck, health_checks as convert_health_checks};
use crate::load_balancing::{LbFields, LoadBalancing, load_balancing};
use crate::outlier::{OutlierDetection, outlier_detection as convert_outlier_detection};
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

/// Circuit breakers of one priority (Envoy's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// Set: concurrent retries are bounded by a share of the active requests instead of
    /// `max_retries`.
    pub retry_budget: Option<RetryBudget>,
    /// `circuit_breakers.*.remaining_*` gauges are kept.
    pub track_remaining: bool,
}

/// A retry budget: retries in flight may be `percent` of the requests in flight (active and
/// pending), and never fewer than `min_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_concurrency: u32,
}

impl RetryBudget {
    /// The retries allowed in flight with `requests` in flight.
    pub fn allowed(&self, requests: u64) -> u64 {
        ((requests as f64 * self.percent / 100.0) as u64).max(u64::from(self.min_concurrency))
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
            track_remaining: false,
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

/// The pipe of a cluster whose endpoint is a unix socket: allowed as a STATIC cluster's only
/// endpoint (what Istio writes), refused anywhere else.
fn pipe_endpoint(
    cla: &xds_api::envoy::config::endpoint::v3::ClusterLoadAssignment,
    discovery: &DiscoveryType,
    path: &str,
) -> ConfigResult<Option<std::path::PathBuf>> {
    use xds_api::envoy::config::core::v3::address::Address as Kind;
    let addresses: Vec<(usize, usize, Option<&Kind>)> = cla
        .endpoints
        .iter()
        .enumerate()
        .flat_map(|(i, locality)| {
            locality.lb_endpoints.iter().enumerate().map(move |(j, lb)| {
                let address = match &lb.host_identifier {
                    Some(xds_api::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint,
                    )) => endpoint.address.as_ref().and_then(|a| a.address.as_ref()),
                    _ => None,
                };
                (i, j, address)
            })
        })
        .collect();
    let Some((i, j, _)) = addresses
        .iter()
        .find(|(_, _, address)| matches!(address, Some(Kind::Pipe(_))))
    else {
        return Ok(None);
    };
    let at = format!("{path}.endpoints[{i}].lb_endpoints[{j}].endpoint.address.pipe");
    if *discovery != DiscoveryType::Static || addresses.len() != 1 {
        return err(
            at,
            "a pipe must be the only endpoint of a STATIC cluster (Remora reaches pipes only \
             for the ADS stream)",
        );
    }
    let Some(Kind::Pipe(pipe)) = addresses[0].2 else {
        return Ok(None);
    };
    if pipe.path.is_empty() || pipe.path.starts_with('@') {
        return err(
            at,
            "the path must name a file (abstract sockets are not supported)",
        );
    }
    Ok(Some(std::path::PathBuf::from(&pipe.path)))
}

/// How connections to a cluster's hosts are made: what the HTTP pools and `tcp_proxy` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// `upstream_connection_options.tcp_keepalive`.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// TLS origination (`transport_socket` with an UpstreamTlsContext). Boxed: inline it is
    /// most of a cluster's size, and most clusters of a large config have none.
    pub tls: Option<Box<UpstreamTls>>,
}

impl ConnectOptions {
    /// The SDS secrets its TLS context names.
    pub fn sds_secrets(&self) -> impl Iterator<Item = &crate::tls::SdsSecret> {
        self.tls.iter().flat_map(|tls| tls.common.sds_secrets())
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    /// The unix socket (`pipe`) that is a STATIC cluster's one endpoint, as Istio's clusters to
    /// its agent are. Remora reaches a pipe only for the ADS and SDS streams: the cluster has no hosts.
    pub pipe: Option<std::path::PathBuf>,
    /// `alt_stat_name`, else the name: what its stats are named under (`cluster.NAME.*`) and
    /// what `%UPSTREAM_CLUSTER%` prints, as Envoy's observable name.
    pub stats_name: String,
    pub discovery: DiscoveryType,
    pub load_balancing: LoadBalancing,
    pub load_assignment: LoadAssignment,
    pub connect: ConnectOptions,
    pub protocol: UpstreamProtocol,
    /// The DEFAULT priority's circuit breakers.
    pub thresholds: Thresholds,
    /// The HIGH priority circuit breakers, for routes with `priority: HIGH`.
    pub thresholds_high: Thresholds,
    /// `per_host_thresholds.max_connections`: connections to any one host.
    pub per_host_max_connections: Option<u32>,
    pub dns_refresh_rate: Duration,
    /// `respect_dns_ttl`: resolve again when the answer's TTL runs out, not at
    /// `dns_refresh_rate` (kept for a TTL of zero).
    pub respect_dns_ttl: bool,
    pub dns_lookup_family: DnsLookupFamily,
    /// `common_http_protocol_options.max_requests_per_connection` (or the cluster's deprecated
    /// field): requests a connection carries before it is closed.
    pub max_requests_per_connection: Option<u32>,
    /// `common_http_protocol_options.idle_timeout`: an upstream connection unused this long
    /// is closed (Envoy's default 1 h; `None`: never).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_headers_count`, for upstream responses.
    pub max_headers_count: u32,
    pub http2: Http2Options,
    /// Active health checking (at most one checker, as in Envoy). Boxed: it is nearly a
    /// kilobyte, and most clusters of a large config have none.
    pub health_check: Option<Box<HealthCheck>>,
    /// Boxed for the same reason (136 bytes).
    pub outlier_detection: Option<Box<OutlierDetection>>,
    /// `common_lb_config.ignore_new_hosts_until_first_hc`: a new host takes no traffic (and
    /// counts in no availability) until its first health check.
    pub ignore_new_hosts_until_first_hc: bool,
    /// `ignore_health_on_host_removal`: a host EDS or DNS removes goes at once, even while its
    /// health checks pass (by default such a host stays until they fail, as in Envoy).
    pub ignore_health_on_host_removal: bool,
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
        load_balancing_policy,
    } = proto;
    unsupported!(
        path,
        transport_socket_matches,
        per_connection_buffer_limit_bytes,
        upstream_http_protocol_options,
        common_http_protocol_options,
        http_protocol_options,
        dns_jitter,
        dns_failure_refresh_rate,
        dns_resolvers,
        use_tcp_for_dns_lookups,
        cleanup_interval,
        upstream_bind_config,
        metadata,
        protocol_selection,
        close_connections_on_host_health_failure,
        connection_pool_per_downstream_connection,
    );
    // Envoy's default, which Remora follows: an EDS cluster warms before it counts as ready.
    if *wait_for_warm_on_init == Some(false) {
        return err(
            field(path, "wait_for_warm_on_init"),
            "only true is supported",
        );
    }
    if name.is_empty() {
        return err(field(path, "name"), "must not be empty");
    }
    let discovery = discovery(cluster_discovery_type, eds_cluster_config, name, path)?;
    let load_balancing = load_balancing(
        LbFields {
            lb_policy: *lb_policy,
            lb_config,
            common_lb_config,
            load_balancing_policy,
            original_dst: discovery == DiscoveryType::OriginalDst,
        },
        path,
    )?;
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
    let pipe = match assignment {
        Some(cla) => pipe_endpoint(cla, &discovery, &field(path, "load_assignment"))?,
        None => None,
    };
    let load_assignment = match assignment {
        Some(_) if pipe.is_some() => LoadAssignment::default(),
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
            let cpath = field(&kpath, "common_http_protocol_options");
            common_options = common_http_options(&common, &cpath)?;
            let max_stream_duration = common_options.max_stream_duration;
            crate::unsupported_because!(
                &cpath,
                max_stream_duration,
                "is not supported on clusters yet (the route's and the listener's are)"
            );
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
    let (thresholds, thresholds_high, per_host_max_connections) = breakers(circuit_breakers, path)?;
    let dns_refresh_rate = opt_duration(dns_refresh_rate, &field(path, "dns_refresh_rate"))?
        .unwrap_or(Duration::from_secs(5));
    let tls = transport_socket
        .as_ref()
        .filter(|socket| !crate::tls::is_raw_buffer(socket))
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
    let health_check =
        convert_health_checks(health_checks, path, protocol == UpstreamProtocol::Http2)?
            .map(Box::new);
    let outlier_detection = outlier_detection
        .as_ref()
        .map(|od| convert_outlier_detection(od, &field(path, "outlier_detection")).map(Box::new))
        .transpose()?;
    // The rest of `common_lb_config` is read with the load-balancing policy.
    let ignore_new_hosts_until_first_hc = common_lb_config
        .as_ref()
        .is_some_and(|config| config.ignore_new_hosts_until_first_hc);
    Ok(Cluster {
        pipe,
        name: name.clone(),
        stats_name: if alt_stat_name.is_empty() {
            name.clone()
        } else {
            alt_stat_name.clone()
        },
        discovery,
        load_balancing,
        load_assignment,
        connect: ConnectOptions {
            connect_timeout,
            tcp_keepalive,
            tls: tls.map(Box::new),
        },
        protocol,
        thresholds,
        thresholds_high,
        per_host_max_connections,
        dns_refresh_rate: dns_refresh_rate.max(Duration::from_millis(1)),
        respect_dns_ttl: *respect_dns_ttl,
        dns_lookup_family,
        idle_timeout: common_options.idle_timeout,
        max_headers_count: common_options.max_headers_count,
        // The deprecated cluster field, unless the protocol options set it (Envoy's order).
        max_requests_per_connection: common_options
            .max_requests_per_connection
            .or(max_requests_per_connection.filter(|n| *n > 0)),
        http2,
        // Envoy sets the hosts' warm-up flag only when there is a checker to clear it.
        ignore_new_hosts_until_first_hc: ignore_new_hosts_until_first_hc && health_check.is_some(),
        health_check,
        outlier_detection,
        ignore_health_on_host_removal: *ignore_health_on_host_removal,
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

/// The DEFAULT and HIGH thresholds, and the per-host connection limit.
fn breakers(
    proto: &Option<cluster_pb::CircuitBreakers>,
    path: &str,
) -> ConfigResult<(Thresholds, Thresholds, Option<u32>)> {
    let (mut default, mut high) = (Thresholds::default(), Thresholds::default());
    let Some(cluster_pb::CircuitBreakers {
        thresholds,
        per_host_thresholds,
    }) = proto
    else {
        return Ok((default, high, None));
    };
    let bpath = field(path, "circuit_breakers");
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
        unsupported!(&tpath, max_connection_pools);
        let retry_budget = match retry_budget {
            None => None,
            Some(cluster_pb::circuit_breakers::thresholds::RetryBudget {
                budget_percent,
                min_retry_concurrency,
            }) => {
                let percent = budget_percent.as_ref().map_or(20.0, |p| p.value);
                if !(0.0..=100.0).contains(&percent) {
                    return err(
                        field(&field(&tpath, "retry_budget"), "budget_percent"),
                        "must be between 0 and 100",
                    );
                }
                Some(RetryBudget {
                    percent,
                    min_concurrency: min_retry_concurrency.unwrap_or(3),
                })
            }
        };
        let set = Thresholds {
            max_connections: max_connections.unwrap_or(1024),
            max_pending_requests: max_pending_requests.unwrap_or(1024),
            max_requests: max_requests.unwrap_or(1024),
            max_retries: max_retries.unwrap_or(3),
            retry_budget,
            track_remaining: *track_remaining,
        };
        match core_pb::RoutingPriority::try_from(*priority) {
            Ok(core_pb::RoutingPriority::Default) => default = set,
            Ok(core_pb::RoutingPriority::High) => high = set,
            Err(_) => return err(field(&tpath, "priority"), "unknown value"),
        }
    }
    Ok((
        default,
        high,
        per_host_max_connections(per_host_thresholds, &bpath)?,
    ))
}

/// `per_host_thresholds`: as in Envoy, only `max_connections` applies per host.
fn per_host_max_connections(
    list: &[cluster_pb::circuit_breakers::Thresholds],
    path: &str,
) -> ConfigResult<Option<u32>> {
    let mut limit = None;
    for (index, t) in list.iter().enumerate() {
        let tpath = crate::error::item(path, "per_host_thresholds", index);
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
        const ONLY: &str = "only max_connections applies per host";
        crate::unsupported_because!(&tpath, max_pending_requests, ONLY);
        crate::unsupported_because!(&tpath, max_requests, ONLY);
        crate::unsupported_because!(&tpath, max_retries, ONLY);
        crate::unsupported_because!(&tpath, retry_budget, ONLY);
        crate::unsupported_because!(&tpath, track_remaining, ONLY);
        crate::unsupported_because!(&tpath, max_connection_pools, ONLY);
        if *priority != core_pb::RoutingPriority::Default as i32 {
            return err(
                field(&tpath, "priority"),
                "per-host limits apply to DEFAULT priority only",
            );
        }
        limit = Some(max_connections.unwrap_or(1024));
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(extra: &str) -> ConfigResult<Cluster> {
        let yaml = format!(
            "{{name: c, type: STATIC, load_assignment: {{cluster_name: c, endpoints: [{{lb_endpoints: \
             [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 80}}}}, \
             health_check_config: {{port_value: 81, hostname: hc.local}}}}}}]}}]}}, {extra}}}"
        );
        let proto: cluster_pb::Cluster = xds_api::json::from_yaml_str(&yaml).expect("yaml");
        cluster(&proto, "clusters[0]")
    }

    const HC: &str = "{timeout: 1s, interval: 1s, unhealthy_threshold: 2, healthy_threshold: 2, \
                      http_health_check: {path: /hc}}";

    #[test]
    fn health_checks_outlier_detection_and_first_check_warmup_convert() {
        let c = convert(&format!(
            "health_checks: [{HC}], outlier_detection: {{consecutive_5xx: 2}}, \
             common_lb_config: {{ignore_new_hosts_until_first_hc: true}}, \
             ignore_health_on_host_removal: true"
        ))
        .expect("valid");
        assert!(c.health_check.is_some());
        assert_eq!(c.outlier_detection.expect("outlier").consecutive_5xx, 2);
        assert!(c.ignore_new_hosts_until_first_hc && c.ignore_health_on_host_removal);
        let endpoint = &c.load_assignment.endpoints[0];
        assert_eq!(endpoint.health_check().port, Some(81));
        assert_eq!(endpoint.health_check().hostname, "hc.local");
        let addr: SocketAddr = "127.0.0.1:80".parse().expect("addr");
        assert_eq!(endpoint.health_check().target(addr).port(), 81);
        // Without a checker, Envoy never marks hosts as waiting for one.
        let c =
            convert("common_lb_config: {ignore_new_hosts_until_first_hc: true}").expect("valid");
        assert!(!c.ignore_new_hosts_until_first_hc);
    }

    #[test]
    fn refused_fields_are_named() {
        for (extra, want) in [
            (
                format!("health_checks: [{HC}, {HC}]"),
                "clusters[0].health_checks: multiple health checks are not supported",
            ),
            (
                "health_checks: [{timeout: 1s, interval: 1s, unhealthy_threshold: 1, \
                 healthy_threshold: 1, grpc_health_check: {}}]"
                    .to_string(),
                "clusters[0].health_checks[0].grpc_health_check: the cluster must support HTTP/2",
            ),
            (
                "outlier_detection: {max_ejection_percent: 150}".to_string(),
                "clusters[0].outlier_detection.max_ejection_percent: must be ≤ 100",
            ),
            (
                "common_lb_config: {update_merge_window: 1s}".to_string(),
                "clusters[0].common_lb_config.update_merge_window: only 0s is supported",
            ),
            (
                "common_lb_config: {close_connections_on_host_set_change: true}".to_string(),
                "clusters[0].common_lb_config.close_connections_on_host_set_change: field is not \
                 supported",
            ),
        ] {
            let error = convert(&extra).expect_err(&extra).to_string();
            assert!(error.contains(want), "{extra}: {error}");
        }
        let http2 = convert(
            "typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: \
             {\"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, \
             explicit_http_config: {http2_protocol_options: {}}}}, health_checks: [{timeout: 1s, \
             interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, grpc_health_check: \
             {service_name: s}}]",
        );
        assert!(http2.is_ok(), "{http2:?}");
    }
}
