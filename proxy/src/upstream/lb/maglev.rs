//! MAGLEV: consistent hashing with a lookup table of prime size M (65537 by default), built as
//! Envoy builds it so that a hash key picks the same host as in Envoy. Hosts are sorted by
//! their hash key (`IP:PORT`); each has a permutation of the table, starting at
//! `xxHash64(key) mod M` and stepping by `xxHash64(key, seed 1) mod (M − 1) + 1`; they take
//! turns claiming the next free slot of their permutation, a host of lower weight skipping
//! turns in proportion, until the table is full. A key goes to slot `key mod M`.

use std::sync::Arc;

use rand::Rng;

use super::hashing::{Normalized, host_key, xxhash64};
use super::{LbContext, LoadBalancer, Picker};
use crate::config;
use crate::upstream::host::Host;

#[derive(Debug)]
pub struct Maglev {
    table_size: u64,
    locality_weighted: bool,
}

impl Maglev {
    pub fn new(config: &config::Maglev, locality_weighted: bool) -> Self {
        Maglev {
            table_size: config.table_size,
            locality_weighted,
        }
    }
}

impl LoadBalancer for Maglev {
    fn prepare(&self, hosts: &[Arc<Host>]) -> Box<dyn Picker> {
        Box::new(Table::build(
            hosts,
            &Normalized::of(hosts, self.locality_weighted),
            self.table_size,
        ))
    }

    fn consistent_hashing(&self) -> bool {
        true
    }
}

/// A built table: the host (by index) of every slot.
#[derive(Debug, Default)]
pub struct Table {
    slots: Vec<u32>,
}

/// One host's progress through its permutation while the table fills.
struct Builder {
    host: u32,
    offset: u64,
    skip: u64,
    weight: f64,
    /// The weight it must have accumulated to take its next turn.
    target: f64,
    next: u64,
}

impl Table {
    pub fn build(hosts: &[Arc<Host>], weights: &Normalized, size: u64) -> Table {
        if weights.weights.is_empty() || size == 0 {
            return Table::default();
        }
        let mut keyed: Vec<(String, usize, f64)> = weights
            .weights
            .iter()
            .map(|(index, weight)| (host_key(&hosts[*index]), *index, *weight))
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let mut builders: Vec<Builder> = keyed
            .iter()
            .map(|(key, index, weight)| Builder {
                host: *index as u32,
                offset: xxhash64(key.as_bytes(), 0) % size,
                skip: xxhash64(key.as_bytes(), 1) % (size - 1) + 1,
                weight: *weight,
                target: 0.0,
                next: 0,
            })
            .collect();
        const EMPTY: u32 = u32::MAX;
        let mut slots = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        let mut iteration = 1u64;
        while filled < size {
            for builder in &mut builders {
                if filled == size {
                    break;
                }
                // A host of the largest weight takes every turn; one of a third of it, every
                // third turn.
                if (iteration as f64) * builder.weight < builder.target {
                    continue;
                }
                builder.target += weights.max;
                let mut slot = (builder.offset + builder.skip * builder.next) % size;
                while slots[slot as usize] != EMPTY {
                    builder.next += 1;
                    slot = (builder.offset + builder.skip * builder.next) % size;
                }
                slots[slot as usize] = builder.host;
                builder.next += 1;
                filled += 1;
            }
            iteration += 1;
        }
        Table { slots }
    }

    /// The host for `hash`.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(hash % self.slots.len() as u64) as usize] as usize)
    }

    /// Slots per host (index), for tests and stats.
    pub fn slots_per_host(&self, hosts: usize) -> Vec<usize> {
        let mut counts = vec![0; hosts];
        for host in &self.slots {
            counts[*host as usize] += 1;
        }
        counts
    }
}

impl Picker for Table {
    fn pick(&self, _hosts: &[Arc<Host>], context: &LbContext<'_>) -> Option<usize> {
        let hash = context.hash.unwrap_or_else(|| rand::rng().random());
        self.lookup(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::hashing::tests_support::hosts;

    fn table(weights: &[u32], size: u64) -> (Vec<Arc<Host>>, Table) {
        let hosts = hosts(weights);
        let table = Table::build(&hosts, &Normalized::of(&hosts, false), size);
        (hosts, table)
    }

    #[test]
    fn the_table_is_full_and_shared_by_weight() {
        let (_, equal) = table(&[1, 1, 1], 65537);
        let counts = equal.slots_per_host(3);
        assert_eq!(counts.iter().sum::<usize>(), 65537);
        assert!(
            counts.iter().all(|c| (21845..=21846).contains(c)),
            "{counts:?}"
        );
        let (_, weighted) = table(&[1, 2], 65537);
        let counts = weighted.slots_per_host(2);
        assert!((21845..=21846).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn the_first_host_in_key_order_claims_its_offset_first() {
        // The hosts sort by key (10.0.0.1:80 < 10.0.0.2:80 < ...), so the first one's first
        // choice is always free.
        let (hosts, t) = table(&[1, 1, 1], 65537);
        let key = host_key(&hosts[0]);
        let offset = xxhash64(key.as_bytes(), 0) % 65537;
        assert_eq!(t.lookup(offset), Some(0));
        assert_eq!(
            t.lookup(offset + 65537),
            Some(0),
            "keys wrap by the table size"
        );
        let (_, small) = table(&[1, 1, 1], 7);
        assert_eq!(small.slots_per_host(3).iter().sum::<usize>(), 7);
        assert!(Table::default().lookup(3).is_none());
    }
}
