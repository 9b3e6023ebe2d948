//! Configuration: Envoy's v3 bootstrap and xDS resources converted into a typed, validated model.
//!
//! The flow is proto → [`strict`] (every set field must be one Remora honours, else an error
//! naming its path) → [`convert`] (typed model, values checked) → snapshot used by the data path.
//! Nothing on the request path ever looks at a proto.

pub mod bootstrap;
pub mod convert;
pub mod strict;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use crate::http::router::RouteTable;

/// A config that cannot be honoured: the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

pub type ConfigResult<T> = Result<T, ConfigError>;

/// A resource as it was configured, kept encoded for `/config_dump`. Rendering it as JSON
/// needs the reflection pool; keeping the bytes instead of a JSON tree lets the pool exist only
/// while a dump is being rendered, and is several times smaller.
#[derive(Clone, PartialEq, Eq)]
pub struct RawConfig {
    full_name: String,
    bytes: bytes::Bytes,
}

impl RawConfig {
    pub fn of<M: prost::Message + prost::Name>(message: &M) -> Self {
        RawConfig {
            full_name: M::full_name(),
            bytes: message.encode_to_vec().into(),
        }
    }

    /// Proto3 JSON with Envoy's conventions; `null` if it cannot be rendered.
    pub fn to_json(&self) -> serde_json::Value {
        xds_api::json::encoded_to_value(&self.full_name, &self.bytes)
            .unwrap_or(serde_json::Value::Null)
    }
}

impl std::fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} bytes)", self.full_name, self.bytes.len())
    }
}

/// The whole bootstrap, validated.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub node: Node,
    pub admin: Option<SocketAddr>,
    /// `admin.ignore_global_conn_limit`: admin connections neither count towards nor are
    /// refused by `global_downstream_max_connections` (by default they do and are, as in Envoy).
    pub admin_ignores_global_limit: bool,
    pub listeners: Vec<Arc<Listener>>,
    pub clusters: Vec<Arc<Cluster>>,
    pub dynamic: Option<DynamicResources>,
    pub runtime: Runtime,
    /// The bootstrap as loaded, for `/config_dump`.
    pub raw: RawConfig,
}

/// The `layered_runtime` keys Remora acts on, after the layers are merged (later wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runtime {
    /// `envoy.resource_limits.listener.NAME.connection_limit`, by listener name.
    pub listener_connection_limits: std::collections::HashMap<String, u64>,
    /// `overload.global_downstream_max_connections`: across all listeners.
    pub global_max_connections: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    /// The node as given (metadata, locality), sent to the control plane.
    pub proto: xds_api::envoy::config::core::v3::Node,
}

/// Which protocol variant the ADS stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsFlavor {
    StateOfTheWorld,
    Delta,
}

#[derive(Debug, Clone)]
pub struct DynamicResources {
    pub ads_cluster: String,
    pub flavor: AdsFlavor,
    pub lds: Option<ConfigSource>,
    pub cds: Option<ConfigSource>,
}

/// An `ads: {}` config source with its initial fetch timeout (zero: wait forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSource {
    pub initial_fetch_timeout: Duration,
}

impl Default for ConfigSource {
    fn default() -> Self {
        ConfigSource {
            initial_fetch_timeout: Duration::from_secs(15),
        }
    }
}

// === Listeners ===

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
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
    /// The resource as received, for `/config_dump`; equal bytes tell a resend from an update.
    pub raw: RawConfig,
}

#[derive(Debug, Clone)]
pub struct CidrRange {
    pub addr: std::net::IpAddr,
    pub len: u8,
}

impl CidrRange {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                (u32::from(net) & mask) == (u32::from(ip) & mask)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                (u128::from(net) & mask) == (u128::from(ip) & mask)
            }
            (IpAddr::V6(net), IpAddr::V4(ip)) => net.to_ipv4_mapped().is_some_and(|net| {
                self.len >= 96
                    && CidrRange {
                        addr: net.into(),
                        len: self.len - 96,
                    }
                    .contains(ip.into())
            }),
            _ => false,
        }
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
    pub filter: NetworkFilter,
    /// TLS termination (`transport_socket` with a DownstreamTlsContext).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

#[derive(Debug, Clone)]
pub enum NetworkFilter {
    TcpProxy(Arc<TcpProxy>),
    Http(Arc<HttpConnectionManager>),
}

// === L4 ===

#[derive(Debug, Clone)]
pub struct WeightedName {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub enum TcpClusters {
    One(String),
    Weighted(Vec<WeightedName>),
}

#[derive(Debug, Clone)]
pub struct TcpProxy {
    pub stat_prefix: String,
    pub clusters: TcpClusters,
    /// `None`: disabled (Envoy's 0s); default 1 h.
    pub idle_timeout: Option<Duration>,
    pub max_connect_attempts: u32,
}

// === L7 ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub enum RouteSource {
    Inline(Arc<RouteTable>),
    Rds { name: String, source: ConfigSource },
}

#[derive(Debug, Clone)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub codec: Codec,
    pub routes: RouteSource,
    pub server_name: String,
    pub use_remote_address: bool,
    pub skip_xff_append: bool,
    pub xff_num_trusted_hops: u32,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    pub request_timeout: Option<Duration>,
    pub stream_idle_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub request_headers_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    pub http2: Http2Options,
    pub upgrades: Vec<String>,
    /// The CORS filter is in `http_filters` (before the router).
    pub cors: bool,
    pub strip_any_host_port: bool,
    pub strip_matching_host_port: bool,
    pub access_logs: Vec<crate::http::access_log::AccessLogConfig>,
    /// `access_logs` bound to their writer threads on the first connection, then shared by
    /// every connection while this config is in use (a file is opened once, not per
    /// connection).
    pub active_logs: std::sync::OnceLock<Arc<[crate::http::access_log::ActiveLog]>>,
}

/// The `Http2ProtocolOptions` Remora applies, downstream (HCM) and upstream (cluster). A
/// window or stream limit left unset keeps hyper's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Http2Options {
    pub max_concurrent_streams: Option<u32>,
    pub initial_stream_window_size: Option<u32>,
    pub initial_connection_window_size: Option<u32>,
    /// `connection_keepalive`: PING every `interval`, close when none is answered in `timeout`.
    pub keepalive: Option<Http2Keepalive>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

// === Clusters ===

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
    OriginalDst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
    Timeout,
    Degraded,
}

impl HealthStatus {
    pub fn usable(self) -> bool {
        matches!(
            self,
            HealthStatus::Unknown | HealthStatus::Healthy | HealthStatus::Degraded
        )
    }
    pub fn name(self) -> &'static str {
        match self {
            HealthStatus::Unknown => "UNKNOWN",
            HealthStatus::Healthy => "HEALTHY",
            HealthStatus::Unhealthy => "UNHEALTHY",
            HealthStatus::Draining => "DRAINING",
            HealthStatus::Timeout => "TIMEOUT",
            HealthStatus::Degraded => "DEGRADED",
        }
    }
}

/// Where an endpoint lives: an IP, or a name to resolve (STRICT_DNS, LOGICAL_DNS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(SocketAddr),
    Dns { host: String, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbEndpoint {
    pub address: EndpointAddress,
    pub hostname: String,
    pub weight: u32,
    pub health: HealthStatus,
    pub priority: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadAssignment {
    pub endpoints: Vec<LbEndpoint>,
}

/// Circuit breakers (the DEFAULT priority's; Envoy's defaults). `max_connections` and
/// `max_pending_requests` are enforced by the pool, `max_requests` by the connection manager.
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

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub discovery: DiscoveryType,
    pub connect_timeout: Duration,
    pub load_assignment: LoadAssignment,
    pub protocol: UpstreamProtocol,
    pub thresholds: Thresholds,
    /// The HIGH priority circuit breakers, shown by `/clusters` (no route uses HIGH).
    pub thresholds_high: Thresholds,
    pub dns_refresh_rate: Duration,
    pub dns_lookup_family: DnsLookupFamily,
    pub tcp_keepalive: bool,
    /// `common_http_protocol_options.idle_timeout`: an upstream connection unused this long
    /// is closed (Envoy's default 1 h; `None`: never).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_headers_count`, for upstream responses.
    pub max_headers_count: u32,
    pub http2: Http2Options,
    /// TLS origination (`transport_socket` with an UpstreamTlsContext).
    pub tls: Option<crate::tls::UpstreamTls>,
    pub raw: RawConfig,
}
