//! The REST source of the mesh: mesh objects as the REST API stores them (JSON bodies, redb or
//! etcd), and the model update each one stands for. The API checks and writes these bodies
//! ([`crate::mesh::rest`]); the hub turns every commit's objects into updates
//! ([`to_update`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::mesh::model::{
    EndpointAddress, EndpointHealth, EndpointSet, MeshUpdate, NamespaceSettings, ObjectKey,
    PolicyObject, Protocol, Service, ServicePort, Source,
};
use crate::mesh::policy::TrafficPolicySpec;
use crate::store::{MeshKey, MeshKind};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceBody {
    /// The virtual IP callers use; none for a service reached only by its endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
    pub ports: Vec<ServicePortBody>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortBody {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    /// http, http2 or tcp; from the port name's prefix when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointsBody {
    /// Service port name → port number on the endpoints.
    pub ports: BTreeMap<String, u16>,
    pub endpoints: Vec<EndpointBody>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointBody {
    pub address: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
    /// The pod (sidecar) serving it, in the service's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceBody {
    /// Namespaces whose services this namespace's sidecars receive (besides their own);
    /// unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<Vec<String>>,
}

/// A TrafficPolicy as stored: its spec and a generation counted per write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredPolicy {
    pub(crate) generation: i64,
    pub(crate) spec: TrafficPolicySpec,
}

/// The model update a stored REST object stands for (`None`: it was deleted).
pub fn to_update(key: &MeshKey, bytes: Option<&[u8]>) -> Result<MeshUpdate, String> {
    let object = ObjectKey::new(&key.namespace, &key.name);
    let read = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).map_err(|e| e.to_string());
    Ok(match key.kind {
        MeshKind::Namespace => {
            let settings = match bytes {
                Some(bytes) => {
                    let body: NamespaceBody =
                        serde_json::from_value(read(bytes)?).map_err(|e| e.to_string())?;
                    Some(NamespaceSettings {
                        reach: body.reach.map(|list| list.into_iter().collect()),
                    })
                }
                None => None,
            };
            MeshUpdate::Namespace(Source::Rest, key.name.clone(), settings)
        }
        MeshKind::Service => {
            let service = match bytes {
                Some(bytes) => {
                    let body: ServiceBody =
                        serde_json::from_value(read(bytes)?).map_err(|e| e.to_string())?;
                    Some(Service {
                        key: object.clone(),
                        vip: body.vip,
                        ports: body
                            .ports
                            .iter()
                            .map(|port| ServicePort {
                                name: port.name.clone(),
                                port: port.port,
                                protocol: port
                                    .protocol
                                    .unwrap_or_else(|| Protocol::detect(None, &port.name)),
                                target_port: None,
                            })
                            .collect(),
                        selector: None,
                    })
                }
                None => None,
            };
            MeshUpdate::Service(Source::Rest, object, service)
        }
        MeshKind::Endpoints => {
            let set = match bytes {
                Some(bytes) => {
                    let body: EndpointsBody =
                        serde_json::from_value(read(bytes)?).map_err(|e| e.to_string())?;
                    Some(EndpointSet {
                        service: object.clone(),
                        ports: body.ports,
                        endpoints: body
                            .endpoints
                            .iter()
                            .map(|endpoint| EndpointAddress {
                                address: endpoint.address,
                                zone: endpoint.zone.clone(),
                                health: EndpointHealth::from_conditions(
                                    endpoint.ready,
                                    endpoint.serving,
                                    endpoint.terminating,
                                ),
                                workload: endpoint
                                    .workload
                                    .as_ref()
                                    .map(|name| ObjectKey::new(&key.namespace, name)),
                            })
                            .collect(),
                    })
                }
                None => None,
            };
            MeshUpdate::Endpoints(Source::Rest, object, "rest".to_string(), set)
        }
        MeshKind::TrafficPolicy => {
            let policy = match bytes {
                Some(bytes) => {
                    let stored: StoredPolicy =
                        serde_json::from_value(read(bytes)?).map_err(|e| e.to_string())?;
                    Some(PolicyObject {
                        key: object.clone(),
                        generation: stored.generation,
                        spec: stored.spec,
                    })
                }
                None => None,
            };
            MeshUpdate::Policy(Source::Rest, object, policy)
        }
    })
}
