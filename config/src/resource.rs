//! xDS resources as they arrive on the wire: each passes the wire gate on its bytes (before
//! prost drops what our protos do not declare), is decoded and converted. The proxy applies
//! the result; a control plane calls [`check`] to learn whether a Remora proxy would accept a
//! resource, and why not.

use prost::Message;
use xds_api::envoy::config::cluster::v3 as cluster_pb;
use xds_api::envoy::config::endpoint::v3 as endpoint_pb;
use xds_api::envoy::config::listener::v3 as listener_pb;
use xds_api::envoy::config::route::v3 as route_pb;
use xds_api::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use xds_api::type_urls;

use crate::error::{ConfigError, ConfigResult, err};
use crate::route::Files;

fn decode<M: Message + prost::Name + Default>(bytes: &[u8]) -> ConfigResult<M> {
    crate::gate::check_bytes(&M::full_name(), bytes, "")?;
    M::decode(bytes)
        .map_err(|e| ConfigError::new("", format!("cannot decode {}: {e}", M::full_name())))
}

pub fn listener(bytes: &[u8], files: Files) -> ConfigResult<crate::listener::Listener> {
    crate::listener::listener(&decode::<listener_pb::Listener>(bytes)?, "", files)
}

pub fn cluster(bytes: &[u8]) -> ConfigResult<crate::cluster::Cluster> {
    crate::cluster::cluster(&decode::<cluster_pb::Cluster>(bytes)?, "")
}

pub fn route_table(bytes: &[u8], files: Files) -> ConfigResult<crate::route::RouteTable> {
    crate::route::route_table(&decode::<route_pb::RouteConfiguration>(bytes)?, "", files)
}

pub fn load_assignment(bytes: &[u8]) -> ConfigResult<(String, crate::endpoint::LoadAssignment)> {
    let proto = decode::<endpoint_pb::ClusterLoadAssignment>(bytes)?;
    Ok((
        proto.cluster_name.clone(),
        crate::endpoint::resource(&proto)?,
    ))
}

pub fn secret(bytes: &[u8]) -> ConfigResult<crate::tls::Secret> {
    crate::tls::secret(&decode::<tls_pb::Secret>(bytes)?, "")
}

/// The name a resource of `type_url` carries (decoding only what is needed to find it).
pub fn name(type_url: &str, bytes: &[u8]) -> Result<String, String> {
    let decoded = match type_url {
        type_urls::CLUSTER => cluster_pb::Cluster::decode(bytes).map(|c| c.name),
        type_urls::CLUSTER_LOAD_ASSIGNMENT => {
            endpoint_pb::ClusterLoadAssignment::decode(bytes).map(|c| c.cluster_name)
        }
        type_urls::LISTENER => listener_pb::Listener::decode(bytes).map(|l| l.name),
        type_urls::ROUTE_CONFIGURATION => {
            route_pb::RouteConfiguration::decode(bytes).map(|r| r.name)
        }
        type_urls::SECRET => tls_pb::Secret::decode(bytes).map(|s| s.name),
        _ => return Err(format!("Remora does not take resources of type {type_url}")),
    };
    decoded.map_err(|e| format!("cannot decode {}: {e}", type_urls::message_name(type_url)))
}

/// Whether a Remora proxy would accept this resource on its own (references to other resources
/// are not followed, and files named in it are not read: they are the proxy's).
pub fn check(type_url: &str, bytes: &[u8]) -> ConfigResult<()> {
    match type_url {
        type_urls::LISTENER => listener(bytes, Files::Skip).map(drop),
        type_urls::CLUSTER => cluster(bytes).map(drop),
        type_urls::ROUTE_CONFIGURATION => route_table(bytes, Files::Skip).map(drop),
        type_urls::CLUSTER_LOAD_ASSIGNMENT => load_assignment(bytes).map(drop),
        type_urls::SECRET => secret(bytes).map(drop),
        other => err(
            "",
            format!("Remora does not take resources of type {other}"),
        ),
    }
}
