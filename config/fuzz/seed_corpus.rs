//! Writes the seed corpora, `corpus/TARGET/`, from the repository's example bootstraps
//! (`examples.rs`) and the differential corpus's request cases:
//! `cargo +nightly run --bin seed_corpus` (from `config/fuzz`).

use std::path::Path;

use prost::Message;
use remora_config::hcm::RouteSource;
use remora_config::route::Files;
use xds_api::envoy::config::bootstrap::v3::Bootstrap;
use xds_api::envoy::config::listener::v3::filter::ConfigType;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;

mod examples;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

/// The differential corpus's request cases, by the example whose table they are for.
const CASES: [(&str, &str); 5] = [
    (
        "corpus-cors",
        include_str!("../../proxy/tests/corpus/cors.cases.yaml"),
    ),
    (
        "corpus-headers",
        include_str!("../../proxy/tests/corpus/headers.cases.yaml"),
    ),
    (
        "corpus-rewrites",
        include_str!("../../proxy/tests/corpus/rewrites.cases.yaml"),
    ),
    (
        "corpus-routing",
        include_str!("../../proxy/tests/corpus/routing.cases.yaml"),
    ),
    (
        "corpus-vhosts",
        include_str!("../../proxy/tests/corpus/vhosts.cases.yaml"),
    ),
];

fn main() {
    // `route_match` numbers the inline route tables of the examples in this order.
    let mut table_index = 0usize;
    for (name, text) in examples::bootstraps() {
        write("bootstrap_text", &format!("{name}.yaml"), text.as_bytes());
        let proto: Bootstrap =
            xds_api::json::from_config_str(&text).unwrap_or_else(|e| panic!("example {name}: {e}"));
        write(
            "bootstrap_wire",
            &format!("{name}.bin"),
            &proto.encode_to_vec(),
        );
        let resources = proto.static_resources.clone().unwrap_or_default();
        for (i, listener) in resources.listeners.iter().enumerate() {
            write(
                "listener",
                &format!("{name}-{i}.bin"),
                &listener.encode_to_vec(),
            );
            for (j, chain) in listener.filter_chains.iter().enumerate() {
                for filter in &chain.filters {
                    let Some(ConfigType::TypedConfig(any)) = &filter.config_type else {
                        continue;
                    };
                    let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) else {
                        continue;
                    };
                    if let Some(RouteSpecifier::RouteConfig(routes)) = &hcm.route_specifier {
                        let seed = format!("{name}-{i}-{j}.bin");
                        write("route_configuration", &seed, &routes.encode_to_vec());
                    }
                }
            }
        }
        for (i, cluster) in resources.clusters.iter().enumerate() {
            write(
                "cluster",
                &format!("{name}-{i}.bin"),
                &cluster.encode_to_vec(),
            );
            if let Some(assignment) = &cluster.load_assignment {
                let mut assignment = assignment.clone();
                assignment.cluster_name = cluster.name.clone();
                let seed = format!("{name}-{i}.bin");
                write(
                    "cluster_load_assignment",
                    &seed,
                    &assignment.encode_to_vec(),
                );
            }
        }
        // Examples Remora refuses (the xds-api fixtures show Envoy features) still seed the
        // gate's targets, but have no tables for `route_match`.
        let Ok(bootstrap) = remora_config::bootstrap::bootstrap_files(&proto, Files::Skip) else {
            continue;
        };
        let tables = bootstrap
            .listeners
            .iter()
            .flat_map(|listener| listener.connection_managers())
            .filter(|hcm| matches!(hcm.routes, RouteSource::Inline(_)))
            .count();
        if let Some((_, cases)) = CASES.iter().find(|(example, _)| *example == name) {
            // Request heads for the example's first table: `selector`, host, path, headers.
            let cases = xds_api::json::parse_yaml(cases).expect("cases YAML");
            for (i, case) in cases.as_array().into_iter().flatten().enumerate() {
                let headers = case["headers"].as_object();
                let host = headers
                    .and_then(|h| h.get("host"))
                    .and_then(|h| h.as_str())
                    .unwrap_or("localhost");
                let mut seed = vec![table_index as u8];
                seed.extend_from_slice(host.as_bytes());
                seed.push(b'\n');
                seed.extend_from_slice(case["path"].as_str().unwrap_or("/").as_bytes());
                for (key, value) in headers.into_iter().flatten() {
                    if key != "host" {
                        let line = format!("\n{key}: {}", value.as_str().unwrap_or(""));
                        seed.extend_from_slice(line.as_bytes());
                    }
                }
                write("route_match", &format!("{name}-{i}"), &seed);
            }
        }
        table_index += tables;
    }
}
