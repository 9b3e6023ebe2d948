//! The router: the terminal HTTP filter. It runs the chosen route's action — a direct
//! response, a redirect, or forwarding upstream ([`forward`]) — and owns everything about the
//! upstream call: cluster pick, rewrites, timeouts, upgrades, [`retry`] decisions and
//! [`mirror`]ed copies.

// A local reply is an error value that is also a response (headers included); it is built
// only off the fast path, and boxing it would cost every such reply an allocation.
#![allow(clippy::result_large_err)]

mod forward;
mod hash_key;
mod mirror;
mod retry;
mod upgrade;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Response, StatusCode};
use hyper::body::Incoming;
use remora_config::route::Action;
use tokio::time::Instant;

use crate::body::filter::BodyFilter;
use crate::filter_chain::ConnectionInfo;
use crate::http::access_log::Entry;
use crate::http::local_reply::LocalReply;
use crate::http::manager::Manager;
use crate::http::response_body::ResponseBody;
use crate::http::selected::Selected;
use crate::http::stream_timer::SpareSleeps;
use crate::store::Snapshot;

/// A request as it reaches the router.
pub struct RouteRequest<'a> {
    pub manager: &'a Manager,
    pub parts: http::request::Parts,
    pub body: Incoming,
    /// Filters that look at the request body (usually none).
    pub body_filters: Vec<Box<dyn BodyFilter>>,
    pub route: &'a Selected,
    pub snapshot: &'a Snapshot,
    pub downstream: &'a ConnectionInfo,
    /// `http` or `https`: the downstream connection's scheme.
    pub scheme: &'static str,
    pub log: &'a mut Option<Box<Entry>>,
    /// The request's trace, when the HCM traces: the router stamps the upstream request.
    pub trace: Option<&'a mut crate::http::tracing::ActiveTrace>,
    pub started: Instant,
    /// The request's authority (`Host`, else the URI's).
    pub authority: Option<&'a HeaderValue>,
    /// The authority as routing saw it (lower case, port stripped as configured).
    pub host: &'a str,
    /// The trusted client address: the peer, or what trusted proxies put in `x-forwarded-for`.
    pub client: std::net::SocketAddr,
    /// The client is internal (`x-envoy-internal`): dynamic stats go under `internal.`.
    pub internal: bool,
    pub path_and_query: PathAndQuery,
    /// The connection's spare timers, for this request's.
    pub sleeps: &'a std::sync::Arc<SpareSleeps>,
}

/// A reply the router makes instead of forwarding: the access log shows the request as it was
/// then, as Envoy's does (it reads the request's headers when it writes the line).
fn unforwarded(
    log: &mut Option<Box<Entry>>,
    parts: &http::request::Parts,
    reply: LocalReply,
) -> LocalReply {
    if let Some(entry) = log {
        entry.capture_request(parts);
    }
    reply
}

/// Runs the route's action.
pub async fn route(request: RouteRequest<'_>) -> Result<Response<ResponseBody>, LocalReply> {
    let selected = request.route;
    let route = selected.route();
    let stats = &request.manager.stats;
    match &route.action {
        Action::Direct { status, body } => {
            stats.rq_direct_response.inc();
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            let mut reply = LocalReply::new(status);
            if let Some(body) = body {
                reply = reply.with_body(body.clone());
            }
            reply.from_router = true;
            reply.details = "direct_response".into();
            Err(unforwarded(request.log, &request.parts, reply))
        }
        Action::Redirect(redirect) => {
            // Envoy's router answers a redirect as a direct response, and counts it so.
            stats.rq_direct_response.inc();
            let scheme = request.parts.uri.scheme_str().unwrap_or(request.scheme);
            let location =
                redirect.location(route, scheme, request.host, request.path_and_query.as_str());
            let mut reply =
                LocalReply::new(StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND));
            if let Ok(value) = HeaderValue::from_str(&location) {
                reply.headers.insert(header::LOCATION, value);
            }
            reply.from_router = true;
            // Envoy's details for a redirect too.
            reply.details = "direct_response".into();
            Err(unforwarded(request.log, &request.parts, reply))
        }
        Action::Forward(forward) => forward::forward(request, forward).await,
    }
}
