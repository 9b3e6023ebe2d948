//! A cluster at run time: its config, stats, members (hosts by priority, with state kept by
//! address) and connection pools. A CDS update builds a new [`Cluster`] that takes over the
//! old one's members (unless where hosts come from changed) and its pools (unless how
//! connections are made changed), so hosts keep their stats, health and connections.
//!
//! STATIC clusters take their endpoints from config, EDS clusters from EDS resources,
//! STRICT_DNS and LOGICAL_DNS resolve in the background (per `dns_lookup_family`),
//! ORIGINAL_DST uses the downstream connection's original destination.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use super::connect::Connector;
use super::host::{Host, HostState};
use super::lb::{LbContext, LoadBalancer};
use super::outcome::Outcome;
use super::pool::Pools;
use super::priority::PrioritySet;
use crate::config::{
    self, ConfigResult, DiscoveryType, EndpointAddress, LbEndpoint, LoadAssignment,
};
use crate::stats::{ClusterStats, Registry};

/// A cluster's hosts: their state by address and the current priority set. Shared by the
/// cluster objects that follow one another through CDS updates.
#[derive(Debug)]
pub struct Members {
    stats: Arc<ClusterStats>,
    /// State by address, for the hosts of the current endpoints.
    states: Mutex<HashMap<SocketAddr, Arc<HostState>>>,
    /// The endpoints hosts are made from, kept to rebuild the set when health changes.
    endpoints: Mutex<Vec<(SocketAddr, LbEndpoint)>>,
    set: ArcSwap<PrioritySet>,
    policy: Mutex<(Arc<dyn LoadBalancer>, u32)>,
    initialized: AtomicBool,
    init: Notify,
}

impl Members {
    fn new(stats: Arc<ClusterStats>, policy: Arc<dyn LoadBalancer>) -> Arc<Self> {
        Arc::new(Members {
            stats,
            states: Mutex::default(),
            endpoints: Mutex::default(),
            set: ArcSwap::default(),
            policy: Mutex::new((policy, crate::config::DEFAULT_OVERPROVISIONING)),
            initialized: AtomicBool::new(false),
            init: Notify::new(),
        })
    }

    /// The current hosts, by priority.
    pub fn set(&self) -> arc_swap::Guard<Arc<PrioritySet>> {
        self.set.load()
    }

    /// Replaces the endpoints (an EDS update, a DNS answer or a new static config) and marks
    /// the cluster warm. A host whose address stays keeps its state.
    pub fn set_endpoints(&self, endpoints: Vec<(SocketAddr, LbEndpoint)>, overprovisioning: u32) {
        {
            let mut policy = lock(&self.policy);
            policy.1 = overprovisioning;
        }
        *lock(&self.endpoints) = endpoints;
        self.rebuild();
        if !self.initialized.swap(true, Ordering::AcqRel) {
            self.init.notify_waiters();
        }
    }

    /// A cluster whose endpoints did not arrive in time is used without them.
    pub fn mark_initialized(&self) {
        if !self.initialized.swap(true, Ordering::AcqRel) {
            self.init.notify_waiters();
        }
    }

    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
    }

    /// Waits until the cluster has its first endpoints.
    pub async fn initialized(&self) {
        loop {
            let notified = self.init.notified();
            if self.is_initialized() {
                return;
            }
            notified.await;
        }
    }

    fn set_policy(&self, policy: Arc<dyn LoadBalancer>) {
        lock(&self.policy).0 = policy;
        self.rebuild();
    }

    /// Rebuilds the priority set from the endpoints and the hosts' current health.
    pub fn rebuild(&self) {
        let endpoints = lock(&self.endpoints);
        let mut states = lock(&self.states);
        let mut kept = HashMap::with_capacity(endpoints.len());
        let hosts: Vec<Arc<Host>> = endpoints
            .iter()
            .map(|(addr, endpoint)| {
                let state = kept
                    .entry(*addr)
                    .or_insert_with(|| states.get(addr).cloned().unwrap_or_default())
                    .clone();
                Arc::new(Host::new(*addr, endpoint, state))
            })
            .collect();
        *states = kept;
        drop(states);
        drop(endpoints);
        let (policy, overprovisioning) = lock(&self.policy).clone();
        let set = PrioritySet::new(hosts, policy.as_ref(), overprovisioning);
        self.stats.membership_total.set(set.hosts.len() as u64);
        self.stats
            .membership_healthy
            .set(set.healthy_count() as u64);
        self.stats
            .membership_degraded
            .set(set.degraded_count() as u64);
        self.set.store(Arc::new(set));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The live state of one cluster.
#[derive(Debug)]
pub struct Cluster {
    pub config: Arc<config::Cluster>,
    pub stats: Arc<ClusterStats>,
    pub members: Arc<Members>,
    pub connector: Arc<Connector>,
    pub pools: Arc<Pools>,
    background: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.background).take() {
            task.abort();
        }
    }
}

/// What must be equal for a new cluster config to keep the old one's connections.
fn same_connections(a: &config::Cluster, b: &config::Cluster) -> bool {
    a.connect == b.connect
        && a.protocol == b.protocol
        && a.http2 == b.http2
        && a.idle_timeout == b.idle_timeout
        && a.max_headers_count == b.max_headers_count
        && a.thresholds.max_connections == b.thresholds.max_connections
        && a.thresholds.max_pending_requests == b.thresholds.max_pending_requests
}

/// What must be equal for a new cluster config to keep the old one's hosts.
fn same_hosts(a: &config::Cluster, b: &config::Cluster) -> bool {
    a.discovery == b.discovery
        && match a.discovery {
            DiscoveryType::Eds { .. } | DiscoveryType::OriginalDst => true,
            _ => a.load_assignment == b.load_assignment,
        }
}

impl Cluster {
    /// Builds a cluster; `previous` is the cluster it replaces, if any. Reads TLS files, so
    /// an error names the field at fault.
    pub fn new(
        config: Arc<config::Cluster>,
        registry: &Registry,
        workers: usize,
        previous: Option<&Cluster>,
    ) -> ConfigResult<Arc<Self>> {
        let stats = match previous {
            Some(previous) => previous.stats.clone(),
            None => Arc::new(ClusterStats::new(registry, &config.name)),
        };
        let policy = super::lb::policy(&config);
        let (connector, pools) = match previous {
            Some(previous) if same_connections(&previous.config, &config) => {
                (previous.connector.clone(), previous.pools.clone())
            }
            _ => {
                let connector = Arc::new(Connector::new(
                    &config.connect,
                    config.thresholds.max_connections,
                    stats.clone(),
                )?);
                let pools = Arc::new(Pools::new(&config, connector.clone(), workers));
                (connector, pools)
            }
        };
        let members = match previous {
            Some(previous) if same_hosts(&previous.config, &config) => {
                let members = previous.members.clone();
                members.set_policy(policy);
                members
            }
            _ => Members::new(stats.clone(), policy),
        };
        let cluster = Arc::new(Cluster {
            config,
            stats,
            members,
            connector,
            pools,
            background: Mutex::new(None),
        });
        match cluster.config.discovery {
            DiscoveryType::Static => {
                cluster.members.set_endpoints(
                    ip_endpoints(&cluster.config.load_assignment),
                    cluster.config.load_assignment.overprovisioning,
                );
            }
            DiscoveryType::OriginalDst => cluster.members.mark_initialized(),
            _ => {}
        }
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Applies an EDS update.
    pub fn set_assignment(&self, assignment: &LoadAssignment) {
        self.members
            .set_endpoints(ip_endpoints(assignment), assignment.overprovisioning);
    }

    /// Picks an upstream host.
    pub fn choose(&self, context: &LbContext<'_>) -> Option<Arc<Host>> {
        if self.config.discovery == DiscoveryType::OriginalDst {
            return context
                .original_dst
                .map(|addr| Arc::new(Host::original_destination(addr)));
        }
        let set = self.members.set();
        let chosen = set.choose(context)?;
        if chosen.panic {
            self.stats.lb_healthy_panic.inc();
        }
        Some(chosen.host.clone())
    }

    /// What happened with a host: the router and `tcp_proxy` report every attempt here.
    pub fn record_outcome(&self, host: &Host, outcome: Outcome) {
        outcome.count(host.stats());
    }

    /// Starts DNS resolution for STRICT_DNS and LOGICAL_DNS clusters on the current runtime.
    pub fn start_background(self: &Arc<Self>) {
        let logical = match self.config.discovery {
            DiscoveryType::StrictDns => false,
            DiscoveryType::LogicalDns => true,
            _ => return,
        };
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                cluster.stats.update_attempt.inc();
                let mut endpoints = Vec::new();
                let mut failed = false;
                for endpoint in &cluster.config.load_assignment.endpoints {
                    match &endpoint.address {
                        EndpointAddress::Ip(addr) => endpoints.push((*addr, endpoint.clone())),
                        EndpointAddress::Dns { host, port } => {
                            match tokio::net::lookup_host((host.as_str(), *port)).await {
                                Ok(addrs) => {
                                    let family = cluster.config.dns_lookup_family;
                                    let addrs = family.select(addrs.collect());
                                    // LOGICAL_DNS: one host, the answer's first address.
                                    let keep = if logical { 1 } else { addrs.len() };
                                    endpoints.extend(
                                        addrs
                                            .into_iter()
                                            .take(keep)
                                            .map(|addr| (addr, endpoint.clone())),
                                    );
                                }
                                Err(error) => {
                                    failed = true;
                                    tracing::warn!(cluster = %cluster.config.name, %host, %error, "DNS resolution failed; keeping the last answer")
                                }
                            }
                        }
                    }
                }
                // A failed lookup keeps the hosts of the last good round, as Envoy does.
                if failed {
                    cluster.stats.update_failure.inc();
                } else {
                    cluster.stats.update_success.inc();
                    cluster
                        .members
                        .set_endpoints(endpoints, cluster.config.load_assignment.overprovisioning);
                }
                let refresh = cluster.config.dns_refresh_rate;
                drop(cluster);
                tokio::time::sleep(refresh).await;
            }
        });
        *lock(&self.background) = Some(task.abort_handle());
    }
}

/// The endpoints with an IP address (names are resolved in the background).
fn ip_endpoints(assignment: &LoadAssignment) -> Vec<(SocketAddr, LbEndpoint)> {
    assignment
        .endpoints
        .iter()
        .filter_map(|endpoint| match endpoint.address {
            EndpointAddress::Ip(addr) => Some((addr, endpoint.clone())),
            EndpointAddress::Dns { .. } => None,
        })
        .collect()
}
