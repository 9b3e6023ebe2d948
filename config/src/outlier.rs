//! Outlier detection (`Cluster.outlier_detection`): passive health from real traffic. A host
//! is ejected after runs of errors (5xx, gateway errors, local-origin failures) or when its
//! success rate or failure percentage stands out from the others; ejections grow longer each
//! time. Envoy's defaults apply to every unset field.

use std::time::Duration;

use xds_api::envoy::config::cluster::v3 as cluster_pb;

use crate::common::duration;
use crate::error::{ConfigResult, err, field};

/// The detector's settings; percentages are 0–100, `success_rate_stdev_factor` is in
/// thousandths (1900 = 1.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_time_jitter: Duration,
    pub max_ejection_percent: u32,
    pub always_eject_one_host: bool,
    pub consecutive_5xx: u32,
    pub enforcing_consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub split_external_local_origin_errors: bool,
    pub consecutive_local_origin_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    pub success_rate_stdev_factor: u32,
    pub enforcing_success_rate: u32,
    pub enforcing_local_origin_success_rate: u32,
    pub failure_percentage_threshold: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
    pub enforcing_failure_percentage: u32,
    pub enforcing_failure_percentage_local_origin: u32,
    pub successful_active_health_check_uneject_host: bool,
}

/// A wrapped `u32` with Envoy's default; `max` (inclusive) when the field is a percentage.
fn wrapped(
    value: &Option<u32>,
    default: u32,
    max: Option<u32>,
    path: &str,
    name: &str,
) -> ConfigResult<u32> {
    let value = value.unwrap_or(default);
    if let Some(max) = max
        && value > max
    {
        return err(field(path, name), format!("must be ≤ {max}"));
    }
    Ok(value)
}

fn positive(
    value: &Option<prost_types::Duration>,
    default: Duration,
    path: &str,
    name: &str,
) -> ConfigResult<Duration> {
    match value {
        Some(value) => {
            let p = field(path, name);
            let d = duration(value, &p)?;
            if d.is_zero() {
                return err(p, "must be greater than 0");
            }
            Ok(d)
        }
        None => Ok(default),
    }
}

pub fn outlier_detection(
    proto: &cluster_pb::OutlierDetection,
    path: &str,
) -> ConfigResult<OutlierDetection> {
    let cluster_pb::OutlierDetection {
        consecutive_5xx,
        interval,
        base_ejection_time,
        max_ejection_percent,
        enforcing_consecutive_5xx,
        enforcing_success_rate,
        success_rate_minimum_hosts,
        success_rate_request_volume,
        success_rate_stdev_factor,
        consecutive_gateway_failure,
        enforcing_consecutive_gateway_failure,
        split_external_local_origin_errors,
        consecutive_local_origin_failure,
        enforcing_consecutive_local_origin_failure,
        enforcing_local_origin_success_rate,
        failure_percentage_threshold,
        enforcing_failure_percentage,
        enforcing_failure_percentage_local_origin,
        failure_percentage_minimum_hosts,
        failure_percentage_request_volume,
        max_ejection_time,
        max_ejection_time_jitter,
        successful_active_health_check_uneject_host,
        always_eject_one_host,
    } = proto;
    let pct = Some(100);
    let interval = positive(interval, Duration::from_secs(10), path, "interval")?;
    let base_ejection_time = positive(
        base_ejection_time,
        Duration::from_secs(30),
        path,
        "base_ejection_time",
    )?;
    // Unset: Envoy's 300 s, or the base ejection time when that is longer.
    let max_ejection_time = positive(
        max_ejection_time,
        base_ejection_time.max(Duration::from_secs(300)),
        path,
        "max_ejection_time",
    )?;
    if max_ejection_time < base_ejection_time {
        return err(
            field(path, "max_ejection_time"),
            "cannot be smaller than base_ejection_time",
        );
    }
    let max_ejection_time_jitter = match max_ejection_time_jitter {
        Some(value) => duration(value, &field(path, "max_ejection_time_jitter"))?,
        None => Duration::ZERO,
    };
    Ok(OutlierDetection {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter,
        max_ejection_percent: wrapped(max_ejection_percent, 10, pct, path, "max_ejection_percent")?,
        always_eject_one_host: always_eject_one_host.unwrap_or(false),
        consecutive_5xx: wrapped(consecutive_5xx, 5, None, path, "consecutive_5xx")?,
        enforcing_consecutive_5xx: wrapped(
            enforcing_consecutive_5xx,
            100,
            pct,
            path,
            "enforcing_consecutive_5xx",
        )?,
        consecutive_gateway_failure: wrapped(
            consecutive_gateway_failure,
            5,
            None,
            path,
            "consecutive_gateway_failure",
        )?,
        enforcing_consecutive_gateway_failure: wrapped(
            enforcing_consecutive_gateway_failure,
            0,
            pct,
            path,
            "enforcing_consecutive_gateway_failure",
        )?,
        split_external_local_origin_errors: *split_external_local_origin_errors,
        consecutive_local_origin_failure: wrapped(
            consecutive_local_origin_failure,
            5,
            None,
            path,
            "consecutive_local_origin_failure",
        )?,
        enforcing_consecutive_local_origin_failure: wrapped(
            enforcing_consecutive_local_origin_failure,
            100,
            pct,
            path,
            "enforcing_consecutive_local_origin_failure",
        )?,
        success_rate_minimum_hosts: wrapped(
            success_rate_minimum_hosts,
            5,
            None,
            path,
            "success_rate_minimum_hosts",
        )?,
        success_rate_request_volume: wrapped(
            success_rate_request_volume,
            100,
            None,
            path,
            "success_rate_request_volume",
        )?,
        success_rate_stdev_factor: wrapped(
            success_rate_stdev_factor,
            1900,
            None,
            path,
            "success_rate_stdev_factor",
        )?,
        enforcing_success_rate: wrapped(
            enforcing_success_rate,
            100,
            pct,
            path,
            "enforcing_success_rate",
        )?,
        enforcing_local_origin_success_rate: wrapped(
            enforcing_local_origin_success_rate,
            100,
            pct,
            path,
            "enforcing_local_origin_success_rate",
        )?,
        failure_percentage_threshold: wrapped(
            failure_percentage_threshold,
            85,
            pct,
            path,
            "failure_percentage_threshold",
        )?,
        failure_percentage_minimum_hosts: wrapped(
            failure_percentage_minimum_hosts,
            5,
            None,
            path,
            "failure_percentage_minimum_hosts",
        )?,
        failure_percentage_request_volume: wrapped(
            failure_percentage_request_volume,
            50,
            None,
            path,
            "failure_percentage_request_volume",
        )?,
        enforcing_failure_percentage: wrapped(
            enforcing_failure_percentage,
            0,
            pct,
            path,
            "enforcing_failure_percentage",
        )?,
        enforcing_failure_percentage_local_origin: wrapped(
            enforcing_failure_percentage_local_origin,
            0,
            pct,
            path,
            "enforcing_failure_percentage_local_origin",
        )?,
        successful_active_health_check_uneject_host: successful_active_health_check_uneject_host
            .unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(yaml: &str) -> ConfigResult<OutlierDetection> {
        let proto: cluster_pb::OutlierDetection = xds_api::json::from_yaml_str(yaml).expect("yaml");
        outlier_detection(&proto, "od")
    }

    #[test]
    fn envoy_defaults() {
        let od = detector("{}").expect("valid");
        assert_eq!(od.interval, Duration::from_secs(10));
        assert_eq!(od.base_ejection_time, Duration::from_secs(30));
        assert_eq!(od.max_ejection_time, Duration::from_secs(300));
        assert_eq!(od.max_ejection_percent, 10);
        assert_eq!((od.consecutive_5xx, od.enforcing_consecutive_5xx), (5, 100));
        assert_eq!(
            (
                od.consecutive_gateway_failure,
                od.enforcing_consecutive_gateway_failure
            ),
            (5, 0)
        );
        assert_eq!(
            (
                od.success_rate_minimum_hosts,
                od.success_rate_request_volume,
                od.success_rate_stdev_factor
            ),
            (5, 100, 1900)
        );
        assert_eq!(
            (
                od.failure_percentage_threshold,
                od.failure_percentage_minimum_hosts,
                od.failure_percentage_request_volume,
                od.enforcing_failure_percentage
            ),
            (85, 5, 50, 0)
        );
        assert!(od.successful_active_health_check_uneject_host);
        assert!(!od.split_external_local_origin_errors);
    }

    #[test]
    fn long_base_ejection_raises_the_default_maximum() {
        let od = detector("{base_ejection_time: 400s}").expect("valid");
        assert_eq!(od.max_ejection_time, Duration::from_secs(400));
        let od = detector("{consecutive_5xx: 3, interval: 0.2s, max_ejection_percent: 100}")
            .expect("valid");
        assert_eq!(od.consecutive_5xx, 3);
        assert_eq!(od.interval, Duration::from_millis(200));
    }

    #[test]
    fn errors_name_their_field() {
        for (yaml, want) in [
            (
                "{max_ejection_percent: 101}",
                "od.max_ejection_percent: must be ≤ 100",
            ),
            (
                "{enforcing_success_rate: 200}",
                "od.enforcing_success_rate: must be ≤ 100",
            ),
            ("{interval: 0s}", "od.interval: must be greater than 0"),
            (
                "{base_ejection_time: 10s, max_ejection_time: 5s}",
                "od.max_ejection_time: cannot be smaller than base_ejection_time",
            ),
            (
                "{failure_percentage_threshold: 101}",
                "od.failure_percentage_threshold",
            ),
        ] {
            let error = detector(yaml).expect_err(yaml).to_string();
            assert!(error.contains(want), "{yaml}: {error}");
        }
    }
}
