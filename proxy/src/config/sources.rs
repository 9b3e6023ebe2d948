//! Where the bootstrap comes from: `-c FILE` (YAML or JSON), `--config-yaml` (merged over the
//! file with protobuf merge semantics, as Envoy does), or `--bootstrap-from-env` (the sidecar
//! injector's environment variables).

use prost::Message;
use xds_api::envoy::config::bootstrap::v3::Bootstrap as BootstrapProto;

use super::{Bootstrap, ConfigError};

/// The sources named on the command line.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub config_path: Option<std::path::PathBuf>,
    pub config_yaml: Option<String>,
    pub from_env: bool,
    pub service_node: Option<String>,
    pub service_cluster: Option<String>,
}

fn parse(text: &str, origin: &str) -> Result<BootstrapProto, ConfigError> {
    xds_api::json::from_config_str::<BootstrapProto>(text)
        .map_err(|e| ConfigError::new(e.path.clone(), format!("{} (in {origin})", e.reason)))
}

/// Reads, merges and converts the bootstrap.
pub fn load(sources: &Sources) -> Result<Bootstrap, ConfigError> {
    let mut bytes = Vec::new();
    let mut any = false;
    if sources.from_env {
        let text = from_env()?;
        parse(&text, "--bootstrap-from-env")?
            .encode(&mut bytes)
            .map_err(|e| ConfigError::new("", e.to_string()))?;
        any = true;
    }
    if let Some(path) = &sources.config_path {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        parse(&text, &path.display().to_string())?
            .encode(&mut bytes)
            .map_err(|e| ConfigError::new("", e.to_string()))?;
        any = true;
    }
    if let Some(yaml) = &sources.config_yaml {
        parse(yaml, "--config-yaml")?
            .encode(&mut bytes)
            .map_err(|e| ConfigError::new("", e.to_string()))?;
        any = true;
    }
    if !any {
        return Err(ConfigError::new(
            "",
            "no bootstrap: give -c FILE, --config-yaml or --bootstrap-from-env",
        ));
    }
    // Concatenated encodings decode as a protobuf merge, which is what Envoy does with
    // --config-yaml over -c.
    let mut proto = BootstrapProto::decode(bytes.as_slice())
        .map_err(|e| ConfigError::new("", e.to_string()))?;
    if sources.service_node.is_some() || sources.service_cluster.is_some() {
        let node = proto.node.get_or_insert_with(Default::default);
        if let Some(id) = &sources.service_node {
            node.id = id.clone();
        }
        if let Some(cluster) = &sources.service_cluster {
            node.cluster = cluster.clone();
        }
    }
    remora_config::bootstrap::bootstrap(&proto)
}

fn env(name: &str) -> Result<String, ConfigError> {
    std::env::var(name)
        .map_err(|_| ConfigError::new("", format!("--bootstrap-from-env: {name} is not set")))
}

/// The bootstrap the injector's environment describes: node identity, admin on loopback, and
/// ADS to REMORA_XDS_ADDRESS, over TLS checked against the CA bundle in the file
/// REMORA_XDS_CA when set (and the server's SAN against REMORA_XDS_SAN: a `spiffe://` URI or a
/// DNS name). The redirect ports travel in node metadata so the control plane can build the
/// inbound and outbound listeners.
pub fn from_env() -> Result<String, ConfigError> {
    let node_id = env("REMORA_NODE_ID")?;
    let node_cluster = std::env::var("REMORA_NODE_CLUSTER").unwrap_or_default();
    let xds = env("REMORA_XDS_ADDRESS")?;
    let (xds_host, xds_port) = xds
        .rsplit_once(':')
        .and_then(|(host, port)| {
            port.parse::<u16>()
                .ok()
                .map(|port| (host.trim_matches(['[', ']']).to_string(), port))
        })
        .ok_or_else(|| {
            ConfigError::new("", format!("REMORA_XDS_ADDRESS {xds:?} is not host:port"))
        })?;
    let admin_port: u16 = std::env::var("REMORA_ADMIN_PORT")
        .unwrap_or_else(|_| "15000".into())
        .parse()
        .map_err(|_| ConfigError::new("", "REMORA_ADMIN_PORT is not a port"))?;
    let inbound = std::env::var("REMORA_INBOUND_PORT").unwrap_or_else(|_| "15006".into());
    let outbound = std::env::var("REMORA_OUTBOUND_PORT").unwrap_or_else(|_| "15001".into());
    let cluster_type = if xds_host.parse::<std::net::IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    let mut value = serde_json::json!({
        "node": {
            "id": node_id,
            "cluster": node_cluster,
            "metadata": {"REMORA_INBOUND_PORT": inbound, "REMORA_OUTBOUND_PORT": outbound},
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [{
                "name": "xds_cluster",
                "type": cluster_type,
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
                "load_assignment": {
                    "cluster_name": "xds_cluster",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": xds_host, "port_value": xds_port}}}}]}],
                },
            }],
        },
    });
    if let Ok(ca) = std::env::var("REMORA_XDS_CA") {
        let mut validation = serde_json::json!({"trusted_ca": {"filename": ca}});
        if let Ok(san) = std::env::var("REMORA_XDS_SAN") {
            let san_type = if san.starts_with("spiffe://") {
                "URI"
            } else {
                "DNS"
            };
            validation["match_typed_subject_alt_names"] =
                serde_json::json!([{"san_type": san_type, "matcher": {"exact": san}}]);
        }
        let mut context = serde_json::json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": validation},
        });
        if cluster_type == "STRICT_DNS" {
            context["sni"] = serde_json::Value::String(xds_host.clone());
        }
        value["static_resources"]["clusters"][0]["transport_socket"] =
            serde_json::json!({"name": "envoy.transport_sockets.tls", "typed_config": context});
    }
    Ok(value.to_string())
}
