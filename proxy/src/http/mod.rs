//! L7: the HTTP connection manager and what a request passes through in it.
//!
//! A [`manager`] is one configured connection manager; [`conn_manager`] serves connections (hyper, HTTP/1.1 and HTTP/2, HTTP/1 heads first judged
//! by Envoy's codec rules in [`codec_guard`]) and drives each request through [`headers`]
//! (what the connection manager sets), the [`filter`] chain ([`filters`]), the [`router`] (the
//! terminal filter: direct responses, redirects, forwarding upstream with retries and mirrors)
//! and back; [`tracing`] makes the request's spans and passes its trace context on;
//! [`local_reply`] makes Remora's own responses, [`response_body`] carries response bodies with
//! the request's slots until they end, [`stream_timer`] holds a stream's route and idle
//! timeouts, [`selected`] is the route a request matched, and [`access_log`] writes a line when
//! a response ends. Request bodies live below this module, in [`crate::body`], since the
//! upstream pools send them too.

pub mod access_log;
pub mod codec_guard;
pub mod conn_manager;
pub mod filter;
pub mod filters;
pub mod headers;
pub mod local_reply;
pub mod manager;
pub mod response_body;
pub mod router;
pub mod selected;
pub mod stream_timer;
pub mod tracing;
