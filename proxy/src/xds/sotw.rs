//! State-of-the-world ADS (`GRPC`), as a state machine with no I/O: it turns responses into
//! [`Received`] updates and composes the requests to send (subscriptions, ACKs, NACKs). Per
//! type it tracks the subscription, the last accepted version and the last nonce.
//!
//! A response's resources replace the whole set for wildcard types (listeners, clusters) and
//! add to it for named ones (endpoints, routes), as Envoy treats them. A response of a type
//! Remora does not take is NACKed at once, naming the type.

use std::collections::{BTreeSet, HashMap};

use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use xds_api::google::rpc::Status as RpcStatus;

use super::{Received, Resource, known_type, short};

/// One type's protocol state on the stream.
#[derive(Debug, Default, Clone)]
struct TypeState {
    /// The last version accepted (sent back in requests).
    version: String,
    /// The nonce of the last response (sent back in the next request).
    nonce: String,
    /// Named subscriptions; empty for wildcard types.
    names: BTreeSet<String>,
}

/// The state-of-the-world protocol on one stream (and across reconnects: versions persist).
#[derive(Debug)]
pub struct Sotw {
    node: Node,
    /// Send the node only in the stream's first request.
    node_once: bool,
    node_sent: bool,
    types: HashMap<&'static str, TypeState>,
}

impl Sotw {
    pub fn new(node: Node, node_once: bool) -> Self {
        Sotw {
            node,
            node_once,
            node_sent: false,
            types: HashMap::new(),
        }
    }

    fn request(&mut self, type_url: &'static str, error: Option<String>) -> DiscoveryRequest {
        let node = if self.node_once && self.node_sent {
            None
        } else {
            self.node_sent = true;
            Some(self.node.clone())
        };
        let state = self.types.entry(type_url).or_default();
        DiscoveryRequest {
            version_info: state.version.clone(),
            node,
            resource_names: state.names.iter().cloned().collect(),
            type_url: type_url.to_string(),
            response_nonce: state.nonce.clone(),
            error_detail: error.map(|message| RpcStatus {
                code: 13,
                message,
                details: Vec::new(),
            }),
        }
    }

    /// A new stream: the first requests, wildcard types first, then every named subscription.
    /// Nonces belong to the old stream; accepted versions carry over.
    pub fn start(&mut self, wildcard: &[&'static str]) -> Vec<DiscoveryRequest> {
        self.node_sent = false;
        for state in self.types.values_mut() {
            state.nonce.clear();
        }
        let mut requests: Vec<DiscoveryRequest> =
            wildcard.iter().map(|t| self.request(t, None)).collect();
        let named: Vec<&'static str> = self
            .types
            .iter()
            .filter(|(t, s)| !wildcard.contains(t) && !s.names.is_empty())
            .map(|(t, _)| *t)
            .collect();
        for type_url in named {
            requests.push(self.request(type_url, None));
        }
        requests
    }

    /// Reads a response: its resources, or a NACK to send at once (a type Remora does not take).
    pub fn receive(
        &mut self,
        response: DiscoveryResponse,
    ) -> Result<Received, Box<DiscoveryRequest>> {
        let DiscoveryResponse {
            version_info,
            resources,
            type_url,
            nonce,
            ..
        } = response;
        let Some(type_url) = known_type(&type_url) else {
            let message = format!("Remora does not take resources of type {type_url}");
            tracing::warn!(%type_url, "xDS: NACK of an unknown type");
            return Err(Box::new(DiscoveryRequest {
                version_info: String::new(),
                node: None,
                resource_names: Vec::new(),
                type_url,
                response_nonce: nonce,
                error_detail: Some(RpcStatus {
                    code: 3,
                    message,
                    details: Vec::new(),
                }),
            }));
        };
        self.types.entry(type_url).or_default().nonce = nonce;
        let mut received = Received {
            type_url,
            version: version_info.clone(),
            upserts: Vec::new(),
            removals: Vec::new(),
            replace: is_wildcard(type_url),
            errors: Vec::new(),
            nonce: String::new(),
        };
        let mut seen = BTreeSet::new();
        for any in resources {
            if any.type_url != type_url {
                received.errors.push(format!(
                    "resource of type {} in a {} response",
                    any.type_url,
                    short(type_url)
                ));
                continue;
            }
            match remora_config::resource::name(type_url, &any.value) {
                Ok(name) => {
                    if !seen.insert(name.clone()) {
                        received.errors.push(format!(
                            "{} {name}: duplicate resource name in one response",
                            short(type_url)
                        ));
                        continue;
                    }
                    received.upserts.push(Resource {
                        name,
                        version: version_info.clone(),
                        payload: any,
                    });
                }
                Err(error) => received.errors.push(error),
            }
        }
        Ok(received)
    }

    /// The ACK (no errors) or NACK for what was received.
    pub fn answer(&mut self, received: &Received, errors: &[String]) -> DiscoveryRequest {
        if errors.is_empty() {
            self.types.entry(received.type_url).or_default().version = received.version.clone();
            self.request(received.type_url, None)
        } else {
            self.request(received.type_url, Some(errors.join("; ")))
        }
    }

    /// The request for a changed subscription of a named type, if it changed.
    pub fn subscribe(
        &mut self,
        type_url: &'static str,
        names: &BTreeSet<String>,
    ) -> Option<DiscoveryRequest> {
        let state = self.types.entry(type_url).or_default();
        if state.names == *names {
            return None;
        }
        state.names = names.clone();
        Some(self.request(type_url, None))
    }
}

/// Listeners and clusters are subscribed to by wildcard; their responses carry the full set.
fn is_wildcard(type_url: &str) -> bool {
    type_url == xds_api::type_urls::LISTENER || type_url == xds_api::type_urls::CLUSTER
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use xds_api::type_urls::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT};

    fn cluster(name: &str) -> prost_types::Any {
        prost_types::Any {
            type_url: CLUSTER.into(),
            value: xds_api::envoy::config::cluster::v3::Cluster {
                name: name.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        }
    }

    fn response(
        type_url: &str,
        version: &str,
        nonce: &str,
        resources: Vec<prost_types::Any>,
    ) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            resources,
            type_url: type_url.into(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn node() -> Node {
        Node {
            id: "n".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_ack_carries_the_accepted_version_and_the_nonce_a_nack_the_old_version() {
        let mut sotw = Sotw::new(node(), false);
        let first = sotw.start(&[CLUSTER]);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].version_info, "");
        let received = sotw
            .receive(response(CLUSTER, "v1", "n1", vec![cluster("a")]))
            .unwrap();
        assert_eq!(received.upserts[0].name, "a");
        assert!(received.replace);
        let ack = sotw.answer(&received, &[]);
        assert_eq!(
            (ack.version_info.as_str(), ack.response_nonce.as_str()),
            ("v1", "n1")
        );
        assert!(ack.error_detail.is_none());
        let bad = sotw
            .receive(response(CLUSTER, "v2", "n2", vec![cluster("a")]))
            .unwrap();
        let nack = sotw.answer(&bad, &["Cluster a: broken".to_string()]);
        assert_eq!(
            (nack.version_info.as_str(), nack.response_nonce.as_str()),
            ("v1", "n2")
        );
        assert_eq!(nack.error_detail.unwrap().message, "Cluster a: broken");
    }

    #[test]
    fn an_unknown_type_is_nacked_at_once_and_duplicates_are_errors() {
        let mut sotw = Sotw::new(node(), false);
        sotw.start(&[CLUSTER]);
        let nack = sotw
            .receive(response("type.googleapis.com/some.Thing", "1", "x", vec![]))
            .expect_err("unknown type");
        assert_eq!(nack.response_nonce, "x");
        assert!(nack.error_detail.unwrap().message.contains("some.Thing"));
        let received = sotw
            .receive(response(
                CLUSTER,
                "1",
                "y",
                vec![cluster("a"), cluster("a")],
            ))
            .unwrap();
        assert_eq!(received.errors.len(), 1, "{:?}", received.errors);
    }

    #[test]
    fn the_node_goes_once_when_asked_and_subscriptions_are_sent_when_they_change() {
        let mut sotw = Sotw::new(node(), true);
        let first = sotw.start(&[CLUSTER]);
        assert!(first[0].node.is_some());
        let names: BTreeSet<String> = ["e".to_string()].into();
        let request = sotw
            .subscribe(CLUSTER_LOAD_ASSIGNMENT, &names)
            .expect("changed");
        assert!(request.node.is_none(), "the node only in the first request");
        assert_eq!(request.resource_names, ["e"]);
        assert!(sotw.subscribe(CLUSTER_LOAD_ASSIGNMENT, &names).is_none());
        // A new stream sends the node again and resubscribes.
        let again = sotw.start(&[CLUSTER]);
        assert_eq!(again.len(), 2);
        assert!(again[0].node.is_some() && again[1].node.is_none());
        assert_eq!(again[1].resource_names, ["e"]);
    }
}
