//! Hash policies: what a request's hash key is made of, for the consistent-hashing load
//! balancers (a route's `hash_policy`, or a hashing policy's own
//! `consistent_hashing_lb_config.hash_policy`). Each policy hashes one part of the request; the
//! proxy combines the hashes of a list as Envoy does (rotate the running hash one bit, xor the
//! next), stopping after a `terminal` policy that produced one.

use std::time::Duration;

use http::header::HeaderName;
use xds_api::envoy::config::route::v3 as route_pb;

use crate::common::header_name;
use crate::error::{ConfigResult, err, field, item};
use crate::matcher::{RegexRewrite, regex_rewrite};

/// One hash policy.
#[derive(Debug, Clone)]
pub struct HashPolicy {
    pub source: HashSource,
    /// A hash from this policy ends the list: later policies are not evaluated.
    pub terminal: bool,
}

/// The part of a request a policy hashes.
#[derive(Debug, Clone)]
pub enum HashSource {
    /// Every value of the header (rewritten by the regex first, if any).
    Header {
        name: HeaderName,
        rewrite: Option<RegexRewrite>,
    },
    /// The cookie's value; with a `ttl`, a request without the cookie gets one generated (and
    /// set on the response), so that the client sticks to the host it reached first.
    Cookie(CookieHash),
    /// The downstream connection's source IP address.
    SourceIp,
    /// The first value of the query parameter.
    QueryParameter(String),
    /// A hashable object of the request's filter state under this key.
    FilterState(String),
}

/// A cookie hash policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieHash {
    pub name: String,
    /// `None`: the cookie is only read, never generated. `Some(0)`: a session cookie is
    /// generated (no `Max-Age`).
    pub ttl: Option<Duration>,
    /// The generated cookie's `Path` (none when empty).
    pub path: String,
    /// Extra attributes of the generated cookie: (name, value), value possibly empty.
    pub attributes: Vec<(String, String)>,
}

/// Reads a list of hash policies (`path` names the list).
pub fn hash_policies(
    protos: &[route_pb::route_action::HashPolicy],
    path: &str,
) -> ConfigResult<Vec<HashPolicy>> {
    let mut out = Vec::with_capacity(protos.len());
    for (index, proto) in protos.iter().enumerate() {
        if let Some(policy) = hash_policy(proto, &format!("{path}[{index}]"))? {
            out.push(policy);
        }
    }
    Ok(out)
}

/// One policy; `None` for one Envoy ignores (`connection_properties` without `source_ip`).
fn hash_policy(
    proto: &route_pb::route_action::HashPolicy,
    path: &str,
) -> ConfigResult<Option<HashPolicy>> {
    use route_pb::route_action::hash_policy::{self as hp, PolicySpecifier as P};
    let route_pb::route_action::HashPolicy {
        terminal,
        policy_specifier,
    } = proto;
    let source = match policy_specifier {
        Some(P::Header(hp::Header {
            header_name: name,
            regex_rewrite: rewrite,
        })) => {
            let hpath = field(path, "header");
            if name.is_empty() {
                return err(field(&hpath, "header_name"), "must not be empty");
            }
            HashSource::Header {
                name: header_name(name, &field(&hpath, "header_name"))?,
                rewrite: rewrite
                    .as_ref()
                    .map(|r| regex_rewrite(r, &field(&hpath, "regex_rewrite")))
                    .transpose()?,
            }
        }
        Some(P::Cookie(hp::Cookie {
            name,
            ttl,
            path: cookie_path,
            attributes,
        })) => {
            let cpath = field(path, "cookie");
            if name.is_empty() {
                return err(field(&cpath, "name"), "must not be empty");
            }
            if !name.bytes().all(is_cookie_name_byte) {
                return err(field(&cpath, "name"), "not a valid cookie name");
            }
            let ttl = match ttl {
                // Envoy keeps whole seconds only.
                Some(ttl) if ttl.seconds < 0 || ttl.nanos < 0 => {
                    return err(field(&cpath, "ttl"), "must not be negative");
                }
                Some(ttl) => Some(Duration::from_secs(ttl.seconds as u64)),
                None => None,
            };
            if !cookie_path.bytes().all(is_attribute_byte) {
                return err(field(&cpath, "path"), "not a valid cookie path");
            }
            let mut list = Vec::with_capacity(attributes.len());
            for (index, attribute) in attributes.iter().enumerate() {
                let apath = item(&cpath, "attributes", index);
                let hp::CookieAttribute { name, value } = attribute;
                if name.is_empty() || !name.bytes().all(is_cookie_name_byte) {
                    return err(field(&apath, "name"), "not a valid cookie attribute name");
                }
                if !value.bytes().all(is_attribute_byte) {
                    return err(field(&apath, "value"), "not a valid cookie attribute value");
                }
                list.push((name.clone(), value.clone()));
            }
            HashSource::Cookie(CookieHash {
                name: name.clone(),
                ttl,
                path: cookie_path.clone(),
                attributes: list,
            })
        }
        Some(P::ConnectionProperties(hp::ConnectionProperties { source_ip })) => {
            if !source_ip {
                return Ok(None);
            }
            HashSource::SourceIp
        }
        Some(P::QueryParameter(hp::QueryParameter { name })) => {
            if name.is_empty() {
                return err(field(path, "query_parameter.name"), "must not be empty");
            }
            HashSource::QueryParameter(name.clone())
        }
        Some(P::FilterState(hp::FilterState { key })) => {
            if key.is_empty() {
                return err(field(path, "filter_state.key"), "must not be empty");
            }
            HashSource::FilterState(key.clone())
        }
        None => {
            return err(
                path,
                "one of header, cookie, connection_properties, query_parameter or filter_state \
                 is required",
            );
        }
    };
    Ok(Some(HashPolicy {
        source,
        terminal: *terminal,
    }))
}

/// A token character (RFC 6265 cookie names are RFC 7230 tokens).
fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What may stand in a `Set-Cookie` attribute: visible ASCII but `;`.
fn is_attribute_byte(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && b != b';'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(yaml: &str) -> ConfigResult<Vec<HashPolicy>> {
        let action: route_pb::RouteAction =
            xds_api::json::from_yaml_str(&format!("cluster: c\nhash_policy:\n{yaml}"))
                .expect("route action yaml");
        hash_policies(&action.hash_policy, "route.hash_policy")
    }

    #[test]
    fn each_kind_of_policy_is_read() {
        let list = read(
            r#"
- header: {header_name: X-User, regex_rewrite: {pattern: {regex: "^(\\w+)-.*$"}, substitution: "\\1"}}
- cookie: {name: session, ttl: 3600.5s, path: /app, attributes: [{name: SameSite, value: Lax}, {name: Secure}]}
  terminal: true
- connection_properties: {source_ip: true}
- connection_properties: {source_ip: false}
- query_parameter: {name: user}
- filter_state: {key: my.key}
"#,
        )
        .unwrap();
        assert_eq!(list.len(), 5, "source_ip: false is no policy at all");
        match &list[0].source {
            HashSource::Header { name, rewrite } => {
                assert_eq!(name.as_str(), "x-user");
                let rewrite = rewrite.as_ref().unwrap();
                assert_eq!(
                    rewrite
                        .pattern
                        .replace_all("alice-1", &rewrite.substitution),
                    "alice"
                );
            }
            other => panic!("{other:?}"),
        }
        match &list[1].source {
            HashSource::Cookie(cookie) => assert_eq!(
                cookie,
                &CookieHash {
                    name: "session".into(),
                    ttl: Some(Duration::from_secs(3600)),
                    path: "/app".into(),
                    attributes: vec![
                        ("SameSite".into(), "Lax".into()),
                        ("Secure".into(), "".into())
                    ],
                }
            ),
            other => panic!("{other:?}"),
        }
        assert!(list[1].terminal && !list[0].terminal);
        assert!(matches!(list[2].source, HashSource::SourceIp));
        assert!(matches!(&list[3].source, HashSource::QueryParameter(n) if n == "user"));
        assert!(matches!(&list[4].source, HashSource::FilterState(k) if k == "my.key"));
    }

    #[test]
    fn bad_policies_name_their_field() {
        let cases = [
            (
                "- header: {header_name: \"\"}",
                "route.hash_policy[0].header.header_name",
            ),
            (
                "- header: {header_name: \"a b\"}",
                "route.hash_policy[0].header.header_name",
            ),
            (
                "- header: {header_name: x, regex_rewrite: {pattern: {regex: \"(\"}, substitution: a}}",
                "route.hash_policy[0].header.regex_rewrite.pattern.regex",
            ),
            ("- cookie: {name: \"\"}", "route.hash_policy[0].cookie.name"),
            (
                "- cookie: {name: \"a;b\"}",
                "route.hash_policy[0].cookie.name",
            ),
            (
                "- cookie: {name: a, ttl: -1s}",
                "route.hash_policy[0].cookie.ttl",
            ),
            (
                "- cookie: {name: a, path: \"/a;b\"}",
                "route.hash_policy[0].cookie.path",
            ),
            (
                "- cookie: {name: a, attributes: [{name: \"\"}]}",
                "route.hash_policy[0].cookie.attributes[0].name",
            ),
            (
                "- query_parameter: {name: \"\"}",
                "route.hash_policy[0].query_parameter.name",
            ),
            (
                "- filter_state: {key: \"\"}",
                "route.hash_policy[0].filter_state.key",
            ),
            ("- {terminal: true}", "route.hash_policy[0]"),
            (
                "- query_parameter: {name: a}\n- cookie: {name: \"\"}",
                "route.hash_policy[1].cookie.name",
            ),
        ];
        for (yaml, path) in cases {
            let error = read(yaml).unwrap_err();
            assert_eq!(error.path, path, "{yaml}: {error}");
        }
    }
}
