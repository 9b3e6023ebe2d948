//! Header handling the connection manager and router do for every request, as Envoy does it:
//! hop-by-hop headers stripped, `x-forwarded-for` / `-proto`, the trusted client address
//! (`use_remote_address`, `xff_num_trusted_hops`), `x-envoy-internal` and
//! `x-envoy-external-address`, Envoy's request control headers removed from untrusted
//! requests, `x-request-id`; and the route table's header mutations.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use remora_config::common::HeaderMutations;

use crate::config::HttpConnectionManager;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_ENVOY_FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");
pub static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
pub static X_ENVOY_EXTERNAL_ADDRESS: HeaderName =
    HeaderName::from_static("x-envoy-external-address");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Envoy's request control headers, honoured only from internal downstreams.
const CONTROL_HEADERS: [&str; 14] = [
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
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

/// Removes `names` (all `x-envoy-*`), looking them up only when the request has such a header:
/// most have none, and each lookup by a string parses the name (about 5% of a request's CPU
/// when done for every name on every request).
pub fn remove_envoy_headers(headers: &mut HeaderMap, names: &[&str]) {
    if !has_envoy_headers(headers) {
        return;
    }
    for name in names {
        headers.remove(*name);
    }
}

/// Whether `name` is present, found by comparing names rather than by a lookup: a lookup by a
/// long custom name hashes it each time, and a request or response has few headers.
pub fn contains_by_scan(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.keys().any(|present| present == name)
}

/// Whether any `x-envoy-*` header is present (one pass over the names, no lookups).
pub fn has_envoy_headers(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name.as_str().starts_with("x-envoy-"))
}

/// What only an edge proxy may set: removed from requests that come from outside.
const EDGE_ONLY_HEADERS: [&str; 3] = [
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
];

/// What the connection manager learnt about a request's origin.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The trusted client address: the direct peer, or what trusted proxies put in
    /// `x-forwarded-for`.
    pub client: SocketAddr,
    /// `http` or `https`, as `x-forwarded-proto` now says (Envoy's `:scheme` follows it).
    pub forwarded_proto: &'static str,
    /// The client is internal: the request now carries `x-envoy-internal: true`.
    pub internal: bool,
}

/// The address Envoy calls the local address: the first non-loopback IPv4 address of the
/// host's interfaces (else its IPv6 one, else loopback). A request from a loopback peer is
/// recorded in `x-forwarded-for` under this address, as Envoy records it.
pub fn local_address() -> IpAddr {
    static LOCAL: std::sync::OnceLock<IpAddr> = std::sync::OnceLock::new();
    *LOCAL.get_or_init(|| {
        let addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map(|interfaces| {
                interfaces
                    .filter_map(|interface| interface.address)
                    .filter_map(|address| {
                        address
                            .as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .filter(|ip| !ip.is_loopback())
                    .collect()
            })
            .unwrap_or_default();
        addresses
            .iter()
            .find(|ip| ip.is_ipv4())
            .or_else(|| addresses.first())
            .copied()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    })
}

/// The address `hops` places from the right of `x-forwarded-for` (0: the last).
fn xff_address(headers: &HeaderMap, hops: u32) -> Option<IpAddr> {
    let value = headers.get(&X_FORWARDED_FOR)?.to_str().ok()?;
    let addresses: Vec<&str> = value.split(',').map(str::trim).collect();
    let index = addresses.len().checked_sub(1 + hops as usize)?;
    addresses[index].parse().ok()
}

/// Appends the peer to `x-forwarded-for` as an edge proxy does (a loopback peer under the
/// host's [`local_address`]).
pub fn append_xff(headers: &mut HeaderMap, peer: SocketAddr) {
    let recorded = if peer.ip().is_loopback() {
        local_address()
    } else {
        peer.ip()
    };
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing},{recorded}"),
        None => recorded.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
}

/// The connection manager's request header handling, before filters and routing, in Envoy's
/// order. A request is internal when, after `x-forwarded-for` handling, it names one client
/// address and that address is in `internal_address_config` (Envoy 1.40 counts no address as
/// internal without it): internal requests get `x-envoy-internal` and keep Envoy's request
/// control headers; the others lose them, and at the edge (`use_remote_address`) get
/// `x-envoy-external-address`. `present` says which headers the request carries (hop-by-hop
/// headers aside: they are removed here).
pub fn on_request(
    hcm: &HttpConnectionManager,
    headers: &mut HeaderMap,
    present: &Present,
    peer: SocketAddr,
    scheme: &'static str,
    upgrading: bool,
) -> Origin {
    remove_hop_by_hop(headers, upgrading);
    if present.envoy {
        headers.remove(&X_ENVOY_INTERNAL);
    }
    let trusted_hops = hcm.xff_num_trusted_hops;
    let mut keep_proto = present.forwarded_proto;
    // An address from x-forwarded-for has no port; the direct peer keeps its own, as in Envoy.
    let (client, single) = if hcm.use_remote_address {
        let single = !present.forwarded_for;
        // Trusted proxies in front: the client is the address they saw, before ours is added.
        let client = trusted_hops
            .checked_sub(1)
            .and_then(|hops| xff_address(headers, hops))
            .map_or(peer, |ip| SocketAddr::new(ip, 0));
        if !hcm.skip_xff_append {
            append_xff(headers, peer);
        }
        // The downstream's own x-forwarded-proto is kept only from a trusted proxy.
        keep_proto &= trusted_hops > 0;
        (Some(client), single)
    } else if present.forwarded_for {
        let client = xff_address(headers, trusted_hops).map(|ip| SocketAddr::new(ip, 0));
        (client, single_xff_address(headers))
    } else {
        (None, false)
    };
    // What the request says its scheme is, for `:scheme` route matches: our own value unless
    // a (trusted) downstream's is kept.
    let forwarded_proto = if keep_proto {
        match headers.get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
            Some(b"https") => "https",
            Some(b"http") => "http",
            _ => scheme,
        }
    } else {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
        scheme
    };
    let internal = single
        && client.is_some_and(|client| {
            hcm.internal_addresses
                .iter()
                .any(|range| range.contains(client.ip()))
        });
    let client = client.unwrap_or(peer);
    let edge = !internal && hcm.use_remote_address;
    if internal {
        headers.insert(&X_ENVOY_INTERNAL, HeaderValue::from_static("true"));
    } else if present.envoy {
        let edge_only: &[&str] = if edge { &EDGE_ONLY_HEADERS } else { &[] };
        for name in edge_only.iter().chain(&CONTROL_HEADERS) {
            headers.remove(*name);
        }
    }
    // The first hop into the trusted network says whom it trusted.
    if edge && let Ok(value) = HeaderValue::from_str(&client.ip().to_string()) {
        headers.insert(&X_ENVOY_EXTERNAL_ADDRESS, value);
    }
    if hcm.generate_request_id
        && ((edge && !hcm.preserve_external_request_id) || !present.request_id)
    {
        headers.insert(&X_REQUEST_ID, request_id());
    }
    Origin {
        client,
        forwarded_proto,
        internal,
    }
}

/// Which of the headers the connection manager settles, reads or rewrites a request has:
/// found in one pass over the names per request, since a lookup hashes the name each time
/// (a long custom one in full) and most requests carry few of them. The connection manager's
/// checks keep it true to the headers; [`on_request`] then adds headers without recording
/// them, so afterwards a flag only gates a lookup (`envoy`: no `x-envoy-*` header came in).
#[derive(Debug, Default)]
pub struct Present {
    pub host: bool,
    pub upgrade: bool,
    pub connection: bool,
    pub expect: bool,
    pub forwarded_for: bool,
    pub forwarded_proto: bool,
    pub request_id: bool,
    /// Any `x-envoy-*` header.
    pub envoy: bool,
    /// The trace context headers the tracer reads (`b3`: that or any `x-b3-*`), and
    /// `x-client-trace-id`.
    pub traceparent: bool,
    pub tracestate: bool,
    pub b3: bool,
    pub client_trace_id: bool,
}

impl Present {
    pub fn scan(headers: &HeaderMap) -> Present {
        let mut present = Present::default();
        for name in headers.keys() {
            if name == header::HOST {
                present.host = true;
            } else if name == header::UPGRADE {
                present.upgrade = true;
            } else if name == header::CONNECTION {
                present.connection = true;
            } else if name == header::EXPECT {
                present.expect = true;
            } else if *name == X_FORWARDED_FOR {
                present.forwarded_for = true;
            } else if *name == X_FORWARDED_PROTO {
                present.forwarded_proto = true;
            } else if *name == X_REQUEST_ID {
                present.request_id = true;
            } else {
                match name.as_str() {
                    "traceparent" => present.traceparent = true,
                    "tracestate" => present.tracestate = true,
                    "b3" | "x-b3-traceid" | "x-b3-spanid" | "x-b3-parentspanid"
                    | "x-b3-sampled" | "x-b3-flags" => present.b3 = true,
                    "x-client-trace-id" => present.client_trace_id = true,
                    other if other.starts_with("x-envoy-") => present.envoy = true,
                    _ => {}
                }
            }
        }
        present
    }
}

/// Whether `x-forwarded-for` holds exactly one address (one header, no comma).
fn single_xff_address(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&X_FORWARDED_FOR).iter();
    matches!((values.next(), values.next()), (Some(value), None) if !value.as_bytes().contains(&b','))
}

/// A new `x-request-id`. Its bytes sit in a shared owner from the start, so the copies the
/// access log and a retry's saved head take are reference counts, not allocations (a value
/// copied from a slice allocates again on its first clone).
fn request_id() -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(crate::uuid::v4()))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// `0` to `999` as text, three digits each (leading zeros are cut off when used).
static SMALL_NUMBERS: [[u8; 3]; 1000] = {
    let mut table = [[0; 3]; 1000];
    let mut n = 0;
    while n < 1000 {
        table[n] = [
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ];
        n += 1;
    }
    table
};

/// `n` as a header value (`x-envoy-upstream-service-time`, attempt counts, lengths). Below
/// 1,000 it points into a static table and allocates nothing; the `http` crate's own
/// conversion allocates twice (a buffer, then its shared form).
pub fn number(n: u64) -> HeaderValue {
    let digits = match SMALL_NUMBERS.get(n as usize) {
        Some(digits) if n >= 100 => &digits[..],
        Some(digits) if n >= 10 => &digits[1..],
        Some(digits) => &digits[2..],
        None => return HeaderValue::from(n),
    };
    match std::str::from_utf8(digits) {
        Ok(text) => HeaderValue::from_static(text),
        Err(_) => HeaderValue::from(n),
    }
}

/// Drops the headers a request's `Connection` names: they are hop-by-hop too (RFC 9110
/// section 7.6.1), as Envoy's codec has it. `te` stays as `trailers` if it asks for them.
/// Refused (`false`), as by Envoy: ten or more names, or a name whose removal would hide where
/// the request came from (`x-forwarded-for`, `-host`, `-proto`) or a pseudo-header.
#[must_use]
pub fn sanitize_connection(headers: &mut HeaderMap) -> bool {
    let mut nominated: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let tokens = value.as_bytes().split(|b| *b == b',');
        if tokens.clone().count() >= 10 {
            return false;
        }
        for token in tokens {
            let token = token.trim_ascii();
            let ordinary = [
                &b"close"[..],
                b"keep-alive",
                b"upgrade",
                b"http2-settings",
                b"connection",
                b"",
            ]
            .iter()
            .any(|ordinary| token.eq_ignore_ascii_case(ordinary));
            if ordinary {
                continue;
            }
            if token.starts_with(b":") {
                return false;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                if name == X_FORWARDED_FOR || name == X_FORWARDED_HOST || name == X_FORWARDED_PROTO
                {
                    return false;
                }
                nominated.push(name);
            }
        }
    }
    for name in nominated {
        if name == header::TE {
            let trailers = headers.get(&name).is_some_and(|te| {
                te.as_bytes()
                    .split(|b| *b == b',')
                    .any(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"trailers"))
            });
            if trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
                continue;
            }
        }
        headers.remove(name);
    }
    true
}

/// The request headers Envoy keeps as one value (its "inline" headers): repeated lines of
/// these are joined with commas, where other headers keep each line.
static INLINE_REQUEST_HEADERS: [&str; 42] = [
    "connection",
    "content-length",
    "content-type",
    "expect",
    "grpc-timeout",
    "host",
    "keep-alive",
    "proxy-connection",
    "proxy-status",
    "te",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "via",
    "x-client-trace-id",
    "x-envoy-attempt-count",
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal",
    "x-envoy-ip-tags",
    "x-envoy-max-retries",
    "x-envoy-original-path",
    "x-envoy-original-url",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
    "x-forwarded-client-cert",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
];

/// Joins repeated lines of Envoy's inline request headers into one comma-separated value.
pub fn coalesce_inline(headers: &mut HeaderMap) {
    // Most requests repeat no header at all.
    if headers.len() == headers.keys_len() {
        return;
    }
    let repeated: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            INLINE_REQUEST_HEADERS.contains(&name.as_str())
                && headers.get_all(*name).iter().nth(1).is_some()
        })
        .cloned()
        .collect();
    for name in repeated {
        let mut joined = Vec::new();
        for value in headers.get_all(&name) {
            if !joined.is_empty() {
                joined.push(b',');
            }
            joined.extend_from_slice(value.as_bytes());
        }
        if let Ok(value) = HeaderValue::from_bytes(&joined) {
            headers.insert(name, value);
        }
    }
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
    // none or one of them, and this runs twice per request. The length rules out most names
    // before any comparison.
    let mut present = 0u8;
    for name in headers.keys() {
        if !matches!(name.as_str().len(), 2 | 7 | 10 | 16 | 17) {
            continue;
        }
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
        mutations.apply(headers);
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
    fn numbers_read_as_their_decimal_text() {
        let edges = [1_000, 1_001, 65_535, u64::from(u32::MAX), u64::MAX];
        for n in (0..1_100).chain(edges) {
            assert_eq!(number(n).as_bytes(), n.to_string().as_bytes(), "{n}");
        }
    }

    #[test]
    fn a_request_id_is_a_uuid_and_its_copies_read_the_same() {
        let id = request_id();
        let copy = id.clone();
        drop(id);
        let text = copy.to_str().expect("ASCII");
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "4", "version 4: {text}");
        assert_ne!(request_id(), copy);
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
        assert_eq!(xff_address(&map, 0), Some("203.0.113.1".parse().unwrap()));
        assert_eq!(xff_address(&map, 1), Some("203.0.113.10".parse().unwrap()));
        assert_eq!(xff_address(&map, 3), None);
        let single = headers(&[("x-forwarded-for", "10.0.0.1")]);
        assert_eq!(xff_address(&single, 0), Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn connection_nominated_headers_are_dropped_and_dangerous_nominations_refused() {
        let mut map = headers(&[
            ("connection", "close, x-hop, te"),
            ("x-hop", "1"),
            ("te", "gzip, trailers"),
            ("x-app", "1"),
        ]);
        assert!(sanitize_connection(&mut map));
        assert_eq!(names(&map), ["connection", "te", "x-app"]);
        assert_eq!(map["te"], "trailers");
        for refused in ["x-forwarded-for", ":path", "a,b,c,d,e,f,g,h,i,j"] {
            let mut map = headers(&[("connection", refused)]);
            assert!(!sanitize_connection(&mut map), "{refused}");
        }
    }

    #[test]
    fn repeated_inline_headers_are_joined_and_others_kept_apart() {
        let mut map = headers(&[
            ("user-agent", "a"),
            ("x-app", "1"),
            ("user-agent", "b"),
            ("x-app", "2"),
        ]);
        coalesce_inline(&mut map);
        assert_eq!(map["user-agent"], "a,b");
        assert_eq!(map.get_all("x-app").iter().count(), 2);
    }
}
