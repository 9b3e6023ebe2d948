//! Priorities, as Envoy chooses among them, once for every policy: each priority's healthy and
//! degraded availability (its share of healthy or degraded hosts times the overprovisioning
//! factor, capped at 100%) decides how much load it takes, highest priority first; degraded
//! hosts take only what healthy ones across all priorities leave; a priority whose healthy and
//! degraded hosts are under the panic threshold (`healthy_panic_threshold`, 50% by default) is
//! in panic and balances over all of its hosts. With locality weighted balancing, a locality
//! of the chosen priority is picked next, by its weight times its share of usable hosts. The
//! chosen list is handed to the cluster's policy.
//!
//! Consistent-hashing policies are run as Envoy runs them: the request's hash key also picks
//! the priority, the policy folds locality weights into its ring or table, and it always
//! balances over the priority's healthy hosts (all of them in panic).

use std::sync::{Arc, Mutex};

use super::host::{Health, Host};
use super::lb::edf::Edf;
use super::lb::{LbContext, LoadBalancer, Picker};
use crate::config::{DEFAULT_OVERPROVISIONING, Locality};

/// How a cluster's priority set balances around its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The load assignment's overprovisioning factor (percent).
    pub overprovisioning: u32,
    /// `healthy_panic_threshold` (percent; 0 turns panic off).
    pub panic_threshold: u32,
    /// Pick a locality by weight before a host.
    pub locality_weighted: bool,
    /// A priority in panic picks no host (`zone_aware_lb_config.fail_traffic_on_panic`).
    pub fail_traffic_on_panic: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            overprovisioning: DEFAULT_OVERPROVISIONING,
            panic_threshold: remora_config::load_balancing::DEFAULT_PANIC_THRESHOLD,
            locality_weighted: false,
            fail_traffic_on_panic: false,
        }
    }
}

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
    /// Locality weighted balancing (not with consistent hashing). Boxed: 200 bytes most
    /// clusters do not use.
    localities: Option<Box<Localities>>,
}

/// A level's healthy and degraded hosts per locality, and the schedules that pick a locality.
#[derive(Debug)]
struct Localities {
    healthy: Vec<HostList>,
    degraded: Vec<HostList>,
    /// `None` when no locality has an effective weight: then the level's whole list is used.
    pick_healthy: Option<Mutex<Edf>>,
    pick_degraded: Option<Mutex<Edf>>,
    healthy_weights: Vec<f64>,
    degraded_weights: Vec<f64>,
}

impl Localities {
    /// Groups `all` by locality (localities in order: region, zone, sub-zone, as Envoy orders
    /// them); a locality's effective weight is its weight times the share of its hosts that is
    /// usable (times the overprovisioning factor, capped at 1), as Envoy's.
    fn new(all: &[Arc<Host>], policy: &dyn LoadBalancer, overprovisioning: u32) -> Self {
        let mut groups: std::collections::BTreeMap<&Locality, Vec<&Arc<Host>>> =
            std::collections::BTreeMap::new();
        for host in all {
            groups.entry(&host.locality).or_default().push(host);
        }
        let mut out = Localities {
            healthy: Vec::with_capacity(groups.len()),
            degraded: Vec::with_capacity(groups.len()),
            pick_healthy: None,
            pick_degraded: None,
            healthy_weights: Vec::new(),
            degraded_weights: Vec::new(),
        };
        for members in groups.values() {
            let weight = f64::from(members[0].locality_weight.unwrap_or(0));
            let share = |health: Health| {
                let usable: Vec<Arc<Host>> = members
                    .iter()
                    .filter(|h| h.health() == health)
                    .map(|h| (*h).clone())
                    .collect();
                let ratio = usable.len() as f64 / members.len() as f64;
                let effective = weight * (f64::from(overprovisioning) / 100.0 * ratio).min(1.0);
                (HostList::new(usable, policy), effective)
            };
            let (healthy, healthy_weight) = share(Health::Healthy);
            let (degraded, degraded_weight) = share(Health::Degraded);
            out.healthy.push(healthy);
            out.degraded.push(degraded);
            out.healthy_weights.push(healthy_weight);
            out.degraded_weights.push(degraded_weight);
        }
        let schedule = |weights: &[f64]| {
            let edf = Edf::new(weights.iter().copied().enumerate());
            (!edf.is_empty()).then(|| Mutex::new(edf))
        };
        out.pick_healthy = schedule(&out.healthy_weights);
        out.pick_degraded = schedule(&out.degraded_weights);
        out
    }

    /// The list of the locality whose turn it is, if any locality has a weight.
    fn pick(&self, source: Source) -> Option<&HostList> {
        let (schedule, weights, lists) = match source {
            Source::Healthy => (&self.pick_healthy, &self.healthy_weights, &self.healthy),
            Source::Degraded => (&self.pick_degraded, &self.degraded_weights, &self.degraded),
        };
        let mut edf = schedule.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
        let index = edf.pick_and_add(|index| weights[index])?;
        lists.get(index)
    }
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
    /// Each priority's availability (percent), kept for retries that leave priorities out.
    healthy_availability: Vec<u32>,
    degraded_availability: Vec<u32>,
    consistent_hashing: bool,
    fail_traffic_on_panic: bool,
}

/// What a pick found.
#[derive(Debug)]
pub struct Chosen<'a> {
    pub host: &'a Arc<Host>,
    /// The priority was in panic (counted in `lb_healthy_panic`).
    pub panic: bool,
}

impl PrioritySet {
    pub fn new(hosts: Vec<Arc<Host>>, policy: &dyn LoadBalancer, settings: Settings) -> Self {
        let overprovisioning = settings.overprovisioning;
        let consistent_hashing = policy.consistent_hashing();
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
            // Excluded hosts count in no availability, as in Envoy.
            let total = all.iter().filter(|h| !h.excluded()).count() as u64;
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
            panic.push(usable_percent < u64::from(settings.panic_threshold.min(100)));
            let localities = (settings.locality_weighted && !consistent_hashing)
                .then(|| Box::new(Localities::new(&all, policy, overprovisioning)));
            levels.push(Level {
                all: HostList::new(all, policy),
                healthy: HostList::new(healthy, policy),
                degraded: HostList::new(degraded, policy),
                localities,
            });
        }
        let mut set = PrioritySet {
            hosts,
            levels,
            healthy_load: vec![0; levels_count],
            degraded_load: vec![0; levels_count],
            panic,
            healthy_availability,
            degraded_availability,
            consistent_hashing,
            fail_traffic_on_panic: settings.fail_traffic_on_panic && !consistent_hashing,
        };
        set.distribute();
        set
    }
    /// Envoy's load split: healthy availability first, then degraded, normalised so the total
    /// is 100; no panic while the normalised total availability is 100; if every priority is
    /// in panic, load follows host counts.
    fn distribute(&mut self) {
        let count = self.levels.len();
        if count == 0 {
            return;
        }
        let total = self
            .healthy_availability
            .iter()
            .chain(&self.degraded_availability)
            .sum::<u32>()
            .min(100);
        if total == 100 {
            self.panic.iter_mut().for_each(|p| *p = false);
        }
        if total > 0 {
            (self.healthy_load, self.degraded_load) =
                split_load(&self.healthy_availability, &self.degraded_availability);
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
    /// host from that priority's healthy, degraded or — in panic — full list (with locality
    /// weighting, from the list of the locality whose turn it is).
    pub fn choose(&self, context: &LbContext<'_>) -> Option<Chosen<'_>> {
        let (priority, source) = match self.levels.len() {
            0 => return None,
            1 if self.healthy_load[0] == 100 => (0, Source::Healthy),
            _ if context.excluded_priorities != 0 => self.choose_priority_excluding(
                context.excluded_priorities,
                context.hash.unwrap_or_else(rand::random),
            ),
            _ => self.choose_priority(context.hash.unwrap_or_else(rand::random)),
        };
        let level = &self.levels[priority];
        if self.panic[priority] {
            if self.fail_traffic_on_panic {
                return None;
            }
            return level
                .all
                .pick(context)
                .map(|host| Chosen { host, panic: true });
        }
        let source = if self.consistent_hashing {
            Source::Healthy
        } else {
            source
        };
        let list = match level.localities.as_ref().and_then(|l| l.pick(source)) {
            Some(locality) => locality,
            None => match source {
                Source::Healthy => &level.healthy,
                Source::Degraded => &level.degraded,
            },
        };
        list.pick(context).map(|host| Chosen { host, panic: false })
    }

    fn choose_priority(&self, hash: u64) -> (usize, Source) {
        pick_priority(&self.healthy_load, &self.degraded_load, hash)
    }

    /// A retry's priority when the priorities in `excluded` (a bit per priority) are left out:
    /// their availability counts as none and the load is split again among the others (all
    /// of them, if that leaves nothing), as Envoy's `previous_priorities` does.
    fn choose_priority_excluding(&self, excluded: u64, hash: u64) -> (usize, Source) {
        let without = |availability: &[u32]| -> Vec<u32> {
            availability
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    if i < 64 && excluded & (1 << i) != 0 {
                        0
                    } else {
                        *a
                    }
                })
                .collect()
        };
        let healthy = without(&self.healthy_availability);
        let degraded = without(&self.degraded_availability);
        if healthy.iter().chain(&degraded).all(|a| *a == 0) {
            return self.choose_priority(hash);
        }
        let (healthy_load, degraded_load) = split_load(&healthy, &degraded);
        pick_priority(&healthy_load, &degraded_load, hash)
    }
}

/// Splits 100% of the load over priorities by availability: healthy hosts first, highest
/// priority first, then degraded ones; rounding leftovers go to the first healthy priority,
/// else the first degraded one.
fn split_load(healthy: &[u32], degraded: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let total = healthy.iter().chain(degraded).sum::<u32>().min(100);
    let mut healthy_load = vec![0; healthy.len()];
    let mut degraded_load = vec![0; degraded.len()];
    let mut remaining = 100u32;
    let mut first_healthy = None;
    for (i, availability) in healthy.iter().enumerate() {
        if first_healthy.is_none() && *availability > 0 {
            first_healthy = Some(i);
        }
        healthy_load[i] = remaining.min((availability * 100).checked_div(total).unwrap_or(0));
        remaining -= healthy_load[i];
    }
    let mut first_degraded = None;
    for (i, availability) in degraded.iter().enumerate() {
        if first_degraded.is_none() && *availability > 0 {
            first_degraded = Some(i);
        }
        degraded_load[i] = remaining.min((availability * 100).checked_div(total).unwrap_or(0));
        remaining -= degraded_load[i];
    }
    if remaining > 0 {
        match (first_healthy, first_degraded) {
            (Some(i), _) => healthy_load[i] += remaining,
            (None, Some(i)) => degraded_load[i] += remaining,
            (None, None) => {}
        }
    }
    (healthy_load, degraded_load)
}

/// The priority a ticket (a hash, or random) falls on under the given load split.
fn pick_priority(healthy_load: &[u32], degraded_load: &[u32], hash: u64) -> (usize, Source) {
    let ticket = (hash % 100 + 1) as u32;
    let mut acc = 0;
    for (i, load) in healthy_load.iter().enumerate() {
        acc += load;
        if ticket <= acc {
            return (i, Source::Healthy);
        }
    }
    for (i, load) in degraded_load.iter().enumerate() {
        acc += load;
        if ticket <= acc {
            return (i, Source::Degraded);
        }
    }
    (0, Source::Healthy)
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
                health_check_config: None,
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
            &RoundRobin::default(),
            Settings::default(),
        );
        assert_eq!(picks(&set, 400), [0, 300, 100, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn lower_priority_takes_over_when_higher_is_unhealthy_and_panic_spreads_over_all() {
        use HealthStatus::*;
        let set = PrioritySet::new(
            vec![host(1, 1, Unhealthy, 0), host(2, 1, Healthy, 1)],
            &RoundRobin::default(),
            Settings::default(),
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
            &RoundRobin::default(),
            Settings::default(),
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
            &RoundRobin::default(),
            Settings::default(),
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
            &RoundRobin::default(),
            Settings::default(),
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
            &RoundRobin::default(),
            Settings::default(),
        );
        assert_eq!(short.healthy_load, vec![46]);
        assert_eq!(short.degraded_load, vec![54]);
        let counts = picks(&short, 2000);
        assert!(counts[2] > 0 && counts[3] > 0, "{counts:?}");
        assert!((800..1050).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn consistent_hashing_uses_healthy_hosts_only_as_envoy_does() {
        use HealthStatus::*;
        let ring = crate::upstream::lb::RingHash::new(
            &crate::config::RingHash {
                minimum_ring_size: 64,
                maximum_ring_size: 1024,
                hash_function: crate::config::HashFunction::XxHash,
                hash_policies: Vec::new(),
            },
            false,
        );
        let set = PrioritySet::new(
            vec![
                host(1, 1, Healthy, 0),
                host(2, 1, Degraded, 0),
                host(3, 1, Degraded, 0),
            ],
            &ring,
            Settings::default(),
        );
        // 46% healthy and 54% degraded load, but the ring is built over the healthy host.
        assert_eq!(set.degraded_count(), 2);
        for hash in 0..200u64 {
            let context = LbContext {
                hash: Some(hash.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                ..LbContext::default()
            };
            assert_eq!(set.choose(&context).unwrap().host.addr.port(), 1);
        }
    }

    #[test]
    fn the_panic_threshold_and_fail_traffic_on_panic_are_the_clusters() {
        use HealthStatus::*;
        let hosts = || {
            vec![
                host(1, 1, Healthy, 0),
                host(2, 1, Unhealthy, 0),
                host(3, 1, Unhealthy, 0),
            ]
        };
        let with = |panic_threshold, fail_traffic_on_panic| {
            PrioritySet::new(
                hosts(),
                &RoundRobin::default(),
                Settings {
                    panic_threshold,
                    fail_traffic_on_panic,
                    ..Settings::default()
                },
            )
        };
        // A third healthy: in panic under 50% (everyone), not under 33% (the healthy one).
        assert_eq!(picks(&with(50, false), 30), [0, 10, 10, 10, 0, 0, 0, 0]);
        assert_eq!(picks(&with(33, false), 30), [0, 30, 0, 0, 0, 0, 0, 0]);
        assert_eq!(picks(&with(0, false), 30), [0, 30, 0, 0, 0, 0, 0, 0]);
        assert!(with(50, true).choose(&LbContext::default()).is_none());
    }

    #[test]
    fn localities_are_picked_by_weight_times_usable_share() {
        use HealthStatus::*;
        let located = |port, health, zone: &str, weight| {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            Arc::new(Host::new(
                addr,
                &LbEndpoint {
                    address: EndpointAddress::Ip(addr),
                    hostname: String::new(),
                    weight: 1,
                    health,
                    priority: 0,
                    locality: Arc::new(crate::config::Locality {
                        zone: zone.into(),
                        ..Default::default()
                    }),
                    locality_weight: Some(weight),
                    health_check_config: None,
                },
                Arc::default(),
            ))
        };
        // Zone a (weight 1): one host. Zone b (weight 2): two hosts, one of them down, so its
        // usable share is 1/2 × 140% = 70%: effective weights 1 and 1.4.
        let set = PrioritySet::new(
            vec![
                located(1, Healthy, "a", 1),
                located(2, Healthy, "b", 2),
                located(3, Unhealthy, "b", 2),
            ],
            &RoundRobin::default(),
            Settings {
                locality_weighted: true,
                ..Settings::default()
            },
        );
        let counts = picks(&set, 1200);
        assert_eq!(counts[3], 0);
        assert_eq!((counts[1], counts[2]), (500, 700));
    }

    #[test]
    fn no_hosts_no_pick() {
        let set = PrioritySet::new(Vec::new(), &RoundRobin::default(), Settings::default());
        assert!(set.choose(&LbContext::default()).is_none());
        let all_down = PrioritySet::new(
            vec![host(1, 1, HealthStatus::Unhealthy, 0)],
            &RoundRobin::default(),
            Settings::default(),
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
