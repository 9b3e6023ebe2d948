//! L7: the HTTP connection manager and what a request passes through in it.
//!
//! A [`manager`] is one configured connection manager; [`conn_manager`] serves connections (hyper, HTTP/1.1 and HTTP/2, HTTP/1 heads first judged
//! by Envoy's codec rules in [`codec_guard`]) and drives each request through [`headers`]
//! (what the connection manager sets), the [`filter`] chain ([`filters`]), the [`router`] (the
//! terminal filter: direct responses, redirects, forwarding upstream with retries and mirrors)
//! and back; [`tracing`] makes the request's spans and passes its trace context on;
//! [`local_reply`] makes Remora's own responses, [`body`] carries bodies with their timers and
//! slots (and [`body_filter`] lets filters see them), [`selected`] is the route a request
//! matched, [`replay`] shares a request body between retries and mirrors, and [`access_log`]
//! writes a line when a response ends.

pub mod access_log;
pub mod body;
pub mod body_filter;
pub mod codec_guard;
pub mod conn_manager;
pub mod filter;
pub mod filters;
pub mod headers;
pub mod local_reply;
pub mod manager;
pub mod replay;
pub mod router;
pub mod selected;
pub mod tracing;

/// hyper's HTTP/1 header count limit when none is set (`proto::h1::role::DEFAULT_MAX_HEADERS`),
/// which is also Envoy's default `max_headers_count`.
pub const HYPER_DEFAULT_MAX_HEADERS: usize = 100;
