//! The mesh as the generator sees it, whatever it came from (the Kubernetes source or the
//! REST API): namespaces, services and their ports, the endpoints behind them, workloads (the
//! pods a sidecar runs in) and traffic policies. Plain data; the sources fill it (one
//! [`MeshUpdate`] at a time), the translation reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::mesh::policy::TrafficPolicySpec;

/// A namespaced object: a service, a workload or a policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    /// `name.namespace`, the way the injector names a sidecar's node.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// How a port's traffic is proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 with prior knowledge from the client) to an HTTP/1.1 upstream.
    Http,
    /// HTTP/2 end to end (h2c, gRPC).
    Http2,
    /// Opaque TCP.
    Tcp,
}

impl Protocol {
    /// Kubernetes' `appProtocol` first, then the port name's prefix (`http`, `http-web`,
    /// `http2`, `grpc-api`, `h2c`), else TCP: the conventions meshes share.
    pub fn detect(app_protocol: Option<&str>, port_name: &str) -> Protocol {
        if let Some(app) = app_protocol {
            return match app.to_ascii_lowercase().as_str() {
                "http" => Protocol::Http,
                "http2" | "h2c" | "grpc" | "kubernetes.io/h2c" => Protocol::Http2,
                _ => Protocol::Tcp,
            };
        }
        let name = port_name.to_ascii_lowercase();
        let prefix = name.split('-').next().unwrap_or_default();
        match prefix {
            "http" => Protocol::Http,
            "http2" | "h2c" | "grpc" => Protocol::Http2,
            _ => Protocol::Tcp,
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2)
    }
}

/// Where a service port's traffic goes on a selected pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    Number(u16),
    /// A container port's name.
    Name(String),
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Matches the port name of the endpoints; may be empty for a single-port service.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// On the pods its selector picks; `None` when the service has no selector.
    pub target_port: Option<TargetPort>,
}

/// A service: a stable virtual IP (none for headless services) and its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    pub vip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// The labels of the pods behind it (Kubernetes); `None` when endpoints are managed
    /// directly. Lets a pod's sidecar know its app ports before the endpoints list it.
    pub selector: Option<BTreeMap<String, String>>,
}

impl Service {
    /// Whether the selector picks a pod with `labels`.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_some_and(|selector| {
            !selector.is_empty()
                && selector
                    .iter()
                    .all(|(key, value)| labels.get(key) == Some(value))
        })
    }
}

/// Whether an endpoint takes new traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointHealth {
    /// Ready: takes new requests.
    Healthy,
    /// Terminating but still serving: finishes what it has, gets new requests only when no
    /// healthy endpoint is left.
    Draining,
    /// Not ready (starting, failing its readiness probe, or terminated): gets no traffic,
    /// but its pod's sidecar already gets its inbound listener.
    Unready,
}

impl EndpointHealth {
    /// EndpointSlice conditions → health. Unset conditions mean ready (Kubernetes' rule for
    /// consumers); `serving` defaults to `ready`.
    pub fn from_conditions(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> EndpointHealth {
        let ready = ready.unwrap_or(true);
        let serving = serving.unwrap_or(ready);
        let terminating = terminating.unwrap_or(false);
        if ready && !terminating {
            EndpointHealth::Healthy
        } else if serving && terminating {
            EndpointHealth::Draining
        } else {
            EndpointHealth::Unready
        }
    }
}

/// One address behind a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointAddress {
    pub address: IpAddr,
    pub zone: Option<String>,
    pub health: EndpointHealth,
    /// The workload (pod) serving it, if known: its sidecar gets an inbound chain per port.
    pub workload: Option<ObjectKey>,
}

/// A group of endpoints sharing one set of ports: one EndpointSlice, or one REST endpoints
/// object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    pub service: ObjectKey,
    /// Port name (as in the service) → port number on the endpoints.
    pub ports: BTreeMap<String, u16>,
    pub endpoints: Vec<EndpointAddress>,
}

/// A pod a sidecar runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub key: ObjectKey,
    pub ip: Option<IpAddr>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// Declared container ports (name, number); the app listens on them.
    pub ports: Vec<(String, u16)>,
}

/// Per-namespace settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceSettings {
    /// Namespaces whose services the sidecars of this namespace receive (always including
    /// their own); `None` = all.
    pub reach: Option<BTreeSet<String>>,
}

/// The annotation on a namespace that narrows what its sidecars receive: a comma-separated
/// list of namespaces (the namespace itself is always included), or `*` for all.
pub const REACH_ANNOTATION: &str = "remora.io/reach";

impl NamespaceSettings {
    /// Reads the [`REACH_ANNOTATION`] value.
    pub fn from_reach_annotation(value: Option<&str>) -> NamespaceSettings {
        let reach = value.and_then(|text| {
            let names: BTreeSet<String> = text
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_string)
                .collect();
            (!names.contains("*")).then_some(names)
        });
        NamespaceSettings { reach }
    }
}

/// A traffic policy as stored (Kubernetes object or REST).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    pub key: ObjectKey,
    /// `metadata.generation` of the Kubernetes object (REST: the store version it was
    /// written at), reported back as `status.observedGeneration`.
    pub generation: i64,
    pub spec: TrafficPolicySpec,
}

/// Everything one source knows.
#[derive(Clone, Debug, Default)]
pub struct Layer {
    pub namespaces: BTreeMap<String, NamespaceSettings>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    /// Per service, its endpoint sets by set name.
    pub endpoints: BTreeMap<ObjectKey, BTreeMap<String, Arc<EndpointSet>>>,
    pub workloads: BTreeMap<ObjectKey, Arc<Workload>>,
    pub policies: BTreeMap<ObjectKey, Arc<PolicyObject>>,
}

/// Where an input came from. Kubernetes wins over REST where both name the same object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Kubernetes = 0,
    Rest = 1,
}

/// One change from a source.
// Updates are short-lived (queued, applied, dropped), so the size spread does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum MeshUpdate {
    Service(Source, ObjectKey, Option<Service>),
    /// The endpoint set `.2` of service `.1`.
    Endpoints(Source, ObjectKey, String, Option<EndpointSet>),
    Workload(Source, ObjectKey, Option<Workload>),
    Namespace(Source, String, Option<NamespaceSettings>),
    Policy(Source, ObjectKey, Option<PolicyObject>),
}

/// The inputs of both sources.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub layers: [Layer; 2],
}

impl Inputs {
    pub fn layer_mut(&mut self, source: Source) -> &mut Layer {
        &mut self.layers[source as usize]
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&Arc<Service>> {
        self.layers.iter().find_map(|layer| layer.services.get(key))
    }

    /// Every service, Kubernetes' first where both sources name one.
    pub fn services(&self) -> BTreeMap<&ObjectKey, &Arc<Service>> {
        let mut all = BTreeMap::new();
        for layer in self.layers.iter().rev() {
            all.extend(layer.services.iter());
        }
        all
    }

    /// The endpoint sets of a service, from the source that defines the service.
    pub fn endpoint_sets(&self, service: &ObjectKey) -> Vec<&Arc<EndpointSet>> {
        let owner = self
            .layers
            .iter()
            .find(|layer| layer.services.contains_key(service));
        owner
            .and_then(|layer| layer.endpoints.get(service))
            .map(|sets| sets.values().collect())
            .unwrap_or_default()
    }

    pub fn workload(&self, key: &ObjectKey) -> Option<&Arc<Workload>> {
        self.layers
            .iter()
            .find_map(|layer| layer.workloads.get(key))
    }

    pub fn namespace(&self, name: &str) -> NamespaceSettings {
        self.layers
            .iter()
            .find_map(|layer| layer.namespaces.get(name))
            .cloned()
            .unwrap_or_default()
    }

    /// Every policy, Kubernetes' first where both sources name one.
    pub fn policies(&self) -> BTreeMap<&ObjectKey, &Arc<PolicyObject>> {
        let mut all = BTreeMap::new();
        for layer in self.layers.iter().rev() {
            all.extend(layer.policies.iter());
        }
        all
    }

    /// Policies that target `service`, by key.
    pub fn policies_for(&self, service: &ObjectKey) -> Vec<&Arc<PolicyObject>> {
        self.policies()
            .into_values()
            .filter(|policy| {
                policy.key.namespace == service.namespace && policy.spec.service == service.name
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_follow_app_protocol_then_the_port_name() {
        assert_eq!(Protocol::detect(Some("http"), "tcp-x"), Protocol::Http);
        assert_eq!(
            Protocol::detect(Some("kubernetes.io/h2c"), "web"),
            Protocol::Http2
        );
        assert_eq!(Protocol::detect(Some("mysql"), "http"), Protocol::Tcp);
        assert_eq!(Protocol::detect(None, "http"), Protocol::Http);
        assert_eq!(Protocol::detect(None, "http-web"), Protocol::Http);
        assert_eq!(Protocol::detect(None, "grpc-api"), Protocol::Http2);
        assert_eq!(Protocol::detect(None, "http2"), Protocol::Http2);
        assert_eq!(Protocol::detect(None, "httpx"), Protocol::Tcp);
        assert_eq!(Protocol::detect(None, ""), Protocol::Tcp);
    }

    #[test]
    fn endpoint_conditions_map_to_health() {
        use EndpointHealth::*;
        let health = EndpointHealth::from_conditions;
        assert_eq!(health(Some(true), Some(true), Some(false)), Healthy);
        assert_eq!(health(None, None, None), Healthy);
        assert_eq!(health(Some(false), Some(true), Some(true)), Draining);
        assert_eq!(health(Some(false), Some(false), Some(true)), Unready);
        assert_eq!(health(Some(false), None, None), Unready);
        // Not ready and not terminating (e.g. failing its readiness probe): no traffic.
        assert_eq!(health(Some(false), Some(true), Some(false)), Unready);
    }

    #[test]
    fn reach_annotation_narrows_or_opens() {
        assert_eq!(NamespaceSettings::from_reach_annotation(None).reach, None);
        assert_eq!(
            NamespaceSettings::from_reach_annotation(Some("*")).reach,
            None
        );
        let narrowed = NamespaceSettings::from_reach_annotation(Some(" shop, ,pay "));
        assert_eq!(
            narrowed.reach,
            Some(BTreeSet::from(["pay".to_string(), "shop".to_string()]))
        );
    }
}
