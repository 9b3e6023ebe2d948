//! The HTTP filter chain: the HCM's `http_filters`, run in configured order on the request
//! and in reverse order on the response, the router last (see `docs/ARCHITECTURE.md` for the
//! phase order).
//!
//! A filter sees each stream in up to five phases:
//! 1. [`HttpFilter::on_request`] — request headers, after the route was chosen. It can let the
//!    request go on, answer it with a [`LocalReply`], or pause for async work ([`Flow::Pause`]).
//! 2. request body and trailers, through the [`BodyFilter`] it returns from
//!    [`HttpFilter::request_body`] (none by default: bodies stream untouched);
//! 3. [`HttpFilter::on_response`] — response headers, whether from upstream or a local reply;
//! 4. response body and trailers, through [`HttpFilter::response_body`];
//! 5. [`HttpFilter::on_complete`] — the stream has ended (logging, accounting).
//!
//! Per-route settings come from `typed_per_filter_config` under the filter's name, most
//! specific first: route, virtual host, route configuration ([`Stream::per_route`]). A filter
//! keeps per-stream state between phases ([`Stream::set_state`]), per-connection state across
//! a connection's streams ([`Stream::connection_state`]), and marks the stream with response
//! flags for the access log ([`Stream::add_flag`]).

use std::any::Any;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use http::Response;
use remora_config::filters::PerRouteConfig;
use remora_config::matcher::PseudoHeaders;

use crate::body::filter::BodyFilter;
use crate::error::ResponseFlag;
use crate::filter_chain::ConnectionInfo;
use crate::http::local_reply::LocalReply;
use crate::http::response_body::StreamEnd;
use crate::http::selected::Selected;
use crate::stats::HttpStats;

/// What a filter decides about a request.
pub enum Flow {
    /// On to the next filter (the router, at the end).
    Continue,
    /// Answer here; later filters and the router do not run.
    Reply(LocalReply),
    /// Finish some async work first, then decide.
    Pause(Pin<Box<dyn Future<Output = Flow> + Send>>),
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Flow::Continue => f.write_str("Continue"),
            Flow::Reply(reply) => f.debug_tuple("Reply").field(&reply.status).finish(),
            Flow::Pause(_) => f.write_str("Pause"),
        }
    }
}

/// One HTTP filter of a connection manager, built from its config; shared by every stream.
pub trait HttpFilter: Send + Sync + std::fmt::Debug {
    /// Request headers arrived and the route was chosen.
    fn on_request(&self, stream: &mut Stream<'_>) -> Flow {
        let _ = stream;
        Flow::Continue
    }

    /// A body filter for this stream's request, if the filter wants to see the body.
    fn request_body(&self, stream: &Stream<'_>) -> Option<Box<dyn BodyFilter>> {
        let _ = stream;
        None
    }

    /// Response headers, on their way back (also for local replies).
    fn on_response(&self, stream: &mut Stream<'_>, response: &mut Response<()>) {
        let _ = (stream, response);
    }

    /// A body filter for this stream's response.
    fn response_body(&self, stream: &Stream<'_>) -> Option<Box<dyn BodyFilter>> {
        let _ = stream;
        None
    }

    /// The stream ended: the response was sent in full, or the stream was reset.
    fn on_complete(&self, state: Option<&(dyn Any + Send + Sync)>) {
        let _ = state;
    }
}

/// Per-stream state filters keep between phases, one slot per filter, and the response flags
/// they set, in the order set (Envoy's order in `%RESPONSE_FLAGS%`).
#[derive(Debug, Default)]
pub struct FilterState {
    slots: Vec<Option<Box<dyn Any + Send + Sync>>>,
    flags: Vec<ResponseFlag>,
    /// A filter took the request for the proxy's own health check (access logs'
    /// `not_health_check_filter` leaves it out).
    health_check: bool,
}

impl FilterState {
    /// Whether a filter took the request for a health check.
    pub fn is_health_check(&self) -> bool {
        self.health_check
    }

    /// The response flags filters set on the stream, in order.
    pub fn flags(&self) -> &[ResponseFlag] {
        &self.flags
    }

    fn slot(&mut self, index: usize) -> &mut Option<Box<dyn Any + Send + Sync>> {
        if self.slots.len() <= index {
            self.slots.resize_with(index + 1, || None);
        }
        &mut self.slots[index]
    }

    pub fn get(&self, index: usize) -> Option<&(dyn Any + Send + Sync)> {
        self.slots.get(index).and_then(|slot| slot.as_deref())
    }
}

/// State filters keep for one downstream connection, shared by its streams: one slot per
/// filter, set once (a per-connection token bucket).
#[derive(Default)]
pub struct ConnectionState {
    slots: Box<[OnceLock<Box<dyn Any + Send + Sync>>]>,
}

impl ConnectionState {
    /// Slots for a chain of `filters` filters.
    pub fn new(filters: usize) -> Self {
        ConnectionState {
            slots: (0..filters).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl std::fmt::Debug for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self
            .slots
            .iter()
            .filter(|slot| slot.get().is_some())
            .count();
        write!(f, "ConnectionState({set} of {} set)", self.slots.len())
    }
}

/// One stream as a filter sees it.
#[derive(Debug)]
pub struct Stream<'a> {
    pub request: &'a mut http::request::Parts,
    pub route: Option<&'a Selected>,
    pub stats: &'a HttpStats,
    /// The downstream connection the request came on.
    pub downstream: &'a ConnectionInfo,
    /// The client address the connection manager trusts (`x-forwarded-for` handling).
    pub client: IpAddr,
    state: &'a mut FilterState,
    connection: &'a ConnectionState,
    index: usize,
}

impl<'a> Stream<'a> {
    pub fn new(
        request: &'a mut http::request::Parts,
        route: Option<&'a Selected>,
        stats: &'a HttpStats,
        (downstream, client): (&'a ConnectionInfo, IpAddr),
        state: &'a mut FilterState,
        connection: &'a ConnectionState,
    ) -> Self {
        Stream {
            request,
            route,
            stats,
            downstream,
            client,
            state,
            connection,
            index: 0,
        }
    }

    /// Marks the stream with a response flag (once) for the access log.
    /// The request's pseudo-headers as header matchers read them: `:authority` from Host (or
    /// the URI), and, as an HTTP/1 request carries no scheme, the connection's.
    pub fn pseudo_headers(&self) -> PseudoHeaders<'_> {
        let request = &*self.request;
        PseudoHeaders {
            method: request.method.as_str(),
            path: request.uri.path_and_query().map_or("", |p| p.as_str()),
            authority: request
                .headers
                .get(http::header::HOST)
                .and_then(|host| host.to_str().ok())
                .or_else(|| request.uri.authority().map(|a| a.as_str()))
                .unwrap_or(""),
            scheme: request
                .uri
                .scheme_str()
                .unwrap_or(match self.downstream.tls_terminated {
                    true => "https",
                    false => "http",
                }),
        }
    }

    /// Marks the request as the proxy's own health check.
    pub fn mark_health_check(&mut self) {
        self.state.health_check = true;
    }

    /// Whether a filter marked the request as a health check.
    pub fn is_health_check(&self) -> bool {
        self.state.health_check
    }

    pub fn add_flag(&mut self, flag: ResponseFlag) {
        if !self.state.flags.contains(&flag) {
            self.state.flags.push(flag);
        }
    }

    /// This filter's state for the whole downstream connection, made by `init` for the
    /// connection's first stream that asks; `None` if a value of another type is kept there.
    pub fn connection_state<T: Any + Send + Sync>(
        &self,
        init: impl FnOnce() -> T,
    ) -> Option<&'a T> {
        let connection: &'a ConnectionState = self.connection;
        connection
            .slots
            .get(self.index)?
            .get_or_init(|| Box::new(init()))
            .downcast_ref::<T>()
    }

    /// This filter's per-route configs, most specific first (route, virtual host, table).
    pub fn per_route(&self, name: &str) -> [Option<&'a PerRouteConfig>; 3] {
        match self.route {
            Some(selected) => selected.per_route(name),
            None => [None; 3],
        }
    }

    /// Keeps a value for this filter's later phases of the stream.
    pub fn set_state<T: Any + Send + Sync>(&mut self, value: T) {
        *self.state.slot(self.index) = Some(Box::new(value));
    }

    /// What this filter kept earlier in the stream.
    pub fn state<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.state
            .get(self.index)
            .and_then(|state| state.downcast_ref::<T>())
    }
}

/// The filters of one connection manager, router excluded, in configured order.
#[derive(Debug, Clone, Default)]
pub struct FilterChain {
    filters: Arc<[Arc<dyn HttpFilter>]>,
}

impl FilterChain {
    pub fn new(filters: Vec<Arc<dyn HttpFilter>>) -> Self {
        FilterChain {
            filters: filters.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    /// Runs the request phase, in order; a reply from one filter ends it.
    pub async fn on_request(&self, stream: &mut Stream<'_>) -> Option<LocalReply> {
        for (index, filter) in self.filters.iter().enumerate() {
            stream.index = index;
            let mut flow = filter.on_request(stream);
            loop {
                match flow {
                    Flow::Continue => break,
                    Flow::Reply(reply) => return Some(reply),
                    Flow::Pause(work) => flow = work.await,
                }
            }
        }
        None
    }

    /// Body filters for the request, in order (empty unless a filter asks).
    pub fn request_body(&self, stream: &mut Stream<'_>) -> Vec<Box<dyn BodyFilter>> {
        let mut out = Vec::new();
        for (index, filter) in self.filters.iter().enumerate() {
            stream.index = index;
            out.extend(filter.request_body(stream));
        }
        out
    }

    /// Runs the response phase, in reverse order.
    pub fn on_response(&self, stream: &mut Stream<'_>, response: &mut Response<()>) {
        for (index, filter) in self.filters.iter().enumerate().rev() {
            stream.index = index;
            filter.on_response(stream, response);
        }
    }

    /// Body filters for the response, in the response's order (reverse).
    pub fn response_body(&self, stream: &mut Stream<'_>) -> Vec<Box<dyn BodyFilter>> {
        let mut out = Vec::new();
        for (index, filter) in self.filters.iter().enumerate().rev() {
            stream.index = index;
            out.extend(filter.response_body(stream));
        }
        out
    }

    /// Tells every filter the stream ended.
    pub fn on_complete(&self, state: &FilterState) {
        for (index, filter) in self.filters.iter().enumerate() {
            filter.on_complete(state.get(index));
        }
    }

    /// The completion phase of a stream with `state`, for its response body to run at the end.
    pub fn completion(&self, state: FilterState) -> Box<dyn StreamEnd> {
        Box::new(Completion {
            chain: self.clone(),
            state,
        })
    }
}

/// A stream's filters and their state, waiting for the stream to end.
#[derive(Debug)]
struct Completion {
    chain: FilterChain,
    state: FilterState,
}

impl StreamEnd for Completion {
    fn stream_ended(self: Box<Self>) {
        self.chain.on_complete(&self.state);
    }
}
