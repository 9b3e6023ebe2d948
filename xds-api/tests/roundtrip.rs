//! Envoy-shaped configs survive our types: YAML → typed `Bootstrap` → binary → typed → JSON keeps
//! every value the YAML set, and the binary re-encodes identically. This is what lets the proxy
//! read Envoy's bootstraps and the control plane store and serve Envoy's resources unchanged.

use std::path::PathBuf;

use prost::Message;
use serde_json::Value;
use xds_api::envoy::config::bootstrap::v3::Bootstrap;
use xds_api::prost_reflect::{DynamicMessage, ReflectMessage, SerializeOptions};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .expect("fixtures directory")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

/// Durations in seconds as an exact nanosecond count, so "0.25s" equals "0.250s".
fn duration_nanos(text: &str) -> Option<i128> {
    let number = text.strip_suffix('s')?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.len() > 9 {
        return None;
    }
    let whole: i128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let fraction: i128 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().ok()?
    };
    Some(whole * 1_000_000_000 + fraction)
}

fn same_leaf(original: &Value, round_tripped: &Value) -> bool {
    if original == round_tripped {
        return true;
    }
    match (original, round_tripped) {
        (Value::String(a), Value::String(b)) => {
            matches!((duration_nanos(a), duration_nanos(b)), (Some(x), Some(y)) if x == y)
        }
        // 64-bit integers may be written as numbers or strings.
        (Value::Number(a), Value::String(b)) | (Value::String(b), Value::Number(a)) => {
            a.to_string() == *b
        }
        _ => false,
    }
}

/// Every value set in `original` is present and equal in `round_tripped` (which also carries
/// defaults). Returns the paths that differ.
fn missing_values(original: &Value, round_tripped: &Value, path: String, out: &mut Vec<String>) {
    match (original, round_tripped) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let child = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => missing_values(value, other, child, out),
                    None => out.push(format!("{child}: {value} was dropped")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                out.push(format!("{path}: {} items became {}", a.len(), b.len()));
                return;
            }
            for (index, (x, y)) in a.iter().zip(b).enumerate() {
                missing_values(x, y, format!("{path}[{index}]"), out);
            }
        }
        (a, b) if same_leaf(a, b) => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

#[test]
fn envoy_shaped_configs_round_trip_with_nothing_lost() {
    let names = fixture_names();
    assert!(
        names.len() >= 5,
        "expected the fixture corpus, found {names:?}"
    );
    for name in names {
        let text = std::fs::read_to_string(fixtures().join(&name)).expect("read fixture");
        let original = xds_api::json::parse_yaml(&text).expect("fixture is YAML");

        let bootstrap: Bootstrap = xds_api::json::from_yaml_str(&text)
            .unwrap_or_else(|error| panic!("{name}: our types reject it: {error}"));
        let bytes = bootstrap.encode_to_vec();
        let decoded = Bootstrap::decode(bytes.as_slice()).expect("decode our own encoding");
        assert_eq!(
            decoded, bootstrap,
            "{name}: binary round trip changed the message"
        );
        assert_eq!(
            decoded.encode_to_vec(),
            bytes,
            "{name}: re-encoding is not stable"
        );

        // Serialise with defaults so a value equal to its default is not mistaken for a loss.
        let descriptor = xds_api::json::descriptor("envoy.config.bootstrap.v3.Bootstrap").unwrap();
        let dynamic = DynamicMessage::decode(descriptor, bytes.as_slice()).unwrap();
        let options = SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(false)
            .stringify_64_bit_integers(false);
        let with_defaults = dynamic
            .serialize_with_options(serde_json::value::Serializer, &options)
            .unwrap();
        let mut lost = Vec::new();
        missing_values(&original, &with_defaults, String::new(), &mut lost);
        assert!(
            lost.is_empty(),
            "{name}: values lost in the round trip:\n{}",
            lost.join("\n")
        );

        // The compact form (what we write out) reads back to the same message.
        let compact = xds_api::json::to_value(&decoded).unwrap();
        let again: Bootstrap = xds_api::json::from_value(&compact).unwrap();
        assert_eq!(
            again, bootstrap,
            "{name}: JSON output does not read back identically"
        );
    }
}

#[test]
fn the_round_trip_check_notices_a_lost_value() {
    // Guards the guard: a value our types drop must be reported.
    let original: Value = serde_json::json!({"a": {"b": "1.5s", "c": [1, 2]}});
    let damaged: Value = serde_json::json!({"a": {"b": "1.500s", "c": [1]}});
    let mut lost = Vec::new();
    missing_values(&original, &damaged, String::new(), &mut lost);
    assert_eq!(lost, vec![".a.c: 2 items became 1".to_string()]);
    assert_eq!(duration_nanos("0.25s"), duration_nanos("0.250s"));
    assert_ne!(duration_nanos("1s"), duration_nanos("1.001s"));
}

#[test]
fn unknown_fields_inside_typed_config_are_named_with_their_path() {
    let text = std::fs::read_to_string(fixtures().join("static_http_proxy.yaml"))
        .unwrap()
        .replace("stat_prefix: ingress_http", "stat_prefx: ingress_http");
    let error = xds_api::json::from_yaml_str::<Bootstrap>(&text).unwrap_err();
    assert_eq!(
        error.path,
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.stat_prefx"
    );
    assert!(
        error.reason.contains("did you mean `stat_prefix`"),
        "{error}"
    );
}

#[test]
fn unknown_any_type_is_rejected_by_name() {
    let text = "static_resources:\n  listeners:\n  - name: l\n    filter_chains:\n    - filters:\n      - name: x\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy\n";
    let error = xds_api::json::from_yaml_str::<Bootstrap>(text).unwrap_err();
    assert!(
        error.reason.contains("redis_proxy.v3.RedisProxy"),
        "{error}"
    );
    assert_eq!(
        error.path,
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
    );
}

#[test]
fn any_packs_and_unpacks_by_type_url() {
    use xds_api::envoy::config::cluster::v3::Cluster;
    use xds_api::envoy::config::listener::v3::Listener;
    let cluster = Cluster {
        name: "c".into(),
        ..Default::default()
    };
    let any = xds_api::any::pack(&cluster);
    assert_eq!(any.type_url, xds_api::type_urls::CLUSTER);
    assert_eq!(xds_api::any::unpack::<Cluster>(&any).unwrap(), cluster);
    assert!(xds_api::any::unpack::<Listener>(&any).is_err());
    assert!(xds_api::any::is_known(
        xds_api::type_urls::ROUTE_CONFIGURATION
    ));
    assert!(!xds_api::any::is_known("type.googleapis.com/not.a.Type"));
    let dynamic = xds_api::any::unpack_dynamic(&any).unwrap();
    assert_eq!(
        dynamic.descriptor().full_name(),
        "envoy.config.cluster.v3.Cluster"
    );
}
