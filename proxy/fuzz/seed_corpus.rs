//! Writes the seed corpus, `corpus/admin_query/`: admin queries as the tests and Envoy's docs
//! send them. `cargo +nightly run --bin seed_corpus` (from `proxy/fuzz`).

use std::path::Path;

const QUERIES: &[&str] = &[
    "filter=%5Ecluster%5C.echo%5C.upstream_rq_total%24",
    "filter=^cluster\\.&usedonly",
    "usedonly&type=Counters&format=json",
    "type=Gauges&format=prometheus",
    "type=Histograms",
    "format=json&filter=(a|b)+",
    "resource=static_clusters&mask=cluster.name",
    "resource=dynamic_active_clusters&mask=cluster.name,cluster.load_assignment.endpoints",
    "mask=bootstrap.node.id,configs",
    "resource=bootstrap",
    "graceful&inboundonly",
    "filter=%a%C3%A9+%zz%",
];

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/admin_query");
    std::fs::create_dir_all(&dir).expect("corpus directory");
    for (index, query) in QUERIES.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{index}")), query).expect("seed file");
    }
}
