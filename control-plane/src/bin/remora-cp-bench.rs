//! `remora-cp-bench`: load tool for the control plane. Starts a `remora-cp` (release build next
//! to this binary), loads C clusters of E endpoints each, opens N simulated ADS clients (each its
//! own gRPC connection and stream, subscribing and ACKing like Envoy: CDS wildcard, EDS by name,
//! LDS wildcard, RDS by name; state-of-the-world, or delta with `--delta`) and measures, per API
//! write, the time until all N clients have ACKed the new version, plus remora-cp's RSS and CPU
//! and the machine's load average. With `--node-every-request` every request carries an
//! Envoy-sized node, as Envoy's default ADS config sends.

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
use xds_api::envoy::config::core::v3::{Extension, Node};
use xds_api::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
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
    /// Measured writes of each kind (endpoint change, cluster change). Percentiles are nearest
    /// rank over these, so below 100 the p99 is the slowest write.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Clients connecting at once while ramping up.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Speak incremental (delta) ADS instead of state-of-the-world.
    #[arg(long)]
    delta: bool,
    /// Send a node the size of Envoy 1.40's (about 60 KB, most of it 516 extensions) on every
    /// request, as Envoy does unless `set_node_on_first_message_only` is set. Without it only
    /// each stream's first request carries a node, as Istio configures Envoy.
    #[arg(long)]
    node_every_request: bool,
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

/// The parts of a (delta) discovery response the simulated Envoy reads: both messages number
/// these fields alike. Resources are skipped undecoded, so the load tool's own cost stays small
/// beside the control plane it shares the cores with (a real Envoy decodes in its own process).
#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHead {
    /// `version_info` (SotW) or `system_version_info` (delta).
    #[prost(string, tag = "1")]
    version: String,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// A request already encoded. Its repeated name field (and node, if sent every time) is encoded
/// once up front and appended: Envoy repeats its whole EDS list on every SotW ACK, and cloning
/// 1,000 strings per ACK would load the tool, not the server.
#[derive(Debug, Default, Clone)]
struct Outgoing(bytes::Bytes);

impl Outgoing {
    /// `message` followed by `fields`, each already encoded.
    fn new(message: impl prost::Message, fields: &[&bytes::Bytes]) -> Outgoing {
        let mut bytes = message.encode_to_vec();
        for field in fields {
            bytes.extend_from_slice(field);
        }
        Outgoing(bytes.into())
    }
}

impl prost::Message for Outgoing {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// `names` encoded as repeated string field `tag`.
fn encode_names(tag: u32, names: &[String]) -> bytes::Bytes {
    let mut buf = Vec::new();
    prost::encoding::string::encode_repeated(tag, names, &mut buf);
    buf.into()
}

/// What every simulated client shares.
struct ClientSetup {
    xds: SocketAddr,
    delta: bool,
    acks: AckTable,
    /// Per type: the names subscribed (EDS: every cluster; RDS: the one route), encoded as the
    /// SotW request's field 3, which is also the delta request's `resource_names_subscribe`.
    names: [bytes::Bytes; 4],
    node_every_request: bool,
}

/// A node as large as Envoy 1.40's: its 516 extensions average 33-byte names, 24-byte
/// categories and about one type URL each.
fn envoy_sized_node(id: String) -> Node {
    let extensions = (0..516)
        .map(|index| Extension {
            name: format!("envoy.filters.bench.extension_{index:04}"),
            category: "envoy.filters.bench_category".into(),
            type_urls: vec![format!("envoy.extensions.bench.v3.Extension{index:04}")],
            ..Default::default()
        })
        .collect();
    Node {
        id,
        cluster: "bench".into(),
        user_agent_name: "envoy".into(),
        extensions,
        ..Default::default()
    }
}

/// `node` encoded as field `tag`.
fn encode_node(tag: u32, node: &Node) -> bytes::Bytes {
    let mut buf = Vec::new();
    prost::encoding::message::encode(tag, node, &mut buf);
    buf.into()
}

/// One simulated Envoy: subscribes like Envoy does (CDS, then EDS, LDS, RDS, each once the
/// previous type answered) and ACKs every response, over SotW or delta ADS.
async fn client(index: usize, setup: Arc<ClientSetup>) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::new(format!("http://{}", setup.xds))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(256 << 20);
    grpc.ready().await?;
    let id = format!("bench-{index}");
    // The node is encoded once and appended like the names: to the first request only, or
    // with an Envoy-sized node to every request.
    let tag = if setup.delta { 1 } else { 2 };
    let (first_node, node_field) = if setup.node_every_request {
        let field = encode_node(tag, &envoy_sized_node(id));
        (field.clone(), field)
    } else {
        let node = Node {
            id,
            cluster: "bench".into(),
            ..Default::default()
        };
        (encode_node(tag, &node), bytes::Bytes::new())
    };
    let (requests, outgoing) = mpsc::channel::<Outgoing>(8);
    requests.send(subscribe(&setup, CDS, &first_node)).await?;
    let path = if setup.delta {
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
    } else {
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    };
    let mut responses = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(outgoing)),
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::<Outgoing, ResponseHead>::default(),
        )
        .await?
        .into_inner();
    let mut requested = [true, false, false, false];
    while let Some(response) = responses.next().await {
        let response = response?;
        let Some(kind) = TYPES.iter().position(|url| *url == response.type_url) else {
            continue;
        };
        requests
            .send(ack(&setup, kind, &response, &node_field))
            .await?;
        if let Ok(version) = response.version.parse::<u64>() {
            setup.acks[index][kind].store(version, Ordering::Release);
        }
        // Envoy's order: clusters, then their endpoints, then listeners, then their routes.
        if kind + 1 < TYPES.len() && !requested[kind + 1] {
            requested[kind + 1] = true;
            requests
                .send(subscribe(&setup, kind + 1, &node_field))
                .await?;
        }
    }
    Ok(())
}

/// The first request for type `kind`; `node_field` is an encoded node to append, or empty.
fn subscribe(setup: &ClientSetup, kind: usize, node_field: &bytes::Bytes) -> Outgoing {
    let type_url = TYPES[kind].to_string();
    let names = &setup.names[kind];
    if setup.delta {
        let request = DeltaDiscoveryRequest {
            type_url,
            ..Default::default()
        };
        Outgoing::new(request, &[node_field, names])
    } else {
        let request = DiscoveryRequest {
            type_url,
            ..Default::default()
        };
        Outgoing::new(request, &[node_field, names])
    }
}

/// The ACK of `response`: SotW repeats the subscription, delta names only the nonce.
fn ack(
    setup: &ClientSetup,
    kind: usize,
    response: &ResponseHead,
    node_field: &bytes::Bytes,
) -> Outgoing {
    if setup.delta {
        let request = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        Outgoing::new(request, &[node_field])
    } else {
        let request = DiscoveryRequest {
            version_info: response.version.clone(),
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        Outgoing::new(request, &[node_field, &setup.names[kind]])
    }
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

/// The machine's one-minute load average, as `/proc/loadavg` prints it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
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
    let cluster_names: Vec<String> = (0..args.clusters).map(|i| format!("cluster-{i}")).collect();
    // Field 3 is SotW's `resource_names` and delta's `resource_names_subscribe`.
    let setup = Arc::new(ClientSetup {
        xds: cp.xds,
        delta: args.delta,
        acks: acks.clone(),
        names: [
            bytes::Bytes::new(),
            encode_names(3, &cluster_names),
            bytes::Bytes::new(),
            encode_names(3, &["bench_route".to_string()]),
        ],
        node_every_request: args.node_every_request,
    });
    let ramp = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    for index in 0..args.clients {
        let permit = gate.clone().acquire_owned().await?;
        let (waiter, setup) = (acks.clone(), setup.clone());
        tokio::spawn(async move {
            let task = tokio::spawn(client(index, setup));
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
    let load_before = load_average();
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
            [50.0, 90.0, 99.0].map(|p| percentile(&latencies, p)),
            latencies.last().copied().unwrap_or_default(),
        ));
    }
    let (rss, peak, cpu_after) = process_usage(pid);
    let load_after = load_average();
    FINISHED.store(true, Ordering::Relaxed);
    let cpu = (cpu_after - cpu_before) / measure_started.elapsed().as_secs_f64();
    println!();
    println!(
        "Time from the API write to the last client's ACK, per write; percentiles are nearest rank over {} writes of each kind.",
        args.changes
    );
    println!(
        "| clients | protocol | clusters x endpoints | change | all ACKed p50 | p90 | p99 | max | cp RSS (MiB) | cp peak RSS (MiB) | cp CPU during changes | ramp-up | load average (1 min) before → after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let protocol = match (args.delta, args.node_every_request) {
        (false, false) => "SotW",
        (true, false) => "delta",
        (false, true) => "SotW, node on every request",
        (true, true) => "delta, node on every request",
    };
    for (label, [p50, p90, p99], max) in results {
        println!(
            "| {} | {protocol} | {} x {} | {label} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} | {:.0}% of a core | {:.1} s | {load_before} → {load_after} |",
            args.clients,
            args.clusters,
            args.endpoints,
            p50.as_secs_f64() * 1e3,
            p90.as_secs_f64() * 1e3,
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
