//! Request bodies, which both wings carry: the connection manager reads them from downstream
//! and the upstream pools send them. Below `http` and `upstream`, so neither imports the other
//! for them.
//!
//! - [`request`]: the downstream request body, with the HCM's `request_timeout` deadline, byte
//!   counts for the access log, and the signal that starts the route timeout when it ends;
//! - [`replay`]: one request body shared by retries and mirrors, kept up to the buffer limit;
//! - [`outgoing`]: what an upstream request carries (the body itself, a replaying reader of
//!   it, or nothing);
//! - [`filter`]: body filters, which HTTP filters install to see data and trailers stream by.

pub mod filter;
pub mod outgoing;
pub mod replay;
pub mod request;

/// The error type of every body on the proxy path.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
