//! Load-balancing policies. A policy sees only usable hosts of the priority chosen for a pick
//! (healthy ones, degraded ones when healthy ones fall short, or all of them in panic):
//! priority selection, panic and overprovisioning live once, in [`super::priority`].
//!
//! A policy prepares a [`Picker`] for each host list when the list changes (a schedule, a
//! ring, a table); a pick is then cheap and takes no lock.

mod round_robin;

use std::net::SocketAddr;
use std::sync::Arc;

pub use round_robin::RoundRobin;

use super::host::Host;

/// What a pick may use besides the hosts.
#[derive(Debug, Default, Clone, Copy)]
pub struct LbContext<'a> {
    /// The request's hash key (route `hash_policy`), for consistent-hashing policies.
    pub hash: Option<u64>,
    /// The connection's original destination (ORIGINAL_DST clusters).
    pub original_dst: Option<SocketAddr>,
    /// Hosts already tried for this request (retries avoid them when asked to).
    pub tried: &'a [Arc<Host>],
}

/// A load-balancing policy: how to pick among a list of hosts.
pub trait LoadBalancer: Send + Sync + std::fmt::Debug {
    /// Prepares picking over `hosts` (called when the list changes).
    fn prepare(&self, hosts: &[Arc<Host>]) -> Box<dyn Picker>;
}

/// Picks from the host list it was prepared for.
pub trait Picker: Send + Sync + std::fmt::Debug {
    /// The index of the chosen host in `hosts` (the list it was prepared for).
    fn pick(&self, hosts: &[Arc<Host>], context: &LbContext<'_>) -> Option<usize>;
}

/// The policy a cluster's config asks for.
pub fn policy(config: &crate::config::Cluster) -> Arc<dyn LoadBalancer> {
    match config.lb_policy {
        // ORIGINAL_DST picks by the connection; its (empty) host lists need a policy all the same.
        crate::config::LbPolicy::RoundRobin | crate::config::LbPolicy::ClusterProvided => {
            Arc::new(RoundRobin)
        }
    }
}
