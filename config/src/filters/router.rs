//! The router filter (`envoy.filters.http.router`): the terminal filter. Its own settings are
//! few; what it does comes from the matched route.

use xds_api::envoy::extensions::filters::http::router::v3 as router_pb;

use crate::common::unpack;
use crate::error::ConfigResult;
use crate::unsupported;

pub const TYPE_URL: &str = xds_api::type_urls::ROUTER;

/// The router's settings.
#[derive(Debug, Clone)]
pub struct Router {
    /// `dynamic_stats` (on unless set false): each cluster's `upstream_rq_completed`,
    /// `upstream_rq_<N>xx`, `upstream_rq_<code>` and `upstream_rq_time`, plain and under
    /// `external.` or `internal.`.
    pub dynamic_stats: bool,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            dynamic_stats: true,
        }
    }
}

pub fn router(any: &prost_types::Any, path: &str) -> ConfigResult<Router> {
    let router_pb::Router {
        dynamic_stats,
        start_child_span,
        upstream_log,
        upstream_log_options,
        suppress_envoy_headers,
        strict_check_headers,
        respect_expected_rq_timeout,
        suppress_grpc_request_failure_code_stats,
        reject_connect_request_early_data,
    } = unpack(any, path)?;
    unsupported!(
        path,
        start_child_span,
        upstream_log,
        upstream_log_options,
        suppress_envoy_headers,
        strict_check_headers,
        respect_expected_rq_timeout,
        suppress_grpc_request_failure_code_stats,
        reject_connect_request_early_data,
    );
    Ok(Router {
        dynamic_stats: dynamic_stats.unwrap_or(true),
    })
}
