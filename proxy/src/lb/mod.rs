//! Load balancing: the [`LoadBalancer`] trait and round robin with weights, priorities and
//! health. Other policies (least request, ring hash, maglev) plug in behind the same trait.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{HealthStatus, LbEndpoint};
use crate::stats::{Kind, Stat};

/// One upstream host as the data path sees it.
#[derive(Debug)]
pub struct Host {
    pub addr: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    pub health: HealthStatus,
    pub priority: u32,
    pub stats: Arc<HostStats>,
}

impl Host {
    pub fn new(addr: SocketAddr, endpoint: &LbEndpoint) -> Self {
        Host {
            addr,
            hostname: endpoint.hostname.clone(),
            weight: endpoint.weight,
            health: endpoint.health,
            priority: endpoint.priority,
            stats: Default::default(),
        }
    }
}

/// One host's counters and gauges: Envoy's per-host stats, as `/clusters` lists them. They
/// outlive endpoint updates that keep the host's address (see `ClusterRuntime::set_hosts`).
#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_active: Stat,
    pub cx_connect_fail: Stat,
    pub cx_total: Stat,
    pub rq_active: Stat,
    /// Requests that got no response, or a 5xx.
    pub rq_error: Stat,
    pub rq_pending_active: Stat,
    /// Requests that got a response below 500.
    pub rq_success: Stat,
    pub rq_timeout: Stat,
    pub rq_total: Stat,
}

/// One unit of a host's gauge (`rq_active`, `cx_active`), given back when dropped.
pub struct HostGauge {
    stats: Arc<HostStats>,
    gauge: fn(&HostStats) -> &Stat,
}

impl HostGauge {
    pub fn new(stats: &Arc<HostStats>, gauge: fn(&HostStats) -> &Stat) -> Self {
        gauge(stats).inc();
        HostGauge {
            stats: stats.clone(),
            gauge,
        }
    }
}

impl Drop for HostGauge {
    fn drop(&mut self) {
        (self.gauge)(&self.stats).dec();
    }
}

impl std::fmt::Debug for HostGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostGauge").finish_non_exhaustive()
    }
}

impl HostStats {
    /// Every stat with its name and kind, sorted by name as Envoy's `/clusters` prints them.
    pub fn list(&self) -> [(&'static str, Kind, u64); 9] {
        use Kind::{Counter, Gauge};
        [
            ("cx_active", Gauge, self.cx_active.get()),
            ("cx_connect_fail", Counter, self.cx_connect_fail.get()),
            ("cx_total", Counter, self.cx_total.get()),
            ("rq_active", Gauge, self.rq_active.get()),
            ("rq_error", Counter, self.rq_error.get()),
            ("rq_pending_active", Gauge, self.rq_pending_active.get()),
            ("rq_success", Counter, self.rq_success.get()),
            ("rq_timeout", Counter, self.rq_timeout.get()),
            ("rq_total", Counter, self.rq_total.get()),
        ]
    }
}

/// One priority level: its hosts and a weighted schedule over the usable ones.
#[derive(Debug, Default)]
pub struct PriorityLevel {
    pub hosts: Vec<Arc<Host>>,
    /// Indexes into `hosts`, each repeated in proportion to its weight (interleaved).
    schedule: Vec<usize>,
    healthy: usize,
}

/// All hosts of a cluster, grouped by priority, with Envoy's priority load split.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub levels: Vec<PriorityLevel>,
    /// Percent of traffic per level (sums to 100 unless nothing is healthy).
    load: Vec<u32>,
}

impl EndpointSet {
    pub fn new(hosts: Vec<Arc<Host>>) -> Self {
        let max_priority = hosts.iter().map(|h| h.priority).max().unwrap_or(0) as usize;
        let mut levels: Vec<PriorityLevel> = (0..=max_priority)
            .map(|_| PriorityLevel::default())
            .collect();
        if hosts.is_empty() {
            levels.clear();
        }
        for host in hosts {
            levels[host.priority as usize].hosts.push(host);
        }
        for level in &mut levels {
            level.healthy = level.hosts.iter().filter(|h| h.health.usable()).count();
            level.schedule = schedule(&level.hosts);
        }
        // Envoy: each level takes min(100, healthy% × 1.4) of what is left, in order.
        let mut remaining = 100u32;
        let mut load = Vec::with_capacity(levels.len());
        for level in &levels {
            let health = if level.hosts.is_empty() {
                0
            } else {
                ((level.healthy as u32 * 140) / level.hosts.len() as u32).min(100)
            };
            let share = health.min(remaining);
            load.push(share);
            remaining -= share;
        }
        // Left-over load goes to the first level with any healthy host (Envoy normalises).
        if remaining > 0
            && remaining < 100
            && let Some(index) = levels.iter().position(|l| l.healthy > 0)
        {
            load[index] += remaining;
        }
        EndpointSet { levels, load }
    }

    pub fn all_hosts(&self) -> impl Iterator<Item = &Arc<Host>> {
        self.levels.iter().flat_map(|level| level.hosts.iter())
    }

    pub fn healthy_count(&self) -> usize {
        self.levels.iter().map(|l| l.healthy).sum()
    }
}

/// Interleaved weighted schedule of usable hosts (smooth weighted round robin), bounded size.
fn schedule(hosts: &[Arc<Host>]) -> Vec<usize> {
    let usable: Vec<(usize, i64)> = hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| h.health.usable())
        .map(|(i, h)| (i, i64::from(h.weight.max(1))))
        .collect();
    if usable.is_empty() {
        return Vec::new();
    }
    let total: i64 = usable.iter().map(|(_, w)| w).sum();
    // Keep the schedule short: scale weights down if the total is large.
    let scale = (total / 4096).max(1);
    let weights: Vec<(usize, i64)> = usable
        .iter()
        .map(|(i, w)| (*i, (w / scale).max(1)))
        .collect();
    let total: i64 = weights.iter().map(|(_, w)| w).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (k, (_, w)) in weights.iter().enumerate() {
            current[k] += w;
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        out.push(weights[best].0);
    }
    out
}

/// What a balancer may use to choose.
#[derive(Debug, Default, Clone, Copy)]
pub struct LbContext {
    pub original_dst: Option<SocketAddr>,
}

/// Chooses a host from an endpoint set.
pub trait LoadBalancer: Send + Sync + std::fmt::Debug {
    fn choose(&self, set: &EndpointSet, context: &LbContext) -> Option<Arc<Host>>;
}

/// Weighted round robin across the priority levels' load split.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
    level_pick: AtomicUsize,
}

impl LoadBalancer for RoundRobin {
    fn choose(&self, set: &EndpointSet, _context: &LbContext) -> Option<Arc<Host>> {
        let level = if set.levels.len() <= 1 || set.load.first() == Some(&100) {
            set.levels.first()?
        } else {
            let ticket = (self.level_pick.fetch_add(1, Ordering::Relaxed) % 100) as u32;
            let mut acc = 0;
            let mut chosen = None;
            for (index, share) in set.load.iter().enumerate() {
                acc += share;
                if ticket < acc {
                    chosen = set.levels.get(index);
                    break;
                }
            }
            chosen.or_else(|| set.levels.iter().find(|l| !l.schedule.is_empty()))?
        };
        if level.schedule.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        level
            .schedule
            .get(n % level.schedule.len())
            .and_then(|&i| level.hosts.get(i))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EndpointAddress;

    fn host(port: u16, weight: u32, health: HealthStatus, priority: u32) -> Arc<Host> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Arc::new(Host::new(
            addr,
            &LbEndpoint {
                address: EndpointAddress::Ip(addr),
                hostname: String::new(),
                weight,
                health,
                priority,
            },
        ))
    }

    #[test]
    fn weights_are_respected_and_unhealthy_skipped() {
        let set = EndpointSet::new(vec![
            host(1, 3, HealthStatus::Healthy, 0),
            host(2, 1, HealthStatus::Unknown, 0),
            host(3, 5, HealthStatus::Unhealthy, 0),
        ]);
        let rr = RoundRobin::default();
        let mut counts = [0; 4];
        for _ in 0..400 {
            let h = rr.choose(&set, &LbContext::default()).expect("a host");
            counts[h.addr.port() as usize] += 1;
        }
        assert_eq!(counts, [0, 300, 100, 0]);
    }

    #[test]
    fn lower_priority_takes_over_when_higher_is_unhealthy() {
        let set = EndpointSet::new(vec![
            host(1, 1, HealthStatus::Unhealthy, 0),
            host(2, 1, HealthStatus::Healthy, 1),
        ]);
        let rr = RoundRobin::default();
        for _ in 0..10 {
            assert_eq!(
                rr.choose(&set, &LbContext::default())
                    .map(|h| h.addr.port()),
                Some(2)
            );
        }
        let empty = EndpointSet::new(vec![host(1, 1, HealthStatus::Unhealthy, 0)]);
        assert!(rr.choose(&empty, &LbContext::default()).is_none());
    }
}
