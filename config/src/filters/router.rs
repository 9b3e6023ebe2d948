//! The router filter (`envoy.filters.http.router`): the terminal filter. Its own settings are
//! few; what it does comes from the matched route.

use xds_api::envoy::extensions::filters::http::router::v3 as router_pb;

use crate::common::unpack;
use crate::error::{ConfigResult, err, field};
use crate::unsupported;

pub const TYPE_URL: &str = xds_api::type_urls::ROUTER;

/// The router's settings (none Remora acts on yet).
#[derive(Debug, Clone, Default)]
pub struct Router {}

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
    // Remora never emits Envoy's per-request dynamic stats (zone, canary, virtual clusters).
    if dynamic_stats == Some(true) {
        return err(
            field(path, "dynamic_stats"),
            "only `false` is supported: Remora does not emit dynamic stats",
        );
    }
    Ok(Router {})
}
