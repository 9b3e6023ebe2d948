//! ROUND_ROBIN: weighted, smooth (each host's turns spread out over the cycle rather than in a
//! run), as Envoy's weighted round robin sends 100/200/300/400 of 1,000 requests to hosts
//! weighted 1, 2, 3 and 4. One cycle of turns is laid out when the host list changes; with
//! slow start, weights change over time, so picks follow an earliest-deadline-first schedule
//! that takes each host's weight as it is at its turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::edf::Edf;
use super::{LbContext, LoadBalancer, Picker, slow_start};
use crate::config::SlowStart;
use crate::upstream::clock;
use crate::upstream::host::Host;

#[derive(Debug, Default)]
pub struct RoundRobin {
    slow_start: Option<SlowStart>,
}

impl RoundRobin {
    pub fn new(slow_start: Option<SlowStart>) -> Self {
        RoundRobin { slow_start }
    }
}

impl LoadBalancer for RoundRobin {
    fn prepare(&self, hosts: &[Arc<Host>]) -> Box<dyn Picker> {
        if let Some(config) = self.slow_start {
            return Box::new(SlowStartSchedule::new(config, hosts));
        }
        match schedule(hosts) {
            Some(order) => Box::new(Schedule {
                order,
                next: AtomicUsize::new(0),
            }),
            // Weights too large to lay out one cycle: schedule at pick time.
            None => Box::new(Dynamic(Mutex::new(Edf::new(
                hosts
                    .iter()
                    .enumerate()
                    .map(|(index, host)| (index, f64::from(host.weight))),
            )))),
        }
    }
}

/// The longest cycle laid out in advance (total weight); above it, picks follow a schedule
/// kept under a lock.
const MAX_CYCLE: u64 = 1 << 16;

/// Weighted round robin scheduled at pick time (very large weights).
#[derive(Debug)]
struct Dynamic(Mutex<Edf>);

impl Picker for Dynamic {
    fn pick(&self, hosts: &[Arc<Host>], _context: &LbContext<'_>) -> Option<usize> {
        let mut edf = self.0.lock().unwrap_or_else(|p| p.into_inner());
        edf.pick_and_add(|index| hosts.get(index).map_or(0.0, |h| f64::from(h.weight)))
    }
}

/// Round robin over weights scaled by slow start.
#[derive(Debug)]
struct SlowStartSchedule {
    config: SlowStart,
    edf: Mutex<Edf>,
}

impl SlowStartSchedule {
    fn new(config: SlowStart, hosts: &[Arc<Host>]) -> Self {
        let now = clock::now_micros();
        let edf = Edf::new(hosts.iter().enumerate().map(|(index, host)| {
            (
                index,
                f64::from(host.weight) * slow_start::factor(&config, host, now),
            )
        }));
        SlowStartSchedule {
            config,
            edf: Mutex::new(edf),
        }
    }
}

impl Picker for SlowStartSchedule {
    fn pick(&self, hosts: &[Arc<Host>], _context: &LbContext<'_>) -> Option<usize> {
        let now = clock::now_micros();
        let mut edf = self.edf.lock().unwrap_or_else(|p| p.into_inner());
        edf.pick_and_add(|index| {
            hosts.get(index).map_or(0.0, |host| {
                f64::from(host.weight) * slow_start::factor(&self.config, host, now)
            })
        })
    }
}

/// Host indexes in the order they take turns, each as often as its weight says.
#[derive(Debug)]
struct Schedule {
    order: Vec<usize>,
    next: AtomicUsize,
}

impl Picker for Schedule {
    fn pick(&self, _hosts: &[Arc<Host>], _context: &LbContext<'_>) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.order.get(n % self.order.len()).copied()
    }
}

/// One full cycle of host indexes, each as often as its weight, spread out (the earliest-
/// deadline-first order: host `i` is due every `1 / weight` of the cycle); `None` when the
/// weights add up to more than [`MAX_CYCLE`].
fn schedule(hosts: &[Arc<Host>]) -> Option<Vec<usize>> {
    if hosts.iter().all(|h| h.weight == hosts[0].weight) {
        return Some((0..hosts.len()).collect());
    }
    let total: u64 = hosts.iter().map(|h| u64::from(h.weight)).sum();
    if total > MAX_CYCLE {
        return None;
    }
    let weight = |index: usize| f64::from(hosts[index].weight);
    let mut edf = Edf::new((0..hosts.len()).map(|index| (index, weight(index))));
    Some(
        (0..total)
            .filter_map(|_| edf.pick_and_add(weight))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::hashing::tests_support::hosts;
    use std::time::Duration;

    fn counts(picker: &dyn Picker, hosts: &[Arc<Host>], n: usize) -> Vec<usize> {
        let mut counts = vec![0; hosts.len()];
        for _ in 0..n {
            counts[picker.pick(hosts, &LbContext::default()).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn weights_share_exactly_over_a_cycle() {
        let hosts = hosts(&[1, 2, 3, 4]);
        let picker = RoundRobin::default().prepare(&hosts);
        assert_eq!(counts(picker.as_ref(), &hosts, 1000), [100, 200, 300, 400]);
        // Turns are spread out: the heaviest host never takes three in a row.
        let order = schedule(&hosts).unwrap();
        assert_eq!(order.len(), 10);
        assert!(
            !order.windows(3).any(|w| w.iter().all(|i| *i == 3)),
            "{order:?}"
        );
        // Weights too large to lay out: the same shares, scheduled at pick time.
        let heavy = self::hosts(&[40_000, 80_000]);
        assert!(schedule(&heavy).is_none());
        let picker = RoundRobin::default().prepare(&heavy);
        assert_eq!(counts(picker.as_ref(), &heavy, 300), [100, 200]);
    }

    #[test]
    fn a_host_in_slow_start_gets_its_ramped_share() {
        let hosts = hosts(&[1, 1]);
        let now = clock::now_micros();
        // Host 0 has been there for long; host 1 joined a quarter of the window ago.
        hosts[0].state.set_usable_since(0);
        hosts[1].state.set_usable_since(now - 2_500_000);
        let slow = SlowStart {
            window: Duration::from_secs(10),
            aggression: 1.0,
            min_weight: 0.1,
        };
        let picker = RoundRobin::new(Some(slow)).prepare(&hosts);
        let shares = counts(picker.as_ref(), &hosts, 500);
        // Weights 1 and 0.25 (a little more as time passes): host 1 gets about a fifth.
        assert!((95..=110).contains(&shares[1]), "{shares:?}");
        // Out of its window it is an equal again.
        hosts[1].state.set_usable_since(0);
        let picker = RoundRobin::new(Some(slow)).prepare(&hosts);
        assert_eq!(counts(picker.as_ref(), &hosts, 500), [250, 250]);
    }
}
