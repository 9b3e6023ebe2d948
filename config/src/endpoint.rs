//! Endpoints (`ClusterLoadAssignment`): each host's address, weight, EDS health, priority and
//! locality, for a cluster's inline `load_assignment` or an EDS resource.

use std::sync::Arc;

use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::endpoint::v3 as endpoint_pb;

use crate::common::{EndpointAddress, endpoint_address, socket_address};
use crate::error::{ConfigResult, err, field, item};
use crate::unsupported;

/// Envoy's default overprovisioning factor (percent): a priority with 72% of its hosts healthy
/// still takes all of its load.
pub const DEFAULT_OVERPROVISIONING: u32 = 140;

/// An endpoint's health as EDS reports it.
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

/// Where hosts are: region, zone and sub-zone (all empty when not given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

pub fn locality(proto: &core_pb::Locality) -> Locality {
    let core_pb::Locality {
        region,
        zone,
        sub_zone,
    } = proto;
    Locality {
        region: region.clone(),
        zone: zone.clone(),
        sub_zone: sub_zone.clone(),
    }
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbEndpoint {
    pub address: EndpointAddress,
    pub hostname: String,
    pub weight: u32,
    pub health: HealthStatus,
    pub priority: u32,
    pub locality: Arc<Locality>,
    /// The locality's `load_balancing_weight`; used only with locality weighted balancing
    /// (`locality_weighted_lb_config`), as in Envoy.
    pub locality_weight: Option<u32>,
    /// `endpoint.health_check_config`; `None` when it says nothing (most endpoints: shared
    /// and optional, it costs them 8 bytes in each copy instead of 72).
    pub health_check_config: Option<Arc<EndpointHealthCheck>>,
}

impl LbEndpoint {
    /// Where and how active health checks reach this endpoint.
    pub fn health_check(&self) -> &EndpointHealthCheck {
        self.health_check_config
            .as_deref()
            .unwrap_or(EndpointHealthCheck::none())
    }
}

/// Where and how active health checks reach one endpoint (`Endpoint.HealthCheckConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointHealthCheck {
    /// `port_value`: checks go to this port instead of the endpoint's.
    pub port: Option<u16>,
    /// `address`: checks go to this address instead of the endpoint's.
    pub address: Option<std::net::SocketAddr>,
    /// `hostname`: the `Host` (or gRPC `:authority`) of this endpoint's checks.
    pub hostname: String,
    /// `disable_active_health_check`: this endpoint is never probed.
    pub disabled: bool,
}

/// Checks go to the endpoint's own address, with no host name of their own.
static DEFAULT_HEALTH_CHECK: EndpointHealthCheck = EndpointHealthCheck {
    port: None,
    address: None,
    hostname: String::new(),
    disabled: false,
};

impl EndpointHealthCheck {
    /// What an endpoint without `health_check_config` has.
    pub fn none() -> &'static EndpointHealthCheck {
        &DEFAULT_HEALTH_CHECK
    }

    /// The address checks go to, for an endpoint at `addr`.
    pub fn target(&self, addr: std::net::SocketAddr) -> std::net::SocketAddr {
        let mut target = self.address.unwrap_or(addr);
        if let Some(port) = self.port {
            target.set_port(port);
        }
        target
    }
}

/// A cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadAssignment {
    pub endpoints: Vec<LbEndpoint>,
    /// `policy.overprovisioning_factor` (percent).
    pub overprovisioning: u32,
}

impl Default for LoadAssignment {
    fn default() -> Self {
        LoadAssignment {
            endpoints: Vec::new(),
            overprovisioning: DEFAULT_OVERPROVISIONING,
        }
    }
}

/// An EDS `ClusterLoadAssignment` resource (IP addresses only).
pub fn resource(proto: &endpoint_pb::ClusterLoadAssignment) -> ConfigResult<LoadAssignment> {
    if proto.cluster_name.is_empty() {
        return err("cluster_name", "must not be empty");
    }
    load_assignment(proto, "", false)
}

/// A `ClusterLoadAssignment`; `allow_dns`: host names are allowed (STRICT_DNS, LOGICAL_DNS).
pub fn load_assignment(
    proto: &endpoint_pb::ClusterLoadAssignment,
    path: &str,
    allow_dns: bool,
) -> ConfigResult<LoadAssignment> {
    let endpoint_pb::ClusterLoadAssignment {
        cluster_name: _,
        endpoints: localities,
        named_endpoints,
        policy,
    } = proto;
    unsupported!(path, named_endpoints);
    let mut overprovisioning = DEFAULT_OVERPROVISIONING;
    if let Some(endpoint_pb::cluster_load_assignment::Policy {
        drop_overloads,
        overprovisioning_factor,
        endpoint_stale_after,
        weighted_priority_health,
    }) = policy
    {
        let ppath = field(path, "policy");
        unsupported!(
            &ppath,
            drop_overloads,
            endpoint_stale_after,
            weighted_priority_health
        );
        match overprovisioning_factor {
            Some(0) => return err(field(&ppath, "overprovisioning_factor"), "must be ≥ 1"),
            Some(factor) => overprovisioning = *factor,
            None => {}
        }
    }
    let mut endpoints = Vec::new();
    for (li, group) in localities.iter().enumerate() {
        let lpath = item(path, "endpoints", li);
        let endpoint_pb::LocalityLbEndpoints {
            locality: group_locality,
            metadata,
            lb_endpoints,
            load_balancing_weight,
            priority,
            proximity,
        } = group;
        unsupported!(&lpath, metadata, proximity);
        if *priority > 128 {
            return err(field(&lpath, "priority"), "must be ≤ 128");
        }
        if *load_balancing_weight == Some(0) {
            return err(field(&lpath, "load_balancing_weight"), "must be ≥ 1");
        }
        let group_locality = Arc::new(group_locality.as_ref().map(locality).unwrap_or_default());
        for (ei, lb) in lb_endpoints.iter().enumerate() {
            let epath = item(&lpath, "lb_endpoints", ei);
            let endpoint_pb::LbEndpoint {
                health_status,
                metadata,
                load_balancing_weight: weight,
                host_identifier,
            } = lb;
            unsupported!(&epath, metadata);
            let endpoint = match host_identifier {
                Some(endpoint_pb::lb_endpoint::HostIdentifier::Endpoint(endpoint)) => endpoint,
                Some(endpoint_pb::lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    return err(
                        field(&epath, "endpoint_name"),
                        "named endpoints are not supported",
                    );
                }
                None => return err(field(&epath, "endpoint"), "endpoint is required"),
            };
            let endpoint_pb::Endpoint {
                address,
                health_check_config,
                hostname,
                additional_addresses,
            } = endpoint;
            let endpoint_path = field(&epath, "endpoint");
            unsupported!(&endpoint_path, additional_addresses);
            let health_check_config = health_check_config
                .as_ref()
                .map(|config| {
                    endpoint_health_check(config, &field(&endpoint_path, "health_check_config"))
                })
                .transpose()?
                .filter(|check| check != EndpointHealthCheck::none())
                .map(Arc::new);
            let address = endpoint_address(address, &field(&endpoint_path, "address"))?;
            if matches!(address, EndpointAddress::Dns { .. }) && !allow_dns {
                return err(
                    format!("{endpoint_path}.address.socket_address.address"),
                    "must be an IP address (names only in STRICT_DNS and LOGICAL_DNS clusters)",
                );
            }
            let weight = match weight {
                Some(0) => return err(field(&epath, "load_balancing_weight"), "must be ≥ 1"),
                Some(w) => *w,
                None => 1,
            };
            let health = match core_pb::HealthStatus::try_from(*health_status) {
                Ok(core_pb::HealthStatus::Unknown) => HealthStatus::Unknown,
                Ok(core_pb::HealthStatus::Healthy) => HealthStatus::Healthy,
                Ok(core_pb::HealthStatus::Unhealthy) => HealthStatus::Unhealthy,
                Ok(core_pb::HealthStatus::Draining) => HealthStatus::Draining,
                Ok(core_pb::HealthStatus::Timeout) => HealthStatus::Timeout,
                Ok(core_pb::HealthStatus::Degraded) => HealthStatus::Degraded,
                Err(_) => return err(field(&epath, "health_status"), "unknown value"),
            };
            let hostname = match (&address, hostname.is_empty()) {
                (_, false) => hostname.clone(),
                (EndpointAddress::Dns { host, .. }, true) => host.clone(),
                _ => String::new(),
            };
            endpoints.push(LbEndpoint {
                address,
                hostname,
                weight,
                health,
                priority: *priority,
                locality: group_locality.clone(),
                locality_weight: *load_balancing_weight,
                health_check_config,
            });
        }
    }
    // Kept for the cluster's life: no spare capacity (one endpoint would hold room for four).
    endpoints.shrink_to_fit();
    Ok(LoadAssignment {
        endpoints,
        overprovisioning,
    })
}

fn endpoint_health_check(
    proto: &endpoint_pb::endpoint::HealthCheckConfig,
    path: &str,
) -> ConfigResult<EndpointHealthCheck> {
    let endpoint_pb::endpoint::HealthCheckConfig {
        port_value,
        hostname,
        address,
        disable_active_health_check,
    } = proto;
    let port =
        match *port_value {
            0 => None,
            port => Some(u16::try_from(port).map_err(|_| {
                crate::ConfigError::new(field(path, "port_value"), "must be ≤ 65535")
            })?),
        };
    let address = address
        .is_some()
        .then(|| socket_address(address, &field(path, "address")))
        .transpose()?;
    if !hostname.is_empty() && http::HeaderValue::from_str(hostname).is_err() {
        return err(field(path, "hostname"), "not a valid header value");
    }
    Ok(EndpointHealthCheck {
        port,
        address,
        hostname: hostname.clone(),
        disabled: *disable_active_health_check,
    })
}
