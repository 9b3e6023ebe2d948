//! RANDOM: a host chosen uniformly at random. Weights are ignored, as Envoy's random balancer
//! ignores them.

use std::sync::Arc;

use rand::Rng;

use super::{LbContext, LoadBalancer, Picker};
use crate::upstream::host::Host;

#[derive(Debug, Default)]
pub struct Random;

impl LoadBalancer for Random {
    fn prepare(&self, _hosts: &[Arc<Host>]) -> Box<dyn Picker> {
        Box::new(Random)
    }
}

impl Picker for Random {
    fn pick(&self, hosts: &[Arc<Host>], _context: &LbContext<'_>) -> Option<usize> {
        (!hosts.is_empty()).then(|| rand::rng().random_range(0..hosts.len()))
    }
}
