//! The wire gate: before a resource is decoded, its bytes are walked against the field tables
//! `xds_api::schema` generates at build time, so a field our protos do not declare (prost would
//! drop it silently) is an error naming where it is, and every `Any` must hold a type Remora
//! knows. Which declared fields Remora honours is decided by each area's converter, which reads
//! every field by name.

use xds_api::schema::{self, FieldKind, FieldSchema, MessageSchema, WireValue};

use crate::error::ConfigError;

/// Checks a prost message of type `M` as it would be encoded; `root` prefixes paths.
pub fn check<M: prost::Message + prost::Name>(message: &M, root: &str) -> Result<(), ConfigError> {
    check_bytes(&M::full_name(), &message.encode_to_vec(), root)
}

/// Checks wire bytes of the message `full_name` (e.g. an xDS resource payload).
pub fn check_bytes(full_name: &str, bytes: &[u8], root: &str) -> Result<(), ConfigError> {
    let schema = schema::message(full_name)
        .ok_or_else(|| ConfigError::new(root, format!("unknown message type {full_name}")))?;
    check_message(schema, bytes, root)
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// The fields of one message as read from the wire: declared fields with every occurrence in
/// wire order, grouped by field number in ascending order.
type Occurrences<'a> = Vec<(&'static FieldSchema, Vec<WireValue<'a>>)>;

fn read_fields<'a>(
    schema: &MessageSchema,
    bytes: &'a [u8],
    path: &str,
) -> Result<Occurrences<'a>, ConfigError> {
    let mut fields: Occurrences<'a> = Vec::new();
    let mut unknown: Option<u32> = None;
    for field in schema::fields(bytes) {
        let field = field.map_err(|error| {
            ConfigError::new(path, format!("cannot decode {}: {error}", schema.name))
        })?;
        let Some(declared) = schema.field(field.number) else {
            unknown = Some(unknown.map_or(field.number, |lowest| lowest.min(field.number)));
            continue;
        };
        match fields
            .iter_mut()
            .find(|(seen, _)| seen.number == field.number)
        {
            Some((_, values)) => values.push(field.value),
            None => fields.push((declared, vec![field.value])),
        }
    }
    if let Some(number) = unknown {
        return Err(ConfigError::new(
            path,
            format!("field number {number} is not known to Remora"),
        ));
    }
    fields.sort_by_key(|(field, _)| field.number);
    Ok(fields)
}

/// Whether a field read from the wire counts as set, as proto3 defines presence: a singular
/// scalar without explicit presence only when its last value is not the default.
fn is_set(field: &FieldSchema, values: &[WireValue]) -> bool {
    field.repeated || field.presence || values.last().is_some_and(|value| !value.is_default())
}

fn message_bytes<'a>(value: &WireValue<'a>, path: &str) -> Result<&'a [u8], ConfigError> {
    match *value {
        WireValue::Bytes(bytes) => Ok(bytes),
        _ => Err(ConfigError::new(
            path,
            "cannot decode: a message field has a scalar wire type",
        )),
    }
}

/// The last value of field `number` in `bytes` as raw wire bytes (proto3: last one wins).
fn last_bytes(bytes: &[u8], number: u32) -> Option<&[u8]> {
    schema::fields(bytes)
        .map_while(Result::ok)
        .filter(|field| field.number == number)
        .filter_map(|field| match field.value {
            WireValue::Bytes(bytes) => Some(bytes),
            _ => None,
        })
        .last()
}

fn check_message(schema: &MessageSchema, bytes: &[u8], path: &str) -> Result<(), ConfigError> {
    let full_name = schema.name;
    if full_name.starts_with("google.protobuf.") && full_name != "google.protobuf.Any" {
        return Ok(());
    }
    let fields = read_fields(schema, bytes, path)?;
    if full_name == "google.protobuf.Any" {
        return check_any(bytes, path);
    }
    for (field, values) in &fields {
        if !is_set(field, values) {
            continue;
        }
        let field_path = join(path, field.name);
        match field.kind {
            FieldKind::Scalar => {}
            FieldKind::Message(_) => {
                let inner = field.kind.message().expect("message kind has a schema");
                for (index, value) in values.iter().enumerate() {
                    let item_path = if field.repeated {
                        format!("{field_path}[{index}]")
                    } else {
                        field_path.clone()
                    };
                    check_message(inner, message_bytes(value, &item_path)?, &item_path)?;
                }
            }
            FieldKind::Map { value } => {
                let Some(value_schema) = value.map(|index| &schema::MESSAGES[index]) else {
                    continue;
                };
                for entry in values {
                    let entry = message_bytes(entry, &field_path)?;
                    let key = last_bytes(entry, 1)
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    let entry_path = format!("{field_path}[{key:?}]");
                    let value = last_bytes(entry, 2).unwrap_or_default();
                    check_message(value_schema, value, &entry_path)?;
                }
            }
        }
    }
    Ok(())
}

/// An `Any`: its payload is checked as the message its type URL names. A type Remora does not
/// know is left to the converter that reads the field, which names what it expected (or, for
/// an optional HTTP filter, leaves it out as Envoy does).
fn check_any(bytes: &[u8], path: &str) -> Result<(), ConfigError> {
    let type_url = last_bytes(bytes, 1)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let name = xds_api::type_urls::message_name(&type_url);
    match schema::message(name) {
        Some(schema) => check_message(schema, last_bytes(bytes, 2).unwrap_or_default(), path),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_numbers_are_named() {
        let cluster = xds_api::envoy::config::cluster::v3::Cluster {
            name: "a".into(),
            ..Default::default()
        };
        let mut bytes = prost::Message::encode_to_vec(&cluster);
        // Field 999, varint 1: not declared by Cluster.
        bytes.extend_from_slice(&[0xb8, 0x3e, 0x01]);
        let error = check_bytes("envoy.config.cluster.v3.Cluster", &bytes, "cluster")
            .expect_err("unknown field");
        assert_eq!(error.path, "cluster");
        assert!(error.to_string().contains("field number 999"), "{error}");
        let error = check_bytes(
            "envoy.config.cluster.v3.Cluster",
            &bytes[..bytes.len() - 1],
            "c",
        )
        .expect_err("truncated");
        assert!(error.to_string().contains("cannot decode"), "{error}");
    }

    #[test]
    fn the_payload_of_an_any_is_walked_too() {
        use xds_api::envoy::config::listener::v3 as listener_pb;
        let tcp = xds_api::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy {
            stat_prefix: "t".into(),
            ..Default::default()
        };
        let mut payload = prost::Message::encode_to_vec(&tcp);
        payload.extend_from_slice(&[0xb8, 0x3e, 0x01]);
        let listener = listener_pb::Listener {
            name: "l".into(),
            filter_chains: vec![listener_pb::FilterChain {
                filters: vec![listener_pb::Filter {
                    name: "f".into(),
                    config_type: Some(listener_pb::filter::ConfigType::TypedConfig(
                        prost_types::Any {
                            type_url: xds_api::type_urls::TCP_PROXY.into(),
                            value: payload,
                        },
                    )),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let error = check(&listener, "").expect_err("unknown field in the payload");
        assert_eq!(error.path, "filter_chains[0].filters[0].typed_config");
        assert!(error.reason.contains("field number 999"), "{error}");
    }
}
