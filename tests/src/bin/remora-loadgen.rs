//! `remora-loadgen`: an open-loop, fixed-rate HTTP/1.1 latency client for `bench/`.
//!
//! wrk is closed-loop (a slow reply delays the next request, hiding the stall: coordinated
//! omission) and wrk2 is not packaged here; h2load's `--rate` paces connections, not requests,
//! and prints no percentiles. So this sends requests on a fixed schedule over keep-alive
//! connections and reports p50/p90/p99/p99.9 as one JSON line.
//!
//! Latency clock: a request that is on time starts its clock when it is actually written (so
//! the runtime's 1 ms timer granularity adds no false latency); a request whose connection was
//! still busy at its scheduled time starts its clock at the scheduled time, so queueing behind
//! a slow reply is counted, as wrk2 does.
//!
//! Several `--url`s interleave: time is cut into slices of `--slice` seconds, in rounds of N
//! slices, one per target, each target with its own connections (so one target's slow reply
//! never delays another's request). Comparing two proxies this way puts both under the same
//! stretch of machine noise, down to the slice (5 ms by default: shorter than the host's
//! stalls); the JSON line then holds one summary per URL. Each target then gets `--rate`
//! during its own slices only: with N targets, rate/N on average. The order within a round is
//! shuffled, round by round: in a fixed order, one binary measured some 7% slower at p50 in
//! first place, after the last target's slice, than in second (bench/README.md), so each
//! target now takes every place, after every other, alike.
//!
//! `completed` counts every reply read whole, warm-up included: what the target served while
//! this ran, the divisor for its CPU time. `slowest_us` holds the slowest hundredth of the
//! recorded latencies, slowest first: enough for a caller to pool several runs and read their
//! p99.9 exactly (bench.py's `pooled_percentile`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "Open-loop fixed-rate HTTP/1.1 latency client (JSON summary on stdout)")]
struct Args {
    /// Target, `http://HOST:PORT/PATH` (plain HTTP/1.1 only); repeat to interleave targets.
    #[arg(long, required = true)]
    url: Vec<String>,
    /// With several URLs: seconds each target has the schedule before the next takes over.
    #[arg(long, default_value_t = 0.005)]
    slice: f64,
    /// Requests per second across all connections.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Keep-alive connections (per target); the schedule is spread round-robin over them.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Measured seconds (after the warm-up), shared by all targets.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds sent at the same rate but not recorded (connection setup, pool warm-up).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
}

/// The global send schedule: request `i` is due at `start + i * interval`.
#[derive(Clone, Copy)]
struct Schedule {
    interval: Duration,
    start: Instant,
    /// Requests due before this are warm-up and not recorded.
    record_from: Instant,
    end: Instant,
    slice: Duration,
    targets: u32,
}

impl Schedule {
    /// Which target the request due at `due` goes to: slice `k` is place `k mod N` of round
    /// `k / N`, whose order is a shuffle drawn from the round's number (the same in every
    /// connection task, with no state shared between them).
    fn target_at(&self, due: Instant) -> u32 {
        if self.targets == 1 {
            return 0;
        }
        let slice = ((due - self.start).as_secs_f64() / self.slice.as_secs_f64()) as u64;
        let targets = u64::from(self.targets);
        round_order(slice / targets, self.targets)[(slice % targets) as usize]
    }
}

/// Round `round`'s order of the targets `0..targets` (at most [`MAX_TARGETS`]): a Fisher-Yates
/// shuffle driven by splitmix64 of the round number.
fn round_order(round: u64, targets: u32) -> [u32; MAX_TARGETS] {
    let mut order: [u32; MAX_TARGETS] = std::array::from_fn(|i| i as u32);
    let mut state = round;
    for last in (1..targets as usize).rev() {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^= mixed >> 31;
        order.swap(last, (mixed % (last as u64 + 1)) as usize);
    }
    order
}

/// Targets one run may interleave.
const MAX_TARGETS: usize = 16;

/// What one connection task saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    completed: u64,
    errors: u64,
}

fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("no host in {url}");
    }
    Ok((authority.to_string(), path.to_string()))
}

async fn connect(authority: &str) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn one_request(
    sender: &mut http1::SendRequest<Empty<Bytes>>,
    authority: &str,
    path: &str,
) -> anyhow::Result<()> {
    sender.ready().await?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let ok = response.status().is_success();
    // Read the whole body: the reply is complete only when its last byte is in.
    response.into_body().collect().await?;
    if !ok {
        bail!("non-2xx status");
    }
    Ok(())
}

/// Runs the requests `first, first + step, first + 2*step, ...` of the global schedule that
/// fall in `target`'s slices.
async fn connection_task(
    authority: String,
    path: String,
    target: u32,
    first: u64,
    step: u64,
    schedule: Schedule,
) -> Tally {
    let mut tally = Tally::default();
    let mut sender = None;
    let mut index = first;
    loop {
        let scheduled = schedule.start + schedule.interval.mul_f64(index as f64);
        if scheduled >= schedule.end {
            break;
        }
        index += step;
        if schedule.target_at(scheduled) != target {
            continue;
        }
        let clock_from = if scheduled > Instant::now() {
            tokio::time::sleep_until(scheduled.into()).await;
            Instant::now()
        } else {
            scheduled
        };
        if sender.is_none() {
            match connect(&authority).await {
                Ok(new) => sender = Some(new),
                Err(_) => {
                    tally.errors += 1;
                    continue;
                }
            }
        }
        let Some(live) = sender.as_mut() else {
            continue;
        };
        let result = one_request(live, &authority, &path).await;
        let elapsed = clock_from.elapsed();
        tally.completed += u64::from(result.is_ok());
        match result {
            Ok(()) if scheduled >= schedule.record_from => tally
                .latencies_us
                .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)),
            Ok(()) => {}
            Err(_) => {
                tally.errors += 1;
                // A failed exchange may leave the connection unusable; redial next time.
                sender = None;
            }
        }
    }
    tally
}

fn percentile(sorted: &[u32], fraction: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * fraction).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The slowest 1% of `sorted` (at least one value when it is not empty), slowest first.
fn slowest_hundredth(sorted: &[u32]) -> Vec<u32> {
    let kept = sorted.len().div_ceil(100);
    sorted[sorted.len() - kept..]
        .iter()
        .rev()
        .copied()
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate == 0 || args.connections == 0 {
        bail!("--rate and --connections must be positive");
    }
    if !args.slice.is_finite() || args.slice <= 0.0 {
        bail!("--slice must be positive");
    }
    let targets = args
        .url
        .iter()
        .map(|url| split_url(url))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if targets.len() > MAX_TARGETS {
        bail!("at most {MAX_TARGETS} --url targets");
    }
    // One thread, like the proxy under test: the client should take one core at most.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let tallies = runtime.block_on(async {
        // Start slightly in the future so every task is spawned before its first slot.
        let start = Instant::now() + Duration::from_millis(20);
        let record_from = start + Duration::from_secs_f64(args.warmup);
        let schedule = Schedule {
            interval,
            start,
            record_from,
            end: record_from + Duration::from_secs_f64(args.duration),
            slice: Duration::from_secs_f64(args.slice),
            targets: targets.len() as u32,
        };
        let mut tasks = Vec::new();
        for (target, (authority, path)) in targets.iter().enumerate() {
            for connection in 0..args.connections {
                let task = tokio::spawn(connection_task(
                    authority.clone(),
                    path.clone(),
                    target as u32,
                    u64::from(connection),
                    u64::from(args.connections),
                    schedule,
                ));
                tasks.push((target, task));
            }
        }
        let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
        for (target, task) in tasks {
            let tally = task.await?;
            tallies[target].errors += tally.errors;
            tallies[target].completed += tally.completed;
            tallies[target].latencies_us.extend(tally.latencies_us);
        }
        anyhow::Ok(tallies)
    })?;
    let summaries: Vec<serde_json::Value> = tallies
        .into_iter()
        .zip(&args.url)
        .map(|(mut tally, url)| {
            let latencies = &mut tally.latencies_us;
            latencies.sort_unstable();
            serde_json::json!({
                "url": url,
                "rate": args.rate,
                "connections": args.connections,
                "duration_s": args.duration,
                "recorded": latencies.len(),
                "completed": tally.completed,
                "errors": tally.errors,
                "p50_us": percentile(latencies, 0.50),
                "p90_us": percentile(latencies, 0.90),
                "p99_us": percentile(latencies, 0.99),
                "p999_us": percentile(latencies, 0.999),
                "max_us": latencies.last().copied().unwrap_or(0),
                "slowest_us": slowest_hundredth(latencies),
            })
        })
        .collect();
    match summaries.as_slice() {
        [one] => println!("{one}"),
        _ => println!("{}", serde_json::json!({ "targets": summaries })),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every round is an order of all targets, and over many rounds each target takes each
    /// place, and follows each other target, about equally often.
    #[test]
    fn rounds_shuffle_places_and_neighbours_evenly() {
        let targets = 4;
        let rounds = 4_000;
        let mut places = [[0u32; 4]; 4];
        let mut follows = [[0u32; 4]; 4];
        let mut last = None;
        for round in 0..rounds {
            let order = round_order(round, targets);
            let mut seen = order[..4].to_vec();
            seen.sort_unstable();
            assert_eq!(
                seen,
                [0, 1, 2, 3],
                "round {round} is not an order: {order:?}"
            );
            for (place, &target) in order[..4].iter().enumerate() {
                places[target as usize][place] += 1;
                if let Some(before) = last {
                    follows[target as usize][before as usize] += 1;
                }
                last = Some(target);
            }
        }
        // 1,000 expected per place; about 1,250 per other target before it (the first of a
        // round follows the last of the one before, which may be itself).
        for (target, counts) in places.iter().enumerate() {
            for &count in counts {
                assert!(
                    (850..1150).contains(&count),
                    "target {target} places: {counts:?}"
                );
            }
            for (before, &count) in follows[target].iter().enumerate() {
                if before != target {
                    assert!(
                        (1150..1520).contains(&count),
                        "{target} after {before}: {count}"
                    );
                }
            }
        }
    }

    /// The kept tail is the slowest hundredth, rounded up, slowest first; nothing from nothing.
    #[test]
    fn slowest_hundredth_keeps_the_tail_slowest_first() {
        let sorted: Vec<u32> = (1..=250).collect();
        assert_eq!(slowest_hundredth(&sorted), [250, 249, 248]);
        assert_eq!(slowest_hundredth(&[7]), [7]);
        assert!(slowest_hundredth(&[]).is_empty());
    }
}
