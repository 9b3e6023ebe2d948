//! Load-balancing policies. A policy sees only usable hosts of the priority chosen for a pick
//! (healthy ones, degraded ones when healthy ones fall short, or all of them in panic):
//! priority selection, locality weighting, panic and overprovisioning live once, in
//! [`super::priority`].
//!
//! A policy prepares a [`Picker`] for each host list when the list changes (a schedule, a
//! ring, a table); a pick is then cheap. One file per policy, as Envoy names them:
//! [`round_robin`], [`least_request`], [`random`], [`ring_hash`], [`maglev`], and Remora's own
//! [`peak_ewma`]. Shared parts: [`edf`] (earliest-deadline-first scheduling for dynamic
//! weights), [`slow_start`], [`hashing`] (host keys, weights and hash functions of the
//! consistent-hashing policies) and the clock ([`super::clock`]).

pub mod edf;
pub mod hashing;
pub mod least_request;
pub mod maglev;
pub mod peak_ewma;
pub mod random;
pub mod ring_hash;
pub mod round_robin;
pub mod slow_start;

use std::net::SocketAddr;
use std::sync::Arc;

pub use least_request::LeastRequest;
pub use maglev::Maglev;
pub use peak_ewma::PeakEwma;
pub use random::Random;
pub use ring_hash::RingHash;
pub use round_robin::RoundRobin;

use super::host::Host;
use crate::config::{LbPolicy, LoadBalancing};

/// What a pick may use besides the hosts.
#[derive(Debug, Default, Clone, Copy)]
pub struct LbContext<'a> {
    /// The request's hash key (route `hash_policy`), for consistent-hashing policies.
    pub hash: Option<u64>,
    /// The connection's original destination (ORIGINAL_DST clusters).
    pub original_dst: Option<SocketAddr>,
    /// Hosts already tried for this request (retries avoid them when asked to).
    pub tried: &'a [Arc<Host>],
    /// Priorities a retry leaves out (a bit per priority; `previous_priorities`).
    pub excluded_priorities: u64,
}

/// A load-balancing policy: how to pick among a list of hosts.
pub trait LoadBalancer: Send + Sync + std::fmt::Debug {
    /// Prepares picking over `hosts` (called when the list changes).
    fn prepare(&self, hosts: &[Arc<Host>]) -> Box<dyn Picker>;

    /// A consistent-hashing policy, which Envoy runs differently from the others: it weighs
    /// localities inside its ring or table instead of having a locality chosen first, and it
    /// always uses the chosen priority's healthy hosts (all of them in panic), never the
    /// degraded ones.
    fn consistent_hashing(&self) -> bool {
        false
    }
}

/// Picks from the host list it was prepared for.
pub trait Picker: Send + Sync + std::fmt::Debug {
    /// The index of the chosen host in `hosts` (the list it was prepared for).
    fn pick(&self, hosts: &[Arc<Host>], context: &LbContext<'_>) -> Option<usize>;
}

/// The policy a cluster's config asks for.
pub fn policy(config: &LoadBalancing) -> Arc<dyn LoadBalancer> {
    match &config.policy {
        LbPolicy::RoundRobin(round_robin) => Arc::new(RoundRobin::new(round_robin.slow_start)),
        // ORIGINAL_DST picks by the connection; its (empty) host lists need a policy all the same.
        LbPolicy::ClusterProvided => Arc::new(RoundRobin::default()),
        LbPolicy::LeastRequest(least_request) => Arc::new(LeastRequest::new(*least_request)),
        LbPolicy::Random => Arc::new(Random),
        LbPolicy::RingHash(ring) => Arc::new(RingHash::new(ring, config.locality_weighted)),
        LbPolicy::Maglev(maglev) => Arc::new(Maglev::new(maglev, config.locality_weighted)),
        LbPolicy::PeakEwma(peak_ewma) => Arc::new(PeakEwma::new(*peak_ewma)),
    }
}
