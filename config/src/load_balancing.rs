//! How a cluster picks a host: the policy (the `lb_policy` enum with its `*_lb_config`, or the
//! typed `load_balancing_policy` extensions, Envoy's and Remora's own) and the settings from
//! `common_lb_config` that priority selection applies around it (panic threshold, locality
//! weighting).
//!
//! As in Envoy: a set `load_balancing_policy` (or `lb_policy: LOAD_BALANCING_POLICY_CONFIG`)
//! wins over `lb_policy`; its first policy of a type Remora knows is used; it cannot be combined
//! with the locality and consistent-hashing parts of `common_lb_config`, which its policies
//! carry themselves. A legacy `*_lb_config` that does not belong to `lb_policy` is ignored, as
//! Envoy ignores it.

use std::time::Duration;

use xds_api::envoy::config::cluster::v3 as cluster_pb;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::extensions::load_balancing_policies as lb_pb;
use xds_api::envoy::r#type::v3 as type_pb;
use xds_api::remora::extensions::load_balancing_policies::peak_ewma::v1 as peak_ewma_pb;
use xds_api::type_urls;

use crate::common::{opt_duration, unpack};
use crate::error::{ConfigResult, err, field, item};
use crate::hash_policy::{HashPolicy, hash_policies};
use crate::unsupported;

/// Envoy's default `healthy_panic_threshold` (percent).
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;
/// Envoy's ring sizes: at least 1,024 entries by default, at most 8M.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's Maglev table size by default, and the largest it allows.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

/// Everything about picking a host of the cluster.
#[derive(Debug, Clone)]
pub struct LoadBalancing {
    pub policy: LbPolicy,
    /// `healthy_panic_threshold` in percent: a priority with fewer usable hosts than this
    /// balances over all of its hosts (0: never).
    pub panic_threshold: u32,
    /// Locality weighted balancing: a locality is chosen by its weight (scaled by its share of
    /// usable hosts), then a host in it. Hosts of localities without a weight get no traffic.
    pub locality_weighted: bool,
    /// `zone_aware_lb_config.fail_traffic_on_panic`: a priority in panic picks no host at all.
    /// (Zone-aware routing itself needs `cluster_manager.local_cluster_name`, which Remora does
    /// not take; without it Envoy routes across zones exactly as without the config.)
    pub fail_traffic_on_panic: bool,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        LoadBalancing {
            policy: LbPolicy::RoundRobin(RoundRobin::default()),
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
            locality_weighted: false,
            fail_traffic_on_panic: false,
        }
    }
}

/// The policy that picks among one priority's usable hosts.
#[derive(Debug, Clone)]
pub enum LbPolicy {
    /// Weighted round robin.
    RoundRobin(RoundRobin),
    /// The host with the fewest requests in flight among `choice_count` random ones (equal
    /// weights), or weighted round robin over weights divided by in-flight requests.
    LeastRequest(LeastRequest),
    /// A host at random (weights are ignored, as in Envoy).
    Random,
    /// Consistent hashing on a ring (ketama).
    RingHash(RingHash),
    /// Consistent hashing with a Maglev lookup table.
    Maglev(Maglev),
    /// Remora's latency-aware policy: peak EWMA of response times, power of two choices.
    PeakEwma(PeakEwma),
    /// The cluster picks (ORIGINAL_DST).
    ClusterProvided,
}

impl LbPolicy {
    /// The policy's own hash policies, which replace the route's (typed ring hash and Maglev
    /// configs only).
    pub fn hash_policies(&self) -> &[HashPolicy] {
        match self {
            LbPolicy::RingHash(ring) => &ring.hash_policies,
            LbPolicy::Maglev(maglev) => &maglev.hash_policies,
            _ => &[],
        }
    }

    /// Envoy's name for the policy (`/clusters` and logs).
    pub fn name(&self) -> &'static str {
        match self {
            LbPolicy::RoundRobin(_) => "ROUND_ROBIN",
            LbPolicy::LeastRequest(_) => "LEAST_REQUEST",
            LbPolicy::Random => "RANDOM",
            LbPolicy::RingHash(_) => "RING_HASH",
            LbPolicy::Maglev(_) => "MAGLEV",
            LbPolicy::PeakEwma(_) => "PEAK_EWMA",
            LbPolicy::ClusterProvided => "CLUSTER_PROVIDED",
        }
    }
}

/// Slow start: a host's weight ramps up over `window` after it joins (or passes an active
/// health check again): `weight × max(min_weight, (time in window / window)^(1/aggression))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    pub window: Duration,
    pub aggression: f64,
    /// The smallest share of its weight a host in slow start gets (0..=1; Envoy's 10%).
    pub min_weight: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoundRobin {
    pub slow_start: Option<SlowStart>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeastRequest {
    /// Random hosts compared per pick (at least 2).
    pub choice_count: u32,
    /// Compare every host instead of `choice_count` random ones (`selection_method: FULL_SCAN`).
    pub full_scan: bool,
    /// With unequal weights: `weight / (active + 1)^bias`.
    pub active_request_bias: f64,
    pub slow_start: Option<SlowStart>,
}

impl Default for LeastRequest {
    fn default() -> Self {
        LeastRequest {
            choice_count: 2,
            full_scan: false,
            active_request_bias: 1.0,
            slow_start: None,
        }
    }
}

/// How hosts' keys are hashed onto the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashFunction {
    XxHash,
    /// 64-bit MurmurHash2 as libstdc++'s `std::hash<std::string>`.
    MurmurHash2,
}

#[derive(Debug, Clone)]
pub struct RingHash {
    pub minimum_ring_size: u64,
    pub maximum_ring_size: u64,
    pub hash_function: HashFunction,
    /// `consistent_hashing_lb_config.hash_policy` (typed config): replaces the route's.
    pub hash_policies: Vec<HashPolicy>,
}

#[derive(Debug, Clone)]
pub struct Maglev {
    /// A prime.
    pub table_size: u64,
    pub hash_policies: Vec<HashPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeakEwma {
    pub choice_count: u32,
    /// Time constant of the average's decay.
    pub decay: Duration,
    /// Assumed response time of a host that has not answered yet.
    pub default_rtt: Duration,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma {
            choice_count: 2,
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

/// The cluster fields that decide load balancing.
#[derive(Debug, Clone, Copy)]
pub struct LbFields<'a> {
    pub lb_policy: i32,
    pub lb_config: &'a Option<cluster_pb::cluster::LbConfig>,
    pub common_lb_config: &'a Option<cluster_pb::cluster::CommonLbConfig>,
    pub load_balancing_policy: &'a Option<cluster_pb::LoadBalancingPolicy>,
    /// The cluster is ORIGINAL_DST (the only kind that may leave picking to the cluster).
    pub original_dst: bool,
}

/// Reads the cluster's load balancing; `path` is the cluster's.
pub fn load_balancing(fields: LbFields<'_>, path: &str) -> ConfigResult<LoadBalancing> {
    let LbFields {
        lb_policy,
        lb_config,
        common_lb_config,
        load_balancing_policy,
        original_dst,
    } = fields;
    use cluster_pb::cluster::LbPolicy as E;
    let policy_enum =
        E::try_from(lb_policy).or_else(|_| err(field(path, "lb_policy"), "unknown value"))?;
    let mut out = LoadBalancing::default();
    let common = common(common_lb_config, &field(path, "common_lb_config"), &mut out)?;
    let typed = load_balancing_policy.is_some() || policy_enum == E::LoadBalancingPolicyConfig;
    if typed {
        let Some(list) = load_balancing_policy else {
            return err(
                field(path, "load_balancing_policy"),
                "required when lb_policy is LOAD_BALANCING_POLICY_CONFIG",
            );
        };
        if common.locality_set || common.consistent_hashing_set {
            return err(
                field(path, "common_lb_config"),
                "zone_aware_lb_config, locality_weighted_lb_config and \
                 consistent_hashing_lb_config cannot be combined with load_balancing_policy \
                 (set them in the policy's own config)",
            );
        }
        out.policy = typed_policy(
            list,
            &field(path, "load_balancing_policy"),
            original_dst,
            &mut out,
        )?;
        return Ok(out);
    }
    let ring_hash = match lb_config {
        Some(cluster_pb::cluster::LbConfig::RingHashLbConfig(config)) => Some(config),
        _ => None,
    };
    let maglev = match lb_config {
        Some(cluster_pb::cluster::LbConfig::MaglevLbConfig(config)) => Some(config),
        _ => None,
    };
    let least_request = match lb_config {
        Some(cluster_pb::cluster::LbConfig::LeastRequestLbConfig(config)) => Some(config),
        _ => None,
    };
    let round_robin = match lb_config {
        Some(cluster_pb::cluster::LbConfig::RoundRobinLbConfig(config)) => Some(config),
        _ => None,
    };
    if let Some(cluster_pb::cluster::LbConfig::OriginalDstLbConfig(config)) = lb_config {
        let cluster_pb::cluster::OriginalDstLbConfig {
            use_http_header,
            http_header_name,
            upstream_port_override,
        } = config;
        let opath = field(path, "original_dst_lb_config");
        unsupported!(
            &opath,
            use_http_header,
            http_header_name,
            upstream_port_override
        );
    }
    out.policy = match policy_enum {
        E::RoundRobin => LbPolicy::RoundRobin(RoundRobin {
            slow_start: match round_robin {
                Some(cluster_pb::cluster::RoundRobinLbConfig { slow_start_config }) => {
                    legacy_slow_start(
                        slow_start_config,
                        &field(path, "round_robin_lb_config.slow_start_config"),
                    )?
                }
                None => None,
            },
        }),
        E::LeastRequest => {
            let mut config = LeastRequest::default();
            if let Some(cluster_pb::cluster::LeastRequestLbConfig {
                choice_count,
                active_request_bias,
                slow_start_config,
            }) = least_request
            {
                let lpath = field(path, "least_request_lb_config");
                config.choice_count =
                    choice_count_or_default(*choice_count, &field(&lpath, "choice_count"))?;
                config.active_request_bias =
                    request_bias(active_request_bias, &field(&lpath, "active_request_bias"))?;
                config.slow_start =
                    legacy_slow_start(slow_start_config, &field(&lpath, "slow_start_config"))?;
            }
            LbPolicy::LeastRequest(config)
        }
        E::Random => LbPolicy::Random,
        E::RingHash => {
            let (minimum, maximum, function) = match ring_hash {
                Some(cluster_pb::cluster::RingHashLbConfig {
                    minimum_ring_size,
                    hash_function,
                    maximum_ring_size,
                }) => {
                    use cluster_pb::cluster::ring_hash_lb_config::HashFunction as F;
                    let function = match F::try_from(*hash_function) {
                        Ok(F::XxHash) => HashFunction::XxHash,
                        Ok(F::MurmurHash2) => HashFunction::MurmurHash2,
                        Err(_) => {
                            return err(
                                field(path, "ring_hash_lb_config.hash_function"),
                                "unknown value",
                            );
                        }
                    };
                    (*minimum_ring_size, *maximum_ring_size, function)
                }
                None => (None, None, HashFunction::XxHash),
            };
            LbPolicy::RingHash(ring_sizes(
                minimum,
                maximum,
                function,
                Vec::new(),
                &field(path, "ring_hash_lb_config"),
            )?)
        }
        E::Maglev => {
            let table_size = match maglev {
                Some(cluster_pb::cluster::MaglevLbConfig { table_size }) => *table_size,
                None => None,
            };
            LbPolicy::Maglev(maglev_table(
                table_size,
                Vec::new(),
                &field(path, "maglev_lb_config.table_size"),
            )?)
        }
        E::ClusterProvided if original_dst => LbPolicy::ClusterProvided,
        E::ClusterProvided => {
            return err(
                field(path, "lb_policy"),
                "CLUSTER_PROVIDED is only for ORIGINAL_DST clusters",
            );
        }
        E::LoadBalancingPolicyConfig => unreachable!("handled as a typed policy above"),
    };
    Ok(out)
}

/// What `common_lb_config` set that the policy reading needs to know.
struct CommonFacts {
    locality_set: bool,
    consistent_hashing_set: bool,
}

fn common(
    proto: &Option<cluster_pb::cluster::CommonLbConfig>,
    path: &str,
    out: &mut LoadBalancing,
) -> ConfigResult<CommonFacts> {
    let Some(cluster_pb::cluster::CommonLbConfig {
        healthy_panic_threshold,
        update_merge_window,
        ignore_new_hosts_until_first_hc,
        close_connections_on_host_set_change,
        consistent_hashing_lb_config,
        locality_config_specifier,
    }) = proto
    else {
        return Ok(CommonFacts {
            locality_set: false,
            consistent_hashing_set: false,
        });
    };
    // `ignore_new_hosts_until_first_hc` is the cluster's, read with its health checks.
    let _ = ignore_new_hosts_until_first_hc;
    unsupported!(path, close_connections_on_host_set_change);
    if let Some(threshold) = healthy_panic_threshold {
        out.panic_threshold = percent(threshold, &field(path, "healthy_panic_threshold"))?;
    }
    // Remora applies host set changes at once: a merge window of 0 says exactly that.
    if let Some(window) = opt_duration(update_merge_window, &field(path, "update_merge_window"))?
        && !window.is_zero()
    {
        return err(
            field(path, "update_merge_window"),
            "only 0s is supported (Remora applies host changes at once)",
        );
    }
    if let Some(cluster_pb::cluster::common_lb_config::ConsistentHashingLbConfig {
        use_hostname_for_hashing,
        hash_balance_factor,
    }) = consistent_hashing_lb_config
    {
        let cpath = field(path, "consistent_hashing_lb_config");
        unsupported!(&cpath, use_hostname_for_hashing, hash_balance_factor);
    }
    use cluster_pb::cluster::common_lb_config::LocalityConfigSpecifier as L;
    match locality_config_specifier {
        Some(L::LocalityWeightedLbConfig(_)) => out.locality_weighted = true,
        Some(L::ZoneAwareLbConfig(cluster_pb::cluster::common_lb_config::ZoneAwareLbConfig {
            routing_enabled,
            min_cluster_size,
            fail_traffic_on_panic,
        })) => {
            let zpath = field(path, "zone_aware_lb_config");
            if let Some(share) = routing_enabled {
                percent(share, &field(&zpath, "routing_enabled"))?;
            }
            let _ = min_cluster_size;
            out.fail_traffic_on_panic = *fail_traffic_on_panic;
        }
        None => {}
    }
    Ok(CommonFacts {
        locality_set: locality_config_specifier.is_some(),
        consistent_hashing_set: consistent_hashing_lb_config.is_some(),
    })
}

/// A `Percent` rounded to a whole percent, as Envoy reads thresholds.
fn percent(value: &type_pb::Percent, path: &str) -> ConfigResult<u32> {
    let type_pb::Percent { value } = value;
    if !(0.0..=100.0).contains(value) {
        return err(field(path, "value"), "must be between 0 and 100");
    }
    Ok(value.round() as u32)
}

fn choice_count_or_default(value: Option<u32>, path: &str) -> ConfigResult<u32> {
    match value {
        None => Ok(2),
        Some(count) if count < 2 => err(path, "must be at least 2"),
        Some(count) => Ok(count),
    }
}

fn request_bias(value: &Option<core_pb::RuntimeDouble>, path: &str) -> ConfigResult<f64> {
    let Some(core_pb::RuntimeDouble {
        default_value,
        runtime_key: _,
    }) = value
    else {
        return Ok(1.0);
    };
    if !default_value.is_finite() || *default_value < 0.0 {
        return err(field(path, "default_value"), "must be 0 or more");
    }
    Ok(*default_value)
}

/// The parts both forms of the slow start config have.
fn slow_start(
    window: &Option<prost_types::Duration>,
    aggression: &Option<core_pb::RuntimeDouble>,
    min_weight_percent: &Option<type_pb::Percent>,
    path: &str,
) -> ConfigResult<Option<SlowStart>> {
    let window = opt_duration(window, &field(path, "slow_start_window"))?.unwrap_or_default();
    let aggression = match aggression {
        Some(core_pb::RuntimeDouble {
            default_value,
            runtime_key: _,
        }) => {
            if !default_value.is_finite() || *default_value <= 0.0 {
                return err(
                    field(path, "aggression.default_value"),
                    "must be greater than 0",
                );
            }
            *default_value
        }
        None => 1.0,
    };
    let min_weight = match min_weight_percent {
        Some(share) => {
            let type_pb::Percent { value } = share;
            if !(0.0..=100.0).contains(value) {
                return err(
                    field(path, "min_weight_percent.value"),
                    "must be between 0 and 100",
                );
            }
            value / 100.0
        }
        None => 0.1,
    };
    // Without a window there is no slow start, as in Envoy.
    Ok((!window.is_zero()).then_some(SlowStart {
        window,
        aggression,
        min_weight,
    }))
}

fn legacy_slow_start(
    proto: &Option<cluster_pb::cluster::SlowStartConfig>,
    path: &str,
) -> ConfigResult<Option<SlowStart>> {
    let Some(cluster_pb::cluster::SlowStartConfig {
        slow_start_window,
        aggression,
        min_weight_percent,
    }) = proto
    else {
        return Ok(None);
    };
    slow_start(slow_start_window, aggression, min_weight_percent, path)
}

fn typed_slow_start(
    proto: &Option<lb_pb::common::v3::SlowStartConfig>,
    path: &str,
) -> ConfigResult<Option<SlowStart>> {
    let Some(lb_pb::common::v3::SlowStartConfig {
        slow_start_window,
        aggression,
        min_weight_percent,
    }) = proto
    else {
        return Ok(None);
    };
    slow_start(slow_start_window, aggression, min_weight_percent, path)
}

fn ring_sizes(
    minimum: Option<u64>,
    maximum: Option<u64>,
    hash_function: HashFunction,
    hash_policies: Vec<HashPolicy>,
    path: &str,
) -> ConfigResult<RingHash> {
    let minimum_ring_size = minimum.unwrap_or(DEFAULT_MIN_RING_SIZE);
    let maximum_ring_size = maximum.unwrap_or(MAX_RING_SIZE);
    if minimum_ring_size > MAX_RING_SIZE {
        return err(
            field(path, "minimum_ring_size"),
            format!("must be at most {MAX_RING_SIZE}"),
        );
    }
    if maximum_ring_size > MAX_RING_SIZE {
        return err(
            field(path, "maximum_ring_size"),
            format!("must be at most {MAX_RING_SIZE}"),
        );
    }
    if minimum_ring_size > maximum_ring_size {
        return err(
            field(path, "minimum_ring_size"),
            format!(
                "minimum_ring_size ({minimum_ring_size}) must not exceed maximum_ring_size \
                 ({maximum_ring_size})"
            ),
        );
    }
    Ok(RingHash {
        minimum_ring_size,
        maximum_ring_size,
        hash_function,
        hash_policies,
    })
}

fn maglev_table(
    table_size: Option<u64>,
    hash_policies: Vec<HashPolicy>,
    path: &str,
) -> ConfigResult<Maglev> {
    let table_size = table_size.unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE);
    if table_size > MAX_MAGLEV_TABLE_SIZE {
        return err(path, format!("must be at most {MAX_MAGLEV_TABLE_SIZE}"));
    }
    if !is_prime(table_size) {
        return err(path, format!("{table_size} is not a prime number"));
    }
    Ok(Maglev {
        table_size,
        hash_policies,
    })
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The first policy of the list of a type Remora knows.
fn typed_policy(
    proto: &cluster_pb::LoadBalancingPolicy,
    path: &str,
    original_dst: bool,
    out: &mut LoadBalancing,
) -> ConfigResult<LbPolicy> {
    let cluster_pb::LoadBalancingPolicy { policies } = proto;
    let mut names = Vec::new();
    for (index, policy) in policies.iter().enumerate() {
        let ppath = item(path, "policies", index);
        let cluster_pb::load_balancing_policy::Policy {
            typed_extension_config,
        } = policy;
        let Some(core_pb::TypedExtensionConfig { name, typed_config }) = typed_extension_config
        else {
            return err(field(&ppath, "typed_extension_config"), "required");
        };
        let epath = field(&ppath, "typed_extension_config");
        // As Envoy: the type URL decides; the name only when there is no config.
        let kind = match typed_config {
            Some(any) => any.type_url.as_str(),
            None => match name.as_str() {
                "envoy.load_balancing_policies.round_robin" => type_urls::LB_ROUND_ROBIN,
                "envoy.load_balancing_policies.least_request" => type_urls::LB_LEAST_REQUEST,
                "envoy.load_balancing_policies.random" => type_urls::LB_RANDOM,
                "envoy.load_balancing_policies.ring_hash" => type_urls::LB_RING_HASH,
                "envoy.load_balancing_policies.maglev" => type_urls::LB_MAGLEV,
                "envoy.load_balancing_policies.cluster_provided" => type_urls::LB_CLUSTER_PROVIDED,
                "remora.load_balancing_policies.peak_ewma" => type_urls::LB_PEAK_EWMA,
                _ => "",
            },
        };
        let cpath = field(&epath, "typed_config");
        let default_any = prost_types::Any {
            type_url: kind.to_string(),
            value: Vec::new(),
        };
        let any = typed_config.as_ref().unwrap_or(&default_any);
        match kind {
            type_urls::LB_ROUND_ROBIN => return typed_round_robin(any, &cpath, out),
            type_urls::LB_LEAST_REQUEST => return typed_least_request(any, &cpath, out),
            type_urls::LB_RANDOM => {
                let lb_pb::random::v3::Random { locality_lb_config } = unpack(any, &cpath)?;
                locality(
                    &locality_lb_config,
                    &field(&cpath, "locality_lb_config"),
                    out,
                )?;
                return Ok(LbPolicy::Random);
            }
            type_urls::LB_RING_HASH => return typed_ring_hash(any, &cpath, out),
            type_urls::LB_MAGLEV => return typed_maglev(any, &cpath, out),
            type_urls::LB_PEAK_EWMA => return typed_peak_ewma(any, &cpath),
            type_urls::LB_CLUSTER_PROVIDED => {
                let lb_pb::cluster_provided::v3::ClusterProvided {} = unpack(any, &cpath)?;
                if !original_dst {
                    return err(&epath, "cluster_provided is only for ORIGINAL_DST clusters");
                }
                return Ok(LbPolicy::ClusterProvided);
            }
            _ => names.push(if name.is_empty() { kind } else { name.as_str() }),
        }
    }
    err(
        field(path, "policies"),
        format!(
            "no policy Remora supports (round_robin, least_request, random, ring_hash, maglev, \
             cluster_provided, remora peak_ewma); found [{}]",
            names.join(", ")
        ),
    )
}

fn locality(
    proto: &Option<lb_pb::common::v3::LocalityLbConfig>,
    path: &str,
    out: &mut LoadBalancing,
) -> ConfigResult<()> {
    let Some(lb_pb::common::v3::LocalityLbConfig {
        locality_config_specifier,
    }) = proto
    else {
        return Ok(());
    };
    use lb_pb::common::v3::locality_lb_config::{self as l, LocalityConfigSpecifier as S};
    match locality_config_specifier {
        Some(S::LocalityWeightedLbConfig(l::LocalityWeightedLbConfig {})) => {
            out.locality_weighted = true;
        }
        Some(S::ZoneAwareLbConfig(l::ZoneAwareLbConfig {
            routing_enabled,
            min_cluster_size,
            fail_traffic_on_panic,
            force_locality_direct_routing,
            force_local_zone,
            locality_basis,
        })) => {
            let zpath = field(path, "zone_aware_lb_config");
            if let Some(share) = routing_enabled {
                percent(share, &field(&zpath, "routing_enabled"))?;
            }
            // Without a local cluster these change nothing in Envoy either.
            let _ = (
                min_cluster_size,
                force_locality_direct_routing,
                force_local_zone,
                locality_basis,
            );
            out.fail_traffic_on_panic = *fail_traffic_on_panic;
        }
        None => {
            return err(
                path,
                "one of zone_aware_lb_config or locality_weighted_lb_config is required",
            );
        }
    }
    Ok(())
}

fn typed_round_robin(
    any: &prost_types::Any,
    path: &str,
    out: &mut LoadBalancing,
) -> ConfigResult<LbPolicy> {
    let lb_pb::round_robin::v3::RoundRobin {
        slow_start_config,
        locality_lb_config,
    } = unpack(any, path)?;
    locality(&locality_lb_config, &field(path, "locality_lb_config"), out)?;
    Ok(LbPolicy::RoundRobin(RoundRobin {
        slow_start: typed_slow_start(&slow_start_config, &field(path, "slow_start_config"))?,
    }))
}

fn typed_least_request(
    any: &prost_types::Any,
    path: &str,
    out: &mut LoadBalancing,
) -> ConfigResult<LbPolicy> {
    let lb_pb::least_request::v3::LeastRequest {
        choice_count,
        active_request_bias,
        slow_start_config,
        locality_lb_config,
        enable_full_scan,
        selection_method,
    } = unpack(any, path)?;
    if enable_full_scan == Some(true) {
        return err(
            field(path, "enable_full_scan"),
            "is not supported (use selection_method: FULL_SCAN)",
        );
    }
    locality(&locality_lb_config, &field(path, "locality_lb_config"), out)?;
    use lb_pb::least_request::v3::least_request::SelectionMethod as M;
    let full_scan = match M::try_from(selection_method) {
        Ok(M::NChoices) => false,
        Ok(M::FullScan) => true,
        Err(_) => return err(field(path, "selection_method"), "unknown value"),
    };
    Ok(LbPolicy::LeastRequest(LeastRequest {
        choice_count: choice_count_or_default(choice_count, &field(path, "choice_count"))?,
        full_scan,
        active_request_bias: request_bias(
            &active_request_bias,
            &field(path, "active_request_bias"),
        )?,
        slow_start: typed_slow_start(&slow_start_config, &field(path, "slow_start_config"))?,
    }))
}

/// The typed consistent-hashing settings: the hash policies, the rest refused.
fn consistent_hashing(
    proto: &Option<lb_pb::common::v3::ConsistentHashingLbConfig>,
    path: &str,
) -> ConfigResult<Vec<HashPolicy>> {
    let Some(lb_pb::common::v3::ConsistentHashingLbConfig {
        use_hostname_for_hashing,
        hash_balance_factor,
        hash_policy,
    }) = proto
    else {
        return Ok(Vec::new());
    };
    unsupported!(path, use_hostname_for_hashing, hash_balance_factor);
    hash_policies(hash_policy, &field(path, "hash_policy"))
}

fn typed_ring_hash(
    any: &prost_types::Any,
    path: &str,
    out: &mut LoadBalancing,
) -> ConfigResult<LbPolicy> {
    let lb_pb::ring_hash::v3::RingHash {
        hash_function,
        minimum_ring_size,
        maximum_ring_size,
        use_hostname_for_hashing,
        hash_balance_factor,
        consistent_hashing_lb_config,
        locality_weighted_lb_config,
    } = unpack(any, path)?;
    unsupported!(path, use_hostname_for_hashing, hash_balance_factor);
    use lb_pb::ring_hash::v3::ring_hash::HashFunction as F;
    let function = match F::try_from(hash_function) {
        Ok(F::DefaultHash | F::XxHash) => HashFunction::XxHash,
        Ok(F::MurmurHash2) => HashFunction::MurmurHash2,
        Err(_) => return err(field(path, "hash_function"), "unknown value"),
    };
    out.locality_weighted = locality_weighted_lb_config.is_some();
    let policies = consistent_hashing(
        &consistent_hashing_lb_config,
        &field(path, "consistent_hashing_lb_config"),
    )?;
    Ok(LbPolicy::RingHash(ring_sizes(
        minimum_ring_size,
        maximum_ring_size,
        function,
        policies,
        path,
    )?))
}

fn typed_maglev(
    any: &prost_types::Any,
    path: &str,
    out: &mut LoadBalancing,
) -> ConfigResult<LbPolicy> {
    let lb_pb::maglev::v3::Maglev {
        table_size,
        consistent_hashing_lb_config,
        locality_weighted_lb_config,
    } = unpack(any, path)?;
    out.locality_weighted = locality_weighted_lb_config.is_some();
    let policies = consistent_hashing(
        &consistent_hashing_lb_config,
        &field(path, "consistent_hashing_lb_config"),
    )?;
    Ok(LbPolicy::Maglev(maglev_table(
        table_size,
        policies,
        &field(path, "table_size"),
    )?))
}

fn typed_peak_ewma(any: &prost_types::Any, path: &str) -> ConfigResult<LbPolicy> {
    let peak_ewma_pb::PeakEwma {
        choice_count,
        decay_time,
        default_rtt,
    } = unpack(any, path)?;
    let defaults = PeakEwma::default();
    let decay = match opt_duration(&decay_time, &field(path, "decay_time"))? {
        Some(d) if d.is_zero() => {
            return err(field(path, "decay_time"), "must be greater than 0");
        }
        Some(d) => d,
        None => defaults.decay,
    };
    Ok(LbPolicy::PeakEwma(PeakEwma {
        choice_count: choice_count_or_default(choice_count, &field(path, "choice_count"))?,
        decay,
        default_rtt: opt_duration(&default_rtt, &field(path, "default_rtt"))?
            .unwrap_or(defaults.default_rtt),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, cluster};

    /// What a case expects of the model.
    type Check = Box<dyn Fn(&LoadBalancing) -> bool>;

    /// A STATIC cluster named `c` with `extra` YAML fields.
    fn read(extra: &str) -> ConfigResult<Cluster> {
        let yaml = format!("name: c\ntype: STATIC\n{extra}");
        let proto: cluster_pb::Cluster =
            xds_api::json::from_yaml_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        cluster(&proto, "clusters[0]")
    }

    fn lb(extra: &str) -> LoadBalancing {
        read(extra)
            .unwrap_or_else(|e| panic!("{extra}: {e}"))
            .load_balancing
    }

    const TYPED: &str = "lb_policy: LOAD_BALANCING_POLICY_CONFIG\nload_balancing_policy:\n  policies:\n  - typed_extension_config:\n      name: p\n      typed_config:\n";

    fn typed(type_name: &str, fields: &str) -> String {
        format!(
            "{TYPED}        \"@type\": type.googleapis.com/{type_name}\n{}",
            fields
                .lines()
                .filter(|l| *l != "{}")
                .map(|l| format!("        {l}\n"))
                .collect::<String>()
        )
    }

    #[test]
    fn defaults_are_envoys() {
        let lb = lb("");
        assert!(matches!(
            lb.policy,
            LbPolicy::RoundRobin(RoundRobin { slow_start: None })
        ));
        assert_eq!(lb.panic_threshold, 50);
        assert!(!lb.locality_weighted && !lb.fail_traffic_on_panic);
        match self::lb("lb_policy: LEAST_REQUEST").policy {
            LbPolicy::LeastRequest(l) => assert_eq!(l, LeastRequest::default()),
            other => panic!("{other:?}"),
        }
        match self::lb("lb_policy: RING_HASH").policy {
            LbPolicy::RingHash(r) => {
                assert_eq!(
                    (r.minimum_ring_size, r.maximum_ring_size, r.hash_function),
                    (1024, 8388608, HashFunction::XxHash)
                );
                assert!(r.hash_policies.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match self::lb("lb_policy: MAGLEV").policy {
            LbPolicy::Maglev(m) => assert_eq!(m.table_size, 65537),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            self::lb("lb_policy: RANDOM").policy,
            LbPolicy::Random
        ));
    }

    #[test]
    fn legacy_fields_are_read() {
        let cases: Vec<(&str, Check)> = vec![
            (
                "lb_policy: LEAST_REQUEST\nleast_request_lb_config: {choice_count: 5, active_request_bias: {default_value: 0.5, runtime_key: k}}",
                Box::new(|lb| {
                    matches!(
                        lb.policy,
                        LbPolicy::LeastRequest(LeastRequest {
                            choice_count: 5,
                            active_request_bias: 0.5,
                            full_scan: false,
                            slow_start: None
                        })
                    )
                }),
            ),
            (
                "lb_policy: LEAST_REQUEST\nleast_request_lb_config: {slow_start_config: {slow_start_window: 10s, aggression: {default_value: 2, runtime_key: k}, min_weight_percent: {value: 25}}}",
                Box::new(
                    |lb| matches!(lb.policy, LbPolicy::LeastRequest(LeastRequest { slow_start: Some(SlowStart { window, aggression: 2.0, min_weight }), .. }) if window == Duration::from_secs(10) && min_weight == 0.25),
                ),
            ),
            (
                "round_robin_lb_config: {slow_start_config: {slow_start_window: 3s}}",
                Box::new(
                    |lb| matches!(lb.policy, LbPolicy::RoundRobin(RoundRobin { slow_start: Some(SlowStart { window, aggression: 1.0, min_weight }) }) if window == Duration::from_secs(3) && min_weight == 0.1),
                ),
            ),
            (
                "round_robin_lb_config: {slow_start_config: {slow_start_window: 0s}}",
                Box::new(|lb| {
                    matches!(
                        lb.policy,
                        LbPolicy::RoundRobin(RoundRobin { slow_start: None })
                    )
                }),
            ),
            (
                "lb_policy: RING_HASH\nring_hash_lb_config: {minimum_ring_size: 16, maximum_ring_size: 64, hash_function: MURMUR_HASH_2}",
                Box::new(
                    |lb| matches!(&lb.policy, LbPolicy::RingHash(r) if (r.minimum_ring_size, r.maximum_ring_size, r.hash_function) == (16, 64, HashFunction::MurmurHash2)),
                ),
            ),
            (
                "lb_policy: MAGLEV\nmaglev_lb_config: {table_size: 251}",
                Box::new(|lb| matches!(&lb.policy, LbPolicy::Maglev(m) if m.table_size == 251)),
            ),
            (
                "common_lb_config: {healthy_panic_threshold: {value: 33.6}, locality_weighted_lb_config: {}, update_merge_window: 0s}",
                Box::new(|lb| lb.panic_threshold == 34 && lb.locality_weighted),
            ),
            (
                "common_lb_config: {healthy_panic_threshold: {value: 0}, zone_aware_lb_config: {fail_traffic_on_panic: true, min_cluster_size: 3}}",
                Box::new(|lb| {
                    lb.panic_threshold == 0 && lb.fail_traffic_on_panic && !lb.locality_weighted
                }),
            ),
            (
                // A config of another policy is ignored, as Envoy ignores it.
                "lb_policy: RANDOM\nring_hash_lb_config: {minimum_ring_size: 16}",
                Box::new(|lb| matches!(lb.policy, LbPolicy::Random)),
            ),
        ];
        for (yaml, check) in cases {
            let lb = lb(yaml);
            assert!(check(&lb), "{yaml}: {lb:?}");
        }
    }

    #[test]
    fn typed_policies_are_read() {
        const LB: &str = "envoy.extensions.load_balancing_policies";
        let cases: Vec<(String, Check)> = vec![
            (
                typed(&format!("{LB}.round_robin.v3.RoundRobin"), "slow_start_config: {slow_start_window: 2s}\nlocality_lb_config: {locality_weighted_lb_config: {}}"),
                Box::new(|lb| matches!(lb.policy, LbPolicy::RoundRobin(RoundRobin { slow_start: Some(_) })) && lb.locality_weighted),
            ),
            (
                typed(&format!("{LB}.least_request.v3.LeastRequest"), "choice_count: 3\nselection_method: FULL_SCAN\nactive_request_bias: {default_value: 0, runtime_key: k}"),
                Box::new(|lb| matches!(lb.policy, LbPolicy::LeastRequest(LeastRequest { choice_count: 3, full_scan: true, active_request_bias: 0.0, slow_start: None }))),
            ),
            (
                typed(&format!("{LB}.random.v3.Random"), "locality_lb_config: {zone_aware_lb_config: {fail_traffic_on_panic: true}}"),
                Box::new(|lb| matches!(lb.policy, LbPolicy::Random) && lb.fail_traffic_on_panic),
            ),
            (
                typed(&format!("{LB}.ring_hash.v3.RingHash"), "hash_function: MURMUR_HASH_2\nminimum_ring_size: 100\nlocality_weighted_lb_config: {}\nconsistent_hashing_lb_config: {hash_policy: [{header: {header_name: x-k}}]}"),
                Box::new(|lb| matches!(&lb.policy, LbPolicy::RingHash(r) if r.hash_function == HashFunction::MurmurHash2 && r.minimum_ring_size == 100 && r.hash_policies.len() == 1) && lb.locality_weighted),
            ),
            (
                typed(&format!("{LB}.ring_hash.v3.RingHash"), "hash_function: XX_HASH"),
                Box::new(|lb| matches!(&lb.policy, LbPolicy::RingHash(r) if r.hash_function == HashFunction::XxHash)),
            ),
            (
                typed(&format!("{LB}.maglev.v3.Maglev"), "table_size: 5000011"),
                Box::new(|lb| matches!(&lb.policy, LbPolicy::Maglev(m) if m.table_size == 5_000_011) && !lb.locality_weighted),
            ),
            (
                typed("remora.extensions.load_balancing_policies.peak_ewma.v1.PeakEwma", "choice_count: 3\ndecay_time: 5s\ndefault_rtt: 0.1s"),
                Box::new(|lb| lb.policy.name() == "PEAK_EWMA" && matches!(lb.policy, LbPolicy::PeakEwma(p) if p.choice_count == 3 && p.decay == Duration::from_secs(5) && p.default_rtt == Duration::from_millis(100))),
            ),
            (
                typed("remora.extensions.load_balancing_policies.peak_ewma.v1.PeakEwma", "{}"),
                Box::new(|lb| matches!(lb.policy, LbPolicy::PeakEwma(p) if p == PeakEwma::default())),
            ),
            (
                // lb_policy is ignored when load_balancing_policy is set; the panic threshold
                // still comes from common_lb_config.
                format!("lb_policy: MAGLEV\ncommon_lb_config: {{healthy_panic_threshold: {{value: 10}}}}\n{}", typed(&format!("{LB}.random.v3.Random"), "{}").replacen("lb_policy: LOAD_BALANCING_POLICY_CONFIG\n", "", 1)),
                Box::new(|lb| matches!(lb.policy, LbPolicy::Random) && lb.panic_threshold == 10),
            ),
            (
                // Without typed_config the name decides.
                "load_balancing_policy: {policies: [{typed_extension_config: {name: envoy.load_balancing_policies.maglev}}]}".to_string(),
                Box::new(|lb| matches!(&lb.policy, LbPolicy::Maglev(m) if m.table_size == 65537)),
            ),
        ];
        for (yaml, check) in cases {
            let lb = lb(&yaml);
            assert!(check(&lb), "{yaml}: {lb:?}");
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        const LB: &str = "envoy.extensions.load_balancing_policies";
        let cases: Vec<(String, &str)> = vec![
            ("lb_policy: LEAST_REQUEST\nleast_request_lb_config: {choice_count: 1}".into(), "clusters[0].least_request_lb_config.choice_count"),
            ("lb_policy: LEAST_REQUEST\nleast_request_lb_config: {active_request_bias: {default_value: -1, runtime_key: k}}".into(), "clusters[0].least_request_lb_config.active_request_bias.default_value"),
            ("lb_policy: LEAST_REQUEST\nleast_request_lb_config: {slow_start_config: {slow_start_window: 1s, aggression: {default_value: 0, runtime_key: k}}}".into(), "clusters[0].least_request_lb_config.slow_start_config.aggression.default_value"),
            ("round_robin_lb_config: {slow_start_config: {slow_start_window: 1s, min_weight_percent: {value: 101}}}".into(), "clusters[0].round_robin_lb_config.slow_start_config.min_weight_percent.value"),
            ("lb_policy: RING_HASH\nring_hash_lb_config: {minimum_ring_size: 100, maximum_ring_size: 10}".into(), "clusters[0].ring_hash_lb_config.minimum_ring_size"),
            ("lb_policy: RING_HASH\nring_hash_lb_config: {maximum_ring_size: 8388609}".into(), "clusters[0].ring_hash_lb_config.maximum_ring_size"),
            ("lb_policy: MAGLEV\nmaglev_lb_config: {table_size: 65536}".into(), "clusters[0].maglev_lb_config.table_size"),
            ("lb_policy: MAGLEV\nmaglev_lb_config: {table_size: 5000101}".into(), "clusters[0].maglev_lb_config.table_size"),
            ("lb_policy: CLUSTER_PROVIDED".into(), "clusters[0].lb_policy"),
            ("lb_policy: LOAD_BALANCING_POLICY_CONFIG".into(), "clusters[0].load_balancing_policy"),
            ("original_dst_lb_config: {use_http_header: true}".into(), "clusters[0].original_dst_lb_config.use_http_header"),
            ("common_lb_config: {healthy_panic_threshold: {value: 150}}".into(), "clusters[0].common_lb_config.healthy_panic_threshold.value"),
            ("common_lb_config: {update_merge_window: 1s}".into(), "clusters[0].common_lb_config.update_merge_window"),
            ("common_lb_config: {close_connections_on_host_set_change: true}".into(), "clusters[0].common_lb_config.close_connections_on_host_set_change"),
            ("lb_policy: RING_HASH\ncommon_lb_config: {consistent_hashing_lb_config: {use_hostname_for_hashing: true}}".into(), "clusters[0].common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing"),
            ("lb_policy: RING_HASH\ncommon_lb_config: {consistent_hashing_lb_config: {hash_balance_factor: 150}}".into(), "clusters[0].common_lb_config.consistent_hashing_lb_config.hash_balance_factor"),
            (format!("common_lb_config: {{locality_weighted_lb_config: {{}}}}\n{}", typed(&format!("{LB}.random.v3.Random"), "{}")), "clusters[0].common_lb_config"),
            (typed(&format!("{LB}.round_robin.v3.RoundRobin"), "locality_lb_config: {}"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.locality_lb_config"),
            (typed(&format!("{LB}.least_request.v3.LeastRequest"), "choice_count: 1"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.choice_count"),
            (typed(&format!("{LB}.least_request.v3.LeastRequest"), "enable_full_scan: true"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.enable_full_scan"),
            (typed(&format!("{LB}.ring_hash.v3.RingHash"), "minimum_ring_size: 9000000"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.minimum_ring_size"),
            (typed(&format!("{LB}.ring_hash.v3.RingHash"), "hash_balance_factor: 150"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.hash_balance_factor"),
            (typed(&format!("{LB}.ring_hash.v3.RingHash"), "consistent_hashing_lb_config: {hash_policy: [{cookie: {name: \"\"}}]}"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.consistent_hashing_lb_config.hash_policy[0].cookie.name"),
            (typed(&format!("{LB}.maglev.v3.Maglev"), "table_size: 100"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.table_size"),
            (typed(&format!("{LB}.maglev.v3.Maglev"), "consistent_hashing_lb_config: {use_hostname_for_hashing: true}"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.consistent_hashing_lb_config.use_hostname_for_hashing"),
            (typed(&format!("{LB}.cluster_provided.v3.ClusterProvided"), "{}"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config"),
            (typed("remora.extensions.load_balancing_policies.peak_ewma.v1.PeakEwma", "decay_time: 0s"), "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config.decay_time"),
            ("load_balancing_policy: {policies: [{typed_extension_config: {name: x.unknown}}]}".into(), "clusters[0].load_balancing_policy.policies"),
            ("load_balancing_policy: {policies: [{}]}".into(), "clusters[0].load_balancing_policy.policies[0].typed_extension_config"),
        ];
        for (yaml, path) in cases {
            match read(&yaml) {
                Ok(cluster) => panic!("{yaml}: accepted as {:?}", cluster.load_balancing),
                Err(error) => assert_eq!(error.path, path, "{yaml}: {error}"),
            }
        }
    }

    #[test]
    fn unknown_policies_are_skipped_for_the_first_known_one() {
        let lb = lb(
            "load_balancing_policy: {policies: [{typed_extension_config: {name: envoy.load_balancing_policies.client_side_weighted_round_robin}}, {typed_extension_config: {name: envoy.load_balancing_policies.random}}]}",
        );
        assert!(matches!(lb.policy, LbPolicy::Random));
        let error = read("load_balancing_policy: {policies: [{typed_extension_config: {name: a.b}}, {typed_extension_config: {name: c.d}}]}").unwrap_err();
        assert!(error.reason.contains("[a.b, c.d]"), "{error}");
    }

    #[test]
    fn primes() {
        let primes: Vec<u64> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537) && is_prime(5_000_011) && !is_prime(65535));
    }
}
