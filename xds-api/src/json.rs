//! The proto3 JSON mapping, in both directions, as Envoy's config files use it: `"@type"` inline
//! in `Any`, durations as `"1.5s"`, wrapper types as plain values, enums by name, and field names
//! in snake_case (camelCase is accepted on input too). YAML goes through the same mapping.
//!
//! Input is checked against the descriptors before decoding, so an unknown field (also inside an
//! `Any`) is reported with its full path, e.g.
//! `static_resources.listeners[0].filter_chains[0].filters[0].typed_config.stat_prefx`.

use prost::{Message, Name};
use prost_reflect::{
    DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, ReflectMessage, SerializeOptions,
};
use serde_json::Value;

use crate::descriptor_pool;

/// A value that does not map onto the expected message: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", if path.is_empty() { String::new() } else { format!("at `{path}`: ") })]
pub struct MappingError {
    /// Dotted field path from the document root; empty for the root itself.
    pub path: String,
    /// What is wrong there.
    pub reason: String,
}

impl MappingError {
    fn at(path: &FieldPath, reason: impl Into<String>) -> Self {
        MappingError {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

/// Field path being walked, rendered as `a.b[2].c`.
#[derive(Default)]
struct FieldPath(Vec<Segment>);

enum Segment {
    Field(String),
    Index(usize),
    Key(String),
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Field(name) if i == 0 => write!(f, "{name}")?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => write!(f, "[{key:?}]")?,
            }
        }
        Ok(())
    }
}

/// The message descriptor for a full name such as `envoy.config.cluster.v3.Cluster`.
pub fn descriptor(full_name: &str) -> Result<MessageDescriptor, MappingError> {
    descriptor_pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| MappingError {
            path: String::new(),
            reason: format!("unknown message type {full_name}"),
        })
}

/// Decodes a JSON value into a reflective message of the given type.
pub fn dynamic_from_value(
    descriptor: &MessageDescriptor,
    value: &Value,
) -> Result<DynamicMessage, MappingError> {
    let mut value = value.clone();
    check_message(descriptor, &mut value, &mut FieldPath::default())?;
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(&value, &mut track);
    DynamicMessage::deserialize_with_options(descriptor.clone(), deserializer, &options).map_err(
        |error| {
            let path = track.path().to_string();
            MappingError {
                path: if path == "." { String::new() } else { path },
                reason: error.to_string(),
            }
        },
    )
}

/// Decodes a JSON value into a typed message.
pub fn from_value<M: Message + Name + Default>(value: &Value) -> Result<M, MappingError> {
    let dynamic = dynamic_from_value(&descriptor(&M::full_name())?, value)?;
    dynamic.transcode_to::<M>().map_err(|error| MappingError {
        path: String::new(),
        reason: format!("cannot convert to {}: {error}", M::full_name()),
    })
}

/// Decodes a JSON document into a typed message.
pub fn from_json_str<M: Message + Name + Default>(text: &str) -> Result<M, MappingError> {
    from_value(&parse_json(text)?)
}

/// Decodes a single YAML document into a typed message.
pub fn from_yaml_str<M: Message + Name + Default>(text: &str) -> Result<M, MappingError> {
    from_value(&parse_yaml(text)?)
}

/// Decodes a JSON or YAML document (JSON is YAML, so YAML parsing covers both).
pub fn from_config_str<M: Message + Name + Default>(text: &str) -> Result<M, MappingError> {
    from_yaml_str(text)
}

/// Parses JSON text into a value, reporting the line and column of a syntax error.
pub fn parse_json(text: &str) -> Result<Value, MappingError> {
    serde_json::from_str(text).map_err(|error| MappingError {
        path: String::new(),
        reason: format!("invalid JSON: {error}"),
    })
}

/// Parses one YAML document into a JSON value.
pub fn parse_yaml(text: &str) -> Result<Value, MappingError> {
    serde_yaml::from_str(text).map_err(|error| MappingError {
        path: String::new(),
        reason: format!("invalid YAML: {error}"),
    })
}

/// Parses a multi-document YAML stream (`---` separated), skipping empty documents.
pub fn parse_yaml_documents(text: &str) -> Result<Vec<Value>, MappingError> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: Value =
            serde::Deserialize::deserialize(document).map_err(|error| MappingError {
                path: String::new(),
                reason: format!("invalid YAML in document {}: {error}", index + 1),
            })?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true)
        .stringify_64_bit_integers(false)
}

/// Encodes a reflective message as JSON with Envoy's conventions (snake_case names, defaults
/// left out, `Any` with inline `"@type"`).
pub fn dynamic_to_value(message: &DynamicMessage) -> Result<Value, MappingError> {
    message
        .serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .map_err(|error| MappingError {
            path: String::new(),
            reason: format!(
                "cannot encode {}: {error}",
                message.descriptor().full_name()
            ),
        })
}

/// Encodes a typed message as a JSON value.
pub fn to_value<M: Message + Name>(message: &M) -> Result<Value, MappingError> {
    encoded_to_value(&M::full_name(), &message.encode_to_vec())
}

/// Renders the wire bytes of message `full_name` as a JSON value.
pub fn encoded_to_value(full_name: &str, bytes: &[u8]) -> Result<Value, MappingError> {
    let dynamic =
        DynamicMessage::decode(descriptor(full_name)?, bytes).map_err(|error| MappingError {
            path: String::new(),
            reason: format!("cannot re-read {full_name}: {error}"),
        })?;
    dynamic_to_value(&dynamic)
}

/// Encodes a typed message as pretty JSON text.
pub fn to_json_string<M: Message + Name>(message: &M) -> Result<String, MappingError> {
    let value = to_value(message)?;
    serde_json::to_string_pretty(&value).map_err(|error| MappingError {
        path: String::new(),
        reason: error.to_string(),
    })
}

/// Encodes a typed message as YAML text.
pub fn to_yaml_string<M: Message + Name>(message: &M) -> Result<String, MappingError> {
    let value = to_value(message)?;
    serde_yaml::to_string(&value).map_err(|error| MappingError {
        path: String::new(),
        reason: error.to_string(),
    })
}

/// Well-known types whose JSON form is not an object of their fields.
fn has_special_json_form(full_name: &str) -> bool {
    full_name.starts_with("google.protobuf.") && full_name != "google.protobuf.Any"
}

/// Checks `value` against the message's fields (unknown names are errors) and rewrites the
/// spellings Envoy's parser accepts beyond strict proto3 JSON: an enum name in any letter case
/// (`round_robin`), a single value where a list is expected, a duration or wrapper written as
/// its fields (`{seconds: 2}`, `{value: 100}`), YAML 1.1's `yes`/`on` for a boolean, and a
/// number for a string.
fn check_message(
    descriptor: &MessageDescriptor,
    value: &mut Value,
    path: &mut FieldPath,
) -> Result<(), MappingError> {
    let full_name = descriptor.full_name();
    if has_special_json_form(full_name) {
        object_form_of_well_known(full_name, value);
        return Ok(());
    }
    if value.is_null() {
        return Ok(());
    }
    let kind = kind_of(value);
    let Value::Object(object) = value else {
        return Err(MappingError::at(
            path,
            format!("expected an object for {full_name}, found {kind}"),
        ));
    };
    if full_name == "google.protobuf.Any" {
        return check_any(object, path);
    }
    check_fields(descriptor, object, None, path)
}

/// Checks each entry of `object` as a field of `descriptor`, except `skip` (an Any's
/// `"@type"`, which sits among its payload's fields).
fn check_fields(
    descriptor: &MessageDescriptor,
    object: &mut serde_json::Map<String, Value>,
    skip: Option<&str>,
    path: &mut FieldPath,
) -> Result<(), MappingError> {
    let full_name = descriptor.full_name();
    for (key, field_value) in object.iter_mut() {
        if skip == Some(key.as_str()) {
            continue;
        }
        let field = descriptor
            .get_field_by_name(key)
            .or_else(|| descriptor.get_field_by_json_name(key));
        let Some(field) = field else {
            path.0.push(Segment::Field(key.clone()));
            // Our protos declare only what Remora reads, so an unknown name is either a typo or
            // an Envoy field Remora does not support; say which is likelier.
            let hint = closest_field(descriptor, key)
                .map(|name| format!(" (did you mean `{name}`?)"))
                .unwrap_or_else(|| {
                    " (Remora does not support this field, or it is misspelt)".to_string()
                });
            let error =
                MappingError::at(path, format!("unknown field `{key}` in {full_name}{hint}"));
            return Err(error);
        };
        path.0.push(Segment::Field(key.clone()));
        check_field(&field, field_value, path)?;
        path.0.pop();
    }
    Ok(())
}

fn check_field(
    field: &prost_reflect::FieldDescriptor,
    value: &mut Value,
    path: &mut FieldPath,
) -> Result<(), MappingError> {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return Ok(());
        };
        let value_kind = entry.map_entry_value_field().kind();
        if let Value::Object(map) = value {
            for (key, item) in map.iter_mut() {
                path.0.push(Segment::Key(key.clone()));
                check_single(&value_kind, item, path)?;
                path.0.pop();
            }
        }
        return Ok(());
    }
    if field.is_list() {
        if !value.is_array() && !value.is_null() {
            *value = Value::Array(vec![value.take()]);
        }
        if let Value::Array(items) = value {
            for (index, item) in items.iter_mut().enumerate() {
                path.0.push(Segment::Index(index));
                check_single(&field.kind(), item, path)?;
                path.0.pop();
            }
        }
        return Ok(());
    }
    check_single(&field.kind(), value, path)
}

/// One value of a field's type (a list item, a map value, or a singular field).
fn check_single(kind: &Kind, value: &mut Value, path: &mut FieldPath) -> Result<(), MappingError> {
    match kind {
        Kind::Message(message) => check_message(message, value, path),
        Kind::Enum(enumeration) => {
            if let Value::String(name) = value
                && enumeration.get_value_by_name(name).is_none()
                && let Some(known) = enumeration
                    .values()
                    .find(|known| known.name().eq_ignore_ascii_case(name))
            {
                *name = known.name().to_string();
            }
            Ok(())
        }
        Kind::Bool => {
            if let Value::String(text) = value
                && let Some(truth) = yaml_boolean(text)
            {
                *value = Value::Bool(truth);
            }
            Ok(())
        }
        Kind::String => {
            if let Value::Number(number) = value {
                *value = Value::String(number.to_string());
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The boolean spellings of YAML 1.1, which Envoy's YAML parser reads as booleans.
fn yaml_boolean(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "y" => Some(true),
        "false" | "no" | "off" | "n" => Some(false),
        _ => None,
    }
}

/// Rewrites a `Duration` written as its fields (`{seconds: 2, nanos: 500000000}`) as `"2.5s"`,
/// and a wrapper written as `{value: 100}` as `100`: Envoy's parser takes both forms, and
/// go-control-plane's samples use them. A `BoolValue` or `StringValue` takes the spellings of
/// its scalar ([`check_single`]). Anything else is left for the decoder to report.
fn object_form_of_well_known(full_name: &str, value: &mut Value) {
    let Value::Object(object) = value else {
        // A wrapper's value takes the spellings its scalar does.
        match (full_name, &*value) {
            ("google.protobuf.BoolValue", Value::String(text)) => {
                if let Some(truth) = yaml_boolean(text) {
                    *value = Value::Bool(truth);
                }
            }
            ("google.protobuf.StringValue", Value::Number(number)) => {
                *value = Value::String(number.to_string());
            }
            _ => {}
        }
        return;
    };
    let integer = |value: &Value| match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    };
    if full_name == "google.protobuf.Duration" {
        if !object.keys().all(|key| key == "seconds" || key == "nanos") {
            return;
        }
        let seconds = object.get("seconds").map_or(Some(0), integer);
        let nanos = object.get("nanos").map_or(Some(0), integer);
        if let (Some(seconds), Some(nanos)) = (seconds, nanos)
            && (0..1_000_000_000).contains(&nanos)
            && seconds >= 0
        {
            *value = Value::String(format!("{seconds}.{nanos:09}s"));
        }
        return;
    }
    const WRAPPERS: [&str; 9] = [
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    ];
    let is_wrapper = WRAPPERS.contains(&full_name);
    if is_wrapper && object.len() == 1 && object.contains_key("value") {
        let inner = object.remove("value").unwrap_or(Value::Null);
        *value = inner;
    }
}

fn check_any(
    object: &mut serde_json::Map<String, Value>,
    path: &mut FieldPath,
) -> Result<(), MappingError> {
    let Some(type_url) = object.get("@type") else {
        return Err(MappingError::at(
            path,
            "an Any needs an \"@type\" naming its message type",
        ));
    };
    let Some(type_url) = type_url.as_str().map(str::to_owned) else {
        return Err(MappingError::at(path, "\"@type\" must be a string"));
    };
    let name = crate::type_urls::message_name(&type_url);
    if TYPED_STRUCTS.contains(&name) {
        return check_typed_struct(object, path);
    }
    let Some(descriptor) = descriptor_pool().get_message_by_name(name) else {
        return Err(MappingError::at(
            path,
            format!(
                "unsupported type {type_url:?} in \"@type\": Remora does not know this message"
            ),
        ));
    };
    // Any host names the type (Envoy reads only what follows the last `/`); the converters
    // compare type URLs whole, so the one host they know is written here.
    let canonical = format!("{}{name}", crate::type_urls::PREFIX);
    if type_url != canonical {
        object.insert("@type".to_string(), Value::String(canonical));
    }
    if has_special_json_form(descriptor.full_name()) {
        return Ok(());
    }
    check_fields(&descriptor, object, Some("@type"), path)
}

/// The two spellings of a `TypedStruct`: a message named by `type_url`, written as the JSON of
/// its fields in `value` (Istio wraps its extensions so). Envoy reads it as that message.
const TYPED_STRUCTS: [&str; 2] = ["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"];

/// Rewrites a `TypedStruct` Any as the Any it stands for, then checks that one.
fn check_typed_struct(
    object: &mut serde_json::Map<String, Value>,
    path: &mut FieldPath,
) -> Result<(), MappingError> {
    for key in object.keys() {
        if !["@type", "type_url", "typeUrl", "value"].contains(&key.as_str()) {
            path.0.push(Segment::Field(key.clone()));
            return Err(MappingError::at(
                path,
                "a TypedStruct has only `type_url` and `value`",
            ));
        }
    }
    let type_url = object
        .get("type_url")
        .or_else(|| object.get("typeUrl"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(type_url) = type_url else {
        path.0.push(Segment::Field("type_url".into()));
        return Err(MappingError::at(
            path,
            "required: the type the struct stands for",
        ));
    };
    let mut inner = match object.remove("value") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(inner)) => inner,
        Some(other) => {
            path.0.push(Segment::Field("value".into()));
            return Err(MappingError::at(
                path,
                format!("expected an object, found {}", kind_of(&other)),
            ));
        }
    };
    inner.insert("@type".to_string(), Value::String(type_url));
    *object = inner;
    check_any(object, path)
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The field name closest to a misspelt one, if any is within two edits.
fn closest_field(descriptor: &MessageDescriptor, key: &str) -> Option<String> {
    descriptor
        .fields()
        .map(|field| (edit_distance(field.name(), key), field.name().to_string()))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::config::cluster::v3::Cluster;

    #[test]
    fn unknown_field_is_named_with_its_path_and_a_hint() {
        let error = from_yaml_str::<Cluster>(
            "name: a\nconnect_timeout: 1s\nload_assignment:\n  cluster_nme: a\n",
        )
        .unwrap_err();
        assert_eq!(error.path, "load_assignment.cluster_nme");
        assert!(
            error.reason.contains("did you mean `cluster_name`"),
            "{error}"
        );
    }

    #[test]
    fn durations_wrappers_and_enums_map_as_envoy_writes_them() {
        let cluster: Cluster = from_yaml_str(
            "name: a\nconnect_timeout: 1.5s\ntype: STRICT_DNS\nper_connection_buffer_limit_bytes: 32768\n",
        )
        .unwrap();
        let timeout = cluster.connect_timeout.unwrap();
        assert_eq!((timeout.seconds, timeout.nanos), (1, 500_000_000));
        assert_eq!(cluster.per_connection_buffer_limit_bytes, Some(32768));
        let back = to_value(&cluster).unwrap();
        assert_eq!(back["connect_timeout"], "1.500s");
        assert_eq!(back["type"], "STRICT_DNS");
    }

    #[test]
    fn lowercase_enums_and_a_single_value_for_a_list_are_read_as_envoy_reads_them() {
        let cluster: Cluster = from_yaml_str(concat!(
            "name: a\ntype: strict_dns\nlb_policy: least_request\n",
            "load_assignment:\n  cluster_name: a\n  endpoints:\n    lb_endpoints:\n",
            "      endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}\n",
            "transport_socket:\n  name: tls\n  typed_config:\n",
            "    \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n",
            "    common_tls_context: {alpn_protocols: h2}\n",
        ))
        .unwrap();
        let back = to_value(&cluster).unwrap();
        assert_eq!(back["type"], "STRICT_DNS");
        assert_eq!(back["lb_policy"], "LEAST_REQUEST");
        let endpoints = &back["load_assignment"]["endpoints"];
        assert_eq!(
            endpoints[0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"],
            1
        );
        let tls = &back["transport_socket"]["typed_config"];
        assert_eq!(tls["common_tls_context"]["alpn_protocols"][0], "h2");

        let error = from_yaml_str::<Cluster>("name: a\nlb_policy: round_robbin\n").unwrap_err();
        assert_eq!(error.path, "lb_policy", "{error}");

        // A type URL on another host names the same type.
        let cluster: Cluster = from_yaml_str(concat!(
            "name: a\ntransport_socket:\n  name: tls\n  typed_config:\n",
            "    \"@type\": example.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n",
            "    sni: a.example\n",
        ))
        .unwrap();
        let any = cluster.transport_socket.unwrap().config_type.unwrap();
        let crate::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any) = any;
        assert_eq!(any.type_url, crate::type_urls::UPSTREAM_TLS_CONTEXT);
    }

    #[test]
    fn a_typed_struct_is_read_as_the_message_it_names() {
        for wrapper in ["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"] {
            let cluster: Cluster = from_yaml_str(&format!(
                "name: a\ntransport_socket:\n  name: tls\n  typed_config:\n    \"@type\": type.googleapis.com/{wrapper}\n    type_url: type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n    value: {{sni: a.example}}\n"
            ))
            .unwrap();
            let any = cluster.transport_socket.unwrap().config_type.unwrap();
            let crate::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any) =
                any;
            assert_eq!(any.type_url, crate::type_urls::UPSTREAM_TLS_CONTEXT);
            let tls = encoded_to_value(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                &any.value,
            )
            .unwrap();
            assert_eq!(tls["sni"], "a.example");
        }
        let error = from_yaml_str::<Cluster>(
            "name: a\ntransport_socket:\n  name: tls\n  typed_config:\n    \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n    type_url: type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n    value: {snii: a.example}\n",
        )
        .unwrap_err();
        assert_eq!(error.path, "transport_socket.typed_config.snii", "{error}");
        let error = from_yaml_str::<Cluster>(
            "name: a\ntransport_socket:\n  name: tls\n  typed_config:\n    \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n    value: {}\n",
        )
        .unwrap_err();
        assert_eq!(
            error.path, "transport_socket.typed_config.type_url",
            "{error}"
        );
    }

    #[test]
    fn durations_and_wrappers_written_as_their_fields_and_yaml_spellings_are_read() {
        let cluster: Cluster = from_yaml_str(concat!(
            "name: a\nconnect_timeout: {seconds: 2, nanos: 500000000}\n",
            "per_connection_buffer_limit_bytes: {value: 32768}\n",
            "respect_dns_ttl: on\nwait_for_warm_on_init: 'yes'\n",
        ))
        .unwrap();
        let timeout = cluster.connect_timeout.unwrap();
        assert_eq!((timeout.seconds, timeout.nanos), (2, 500_000_000));
        assert_eq!(cluster.per_connection_buffer_limit_bytes, Some(32768));
        let back = to_value(&cluster).unwrap();
        assert_eq!(back["respect_dns_ttl"], true);
        assert_eq!(cluster.wait_for_warm_on_init, Some(true));
        let cluster: Cluster =
            from_yaml_str("name: a\nconnect_timeout: {nanos: 250000000}\nrespect_dns_ttl: 'no'\n")
                .unwrap();
        assert_eq!(cluster.connect_timeout.unwrap().nanos, 250_000_000);
        assert!(!cluster.respect_dns_ttl);

        // A number where a string is expected is read as its text; a wrong shape still fails.
        let cluster: Cluster = from_yaml_str("name: 1.50\n").unwrap();
        assert_eq!(cluster.name, "1.5");
        let error = from_yaml_str::<Cluster>("name: a\nconnect_timeout: {seconds: 1, nanos: -1}\n")
            .unwrap_err();
        assert_eq!(error.path, "connect_timeout", "{error}");
        let error = from_yaml_str::<Cluster>("name: a\nrespect_dns_ttl: maybe\n").unwrap_err();
        assert_eq!(error.path, "respect_dns_ttl", "{error}");
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("cluster_name", "cluster_nme"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "ab"), 2);
    }
}
