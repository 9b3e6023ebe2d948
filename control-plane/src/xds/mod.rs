//! The xDS server: ADS and the per-type discovery services, in both state-of-the-world
//! ([`sotw`]) and incremental ([`delta`]) variants, sharing one stream driver ([`stream`]).
//!
//! Every stream runs in its own task and follows its group's snapshot channel, so a slow proxy
//! only delays itself. Within a stream, types are pushed make-before-break: a type is sent only
//! when every type before it (clusters, endpoints, listeners, routes, secrets) has no response
//! awaiting an ACK, and removals of clusters and endpoints wait until everything else is in sync.

pub mod delta;
pub mod server;
pub mod sotw;
pub mod stream;

pub use server::XdsContext;
