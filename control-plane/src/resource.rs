//! The five kinds of resource the control plane stores and serves (clusters, endpoints,
//! listeners, routes, secrets), their names in the API and on the wire, and the conversion of
//! one resource between its stored form (encoded proto bytes) and Envoy's proto3 JSON shape.

use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use xds_api::envoy::config::cluster::v3::Cluster;
use xds_api::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_api::envoy::config::listener::v3::Listener;
use xds_api::envoy::config::route::v3::RouteConfiguration;
use xds_api::envoy::extensions::transport_sockets::tls::v3::Secret;
use xds_api::json::MappingError;
use xds_api::type_urls;

/// A resource type. The declaration order is the make-before-break push order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Cluster,
    Endpoint,
    Listener,
    Route,
    Secret,
}

impl Kind {
    /// Every kind, in push order (clusters, endpoints, listeners, routes, secrets).
    pub const ALL: [Kind; 5] = [
        Kind::Cluster,
        Kind::Endpoint,
        Kind::Listener,
        Kind::Route,
        Kind::Secret,
    ];

    /// Position in [`Kind::ALL`], for per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Cluster => type_urls::CLUSTER,
            Kind::Endpoint => type_urls::CLUSTER_LOAD_ASSIGNMENT,
            Kind::Listener => type_urls::LISTENER,
            Kind::Route => type_urls::ROUTE_CONFIGURATION,
            Kind::Secret => type_urls::SECRET,
        }
    }

    /// The path segment of the config API (`/v1/{collection}`).
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Cluster => "clusters",
            Kind::Endpoint => "endpoints",
            Kind::Listener => "listeners",
            Kind::Route => "routes",
            Kind::Secret => "secrets",
        }
    }

    /// The xDS service short name (CDS, EDS, ...).
    pub fn xds_name(self) -> &'static str {
        type_urls::short_name(self.type_url())
    }

    /// Whether SotW responses must carry the full set (absence means deletion).
    pub fn is_full_state(self) -> bool {
        matches!(self, Kind::Cluster | Kind::Listener)
    }

    pub fn from_collection(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| {
            kind.collection() == text || kind.collection().trim_end_matches('s') == text
        })
    }

    pub fn from_type_url(type_url: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|kind| kind.type_url() == type_url)
    }

    /// Accepts a full type URL, a full message name or the short message name
    /// (`Cluster`, `ClusterLoadAssignment`, `Listener`, `RouteConfiguration`, `Secret`).
    pub fn from_type_name(text: &str) -> Option<Kind> {
        let message = type_urls::message_name(text);
        Kind::ALL.into_iter().find(|kind| {
            let full = type_urls::message_name(kind.type_url());
            full == message || full.rsplit('.').next() == Some(message)
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.collection())
    }
}

/// One decoded resource.
// Values are short-lived (decoded, checked, encoded), so the size spread does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Typed {
    Cluster(Cluster),
    Endpoint(ClusterLoadAssignment),
    Listener(Listener),
    Route(RouteConfiguration),
    Secret(Secret),
}

impl Typed {
    pub fn kind(&self) -> Kind {
        match self {
            Typed::Cluster(_) => Kind::Cluster,
            Typed::Endpoint(_) => Kind::Endpoint,
            Typed::Listener(_) => Kind::Listener,
            Typed::Route(_) => Kind::Route,
            Typed::Secret(_) => Kind::Secret,
        }
    }

    /// The resource's xDS name (`cluster_name` for a ClusterLoadAssignment).
    pub fn name(&self) -> &str {
        match self {
            Typed::Cluster(message) => &message.name,
            Typed::Endpoint(message) => &message.cluster_name,
            Typed::Listener(message) => &message.name,
            Typed::Route(message) => &message.name,
            Typed::Secret(message) => &message.name,
        }
    }

    pub fn set_name(&mut self, name: &str) {
        let slot = match self {
            Typed::Cluster(message) => &mut message.name,
            Typed::Endpoint(message) => &mut message.cluster_name,
            Typed::Listener(message) => &mut message.name,
            Typed::Route(message) => &mut message.name,
            Typed::Secret(message) => &mut message.name,
        };
        *slot = name.to_string();
    }

    /// The field that holds the name, for error messages.
    pub fn name_field(kind: Kind) -> &'static str {
        if kind == Kind::Endpoint {
            "cluster_name"
        } else {
            "name"
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Typed::Cluster(message) => message.encode_to_vec(),
            Typed::Endpoint(message) => message.encode_to_vec(),
            Typed::Listener(message) => message.encode_to_vec(),
            Typed::Route(message) => message.encode_to_vec(),
            Typed::Secret(message) => message.encode_to_vec(),
        }
    }

    pub fn decode(kind: Kind, bytes: &[u8]) -> Result<Typed, prost::DecodeError> {
        Ok(match kind {
            Kind::Cluster => Typed::Cluster(Cluster::decode(bytes)?),
            Kind::Endpoint => Typed::Endpoint(ClusterLoadAssignment::decode(bytes)?),
            Kind::Listener => Typed::Listener(Listener::decode(bytes)?),
            Kind::Route => Typed::Route(RouteConfiguration::decode(bytes)?),
            Kind::Secret => Typed::Secret(Secret::decode(bytes)?),
        })
    }

    /// Reads Envoy's JSON shape of a resource of `kind`. A `"@type"` key, if present, must
    /// name that kind and is dropped.
    pub fn from_json(kind: Kind, value: &Value) -> Result<Typed, MappingError> {
        let mut value = value.clone();
        if let Some(object) = value.as_object_mut() {
            object.remove("@type");
        }
        Ok(match kind {
            Kind::Cluster => Typed::Cluster(xds_api::json::from_value(&value)?),
            Kind::Endpoint => Typed::Endpoint(xds_api::json::from_value(&value)?),
            Kind::Listener => Typed::Listener(xds_api::json::from_value(&value)?),
            Kind::Route => Typed::Route(xds_api::json::from_value(&value)?),
            Kind::Secret => Typed::Secret(xds_api::json::from_value(&value)?),
        })
    }

    pub fn to_json(&self) -> Result<Value, MappingError> {
        match self {
            Typed::Cluster(message) => xds_api::json::to_value(message),
            Typed::Endpoint(message) => xds_api::json::to_value(message),
            Typed::Listener(message) => xds_api::json::to_value(message),
            Typed::Route(message) => xds_api::json::to_value(message),
            Typed::Secret(message) => xds_api::json::to_value(message),
        }
    }
}

/// Envoy's JSON shape of stored bytes, with `"@type"` first so it can be applied again.
pub fn stored_to_json(kind: Kind, bytes: &[u8]) -> Result<Value, String> {
    let typed = Typed::decode(kind, bytes).map_err(|error| error.to_string())?;
    let body = typed.to_json().map_err(|error| error.to_string())?;
    let mut object = serde_json::Map::new();
    object.insert("@type".into(), Value::String(kind.type_url().into()));
    if let Value::Object(fields) = body {
        object.extend(fields);
    }
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_found_by_every_accepted_spelling() {
        assert_eq!(Kind::from_type_name("Cluster"), Some(Kind::Cluster));
        assert_eq!(
            Kind::from_type_name("envoy.config.endpoint.v3.ClusterLoadAssignment"),
            Some(Kind::Endpoint)
        );
        assert_eq!(
            Kind::from_type_name(type_urls::ROUTE_CONFIGURATION),
            Some(Kind::Route)
        );
        assert_eq!(Kind::from_type_name("Route"), None);
        assert_eq!(Kind::from_collection("listeners"), Some(Kind::Listener));
        assert_eq!(Kind::from_collection("listener"), Some(Kind::Listener));
        assert_eq!(Kind::from_collection("pods"), None);
    }

    #[test]
    fn json_round_trip_keeps_the_resource() {
        let value = serde_json::json!({"@type": "Cluster", "name": "a", "connect_timeout": "1.5s"});
        let typed = Typed::from_json(Kind::Cluster, &value).expect("valid cluster");
        assert_eq!(typed.name(), "a");
        let back = stored_to_json(Kind::Cluster, &typed.encode()).expect("encodes");
        assert_eq!(back["connect_timeout"], "1.500s");
        assert_eq!(back["@type"], type_urls::CLUSTER);
    }
}
