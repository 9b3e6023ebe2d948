//! The CORS filter (`envoy.filters.http.cors`), as Envoy applies it: the matched route's
//! policies, most specific first, each setting taken from the first policy that sets it; a
//! preflight from an allowed origin is answered here, and responses to other requests from an
//! allowed origin get the access-control headers (local replies included, as every response
//! passes back through the filter).
//!
//! Policies come from `typed_per_filter_config` under the filter's name (route, virtual host,
//! route configuration); only when none is there do the deprecated `cors` fields of the route
//! action and the virtual host count.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use remora_config::filters::PerRouteConfig;
use remora_config::filters::cors::CorsPolicy;

use crate::http::filter::{Flow, HttpFilter, Stream};
use crate::http::local_reply::LocalReply;
use crate::http::selected::Selected;
use crate::stats::{Registry, Stat};

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

/// The filter, under the name it was configured with (its per-route configs' key).
#[derive(Debug)]
pub struct Cors {
    name: String,
    stats: CorsStats,
}

/// `http.PREFIX.cors.origin_valid|origin_invalid`: made with the filter, as in Envoy, so a
/// connection manager without one lists neither.
#[derive(Debug)]
pub struct CorsStats {
    origin_valid: Arc<Stat>,
    origin_invalid: Arc<Stat>,
}

impl Cors {
    pub fn new(name: &str, registry: &Registry, stat_prefix: &str) -> Self {
        let counter = |name: &str| registry.counter(format!("http.{stat_prefix}.cors.{name}"));
        Cors {
            name: name.to_string(),
            stats: CorsStats {
                origin_valid: counter("origin_valid"),
                origin_invalid: counter("origin_invalid"),
            },
        }
    }
}

/// The allowed origin of a request, kept for its response.
struct AllowedOrigin(HeaderValue);

impl HttpFilter for Cors {
    fn on_request(&self, stream: &mut Stream<'_>) -> Flow {
        // CORS applies to routes that forward; redirects and direct responses are the
        // router's own answers.
        let Some(route) = stream.route else {
            return Flow::Continue;
        };
        if !matches!(
            route.route().action,
            remora_config::route::Action::Forward(_)
        ) {
            return Flow::Continue;
        }
        let policies = Policies::of(&self.name, route);
        match policies.on_request(&stream.request.method, &stream.request.headers, &self.stats) {
            Decision::Preflight(status, headers) => {
                let mut reply = LocalReply::new(status);
                reply.headers = headers;
                Flow::Reply(reply)
            }
            Decision::Forward(Some(origin)) => {
                stream.set_state(AllowedOrigin(origin));
                Flow::Continue
            }
            Decision::Forward(None) => Flow::Continue,
        }
    }

    fn on_response(&self, stream: &mut Stream<'_>, response: &mut Response<()>) {
        let (Some(AllowedOrigin(origin)), Some(route)) =
            (stream.state::<AllowedOrigin>(), stream.route)
        else {
            return;
        };
        let headers = Policies::of(&self.name, route).response_headers(origin.clone());
        response.headers_mut().extend(headers);
    }
}

/// The policies that apply to one request, most specific first (at most three; held inline,
/// as this is built for every request on a listener with the CORS filter).
pub struct Policies<'a>([Option<&'a CorsPolicy>; 3]);

impl<'a> Policies<'a> {
    /// The filter's per-route configs (route, virtual host, route configuration, in Envoy's
    /// order of precedence), else the deprecated `cors` fields of route and virtual host.
    fn of(name: &str, route: &'a Selected) -> Self {
        let per_filter = route.per_route(name).map(|config| match config {
            Some(PerRouteConfig::Cors(policy)) => Some(policy),
            _ => None,
        });
        if per_filter.iter().any(Option::is_some) {
            return Policies(per_filter);
        }
        Policies([
            route.route().cors.as_ref(),
            route.vhost().cors.as_ref(),
            None,
        ])
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
    fn on_request(&self, method: &Method, headers: &HeaderMap, stats: &CorsStats) -> Decision {
        let enabled = self.sampled(|p| p.enabled_per_million);
        if !enabled && !self.sampled(|p| p.shadow_per_million) {
            return Decision::Forward(None);
        }
        let Some(origin) = headers.get(http::header::ORIGIN).filter(|o| !o.is_empty()) else {
            return Decision::Forward(None);
        };
        let allowed = self.origin_allowed(origin.to_str().unwrap_or(""));
        if allowed {
            stats.origin_valid.inc();
        } else {
            stats.origin_invalid.inc();
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
    fn response_headers(&self, origin: HeaderValue) -> HeaderMap {
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
enum Decision {
    /// Answer here with this status and these headers (no body).
    Preflight(StatusCode, HeaderMap),
    /// Send it on; with the origin to name in the response when it is allowed.
    Forward(Option<HeaderValue>),
}
