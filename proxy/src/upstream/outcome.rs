//! Outcomes: what happened each time a host was used. The router and `tcp_proxy` report every
//! attempt through [`super::Cluster::record_outcome`]; the host's request stats come from here,
//! and outlier detection will listen here too.

use super::host::HostStats;

/// What one attempt on a host came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `tcp_proxy` connected to the host.
    Connected,
    /// No connection could be made (`tcp_proxy`, or for an HTTP request).
    ConnectFailed { http: bool },
    /// An HTTP request got a response with this status.
    Status(u16),
    /// An HTTP request's connection failed under it.
    Reset,
    /// An HTTP request timed out: the route timeout (`route`) or the stream idle timeout.
    Timeout { route: bool },
}

impl Outcome {
    /// Counts the outcome in the host's request stats (HTTP only, as Envoy counts them).
    pub(super) fn count(self, stats: &HostStats) {
        match self {
            Outcome::Connected | Outcome::ConnectFailed { http: false } => {}
            Outcome::Status(status) if status < 500 => stats.rq_success.inc(),
            Outcome::Status(_) | Outcome::Reset | Outcome::ConnectFailed { http: true } => {
                stats.rq_error.inc()
            }
            Outcome::Timeout { route } => {
                stats.rq_error.inc();
                if route {
                    stats.rq_timeout.inc();
                }
            }
        }
    }
}
