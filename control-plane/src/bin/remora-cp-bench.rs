//! `remora-cp-bench`: load tool for the control plane. Starts a `remora-cp` (release build next
//! to this binary), loads C clusters of E endpoints each, opens N simulated ADS clients (each its
//! own gRPC connection and stream, subscribing and ACKing like Envoy: CDS wildcard, EDS by name,
//! LDS wildcard, RDS by name) and measures, per API write, the time until all N clients have
//! ACKed the new version, plus remora-cp's RSS and CPU.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::DiscoveryRequest;
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::type_urls;

#[derive(Parser, Debug)]
struct Args {
    /// Simulated ADS clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Measured writes of each kind (endpoint change, cluster change).
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Clients connecting at once while ramping up.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// remora-cp binary (default: next to this one).
    #[arg(long)]
    cp_binary: Option<PathBuf>,
}

const TOKEN: &str = "bench";
/// Indexes of the per-client ACK table (LDS is 2).
const CDS: usize = 0;
const EDS: usize = 1;
const RDS: usize = 3;
const TYPES: [&str; 4] = [
    type_urls::CLUSTER,
    type_urls::CLUSTER_LOAD_ASSIGNMENT,
    type_urls::LISTENER,
    type_urls::ROUTE_CONFIGURATION,
];

/// Set once measuring is over: streams dropped by the stopping control plane are expected.
static FINISHED: AtomicBool = AtomicBool::new(false);

/// The latest version each client ACKed, per type.
type AckTable = Arc<Vec<[AtomicU64; 4]>>;

struct ControlPlane {
    child: Child,
    api: SocketAddr,
    xds: SocketAddr,
    _data: tempfile::TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn start_cp(binary: PathBuf) -> anyhow::Result<ControlPlane> {
    let data = tempfile::tempdir()?;
    let (api, xds) = (free_addr()?, free_addr()?);
    let child = Command::new(&binary)
        .args([
            "--api-addr",
            &api.to_string(),
            "--xds-addr",
            &xds.to_string(),
            "--data-dir",
        ])
        .arg(data.path())
        .env("REMORA_CP_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let cp = ControlPlane {
        child,
        api,
        xds,
        _data: data,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(cp.api, "GET", "/healthz", "").await.is_err() {
        if Instant::now() > deadline {
            bail!("remora-cp did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(cp)
}

/// One HTTP/1.1 request with a JSON body; the JSON answer, or an error with the reply.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> anyhow::Result<Value> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 2") {
        bail!("{method} {path}: {head} {rest}");
    }
    Ok(serde_json::from_str(rest).unwrap_or(Value::Null))
}

fn cluster(index: usize, timeout_ms: u64) -> Value {
    json!({"@type": "Cluster", "name": format!("cluster-{index}"), "type": "EDS",
           "connect_timeout": format!("{}.{:03}s", timeout_ms / 1000, timeout_ms % 1000),
           "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}})
}

fn assignment(index: usize, endpoints: usize, base_port: usize) -> Value {
    let lb_endpoints: Vec<Value> = (0..endpoints)
        .map(|e| json!({"endpoint": {"address": {"socket_address": {"address": format!("10.{}.{}.{}", index / 250, index % 250, e + 1), "port_value": base_port + e}}}}))
        .collect();
    json!({"@type": "ClusterLoadAssignment", "cluster_name": format!("cluster-{index}"), "endpoints": [{"lb_endpoints": lb_endpoints}]})
}

fn initial_config(args: &Args) -> Value {
    let mut resources = Vec::new();
    for index in 0..args.clusters {
        resources.push(cluster(index, 1000));
        resources.push(assignment(index, args.endpoints, 8000));
    }
    resources.push(json!({"@type": "RouteConfiguration", "name": "bench_route", "virtual_hosts": [
        {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "cluster-0"}}]}]}));
    resources.push(json!({"@type": "Listener", "name": "bench_listener",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": type_urls::HTTP_CONNECTION_MANAGER, "stat_prefix": "bench",
            "rds": {"route_config_name": "bench_route", "config_source": {"ads": {}, "resource_api_version": "V3"}},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": type_urls::ROUTER}}]}}]}]}));
    Value::Array(resources)
}

/// One simulated Envoy: subscribes like Envoy does and ACKs every response.
async fn client(
    index: usize,
    xds: SocketAddr,
    cluster_names: Arc<Vec<String>>,
    acks: AckTable,
) -> anyhow::Result<()> {
    let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await?
        .max_decoding_message_size(256 << 20);
    let (requests, outgoing) = mpsc::channel::<DiscoveryRequest>(8);
    let node = Node {
        id: format!("bench-{index}"),
        cluster: "bench".into(),
        ..Default::default()
    };
    requests
        .send(DiscoveryRequest {
            node: Some(node),
            type_url: TYPES[CDS].into(),
            ..Default::default()
        })
        .await?;
    let mut responses = grpc
        .stream_aggregated_resources(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let names = |kind: usize| -> Vec<String> {
        match kind {
            EDS => cluster_names.as_ref().clone(),
            RDS => vec!["bench_route".into()],
            _ => Vec::new(),
        }
    };
    let mut requested = [true, false, false, false];
    while let Some(response) = responses.next().await {
        let response = response?;
        let Some(kind) = TYPES.iter().position(|url| *url == response.type_url) else {
            continue;
        };
        requests
            .send(DiscoveryRequest {
                version_info: response.version_info.clone(),
                resource_names: names(kind),
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await?;
        if let Ok(version) = response.version_info.parse::<u64>() {
            acks[index][kind].store(version, Ordering::Release);
        }
        // Envoy's order: clusters, then their endpoints, then listeners, then their routes.
        if kind + 1 < TYPES.len() && !requested[kind + 1] {
            requested[kind + 1] = true;
            requests
                .send(DiscoveryRequest {
                    resource_names: names(kind + 1),
                    type_url: TYPES[kind + 1].into(),
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}

/// Resident set size (kB) and CPU seconds of a process, from /proc.
fn process_usage(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/PID/stat (1-based), 12 and 13 after the name.
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (field("VmRSS:"), field("VmHWM:"), ticks as f64 / 100.0)
}

/// Waits until every client has ACKed `version` (or later) of `kind`; the time it took.
async fn all_acked(
    acks: &AckTable,
    kind: usize,
    version: u64,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    loop {
        let behind = acks
            .iter()
            .filter(|client| client[kind].load(Ordering::Acquire) < version)
            .count();
        if behind == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("{behind} clients did not ACK version {version} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = match &args.cp_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("remora-cp"),
    };
    let cp = start_cp(binary).await?;
    let pid = cp.child.id();
    let load_started = Instant::now();
    let answer = http(
        cp.api,
        "POST",
        "/v1/apply",
        &initial_config(&args).to_string(),
    )
    .await?;
    println!(
        "loaded {} clusters x {} endpoints as version {} in {:?}",
        args.clusters,
        args.endpoints,
        answer["version"],
        load_started.elapsed()
    );
    let (idle_rss, _, _) = process_usage(pid);

    let acks: AckTable = Arc::new((0..args.clients).map(|_| Default::default()).collect());
    let names: Arc<Vec<String>> =
        Arc::new((0..args.clusters).map(|i| format!("cluster-{i}")).collect());
    let ramp = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    for index in 0..args.clients {
        let permit = gate.clone().acquire_owned().await?;
        let (acks, names, xds) = (acks.clone(), names.clone(), cp.xds);
        tokio::spawn(async move {
            let waiter = acks.clone();
            let task = tokio::spawn(client(index, xds, names, acks));
            // Hold the permit until this client is in sync, so ramp-up stays bounded.
            while waiter[index][RDS].load(Ordering::Acquire) == 0 && !task.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            drop(permit);
            if let Ok(Err(error)) = task.await
                && !FINISHED.load(Ordering::Relaxed)
            {
                eprintln!("client {index}: {error:#}");
            }
        });
    }
    let version: u64 = answer["version"].as_u64().unwrap_or(1);
    all_acked(&acks, RDS, version, ramp, Duration::from_secs(1800)).await?;
    let ramp_time = ramp.elapsed();
    let (synced_rss, _, cpu_before) = process_usage(pid);
    println!(
        "{} clients in sync after {ramp_time:?}; remora-cp RSS {} MiB (idle, before clients: {} MiB)",
        args.clients,
        synced_rss / 1024,
        idle_rss / 1024
    );

    let mut results = Vec::new();
    let measure_started = Instant::now();
    for (label, kind) in [
        ("endpoint change (EDS)", EDS),
        ("cluster change (CDS)", CDS),
    ] {
        let mut latencies = Vec::new();
        for change in 0..args.changes {
            let index = (change * 7919) % args.clusters;
            let (path, body) = if kind == EDS {
                (
                    format!("/v1/endpoints/cluster-{index}"),
                    assignment(index, args.endpoints, 9000 + change),
                )
            } else {
                (
                    format!("/v1/clusters/cluster-{index}"),
                    cluster(index, 1001 + change as u64),
                )
            };
            let started = Instant::now();
            let answer = http(cp.api, "PUT", &path, &body.to_string()).await?;
            let version = answer["version"].as_u64().unwrap_or(0);
            latencies
                .push(all_acked(&acks, kind, version, started, Duration::from_secs(300)).await?);
        }
        latencies.sort();
        results.push((
            label,
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0),
            latencies.last().copied().unwrap_or_default(),
        ));
    }
    let (rss, peak, cpu_after) = process_usage(pid);
    FINISHED.store(true, Ordering::Relaxed);
    let cpu = (cpu_after - cpu_before) / measure_started.elapsed().as_secs_f64();
    println!();
    println!(
        "| clients | clusters x endpoints | change | all ACKed p50 | p99 | max | cp RSS (MiB) | cp peak RSS (MiB) | cp CPU during changes | ramp-up |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (label, p50, p99, max) in results {
        println!(
            "| {} | {} x {} | {label} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} | {:.0}% of a core | {:.1} s |",
            args.clients,
            args.clusters,
            args.endpoints,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            rss / 1024,
            peak / 1024,
            cpu * 100.0,
            ramp_time.as_secs_f64()
        );
    }
    Ok(())
}
