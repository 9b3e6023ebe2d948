//! Clusters: the live state behind each configured cluster (endpoints, load balancer, pools,
//! stats), kept apart from config snapshots so it survives swaps. STATIC and EDS clusters get
//! their endpoints from config; STRICT_DNS and LOGICAL_DNS resolve in the background (per
//! `dns_lookup_family`); ORIGINAL_DST uses the downstream connection's original destination.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::config::{
    Cluster, DiscoveryType, EndpointAddress, HealthStatus, LbEndpoint, LoadAssignment,
};
use crate::lb::{EndpointSet, Host, LbContext, LoadBalancer, RoundRobin};
use crate::pool::Pools;
use crate::stats::{ClusterStats, Registry};

/// The live state of one cluster.
#[derive(Debug)]
pub struct ClusterRuntime {
    pub config: Arc<Cluster>,
    pub stats: Arc<ClusterStats>,
    pub endpoints: ArcSwap<EndpointSet>,
    pub lb: Box<dyn LoadBalancer>,
    pub pools: Pools,
    initialized: AtomicBool,
    init: Notify,
    background: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for ClusterRuntime {
    fn drop(&mut self) {
        if let Some(task) = self.background.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
    }
}

fn hosts_from(assignment: &LoadAssignment) -> Vec<Arc<Host>> {
    assignment
        .endpoints
        .iter()
        .filter_map(|endpoint| match endpoint.address {
            EndpointAddress::Ip(addr) => Some(Arc::new(Host::new(addr, endpoint))),
            EndpointAddress::Dns { .. } => None,
        })
        .collect()
}

impl ClusterRuntime {
    pub fn new(config: Arc<Cluster>, registry: &Registry, workers: usize) -> Arc<Self> {
        let stats = Arc::new(ClusterStats::new(registry, &config.name));
        let initialized = matches!(
            config.discovery,
            DiscoveryType::Static | DiscoveryType::OriginalDst
        );
        let runtime = Arc::new(ClusterRuntime {
            pools: Pools::new(&config, stats.clone(), workers),
            stats,
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            lb: Box::new(RoundRobin::default()),
            initialized: AtomicBool::new(false),
            init: Notify::new(),
            background: Mutex::new(None),
            config,
        });
        if initialized {
            runtime.set_assignment(&runtime.config.load_assignment.clone());
        }
        runtime
    }

    /// Replaces the endpoints (EDS update or DNS answer) and marks the cluster warm.
    pub fn set_assignment(&self, assignment: &LoadAssignment) {
        self.set_hosts(hosts_from(assignment));
    }

    pub fn set_hosts(&self, mut hosts: Vec<Arc<Host>>) {
        // A host that keeps its address keeps its stats, as in Envoy: counters go on counting,
        // and its open connections still count in its `cx_active`.
        let previous = self.endpoints.load();
        let kept: HashMap<_, _> = previous
            .all_hosts()
            .map(|host| (host.addr, &host.stats))
            .collect();
        for host in &mut hosts {
            if let (Some(stats), Some(fresh)) = (kept.get(&host.addr), Arc::get_mut(host)) {
                fresh.stats = Arc::clone(stats);
            }
        }
        let set = EndpointSet::new(hosts);
        self.stats
            .membership_total
            .set(set.all_hosts().count() as u64);
        self.stats
            .membership_healthy
            .set(set.healthy_count() as u64);
        self.endpoints.store(Arc::new(set));
        self.mark_initialized();
    }

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

    /// Picks an upstream host.
    pub fn choose(&self, context: &LbContext) -> Option<Arc<Host>> {
        if self.config.discovery == DiscoveryType::OriginalDst {
            let addr = context.original_dst?;
            let endpoint = LbEndpoint {
                address: EndpointAddress::Ip(addr),
                hostname: String::new(),
                weight: 1,
                health: HealthStatus::Healthy,
                priority: 0,
            };
            return Some(Arc::new(Host::new(addr, &endpoint)));
        }
        self.lb.choose(&self.endpoints.load(), context)
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
                let mut hosts = Vec::new();
                let mut failed = false;
                for endpoint in &cluster.config.load_assignment.endpoints {
                    match &endpoint.address {
                        EndpointAddress::Ip(addr) => {
                            hosts.push(Arc::new(Host::new(*addr, endpoint)))
                        }
                        EndpointAddress::Dns { host, port } => {
                            match tokio::net::lookup_host((host.as_str(), *port)).await {
                                Ok(addrs) => {
                                    let family = cluster.config.dns_lookup_family;
                                    let addrs = family.select(addrs.collect());
                                    // LOGICAL_DNS: one host, the answer's first address.
                                    let keep = if logical { 1 } else { addrs.len() };
                                    for addr in addrs.into_iter().take(keep) {
                                        hosts.push(Arc::new(Host::new(addr, endpoint)));
                                    }
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
                    cluster.set_hosts(hosts);
                }
                let refresh = cluster.config.dns_refresh_rate;
                drop(cluster);
                tokio::time::sleep(refresh).await;
            }
        });
        if let Ok(mut slot) = self.background.lock() {
            *slot = Some(task.abort_handle());
        }
    }
}

/// All clusters by name, swapped atomically; readers never block.
#[derive(Debug)]
pub struct ClusterManager {
    active: ArcSwap<HashMap<String, Arc<ClusterRuntime>>>,
    registry: Arc<Registry>,
    workers: usize,
    write: Mutex<()>,
}

impl ClusterManager {
    pub fn new(registry: Arc<Registry>, workers: usize) -> Self {
        ClusterManager {
            active: ArcSwap::from_pointee(HashMap::new()),
            registry,
            workers,
            write: Mutex::new(()),
        }
    }

    pub fn build(&self, config: Arc<Cluster>) -> Arc<ClusterRuntime> {
        ClusterRuntime::new(config, &self.registry, self.workers)
    }

    #[inline]
    pub fn get(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        self.active.load().get(name).cloned()
    }

    pub fn all(&self) -> Arc<HashMap<String, Arc<ClusterRuntime>>> {
        self.active.load_full()
    }

    /// Adds or replaces clusters in one swap.
    pub fn insert_all(&self, clusters: Vec<Arc<ClusterRuntime>>) {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = (**self.active.load()).clone();
        for cluster in clusters {
            map.insert(cluster.config.name.clone(), cluster);
        }
        self.active.store(Arc::new(map));
    }

    pub fn remove(&self, names: &[String]) {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = (**self.active.load()).clone();
        for name in names {
            map.remove(name);
        }
        self.active.store(Arc::new(map));
    }
}
