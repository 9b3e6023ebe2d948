//! A request's hash key for a consistent-hashing cluster (RING_HASH, MAGLEV), computed as Envoy
//! computes it from the route's `hash_policy` (or the cluster policy's own list):
//!
//! - header: xxHash64 over the header's values, sorted, each hashed with the previous hash as
//!   seed (after the regex rewrite, if any);
//! - cookie: xxHash64 of the cookie's value; when the request has none and the policy has a
//!   `ttl`, a value is generated — the hex of xxHash64 of the client's address followed by the
//!   local address — and set on the response with `Set-Cookie`;
//! - source IP: xxHash64 of the client's address (without port);
//! - query parameter: xxHash64 of its first value, as written in the URL;
//! - filter state: Remora keeps no hashable filter-state objects, so never a hash.
//!
//! The hashes of a list combine as `previous.rotate_left(1) ^ next`; a `terminal` policy ends
//! the list once there is a hash. Other policies never compute the key (nor set cookies), as
//! in Envoy, where only the hashing balancers ask for it.

use std::net::SocketAddr;

use http::HeaderMap;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;

use crate::config::{CookieHash, HashPolicy, HashSource, LbPolicy};
use crate::upstream::Cluster;
use crate::upstream::lb::hashing::xxhash64;

/// The key and the cookies to set on the response.
#[derive(Debug, Default)]
pub struct HashKey {
    pub hash: Option<u64>,
    set_cookies: Vec<HeaderValue>,
}

impl HashKey {
    /// Adds the generated cookies to the response.
    pub fn set_cookies(self, response: &mut HeaderMap) {
        for cookie in self.set_cookies {
            response.append(header::SET_COOKIE, cookie);
        }
    }
}

/// The hash key of a request to `cluster` (none unless the cluster hashes); `client` is the
/// trusted client address (`x-forwarded-for` considered), as the connection manager found it.
pub fn request_hash_key(
    cluster: &Cluster,
    route_policies: &[HashPolicy],
    request: &http::request::Parts,
    path_and_query: &PathAndQuery,
    local: SocketAddr,
    client: SocketAddr,
) -> HashKey {
    let balancing = &cluster.config.load_balancing.policy;
    if !matches!(balancing, LbPolicy::RingHash(_) | LbPolicy::Maglev(_)) {
        return HashKey::default();
    }
    let own = balancing.hash_policies();
    let policies = if own.is_empty() { route_policies } else { own };
    compute(policies, &request.headers, path_and_query, client, local)
}

fn compute(
    policies: &[HashPolicy],
    headers: &HeaderMap,
    path_and_query: &PathAndQuery,
    client: SocketAddr,
    local: SocketAddr,
) -> HashKey {
    let mut key = HashKey::default();
    for policy in policies {
        let next = match &policy.source {
            HashSource::Header { name, rewrite } => {
                let mut values: Vec<Vec<u8>> = headers
                    .get_all(name)
                    .iter()
                    .map(|value| match rewrite {
                        Some(rewrite) => rewrite
                            .pattern
                            .replace_all(
                                &String::from_utf8_lossy(value.as_bytes()),
                                rewrite.substitution.as_str(),
                            )
                            .into_owned()
                            .into_bytes(),
                        None => value.as_bytes().to_vec(),
                    })
                    .collect();
                values.sort();
                (!values.is_empty()).then(|| values.iter().fold(0, |seed, v| xxhash64(v, seed)))
            }
            HashSource::Cookie(cookie) => match cookie_value(headers, &cookie.name) {
                Some(value) if !value.is_empty() => Some(xxhash64(value, 0)),
                _ => cookie.ttl.map(|_| {
                    let value = generated_cookie_value(client, local);
                    if let Ok(header) = HeaderValue::from_str(&set_cookie(cookie, &value)) {
                        key.set_cookies.push(header);
                    }
                    xxhash64(value.as_bytes(), 0)
                }),
            },
            HashSource::SourceIp => Some(xxhash64(client.ip().to_string().as_bytes(), 0)),
            HashSource::QueryParameter(name) => {
                query_value(path_and_query.query(), name).map(|value| xxhash64(value, 0))
            }
            HashSource::FilterState(_) => None,
        };
        if let Some(next) = next {
            key.hash = Some(key.hash.map_or(0, |h: u64| h.rotate_left(1)) ^ next);
        }
        if policy.terminal && key.hash.is_some() {
            break;
        }
    }
    key
}

/// The value of cookie `name` in the request's `Cookie` headers (the first one), without the
/// double quotes it may be wrapped in.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    for header in headers.get_all(header::COOKIE) {
        for pair in header.as_bytes().split(|b| *b == b';') {
            let start = pair.iter().position(|b| *b != b' ').unwrap_or(pair.len());
            let Some(equals) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if equals < start || &pair[start..equals] != name.as_bytes() {
                continue;
            }
            let value = &pair[equals + 1..];
            return Some(match value {
                [b'"', inner @ .., b'"'] => inner,
                _ => value,
            });
        }
    }
    None
}

/// The first value of query parameter `name`, as written (not decoded); a parameter without
/// `=` has the empty value.
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a [u8]> {
    query?
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some((key, value)) if key == name => Some(value.as_bytes()),
            None if pair == name => Some(&b""[..]),
            _ => None,
        })
}

/// Envoy's generated cookie value: 16 hex digits of xxHash64 of the client's address and the
/// local address, written one after the other (`IP:PORTIP:PORT`).
fn generated_cookie_value(client: SocketAddr, local: SocketAddr) -> String {
    format!(
        "{:016x}",
        xxhash64(format!("{client}{local}").as_bytes(), 0)
    )
}

/// `name="value"; Max-Age=TTL; Path=PATH; ATTRIBUTES; HttpOnly`, as Envoy writes it (no
/// `Max-Age` for a zero TTL, no `Path` when empty).
fn set_cookie(cookie: &CookieHash, value: &str) -> String {
    let mut out = format!("{}=\"{value}\"", cookie.name);
    let ttl = cookie.ttl.unwrap_or_default().as_secs();
    if ttl != 0 {
        out.push_str(&format!("; Max-Age={ttl}"));
    }
    if !cookie.path.is_empty() {
        out.push_str(&format!("; Path={}", cookie.path));
    }
    for (name, value) in &cookie.attributes {
        if value.is_empty() {
            out.push_str(&format!("; {name}"));
        } else {
            out.push_str(&format!("; {name}={value}"));
        }
    }
    out.push_str("; HttpOnly");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policies(yaml: &str) -> Vec<HashPolicy> {
        let action: xds_api::envoy::config::route::v3::RouteAction =
            xds_api::json::from_yaml_str(&format!("cluster: c\nhash_policy:\n{yaml}")).unwrap();
        remora_config::hash_policy::hash_policies(&action.hash_policy, "h").unwrap()
    }

    fn key(yaml: &str, headers: &[(&str, &str)], path: &str) -> HashKey {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        compute(
            &policies(yaml),
            &map,
            &PathAndQuery::try_from(path).unwrap(),
            "10.1.2.3:5000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        )
    }

    #[test]
    fn a_header_hashes_its_values_in_sorted_order() {
        let one = key("- header: {header_name: x-k}", &[("x-k", "alice")], "/");
        assert_eq!(one.hash, Some(xxhash64(b"alice", 0)));
        let two = key(
            "- header: {header_name: x-k}",
            &[("x-k", "b"), ("x-k", "a")],
            "/",
        );
        assert_eq!(two.hash, Some(xxhash64(b"b", xxhash64(b"a", 0))));
        assert_eq!(key("- header: {header_name: x-k}", &[], "/").hash, None);
        let rewritten = key(
            "- header: {header_name: x-k, regex_rewrite: {pattern: {regex: \"-.*\"}, substitution: \"\"}}",
            &[("x-k", "alice-1")],
            "/",
        );
        assert_eq!(rewritten.hash, Some(xxhash64(b"alice", 0)));
    }

    #[test]
    fn policies_combine_by_rotate_and_xor_and_terminal_stops() {
        let a = xxhash64(b"a", 0);
        let q = xxhash64(b"1", 0);
        let both = key(
            "- header: {header_name: x-k}\n- query_parameter: {name: q}",
            &[("x-k", "a")],
            "/p?z=0&q=1&q=2",
        );
        assert_eq!(both.hash, Some(a.rotate_left(1) ^ q));
        let stopped = key(
            "- header: {header_name: x-k}\n  terminal: true\n- query_parameter: {name: q}",
            &[("x-k", "a")],
            "/p?q=1",
        );
        assert_eq!(stopped.hash, Some(a));
        // A terminal policy without a hash does not stop the list.
        let skipped = key(
            "- header: {header_name: x-none}\n  terminal: true\n- query_parameter: {name: q}",
            &[],
            "/p?q=1",
        );
        assert_eq!(skipped.hash, Some(q));
        let flag = key("- query_parameter: {name: q}", &[], "/p?q");
        assert_eq!(flag.hash, Some(xxhash64(b"", 0)));
        assert_eq!(key("- query_parameter: {name: q}", &[], "/p").hash, None);
        assert_eq!(key("- filter_state: {key: k}", &[], "/").hash, None);
        let ip = key("- connection_properties: {source_ip: true}", &[], "/");
        assert_eq!(ip.hash, Some(xxhash64(b"10.1.2.3", 0)));
    }

    #[test]
    fn cookies_are_read_or_generated_as_envoy_does() {
        let read = key(
            "- cookie: {name: s, ttl: 60s}",
            &[("cookie", "a=1; s=\"xyz\""), ("cookie", "s=other")],
            "/",
        );
        assert_eq!(read.hash, Some(xxhash64(b"xyz", 0)));
        assert!(read.set_cookies.is_empty());
        let absent = key("- cookie: {name: s}", &[("cookie", "a=1")], "/");
        assert_eq!(absent.hash, None, "no ttl: no cookie generated");
        let generated = key(
            "- cookie: {name: s, ttl: 3600s, path: /app, attributes: [{name: SameSite, value: Lax}, {name: Secure}]}",
            &[],
            "/",
        );
        let value = format!("{:016x}", xxhash64(b"10.1.2.3:5000127.0.0.1:8080", 0));
        assert_eq!(generated.hash, Some(xxhash64(value.as_bytes(), 0)));
        assert_eq!(
            generated.set_cookies,
            [HeaderValue::from_str(&format!(
                "s=\"{value}\"; Max-Age=3600; Path=/app; SameSite=Lax; Secure; HttpOnly"
            ))
            .unwrap()]
        );
        let session = set_cookie(
            &CookieHash {
                name: "s".into(),
                ttl: Some(Duration::ZERO),
                path: String::new(),
                attributes: Vec::new(),
            },
            "v",
        );
        assert_eq!(session, "s=\"v\"; HttpOnly");
    }
}
