//! Route matching against arbitrary request heads: every inline route table of the
//! repository's example bootstraps, a host, a path and headers as the proxy would have parsed
//! them (a header-value host, lower-cased, port stripped or not; a valid path and query), and
//! what a match leads to (rewritten path, redirect location). Must never panic.
//!
//! Input: byte 0 picks the table (and, by its top bit, whether the port is stripped), then
//! lines: host, path and query, then `name: value` headers.
#![no_main]

use std::sync::{Arc, OnceLock};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use remora_config::hcm::RouteSource;
use remora_config::route::{Action, Files, RouteTable, strip_port};

#[path = "../examples.rs"]
mod examples;

fn tables() -> &'static [Arc<RouteTable>] {
    static TABLES: OnceLock<Vec<Arc<RouteTable>>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut tables = Vec::new();
        for (name, text) in examples::bootstraps() {
            let proto = xds_api::json::from_config_str(&text)
                .unwrap_or_else(|e| panic!("example {name}: {e}"));
            // Only the examples Remora accepts have tables (as `seed_corpus` counts them).
            let Ok(bootstrap) = remora_config::bootstrap::bootstrap_files(&proto, Files::Skip)
            else {
                continue;
            };
            for listener in &bootstrap.listeners {
                for hcm in listener.connection_managers() {
                    if let RouteSource::Inline(table) = &hcm.routes {
                        tables.push(table.clone());
                    }
                }
            }
        }
        assert!(!tables.is_empty(), "no route tables in the examples");
        tables
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&selector, rest)) = bytes.split_first() else {
        return;
    };
    let tables = tables();
    let table = &tables[usize::from(selector & 0x7f) % tables.len()];
    let mut lines = rest.split(|&b| b == b'\n');
    let (Some(host), Some(path)) = (lines.next(), lines.next()) else {
        return;
    };
    // As the proxy has them: the authority is a header value, the path parsed by `http`.
    let Ok(host) = HeaderValue::from_bytes(host) else {
        return;
    };
    let Ok(host) = host.to_str() else {
        return;
    };
    let Ok(path) = http::uri::PathAndQuery::try_from(path) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let host = if selector & 0x80 != 0 {
        strip_port(host)
    } else {
        host
    };
    let host = host.to_ascii_lowercase();
    let path = path.as_str();
    let _ = table.virtual_host(&host);
    let Some((_, route)) = table.route(&host, path, &headers) else {
        return;
    };
    match &route.action {
        Action::Forward(forward) => {
            let _ = forward.rewrite_path(route, path);
            let _ = forward.allows_upgrade("websocket", &["websocket".into()]);
        }
        Action::Redirect(redirect) => {
            let _ = redirect.location(route, "http", &host, path);
            let _ = redirect.location(route, "https", &host, path);
        }
        Action::Direct { .. } => {}
    }
    let _ = remora_config::filters::find(&route.per_filter, "envoy.filters.http.cors");
    let _ = remora_config::route::is_grpc(&headers);
});
