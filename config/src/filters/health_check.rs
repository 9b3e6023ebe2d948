//! The health check filter's config (`envoy.filters.http.health_check`): which requests are the
//! proxy's own health checks, and whether it answers them or passes them on.

use xds_api::envoy::extensions::filters::http::health_check::v3 as health_check_pb;

use crate::common::unpack;
use crate::error::{ConfigResult, err, field, item};
use crate::matcher::{HeaderMatch, header_matcher};
use crate::unsupported;

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck";

#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Pass matching requests on to the upstream (else answer them here).
    pub pass_through: bool,
    /// A request matching all of these is a health check.
    pub headers: Vec<HeaderMatch>,
    /// `cluster_min_healthy_percentages`: answered 503 while a cluster is missing, empty or
    /// below its share of healthy hosts (percent), sorted by cluster name.
    pub min_healthy: Vec<(String, f64)>,
}

pub fn filter(any: &prost_types::Any, path: &str) -> ConfigResult<HealthCheck> {
    let health_check_pb::HealthCheck {
        pass_through_mode,
        cache_time,
        cluster_min_healthy_percentages,
        headers,
    } = unpack(any, path)?;
    unsupported!(path, cache_time);
    let Some(pass_through) = pass_through_mode else {
        return err(field(path, "pass_through_mode"), "required");
    };
    let headers = headers
        .iter()
        .enumerate()
        .map(|(index, h)| header_matcher(h, &item(path, "headers", index)))
        .collect::<ConfigResult<Vec<_>>>()?;
    let mut min_healthy = Vec::new();
    for (cluster, percent) in &cluster_min_healthy_percentages {
        let value = percent.value;
        if !(0.0..=100.0).contains(&value) {
            return err(
                format!("{path}.cluster_min_healthy_percentages[{cluster:?}].value"),
                format!("{value} is not a percentage (0 to 100)"),
            );
        }
        min_healthy.push((cluster.clone(), value));
    }
    min_healthy.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(HealthCheck {
        pass_through,
        headers,
        min_healthy,
    })
}
