//! The cost of one pick per load-balancing policy, at 10, 100 and 10,000 hosts: a pick through
//! the cluster's priority set (priority choice, then the policy's picker), as the router makes
//! it for every request. Also the cost of preparing a host list (building the schedule, ring or
//! table), which happens on every membership or health change.
//!
//! Run by `bench/lb pick` (or `cargo bench -p remora-proxy --bench lb_pick`). Each figure is
//! the median of 7 timed runs; prints a Markdown table, or JSON lines with `--json`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remora_config::load_balancing::{
    HashFunction, LbPolicy, LeastRequest, LoadBalancing, Maglev, PeakEwma, RingHash, RoundRobin,
};
use remora_proxy::config::{EndpointAddress, HealthStatus, LbEndpoint};
use remora_proxy::upstream::clock;
use remora_proxy::upstream::lb::{LbContext, policy};
use remora_proxy::upstream::priority::{PrioritySet, Settings};
use remora_proxy::upstream::{Host, HostState};

const SIZES: [usize; 3] = [10, 100, 10_000];
const RUNS: usize = 7;

fn hosts(count: usize, weighted: bool) -> Vec<Arc<Host>> {
    (0..count)
        .map(|i| {
            let addr = SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i as u32 + 1), 8080));
            let endpoint = LbEndpoint {
                address: EndpointAddress::Ip(addr),
                hostname: String::new(),
                weight: if weighted { (i % 4) as u32 + 1 } else { 1 },
                health: HealthStatus::Healthy,
                priority: 0,
                locality: Arc::default(),
                locality_weight: None,
                health_check_config: None,
            };
            Arc::new(Host::new(addr, &endpoint, Arc::new(HostState::default())))
        })
        .collect()
}

fn policies() -> Vec<(&'static str, LbPolicy, bool)> {
    vec![
        (
            "ROUND_ROBIN",
            LbPolicy::RoundRobin(RoundRobin::default()),
            false,
        ),
        (
            "ROUND_ROBIN weighted",
            LbPolicy::RoundRobin(RoundRobin::default()),
            true,
        ),
        (
            "LEAST_REQUEST",
            LbPolicy::LeastRequest(LeastRequest::default()),
            false,
        ),
        (
            "LEAST_REQUEST weighted",
            LbPolicy::LeastRequest(LeastRequest::default()),
            true,
        ),
        ("RANDOM", LbPolicy::Random, false),
        (
            "RING_HASH",
            LbPolicy::RingHash(RingHash {
                minimum_ring_size: 1024,
                maximum_ring_size: 8 << 20,
                hash_function: HashFunction::XxHash,
                hash_policies: Vec::new(),
            }),
            false,
        ),
        (
            "MAGLEV",
            LbPolicy::Maglev(Maglev {
                table_size: 65537,
                hash_policies: Vec::new(),
            }),
            false,
        ),
        ("PEAK_EWMA", LbPolicy::PeakEwma(PeakEwma::default()), false),
    ]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A cheap well-mixed sequence of hash keys (SplitMix64), so hashing policies see many keys.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let budget = Duration::from_millis(200);
    if !json {
        println!(
            "| policy | hosts | pick (ns, median of {RUNS}) | prepare (µs, median of {RUNS}) |"
        );
        println!("|---|---:|---:|---:|");
    }
    for (name, policy_config, weighted) in policies() {
        for size in SIZES {
            let hosts = hosts(size, weighted);
            let now = clock::now_micros();
            for (i, host) in hosts.iter().enumerate() {
                // Response times for the peak-EWMA policy, and a few requests in flight.
                host.state.latency.observe(
                    Duration::from_micros(200 + (i as u64 % 7) * 50),
                    now,
                    Duration::from_secs(10),
                );
                if i % 3 == 0 {
                    host.stats().rq_active.inc();
                }
            }
            let balancing = LoadBalancing {
                policy: policy_config.clone(),
                ..LoadBalancing::default()
            };
            let lb = policy(&balancing);
            let settings = Settings::default();
            // Prepare: the whole priority set (three lists: all, healthy, degraded).
            let mut prepare = Vec::with_capacity(RUNS);
            let mut set = None;
            for _ in 0..RUNS {
                let started = Instant::now();
                let built = PrioritySet::new(hosts.clone(), lb.as_ref(), settings);
                prepare.push(started.elapsed().as_secs_f64() * 1e6);
                set = Some(built);
            }
            let set = set.expect("built");
            // Picks: as many as fit the budget in the first run, the same count after.
            let mut count = 0u64;
            let started = Instant::now();
            while started.elapsed() < budget {
                for _ in 0..1000 {
                    let context = LbContext {
                        hash: Some(mix(count)),
                        ..LbContext::default()
                    };
                    black_box(set.choose(&context).map(|c| c.host.addr));
                    count += 1;
                }
            }
            let mut picks = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                let started = Instant::now();
                for i in 0..count {
                    let context = LbContext {
                        hash: Some(mix(i)),
                        ..LbContext::default()
                    };
                    black_box(set.choose(&context).map(|c| c.host.addr));
                }
                picks.push(started.elapsed().as_secs_f64() * 1e9 / count as f64);
            }
            let (pick, prepare) = (median(picks), median(prepare));
            if json {
                println!(
                    "{{\"policy\":\"{name}\",\"hosts\":{size},\"pick_ns\":{pick:.1},\"prepare_us\":{prepare:.1}}}"
                );
            } else {
                println!("| {name} | {size} | {pick:.0} | {prepare:.0} |");
            }
        }
    }
}
