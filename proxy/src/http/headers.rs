//! Header handling the connection manager and router do for every request, as Envoy does it:
//! hop-by-hop headers stripped, `x-forwarded-for` / `-proto`, the trusted client address
//! (`use_remote_address`, `xff_num_trusted_hops`), `x-envoy-internal` and
//! `x-envoy-external-address`, Envoy's request control headers removed from untrusted
//! requests, `x-request-id`; and the route table's header mutations.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use remora_config::common::{AppendAction, HeaderMutations};

use crate::config::HttpConnectionManager;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
pub static X_ENVOY_EXTERNAL_ADDRESS: HeaderName =
    HeaderName::from_static("x-envoy-external-address");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Envoy's request control headers, honoured only from trusted (internal) downstreams.
const CONTROL_HEADERS: [&str; 10] = [
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
];

/// What the connection manager learnt about a request's origin.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The trusted client address: the direct peer, or what trusted proxies put in
    /// `x-forwarded-for`.
    pub client: SocketAddr,
    /// The request came from inside the network (a single internal address).
    pub internal: bool,
}

/// Envoy's internal addresses: RFC 1918, loopback, and IPv6 unique-local and loopback.
fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.is_private() || v4.is_loopback(),
            None => v6.is_loopback() || (v6.segments()[0] & 0xff00) == 0xfd00,
        },
    }
}

/// The address `hops` places from the right of `x-forwarded-for` (0: the last), and whether
/// the header held a single address.
fn xff_address(headers: &HeaderMap, hops: u32) -> (Option<IpAddr>, bool) {
    let Some(value) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) else {
        return (None, false);
    };
    let addresses: Vec<&str> = value.split(',').map(str::trim).collect();
    let single = addresses.len() == 1;
    let index = addresses.len().checked_sub(1 + hops as usize);
    let ip = index.and_then(|i| addresses[i].parse::<IpAddr>().ok());
    (ip, single)
}

/// The connection manager's request header handling, before filters and routing.
pub fn on_request(
    hcm: &HttpConnectionManager,
    headers: &mut HeaderMap,
    peer: SocketAddr,
    scheme: &'static str,
    upgrading: bool,
) -> Origin {
    remove_hop_by_hop(headers, upgrading);
    headers.remove(&X_ENVOY_INTERNAL);
    let trusted_hops = hcm.xff_num_trusted_hops;
    let (client, single) = if hcm.use_remote_address {
        let single = !headers.contains_key(&X_FORWARDED_FOR);
        // Trusted proxies in front: the client is the address they saw, before ours is added.
        let client = match trusted_hops {
            0 => None,
            hops => xff_address(headers, hops - 1).0,
        };
        if !hcm.skip_xff_append {
            let peer_ip = peer.ip().to_string();
            let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(existing) => format!("{existing},{peer_ip}"),
                None => peer_ip,
            };
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(&X_FORWARDED_FOR, value);
            }
        }
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
        (client.map(|ip| SocketAddr::new(ip, 0)), single)
    } else {
        let (ip, single) = xff_address(headers, trusted_hops);
        (ip.map(|ip| SocketAddr::new(ip, 0)), single)
    };
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
    let client_ip = client.or(hcm.use_remote_address.then_some(peer));
    let internal = single && client_ip.is_some_and(|c| is_internal(c.ip()));
    let client = client_ip.unwrap_or(peer);
    let edge = !internal && hcm.use_remote_address;
    if internal {
        headers.insert(&X_ENVOY_INTERNAL, HeaderValue::from_static("true"));
    } else {
        for name in CONTROL_HEADERS {
            headers.remove(name);
        }
    }
    if edge && let Ok(value) = HeaderValue::from_str(&client.ip().to_string()) {
        headers.insert(&X_ENVOY_EXTERNAL_ADDRESS, value);
    }
    if hcm.generate_request_id
        && ((edge && !hcm.preserve_external_request_id) || !headers.contains_key(&X_REQUEST_ID))
    {
        headers.insert(&X_REQUEST_ID, request_id());
    }
    Origin { client, internal }
}

fn request_id() -> HeaderValue {
    HeaderValue::from_bytes(&crate::uuid::v4()).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Strips the hop-by-hop headers, as Envoy does: `connection` and `upgrade` stay on an upgrade,
/// `te` stays when it is `trailers`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let candidates: [&HeaderName; 6] = [
        &header::CONNECTION,
        &header::UPGRADE,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TE,
    ];
    // One pass over the names instead of a hash lookup per candidate: most messages carry
    // none or one of them, and this runs twice per request.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(index) = candidates.iter().position(|candidate| *candidate == name) {
            present |= 1 << index;
        }
    }
    for (index, name) in candidates.into_iter().enumerate() {
        if present & (1 << index) == 0 {
            continue;
        }
        let keep = if *name == header::TE {
            headers
                .get(name)
                .is_some_and(|te| te.as_bytes() == b"trailers")
        } else {
            keep_upgrade && (*name == header::CONNECTION || *name == header::UPGRADE)
        };
        if !keep {
            headers.remove(name);
        }
    }
}

/// Applies one level's header mutations: removals, then additions.
pub fn apply(mutations: &HeaderMutations, headers: &mut HeaderMap) {
    for name in &mutations.remove {
        headers.remove(name);
    }
    for add in &mutations.add {
        if add.value.is_empty() && !add.keep_empty {
            continue;
        }
        match add.action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(add.name.clone(), add.value.clone());
            }
            AppendAction::AddIfAbsent => {
                if !headers.contains_key(&add.name) {
                    headers.insert(add.name.clone(), add.value.clone());
                }
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(add.name.clone(), add.value.clone());
            }
            AppendAction::OverwriteIfExists => {
                if headers.contains_key(&add.name) {
                    headers.insert(add.name.clone(), add.value.clone());
                }
            }
        }
    }
}

/// The three levels' mutations in Envoy's order: most specific last when
/// `most_specific_header_mutations_wins`, else first (so the route configuration's win).
pub fn apply_levels(
    levels: [&HeaderMutations; 3],
    most_specific_wins: bool,
    headers: &mut HeaderMap,
) {
    let [table, vhost, route] = levels;
    let order = if most_specific_wins {
        [table, vhost, route]
    } else {
        [route, vhost, table]
    };
    for mutations in order {
        apply(mutations, headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    /// The names left, sorted: removal does not keep the map's order.
    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_the_rest_kept() {
        let all = [
            ("host", "a"),
            ("connection", "keep-alive, upgrade"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-app", "1"),
        ];
        let mut map = headers(&all);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(names(&map), ["host", "x-app"]);

        let mut map = headers(&all);
        remove_hop_by_hop(&mut map, true);
        assert_eq!(names(&map), ["connection", "host", "upgrade", "x-app"]);

        let mut map = headers(&[("te", "trailers"), ("x-app", "1")]);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(names(&map), ["te", "x-app"]);

        let mut map = headers(&[("x-app", "1"), ("x-app", "2")]);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(map.get_all("x-app").iter().count(), 2);
    }

    #[test]
    fn xff_addresses_are_counted_from_the_right() {
        let map = headers(&[(
            "x-forwarded-for",
            "203.0.113.128, 203.0.113.10, 203.0.113.1",
        )]);
        assert_eq!(
            xff_address(&map, 0),
            (Some("203.0.113.1".parse().unwrap()), false)
        );
        assert_eq!(
            xff_address(&map, 1),
            (Some("203.0.113.10".parse().unwrap()), false)
        );
        assert_eq!(xff_address(&map, 3), (None, false));
        let single = headers(&[("x-forwarded-for", "10.0.0.1")]);
        assert_eq!(
            xff_address(&single, 0),
            (Some("10.0.0.1".parse().unwrap()), true)
        );
        assert!(is_internal("192.168.1.1".parse().unwrap()));
        assert!(!is_internal("203.0.113.1".parse().unwrap()));
    }
}
