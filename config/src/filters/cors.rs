//! The CORS filter's config (`envoy.filters.http.cors`): the filter itself takes no settings;
//! policies come per route from `typed_per_filter_config` (`CorsPolicy`) or, deprecated, from
//! the `cors` field of a virtual host or route action.

use http::header::HeaderValue;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::route::v3 as route_pb;
use xds_api::envoy::extensions::filters::http::cors::v3 as cors_pb;

use crate::common::{runtime_fraction, unpack};
use crate::error::{ConfigError, ConfigResult, field, item};
use crate::matcher::{StringMatch, string_matcher};

pub const TYPE_URL: &str = xds_api::type_urls::CORS;
pub const POLICY_TYPE_URL: &str = xds_api::type_urls::CORS_POLICY;

/// The filter's own config (`envoy.extensions.filters.http.cors.v3.Cors`, an empty message).
#[derive(Debug, Clone, Default)]
pub struct CorsFilter {}

pub fn filter(any: &prost_types::Any, path: &str) -> ConfigResult<CorsFilter> {
    let cors_pb::Cors {} = unpack(any, path)?;
    Ok(CorsFilter {})
}

/// One compiled policy. An empty string or `None` is "not set here": a less specific policy
/// may set it.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    pub max_age: String,
    pub allow_credentials: Option<bool>,
    pub allow_private_network_access: Option<bool>,
    pub forward_not_matching_preflights: Option<bool>,
    /// `filter_enabled` as a share of requests, in millionths (default: all).
    pub enabled_per_million: u32,
    /// `shadow_enabled`: origins checked and counted, nothing enforced (default: none).
    pub shadow_per_million: u32,
}

/// What a policy proto has in common between its two forms.
struct Fields<'a> {
    allow_origin_string_match: &'a [xds_api::envoy::r#type::matcher::v3::StringMatcher],
    allow_methods: &'a str,
    allow_headers: &'a str,
    expose_headers: &'a str,
    max_age: &'a str,
    allow_credentials: Option<bool>,
    filter_enabled: Option<&'a core_pb::RuntimeFractionalPercent>,
    shadow_enabled: Option<&'a core_pb::RuntimeFractionalPercent>,
    allow_private_network_access: Option<bool>,
    forward_not_matching_preflights: Option<bool>,
}

fn compile(fields: Fields<'_>, path: &str) -> ConfigResult<CorsPolicy> {
    let allow_origins = fields
        .allow_origin_string_match
        .iter()
        .enumerate()
        .map(|(i, m)| string_matcher(m, &item(path, "allow_origin_string_match", i)))
        .collect::<ConfigResult<Vec<_>>>()?;
    let header = |value: &str, name: &str| -> ConfigResult<String> {
        HeaderValue::from_str(value)
            .map(|_| value.to_string())
            .map_err(|_| ConfigError::new(field(path, name), "not a valid header value"))
    };
    Ok(CorsPolicy {
        allow_origins,
        allow_methods: header(fields.allow_methods, "allow_methods")?,
        allow_headers: header(fields.allow_headers, "allow_headers")?,
        expose_headers: header(fields.expose_headers, "expose_headers")?,
        max_age: header(fields.max_age, "max_age")?,
        allow_credentials: fields.allow_credentials,
        allow_private_network_access: fields.allow_private_network_access,
        forward_not_matching_preflights: fields.forward_not_matching_preflights,
        // As Envoy: without filter_enabled a policy is enabled (shadow_enabled notwithstanding).
        enabled_per_million: runtime_fraction(
            fields.filter_enabled,
            &field(path, "filter_enabled"),
            1_000_000,
        )?,
        shadow_per_million: runtime_fraction(
            fields.shadow_enabled,
            &field(path, "shadow_enabled"),
            0,
        )?,
    })
}

/// A `CorsPolicy` in `typed_per_filter_config`.
pub fn per_route(any: &prost_types::Any, path: &str) -> ConfigResult<CorsPolicy> {
    let cors_pb::CorsPolicy {
        allow_origin_string_match,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials,
        filter_enabled,
        shadow_enabled,
        allow_private_network_access,
        forward_not_matching_preflights,
    } = unpack(any, path)?;
    compile(
        Fields {
            allow_origin_string_match: &allow_origin_string_match,
            allow_methods: &allow_methods,
            allow_headers: &allow_headers,
            expose_headers: &expose_headers,
            max_age: &max_age,
            allow_credentials,
            filter_enabled: filter_enabled.as_ref(),
            shadow_enabled: shadow_enabled.as_ref(),
            allow_private_network_access,
            forward_not_matching_preflights,
        },
        path,
    )
}

/// The deprecated `cors` field of a virtual host or route action.
pub fn legacy(
    proto: &Option<route_pb::CorsPolicy>,
    path: &str,
) -> ConfigResult<Option<CorsPolicy>> {
    let Some(route_pb::CorsPolicy {
        allow_origin_string_match,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials,
        shadow_enabled,
        allow_private_network_access,
        forward_not_matching_preflights,
        enabled_specifier,
    }) = proto
    else {
        return Ok(None);
    };
    let filter_enabled = enabled_specifier
        .as_ref()
        .map(|route_pb::cors_policy::EnabledSpecifier::FilterEnabled(f)| f);
    compile(
        Fields {
            allow_origin_string_match,
            allow_methods,
            allow_headers,
            expose_headers,
            max_age,
            allow_credentials: *allow_credentials,
            filter_enabled,
            shadow_enabled: shadow_enabled.as_ref(),
            allow_private_network_access: *allow_private_network_access,
            forward_not_matching_preflights: *forward_not_matching_preflights,
        },
        path,
    )
    .map(Some)
}
