//! RING_HASH: consistent hashing on a ring (ketama), built as Envoy builds it so that a hash
//! key picks the same host as in Envoy. The ring's size comes from the host weights: scaled so
//! the lightest host gets `ceil(min_weight × minimum_ring_size)` entries, capped at
//! `maximum_ring_size`; hosts in list order add entries while a running count stays below a
//! running target. Entry `i` of a host is the hash (xxHash64, or MurmurHash2) of
//! `"<IP:PORT>_<i>"`. A key goes to the first entry at or after it, wrapping round.

use std::sync::Arc;

use rand::Rng;

use super::hashing::{MURMUR_SEED, Normalized, host_key, murmur2_64, xxhash64};
use super::{LbContext, LoadBalancer, Picker};
use crate::config::{self, HashFunction};
use crate::upstream::host::Host;

#[derive(Debug)]
pub struct RingHash {
    minimum_ring_size: u64,
    maximum_ring_size: u64,
    hash_function: HashFunction,
    locality_weighted: bool,
}

impl RingHash {
    pub fn new(config: &config::RingHash, locality_weighted: bool) -> Self {
        RingHash {
            minimum_ring_size: config.minimum_ring_size,
            maximum_ring_size: config.maximum_ring_size,
            hash_function: config.hash_function,
            locality_weighted,
        }
    }
}

impl LoadBalancer for RingHash {
    fn prepare(&self, hosts: &[Arc<Host>]) -> Box<dyn Picker> {
        Box::new(Ring::build(
            hosts,
            &Normalized::of(hosts, self.locality_weighted),
            self.minimum_ring_size,
            self.maximum_ring_size,
            self.hash_function,
        ))
    }

    fn consistent_hashing(&self) -> bool {
        true
    }
}

/// A built ring: entries sorted by hash, each naming a host by index.
#[derive(Debug, Default)]
pub struct Ring {
    entries: Vec<(u64, u32)>,
}

impl Ring {
    pub fn build(
        hosts: &[Arc<Host>],
        weights: &Normalized,
        minimum_ring_size: u64,
        maximum_ring_size: u64,
        hash_function: HashFunction,
    ) -> Ring {
        if weights.weights.is_empty() {
            return Ring::default();
        }
        let min = weights.min;
        // Enough entries that the lightest host gets a whole number of them.
        let scale = ((min * minimum_ring_size as f64).ceil() / min).min(maximum_ring_size as f64);
        let mut entries = Vec::with_capacity(scale.ceil() as usize);
        let mut current = 0.0f64;
        let mut target = 0.0f64;
        let mut key = String::new();
        for (index, weight) in &weights.weights {
            key.clear();
            key.push_str(&host_key(&hosts[*index]));
            key.push('_');
            let prefix = key.len();
            target += scale * weight;
            let mut i = 0u64;
            while current < target {
                key.truncate(prefix);
                key.push_str(&i.to_string());
                let hash = match hash_function {
                    HashFunction::XxHash => xxhash64(key.as_bytes(), 0),
                    HashFunction::MurmurHash2 => murmur2_64(key.as_bytes(), MURMUR_SEED),
                };
                entries.push((hash, *index as u32));
                i += 1;
                current += 1.0;
            }
        }
        entries.sort_unstable_by_key(|(hash, _)| *hash);
        Ring { entries }
    }

    /// The host for `hash`: the first entry at or after it, wrapping round.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let at = self.entries.partition_point(|(entry, _)| *entry < hash);
        let (_, host) = self.entries[if at == self.entries.len() { 0 } else { at }];
        Some(host as usize)
    }

    /// Entries per host (index), for tests and stats.
    pub fn entries_per_host(&self, hosts: usize) -> Vec<usize> {
        let mut counts = vec![0; hosts];
        for (_, host) in &self.entries {
            counts[*host as usize] += 1;
        }
        counts
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Picker for Ring {
    fn pick(&self, _hosts: &[Arc<Host>], context: &LbContext<'_>) -> Option<usize> {
        // Without a hash key the ring picks at random, as Envoy's does.
        let hash = context.hash.unwrap_or_else(|| rand::rng().random());
        self.lookup(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::hashing::tests_support::hosts;

    fn ring(
        weights: &[u32],
        minimum: u64,
        maximum: u64,
        function: HashFunction,
    ) -> (Vec<Arc<Host>>, Ring) {
        let hosts = hosts(weights);
        let ring = Ring::build(
            &hosts,
            &Normalized::of(&hosts, false),
            minimum,
            maximum,
            function,
        );
        (hosts, ring)
    }

    #[test]
    fn ring_sizes_follow_envoy() {
        // Four equal hosts with the default sizes: 256 entries each; three: 342 each (the
        // ring grows so that each gets a whole number).
        let (_, four) = ring(&[1, 1, 1, 1], 1024, 8 << 20, HashFunction::XxHash);
        assert_eq!(four.entries_per_host(4), [256; 4]);
        let (_, three) = ring(&[1, 1, 1], 1024, 8 << 20, HashFunction::XxHash);
        assert_eq!(three.entries_per_host(3), [342; 3]);
        // Weights 1 and 3: the light host gets ceil(0.25 × 1024) = 256, the heavy one 768.
        let (_, weighted) = ring(&[1, 3], 1024, 8 << 20, HashFunction::XxHash);
        assert_eq!(weighted.entries_per_host(2), [256, 768]);
        // Capped by the maximum: 6 entries for 4 hosts, handed out by running totals.
        let (_, capped) = ring(&[1, 1, 1, 1], 1024, 6, HashFunction::XxHash);
        assert_eq!(capped.entries_per_host(4), [2, 1, 2, 1]);
    }

    #[test]
    fn entries_are_hashes_of_address_and_index_and_lookup_wraps() {
        let (hosts, ring) = ring(&[1, 1], 4, 4, HashFunction::XxHash);
        let first = xxhash64(format!("{}_0", hosts[0].addr).as_bytes(), 0);
        assert!(ring.entries.contains(&(first, 0)));
        let (smallest, owner) = ring.entries[0];
        let (largest, _) = *ring.entries.last().unwrap();
        assert_eq!(ring.lookup(smallest), Some(owner as usize));
        assert_eq!(ring.lookup(smallest - 1), Some(owner as usize));
        assert_eq!(
            ring.lookup(largest + 1),
            Some(owner as usize),
            "wraps to the start"
        );
        let (_, murmur) = self::ring(&[1, 1], 4, 4, HashFunction::MurmurHash2);
        let first = murmur2_64(format!("{}_0", hosts[0].addr).as_bytes(), MURMUR_SEED);
        assert!(murmur.entries.contains(&(first, 0)));
        assert!(Ring::default().lookup(1).is_none());
    }
}
