//! Role-based access control (`envoy.config.rbac.v3.RBAC`), shared by the RBAC network filter
//! (read here, `envoy.filters.network.rbac`, in a listener's filter chain) and the RBAC HTTP
//! filter (`filters::rbac`): named policies, each permissions (what is asked for) and principals
//! (who asks), and an action. The decision is made here too, over an [`AccessRequest`] the proxy
//! fills from the connection and, for HTTP, the request head.
//!
//! As Envoy: policies are tried in name order and the first that matches is the effective one;
//! a policy matches when any of its permissions and any of its principals match. ALLOW lets
//! through only what a policy matches, DENY only what none matches, LOG lets everything through.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderMap;
use xds_api::envoy::config::rbac::v3 as rbac_pb;
use xds_api::envoy::extensions::filters::network::rbac::v3 as network_pb;
use xds_api::envoy::r#type::matcher::v3 as matcher_pb;

use crate::common::{CidrRange, cidr, duration, unpack};
use crate::error::{ConfigResult, entry, err, field, item};
use crate::matcher::{HeaderMatch, PseudoHeaders, StringMatch, header_matcher, string_matcher};
use crate::unsupported;

pub const NETWORK_TYPE_URL: &str = xds_api::type_urls::NETWORK_RBAC;

/// What a matching policy means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Log,
}

/// One `RBAC` rule set.
#[derive(Debug, Clone)]
pub struct Rbac {
    pub action: Action,
    /// By name, in name order (Envoy keeps them in an ordered map).
    pub policies: Vec<(String, Policy)>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

#[derive(Debug, Clone)]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatch),
    /// The request path without its query and fragment.
    UrlPath(StringMatch),
    DestinationIp(CidrRange),
    DestinationPort(u16),
    /// Half-open: `start <= port < end`.
    DestinationPortRange(u32, u32),
    RequestedServerName(StringMatch),
}

#[derive(Debug, Clone)]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A TLS peer; with a name, one that its certificate carries.
    Authenticated(Option<StringMatch>),
    /// The connection's remote address.
    SourceIp(CidrRange),
    /// The address of the peer the connection comes from.
    DirectRemoteIp(CidrRange),
    /// The client as the HTTP connection manager trusts it (`x-forwarded-for`).
    RemoteIp(CidrRange),
    Header(HeaderMatch),
    UrlPath(StringMatch),
}

/// A verified peer's certificate as RBAC reads it; empty lists and subject for a TLS client
/// that sent none.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerIdentity<'a> {
    pub uri_sans: &'a [String],
    pub dns_sans: &'a [String],
    pub subject: &'a str,
}

/// An HTTP request head, for header and path rules.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub pseudo: PseudoHeaders<'a>,
    pub headers: &'a HeaderMap,
}

/// Everything a rule can look at.
#[derive(Debug, Clone, Copy)]
pub struct AccessRequest<'a> {
    pub source: IpAddr,
    pub direct_remote: IpAddr,
    pub remote: IpAddr,
    /// The local address the client connected to (the original destination, if restored).
    pub destination: SocketAddr,
    /// SNI; empty when none.
    pub server_name: &'a str,
    /// `Some` when the proxy terminated TLS on this connection.
    pub tls: Option<PeerIdentity<'a>>,
    /// `None` on the network filter.
    pub http: Option<RequestHead<'a>>,
}

/// The outcome of one rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub allowed: bool,
    /// The first policy (in name order) that matched.
    pub policy: Option<&'a str>,
}

impl Rbac {
    pub fn decide<'a>(&'a self, request: &AccessRequest<'_>) -> Decision<'a> {
        let policy = self
            .policies
            .iter()
            .find(|(_, policy)| policy.matches(request))
            .map(|(name, _)| name.as_str());
        let allowed = match self.action {
            Action::Allow => policy.is_some(),
            Action::Deny => policy.is_none(),
            Action::Log => true,
        };
        Decision { allowed, policy }
    }
}

impl Policy {
    fn matches(&self, request: &AccessRequest<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(request))
            && self.principals.iter().any(|p| p.matches(request))
    }
}

/// The path of a request target without query and fragment; `None` without a request.
fn url_path<'a>(request: &AccessRequest<'a>) -> Option<&'a str> {
    let path = request.http?.pseudo.path;
    if path.is_empty() {
        return None;
    }
    let end = path.find(['?', '#']).unwrap_or(path.len());
    Some(&path[..end])
}

fn header_matches(header: &HeaderMatch, request: &AccessRequest<'_>) -> bool {
    match &request.http {
        Some(head) => header.matches_request(&head.pseudo, head.headers),
        // Network filters refuse header rules at config time; nothing to match here.
        None => false,
    }
}

impl Permission {
    fn matches(&self, request: &AccessRequest<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(rules) => rules.iter().all(|r| r.matches(request)),
            Permission::Or(rules) => rules.iter().any(|r| r.matches(request)),
            Permission::Not(rule) => !rule.matches(request),
            Permission::Header(header) => header_matches(header, request),
            Permission::UrlPath(path) => url_path(request).is_some_and(|p| path.matches(p)),
            Permission::DestinationIp(range) => range.contains(request.destination.ip()),
            Permission::DestinationPort(port) => request.destination.port() == *port,
            Permission::DestinationPortRange(start, end) => {
                (*start..*end).contains(&u32::from(request.destination.port()))
            }
            Permission::RequestedServerName(name) => name.matches(request.server_name),
        }
    }
}

impl Principal {
    fn matches(&self, request: &AccessRequest<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(ids) => ids.iter().all(|id| id.matches(request)),
            Principal::Or(ids) => ids.iter().any(|id| id.matches(request)),
            Principal::Not(id) => !id.matches(request),
            Principal::Authenticated(name) => match (&request.tls, name) {
                (None, _) => false,
                (Some(_), None) => true,
                // Envoy's order: any URI SAN, then any DNS SAN, then the subject.
                (Some(peer), Some(name)) => {
                    peer.uri_sans.iter().any(|san| name.matches(san))
                        || peer.dns_sans.iter().any(|san| name.matches(san))
                        || name.matches(peer.subject)
                }
            },
            Principal::SourceIp(range) => range.contains(request.source),
            Principal::DirectRemoteIp(range) => range.contains(request.direct_remote),
            Principal::RemoteIp(range) => range.contains(request.remote),
            Principal::Header(header) => header_matches(header, request),
            Principal::UrlPath(path) => url_path(request).is_some_and(|p| path.matches(p)),
        }
    }
}

/// Where a rule set is read for: the network filter has no request head to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Network,
    Http,
}

/// One `RBAC` rule set at `path`.
pub fn rbac(proto: &rbac_pb::Rbac, path: &str, layer: Layer) -> ConfigResult<Rbac> {
    let rbac_pb::Rbac {
        action,
        policies,
        audit_logging_options,
    } = proto;
    unsupported!(path, audit_logging_options);
    let action = match rbac_pb::rbac::Action::try_from(*action) {
        Ok(rbac_pb::rbac::Action::Allow) => Action::Allow,
        Ok(rbac_pb::rbac::Action::Deny) => Action::Deny,
        Ok(rbac_pb::rbac::Action::Log) => Action::Log,
        Err(_) => return err(field(path, "action"), format!("unknown action {action}")),
    };
    Ok(Rbac {
        action,
        policies: read_policies(policies, path, layer)?,
    })
}

fn read_policies(
    policies: &HashMap<String, rbac_pb::Policy>,
    path: &str,
    layer: Layer,
) -> ConfigResult<Vec<(String, Policy)>> {
    let mut names: Vec<&String> = policies.keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let ppath = entry(path, "policies", name);
        let rbac_pb::Policy {
            permissions,
            principals,
        } = &policies[name];
        if permissions.is_empty() {
            return err(
                field(&ppath, "permissions"),
                "at least one permission is required",
            );
        }
        if principals.is_empty() {
            return err(
                field(&ppath, "principals"),
                "at least one principal is required",
            );
        }
        let permissions = permissions
            .iter()
            .enumerate()
            .map(|(i, p)| permission(p, &item(&ppath, "permissions", i), layer))
            .collect::<ConfigResult<_>>()?;
        let principals = principals
            .iter()
            .enumerate()
            .map(|(i, p)| principal(p, &item(&ppath, "principals", i), layer))
            .collect::<ConfigResult<_>>()?;
        out.push((
            name.clone(),
            Policy {
                permissions,
                principals,
            },
        ));
    }
    Ok(out)
}

/// A CIDR range as RBAC reads it: Envoy takes an unset `prefix_len` as 0, so a bare address
/// matches every address of its family (seen with Envoy 1.40; filter chain matches differ).
fn rbac_cidr(
    range: &xds_api::envoy::config::core::v3::CidrRange,
    path: &str,
) -> ConfigResult<CidrRange> {
    let mut read = cidr(range, path)?;
    if range.prefix_len.is_none() {
        read.len = 0;
    }
    Ok(read)
}

fn path_matcher(proto: &matcher_pb::PathMatcher, path: &str) -> ConfigResult<StringMatch> {
    let matcher_pb::PathMatcher { rule } = proto;
    match rule {
        Some(matcher_pb::path_matcher::Rule::Path(m)) => string_matcher(m, &field(path, "path")),
        None => err(path, "a path matcher is required"),
    }
}

fn header_rule(
    proto: &xds_api::envoy::config::route::v3::HeaderMatcher,
    path: &str,
    layer: Layer,
) -> ConfigResult<HeaderMatch> {
    // As Envoy: a connection has no headers to match.
    if layer == Layer::Network {
        return err(
            path,
            "header rules are not supported by the RBAC network filter",
        );
    }
    header_matcher(proto, path)
}

fn always(any: bool, path: &str) -> ConfigResult<()> {
    match any {
        true => Ok(()),
        false => err(path, "must be true when set"),
    }
}

fn permission(proto: &rbac_pb::Permission, path: &str, layer: Layer) -> ConfigResult<Permission> {
    use rbac_pb::permission::Rule;
    let rbac_pb::Permission { rule } = proto;
    let set = |set: &rbac_pb::permission::Set, name: &str| -> ConfigResult<Vec<Permission>> {
        let spath = field(path, name);
        let rbac_pb::permission::Set { rules } = set;
        if rules.is_empty() {
            return err(field(&spath, "rules"), "at least one rule is required");
        }
        rules
            .iter()
            .enumerate()
            .map(|(i, rule)| permission(rule, &item(&spath, "rules", i), layer))
            .collect()
    };
    Ok(match rule {
        None => return err(path, "a permission rule is required"),
        Some(Rule::Any(any)) => {
            always(*any, &field(path, "any"))?;
            Permission::Any
        }
        Some(Rule::AndRules(rules)) => Permission::And(set(rules, "and_rules")?),
        Some(Rule::OrRules(rules)) => Permission::Or(set(rules, "or_rules")?),
        Some(Rule::NotRule(rule)) => {
            Permission::Not(Box::new(permission(rule, &field(path, "not_rule"), layer)?))
        }
        Some(Rule::Header(header)) => {
            Permission::Header(header_rule(header, &field(path, "header"), layer)?)
        }
        Some(Rule::UrlPath(m)) => Permission::UrlPath(path_matcher(m, &field(path, "url_path"))?),
        Some(Rule::DestinationIp(range)) => {
            Permission::DestinationIp(rbac_cidr(range, &field(path, "destination_ip"))?)
        }
        Some(Rule::DestinationPort(port)) => match u16::try_from(*port) {
            Ok(port) => Permission::DestinationPort(port),
            Err(_) => return err(field(path, "destination_port"), "must be ≤ 65535"),
        },
        Some(Rule::DestinationPortRange(range)) => {
            let rpath = field(path, "destination_port_range");
            let xds_api::envoy::r#type::v3::Int32Range { start, end } = *range;
            // Envoy's bounds: both in 0..=65536, start before end.
            let bounded = |value: i32, name: &str| match u32::try_from(value) {
                Ok(value) if value <= 65536 => Ok(value),
                _ => err(field(&rpath, name), "must be in 0..65536"),
            };
            let (start, end) = (bounded(start, "start")?, bounded(end, "end")?);
            if start >= end {
                return err(rpath, "start must be less than end");
            }
            Permission::DestinationPortRange(start, end)
        }
        Some(Rule::RequestedServerName(m)) => Permission::RequestedServerName(string_matcher(
            m,
            &field(path, "requested_server_name"),
        )?),
        Some(Rule::Metadata(_)) => return unsupported_rule(path, "metadata"),
        Some(Rule::Matcher(_)) => return unsupported_rule(path, "matcher"),
        Some(Rule::UriTemplate(_)) => return unsupported_rule(path, "uri_template"),
        Some(Rule::SourcedMetadata(_)) => return unsupported_rule(path, "sourced_metadata"),
    })
}

fn unsupported_rule<T>(path: &str, name: &str) -> ConfigResult<T> {
    err(field(path, name), "field is not supported")
}

fn principal(proto: &rbac_pb::Principal, path: &str, layer: Layer) -> ConfigResult<Principal> {
    use rbac_pb::principal::Identifier;
    let rbac_pb::Principal { identifier } = proto;
    let set = |set: &rbac_pb::principal::Set, name: &str| -> ConfigResult<Vec<Principal>> {
        let spath = field(path, name);
        let rbac_pb::principal::Set { ids } = set;
        if ids.is_empty() {
            return err(field(&spath, "ids"), "at least one id is required");
        }
        ids.iter()
            .enumerate()
            .map(|(i, id)| principal(id, &item(&spath, "ids", i), layer))
            .collect()
    };
    Ok(match identifier {
        None => return err(path, "a principal identifier is required"),
        Some(Identifier::Any(any)) => {
            always(*any, &field(path, "any"))?;
            Principal::Any
        }
        Some(Identifier::AndIds(ids)) => Principal::And(set(ids, "and_ids")?),
        Some(Identifier::OrIds(ids)) => Principal::Or(set(ids, "or_ids")?),
        Some(Identifier::NotId(id)) => {
            Principal::Not(Box::new(principal(id, &field(path, "not_id"), layer)?))
        }
        Some(Identifier::Authenticated(auth)) => {
            let rbac_pb::principal::Authenticated { principal_name } = auth;
            let apath = field(path, "authenticated");
            Principal::Authenticated(
                principal_name
                    .as_ref()
                    .map(|m| string_matcher(m, &field(&apath, "principal_name")))
                    .transpose()?,
            )
        }
        Some(Identifier::SourceIp(range)) => {
            Principal::SourceIp(rbac_cidr(range, &field(path, "source_ip"))?)
        }
        Some(Identifier::DirectRemoteIp(range)) => {
            Principal::DirectRemoteIp(rbac_cidr(range, &field(path, "direct_remote_ip"))?)
        }
        Some(Identifier::RemoteIp(range)) => {
            Principal::RemoteIp(rbac_cidr(range, &field(path, "remote_ip"))?)
        }
        Some(Identifier::Header(header)) => {
            Principal::Header(header_rule(header, &field(path, "header"), layer)?)
        }
        Some(Identifier::UrlPath(m)) => {
            Principal::UrlPath(path_matcher(m, &field(path, "url_path"))?)
        }
        Some(Identifier::Metadata(_)) => return unsupported_rule(path, "metadata"),
        Some(Identifier::FilterState(_)) => return unsupported_rule(path, "filter_state"),
        Some(Identifier::SourcedMetadata(_)) => return unsupported_rule(path, "sourced_metadata"),
        Some(Identifier::Custom(_)) => return unsupported_rule(path, "custom"),
    })
}

// === the network filter ===

/// One `envoy.filters.network.rbac` of a filter chain, decided once per connection when its
/// first bytes arrive.
#[derive(Debug, Clone)]
pub struct NetworkRbac {
    /// Stats go to `PREFIX.rbac.*`.
    pub stat_prefix: String,
    /// `None`: every connection is let through, uncounted.
    pub rules: Option<Rbac>,
    pub shadow_rules: Option<Rbac>,
    /// Placed between `rbac.` and the shadow stat names.
    pub shadow_rules_stat_prefix: String,
    /// How long a denied connection is held (reading stopped) before it is closed.
    pub delay_deny: Duration,
}

pub fn network_rbac(any: &prost_types::Any, path: &str) -> ConfigResult<NetworkRbac> {
    let network_pb::Rbac {
        rules,
        matcher,
        shadow_rules,
        shadow_matcher,
        shadow_rules_stat_prefix,
        stat_prefix,
        enforcement_type,
        delay_deny,
    } = unpack(any, path)?;
    unsupported!(path, matcher, shadow_matcher);
    match network_pb::rbac::EnforcementType::try_from(enforcement_type) {
        Ok(network_pb::rbac::EnforcementType::OneTimeOnFirstByte) => {}
        Ok(network_pb::rbac::EnforcementType::Continuous) => {
            return err(
                field(path, "enforcement_type"),
                "only ONE_TIME_ON_FIRST_BYTE is supported: Remora's rules read nothing that \
                 changes during a connection",
            );
        }
        Err(_) => return err(field(path, "enforcement_type"), "unknown value"),
    }
    if stat_prefix.is_empty() {
        return err(field(path, "stat_prefix"), "must not be empty");
    }
    let delay_deny = match &delay_deny {
        Some(value) => duration(value, &field(path, "delay_deny"))?,
        None => Duration::ZERO,
    };
    Ok(NetworkRbac {
        stat_prefix,
        rules: rules
            .as_ref()
            .map(|r| rbac(r, &field(path, "rules"), Layer::Network))
            .transpose()?,
        shadow_rules: shadow_rules
            .as_ref()
            .map(|r| rbac(r, &field(path, "shadow_rules"), Layer::Network))
            .transpose()?,
        shadow_rules_stat_prefix,
        delay_deny,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str, layer: Layer) -> ConfigResult<Rbac> {
        let proto: rbac_pb::Rbac = xds_api::json::from_yaml_str(yaml).expect("yaml");
        rbac(&proto, "r", layer)
    }

    fn network(yaml: &str) -> ConfigResult<NetworkRbac> {
        let proto: network_pb::Rbac = xds_api::json::from_yaml_str(yaml).expect("yaml");
        network_rbac(&xds_api::any::pack(&proto), "n")
    }

    fn connection() -> AccessRequest<'static> {
        AccessRequest {
            source: "10.0.0.1".parse().unwrap(),
            direct_remote: "10.0.0.1".parse().unwrap(),
            remote: "192.168.1.9".parse().unwrap(),
            destination: "127.0.0.1:8080".parse().unwrap(),
            server_name: "",
            tls: None,
            http: None,
        }
    }

    #[test]
    fn policies_are_tried_in_name_order_and_actions_decide() {
        let yaml = |action: &str| {
            format!(
                r#"
action: {action}
policies:
  zeta: {{permissions: [{{any: true}}], principals: [{{any: true}}]}}
  alpha:
    permissions: [{{destination_port: 8080}}]
    principals: [{{source_ip: {{address_prefix: 10.0.0.0, prefix_len: 8}}}}]
"#
            )
        };
        let allow = rules(&yaml("ALLOW"), Layer::Network).unwrap();
        let decision = allow.decide(&connection());
        assert_eq!(
            decision,
            Decision {
                allowed: true,
                policy: Some("alpha")
            }
        );
        let deny = rules(&yaml("DENY"), Layer::Network).unwrap();
        assert!(!deny.decide(&connection()).allowed);
        let log = rules(&yaml("LOG"), Layer::Network).unwrap();
        assert!(log.decide(&connection()).allowed);
        // No policies: ALLOW lets nothing through, DENY everything.
        assert!(
            !rules("action: ALLOW", Layer::Network)
                .unwrap()
                .decide(&connection())
                .allowed
        );
        assert!(
            rules("action: DENY", Layer::Network)
                .unwrap()
                .decide(&connection())
                .allowed
        );
    }

    #[test]
    fn addresses_ports_and_sets_match() {
        let policy = |permission: &str, principal: &str| {
            rules(
                &format!(
                    "policies: {{p: {{permissions: [{permission}], principals: [{principal}]}}}}"
                ),
                Layer::Network,
            )
            .unwrap()
            .decide(&connection())
            .allowed
        };
        assert!(policy(
            "{destination_port_range: {start: 8000, end: 8081}}",
            "{any: true}"
        ));
        assert!(!policy(
            "{destination_port_range: {start: 8000, end: 8080}}",
            "{any: true}"
        ));
        assert!(policy(
            "{destination_ip: {address_prefix: 127.0.0.0, prefix_len: 8}}",
            "{remote_ip: {address_prefix: 192.168.1.9}}"
        ));
        assert!(!policy(
            "{any: true}",
            "{direct_remote_ip: {address_prefix: 192.168.1.9, prefix_len: 32}}"
        ));
        // As Envoy: without prefix_len a range is /0, every address of its family.
        assert!(policy(
            "{any: true}",
            "{direct_remote_ip: {address_prefix: 192.168.1.9}}"
        ));
        assert!(!policy(
            "{any: true}",
            "{direct_remote_ip: {address_prefix: '::1'}}"
        ));
        assert!(policy(
            "{and_rules: {rules: [{destination_port: 8080}, {not_rule: {destination_port: 1}}]}}",
            "{or_ids: {ids: [{not_id: {any: true}}, {source_ip: {address_prefix: 10.0.0.1}}]}}"
        ));
        assert!(!policy(
            "{or_rules: {rules: [{destination_port: 1}, {destination_port: 2}]}}",
            "{any: true}"
        ));
        // No SNI: matched as an empty name.
        assert!(policy(
            "{requested_server_name: {exact: ''}}",
            "{and_ids: {ids: [{any: true}]}}"
        ));
        // A connection has no path.
        assert!(!policy("{url_path: {path: {prefix: /}}}", "{any: true}"));
    }

    #[test]
    fn authenticated_reads_uri_sans_then_dns_sans_then_the_subject() {
        let policy = rules(
            r#"
policies:
  p:
    permissions: [{any: true}]
    principals: [{authenticated: {principal_name: {exact: "spiffe://td/ns/a/sa/b"}}}]
  any_tls:
    permissions: [{destination_port: 1}]
    principals: [{authenticated: {}}]
"#,
            Layer::Network,
        )
        .unwrap();
        let uri = ["spiffe://td/ns/a/sa/b".to_string()];
        let dns = ["b.a.svc".to_string()];
        let with = |tls: Option<PeerIdentity<'_>>| {
            let mut request = connection();
            request.tls = tls;
            policy.decide(&request).allowed
        };
        assert!(!with(None));
        assert!(with(Some(PeerIdentity {
            uri_sans: &uri,
            dns_sans: &dns,
            subject: "CN=x",
        })));
        assert!(!with(Some(PeerIdentity {
            uri_sans: &[],
            dns_sans: &dns,
            subject: "CN=x",
        })));
        assert!(with(Some(PeerIdentity {
            uri_sans: &[],
            dns_sans: &[],
            subject: "spiffe://td/ns/a/sa/b",
        })));
        // Without a name any TLS peer counts; plaintext never does.
        let mut request = connection();
        request.destination.set_port(1);
        assert!(!policy.decide(&request).allowed);
        request.tls = Some(PeerIdentity::default());
        assert_eq!(policy.decide(&request).policy, Some("any_tls"));
    }

    #[test]
    fn http_rules_read_headers_and_the_path_without_query() {
        let policy = rules(
            r#"
policies:
  p:
    permissions: [{url_path: {path: {exact: /admin}}}]
    principals: [{header: {name: x-user, string_match: {exact: root}}}]
"#,
            Layer::Http,
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "root".parse().unwrap());
        let check = |path: &str, headers: &HeaderMap| {
            let mut request = connection();
            request.http = Some(RequestHead {
                pseudo: PseudoHeaders {
                    method: "GET",
                    path,
                    authority: "a",
                    scheme: "http",
                },
                headers,
            });
            policy.decide(&request).allowed
        };
        assert!(check("/admin?x=1", &headers));
        assert!(!check("/admin/x", &headers));
        assert!(!check("/admin", &HeaderMap::new()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("audit_logging_options: {}", "r.audit_logging_options"),
            (
                "policies: {p: {permissions: [{any: true}]}}",
                r#"r.policies["p"].principals"#,
            ),
            (
                "policies: {p: {permissions: [{any: false}], principals: [{any: true}]}}",
                r#"r.policies["p"].permissions[0].any"#,
            ),
            (
                "policies: {p: {permissions: [{metadata: {filter: f}}], principals: [{any: true}]}}",
                r#"r.policies["p"].permissions[0].metadata"#,
            ),
            (
                "policies: {p: {permissions: [{any: true}], principals: [{filter_state: {key: k}}]}}",
                r#"r.policies["p"].principals[0].filter_state"#,
            ),
            (
                "policies: {p: {permissions: [{destination_port: 70000}], principals: [{any: true}]}}",
                r#"r.policies["p"].permissions[0].destination_port"#,
            ),
            (
                "policies: {p: {permissions: [{destination_port_range: {start: 9, end: 9}}], principals: [{any: true}]}}",
                r#"r.policies["p"].permissions[0].destination_port_range"#,
            ),
            (
                "policies: {p: {permissions: [{and_rules: {rules: []}}], principals: [{any: true}]}}",
                r#"r.policies["p"].permissions[0].and_rules.rules"#,
            ),
            (
                "policies: {p: {permissions: [{any: true}], principals: [{custom: {name: c}}]}}",
                r#"r.policies["p"].principals[0].custom"#,
            ),
        ];
        for (yaml, path) in cases {
            let error = rules(yaml, Layer::Http).unwrap_err();
            assert_eq!(error.path, path, "{yaml}: {error}");
        }
        let error = rules(
            "policies: {p: {permissions: [{any: true}], principals: [{not_id: {header: {name: a}}}]}}",
            Layer::Network,
        )
        .unwrap_err();
        assert_eq!(error.path, r#"r.policies["p"].principals[0].not_id.header"#);
    }

    #[test]
    fn network_filter_config_is_read_and_checked() {
        let config = network(
            "stat_prefix: tcp\nshadow_rules_stat_prefix: s_\ndelay_deny: 0.5s\nrules: {action: DENY}",
        )
        .unwrap();
        assert_eq!(config.stat_prefix, "tcp");
        assert_eq!(config.delay_deny, Duration::from_millis(500));
        assert!(config.rules.is_some() && config.shadow_rules.is_none());
        assert_eq!(network("rules: {}").unwrap_err().path, "n.stat_prefix");
        assert_eq!(
            network("stat_prefix: t\nenforcement_type: CONTINUOUS")
                .unwrap_err()
                .path,
            "n.enforcement_type"
        );
        assert_eq!(
            network("stat_prefix: t\nmatcher: {}").unwrap_err().path,
            "n.matcher"
        );
    }
}
