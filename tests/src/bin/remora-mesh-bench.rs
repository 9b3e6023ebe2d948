//! `remora-mesh-bench`: the control plane's Kubernetes path at scale. Starts a real API server
//! (the test fixture: etcd, kube-apiserver, kube-controller-manager), writes S Services with
//! one EndpointSlice of E endpoints each, starts `remora-cp --kubernetes` with its
//! ServiceAccount, connects N simulated sidecars (each its own gRPC connection and SotW ADS
//! stream, node metadata like the injector's, subscribing and ACKing like Envoy: CDS and LDS
//! wildcard, EDS for the clusters it got, RDS for the route configurations its listeners
//! name), and then, C times one after the other, changes one endpoint of one EndpointSlice
//! through the API server and measures the time until every sidecar has ACKed an EDS
//! response holding the new address. Prints the distribution, the control plane's RSS and
//! CPU, and the machine's load; `bench/mesh-control-plane.sh` runs it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use prost::Message;
use remora_tests::kube::KubeCluster;
use remora_tests::process::ChildGuard;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::cluster::v3::Cluster;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::config::core::v3::address::Address as AddressKind;
use xds_api::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_api::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use xds_api::envoy::config::listener::v3::Listener;
use xds_api::envoy::config::listener::v3::filter::ConfigType;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use xds_api::envoy::service::discovery::v3::DiscoveryRequest;
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::type_urls;

#[derive(Parser, Debug)]
struct Args {
    /// Services (one HTTP port each).
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints per service (one EndpointSlice each).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Simulated sidecars.
    #[arg(long, default_value_t = 1000)]
    sidecars: usize,
    /// Measured EndpointSlice changes.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Sidecars connecting at once while ramping up.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// remora-cp binary (default: next to this one).
    #[arg(long)]
    cp_binary: Option<PathBuf>,
}

const NAMESPACE: &str = "bench";

/// The change being measured: the cluster whose endpoints changed, the new address, and when
/// the change was sent.
struct Probe {
    id: u64,
    cluster: String,
    address: String,
    sent: Instant,
}

struct Shared {
    probe: Mutex<Option<Probe>>,
    /// Per sidecar: the last probe it ACKed, and how long after the change it did.
    seen: Vec<AtomicU64>,
    latency_us: Vec<AtomicU64>,
    /// Sidecars that have ACKed every type at least once.
    in_sync: AtomicUsize,
}

fn eds_names(resources: &[prost_types::Any]) -> Vec<String> {
    resources
        .iter()
        .filter_map(|any| Cluster::decode(any.value.as_slice()).ok())
        .filter(|cluster| cluster.eds_cluster_config.is_some())
        .map(|cluster| cluster.name)
        .collect()
}

fn rds_names(resources: &[prost_types::Any]) -> Vec<String> {
    let mut names = BTreeSet::new();
    for any in resources {
        let Ok(listener) = Listener::decode(any.value.as_slice()) else {
            continue;
        };
        for chain in &listener.filter_chains {
            for filter in &chain.filters {
                if let Some(ConfigType::TypedConfig(config)) = &filter.config_type
                    && config.type_url == type_urls::HTTP_CONNECTION_MANAGER
                    && let Ok(manager) = HttpConnectionManager::decode(config.value.as_slice())
                    && let Some(RouteSpecifier::Rds(rds)) = manager.route_specifier
                {
                    names.insert(rds.route_config_name);
                }
            }
        }
    }
    names.into_iter().collect()
}

/// Whether an EDS response holds the probe's address for its cluster.
fn holds_probe(resources: &[prost_types::Any], probe: &Probe) -> bool {
    resources.iter().any(|any| {
        let Ok(assignment) = ClusterLoadAssignment::decode(any.value.as_slice()) else {
            return false;
        };
        assignment.cluster_name == probe.cluster
            && assignment
                .endpoints
                .iter()
                .flat_map(|locality| &locality.lb_endpoints)
                .any(|endpoint| match &endpoint.host_identifier {
                    Some(HostIdentifier::Endpoint(endpoint)) => matches!(
                        endpoint.address.as_ref().and_then(|address| address.address.as_ref()),
                        Some(AddressKind::SocketAddress(socket)) if socket.address == probe.address
                    ),
                    _ => false,
                })
    })
}

/// One simulated sidecar: Envoy's subscription order, an ACK for every response. `ramp` is
/// released once the first response arrived, letting the next sidecar connect.
async fn sidecar(
    index: usize,
    xds: SocketAddr,
    shared: Arc<Shared>,
    ramp: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let mut ramp = Some(ramp);
    let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await?
        .max_decoding_message_size(256 << 20);
    let (requests, outgoing) = mpsc::channel::<DiscoveryRequest>(8);
    let metadata = prost_types::Struct {
        fields: [
            ("REMORA_INBOUND_PORT", "15006"),
            ("REMORA_OUTBOUND_PORT", "15001"),
        ]
        .into_iter()
        .map(|(key, value)| {
            (
                key.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(value.into())),
                },
            )
        })
        .collect(),
    };
    let node = Node {
        id: format!("sidecar-{index}.{NAMESPACE}"),
        cluster: "bench".into(),
        metadata: Some(metadata),
        ..Default::default()
    };
    let subscribe = |type_url: &str, names: Vec<String>| DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names,
        ..Default::default()
    };
    requests
        .send(DiscoveryRequest {
            node: Some(node),
            ..subscribe(type_urls::CLUSTER, Vec::new())
        })
        .await?;
    requests
        .send(subscribe(type_urls::LISTENER, Vec::new()))
        .await?;
    let mut responses = grpc
        .stream_aggregated_resources(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let mut eds: Vec<String> = Vec::new();
    let mut rds: Vec<String> = Vec::new();
    let mut acked = BTreeSet::new();
    let mut counted = false;
    while let Some(response) = responses.next().await {
        let response = response?;
        ramp.take();
        let names = match response.type_url.as_str() {
            type_urls::CLUSTER => {
                let names = eds_names(&response.resources);
                if names != eds {
                    eds = names;
                    requests
                        .send(subscribe(type_urls::CLUSTER_LOAD_ASSIGNMENT, eds.clone()))
                        .await?;
                }
                Vec::new()
            }
            type_urls::LISTENER => {
                let names = rds_names(&response.resources);
                if names != rds {
                    rds = names;
                    requests
                        .send(subscribe(type_urls::ROUTE_CONFIGURATION, rds.clone()))
                        .await?;
                }
                Vec::new()
            }
            type_urls::CLUSTER_LOAD_ASSIGNMENT => eds.clone(),
            type_urls::ROUTE_CONFIGURATION => rds.clone(),
            _ => continue,
        };
        requests
            .send(DiscoveryRequest {
                version_info: response.version_info.clone(),
                resource_names: names,
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await?;
        if response.type_url == type_urls::CLUSTER_LOAD_ASSIGNMENT
            && let Some(probe) = shared
                .probe
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            && shared.seen[index].load(Ordering::Acquire) < probe.id
            && holds_probe(&response.resources, probe)
        {
            shared.latency_us[index]
                .store(probe.sent.elapsed().as_micros() as u64, Ordering::Release);
            shared.seen[index].store(probe.id, Ordering::Release);
        }
        acked.insert(response.type_url.clone());
        if !counted && acked.len() == 4 {
            counted = true;
            shared.in_sync.fetch_add(1, Ordering::AcqRel);
        }
    }
    Ok(())
}

/// Resident set size (kB) and CPU seconds of a process, from /proc.
fn process_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|t| t.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|t| t.parse::<f64>().ok())
            .unwrap_or(0.0);
    (rss, ticks / 100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// Addresses from 198.18.0.0/15, sixteen per service.
fn endpoint_ip(service: usize, endpoint: usize) -> String {
    let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1));
    std::net::Ipv4Addr::from(base + (service * 16 + endpoint % 16) as u32).to_string()
}

fn slice(service: usize, addresses: &[String]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{service}-bench"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": format!("svc-{service}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addresses.iter().map(|address| json!({
            "addresses": [address], "conditions": {"ready": true}, "zone": "z1"
        })).collect::<Vec<_>>()
    })
}

/// Writes the objects through the API server in batches (`kubectl apply` of a List).
fn apply_all(cluster: &KubeCluster, objects: Vec<Value>) {
    for batch in objects.chunks(200) {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": batch});
        cluster
            .kubectl_with_input(&["apply", "--server-side", "-f", "-"], &list.to_string())
            .unwrap_or_else(|error| panic!("kubectl apply: {error}"));
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = match &args.cp_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("bench binary directory")?
            .join("remora-cp"),
    };
    if let Some(reason) = remora_tests::kube::missing_prerequisite() {
        bail!("cannot start the Kubernetes fixture: {reason}");
    }
    let start = Instant::now();
    let cluster = KubeCluster::start();
    eprintln!("cluster up in {:?}", start.elapsed());
    // Remora's RBAC and the CRD, then the mesh.
    let manifests = |binary: PathBuf| -> anyhow::Result<String> {
        let out = Command::new(binary).arg("manifests").output()?;
        Ok(String::from_utf8(out.stdout)?)
    };
    cluster.apply(&manifests(binary.clone())?);
    let injector = binary.with_file_name("remora-injector");
    cluster.apply(&manifests(injector)?);
    cluster.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
            .to_string(),
    );
    let written = Instant::now();
    let mut objects = Vec::new();
    for service in 0..args.services {
        objects.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{service}"), "namespace": NAMESPACE},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }));
    }
    apply_all(&cluster, objects);
    let objects = (0..args.services)
        .map(|service| {
            let addresses: Vec<String> = (0..args.endpoints)
                .map(|endpoint| endpoint_ip(service, endpoint))
                .collect();
            slice(service, &addresses)
        })
        .collect();
    apply_all(&cluster, objects);
    eprintln!(
        "{} services and {} endpoints written in {:?}",
        args.services,
        args.services * args.endpoints,
        written.elapsed()
    );

    let kubeconfig = cluster.service_account_kubeconfig("remora-system", "remora-cp", None);
    let (api, xds) = (free_addr()?, free_addr()?);
    let data = tempfile::tempdir()?;
    let mut command = Command::new(&binary);
    command
        .args([
            "--api-addr",
            &api.to_string(),
            "--xds-addr",
            &xds.to_string(),
            "--kubernetes",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--data-dir")
        .arg(data.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let control_plane = ChildGuard::spawn("remora-cp", command);
    let pid = control_plane.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(measure(&args, &cluster, xds, pid));
    if result.is_err() {
        eprintln!("{}", control_plane.log());
    }
    result
}

async fn measure(
    args: &Args,
    cluster: &KubeCluster,
    xds: SocketAddr,
    pid: u32,
) -> anyhow::Result<()> {
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client().await, NAMESPACE);
    // The control plane is up once its xDS port answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    while tokio::net::TcpStream::connect(xds).await.is_err() {
        if Instant::now() > deadline {
            bail!("remora-cp did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shared = Arc::new(Shared {
        probe: Mutex::new(None),
        seen: (0..args.sidecars).map(|_| AtomicU64::new(0)).collect(),
        latency_us: (0..args.sidecars).map(|_| AtomicU64::new(0)).collect(),
        in_sync: AtomicUsize::new(0),
    });
    let ramp = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    for index in 0..args.sidecars {
        let permit = gate.clone().acquire_owned().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(error) = sidecar(index, xds, shared, permit).await {
                eprintln!("sidecar {index}: {error:#}");
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while shared.in_sync.load(Ordering::Acquire) < args.sidecars {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} sidecars in sync",
                shared.in_sync.load(Ordering::Acquire),
                args.sidecars
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp_up = ramp.elapsed();
    let (rss_synced, _) = process_usage(pid);
    eprintln!(
        "{} sidecars in sync in {ramp_up:?}; remora-cp RSS {} MiB",
        args.sidecars,
        rss_synced / 1024
    );
    let load_before = load_average();
    let (_, cpu_before) = process_usage(pid);
    let measuring = Instant::now();
    let mut samples = Vec::new();
    let mut first_acks = Vec::new();
    let mut writes = Vec::new();
    let mut peak_rss = rss_synced;
    for change in 1..=args.changes {
        let service = (change * 7919) % args.services;
        // A new address for the last endpoint, from the other half of 198.18.0.0/15.
        let address = std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(198, 19, 128, 1)) + change as u32,
        )
        .to_string();
        let mut addresses: Vec<String> = (1..args.endpoints)
            .map(|endpoint| endpoint_ip(service, endpoint))
            .collect();
        addresses.push(address.clone());
        *shared.probe.lock().unwrap_or_else(|p| p.into_inner()) = Some(Probe {
            id: change as u64,
            cluster: format!("svc-{service}.{NAMESPACE}.svc.cluster.local:80"),
            address,
            sent: Instant::now(),
        });
        let name = format!("svc-{service}-bench");
        let patch = json!({"endpoints": slice(service, &addresses)["endpoints"]});
        let write = Instant::now();
        slices
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching EndpointSlice {name}"))?;
        writes.push(write.elapsed());
        let deadline = Instant::now() + Duration::from_secs(60);
        while shared
            .seen
            .iter()
            .any(|seen| seen.load(Ordering::Acquire) < change as u64)
        {
            if Instant::now() > deadline {
                let behind = shared
                    .seen
                    .iter()
                    .filter(|seen| seen.load(Ordering::Acquire) < change as u64)
                    .count();
                bail!("change {change}: {behind} sidecars never ACKed it");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let latencies: Vec<u64> = shared
            .latency_us
            .iter()
            .map(|latency| latency.load(Ordering::Acquire))
            .collect();
        samples.push(Duration::from_micros(
            latencies.iter().copied().max().unwrap_or(0),
        ));
        first_acks.push(Duration::from_micros(
            latencies.iter().copied().min().unwrap_or(0),
        ));
        peak_rss = peak_rss.max(process_usage(pid).0);
    }
    let (rss_after, cpu_after) = process_usage(pid);
    let elapsed = measuring.elapsed().as_secs_f64();
    samples.sort();
    first_acks.sort();
    writes.sort();
    println!(
        "services={} endpoints={} sidecars={} changes={}",
        args.services,
        args.services * args.endpoints,
        args.sidecars,
        samples.len()
    );
    println!(
        "EndpointSlice change -> all {} sidecars ACKed: p50 {:?} p90 {:?} p99 {:?} max {:?}",
        args.sidecars,
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default()
    );
    println!(
        "of which: API write answered p50 {:?} p99 {:?}; first sidecar ACKed p50 {:?} p99 {:?}",
        percentile(&writes, 0.50),
        percentile(&writes, 0.99),
        percentile(&first_acks, 0.50),
        percentile(&first_acks, 0.99)
    );
    println!(
        "remora-cp RSS: {} MiB in sync, {} MiB peak while changing, {} MiB after; CPU {:.0}% of a core while changing",
        rss_synced / 1024,
        peak_rss / 1024,
        rss_after / 1024,
        (cpu_after - cpu_before) / elapsed * 100.0
    );
    println!("ramp-up to all in sync: {ramp_up:?}");
    println!(
        "load average (1 5 15 min): before changes {load_before}, after {}",
        load_average()
    );
    Ok(())
}
