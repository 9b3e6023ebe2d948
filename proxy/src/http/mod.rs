//! L7: the HTTP connection manager (hyper server, HTTP/1.1 and HTTP/2, upgrades), the router's
//! compiled route tables, the body types that flow between downstream and upstream, and the
//! access logs written when a response ends.

pub mod access_log;
pub mod body;
pub mod conn_manager;
pub mod router;
