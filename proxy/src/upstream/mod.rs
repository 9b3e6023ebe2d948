//! The upstream wing: everything between "this request goes to cluster X" and bytes on an
//! upstream socket.
//!
//! - [`cluster`]: a cluster at run time, its [`cluster::Members`] (hosts by priority) and pools,
//!   carried across CDS and EDS updates.
//! - [`host`]: a host as configured and its state as learnt (stats, health flags, outlier
//!   counters, response-time estimate).
//! - [`clock`]: the monotonic microseconds host states and balancers store in atomics.
//! - [`priority`]: priority and panic selection, once for every policy.
//! - [`lb`]: load-balancing policies over one priority's usable hosts.
//! - [`breakers`]: requests and retries in flight per routing priority, and their gauges.
//! - [`health`]: active health checks and outlier detection, on the main runtime.
//! - [`dns`]: names of DNS clusters' endpoints resolved, with their TTLs when asked.
//! - [`connect`]: the one connect path (limits, TCP options, keepalive, TLS, stats).
//! - [`pool`]: per-worker HTTP/1.1 and HTTP/2 connection pools.
//! - [`outcome`]: what each attempt came to, reported by the router and `tcp_proxy`.

pub mod breakers;
pub mod clock;
pub mod cluster;
pub mod connect;
pub mod dns;
pub mod health;
pub mod host;
pub mod lb;
pub mod outcome;
pub mod pool;
pub mod priority;

pub use cluster::Cluster;
pub use host::{Host, HostGauge, HostState};
pub use lb::LbContext;
pub use outcome::Outcome;
