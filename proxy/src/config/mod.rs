//! Configuration: the model (the `remora-config` crate, re-exported here) and where the
//! bootstrap comes from ([`sources`]: `-c FILE`, `--config-yaml`, `--bootstrap-from-env`).
//!
//! The flow is proto → wire gate and conversion (`remora-config`: every set field must be one
//! Remora honours, else an error naming its path) → model → built into runtime state by the
//! part that uses it (TLS contexts by [`crate::tls`], listeners by [`crate::listener`], clusters
//! by [`crate::upstream`]). Nothing on the request path ever looks at a proto.

pub mod sources;

pub use remora_config::access_log::{AccessLogConfig, LogFormat, Target, Token};
pub use remora_config::bootstrap::{Admin, AdsFlavor, Bootstrap, DynamicResources, Node, Runtime};
pub use remora_config::cluster::{
    Cluster, ConnectOptions, DiscoveryType, DnsLookupFamily, RetryBudget, Thresholds,
    UpstreamProtocol,
};
pub use remora_config::common::{
    CidrRange, ConfigSource, EndpointAddress, Http1Options, Http2Keepalive, Http2Options,
    TcpKeepalive,
};
pub use remora_config::endpoint::{
    DEFAULT_OVERPROVISIONING, EndpointHealthCheck, HealthStatus, LbEndpoint, LoadAssignment,
    Locality,
};
pub use remora_config::hash_policy::{CookieHash, HashPolicy, HashSource};
pub use remora_config::hcm::{Codec, HttpConnectionManager, RouteSource};
pub use remora_config::health_check::{
    GrpcProbe, HealthCheck, HttpProbe, Probe, ProbeProtocol, TcpProbe,
};
pub use remora_config::listener::{
    FilterChain, FilterChainMatch, Listener, NetworkFilter, SourceType,
};
pub use remora_config::load_balancing::{
    HashFunction, LbPolicy, LeastRequest, LoadBalancing, Maglev, PeakEwma, RingHash, SlowStart,
};
pub use remora_config::outlier::OutlierDetection;
pub use remora_config::route::{Files, RouteTable};
pub use remora_config::tcp_proxy::{TcpClusters, TcpProxy, WeightedName};
pub use remora_config::tls::SecretSource;
pub use remora_config::{ConfigError, ConfigResult, RawConfig, resource};
