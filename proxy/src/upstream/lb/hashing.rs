//! What Envoy's consistent-hashing balancers share, so that a key lands on the same host as in
//! Envoy: a host's hash key (its address as `IP:PORT`, `[IPv6]:PORT`), host weights normalised
//! to sum to 1 (folding in locality weights when locality weighting is on, localities in
//! Envoy's order), xxHash64 and the 64-bit MurmurHash2 of libstdc++'s `std::hash`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::Locality;
use crate::upstream::host::Host;

/// xxHash64 of `bytes` with `seed` (Envoy's `HashUtil::xxHash64`).
pub fn xxhash64(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(bytes, seed)
}

/// The seed Envoy gives MurmurHash2 for ring entries (libstdc++'s `std::hash` seed).
pub const MURMUR_SEED: u64 = 0xc70f_6907;

/// 64-bit MurmurHash2 as libstdc++ computes `std::hash<std::string>` (Envoy's
/// `MurmurHash::murmurHash2`): 8-byte little-endian blocks, then the tail.
pub fn murmur2_64(bytes: &[u8], seed: u64) -> u64 {
    const MUL: u64 = 0xc6a4_a793_5bd1_e995;
    fn shift_mix(v: u64) -> u64 {
        v ^ (v >> 47)
    }
    let mut hash = seed ^ (bytes.len() as u64).wrapping_mul(MUL);
    let mut blocks = bytes.chunks_exact(8);
    for block in &mut blocks {
        let word = u64::from_le_bytes(block.try_into().expect("an 8-byte block"));
        hash ^= shift_mix(word.wrapping_mul(MUL)).wrapping_mul(MUL);
        hash = hash.wrapping_mul(MUL);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let word = tail
            .iter()
            .rev()
            .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
        hash ^= word;
        hash = hash.wrapping_mul(MUL);
    }
    hash = shift_mix(hash).wrapping_mul(MUL);
    shift_mix(hash)
}

/// A host's hash key: its address as Envoy prints it.
pub fn host_key(host: &Host) -> String {
    host.addr.to_string()
}

/// Hosts (by index into the list) with weights that sum to 1, and the smallest and largest
/// weight.
#[derive(Debug, Default)]
pub struct Normalized {
    pub weights: Vec<(usize, f64)>,
    pub min: f64,
    pub max: f64,
}

impl Normalized {
    /// Envoy's normalisation of a host list. Without locality weighting: each host's weight
    /// over the sum, in list order. With it: localities in order (region, zone, sub-zone), each
    /// locality's weight over the sum of locality weights times each of its hosts' weight over
    /// the locality's sum; hosts of localities without weight are left out, and if no locality
    /// has a weight, so is everyone.
    pub fn of(hosts: &[Arc<Host>], locality_weighted: bool) -> Self {
        let mut out = Normalized {
            weights: Vec::with_capacity(hosts.len()),
            min: 1.0,
            max: 0.0,
        };
        if !locality_weighted {
            out.add(hosts, 0..hosts.len(), 1.0);
            return out;
        }
        // Each locality: its weight and its hosts (indexes).
        let mut localities: BTreeMap<&Locality, (u32, Vec<usize>)> = BTreeMap::new();
        for (index, host) in hosts.iter().enumerate() {
            localities
                .entry(&host.locality)
                .or_insert((host.locality_weight.unwrap_or(0), Vec::new()))
                .1
                .push(index);
        }
        let total: u64 = localities.values().map(|(w, _)| u64::from(*w)).sum();
        if total == 0 {
            return out;
        }
        for (weight, members) in localities.values() {
            if *weight != 0 {
                out.add(
                    hosts,
                    members.iter().copied(),
                    f64::from(*weight) / total as f64,
                );
            }
        }
        out
    }

    /// Adds the hosts (indexes into `hosts`) sharing `share` of the total: one locality, or
    /// everything.
    fn add(
        &mut self,
        hosts: &[Arc<Host>],
        members: impl Iterator<Item = usize> + Clone,
        share: f64,
    ) {
        let sum: u64 = members.clone().map(|i| u64::from(hosts[i].weight)).sum();
        for index in members {
            // The same operations in the same order as Envoy, so the doubles come out equal.
            let weight = f64::from(hosts[index].weight) * share / sum as f64;
            self.weights.push((index, weight));
            self.min = self.min.min(weight);
            self.max = self.max.max(weight);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxhash64_is_the_reference_function() {
        // Published xxHash64 test vectors.
        assert_eq!(xxhash64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xxhash64(b"a", 0), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(xxhash64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
    }

    #[test]
    fn murmur2_64_matches_libstdcxx_std_hash() {
        // std::hash<std::string> printed by a program built with g++ (libstdc++, x86_64).
        let cases: [(&str, u64); 6] = [
            ("", 6142509188972423790),
            ("a", 4993892634952068459),
            ("hello world", 5577293430985752569),
            ("127.0.0.1:8080_0", 16027637164591516499),
            ("abcdefgh", 8664279048047335611),
            ("abcdefghi", 13036955925923793583),
        ];
        for (text, expected) in cases {
            assert_eq!(
                murmur2_64(text.as_bytes(), MURMUR_SEED),
                expected,
                "{text:?}"
            );
        }
    }
}

/// Hosts for the policies' unit tests.
#[cfg(test)]
pub mod tests_support {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use crate::config::{EndpointAddress, HealthStatus, LbEndpoint};
    use crate::upstream::host::Host;

    /// Hosts `10.0.0.N:80` (N from 1) with these weights.
    pub fn hosts(weights: &[u32]) -> Vec<Arc<Host>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, weight)| {
                let addr = SocketAddr::from(([10, 0, 0, i as u8 + 1], 80));
                Arc::new(Host::new(
                    addr,
                    &LbEndpoint {
                        address: EndpointAddress::Ip(addr),
                        hostname: String::new(),
                        weight: *weight,
                        health: HealthStatus::Healthy,
                        priority: 0,
                        locality: Arc::default(),
                        locality_weight: None,
                        health_check_config: None,
                    },
                    Arc::default(),
                ))
            })
            .collect()
    }
}
