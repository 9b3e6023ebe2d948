//! The local rate limit filter's config (`envoy.filters.http.local_ratelimit`,
//! `LocalRateLimit`): a token bucket, the share of requests checked and refused, the status and
//! headers of a refusal, and its stats prefix. The same message is the per-route config, with a
//! bucket of its own; that bucket is made by the proxy at first use and lives as long as the
//! route table, as Envoy's per-route objects do ([`Attached`]).

use std::time::Duration;

use xds_api::envoy::extensions::common::ratelimit::v3 as ratelimit_pb;
use xds_api::envoy::extensions::filters::http::local_ratelimit::v3 as lrl_pb;
use xds_api::envoy::r#type::v3 as type_pb;

use super::Attached;
use crate::common::{HeaderMutations, duration, header_mutations, runtime_fraction, unpack};
use crate::error::{ConfigResult, err, field};
use crate::unsupported;

pub const TYPE_URL: &str = xds_api::type_urls::LOCAL_RATE_LIMIT;

/// A token bucket: full at first, `tokens_per_fill` more every `fill_interval`, at most
/// `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

/// One `LocalRateLimit`: the filter's own config, or a route's.
#[derive(Debug, Clone)]
pub struct LocalRateLimit {
    /// Stats go to `PREFIX.http_local_rate_limit.*`.
    pub stat_prefix: String,
    /// The status of a refused request.
    pub status: u16,
    /// `None` (allowed for the filter's own config only): nothing is limited.
    pub token_bucket: Option<TokenBucket>,
    /// `filter_enabled`, in millionths of requests (unset: none).
    pub enabled_per_million: u32,
    /// `filter_enforced`, in millionths of limited requests (unset: none).
    pub enforced_per_million: u32,
    /// Added to a refusal.
    pub response_headers: HeaderMutations,
    /// Added to a limited request that is let through (not enforced).
    pub request_headers_when_not_enforced: HeaderMutations,
    /// `x-ratelimit-limit`, `-remaining` and `-reset` on responses (`DRAFT_VERSION_03`).
    pub x_ratelimit_headers: bool,
    /// One bucket per downstream connection rather than one for all.
    pub per_connection: bool,
    /// gRPC requests are refused with RESOURCE_EXHAUSTED (8) rather than UNAVAILABLE (14).
    pub grpc_resource_exhausted: bool,
    /// The proxy's live state for this config (its bucket and stats), made at first use.
    pub live: Attached,
}

fn token_bucket(proto: &type_pb::TokenBucket, path: &str) -> ConfigResult<TokenBucket> {
    let type_pb::TokenBucket {
        max_tokens,
        tokens_per_fill,
        fill_interval,
    } = proto;
    if *max_tokens == 0 {
        return err(field(path, "max_tokens"), "must be greater than 0");
    }
    if *tokens_per_fill == Some(0) {
        return err(field(path, "tokens_per_fill"), "must be greater than 0");
    }
    let fill_path = field(path, "fill_interval");
    let Some(fill_interval) = fill_interval else {
        return err(fill_path, "required");
    };
    let fill_interval = duration(fill_interval, &fill_path)?;
    // Envoy's lower bound for a bucket's refill.
    if fill_interval < Duration::from_millis(50) {
        return err(fill_path, "must be at least 50ms");
    }
    Ok(TokenBucket {
        max_tokens: *max_tokens,
        tokens_per_fill: tokens_per_fill.unwrap_or(1),
        fill_interval,
    })
}

/// The filter's own config.
pub fn filter(any: &prost_types::Any, path: &str) -> ConfigResult<LocalRateLimit> {
    read(any, path, false)
}

/// A route's config: it must have a bucket, as in Envoy.
pub fn per_route(any: &prost_types::Any, path: &str) -> ConfigResult<LocalRateLimit> {
    read(any, path, true)
}

fn read(any: &prost_types::Any, path: &str, per_route: bool) -> ConfigResult<LocalRateLimit> {
    let lrl_pb::LocalRateLimit {
        stat_prefix,
        status,
        token_bucket: bucket,
        filter_enabled,
        filter_enforced,
        request_headers_to_add_when_not_enforced,
        response_headers_to_add,
        descriptors,
        stage,
        local_rate_limit_per_downstream_connection,
        local_cluster_rate_limit,
        enable_x_ratelimit_headers,
        vh_rate_limits,
        always_consume_default_token_bucket,
        rate_limited_as_resource_exhausted,
        max_dynamic_descriptors,
    } = unpack(any, path)?;
    unsupported!(path, descriptors, local_cluster_rate_limit);
    // These only change how descriptors count, and there are none: any valid value behaves
    // alike.
    let _ = always_consume_default_token_bucket;
    if stage > 10 {
        return err(field(path, "stage"), "must be at most 10");
    }
    if max_dynamic_descriptors == Some(0) {
        return err(
            field(path, "max_dynamic_descriptors"),
            "must be greater than 0",
        );
    }
    if ratelimit_pb::VhRateLimitsOptions::try_from(vh_rate_limits).is_err() {
        return err(field(path, "vh_rate_limits"), "unknown value");
    }
    if stat_prefix.is_empty() {
        return err(field(path, "stat_prefix"), "must not be empty");
    }
    let status = match status {
        None => 429,
        Some(type_pb::HttpStatus { code }) => {
            let spath = field(&field(path, "status"), "code");
            match type_pb::StatusCode::try_from(code) {
                Ok(type_pb::StatusCode::Empty) | Err(_) => {
                    return err(spath, format!("{code} is not a status Envoy names"));
                }
                // As Envoy: a refusal is an error status; anything below 400 becomes 429.
                Ok(_) if code < 400 => 429,
                Ok(_) => code as u16,
            }
        }
    };
    let x_ratelimit_headers =
        match ratelimit_pb::XRateLimitHeadersRfcVersion::try_from(enable_x_ratelimit_headers) {
            Ok(ratelimit_pb::XRateLimitHeadersRfcVersion::Off) => false,
            Ok(ratelimit_pb::XRateLimitHeadersRfcVersion::DraftVersion03) => true,
            Err(_) => return err(field(path, "enable_x_ratelimit_headers"), "unknown value"),
        };
    let token_bucket = match &bucket {
        Some(bucket) => Some(token_bucket(bucket, &field(path, "token_bucket"))?),
        None if per_route => {
            return err(
                field(path, "token_bucket"),
                "required in a per-route config",
            );
        }
        None => None,
    };
    Ok(LocalRateLimit {
        stat_prefix,
        status,
        token_bucket,
        enabled_per_million: runtime_fraction(
            filter_enabled.as_ref(),
            &field(path, "filter_enabled"),
            0,
        )?,
        enforced_per_million: runtime_fraction(
            filter_enforced.as_ref(),
            &field(path, "filter_enforced"),
            0,
        )?,
        response_headers: header_mutations(
            &response_headers_to_add,
            &[],
            path,
            "response_headers_to_add",
            "",
        )?,
        request_headers_when_not_enforced: header_mutations(
            &request_headers_to_add_when_not_enforced,
            &[],
            path,
            "request_headers_to_add_when_not_enforced",
            "",
        )?,
        x_ratelimit_headers,
        per_connection: local_rate_limit_per_downstream_connection,
        grpc_resource_exhausted: rate_limited_as_resource_exhausted,
        live: Attached::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_yaml(yaml: &str, per_route: bool) -> ConfigResult<LocalRateLimit> {
        let proto: lrl_pb::LocalRateLimit = xds_api::json::from_yaml_str(yaml).expect("yaml");
        read(&xds_api::any::pack(&proto), "l", per_route)
    }

    #[test]
    fn a_full_config_is_read() {
        let config = read_yaml(
            r#"
stat_prefix: edge
status: {code: ServiceUnavailable}
token_bucket: {max_tokens: 5, tokens_per_fill: 2, fill_interval: 60s}
filter_enabled: {default_value: {numerator: 100}, runtime_key: lrl_enabled}
filter_enforced: {default_value: {numerator: 50}}
response_headers_to_add: [{header: {key: x-limited, value: "yes"}}]
request_headers_to_add_when_not_enforced: [{header: {key: x-would-limit, value: "1"}}]
enable_x_ratelimit_headers: DRAFT_VERSION_03
local_rate_limit_per_downstream_connection: true
"#,
            true,
        )
        .unwrap();
        assert_eq!(config.status, 503);
        assert_eq!(
            config.token_bucket,
            Some(TokenBucket {
                max_tokens: 5,
                tokens_per_fill: 2,
                fill_interval: Duration::from_secs(60)
            })
        );
        assert_eq!(config.enabled_per_million, 1_000_000);
        assert_eq!(config.enforced_per_million, 500_000);
        assert!(config.x_ratelimit_headers && config.per_connection);
        assert_eq!(config.response_headers.add.len(), 1);
        assert_eq!(config.request_headers_when_not_enforced.add.len(), 1);
    }

    #[test]
    fn defaults_follow_envoy() {
        let config = read_yaml("stat_prefix: s\nstatus: {code: OK}", false).unwrap();
        assert_eq!(config.status, 429, "a status below 400 becomes 429");
        assert_eq!(config.token_bucket, None);
        assert_eq!(
            (config.enabled_per_million, config.enforced_per_million),
            (0, 0)
        );
        let bucket = read_yaml(
            "stat_prefix: s\ntoken_bucket: {max_tokens: 1, fill_interval: 1s}",
            true,
        )
        .unwrap()
        .token_bucket
        .unwrap();
        assert_eq!(bucket.tokens_per_fill, 1);
    }

    #[test]
    fn route_rate_limit_actions_are_unknown_fields() {
        // `rate_limits` (route RateLimit actions) is left out of our proto: the file's reader
        // names it.
        let error = xds_api::json::from_yaml_str::<lrl_pb::LocalRateLimit>(
            "stat_prefix: s\nrate_limits: [{actions: [{remote_address: {}}]}]",
        )
        .unwrap_err();
        assert!(error.to_string().contains("rate_limits"), "{error}");
    }

    #[test]
    fn errors_name_the_field() {
        let bucket = "token_bucket: {max_tokens: 1, fill_interval: 1s}";
        let cases = [
            (bucket.to_string(), false, "l.stat_prefix"),
            ("stat_prefix: s".to_string(), true, "l.token_bucket"),
            (
                "stat_prefix: s\ntoken_bucket: {max_tokens: 1, fill_interval: 0.01s}".into(),
                false,
                "l.token_bucket.fill_interval",
            ),
            (
                "stat_prefix: s\ntoken_bucket: {max_tokens: 0, fill_interval: 1s}".into(),
                false,
                "l.token_bucket.max_tokens",
            ),
            (
                "stat_prefix: s\ntoken_bucket: {max_tokens: 1}".into(),
                false,
                "l.token_bucket.fill_interval",
            ),
            (
                format!("stat_prefix: s\n{bucket}\ndescriptors: [{{entries: [{{key: k, value: v}}], token_bucket: {{max_tokens: 1, fill_interval: 1s}}}}]"),
                false,
                "l.descriptors",
            ),
            (
                "stat_prefix: s\nlocal_cluster_rate_limit: {}".into(),
                false,
                "l.local_cluster_rate_limit",
            ),
            (
                "stat_prefix: s\nstatus: {code: 418}".into(),
                false,
                "l.status.code",
            ),
            ("stat_prefix: s\nstage: 11".into(), false, "l.stage"),
            (
                "stat_prefix: s\nresponse_headers_to_add: [{header: {key: x-a, value: '%START_TIME%'}}]"
                    .into(),
                false,
                "l.response_headers_to_add[0].header.value",
            ),
        ];
        for (yaml, per_route, path) in cases {
            let error = read_yaml(&yaml, per_route).expect_err(&yaml);
            assert_eq!(error.path, path, "{yaml}: {error}");
        }
    }
}
