//! ROUND_ROBIN: weighted, smooth (each host's turns spread out over the cycle rather than in a
//! run), as Envoy's weighted round robin sends 100/200/300/400 of 1,000 requests to hosts
//! weighted 1, 2, 3 and 4.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{LbContext, LoadBalancer, Picker};
use crate::upstream::host::Host;

#[derive(Debug, Default)]
pub struct RoundRobin;

impl LoadBalancer for RoundRobin {
    fn prepare(&self, hosts: &[Arc<Host>]) -> Box<dyn Picker> {
        Box::new(Schedule {
            order: schedule(hosts),
            next: AtomicUsize::new(0),
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

/// Smooth weighted round robin over the hosts, one full cycle, its length bounded by scaling
/// large weights down.
fn schedule(hosts: &[Arc<Host>]) -> Vec<usize> {
    if hosts.iter().all(|h| h.weight == hosts[0].weight) {
        return (0..hosts.len()).collect();
    }
    let total: i64 = hosts.iter().map(|h| i64::from(h.weight)).sum();
    let scale = (total / 4096).max(1);
    let weights: Vec<i64> = hosts
        .iter()
        .map(|h| (i64::from(h.weight) / scale).max(1))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (k, weight) in weights.iter().enumerate() {
            current[k] += weight;
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}
