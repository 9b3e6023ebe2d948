//! Remora's latency-aware policy (`remora.load_balancing_policies.peak_ewma`): each host keeps a
//! peak-sensitive, exponentially weighted moving average of its response time; a pick samples
//! two (or `choice_count`) distinct hosts at random and takes the one whose average times its
//! requests in flight plus one is lowest — the balancer of Finagle and Linkerd.
//!
//! Peak-sensitive: a response slower than the current average replaces it at once, so a host
//! that slows down loses traffic on its next answer; faster responses pull the average down
//! gradually. The average also decays towards zero while a host gets no answers, so a host
//! that was shunned is tried again after a while; a host that never answered yet is tried
//! first. The router feeds the averages through
//! [`crate::upstream::Cluster::record_response_time`].

use std::sync::Arc;

use rand::Rng;

use super::least_request::active;
use super::{LbContext, LoadBalancer, Picker};
use crate::config;
use crate::upstream::clock;
use crate::upstream::host::Host;

#[derive(Debug)]
pub struct PeakEwma {
    config: config::PeakEwma,
}

impl PeakEwma {
    pub fn new(config: config::PeakEwma) -> Self {
        PeakEwma { config }
    }
}

impl LoadBalancer for PeakEwma {
    fn prepare(&self, _hosts: &[Arc<Host>]) -> Box<dyn Picker> {
        Box::new(TwoChoices {
            config: self.config,
        })
    }
}

#[derive(Debug)]
struct TwoChoices {
    config: config::PeakEwma,
}

impl TwoChoices {
    /// A host's cost now: its average times its requests in flight plus one. A host that has
    /// not answered yet costs nothing while idle, so that a new host is tried at once (as
    /// Finagle does), and the default response time while it has requests in flight.
    fn cost(&self, host: &Host, now: u64) -> f64 {
        let in_flight = active(host);
        match host.state.latency.estimate(now, self.config.decay) {
            Some(latency) => latency * (in_flight + 1) as f64,
            None if in_flight == 0 => 0.0,
            None => self.config.default_rtt.as_nanos() as f64 * (in_flight + 1) as f64,
        }
    }
}

impl Picker for TwoChoices {
    fn pick(&self, hosts: &[Arc<Host>], _context: &LbContext<'_>) -> Option<usize> {
        match hosts.len() {
            0 => None,
            1 => Some(0),
            len => {
                let now = clock::now_micros();
                let mut rng = rand::rng();
                let choices = (self.config.choice_count as usize).min(len);
                // Distinct samples by Floyd's algorithm; on the stack for up to 8 choices.
                let mut stack = [0usize; 8];
                let mut heap = Vec::new();
                let sampled: &mut [usize] = if choices <= stack.len() {
                    &mut stack[..choices]
                } else {
                    heap.resize(choices, 0);
                    &mut heap
                };
                for (taken, upper) in ((len - choices)..len).enumerate() {
                    let candidate = rng.random_range(0..=upper);
                    sampled[taken] = if sampled[..taken].contains(&candidate) {
                        upper
                    } else {
                        candidate
                    };
                }
                let mut best = sampled[0];
                let mut best_cost = self.cost(&hosts[best], now);
                for index in sampled[1..].iter().copied() {
                    let cost = self.cost(&hosts[index], now);
                    if cost < best_cost {
                        (best, best_cost) = (index, cost);
                    }
                }
                Some(best)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::lb::hashing::tests_support::hosts;

    const DECAY: Duration = Duration::from_secs(10);

    #[test]
    fn picks_avoid_the_slow_host_and_the_loaded_one() {
        let hosts = hosts(&[1, 1, 1]);
        let now = clock::now_micros();
        hosts[0]
            .state
            .latency
            .observe(Duration::from_millis(20), now, DECAY);
        hosts[1]
            .state
            .latency
            .observe(Duration::from_millis(1), now, DECAY);
        hosts[2]
            .state
            .latency
            .observe(Duration::from_millis(1), now, DECAY);
        let picker = PeakEwma::new(config::PeakEwma::default()).prepare(&hosts);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[picker.pick(&hosts, &LbContext::default()).unwrap()] += 1;
        }
        // Two distinct choices: the slow host loses every comparison.
        assert_eq!(counts[0], 0, "{counts:?}");
        // Host 1 with 30 requests in flight costs more than the slow host's 20 ms.
        for _ in 0..30 {
            hosts[1].stats().rq_active.inc();
        }
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[picker.pick(&hosts, &LbContext::default()).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0, "{counts:?}");
        assert!(counts[0] > 0 && counts[2] > counts[0], "{counts:?}");
    }
}
