//! A small ADS server for tests (SotW and delta): holds a versioned set of resources per type,
//! pushes changes to every stream, records every request (ACKs and NACKs) for assertions.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use prost::Message;
use prost_types::Any;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds_api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use xds_api::type_urls;

/// One request the proxy sent.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub type_url: String,
    pub version_info: String,
    pub nonce: String,
    pub names: Vec<String>,
    pub error: Option<String>,
    pub node_id: String,
}

#[derive(Default)]
struct Store {
    version: u64,
    resources: BTreeMap<String, BTreeMap<String, Any>>,
}

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<Recorded>>,
    streams: Mutex<usize>,
}

/// Handle to a running ADS server (stops on drop).
pub struct AdsServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    changed: watch::Sender<u64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn version_of(any: &Any) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    any.value.hash(&mut h);
    format!("{:x}", h.finish())
}

/// Packs a resource with its real type URL.
pub fn pack<M: Message>(type_url: &str, message: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: message.encode_to_vec(),
    }
}

pub fn cluster(yaml: &str) -> Any {
    pack(
        type_urls::CLUSTER,
        &xds_api::json::from_yaml_str::<xds_api::envoy::config::cluster::v3::Cluster>(yaml)
            .expect("cluster yaml"),
    )
}
pub fn endpoints(yaml: &str) -> Any {
    pack(
        type_urls::CLUSTER_LOAD_ASSIGNMENT,
        &xds_api::json::from_yaml_str::<xds_api::envoy::config::endpoint::v3::ClusterLoadAssignment>(yaml).expect("cla yaml"),
    )
}
pub fn listener(yaml: &str) -> Any {
    pack(
        type_urls::LISTENER,
        &xds_api::json::from_yaml_str::<xds_api::envoy::config::listener::v3::Listener>(yaml)
            .expect("listener yaml"),
    )
}
pub fn routes(yaml: &str) -> Any {
    pack(
        type_urls::ROUTE_CONFIGURATION,
        &xds_api::json::from_yaml_str::<xds_api::envoy::config::route::v3::RouteConfiguration>(
            yaml,
        )
        .expect("route yaml"),
    )
}

impl AdsServer {
    pub fn start() -> AdsServer {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0").expect("bind ads"))
    }

    pub fn start_on(listener: std::net::TcpListener) -> AdsServer {
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let (changed, _) = watch::channel(0u64);
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = Service {
            shared: shared.clone(),
            changed: changed.clone(),
        };
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                // Stopping drops the runtime: open streams are cut, as when a control plane dies.
                tokio::select! {
                    _ = tonic::transport::Server::builder()
                        .add_service(AggregatedDiscoveryServiceServer::new(service))
                        .serve_with_incoming(incoming) => {}
                    _ = stopped => {}
                }
            });
        });
        AdsServer {
            addr,
            shared,
            changed,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Replaces every resource of `type_url` and pushes the change.
    pub fn set(&self, type_url: &str, resources: Vec<Any>) {
        let mut store = self.shared.store.lock().expect("store");
        let map = resources
            .into_iter()
            .map(|any| {
                let name = name_of(type_url, &any);
                (name, any)
            })
            .collect();
        store.resources.insert(type_url.to_string(), map);
        store.version += 1;
        let version = store.version;
        drop(store);
        self.changed.send_replace(version);
    }

    pub fn version(&self) -> String {
        self.shared.store.lock().expect("store").version.to_string()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests").clone()
    }

    pub fn streams(&self) -> usize {
        *self.shared.streams.lock().expect("streams")
    }

    /// The first NACK whose message contains `needle`.
    pub fn nack_containing(&self, needle: &str) -> Option<Recorded> {
        self.requests()
            .into_iter()
            .find(|r| r.error.as_deref().is_some_and(|e| e.contains(needle)))
    }

    /// Waits (20 s at most) for the first NACK whose message contains `needle`.
    pub fn wait_nack(&self, needle: &str) -> Recorded {
        remora_tests::wait_for(
            &format!("a NACK naming {needle:?}"),
            std::time::Duration::from_secs(20),
            || self.nack_containing(needle),
        )
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn name_of(type_url: &str, any: &Any) -> String {
    use xds_api::envoy::config;
    let bytes = any.value.as_slice();
    match type_url {
        type_urls::CLUSTER => config::cluster::v3::Cluster::decode(bytes).map(|c| c.name),
        type_urls::CLUSTER_LOAD_ASSIGNMENT => {
            config::endpoint::v3::ClusterLoadAssignment::decode(bytes).map(|c| c.cluster_name)
        }
        type_urls::LISTENER => config::listener::v3::Listener::decode(bytes).map(|l| l.name),
        _ => config::route::v3::RouteConfiguration::decode(bytes).map(|r| r.name),
    }
    .unwrap_or_default()
}

fn wildcard(type_url: &str) -> bool {
    type_url == type_urls::CLUSTER || type_url == type_urls::LISTENER
}

#[derive(Clone)]
struct Service {
    shared: Arc<Shared>,
    changed: watch::Sender<u64>,
}

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

impl Service {
    fn record(&self, recorded: Recorded) {
        self.shared
            .requests
            .lock()
            .expect("requests")
            .push(recorded);
    }

    /// Current resources of a type, filtered by names (empty = all for wildcard types).
    fn current(&self, type_url: &str, names: &[String]) -> (String, Vec<(String, Any)>) {
        let store = self.shared.store.lock().expect("store");
        let all = store.resources.get(type_url).cloned().unwrap_or_default();
        let selected = all
            .into_iter()
            .filter(|(name, _)| {
                (wildcard(type_url) && (names.is_empty() || names.iter().any(|n| n == "*")))
                    || names.contains(name)
            })
            .collect();
        (store.version.to_string(), selected)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        *self.shared.streams.lock().expect("streams") += 1;
        let service = self.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut changed = service.changed.subscribe();
            // type → (names, last nonce sent, version sent)
            let mut state: HashMap<String, (Vec<String>, String, String)> = HashMap::new();
            let mut nonce = 0u64;
            let mut node_id = String::new();
            loop {
                let mut to_send: Vec<String> = Vec::new();
                tokio::select! {
                    message = inbound.message() => {
                        let Ok(Some(request)) = message else { return };
                        if let Some(node) = &request.node { node_id = node.id.clone(); }
                        service.record(Recorded {
                            type_url: request.type_url.clone(),
                            version_info: request.version_info.clone(),
                            nonce: request.response_nonce.clone(),
                            names: request.resource_names.clone(),
                            error: request.error_detail.as_ref().map(|e| e.message.clone()),
                            node_id: node_id.clone(),
                        });
                        let entry = state.entry(request.type_url.clone()).or_insert_with(|| (Vec::new(), String::new(), String::new()));
                        let names_changed = entry.0 != request.resource_names;
                        entry.0 = request.resource_names.clone();
                        let is_reply = !request.response_nonce.is_empty() && request.response_nonce == entry.1;
                        if request.error_detail.is_some() && !names_changed {
                            continue; // NACK: do not resend the same version
                        }
                        if !is_reply || names_changed || request.response_nonce.is_empty() {
                            to_send.push(request.type_url.clone());
                        }
                    }
                    result = changed.changed() => {
                        if result.is_err() { return; }
                        to_send.extend(state.keys().cloned());
                    }
                }
                for type_url in to_send {
                    let Some(entry) = state.get_mut(&type_url) else {
                        continue;
                    };
                    let (version, resources) = service.current(&type_url, &entry.0);
                    if !wildcard(&type_url) && resources.is_empty() {
                        continue;
                    }
                    nonce += 1;
                    entry.1 = nonce.to_string();
                    entry.2 = version.clone();
                    let response = DiscoveryResponse {
                        version_info: version,
                        resources: resources.into_iter().map(|(_, any)| any).collect(),
                        type_url: type_url.clone(),
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        *self.shared.streams.lock().expect("streams") += 1;
        let service = self.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut changed = service.changed.subscribe();
            // type → (wildcard, names, what the client has: name → version)
            let mut state: HashMap<String, (bool, Vec<String>, BTreeMap<String, String>)> =
                HashMap::new();
            let mut nonce = 0u64;
            let mut node_id = String::new();
            loop {
                let mut to_send: Vec<String> = Vec::new();
                tokio::select! {
                    message = inbound.message() => {
                        let Ok(Some(request)) = message else { return };
                        if let Some(node) = &request.node { node_id = node.id.clone(); }
                        service.record(Recorded {
                            type_url: request.type_url.clone(),
                            version_info: String::new(),
                            nonce: request.response_nonce.clone(),
                            names: request.resource_names_subscribe.clone(),
                            error: request.error_detail.as_ref().map(|e| e.message.clone()),
                            node_id: node_id.clone(),
                        });
                        let first = !state.contains_key(&request.type_url);
                        let entry = state.entry(request.type_url.clone()).or_insert_with(|| (false, Vec::new(), BTreeMap::new()));
                        if first {
                            entry.0 = wildcard(&request.type_url) && (request.resource_names_subscribe.is_empty() || request.resource_names_subscribe.iter().any(|n| n == "*"));
                            entry.2 = request.initial_resource_versions.clone().into_iter().collect();
                        }
                        for name in &request.resource_names_subscribe {
                            if name != "*" && !entry.1.contains(name) { entry.1.push(name.clone()); }
                        }
                        entry.1.retain(|n| !request.resource_names_unsubscribe.contains(n));
                        for name in &request.resource_names_unsubscribe { entry.2.remove(name); }
                        if request.error_detail.is_none() { to_send.push(request.type_url.clone()); }
                    }
                    result = changed.changed() => {
                        if result.is_err() { return; }
                        to_send.extend(state.keys().cloned());
                    }
                }
                for type_url in to_send {
                    let Some(entry) = state.get_mut(&type_url) else {
                        continue;
                    };
                    let names = if entry.0 { Vec::new() } else { entry.1.clone() };
                    let (version, current) = if entry.0 || !names.is_empty() {
                        service.current(&type_url, &names)
                    } else {
                        (String::new(), Vec::new())
                    };
                    let mut resources = Vec::new();
                    for (name, any) in &current {
                        let v = version_of(any);
                        if entry.2.get(name) != Some(&v) {
                            entry.2.insert(name.clone(), v.clone());
                            resources.push(Resource {
                                name: name.clone(),
                                version: v,
                                resource: Some(any.clone()),
                                ..Default::default()
                            });
                        }
                    }
                    let removed: Vec<String> = entry
                        .2
                        .keys()
                        .filter(|n| !current.iter().any(|(c, _)| c == *n))
                        .cloned()
                        .collect();
                    for name in &removed {
                        entry.2.remove(name);
                    }
                    if resources.is_empty() && removed.is_empty() {
                        continue;
                    }
                    nonce += 1;
                    let response = DeltaDiscoveryResponse {
                        system_version_info: version,
                        resources,
                        type_url: type_url.clone(),
                        removed_resources: removed,
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
