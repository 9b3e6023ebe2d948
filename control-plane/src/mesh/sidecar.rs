//! Which sidecar a connecting proxy is: the node the injector's bootstrap describes. `node.id`
//! is `POD_NAME.POD_NAMESPACE` (namespaces never contain dots, so the last dot splits it),
//! `node.cluster` its group for raw resources, and the metadata carries the capture ports
//! (`REMORA_INBOUND_PORT`, `REMORA_OUTBOUND_PORT`). A bootstrap may also name the pod
//! explicitly in metadata (`POD_NAME`, `POD_NAMESPACE`). A node without capture ports is not a
//! mesh sidecar and gets only raw resources, as before.

use prost_types::value::Kind as ValueKind;
use xds_api::envoy::config::core::v3::Node;

use crate::mesh::model::ObjectKey;

pub const INBOUND_PORT_KEY: &str = "REMORA_INBOUND_PORT";
pub const OUTBOUND_PORT_KEY: &str = "REMORA_OUTBOUND_PORT";

/// A mesh sidecar, as far as its node tells.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sidecar {
    pub node_id: String,
    /// `node.cluster`: the group whose raw resources it also receives.
    pub group: String,
    /// Its pod.
    pub workload: ObjectKey,
    pub inbound_port: Option<u16>,
    pub outbound_port: Option<u16>,
    /// The service account its stream's credential proves (authenticated xDS); `None`: the
    /// workload's, as the mesh knows it.
    pub service_account: Option<String>,
}

fn metadata_text(node: &Node, key: &str) -> Option<String> {
    let value = node.metadata.as_ref()?.fields.get(key)?;
    match value.kind.as_ref()? {
        ValueKind::StringValue(text) => Some(text.clone()),
        ValueKind::NumberValue(number) => Some(format!("{number}")),
        _ => None,
    }
}

fn metadata_port(node: &Node, key: &str) -> Option<u16> {
    metadata_text(node, key)?
        .parse()
        .ok()
        .filter(|port| *port != 0)
}

impl Sidecar {
    /// The sidecar a node describes, or `None` for a plain proxy.
    pub fn from_node(node: &Node) -> Option<Sidecar> {
        let inbound_port = metadata_port(node, INBOUND_PORT_KEY);
        let outbound_port = metadata_port(node, OUTBOUND_PORT_KEY);
        if inbound_port.is_none() && outbound_port.is_none() {
            return None;
        }
        let workload = match (
            metadata_text(node, "POD_NAME"),
            metadata_text(node, "POD_NAMESPACE"),
        ) {
            (Some(name), Some(namespace)) => ObjectKey { namespace, name },
            _ => {
                let (name, namespace) = node.id.rsplit_once('.')?;
                if name.is_empty() || namespace.is_empty() {
                    return None;
                }
                ObjectKey::new(namespace, name)
            }
        };
        Some(Sidecar {
            node_id: node.id.clone(),
            group: node.cluster.clone(),
            workload,
            inbound_port,
            outbound_port,
            service_account: None,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.workload.namespace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value};

    fn node(id: &str, fields: &[(&str, ValueKind)]) -> Node {
        Node {
            id: id.into(),
            cluster: "web".into(),
            metadata: Some(Struct {
                fields: fields
                    .iter()
                    .map(|(key, kind)| {
                        (
                            key.to_string(),
                            Value {
                                kind: Some(kind.clone()),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_injector_node_names_pod_namespace_and_ports() {
        let sidecar = Sidecar::from_node(&node(
            "web-7d9f.v2.shop",
            &[
                (INBOUND_PORT_KEY, ValueKind::StringValue("15006".into())),
                (OUTBOUND_PORT_KEY, ValueKind::NumberValue(15001.0)),
            ],
        ))
        .expect("a sidecar");
        assert_eq!(sidecar.workload, ObjectKey::new("shop", "web-7d9f.v2"));
        assert_eq!(sidecar.inbound_port, Some(15006));
        assert_eq!(sidecar.outbound_port, Some(15001));
        assert_eq!(sidecar.group, "web");
    }

    #[test]
    fn explicit_metadata_wins_and_plain_proxies_are_not_sidecars() {
        let sidecar = Sidecar::from_node(&node(
            "anything",
            &[
                (OUTBOUND_PORT_KEY, ValueKind::StringValue("15001".into())),
                ("POD_NAME", ValueKind::StringValue("a".into())),
                ("POD_NAMESPACE", ValueKind::StringValue("b".into())),
            ],
        ))
        .expect("a sidecar");
        assert_eq!(sidecar.workload, ObjectKey::new("b", "a"));
        assert_eq!(sidecar.inbound_port, None);
        assert!(Sidecar::from_node(&node("a.b", &[])).is_none());
        assert!(
            Sidecar::from_node(&node(
                "nodots",
                &[(INBOUND_PORT_KEY, ValueKind::StringValue("15006".into()))]
            ))
            .is_none()
        );
    }
}
