//! Checks every write before it is stored, the way Envoy would judge the resources, so nothing a
//! proxy would reject for a reason we can see reaches it: required fields, value ranges, regexes
//! that compile, addresses that parse, filter ordering, and cross-references (a route's clusters,
//! a listener's route configuration) resolved within the scope a proxy will see (global, or
//! global plus the resource's group). Each problem names the resource, the field path and why.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use xds_api::envoy::config::cluster::v3::Cluster;
use xds_api::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use xds_api::envoy::config::core::v3::address::Address as AddressKind;
use xds_api::envoy::config::core::v3::socket_address::PortSpecifier;
use xds_api::envoy::config::core::v3::{Address, SocketAddress};
use xds_api::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_api::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use xds_api::envoy::config::listener::v3::Listener;
use xds_api::envoy::config::listener::v3::filter::ConfigType as FilterConfig;
use xds_api::envoy::config::route::v3::RouteConfiguration;
use xds_api::envoy::config::route::v3::route::Action;
use xds_api::envoy::config::route::v3::route_action::ClusterSpecifier;
use xds_api::envoy::config::route::v3::route_match::PathSpecifier;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use xds_api::type_urls;

use crate::resource::{Kind, Typed};
use crate::store::{ConfigState, ResourceKey};

/// One thing wrong (or waiting) with one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `kind/name`, e.g. `routes/local_route`.
    pub resource: String,
    /// The group the resource was written to; empty for global.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Dotted field path inside the resource; empty for the resource as a whole.
    pub field: String,
    pub reason: String,
}

/// What validation found: errors refuse the write; waiting resources are stored but held back
/// from proxies until what they wait for exists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Findings {
    pub errors: Vec<Problem>,
    pub waiting: Vec<Problem>,
    /// Written resources a Remora proxy would refuse (an Envoy may take them): stored and
    /// served all the same, with this warning, since the fleet may be Envoy.
    pub remora: Vec<Problem>,
}

/// The EDS service name of a cluster of type EDS (`service_name`, or the cluster's name).
pub fn eds_service_name(cluster: &Cluster) -> Option<&str> {
    let is_eds = matches!(
        cluster.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(kind)) if kind == DiscoveryType::Eds as i32
    );
    if !is_eds {
        return None;
    }
    let service = cluster
        .eds_cluster_config
        .as_ref()
        .map(|config| config.service_name.as_str())
        .unwrap_or_default();
    Some(if service.is_empty() {
        &cluster.name
    } else {
        service
    })
}

/// Decodes an `Any` already known to hold an HttpConnectionManager. (`xds_api::any::unpack`
/// compares against prost's default `/package.Message` URL, not Envoy's
/// `type.googleapis.com/...`, so the type URL is checked by the caller.)
fn decode_connection_manager(any: &prost_types::Any) -> Result<HttpConnectionManager, String> {
    use prost::Message;
    HttpConnectionManager::decode(any.value.as_slice())
        .map_err(|error| format!("cannot decode the HttpConnectionManager: {error}"))
}

/// Decodes the HTTP connection managers of a listener, with the field path of each.
fn connection_managers(
    listener: &Listener,
) -> Vec<(String, Result<HttpConnectionManager, String>)> {
    let mut found = Vec::new();
    let chains = listener
        .filter_chains
        .iter()
        .enumerate()
        .map(|(index, chain)| (format!("filter_chains[{index}]"), chain))
        .chain(
            listener
                .default_filter_chain
                .iter()
                .map(|chain| ("default_filter_chain".to_string(), chain)),
        );
    for (chain_path, chain) in chains {
        for (index, filter) in chain.filters.iter().enumerate() {
            if let Some(FilterConfig::TypedConfig(any)) = &filter.config_type
                && any.type_url == type_urls::HTTP_CONNECTION_MANAGER
            {
                let path = format!("{chain_path}.filters[{index}].typed_config");
                let decoded = decode_connection_manager(any);
                found.push((path, decoded));
            }
        }
    }
    if let Some(api_listener) = listener
        .api_listener
        .as_ref()
        .and_then(|api| api.api_listener.as_ref())
        && api_listener.type_url == type_urls::HTTP_CONNECTION_MANAGER
    {
        let decoded = decode_connection_manager(api_listener);
        found.push(("api_listener.api_listener".to_string(), decoded));
    }
    found
}

/// The RDS route configuration names a listener depends on, with field paths.
pub fn listener_route_names(listener: &Listener) -> Vec<(String, String)> {
    connection_managers(listener)
        .into_iter()
        .filter_map(|(path, manager)| match manager.ok()?.route_specifier {
            Some(RouteSpecifier::Rds(rds)) => Some((
                format!("{path}.rds.route_config_name"),
                rds.route_config_name,
            )),
            _ => None,
        })
        .collect()
}

/// Every cluster named by a route configuration (also inside inline route configs).
fn route_cluster_names(route: &RouteConfiguration, prefix: &str) -> Vec<(String, String)> {
    let mut names = Vec::new();
    for (vhost_index, vhost) in route.virtual_hosts.iter().enumerate() {
        for (route_index, entry) in vhost.routes.iter().enumerate() {
            let path = format!("{prefix}virtual_hosts[{vhost_index}].routes[{route_index}].route");
            let Some(Action::Route(action)) = &entry.action else {
                continue;
            };
            match &action.cluster_specifier {
                Some(ClusterSpecifier::Cluster(name)) => {
                    names.push((format!("{path}.cluster"), name.clone()))
                }
                Some(ClusterSpecifier::WeightedClusters(weighted)) => {
                    for (index, cluster) in weighted.clusters.iter().enumerate() {
                        if !cluster.name.is_empty() {
                            names.push((
                                format!("{path}.weighted_clusters.clusters[{index}].name"),
                                cluster.name.clone(),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    names
}

/// Collects problems for one resource.
struct Checker<'a> {
    key: &'a ResourceKey,
    errors: Vec<Problem>,
}

impl Checker<'_> {
    fn error(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(Problem {
            resource: format!("{}/{}", self.key.kind, self.key.name),
            group: self.key.group.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn check(&mut self, typed: &Typed) {
        if typed.name().is_empty() {
            self.error(Typed::name_field(typed.kind()), "must not be empty");
        } else if typed.name() != self.key.name {
            self.error(
                Typed::name_field(typed.kind()),
                format!(
                    "{:?} does not match the name {:?} it is stored under",
                    typed.name(),
                    self.key.name
                ),
            );
        }
        match typed {
            Typed::Cluster(cluster) => self.cluster(cluster),
            Typed::Endpoint(assignment) => self.assignment(assignment, "", true),
            Typed::Listener(listener) => self.listener(listener),
            Typed::Route(route) => self.route(route, ""),
            Typed::Secret(secret) => {
                if secret.r#type.is_none() {
                    self.error(
                        "",
                        "a secret needs one of tls_certificate, validation_context, session_ticket_keys, generic_secret",
                    );
                }
            }
        }
    }

    fn cluster(&mut self, cluster: &Cluster) {
        if let Some(timeout) = &cluster.connect_timeout
            && (timeout.seconds < 0 || (timeout.seconds == 0 && timeout.nanos <= 0))
        {
            self.error("connect_timeout", "must be greater than 0s");
        }
        let discovery = match cluster.cluster_discovery_type {
            Some(ClusterDiscoveryType::Type(value)) => DiscoveryType::try_from(value).ok(),
            Some(ClusterDiscoveryType::ClusterType(_)) => None,
            None => Some(DiscoveryType::Static),
        };
        if discovery == Some(DiscoveryType::Eds)
            && cluster
                .eds_cluster_config
                .as_ref()
                .and_then(|config| config.eds_config.as_ref())
                .is_none()
        {
            self.error(
                "eds_cluster_config.eds_config",
                "an EDS cluster needs a config source (e.g. {ads: {}})",
            );
        }
        if let Some(assignment) = &cluster.load_assignment {
            let needs_ip = discovery == Some(DiscoveryType::Static);
            self.assignment(assignment, "load_assignment.", needs_ip);
        }
    }

    fn assignment(&mut self, assignment: &ClusterLoadAssignment, prefix: &str, needs_ip: bool) {
        for (locality_index, locality) in assignment.endpoints.iter().enumerate() {
            let locality_path = format!("{prefix}endpoints[{locality_index}]");
            if locality.load_balancing_weight == Some(0) {
                self.error(
                    format!("{locality_path}.load_balancing_weight"),
                    "must be at least 1",
                );
            }
            for (index, lb_endpoint) in locality.lb_endpoints.iter().enumerate() {
                let path = format!("{locality_path}.lb_endpoints[{index}]");
                if lb_endpoint.load_balancing_weight == Some(0) {
                    self.error(
                        format!("{path}.load_balancing_weight"),
                        "must be at least 1",
                    );
                }
                match &lb_endpoint.host_identifier {
                    Some(HostIdentifier::Endpoint(endpoint)) => self.address(
                        endpoint.address.as_ref(),
                        &format!("{path}.endpoint.address"),
                        needs_ip,
                    ),
                    Some(HostIdentifier::EndpointName(_)) => {}
                    None => self.error(format!("{path}.endpoint"), "an endpoint is required"),
                }
            }
        }
    }

    fn address(&mut self, address: Option<&Address>, path: &str, needs_ip: bool) {
        let Some(AddressKind::SocketAddress(socket)) = address.and_then(|a| a.address.as_ref())
        else {
            if address.and_then(|a| a.address.as_ref()).is_none() {
                self.error(path, "an address is required");
            }
            return;
        };
        self.socket_address(socket, &format!("{path}.socket_address"), needs_ip);
    }

    fn socket_address(&mut self, socket: &SocketAddress, path: &str, needs_ip: bool) {
        if socket.address.is_empty() {
            self.error(format!("{path}.address"), "must not be empty");
        } else if needs_ip
            && socket.resolver_name.is_empty()
            && socket.address.parse::<IpAddr>().is_err()
        {
            self.error(
                format!("{path}.address"),
                format!("{:?} is not an IP address", socket.address),
            );
        }
        match &socket.port_specifier {
            Some(PortSpecifier::PortValue(port)) if *port > 65535 => {
                self.error(format!("{path}.port_value"), "must be at most 65535")
            }
            Some(_) => {}
            None => self.error(format!("{path}.port_value"), "a port is required"),
        }
    }

    fn listener(&mut self, listener: &Listener) {
        match (&listener.address, &listener.api_listener) {
            (None, None) => self.error("address", "a listener needs an address (or api_listener)"),
            (Some(address), _) => self.address(Some(address), "address", true),
            _ => {}
        }
        if listener.api_listener.is_none()
            && listener.filter_chains.is_empty()
            && listener.default_filter_chain.is_none()
        {
            self.error(
                "filter_chains",
                "a listener needs at least one filter chain",
            );
        }
        for (chain_index, chain) in listener.filter_chains.iter().enumerate() {
            if chain.filters.is_empty() {
                self.error(
                    format!("filter_chains[{chain_index}].filters"),
                    "must not be empty",
                );
            }
            for (index, filter) in chain.filters.iter().enumerate() {
                if filter.config_type.is_none() {
                    self.error(
                        format!("filter_chains[{chain_index}].filters[{index}].typed_config"),
                        "a network filter needs a typed_config",
                    );
                }
            }
        }
        for (path, manager) in connection_managers(listener) {
            match manager {
                Ok(manager) => self.connection_manager(&manager, &path),
                Err(reason) => self.error(path, reason),
            }
        }
    }

    fn connection_manager(&mut self, manager: &HttpConnectionManager, path: &str) {
        if manager.stat_prefix.is_empty() {
            self.error(format!("{path}.stat_prefix"), "must not be empty");
        }
        match &manager.route_specifier {
            None => self.error(path, "one of rds or route_config is required"),
            Some(RouteSpecifier::Rds(rds)) => {
                if rds.config_source.is_none() {
                    self.error(
                        format!("{path}.rds.config_source"),
                        "is required (e.g. {ads: {}})",
                    );
                }
                if rds.route_config_name.is_empty() {
                    self.error(format!("{path}.rds.route_config_name"), "must not be empty");
                }
            }
            Some(RouteSpecifier::RouteConfig(route)) => {
                self.route(route, &format!("{path}.route_config."));
            }
        }
        let last = manager.http_filters.len().saturating_sub(1);
        for (index, filter) in manager.http_filters.iter().enumerate() {
            let is_router = filter.name == "envoy.filters.http.router"
                || matches!(&filter.config_type, Some(xds_api::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(any)) if any.type_url == type_urls::ROUTER);
            if filter.name.is_empty() {
                self.error(
                    format!("{path}.http_filters[{index}].name"),
                    "must not be empty",
                );
            }
            if is_router && index != last {
                self.error(
                    format!("{path}.http_filters[{index}]"),
                    "the router is a terminal filter and must be the last http filter",
                );
            }
            if !is_router && index == last {
                self.error(
                    format!("{path}.http_filters[{index}]"),
                    "the last http filter must be the router",
                );
            }
        }
    }

    fn route(&mut self, route: &RouteConfiguration, prefix: &str) {
        let mut vhost_names = BTreeSet::new();
        let mut domains = BTreeMap::new();
        for (vhost_index, vhost) in route.virtual_hosts.iter().enumerate() {
            let vhost_path = format!("{prefix}virtual_hosts[{vhost_index}]");
            if vhost.name.is_empty() {
                self.error(format!("{vhost_path}.name"), "must not be empty");
            } else if !vhost_names.insert(vhost.name.clone()) {
                self.error(
                    format!("{vhost_path}.name"),
                    format!("duplicate virtual host name {:?}", vhost.name),
                );
            }
            if vhost.domains.is_empty() {
                self.error(format!("{vhost_path}.domains"), "must not be empty");
            }
            for (index, domain) in vhost.domains.iter().enumerate() {
                let domain_path = format!("{vhost_path}.domains[{index}]");
                if domain.is_empty() {
                    self.error(domain_path, "must not be empty");
                } else if let Some(previous) =
                    domains.insert(domain.to_ascii_lowercase(), vhost_path.clone())
                {
                    self.error(
                        domain_path,
                        format!("domain {domain:?} is already used by {previous}"),
                    );
                } else if domain != "*"
                    && domain.matches('*').count() > 0
                    && !(domain.starts_with('*') ^ domain.ends_with('*'))
                {
                    self.error(domain_path, "a wildcard must be a whole prefix or suffix");
                }
            }
            for (route_index, entry) in vhost.routes.iter().enumerate() {
                let path = format!("{vhost_path}.routes[{route_index}]");
                match entry
                    .r#match
                    .as_ref()
                    .and_then(|m| m.path_specifier.as_ref())
                {
                    None => self.error(
                        format!("{path}.match"),
                        "one of prefix, path, safe_regex, path_separated_prefix is required",
                    ),
                    Some(PathSpecifier::SafeRegex(matcher)) => {
                        if let Err(error) = regex::Regex::new(&matcher.regex) {
                            self.error(
                                format!("{path}.match.safe_regex.regex"),
                                format!("invalid regex: {error}"),
                            );
                        }
                    }
                    Some(PathSpecifier::Path(value))
                    | Some(PathSpecifier::PathSeparatedPrefix(value))
                        if !value.starts_with('/') =>
                    {
                        self.error(
                            format!("{path}.match"),
                            format!("{value:?} must start with '/'"),
                        );
                    }
                    Some(_) => {}
                }
                match &entry.action {
                    None => self.error(
                        path.clone(),
                        "one of route, redirect, direct_response is required",
                    ),
                    Some(Action::Route(action)) => match &action.cluster_specifier {
                        None => self.error(
                            format!("{path}.route"),
                            "one of cluster, cluster_header, weighted_clusters is required",
                        ),
                        Some(ClusterSpecifier::Cluster(name)) if name.is_empty() => {
                            self.error(format!("{path}.route.cluster"), "must not be empty")
                        }
                        Some(ClusterSpecifier::ClusterHeader(name)) if name.is_empty() => {
                            self.error(format!("{path}.route.cluster_header"), "must not be empty")
                        }
                        Some(ClusterSpecifier::WeightedClusters(weighted)) => {
                            if weighted.clusters.is_empty() {
                                self.error(
                                    format!("{path}.route.weighted_clusters.clusters"),
                                    "must not be empty",
                                );
                            }
                            let total: u64 = weighted
                                .clusters
                                .iter()
                                .map(|c| u64::from(c.weight.unwrap_or(0)))
                                .sum();
                            if total == 0 {
                                self.error(
                                    format!("{path}.route.weighted_clusters"),
                                    "the weights must sum to more than 0",
                                );
                            }
                            for (index, cluster) in weighted.clusters.iter().enumerate() {
                                if cluster.name.is_empty() && cluster.cluster_header.is_empty() {
                                    self.error(
                                        format!("{path}.route.weighted_clusters.clusters[{index}]"),
                                        "one of name or cluster_header is required",
                                    );
                                }
                            }
                        }
                        Some(_) => {}
                    },
                    Some(_) => {}
                }
            }
        }
    }
}

/// Whether a proxy of `group` (empty: the global scope) sees a resource of `kind` named `name`.
fn visible(state: &ConfigState, kind: Kind, group: &str, name: &str) -> bool {
    state
        .resources
        .contains_key(&ResourceKey::new(kind, "", name))
        || (!group.is_empty()
            && state
                .resources
                .contains_key(&ResourceKey::new(kind, group, name)))
}

/// Validates `state` (the config as it would be after a write). Intrinsic checks run on the
/// `changed` resources; cross-reference checks run on everything, so a deletion that leaves a
/// dangling reference is refused too.
pub fn check_state(state: &ConfigState, changed: &BTreeSet<ResourceKey>) -> Findings {
    let mut findings = Findings::default();
    let mut decoded = BTreeMap::new();
    for (key, bytes) in &state.resources {
        let must_decode = changed.contains(key)
            || matches!(key.kind, Kind::Listener | Kind::Route | Kind::Cluster);
        if !must_decode {
            continue;
        }
        let mut checker = Checker {
            key,
            errors: Vec::new(),
        };
        match Typed::decode(key.kind, bytes) {
            Ok(typed) => {
                if changed.contains(key) {
                    checker.check(&typed);
                    // The proxy's own conversion: what a Remora proxy would NACK.
                    if let Err(error) = remora_config::resource::check(key.kind.type_url(), bytes) {
                        findings.remora.push(Problem {
                            resource: format!("{}/{}", key.kind, key.name),
                            group: key.group.clone(),
                            field: error.path,
                            reason: error.reason,
                        });
                    }
                }
                decoded.insert(key.clone(), typed);
            }
            Err(error) => checker.error("", format!("cannot decode: {error}")),
        }
        findings.errors.extend(checker.errors);
    }
    let mut bound_addresses: BTreeMap<(String, String), String> = BTreeMap::new();
    for (key, typed) in &decoded {
        let mut checker = Checker {
            key,
            errors: Vec::new(),
        };
        match typed {
            Typed::Route(route) => {
                for (path, cluster) in route_cluster_names(route, "") {
                    if !visible(state, Kind::Cluster, &key.group, &cluster) {
                        checker.error(
                            path,
                            format!(
                                "cluster {cluster:?} does not exist{}",
                                scope_hint(&key.group)
                            ),
                        );
                    }
                }
            }
            Typed::Listener(listener) => {
                for (path, route) in listener_route_names(listener) {
                    if !visible(state, Kind::Route, &key.group, &route) {
                        checker.error(
                            path,
                            format!(
                                "route configuration {route:?} does not exist{}",
                                scope_hint(&key.group)
                            ),
                        );
                    }
                }
                for (path, manager) in connection_managers(listener) {
                    if let Ok(HttpConnectionManager {
                        route_specifier: Some(RouteSpecifier::RouteConfig(route)),
                        ..
                    }) = manager
                    {
                        for (field, cluster) in
                            route_cluster_names(&route, &format!("{path}.route_config."))
                        {
                            if !visible(state, Kind::Cluster, &key.group, &cluster) {
                                checker.error(
                                    field,
                                    format!(
                                        "cluster {cluster:?} does not exist{}",
                                        scope_hint(&key.group)
                                    ),
                                );
                            }
                        }
                    }
                }
                if let Some(AddressKind::SocketAddress(socket)) =
                    listener.address.as_ref().and_then(|a| a.address.as_ref())
                {
                    let port = match &socket.port_specifier {
                        Some(PortSpecifier::PortValue(port)) => port.to_string(),
                        Some(PortSpecifier::NamedPort(name)) => name.clone(),
                        None => String::new(),
                    };
                    let bound = format!("{}:{port}", socket.address);
                    // Two listeners a proxy sees may not bind the same address.
                    for (group, other) in bound_addresses
                        .iter()
                        .filter(|((_, address), _)| *address == bound)
                        .map(|((group, _), name)| (group, name))
                    {
                        if (group.is_empty() || key.group.is_empty() || *group == key.group)
                            && other != &key.name
                        {
                            checker.error(
                                "address",
                                format!("{bound} is already bound by listener {other:?}"),
                            );
                        }
                    }
                    bound_addresses.insert((key.group.clone(), bound), key.name.clone());
                }
            }
            Typed::Cluster(cluster) => {
                if let Some(service) = eds_service_name(cluster)
                    && !visible(state, Kind::Endpoint, &key.group, service)
                {
                    findings.waiting.push(Problem {
                        resource: format!("{}/{}", key.kind, key.name),
                        group: key.group.clone(),
                        field: "eds_cluster_config".into(),
                        reason: format!("waiting for endpoints {service:?}; not sent to proxies until they exist"),
                    });
                }
            }
            _ => {}
        }
        findings.errors.extend(checker.errors);
    }
    findings
}

fn scope_hint(group: &str) -> String {
    if group.is_empty() {
        " (a global resource can only refer to global resources)".into()
    } else {
        format!(" globally or in group {group:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn put(
        state: &mut ConfigState,
        kind: Kind,
        group: &str,
        value: serde_json::Value,
    ) -> ResourceKey {
        let typed = Typed::from_json(kind, &value).expect("maps onto the message");
        let key = ResourceKey::new(kind, group, typed.name());
        state
            .resources
            .insert(key.clone(), Bytes::from(typed.encode()));
        key
    }

    fn route_to(cluster: &str) -> serde_json::Value {
        json!({"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]})
    }

    #[test]
    fn a_route_to_a_missing_cluster_is_refused_with_its_path() {
        let mut state = ConfigState::default();
        let key = put(&mut state, Kind::Route, "", route_to("nowhere"));
        let findings = check_state(&state, &BTreeSet::from([key]));
        assert_eq!(findings.errors.len(), 1, "{findings:?}");
        assert_eq!(findings.errors[0].resource, "routes/r");
        assert_eq!(
            findings.errors[0].field,
            "virtual_hosts[0].routes[0].route.cluster"
        );
        assert!(findings.errors[0].reason.contains("nowhere"));
    }

    #[test]
    fn group_resources_see_global_ones_but_not_the_reverse() {
        let mut state = ConfigState::default();
        put(
            &mut state,
            Kind::Cluster,
            "team",
            json!({"name": "c", "connect_timeout": "1s"}),
        );
        let global_route = put(&mut state, Kind::Route, "", route_to("c"));
        assert_eq!(
            check_state(&state, &BTreeSet::from([global_route.clone()]))
                .errors
                .len(),
            1
        );
        state.resources.remove(&global_route);
        let group_route = put(&mut state, Kind::Route, "team", route_to("c"));
        assert!(
            check_state(&state, &BTreeSet::from([group_route]))
                .errors
                .is_empty()
        );
    }

    #[test]
    fn an_eds_cluster_without_endpoints_is_waiting_not_wrong() {
        let mut state = ConfigState::default();
        let key = put(
            &mut state,
            Kind::Cluster,
            "",
            json!({"name": "c", "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}}}}),
        );
        let findings = check_state(&state, &BTreeSet::from([key]));
        assert!(findings.errors.is_empty(), "{findings:?}");
        assert_eq!(findings.waiting.len(), 1);
        put(&mut state, Kind::Endpoint, "", json!({"cluster_name": "c"}));
        assert!(check_state(&state, &BTreeSet::new()).waiting.is_empty());
    }

    #[test]
    fn intrinsic_errors_name_their_fields() {
        let mut state = ConfigState::default();
        let cluster = put(
            &mut state,
            Kind::Cluster,
            "",
            json!({"name": "c", "connect_timeout": "0s", "type": "EDS"}),
        );
        let route = put(
            &mut state,
            Kind::Route,
            "",
            json!({"name": "r", "virtual_hosts": [
            {"name": "v", "domains": ["a"], "routes": [{"match": {"safe_regex": {"regex": "("}}, "route": {"cluster": "c"}}]},
            {"name": "v", "domains": ["a"]}]}),
        );
        let findings = check_state(&state, &BTreeSet::from([cluster, route]));
        let fields: BTreeSet<_> = findings.errors.iter().map(|p| p.field.as_str()).collect();
        for expected in [
            "connect_timeout",
            "eds_cluster_config.eds_config",
            "virtual_hosts[0].routes[0].match.safe_regex.regex",
            "virtual_hosts[1].name",
            "virtual_hosts[1].domains[0]",
        ] {
            assert!(
                fields.contains(expected),
                "missing {expected} in {findings:?}"
            );
        }
    }

    #[test]
    fn a_name_different_from_the_key_is_refused() {
        let mut state = ConfigState::default();
        let typed = Typed::from_json(Kind::Cluster, &json!({"name": "a"})).expect("maps");
        let key = ResourceKey::new(Kind::Cluster, "", "b");
        state
            .resources
            .insert(key.clone(), Bytes::from(typed.encode()));
        let findings = check_state(&state, &BTreeSet::from([key]));
        assert_eq!(findings.errors[0].field, "name");
    }
}
