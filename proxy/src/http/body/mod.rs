//! Bodies on the proxy path, one file per direction:
//!
//! - [`request`]: the downstream request body forwarded upstream, with the HCM's
//!   `request_timeout` deadline and the signal that starts the route timeout when it ends;
//! - [`outgoing`]: what an upstream request carries (that body, a shared replayable reader, or
//!   nothing);
//! - [`response`]: response bodies, streamed from upstream with the route timeout and the
//!   stream idle timeout still running (Envoy's route timeout spans the whole response), or a
//!   local reply's fixed buffer;
//! - [`timer`]: the one timer that holds a stream's route deadline and idle timeouts.

pub mod outgoing;
pub mod request;
pub mod response;
pub mod timer;

/// The error type every body on the proxy path uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
