//! Incremental ADS (`DELTA_GRPC`), as a state machine with no I/O: responses carry upserts and
//! removals; requests carry subscription changes, ACKs and NACKs by nonce. A new stream tells
//! the server which versions Remora holds (`initial_resource_versions`), so only differences
//! come back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use xds_api::google::rpc::Status as RpcStatus;

use super::{Received, Resource, known_type, short};

/// One type's protocol state.
#[derive(Debug, Default, Clone)]
struct TypeState {
    /// Named subscriptions; empty for wildcard types.
    names: BTreeSet<String>,
    /// The versions of the resources held (for a reconnect's initial request).
    held: BTreeMap<String, String>,
    system_version: String,
}

#[derive(Debug)]
pub struct Delta {
    node: Node,
    node_once: bool,
    node_sent: bool,
    types: HashMap<&'static str, TypeState>,
}

impl Delta {
    pub fn new(node: Node, node_once: bool) -> Self {
        Delta {
            node,
            node_once,
            node_sent: false,
            types: HashMap::new(),
        }
    }

    fn request(&mut self, type_url: &str) -> DeltaDiscoveryRequest {
        let node = if self.node_once && self.node_sent {
            None
        } else {
            self.node_sent = true;
            Some(self.node.clone())
        };
        DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_string(),
            ..Default::default()
        }
    }

    /// A new stream: one request per type, with its subscriptions and the versions held.
    pub fn start(&mut self, wildcard: &[&'static str]) -> Vec<DeltaDiscoveryRequest> {
        self.node_sent = false;
        let mut types: Vec<&'static str> = wildcard.to_vec();
        types.extend(
            self.types
                .iter()
                .filter(|(t, s)| !wildcard.contains(t) && !s.names.is_empty())
                .map(|(t, _)| *t),
        );
        let mut requests = Vec::new();
        for type_url in types {
            let mut request = self.request(type_url);
            let state = self.types.entry(type_url).or_default();
            request.resource_names_subscribe = state.names.iter().cloned().collect();
            request.initial_resource_versions =
                state.held.clone().into_iter().collect::<HashMap<_, _>>();
            requests.push(request);
        }
        requests
    }

    /// Reads a response: its upserts and removals, or a NACK to send at once.
    pub fn receive(
        &mut self,
        response: DeltaDiscoveryResponse,
    ) -> Result<Received, Box<DeltaDiscoveryRequest>> {
        let DeltaDiscoveryResponse {
            system_version_info,
            resources,
            type_url,
            removed_resources,
            nonce,
            ..
        } = response;
        let Some(type_url) = known_type(&type_url) else {
            tracing::warn!(%type_url, "xDS: NACK of an unknown type");
            let mut nack = self.request(&type_url);
            nack.response_nonce = nonce;
            nack.error_detail = Some(RpcStatus {
                code: 3,
                message: format!("Remora does not take resources of type {type_url}"),
                details: Vec::new(),
            });
            return Err(Box::new(nack));
        };
        let mut received = Received {
            type_url,
            version: system_version_info,
            upserts: Vec::new(),
            removals: removed_resources,
            replace: false,
            errors: Vec::new(),
            nonce,
        };
        for resource in resources {
            let Some(any) = resource.resource else {
                received.errors.push(format!(
                    "{} {}: resource body missing",
                    short(type_url),
                    resource.name
                ));
                continue;
            };
            match remora_config::resource::name(type_url, &any.value) {
                Ok(name) if name == resource.name || resource.name.is_empty() => {
                    received.upserts.push(Resource {
                        name,
                        version: resource.version,
                        payload: any,
                    })
                }
                Ok(name) => received.errors.push(format!(
                    "{} {}: the resource is named {name:?}",
                    short(type_url),
                    resource.name
                )),
                Err(error) => received.errors.push(error),
            }
        }
        Ok(received)
    }

    /// The ACK (no errors) or NACK for what was received.
    pub fn answer(&mut self, received: &Received, errors: &[String]) -> DeltaDiscoveryRequest {
        let mut request = self.request(received.type_url);
        request.response_nonce = received.nonce.clone();
        if errors.is_empty() {
            let state = self.types.entry(received.type_url).or_default();
            state.system_version = received.version.clone();
            for resource in &received.upserts {
                state
                    .held
                    .insert(resource.name.clone(), resource.version.clone());
            }
            for name in &received.removals {
                state.held.remove(name);
            }
        } else {
            request.error_detail = Some(RpcStatus {
                code: 13,
                message: errors.join("; "),
                details: Vec::new(),
            });
        }
        request
    }

    /// The request for a changed subscription of a named type, if it changed.
    pub fn subscribe(
        &mut self,
        type_url: &'static str,
        names: &BTreeSet<String>,
    ) -> Option<DeltaDiscoveryRequest> {
        let state = self.types.entry(type_url).or_default();
        if state.names == *names {
            return None;
        }
        let added: Vec<String> = names.difference(&state.names).cloned().collect();
        let removed: Vec<String> = state.names.difference(names).cloned().collect();
        for name in &removed {
            state.held.remove(name);
        }
        state.names = names.clone();
        let mut request = self.request(type_url);
        request.resource_names_subscribe = added;
        request.resource_names_unsubscribe = removed;
        Some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use xds_api::envoy::service::discovery::v3::Resource as WireResource;
    use xds_api::type_urls::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT};

    fn cluster(name: &str, version: &str) -> WireResource {
        WireResource {
            name: name.into(),
            version: version.into(),
            resource: Some(prost_types::Any {
                type_url: CLUSTER.into(),
                value: xds_api::envoy::config::cluster::v3::Cluster {
                    name: name.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_reconnect_names_the_versions_held_and_removals_forget_them() {
        let mut delta = Delta::new(Node::default(), false);
        delta.start(&[CLUSTER]);
        let received = delta
            .receive(DeltaDiscoveryResponse {
                type_url: CLUSTER.into(),
                resources: vec![cluster("a", "1"), cluster("b", "7")],
                nonce: "n1".into(),
                ..Default::default()
            })
            .unwrap();
        let ack = delta.answer(&received, &[]);
        assert_eq!(ack.response_nonce, "n1");
        assert!(ack.error_detail.is_none());
        let removal = delta
            .receive(DeltaDiscoveryResponse {
                type_url: CLUSTER.into(),
                removed_resources: vec!["a".into()],
                nonce: "n2".into(),
                ..Default::default()
            })
            .unwrap();
        delta.answer(&removal, &[]);
        let again = delta.start(&[CLUSTER]);
        assert_eq!(
            again[0]
                .initial_resource_versions
                .get("b")
                .map(String::as_str),
            Some("7")
        );
        assert!(!again[0].initial_resource_versions.contains_key("a"));
    }

    #[test]
    fn a_nack_keeps_what_was_held_and_subscriptions_send_differences() {
        let mut delta = Delta::new(Node::default(), true);
        delta.start(&[CLUSTER]);
        let received = delta
            .receive(DeltaDiscoveryResponse {
                type_url: CLUSTER.into(),
                resources: vec![cluster("a", "1")],
                nonce: "n1".into(),
                ..Default::default()
            })
            .unwrap();
        let nack = delta.answer(&received, &["Cluster a: bad".into()]);
        assert_eq!(nack.error_detail.unwrap().message, "Cluster a: bad");
        assert!(
            nack.node.is_none(),
            "node only in the stream's first request"
        );
        assert!(
            delta.start(&[CLUSTER])[0]
                .initial_resource_versions
                .is_empty()
        );
        let names: BTreeSet<String> = ["x".to_string(), "y".to_string()].into();
        let subscribe = delta.subscribe(CLUSTER_LOAD_ASSIGNMENT, &names).unwrap();
        assert_eq!(subscribe.resource_names_subscribe, ["x", "y"]);
        let fewer: BTreeSet<String> = ["y".to_string()].into();
        let unsubscribe = delta.subscribe(CLUSTER_LOAD_ASSIGNMENT, &fewer).unwrap();
        assert_eq!(unsubscribe.resource_names_unsubscribe, ["x"]);
        assert!(unsubscribe.resource_names_subscribe.is_empty());
    }
}
