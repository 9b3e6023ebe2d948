//! Pure functions from the mesh model (and the effective policy of a service port) to Envoy
//! resources, in the order a sidecar uses them:
//!
//! - [`listener`]: the outbound capture listener (15001) with a filter chain per service port
//!   (or a listener per `VIP:port`) and a passthrough for unknown destinations; the inbound
//!   capture listener (15006) with a filter chain per app port;
//! - [`route`]: per HTTP service port, a route configuration matching the service's host names;
//! - [`cluster`]: per service port, an EDS cluster with the policy's load balancing, circuit
//!   breakers, outlier detection and TLS; the passthrough and inbound clusters;
//! - [`endpoints`]: per service port, the ClusterLoadAssignment from its endpoint sets.
//!
//! Nothing here keeps state; the generator (`mesh::generate`) decides what to rebuild.

pub mod cluster;
pub mod endpoints;
pub mod listener;
pub mod route;

use std::net::IpAddr;

use prost::Message;
use xds_api::envoy::config::core::v3::address::Address as AddressKind;
use xds_api::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use xds_api::envoy::config::core::v3::socket_address::PortSpecifier;
use xds_api::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, CidrRange, ConfigSource, SocketAddress,
    TransportSocket, transport_socket,
};
use xds_api::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig;

/// How outbound service ports reach the sidecar's listeners.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboundLayout {
    /// One filter chain per service port inside the outbound capture listener, matched on the
    /// original destination (`VIP/32`, port). Accepted by Remora and Envoy alike.
    #[default]
    CaptureChains,
    /// One listener per `VIP:port` with `bind_to_port: false`, handed the connections the
    /// capture listener receives (`use_original_dst`), as Envoy meshes usually do. Needs a
    /// proxy that honours `bind_to_port: false` (Envoy; not yet Remora).
    PortListeners,
}

/// Settings of the generator that are not per policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshSettings {
    /// The cluster's DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// The mesh defaults (retries with a budget, outlier detection, lifted circuit breakers;
    /// see docs/mesh.md); on unless `--no-mesh-defaults`.
    pub mesh_defaults: bool,
    pub outbound_layout: OutboundLayout,
    /// The SPIFFE trust domain of workload identities (`cluster.local`).
    pub trust_domain: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            cluster_domain: "cluster.local".to_string(),
            mesh_defaults: true,
            outbound_layout: OutboundLayout::CaptureChains,
            trust_domain: "cluster.local".to_string(),
        }
    }
}

/// `ip:port` as an Envoy address.
pub fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// The whole-host CIDR of an address (`/32` or `/128`).
pub fn host_cidr(ip: IpAddr) -> CidrRange {
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(if ip.is_ipv4() { 32 } else { 128 }),
    }
}

/// `{ads: {}, resource_api_version: V3}`: everything comes over the one ADS stream.
pub fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// An `Any` with Envoy's type URL.
pub fn typed<M: Message + prost::Name>(message: &M) -> prost_types::Any {
    xds_api::any::pack(message)
}

/// An SDS reference to a secret served over ADS.
pub fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads()),
    }
}

/// The TLS transport socket around a TLS context.
pub fn tls_socket<M: Message + prost::Name>(context: &M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(typed(context))),
    }
}

/// Envoy's zero duration: disables the timeout it is given to.
pub fn disabled() -> prost_types::Duration {
    prost_types::Duration {
        seconds: 0,
        nanos: 0,
    }
}
