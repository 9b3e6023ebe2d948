//! Endpoints: the ClusterLoadAssignment of one service port from its endpoint sets
//! (EndpointSlices). Ready endpoints are HEALTHY, serving-but-terminating ones DRAINING, the
//! rest left out; one locality per zone.

use std::collections::BTreeMap;
use std::net::IpAddr;

use xds_api::envoy::config::core::v3::{HealthStatus, Locality};
use xds_api::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use xds_api::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};

use crate::mesh::model::{EndpointHealth, EndpointSet};
use crate::mesh::translate::socket_address;

/// The assignment named `name` for the service port named `port_name`.
pub fn load_assignment(
    name: &str,
    port_name: &str,
    sets: &[&EndpointSet],
) -> ClusterLoadAssignment {
    // (address, port) → (health, zone); an address listed twice (two slices during a
    // handover) counts once, healthy first.
    let mut hosts: BTreeMap<(IpAddr, u16), (EndpointHealth, Option<&str>)> = BTreeMap::new();
    for set in sets {
        let Some(&port) = set.ports.get(port_name) else {
            continue;
        };
        for endpoint in &set.endpoints {
            if endpoint.health == EndpointHealth::Unready {
                continue;
            }
            let entry = (endpoint.health, endpoint.zone.as_deref());
            hosts
                .entry((endpoint.address, port))
                .and_modify(|known| {
                    if entry.0 < known.0 {
                        *known = entry;
                    }
                })
                .or_insert(entry);
        }
    }
    let mut zones: BTreeMap<Option<&str>, Vec<LbEndpoint>> = BTreeMap::new();
    for ((address, port), (health, zone)) in hosts {
        zones.entry(zone).or_default().push(LbEndpoint {
            health_status: match health {
                EndpointHealth::Healthy => HealthStatus::Healthy,
                EndpointHealth::Draining | EndpointHealth::Unready => HealthStatus::Draining,
            } as i32,
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(&address.to_string(), port)),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: zones
            .into_iter()
            .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                locality: zone.map(|zone| Locality {
                    zone: zone.to_string(),
                    ..Default::default()
                }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
