//! A small ADS server for tests (SotW and delta, and SDS as a service of its own): holds a
//! versioned set of resources per type, pushes changes to every stream, records every request
//! (ACKs and NACKs) for assertions. A test can also cut every open stream, push a hand-made
//! response (say, of a type nobody asked for), and put a TLS terminator in front of it
//! ([`TlsFront`]).
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
use xds_api::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
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
    /// This request itself carried the node (not only an earlier one on its stream).
    pub has_node: bool,
    /// Which stream it came on: 1 for the server's first, counting up.
    pub stream: usize,
    /// The stream's `authorization` metadata, if it had one.
    pub authorization: Option<String>,
}

/// A response a test wrote by hand, sent as is on every open stream of its flavour.
#[derive(Debug, Clone)]
enum Raw {
    Sotw(DiscoveryResponse),
    Delta(DeltaDiscoveryResponse),
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
    /// Bumped to cut every open stream.
    kick: watch::Sender<u64>,
    raw: tokio::sync::broadcast::Sender<Raw>,
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
        let (kick, _) = watch::channel(0u64);
        let (raw, _) = tokio::sync::broadcast::channel(16);
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = Service {
            shared: shared.clone(),
            changed: changed.clone(),
            kick: kick.clone(),
            raw: raw.clone(),
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
                        .add_service(AggregatedDiscoveryServiceServer::new(service.clone()))
                        .add_service(SecretDiscoveryServiceServer::new(service))
                        .serve_with_incoming(incoming) => {}
                    _ = stopped => {}
                }
            });
        });
        AdsServer {
            addr,
            shared,
            changed,
            kick,
            raw,
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

    /// Ends every open stream (cleanly, with status OK), as a control plane that sheds its
    /// clients does; the server keeps listening.
    pub fn disconnect_streams(&self) {
        self.kick.send_modify(|generation| *generation += 1);
    }

    /// Sends `response` as it is on every open state-of-the-world stream.
    pub fn push_raw(&self, response: DiscoveryResponse) {
        let _ = self.raw.send(Raw::Sotw(response));
    }

    /// Sends `response` as it is on every open delta stream.
    pub fn push_raw_delta(&self, response: DeltaDiscoveryResponse) {
        let _ = self.raw.send(Raw::Delta(response));
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
    remora_config::resource::name(type_url, &any.value).unwrap_or_default()
}

fn wildcard(type_url: &str) -> bool {
    type_url == type_urls::CLUSTER || type_url == type_urls::LISTENER
}

#[derive(Clone)]
struct Service {
    shared: Arc<Shared>,
    changed: watch::Sender<u64>,
    kick: watch::Sender<u64>,
    raw: tokio::sync::broadcast::Sender<Raw>,
}

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

impl Service {
    /// Counts a new stream; its number.
    fn new_stream(&self) -> usize {
        let mut streams = self.shared.streams.lock().expect("streams");
        *streams += 1;
        *streams
    }

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

/// SDS as a service of its own (`StreamSecrets`): the same streams as ADS, asked only for
/// secrets.
#[tonic::async_trait]
impl SecretDiscoveryService for Service {
    type StreamSecretsStream = SotwStream;
    type DeltaSecretsStream = DeltaStream;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        self.stream_aggregated_resources(request).await
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        self.delta_aggregated_resources(request).await
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("streams only"))
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
        let stream = self.new_stream();
        let service = self.clone();
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut changed = service.changed.subscribe();
            let mut kick = service.kick.subscribe();
            let mut raw = service.raw.subscribe();
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
                            has_node: request.node.is_some(),
                            stream,
                            authorization: authorization.clone(),
                        });
                        let entry = state.entry(request.type_url.clone()).or_insert_with(|| (Vec::new(), String::new(), String::new()));
                        let names_changed = entry.0 != request.resource_names;
                        entry.0 = request.resource_names.clone();
                        // An answer to an older response is stale, and ignored as the protocol
                        // asks: answering it would start a resend ping-pong.
                        let answered = !request.response_nonce.is_empty();
                        if request.error_detail.is_some() && !names_changed {
                            continue; // NACK: do not resend the same version
                        }
                        if !answered || names_changed {
                            to_send.push(request.type_url.clone());
                        }
                    }
                    result = changed.changed() => {
                        if result.is_err() { return; }
                        to_send.extend(state.keys().cloned());
                    }
                    _ = kick.changed() => return,
                    Ok(response) = raw.recv() => {
                        if let Raw::Sotw(response) = response
                            && tx.send(Ok(response)).await.is_err()
                        {
                            return;
                        }
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
        let stream = self.new_stream();
        let service = self.clone();
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut changed = service.changed.subscribe();
            let mut kick = service.kick.subscribe();
            let mut raw = service.raw.subscribe();
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
                            has_node: request.node.is_some(),
                            stream,
                            authorization: authorization.clone(),
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
                    _ = kick.changed() => return,
                    Ok(response) = raw.recv() => {
                        if let Raw::Delta(response) = response
                            && tx.send(Ok(response)).await.is_err()
                        {
                            return;
                        }
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

/// A TLS terminator in front of a plaintext server (the ADS server, for a proxy whose ADS
/// cluster speaks TLS; or an HTTP/1 app): it completes each handshake with its certificate, records the server
/// name the client asked for and why failed handshakes failed, and pipes the decrypted bytes to
/// `backend`. Stops on drop.
pub struct TlsFront {
    pub addr: SocketAddr,
    shared: Arc<FrontShared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct FrontShared {
    /// The SNI of each completed handshake.
    server_names: Mutex<Vec<Option<String>>>,
    /// Why each failed handshake failed.
    failures: Mutex<Vec<String>>,
}

impl TlsFront {
    /// Serves TLS with the certificate chain and key in `cert_pem` and `key_pem` files.
    pub fn start(
        backend: SocketAddr,
        cert_pem: &std::path::Path,
        key_pem: &std::path::Path,
    ) -> TlsFront {
        let read = |path: &std::path::Path| std::fs::read(path).expect("read pem");
        let certs = rustls_pemfile::certs(&mut read(cert_pem).as_slice())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates");
        let key = rustls_pemfile::private_key(&mut read(key_pem).as_slice())
            .expect("key pem")
            .expect("a private key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
        // h2 for an ADS client; http/1.1 for Envoy's HTTP/1 pools, which offer it.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tls front");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(FrontShared::default());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let serve = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, state) = (acceptor.clone(), state.clone());
                        tokio::spawn(async move {
                            let mut tls = match acceptor.accept(stream).await {
                                Ok(tls) => tls,
                                Err(error) => {
                                    state
                                        .failures
                                        .lock()
                                        .expect("failures")
                                        .push(error.to_string());
                                    return;
                                }
                            };
                            let sni = tls.get_ref().1.server_name().map(str::to_string);
                            state.server_names.lock().expect("names").push(sni);
                            let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await
                            else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        TlsFront {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The server name (SNI) of each handshake that completed, in order.
    pub fn server_names(&self) -> Vec<Option<String>> {
        self.shared.server_names.lock().expect("names").clone()
    }

    /// Why each failed handshake failed, in order.
    pub fn failures(&self) -> Vec<String> {
        self.shared.failures.lock().expect("failures").clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A unix socket that forwards each connection to `to` over TCP: the stand-in for Istio's
/// agent, which serves ADS to its proxy on a pipe.
pub fn pipe_relay(to: SocketAddr) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("XDS");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind the pipe");
    std::thread::spawn(move || {
        for downstream in listener.incoming().flatten() {
            let Ok(upstream) = std::net::TcpStream::connect(to) else {
                continue;
            };
            let (mut down_read, mut up_write) = (
                downstream.try_clone().unwrap(),
                upstream.try_clone().unwrap(),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut down_read, &mut up_write);
                let _ = up_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut up_read, mut down_write) = (upstream, downstream);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up_read, &mut down_write);
                let _ = down_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (dir, path)
}
