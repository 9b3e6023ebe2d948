//! LEAST_REQUEST, as Envoy's: with equal weights, the host with the fewest requests in flight
//! among `choice_count` hosts sampled at random (or among all of them with `FULL_SCAN`); with
//! unequal weights (or hosts in slow start), weighted round robin over
//! `weight / (in flight + 1)^active_request_bias`, each host's weight taken as it is at its
//! turn.

use std::sync::{Arc, Mutex};

use rand::Rng;

use super::edf::Edf;
use super::{LbContext, LoadBalancer, Picker, slow_start};
use crate::config;
use crate::upstream::clock;
use crate::upstream::host::Host;

#[derive(Debug)]
pub struct LeastRequest {
    config: config::LeastRequest,
}

impl LeastRequest {
    pub fn new(config: config::LeastRequest) -> Self {
        LeastRequest { config }
    }
}

impl LoadBalancer for LeastRequest {
    fn prepare(&self, hosts: &[Arc<Host>]) -> Box<dyn Picker> {
        let equal = hosts.iter().all(|h| h.weight == hosts[0].weight);
        let ramping = self
            .config
            .slow_start
            .is_some_and(|slow| slow_start::any_in_window(&slow, hosts, clock::now_micros()));
        if (equal && !ramping) || hosts.len() <= 1 {
            return Box::new(Fewest {
                choices: (!self.config.full_scan).then_some(self.config.choice_count),
            });
        }
        let weigher = Weigher {
            config: self.config,
        };
        let now = clock::now_micros();
        let edf = Edf::new(
            hosts
                .iter()
                .enumerate()
                .map(|(index, host)| (index, weigher.weight(host, now))),
        );
        Box::new(Weighted {
            weigher,
            edf: Mutex::new(edf),
        })
    }
}

/// A host's requests in flight (Envoy's `rq_active`).
pub fn active(host: &Host) -> u64 {
    host.stats().rq_active.get()
}

/// Equal weights: the fewest requests in flight among `choices` random hosts, or among all.
#[derive(Debug)]
struct Fewest {
    /// `None`: every host (full scan).
    choices: Option<u32>,
}

impl Picker for Fewest {
    fn pick(&self, hosts: &[Arc<Host>], _context: &LbContext<'_>) -> Option<usize> {
        if hosts.is_empty() {
            return None;
        }
        let mut rng = rand::rng();
        match self.choices {
            Some(choices) => {
                let mut best = rng.random_range(0..hosts.len());
                for _ in 1..choices {
                    let sampled = rng.random_range(0..hosts.len());
                    if active(&hosts[sampled]) < active(&hosts[best]) {
                        best = sampled;
                    }
                }
                Some(best)
            }
            None => {
                // The least loaded host; ties broken uniformly (reservoir sampling).
                let mut best = 0;
                let mut tied = 1u64;
                for index in 1..hosts.len() {
                    let (candidate, current) = (active(&hosts[index]), active(&hosts[best]));
                    if candidate < current {
                        best = index;
                        tied = 1;
                    } else if candidate == current {
                        tied += 1;
                        if rng.random_range(0..tied) == 0 {
                            best = index;
                        }
                    }
                }
                Some(best)
            }
        }
    }
}

/// A host's weight at a pick.
#[derive(Debug, Clone, Copy)]
struct Weigher {
    config: config::LeastRequest,
}

impl Weigher {
    fn weight(&self, host: &Host, now: u64) -> f64 {
        let in_flight = active(host).saturating_add(1) as f64;
        let bias = self.config.active_request_bias;
        let base = f64::from(host.weight);
        let weight = if bias == 1.0 {
            base / in_flight
        } else if bias == 0.0 {
            base
        } else {
            base / in_flight.powf(bias)
        };
        match &self.config.slow_start {
            Some(slow) => weight * slow_start::factor(slow, host, now),
            None => weight,
        }
    }
}

#[derive(Debug)]
struct Weighted {
    weigher: Weigher,
    edf: Mutex<Edf>,
}

impl Picker for Weighted {
    fn pick(&self, hosts: &[Arc<Host>], _context: &LbContext<'_>) -> Option<usize> {
        let now = clock::now_micros();
        let mut edf = self.edf.lock().unwrap_or_else(|p| p.into_inner());
        edf.pick_and_add(|index| {
            hosts
                .get(index)
                .map_or(0.0, |host| self.weigher.weight(host, now))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::hashing::tests_support::hosts;

    fn counts(picker: &dyn Picker, hosts: &[Arc<Host>], n: usize) -> Vec<usize> {
        let mut counts = vec![0; hosts.len()];
        for _ in 0..n {
            counts[picker.pick(hosts, &LbContext::default()).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn equal_weights_pick_the_least_loaded_of_the_choices() {
        let hosts = hosts(&[1, 1, 1]);
        for _ in 0..3 {
            hosts[0].stats().rq_active.inc();
        }
        // A full scan never picks the loaded host; two choices pick it only when both
        // samples are it (1 in 9).
        let full = LeastRequest::new(config::LeastRequest {
            full_scan: true,
            ..Default::default()
        })
        .prepare(&hosts);
        assert_eq!(counts(full.as_ref(), &hosts, 300)[0], 0);
        let two = LeastRequest::new(config::LeastRequest::default()).prepare(&hosts);
        let loaded = counts(two.as_ref(), &hosts, 900)[0];
        assert!((50..=150).contains(&loaded), "{loaded}");
    }

    #[test]
    fn unequal_weights_follow_envoys_active_request_bias_formula() {
        let hosts = hosts(&[2, 1]);
        // Host 0 (weight 2) has 3 requests in flight: 2 / (3 + 1)^bias.
        for _ in 0..3 {
            hosts[0].stats().rq_active.inc();
        }
        let share = |bias: f64| {
            let picker = LeastRequest::new(config::LeastRequest {
                active_request_bias: bias,
                ..Default::default()
            })
            .prepare(&hosts);
            counts(picker.as_ref(), &hosts, 600)[0]
        };
        // bias 1: weights 0.5 and 1 → a third; bias 0: weights 2 and 1 → two thirds;
        // bias 0.5: 2 / 2 = 1 and 1 → a half.
        assert!((195..=205).contains(&share(1.0)), "{}", share(1.0));
        assert!((395..=405).contains(&share(0.0)), "{}", share(0.0));
        assert!((295..=305).contains(&share(0.5)), "{}", share(0.5));
    }
}
