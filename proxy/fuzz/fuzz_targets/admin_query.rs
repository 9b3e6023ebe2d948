//! The admin's query parsing, on whatever a client sends: a `/stats` query (filter regex,
//! type, usedonly, format, percent decoding), a `/config_dump` query (resource, field mask
//! applied to a dump) and `/drain_listeners` flags. Must answer or refuse, never panic.
//!
//! Input: the query, as the proxy gets it from a parsed request target.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proxy::admin::fuzzing;
use remora_proxy::stats::{Kind, StatValue};

fn stat(name: &str, kind: Kind, value: u64, used: bool) -> StatValue {
    StatValue {
        name: name.into(),
        kind,
        value,
        used,
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(format!("/stats?{text}")) else {
        return;
    };
    let query = uri.query().unwrap_or("");
    let stats = [
        stat("cluster.echo.upstream_rq_total", Kind::Counter, 3, true),
        stat("cluster.echo.upstream_cx_active", Kind::Gauge, 0, true),
        stat(
            "listener.127.0.0.1_15001.downstream_cx_total",
            Kind::Counter,
            0,
            false,
        ),
        stat("http.ingress.downstream_rq_2xx", Kind::Counter, 1, true),
    ];
    let _ = fuzzing::stats(query, &stats);
    let mut dump = serde_json::json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
         "static_clusters": [{"cluster": {"name": "echo", "type": "STATIC",
             "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {}}]}]}}}],
         "dynamic_active_clusters": []},
        {"bootstrap": {"node": {"id": "n", "metadata": {"a": {"b": [1, 2]}}}}},
    ]});
    let _ = fuzzing::config_dump(query, &mut dump);
    let _ = fuzzing::drain_flags(query);
});
