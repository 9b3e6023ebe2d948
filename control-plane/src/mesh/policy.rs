//! `TrafficPolicy` (`remora.io/v1alpha1`): per service, and optionally per port or route
//! prefix, how callers reach it: load balancing and hash key, timeouts, retries with a budget,
//! circuit breakers, outlier detection, tracing sampling and mTLS mode. The same object is a
//! Kubernetes custom resource (its CRD, with the OpenAPI schema derived from these types, is
//! rendered by `remora-cp manifests`) and a REST resource (`/v1/mesh/trafficpolicies`).
//!
//! This module holds the object, its checks beyond the schema, and the merge of the policies
//! that apply to one service port into one [`Effective`] policy; `translate` turns that into
//! Envoy fields.

use std::borrow::Cow;
use std::time::Duration;

use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written the way Kubernetes users write them: `250ms`, `1.5s`, `2m`, `1h30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct PolicyDuration(pub Duration);

/// The schema's pattern for [`PolicyDuration`].
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(h|m|s|ms|us))+$";

impl PolicyDuration {
    /// Parses `1h30m`, `1.5s`, `250ms`, `10us`.
    pub fn parse(text: &str) -> Result<PolicyDuration, String> {
        let bad = || format!("{text:?} is not a duration (write e.g. 250ms, 1.5s, 2m, 1h30m)");
        if text.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let number_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let (number, after) = rest.split_at(number_end);
            let unit_end = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_end);
            let value: f64 = number.parse().map_err(|_| bad())?;
            let seconds = match unit {
                "h" => value * 3600.0,
                "m" => value * 60.0,
                "s" => value,
                "ms" => value / 1e3,
                "us" => value / 1e6,
                _ => return Err(bad()),
            };
            total += Duration::try_from_secs_f64(seconds).map_err(|_| bad())?;
            rest = after;
        }
        Ok(PolicyDuration(total))
    }

    /// Envoy's proto duration.
    pub fn to_proto(self) -> prost_types::Duration {
        prost_types::Duration {
            seconds: self.0.as_secs() as i64,
            nanos: self.0.subsec_nanos() as i32,
        }
    }
}

impl std::fmt::Display for PolicyDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", nanos / 1_000_000_000)
        } else if nanos.is_multiple_of(1_000_000) {
            write!(f, "{}ms", nanos / 1_000_000)
        } else {
            write!(f, "{}us", nanos / 1_000)
        }
    }
}

impl Serialize for PolicyDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PolicyDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        PolicyDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for PolicyDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 250ms, 1.5s, 2m or 1h30m.",
        })
    }
}

/// How callers reach one service. Fields left out keep the mesh defaults (see
/// docs/mesh.md); a port-specific policy overrides a service-wide one field by field.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "remora.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    shortname = "tp",
    namespaced,
    status = "TrafficPolicyStatus",
    doc = "How callers in the mesh reach one service: load balancing, timeouts, retries, circuit breakers, outlier detection, tracing and mTLS."
)]
#[kube(printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"))]
#[kube(
    printcolumn = r#"{"name":"Acked", "type":"integer", "jsonPath":".status.proxies.acked"}"#,
    printcolumn = r#"{"name":"Nacked", "type":"integer", "jsonPath":".status.proxies.nacked"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// The Service, in the policy's namespace, this policy applies to.
    #[schemars(length(min = 1))]
    pub service: String,
    /// Only this port of the service; every port when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Namespaces whose sidecars may see the service ("." is the service's own namespace,
    /// "*" all). Unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_to: Option<Vec<String>>,
    /// Time to establish a connection to an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<PolicyDuration>,
    /// HTTP: time for the whole response, retries included. "0s" disables it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<PolicyDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsPolicy>,
    /// HTTP: settings for requests whose path starts with a prefix, checked in order before
    /// the service-wide route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RoutePolicy>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LbAlgorithm {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    /// Consistent hashing on `hashKey` (Ketama ring).
    RingHash,
    /// Consistent hashing on `hashKey` (Maglev table).
    Maglev,
}

impl LbAlgorithm {
    pub fn is_hashing(self) -> bool {
        matches!(self, LbAlgorithm::RingHash | LbAlgorithm::Maglev)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerPolicy {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// What a consistent-hash algorithm hashes on (required for RingHash and Maglev).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
}

/// Exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashKey {
    /// A request header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A cookie's value (generated with this ttl when absent and ttl is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<CookieKey>,
    /// The caller's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
    /// A query parameter's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_parameter: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieKey {
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<PolicyDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A retry condition, as Envoy names it in `retry_on`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection to the endpoint failed: the request never reached it.
    ConnectFailure,
    /// The endpoint refused the HTTP/2 stream: the request never reached the app.
    RefusedStream,
    /// The endpoint reset the request or went away.
    Reset,
    /// Any 5xx answer (includes gateway errors).
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    /// The codes in `retriableStatusCodes`.
    RetriableStatusCodes,
    /// gRPC status codes.
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
}

impl RetryOn {
    pub fn as_envoy(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::RefusedStream => "refused-stream",
            RetryOn::Reset => "reset",
            RetryOn::FiveXx => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::RetriableStatusCodes => "retriable-status-codes",
            RetryOn::Cancelled => "cancelled",
            RetryOn::DeadlineExceeded => "deadline-exceeded",
            RetryOn::ResourceExhausted => "resource-exhausted",
            RetryOn::Unavailable => "unavailable",
        }
    }

    /// Whether the request certainly never reached the app, so retrying cannot run it twice.
    pub fn is_safe_for_any_method(self) -> bool {
        matches!(self, RetryOn::ConnectFailure | RetryOn::RefusedStream)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try (0 turns retries off).
    #[schemars(range(max = 10))]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<PolicyDuration>,
    /// Conditions to retry on; default connect-failure, refused-stream, unavailable,
    /// cancelled and retriable-status-codes (503).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// Also retry non-idempotent requests (POST, PATCH) on conditions after which the app may
    /// already have acted on them. Off: those requests are retried only on connect-failure
    /// and refused-stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
    /// Caps retries in flight to a share of the requests in flight, so retries cannot
    /// multiply load on a struggling service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries in flight as a percentage of requests in flight.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    /// Retries always allowed in flight, whatever the percentage says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_concurrency: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionPolicy {
    /// false turns outlier detection off (also the mesh default's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Eject an endpoint after this many 5xx answers in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Eject an endpoint after this many 502/503/504 or connection failures in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<PolicyDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<PolicyDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingPolicy {
    /// Share of requests that start a trace, in percent.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub sampling_percent: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// Plain text both ways (the default).
    #[default]
    Disable,
    /// Callers use mTLS; the service's sidecars accept mTLS and plain text.
    Permissive,
    /// Callers use mTLS; the service's sidecars accept only mTLS.
    Strict,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsPolicy {
    pub mode: MtlsMode,
}

/// Settings for requests under one path prefix.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutePolicy {
    /// Path prefix, starting with "/".
    #[schemars(regex(pattern = r"^/"))]
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<PolicyDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
    /// Send shares of these requests to other services of the same namespace (same port),
    /// e.g. a canary; the policy's own service takes the percentage the others leave.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitTarget>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SplitTarget {
    #[schemars(length(min = 1))]
    pub service: String,
    /// Percentage of the requests.
    #[schemars(range(min = 1, max = 100))]
    pub weight: u32,
}

/// What the control plane reports about a policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: the policy is valid and in effect (or why not); `RemoraProxyCompatible`:
    /// whether Remora proxies take the config it generates (Envoy sidecars may take more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PolicyCondition>,
    /// The xDS config version that first carries this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
    /// Sidecars that receive the service, by where they stand with that version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<ProxyCounts>,
    /// Sidecars (node ids) that ACKed it; at most 50 listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acked_proxies: Vec<String>,
    /// Sidecars that rejected it, with their error; at most 50 listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nacked_proxies: Vec<NackedProxy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    #[serde(rename = "type")]
    pub kind: String,
    /// "True" or "False".
    pub status: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCounts {
    pub total: u32,
    pub acked: u32,
    pub nacked: u32,
    pub pending: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NackedProxy {
    pub proxy: String,
    pub version: String,
    pub message: String,
}

impl HashKey {
    fn set_fields(&self) -> usize {
        [
            self.header.is_some(),
            self.cookie.is_some(),
            self.source_ip == Some(true),
            self.query_parameter.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count()
    }
}

impl TrafficPolicySpec {
    /// What the schema cannot say; each problem names its field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.service.is_empty() {
            problems.push("spec.service: must name a service".to_string());
        }
        if self.port == Some(0) {
            problems.push("spec.port: must be between 1 and 65535".to_string());
        }
        let hash_key = |key: &HashKey, path: &str, problems: &mut Vec<String>| {
            if key.set_fields() != 1 {
                problems.push(format!(
                    "{path}: set exactly one of header, cookie, sourceIP, queryParameter"
                ));
            }
        };
        if let Some(lb) = &self.load_balancer {
            match (&lb.hash_key, lb.algorithm.is_hashing()) {
                (Some(key), true) => hash_key(key, "spec.loadBalancer.hashKey", &mut problems),
                (Some(_), false) => problems.push(
                    "spec.loadBalancer.hashKey: only RingHash and Maglev hash requests".to_string(),
                ),
                (None, true) => problems.push(format!(
                    "spec.loadBalancer.hashKey: {:?} needs a hash key",
                    lb.algorithm
                )),
                (None, false) => {}
            }
        }
        let retries = |retry: &RetryPolicy, path: &str, problems: &mut Vec<String>| {
            if retry.attempts > 10 {
                problems.push(format!("{path}.attempts: at most 10"));
            }
            if let Some(budget) = &retry.budget
                && !(0.0..=100.0).contains(&budget.percent)
            {
                problems.push(format!("{path}.budget.percent: must be between 0 and 100"));
            }
            if retry
                .retriable_status_codes
                .iter()
                .any(|code| !(100..=599).contains(code))
            {
                problems.push(format!(
                    "{path}.retriableStatusCodes: HTTP status codes are 100 to 599"
                ));
            }
        };
        if let Some(retry) = &self.retries {
            retries(retry, "spec.retries", &mut problems);
        }
        if let Some(outlier) = &self.outlier_detection
            && outlier.max_ejection_percent.is_some_and(|p| p > 100)
        {
            problems.push("spec.outlierDetection.maxEjectionPercent: at most 100".to_string());
        }
        if let Some(tracing) = &self.tracing
            && !(0.0..=100.0).contains(&tracing.sampling_percent)
        {
            problems.push("spec.tracing.samplingPercent: must be between 0 and 100".to_string());
        }
        let mut prefixes = std::collections::BTreeSet::new();
        for (index, route) in self.routes.iter().enumerate() {
            let path = format!("spec.routes[{index}]");
            if !route.prefix.starts_with('/') {
                problems.push(format!("{path}.prefix: must start with \"/\""));
            }
            if !prefixes.insert(route.prefix.as_str()) {
                problems.push(format!("{path}.prefix: {:?} appears twice", route.prefix));
            }
            if let Some(retry) = &route.retries {
                retries(retry, &format!("{path}.retries"), &mut problems);
            }
            if let Some(key) = &route.hash_key {
                hash_key(key, &format!("{path}.hashKey"), &mut problems);
            }
            if route.split.iter().map(|split| split.weight).sum::<u32>() > 100 {
                problems.push(format!(
                    "{path}.split: weights are percentages; they add up to more than 100"
                ));
            }
            for (split_index, split) in route.split.iter().enumerate() {
                if split.weight == 0 {
                    problems.push(format!(
                        "{path}.split[{split_index}].weight: must be at least 1"
                    ));
                }
                if split.service == self.service {
                    problems.push(format!(
                        "{path}.split[{split_index}].service: the policy's own service takes the remaining share; name other services"
                    ));
                }
            }
        }
        problems
    }
}

/// Everything that applies to one service port once the policies targeting it are merged
/// over the mesh defaults. `None` fields leave Envoy's own default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effective {
    pub export_to: Option<Vec<String>>,
    pub connect_timeout: Option<PolicyDuration>,
    pub timeout: Option<PolicyDuration>,
    pub load_balancer: Option<LoadBalancerPolicy>,
    pub retries: Option<RetryPolicy>,
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    pub outlier_detection: Option<OutlierDetectionPolicy>,
    pub tracing: Option<TracingPolicy>,
    pub mtls: MtlsMode,
    pub routes: Vec<RoutePolicy>,
}

impl Effective {
    /// Lays `spec`'s fields over these, field by field.
    pub fn apply(&mut self, spec: &TrafficPolicySpec) {
        fn over<T: Clone>(slot: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                slot.clone_from(value);
            }
        }
        over(&mut self.export_to, &spec.export_to);
        over(&mut self.connect_timeout, &spec.connect_timeout);
        over(&mut self.timeout, &spec.timeout);
        over(&mut self.load_balancer, &spec.load_balancer);
        over(&mut self.retries, &spec.retries);
        over(&mut self.circuit_breaker, &spec.circuit_breaker);
        over(&mut self.outlier_detection, &spec.outlier_detection);
        over(&mut self.tracing, &spec.tracing);
        if let Some(mtls) = &spec.mtls {
            self.mtls = mtls.mode;
        }
        if !spec.routes.is_empty() {
            self.routes.clone_from(&spec.routes);
        }
    }

    /// Whether the service is visible to sidecars of `namespace` (its own is `home`).
    pub fn exported_to(&self, home: &str, namespace: &str) -> bool {
        match &self.export_to {
            None => true,
            Some(list) => list.iter().any(|entry| {
                entry == "*" || entry == namespace || (entry == "." && home == namespace)
            }),
        }
    }
}

/// The TrafficPolicy CustomResourceDefinition as YAML (`remora-cp manifests`,
/// `deploy/trafficpolicy-crd.yaml`).
pub fn crd_manifest() -> String {
    use kube::CustomResourceExt;
    let crd = TrafficPolicy::crd();
    format!(
        "# Rendered by `remora-cp manifests`; do not edit (a test keeps the two equal).\n{}",
        serde_yaml::to_string(&crd).unwrap_or_default()
    )
}

/// The mesh defaults, on unless `--no-mesh-defaults` (documented in docs/mesh.md): better than
/// Envoy's bare defaults, and what meshes users compare us with do.
pub fn mesh_defaults() -> Effective {
    Effective {
        retries: Some(RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            retriable_status_codes: vec![503],
            non_idempotent: false,
            budget: Some(RetryBudget {
                percent: 20.0,
                min_concurrency: Some(3),
            }),
        }),
        outlier_detection: Some(OutlierDetectionPolicy {
            enabled: Some(true),
            consecutive_5xx: None,
            consecutive_gateway_errors: Some(5),
            interval: Some(PolicyDuration(Duration::from_secs(5))),
            base_ejection_time: Some(PolicyDuration(Duration::from_secs(30))),
            max_ejection_percent: Some(50),
        }),
        circuit_breaker: Some(CircuitBreakerPolicy {
            max_connections: Some(u32::MAX),
            max_pending_requests: Some(u32::MAX),
            max_requests: Some(u32::MAX),
            max_retries: Some(u32::MAX),
        }),
        ..Effective::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_the_way_kubernetes_writes_them() {
        let parse = |text| PolicyDuration::parse(text).map(|d| d.0);
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        for bad in ["", "5", "s", "1x", "1.2.3s", "-1s", "1 s"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let regex = regex::Regex::new(DURATION_PATTERN).expect("pattern compiles");
        for good in ["250ms", "1.5s", "1h30m", "0s"] {
            assert!(regex.is_match(good), "{good} rejected by the schema");
        }
        assert_eq!(
            PolicyDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
        assert_eq!(PolicyDuration(Duration::from_secs(3)).to_string(), "3s");
    }

    #[test]
    fn problems_name_their_fields() {
        let spec: TrafficPolicySpec = serde_json::from_value(serde_json::json!({
            "service": "b",
            "loadBalancer": {"algorithm": "RingHash"},
            "retries": {"attempts": 11, "retriableStatusCodes": [99]},
            "routes": [
                {"prefix": "api"},
                {"prefix": "/x", "split": [{"service": "b", "weight": 1}], "hashKey": {"header": "a", "sourceIp": true}}
            ]
        }))
        .expect("parses");
        let problems = spec.problems();
        let expected = [
            "spec.loadBalancer.hashKey: RingHash needs a hash key",
            "spec.retries.attempts: at most 10",
            "spec.retries.retriableStatusCodes",
            "spec.routes[0].prefix: must start with",
            "spec.routes[1].hashKey: set exactly one",
            "spec.routes[1].split[0].service",
        ];
        for text in expected {
            assert!(
                problems.iter().any(|p| p.starts_with(text)),
                "{text:?} missing from {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_refused_with_their_names() {
        let error = serde_json::from_value::<TrafficPolicySpec>(
            serde_json::json!({"service": "b", "timeot": "1s"}),
        )
        .expect_err("unknown field");
        assert!(error.to_string().contains("timeot"), "{error}");
        let error = serde_json::from_value::<TrafficPolicySpec>(
            serde_json::json!({"service": "b", "timeout": "soon"}),
        )
        .expect_err("bad duration");
        assert!(
            error.to_string().contains("\"soon\" is not a duration"),
            "{error}"
        );
    }

    #[test]
    fn later_policies_override_field_by_field() {
        let mut effective = mesh_defaults();
        let wide: TrafficPolicySpec = serde_json::from_value(
            serde_json::json!({"service": "b", "timeout": "5s", "mtls": {"mode": "Strict"}}),
        )
        .expect("parses");
        let port: TrafficPolicySpec = serde_json::from_value(
            serde_json::json!({"service": "b", "port": 80, "timeout": "1s"}),
        )
        .expect("parses");
        effective.apply(&wide);
        effective.apply(&port);
        assert_eq!(
            effective.timeout,
            Some(PolicyDuration(Duration::from_secs(1)))
        );
        assert_eq!(effective.mtls, MtlsMode::Strict);
        assert!(effective.retries.is_some(), "defaults kept");
    }

    #[test]
    fn export_to_limits_visibility() {
        let mut effective = Effective::default();
        assert!(effective.exported_to("shop", "web"));
        effective.export_to = Some(vec![".".into(), "ops".into()]);
        assert!(effective.exported_to("shop", "shop"));
        assert!(effective.exported_to("shop", "ops"));
        assert!(!effective.exported_to("shop", "web"));
    }
}
