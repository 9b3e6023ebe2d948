//! The CORS filter (`envoy.filters.http.cors`), as Envoy applies it: the matched route's
//! policies, most specific first, each setting taken from the first policy that sets it; a
//! preflight from an allowed origin is answered here, and responses to other requests from an
//! allowed origin get the access-control headers.
//!
//! Policies come from `typed_per_filter_config` (route, virtual host, route configuration);
//! only when none is there do the deprecated `cors` fields of the route action and the virtual
//! host count.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::route::v3 as route_pb;
use xds_api::envoy::extensions::filters::http::cors::v3 as cors_pb;
use xds_api::envoy::r#type::matcher::v3 as matcher_pb;

use crate::config::{ConfigError, ConfigResult};
use crate::http::router::{StringMatch, string_matcher};
use crate::stats::HttpStats;

static REQUEST_METHOD: HeaderName = HeaderName::from_static("access-control-request-method");
static REQUEST_HEADERS: HeaderName = HeaderName::from_static("access-control-request-headers");
static REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
static ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
static ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");
static ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
static ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
static MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");
static EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");
static ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

/// One compiled policy. An empty string or `None` is "not set here": a less specific policy
/// may set it.
#[derive(Debug)]
pub struct CorsPolicy {
    allow_origins: Vec<StringMatch>,
    allow_methods: String,
    allow_headers: String,
    expose_headers: String,
    max_age: String,
    allow_credentials: Option<bool>,
    allow_private_network_access: Option<bool>,
    forward_not_matching_preflights: Option<bool>,
    /// `filter_enabled` as a share of requests, in millionths (default: all).
    enabled_per_million: u32,
    /// `shadow_enabled`: origins checked and counted, nothing enforced (default: none).
    shadow_per_million: u32,
}

/// The two places a policy can sit at one level of the route table.
#[derive(Debug, Default)]
pub struct CorsConfig {
    /// From `typed_per_filter_config`.
    pub per_filter: Option<CorsPolicy>,
    /// From the deprecated `cors` field.
    pub legacy: Option<CorsPolicy>,
}

/// What a policy proto has in common between its two forms.
struct Fields<'a> {
    allow_origin_string_match: &'a [matcher_pb::StringMatcher],
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

/// The two CorsPolicy messages name their settings alike (only `filter_enabled` sits in a
/// oneof in the route-level one).
macro_rules! fields_of {
    ($p:expr, $filter_enabled:expr) => {
        Fields {
            allow_origin_string_match: &$p.allow_origin_string_match,
            allow_methods: &$p.allow_methods,
            allow_headers: &$p.allow_headers,
            expose_headers: &$p.expose_headers,
            max_age: &$p.max_age,
            allow_credentials: $p.allow_credentials,
            filter_enabled: $filter_enabled,
            shadow_enabled: $p.shadow_enabled.as_ref(),
            allow_private_network_access: $p.allow_private_network_access,
            forward_not_matching_preflights: $p.forward_not_matching_preflights,
        }
    };
}

fn compile(fields: Fields<'_>, path: &str) -> ConfigResult<CorsPolicy> {
    let allow_origins = fields
        .allow_origin_string_match
        .iter()
        .enumerate()
        .map(|(i, m)| string_matcher(m, &format!("{path}.allow_origin_string_match[{i}]")))
        .collect::<ConfigResult<Vec<_>>>()?;
    let header = |value: &str, field: &str| -> ConfigResult<String> {
        HeaderValue::from_str(value)
            .map(|_| value.to_string())
            .map_err(|_| ConfigError::new(format!("{path}.{field}"), "not a valid header value"))
    };
    // A runtime key can only name a value Remora's runtime does not have, so the default holds.
    let per_million = |fraction: Option<&core_pb::RuntimeFractionalPercent>,
                       field: &str,
                       absent: u32|
     -> ConfigResult<u32> {
        let Some(fraction) = fraction.and_then(|f| f.default_value.as_ref()) else {
            return Ok(absent);
        };
        use xds_api::envoy::r#type::v3::fractional_percent::DenominatorType;
        let scale = match DenominatorType::try_from(fraction.denominator) {
            Ok(DenominatorType::Hundred) => 10_000,
            Ok(DenominatorType::TenThousand) => 100,
            Ok(DenominatorType::Million) => 1,
            Err(_) => {
                return Err(ConfigError::new(
                    format!("{path}.{field}.default_value.denominator"),
                    "unknown value",
                ));
            }
        };
        Ok(fraction.numerator.saturating_mul(scale).min(1_000_000))
    };
    // As Envoy: without filter_enabled a policy is enabled (shadow_enabled notwithstanding).
    let enabled_per_million = per_million(fields.filter_enabled, "filter_enabled", 1_000_000)?;
    let shadow_per_million = per_million(fields.shadow_enabled, "shadow_enabled", 0)?;
    Ok(CorsPolicy {
        allow_origins,
        allow_methods: header(fields.allow_methods, "allow_methods")?,
        allow_headers: header(fields.allow_headers, "allow_headers")?,
        expose_headers: header(fields.expose_headers, "expose_headers")?,
        max_age: header(fields.max_age, "max_age")?,
        allow_credentials: fields.allow_credentials,
        allow_private_network_access: fields.allow_private_network_access,
        forward_not_matching_preflights: fields.forward_not_matching_preflights,
        enabled_per_million,
        shadow_per_million,
    })
}

/// The deprecated `cors` field of a virtual host or route action.
pub fn legacy(
    proto: &Option<route_pb::CorsPolicy>,
    path: &str,
) -> ConfigResult<Option<CorsPolicy>> {
    let Some(p) = proto else { return Ok(None) };
    let filter_enabled = p
        .enabled_specifier
        .as_ref()
        .map(|route_pb::cors_policy::EnabledSpecifier::FilterEnabled(f)| f);
    compile(fields_of!(p, filter_enabled), path).map(Some)
}

/// A level's `typed_per_filter_config`: a CORS policy under any key; any other filter's
/// config is an error (Remora has no other HTTP filter that reads one).
pub fn per_filter(
    configs: &std::collections::HashMap<String, prost_types::Any>,
    path: &str,
) -> ConfigResult<Option<CorsPolicy>> {
    let mut found = None;
    for (key, any) in configs {
        let kpath = match path {
            "" => format!("typed_per_filter_config[{key:?}]"),
            _ => format!("{path}.typed_per_filter_config[{key:?}]"),
        };
        if any.type_url != xds_api::type_urls::CORS_POLICY {
            return Err(ConfigError::new(
                kpath,
                format!(
                    "per-route config of type {:?} is not supported (only the CORS filter's \
                     CorsPolicy)",
                    any.type_url
                ),
            ));
        }
        let p: cors_pb::CorsPolicy =
            crate::config::convert::unpack(any).map_err(|e| ConfigError::new(&kpath, e))?;
        found = Some(compile(fields_of!(p, p.filter_enabled.as_ref()), &kpath)?);
    }
    Ok(found)
}

/// The policies that apply to one request, most specific first (at most three; held inline,
/// as this is built for every request on a listener with the CORS filter).
pub struct Policies<'a>([Option<&'a CorsPolicy>; 3]);

impl<'a> Policies<'a> {
    /// Route, virtual host and route configuration, in Envoy's order of precedence.
    pub fn of(route: &'a CorsConfig, vhost: &'a CorsConfig, table: &'a CorsConfig) -> Self {
        let per_filter = [route, vhost, table].map(|c| c.per_filter.as_ref());
        if per_filter.iter().any(Option::is_some) {
            return Policies(per_filter);
        }
        Policies([route.legacy.as_ref(), vhost.legacy.as_ref(), None])
    }

    fn iter(&self) -> impl Iterator<Item = &'a CorsPolicy> + '_ {
        self.0.iter().flatten().copied()
    }

    fn first_str(&self, get: impl Fn(&CorsPolicy) -> &str) -> &'a str {
        self.iter().map(get).find(|v| !v.is_empty()).unwrap_or("")
    }

    fn first_bool(&self, get: impl Fn(&CorsPolicy) -> Option<bool>) -> Option<bool> {
        self.iter().find_map(get)
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origins = self
            .iter()
            .map(|p| &p.allow_origins)
            .find(|o| !o.is_empty());
        origins.is_some_and(|o| o.iter().any(|m| m.matches("*") || m.matches(origin)))
    }

    /// Whether the most specific policy's share (`filter_enabled` or `shadow_enabled`) takes
    /// this request.
    fn sampled(&self, share: impl Fn(&CorsPolicy) -> u32) -> bool {
        match self.iter().next().map(share) {
            None | Some(0) => false,
            Some(n) if n >= 1_000_000 => true,
            Some(n) => rand::random_range(0..1_000_000) < n,
        }
    }

    /// Decides on a request: answer it here (a preflight), or forward it, remembering the
    /// allowed origin for the response.
    pub fn on_request(&self, method: &Method, headers: &HeaderMap, stats: &HttpStats) -> Decision {
        let enabled = self.sampled(|p| p.enabled_per_million);
        if !enabled && !self.sampled(|p| p.shadow_per_million) {
            return Decision::Forward(None);
        }
        let Some(origin) = headers.get(http::header::ORIGIN).filter(|o| !o.is_empty()) else {
            return Decision::Forward(None);
        };
        let allowed = self.origin_allowed(origin.to_str().unwrap_or(""));
        if allowed {
            stats.cors_origin_valid.inc();
        } else {
            stats.cors_origin_invalid.inc();
        }
        if !enabled {
            return Decision::Forward(None); // shadow mode: counted, not enforced
        }
        let latched = allowed.then(|| origin.clone());
        let request_method = headers.get(&REQUEST_METHOD).filter(|m| !m.is_empty());
        let (true, Some(request_method)) = (method == Method::OPTIONS, request_method) else {
            return Decision::Forward(latched);
        };
        if !allowed && self.first_bool(|p| p.forward_not_matching_preflights) != Some(false) {
            return Decision::Forward(None);
        }
        let mut reply = HeaderMap::new();
        if allowed {
            reply.insert(&ALLOW_ORIGIN, origin.clone());
        }
        if self.first_bool(|p| p.allow_credentials) == Some(true) {
            reply.insert(&ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        let echo_or = |configured: &str, requested: Option<&HeaderValue>| match configured {
            "" => None,
            "*" => Some(requested.cloned().unwrap_or(HeaderValue::from_static(""))),
            value => HeaderValue::from_str(value).ok(),
        };
        if let Some(value) = echo_or(self.first_str(|p| &p.allow_methods), Some(request_method)) {
            reply.insert(&ALLOW_METHODS, value);
        }
        if let Some(value) = echo_or(
            self.first_str(|p| &p.allow_headers),
            headers.get(&REQUEST_HEADERS),
        ) {
            reply.insert(&ALLOW_HEADERS, value);
        }
        if let Ok(value) = HeaderValue::from_str(self.first_str(|p| &p.max_age))
            && !value.is_empty()
        {
            reply.insert(&MAX_AGE, value);
        }
        if self.first_bool(|p| p.allow_private_network_access) == Some(true)
            && headers
                .get(&REQUEST_PRIVATE_NETWORK)
                .is_some_and(|v| v == "true")
        {
            reply.insert(&ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
        }
        // The answer passes back through the filter like any response (Envoy adds the
        // expose-headers list to it too).
        if allowed {
            reply.extend(self.response_headers(origin.clone()));
        }
        Decision::Preflight(StatusCode::OK, reply)
    }

    /// The access-control headers for the response to a request from an allowed origin,
    /// whether it comes from upstream or is a local reply.
    pub fn response_headers(&self, origin: HeaderValue) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&ALLOW_ORIGIN, origin);
        if self.first_bool(|p| p.allow_credentials) == Some(true) {
            headers.insert(&ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if let Ok(value) = HeaderValue::from_str(self.first_str(|p| &p.expose_headers))
            && !value.is_empty()
        {
            headers.insert(&EXPOSE_HEADERS, value);
        }
        headers
    }
}

/// What the filter does with a request.
pub enum Decision {
    /// Answer here with this status and these headers (no body).
    Preflight(StatusCode, HeaderMap),
    /// Send it on; with the origin to name in the response when it is allowed.
    Forward(Option<HeaderValue>),
}
