//! Priorities, as Envoy chooses among them, once for every policy: each priority's healthy and
//! degraded availability (its share of healthy or degraded hosts times the overprovisioning
//! factor, capped at 100%) decides how much load it takes, highest priority first; degraded
//! hosts take only what healthy ones across all priorities leave; a priority whose healthy and
//! degraded hosts are under the panic threshold (50%) is in panic and balances over all of its
//! hosts. The chosen list is handed to the cluster's policy.

use std::sync::Arc;

use super::host::{Health, Host};
use super::lb::{LbContext, LoadBalancer, Picker};

/// Envoy's default `healthy_panic_threshold` (percent).
pub const PANIC_THRESHOLD: u64 = 50;

/// A list of hosts with the policy's picker prepared for it.
#[derive(Debug)]
pub struct HostList {
    pub hosts: Vec<Arc<Host>>,
    picker: Box<dyn Picker>,
}

impl HostList {
    fn new(hosts: Vec<Arc<Host>>, policy: &dyn LoadBalancer) -> Self {
        let picker = policy.prepare(&hosts);
        HostList { hosts, picker }
    }

    fn pick(&self, context: &LbContext<'_>) -> Option<&Arc<Host>> {
        self.picker
            .pick(&self.hosts, context)
            .and_then(|index| self.hosts.get(index))
    }
}

/// One priority level's hosts: all of them, the healthy ones and the degraded ones.
#[derive(Debug)]
struct Level {
    all: HostList,
    healthy: HostList,
    degraded: HostList,
}

/// Which list of the chosen priority a pick uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Healthy,
    Degraded,
}

/// A cluster's hosts by priority with the load split between priorities, rebuilt whenever
/// membership or health changes.
#[derive(Debug, Default)]
pub struct PrioritySet {
    /// Every host, in config order (for `/clusters` and membership stats).
    pub hosts: Vec<Arc<Host>>,
    levels: Vec<Level>,
    /// Percent of picks per priority that go to its healthy hosts, then to its degraded ones;
    /// together they add up to 100.
    healthy_load: Vec<u32>,
    degraded_load: Vec<u32>,
    panic: Vec<bool>,
}

/// What a pick found.
#[derive(Debug)]
pub struct Chosen<'a> {
    pub host: &'a Arc<Host>,
    /// The priority was in panic (counted in `lb_healthy_panic`).
    pub panic: bool,
}

impl PrioritySet {
    pub fn new(hosts: Vec<Arc<Host>>, policy: &dyn LoadBalancer, overprovisioning: u32) -> Self {
        let levels_count = hosts
            .iter()
            .map(|h| h.priority as usize + 1)
            .max()
            .unwrap_or(0);
        let mut per_level: Vec<Vec<Arc<Host>>> = vec![Vec::new(); levels_count];
        for host in &hosts {
            per_level[host.priority as usize].push(host.clone());
        }
        let mut healthy_availability = Vec::with_capacity(levels_count);
        let mut degraded_availability = Vec::with_capacity(levels_count);
        let mut panic = Vec::with_capacity(levels_count);
        let mut levels = Vec::with_capacity(levels_count);
        for all in per_level {
            let healthy: Vec<_> = all
                .iter()
                .filter(|h| h.health() == Health::Healthy)
                .cloned()
                .collect();
            let degraded: Vec<_> = all
                .iter()
                .filter(|h| h.health() == Health::Degraded)
                .cloned()
                .collect();
            let total = all.len() as u64;
            let share = |count: usize| {
                (u64::from(overprovisioning) * count as u64)
                    .checked_div(total)
                    .map_or(0, |share| share.min(100) as u32)
            };
            healthy_availability.push(share(healthy.len()));
            degraded_availability.push(share(degraded.len()));
            let usable_percent = (100 * (healthy.len() + degraded.len()) as u64)
                .checked_div(total)
                .unwrap_or(0);
            panic.push(usable_percent < PANIC_THRESHOLD);
            levels.push(Level {
                all: HostList::new(all, policy),
                healthy: HostList::new(healthy, policy),
                degraded: HostList::new(degraded, policy),
            });
        }
        let mut set = PrioritySet {
            hosts,
            levels,
            healthy_load: vec![0; levels_count],
            degraded_load: vec![0; levels_count],
            panic,
        };
        set.distribute(&healthy_availability, &degraded_availability);
        set
    }

    /// Envoy's load split: healthy availability first, then degraded, normalised so the total
    /// is 100; no panic while the normalised total availability is 100; if every priority is
    /// in panic, load follows host counts.
    fn distribute(&mut self, healthy: &[u32], degraded: &[u32]) {
        let count = self.levels.len();
        if count == 0 {
            return;
        }
        let total = healthy.iter().chain(degraded).sum::<u32>().min(100);
        if total == 100 {
            self.panic.iter_mut().for_each(|p| *p = false);
        }
        if total > 0 {
            let mut remaining = 100u32;
            let mut first_healthy = None;
            for (i, availability) in healthy.iter().enumerate() {
                if first_healthy.is_none() && *availability > 0 {
                    first_healthy = Some(i);
                }
                self.healthy_load[i] =
                    remaining.min((availability * 100).checked_div(total).unwrap_or(0));
                remaining -= self.healthy_load[i];
            }
            let mut first_degraded = None;
            for (i, availability) in degraded.iter().enumerate() {
                if first_degraded.is_none() && *availability > 0 {
                    first_degraded = Some(i);
                }
                self.degraded_load[i] =
                    remaining.min((availability * 100).checked_div(total).unwrap_or(0));
                remaining -= self.degraded_load[i];
            }
            // Rounding leftovers go to the first healthy priority, else the first degraded one.
            if remaining > 0 {
                match (first_healthy, first_degraded) {
                    (Some(i), _) => self.healthy_load[i] += remaining,
                    (None, Some(i)) => self.degraded_load[i] += remaining,
                    (None, None) => {}
                }
            }
        }
        if self.panic.iter().all(|p| *p) {
            // Total panic: load by host count, healthy or not.
            let hosts: usize = self.levels.iter().map(|l| l.all.hosts.len()).sum();
            self.degraded_load.iter_mut().for_each(|l| *l = 0);
            if hosts == 0 {
                self.healthy_load.iter_mut().for_each(|l| *l = 0);
                self.healthy_load[0] = 100;
                return;
            }
            let mut remaining = 100u32;
            for (i, level) in self.levels.iter().enumerate() {
                self.healthy_load[i] = (100 * level.all.hosts.len() / hosts) as u32;
                remaining -= self.healthy_load[i];
            }
            if let Some(first) = self.levels.iter().position(|l| !l.all.hosts.is_empty()) {
                self.healthy_load[first] += remaining;
            }
        } else if total == 0 {
            self.healthy_load[0] = 100;
        }
    }

    /// Hosts that are healthy, across priorities.
    pub fn healthy_count(&self) -> usize {
        self.levels.iter().map(|l| l.healthy.hosts.len()).sum()
    }

    pub fn degraded_count(&self) -> usize {
        self.levels.iter().map(|l| l.degraded.hosts.len()).sum()
    }

    /// Chooses a priority (by the request's hash key if it has one, else at random), then a
    /// host from that priority's healthy, degraded or — in panic — full list.
    pub fn choose(&self, context: &LbContext<'_>) -> Option<Chosen<'_>> {
        let (priority, source) = match self.levels.len() {
            0 => return None,
            1 if self.healthy_load[0] == 100 => (0, Source::Healthy),
            _ => self.choose_priority(context.hash.unwrap_or_else(rand::random)),
        };
        let level = &self.levels[priority];
        if self.panic[priority] {
            return level
                .all
                .pick(context)
                .map(|host| Chosen { host, panic: true });
        }
        let list = match source {
            Source::Healthy => &level.healthy,
            Source::Degraded => &level.degraded,
        };
        list.pick(context).map(|host| Chosen { host, panic: false })
    }

    fn choose_priority(&self, hash: u64) -> (usize, Source) {
        let ticket = (hash % 100 + 1) as u32;
        let mut acc = 0;
        for (i, load) in self.healthy_load.iter().enumerate() {
            acc += load;
            if ticket <= acc {
                return (i, Source::Healthy);
            }
        }
        for (i, load) in self.degraded_load.iter().enumerate() {
            acc += load;
            if ticket <= acc {
                return (i, Source::Degraded);
            }
        }
        (0, Source::Healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EndpointAddress, HealthStatus, LbEndpoint};
    use crate::upstream::lb::RoundRobin;
    use std::net::SocketAddr;

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
                locality: Arc::default(),
                locality_weight: None,
            },
            Arc::default(),
        ))
    }

    fn picks(set: &PrioritySet, n: usize) -> [usize; 8] {
        let mut counts = [0; 8];
        for _ in 0..n {
            let chosen = set.choose(&LbContext::default()).expect("a host");
            counts[chosen.host.addr.port() as usize] += 1;
        }
        counts
    }

    #[test]
    fn weights_are_respected_and_unhealthy_skipped() {
        use HealthStatus::*;
        let set = PrioritySet::new(
            vec![
                host(1, 3, Healthy, 0),
                host(2, 1, Unknown, 0),
                host(3, 5, Unhealthy, 0),
            ],
            &RoundRobin,
            140,
        );
        assert_eq!(picks(&set, 400), [0, 300, 100, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn lower_priority_takes_over_when_higher_is_unhealthy_and_panic_spreads_over_all() {
        use HealthStatus::*;
        let set = PrioritySet::new(
            vec![host(1, 1, Unhealthy, 0), host(2, 1, Healthy, 1)],
            &RoundRobin,
            140,
        );
        assert_eq!(picks(&set, 10), [0, 0, 10, 0, 0, 0, 0, 0]);
        // One priority with one host of three healthy: under the 50% threshold, in panic, so
        // every host takes its turn, as in Envoy.
        let panic = PrioritySet::new(
            vec![
                host(1, 1, Unhealthy, 0),
                host(2, 1, Unhealthy, 0),
                host(3, 1, Healthy, 0),
            ],
            &RoundRobin,
            140,
        );
        assert_eq!(picks(&panic, 30), [0, 10, 10, 10, 0, 0, 0, 0]);
        let chosen = panic.choose(&LbContext::default()).unwrap();
        assert!(chosen.panic);
    }

    #[test]
    fn degraded_hosts_take_only_what_healthy_ones_leave() {
        use HealthStatus::*;
        // Three healthy of four: 3/4 × 140% caps at 100%, so the degraded host gets nothing.
        let set = PrioritySet::new(
            vec![
                host(1, 1, Healthy, 0),
                host(2, 1, Healthy, 0),
                host(3, 1, Healthy, 0),
                host(4, 1, Degraded, 0),
            ],
            &RoundRobin,
            140,
        );
        assert_eq!(picks(&set, 30), [0, 10, 10, 10, 0, 0, 0, 0]);
        // Two healthy of three: 2/3 × 140% is 93% (integer percent, as Envoy computes it), so
        // the degraded host takes the other 7%.
        let most = PrioritySet::new(
            vec![
                host(1, 1, Healthy, 0),
                host(2, 1, Healthy, 0),
                host(3, 1, Degraded, 0),
            ],
            &RoundRobin,
            140,
        );
        assert_eq!(
            (most.healthy_load.clone(), most.degraded_load.clone()),
            (vec![93], vec![7])
        );
        // One healthy of three (46%) and two degraded: degraded hosts take the rest.
        let short = PrioritySet::new(
            vec![
                host(1, 1, Healthy, 0),
                host(2, 1, Degraded, 0),
                host(3, 1, Degraded, 0),
            ],
            &RoundRobin,
            140,
        );
        assert_eq!(short.healthy_load, vec![46]);
        assert_eq!(short.degraded_load, vec![54]);
        let counts = picks(&short, 2000);
        assert!(counts[2] > 0 && counts[3] > 0, "{counts:?}");
        assert!((800..1050).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn no_hosts_no_pick() {
        let set = PrioritySet::new(Vec::new(), &RoundRobin, 140);
        assert!(set.choose(&LbContext::default()).is_none());
        let all_down = PrioritySet::new(
            vec![host(1, 1, HealthStatus::Unhealthy, 0)],
            &RoundRobin,
            140,
        );
        // Total panic: the one host is tried anyway, as Envoy does.
        assert_eq!(
            all_down
                .choose(&LbContext::default())
                .map(|c| c.host.addr.port()),
            Some(1)
        );
    }
}
