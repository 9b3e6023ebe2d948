//! The repository's example bootstraps (the differential corpus, the xds-api fixtures, the
//! benchmark's), with `${VARIABLE}` placeholders filled in: seeds for the fuzzers and the route
//! tables `route_match` matches against.

/// `(name, YAML text)` of each example.
pub fn bootstraps() -> Vec<(&'static str, String)> {
    let texts: [(&'static str, &'static str); 11] = [
        (
            "corpus-cors",
            include_str!("../../proxy/tests/corpus/cors.yaml"),
        ),
        (
            "corpus-headers",
            include_str!("../../proxy/tests/corpus/headers.yaml"),
        ),
        (
            "corpus-rewrites",
            include_str!("../../proxy/tests/corpus/rewrites.yaml"),
        ),
        (
            "corpus-routing",
            include_str!("../../proxy/tests/corpus/routing.yaml"),
        ),
        (
            "corpus-vhosts",
            include_str!("../../proxy/tests/corpus/vhosts.yaml"),
        ),
        (
            "fixture-ads-bootstrap",
            include_str!("../../xds-api/tests/fixtures/ads_bootstrap.yaml"),
        ),
        (
            "fixture-routing-features",
            include_str!("../../xds-api/tests/fixtures/routing_features.yaml"),
        ),
        (
            "fixture-static-http-proxy",
            include_str!("../../xds-api/tests/fixtures/static_http_proxy.yaml"),
        ),
        (
            "fixture-tcp-proxy",
            include_str!("../../xds-api/tests/fixtures/tcp_proxy.yaml"),
        ),
        (
            "fixture-tls-listener",
            include_str!("../../xds-api/tests/fixtures/tls_listener.yaml"),
        ),
        (
            "bench-http-tcp",
            include_str!("../../bench/bootstraps/http-tcp.yaml.in"),
        ),
    ];
    texts
        .into_iter()
        .map(|(name, text)| (name, fill_placeholders(text)))
        .collect()
}

/// `${NAME}` becomes a port number (each name its own), `${EXTRA_CLUSTERS}` nothing.
fn fill_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut names: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + end];
        if name != "EXTRA_CLUSTERS" {
            let index = names.iter().position(|n| n == name).unwrap_or_else(|| {
                names.push(name.to_string());
                names.len() - 1
            });
            out.push_str(&(20000 + index).to_string());
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}
