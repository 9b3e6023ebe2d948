//! Routes: per HTTP service port, a route configuration with one virtual host answering to
//! the service's host names. Its routes are the policy's path prefixes, in order, then `/`;
//! each carries the timeout, retries and hash key that apply to it, and a split across
//! services where the policy asks for one.
//!
//! Retries on conditions after which the app may already have acted on a request (a reset,
//! a 5xx) are only for idempotent methods unless the policy says `nonIdempotent`: such a
//! route is written twice, first for idempotent methods with every condition, then for the
//! rest with only connect-failure and refused-stream.

use xds_api::envoy::config::route::v3::RetryPolicy as EnvoyRetryPolicy;
use xds_api::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use xds_api::envoy::config::route::v3::route::Action;
use xds_api::envoy::config::route::v3::route_action::hash_policy::{
    ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
};
use xds_api::envoy::config::route::v3::route_action::{ClusterSpecifier, HashPolicy};
use xds_api::envoy::config::route::v3::route_match::PathSpecifier;
use xds_api::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use xds_api::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use xds_api::envoy::r#type::matcher::v3::RegexMatcher;

use crate::mesh::policy::{Effective, HashKey, PolicyDuration, RetryPolicy, SplitTarget};
use crate::mesh::translate::disabled;

/// Methods a retry may repeat whatever happened to the first try (RFC 9110 §9.2.2).
const IDEMPOTENT_METHODS: &str = "^(GET|HEAD|OPTIONS|PUT|DELETE|TRACE)$";

/// What one service port's route configuration is built from.
pub struct RouteInputs<'a> {
    /// Name of the route configuration and its virtual host.
    pub name: &'a str,
    /// The service port's own cluster.
    pub cluster: &'a str,
    pub domains: Vec<String>,
    pub policy: &'a Effective,
    /// The cluster of a split target (another service of the namespace, same port), if it
    /// exists.
    pub split_cluster: &'a dyn Fn(&str) -> Option<String>,
}

/// The route configuration of one HTTP service port.
pub fn route_configuration(inputs: &RouteInputs<'_>) -> RouteConfiguration {
    let policy = inputs.policy;
    let mut routes = Vec::new();
    for route in &policy.routes {
        let action = RouteTemplate {
            prefix: &route.prefix,
            cluster: cluster_specifier(inputs, &route.split),
            timeout: route.timeout.or(policy.timeout),
            retries: route.retries.as_ref().or(policy.retries.as_ref()),
            hash_key: route.hash_key.as_ref().or(policy
                .load_balancer
                .as_ref()
                .and_then(|lb| lb.hash_key.as_ref())),
        };
        routes.extend(action.routes());
    }
    let default = RouteTemplate {
        prefix: "/",
        cluster: ClusterSpecifier::Cluster(inputs.cluster.to_string()),
        timeout: policy.timeout,
        retries: policy.retries.as_ref(),
        hash_key: policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.hash_key.as_ref()),
    };
    routes.extend(default.routes());
    RouteConfiguration {
        name: inputs.name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: inputs.name.to_string(),
            domains: inputs.domains.clone(),
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The cluster, or a weighted split: targets that do not exist are left out and their share
/// stays with the service's own cluster.
fn cluster_specifier(inputs: &RouteInputs<'_>, split: &[SplitTarget]) -> ClusterSpecifier {
    let mut clusters = Vec::new();
    let mut taken = 0u32;
    for target in split {
        if let Some(cluster) = (inputs.split_cluster)(&target.service) {
            let weight = target.weight.min(100 - taken);
            if weight > 0 {
                taken += weight;
                clusters.push(ClusterWeight {
                    name: cluster,
                    weight: Some(weight),
                    ..Default::default()
                });
            }
        }
    }
    if clusters.is_empty() {
        return ClusterSpecifier::Cluster(inputs.cluster.to_string());
    }
    if taken < 100 {
        clusters.insert(
            0,
            ClusterWeight {
                name: inputs.cluster.to_string(),
                weight: Some(100 - taken),
                ..Default::default()
            },
        );
    }
    ClusterSpecifier::WeightedClusters(WeightedCluster {
        clusters,
        ..Default::default()
    })
}

/// One path prefix and what applies to it.
struct RouteTemplate<'a> {
    prefix: &'a str,
    cluster: ClusterSpecifier,
    timeout: Option<PolicyDuration>,
    retries: Option<&'a RetryPolicy>,
    hash_key: Option<&'a HashKey>,
}

impl RouteTemplate<'_> {
    fn routes(&self) -> Vec<Route> {
        let retries = self.retries.filter(|retries| retries.attempts > 0);
        let Some(retries) = retries else {
            return vec![self.route(None, None)];
        };
        let conditions = retry_conditions(retries);
        let safe: Vec<&str> = retries
            .retry_on
            .iter()
            .chain(default_retry_on(retries))
            .filter(|condition| condition.is_safe_for_any_method())
            .map(|condition| condition.as_envoy())
            .collect();
        if retries.non_idempotent || safe.len() == conditions.len() {
            return vec![self.route(None, Some(envoy_retry(retries, &conditions)))];
        }
        let idempotent = HeaderMatcher {
            name: ":method".to_string(),
            header_match_specifier: Some(HeaderMatchSpecifier::SafeRegexMatch(RegexMatcher {
                regex: IDEMPOTENT_METHODS.to_string(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let rest = (!safe.is_empty()).then(|| envoy_retry(retries, &safe));
        vec![
            self.route(Some(idempotent), Some(envoy_retry(retries, &conditions))),
            self.route(None, rest),
        ]
    }

    fn route(&self, method: Option<HeaderMatcher>, retry: Option<EnvoyRetryPolicy>) -> Route {
        Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix(self.prefix.to_string())),
                headers: method.into_iter().collect(),
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(self.cluster.clone()),
                // No policy timeout: none at all, as without a mesh (Envoy's 15 s default
                // would cut long polls and streams).
                timeout: Some(self.timeout.map_or_else(disabled, |t| t.to_proto())),
                retry_policy: retry,
                hash_policy: self.hash_key.map(hash_policy).into_iter().collect(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }
}

/// A retry policy that names no conditions retries on these.
fn default_retry_on(retries: &RetryPolicy) -> &'static [crate::mesh::policy::RetryOn] {
    use crate::mesh::policy::RetryOn::*;
    if retries.retry_on.is_empty() {
        &[
            ConnectFailure,
            RefusedStream,
            Unavailable,
            Cancelled,
            RetriableStatusCodes,
        ]
    } else {
        &[]
    }
}

fn retry_conditions(retries: &RetryPolicy) -> Vec<&'static str> {
    retries
        .retry_on
        .iter()
        .chain(default_retry_on(retries))
        .map(|condition| condition.as_envoy())
        .collect()
}

fn envoy_retry(retries: &RetryPolicy, conditions: &[&str]) -> EnvoyRetryPolicy {
    let names_codes = conditions.contains(&"retriable-status-codes");
    let codes: Vec<u32> = if !names_codes {
        Vec::new()
    } else if retries.retriable_status_codes.is_empty() {
        vec![503]
    } else {
        retries
            .retriable_status_codes
            .iter()
            .map(|code| u32::from(*code))
            .collect()
    };
    EnvoyRetryPolicy {
        retry_on: conditions.join(","),
        num_retries: Some(retries.attempts),
        per_try_timeout: retries.per_try_timeout.map(|t| t.to_proto()),
        retriable_status_codes: codes,
        ..Default::default()
    }
}

fn hash_policy(key: &HashKey) -> HashPolicy {
    let specifier = if let Some(header) = &key.header {
        PolicySpecifier::Header(Header {
            header_name: header.clone(),
            ..Default::default()
        })
    } else if let Some(cookie) = &key.cookie {
        PolicySpecifier::Cookie(Cookie {
            name: cookie.name.clone(),
            ttl: cookie.ttl.map(|t| t.to_proto()),
            path: cookie.path.clone().unwrap_or_default(),
            ..Default::default()
        })
    } else if let Some(name) = &key.query_parameter {
        PolicySpecifier::QueryParameter(QueryParameter { name: name.clone() })
    } else {
        PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
    };
    HashPolicy {
        policy_specifier: Some(specifier),
        terminal: false,
    }
}
