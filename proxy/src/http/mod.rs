//! L7: the HTTP connection manager (hyper server, HTTP/1.1 and HTTP/2, upgrades), the router's
//! compiled route tables, the body types that flow between downstream and upstream, and the
//! access logs written when a response ends.

pub mod access_log;
pub mod body;
pub mod conn_manager;
pub mod cors;
pub mod router;

/// hyper's HTTP/1 header count limit when none is set (`proto::h1::role::DEFAULT_MAX_HEADERS`),
/// which is also Envoy's default `max_headers_count`.
pub const HYPER_DEFAULT_MAX_HEADERS: usize = 100;
