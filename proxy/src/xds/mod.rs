//! The xDS client: one ADS stream (state-of-the-world `GRPC` or incremental `DELTA_GRPC`) to the
//! bootstrap's `ads_config` cluster carrying CDS, EDS, LDS and RDS.
//!
//! - Every response is merged into a per-type map of desired resources (SotW LDS/CDS replace it,
//!   SotW EDS/RDS add to it, delta adds and removes), then applied resource by resource: what
//!   converts is applied, what does not keeps its last good version and is NACKed with an
//!   `error_detail` naming the resource and the field.
//! - Warming: a new or changed EDS cluster becomes active when its endpoints arrive, a listener
//!   when its route configuration arrives, or either when `initial_fetch_timeout` passes.
//! - The stream reconnects with jittered exponential backoff; nothing is removed while
//!   disconnected, so the last good config keeps serving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost::Message;
use prost_types::Any;
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::cluster::v3::Cluster as ClusterProto;
use xds_api::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_api::envoy::config::listener::v3::Listener as ListenerProto;
use xds_api::envoy::config::route::v3::RouteConfiguration;
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use xds_api::google::rpc::Status as RpcStatus;
use xds_api::type_urls::{
    CLUSTER as CDS, CLUSTER_LOAD_ASSIGNMENT as EDS, LISTENER as LDS, ROUTE_CONFIGURATION as RDS,
    message_name,
};

use crate::cluster::ClusterRuntime;
use crate::config::{
    AdsFlavor, DiscoveryType, DynamicResources, Listener, LoadAssignment, NetworkFilter, RawConfig,
    RouteSource, convert, strict,
};
use crate::http::router::RouteTable;
use crate::server::{Server, State};

// === status (read by /config_dump) ===

/// What the xDS client knows: versions and the last error per resource.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<StatusSnapshot>,
}

#[derive(Debug, Default, Clone)]
pub struct StatusSnapshot {
    pub versions: BTreeMap<String, String>,
    pub errors: BTreeMap<(String, String), Value>,
    /// Each active ClusterLoadAssignment as received, for `/config_dump`.
    pub endpoints: BTreeMap<String, RawConfig>,
    pub warming_clusters: Vec<RawConfig>,
    pub connected: bool,
}

impl StatusSnapshot {
    pub fn version(&self, type_url: &str) -> String {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }
    pub fn error(&self, type_url: &str, name: &str) -> Option<Value> {
        self.errors
            .get(&(type_url.to_string(), name.to_string()))
            .cloned()
    }
    pub fn errors(&self) -> Vec<(String, String, Value)> {
        self.errors
            .iter()
            .map(|((t, n), v)| (t.clone(), n.clone(), v.clone()))
            .collect()
    }
}

impl Status {
    pub fn snapshot(&self) -> StatusSnapshot {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Starts the ADS client on the current (main) runtime.
pub fn start(server: Arc<Server>) {
    let Some(config) = server.bootstrap.dynamic.clone() else {
        server.set_state(State::Live);
        return;
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let client = Client {
        server,
        config,
        desired: HashMap::new(),
        versions: HashMap::new(),
        nonces: HashMap::new(),
        applied: HashMap::new(),
        endpoint_cache: BTreeMap::new(),
        warming_clusters: BTreeMap::new(),
        warming_listeners: BTreeMap::new(),
        eds_names: BTreeSet::new(),
        rds_names: BTreeSet::new(),
        initial_done: BTreeSet::new(),
        events_tx,
        events,
    };
    tokio::spawn(client.run());
}

#[derive(Debug)]
enum Event {
    /// The initial fetch of a type timed out.
    InitialFetch(&'static str),
    /// A warming cluster's endpoints did not arrive in time.
    ClusterWarming(String, u64),
    /// A warming listener's routes did not arrive in time.
    ListenerWarming(String, u64),
}

/// Where requests go on the current stream.
enum Sink<'a> {
    Sotw(&'a mpsc::Sender<DiscoveryRequest>),
    Delta(&'a mpsc::Sender<DeltaDiscoveryRequest>),
    Disconnected,
}

struct Client {
    server: Arc<Server>,
    config: DynamicResources,
    /// Desired resources per type: name → (version, payload).
    desired: HashMap<&'static str, BTreeMap<String, (String, Any)>>,
    /// Last accepted (SotW) or system (delta) version per type.
    versions: HashMap<&'static str, String>,
    nonces: HashMap<&'static str, String>,
    /// Hash of the payload applied per type and name.
    applied: HashMap<&'static str, BTreeMap<String, u64>>,
    endpoint_cache: BTreeMap<String, LoadAssignment>,
    warming_clusters: BTreeMap<String, Arc<ClusterRuntime>>,
    warming_listeners: BTreeMap<String, Arc<Listener>>,
    eds_names: BTreeSet<String>,
    rds_names: BTreeSet<String>,
    initial_done: BTreeSet<&'static str>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
}

fn static_type(type_url: &str) -> Option<&'static str> {
    [CDS, EDS, LDS, RDS].into_iter().find(|t| *t == type_url)
}

fn short(type_url: &str) -> &'static str {
    match type_url {
        CDS => "Cluster",
        EDS => "ClusterLoadAssignment",
        LDS => "Listener",
        RDS => "RouteConfiguration",
        _ => "resource",
    }
}

fn payload_hash(any: &Any) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    any.value.hash(&mut hasher);
    hasher.finish()
}

fn resource_name(type_url: &str, any: &Any) -> Result<String, String> {
    if any.type_url != type_url {
        return Err(format!(
            "resource of type {} in a {} response",
            any.type_url,
            short(type_url)
        ));
    }
    let bytes = any.value.as_slice();
    let decoded = match type_url {
        CDS => ClusterProto::decode(bytes).map(|c| c.name),
        EDS => ClusterLoadAssignment::decode(bytes).map(|c| c.cluster_name),
        LDS => ListenerProto::decode(bytes).map(|l| l.name),
        RDS => RouteConfiguration::decode(bytes).map(|r| r.name),
        _ => return Err(format!("unsupported type {type_url}")),
    };
    decoded.map_err(|e| format!("cannot decode {}: {e}", short(type_url)))
}

fn now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}s")
}

fn listener_route_names(listener: &Listener) -> Vec<String> {
    listener
        .filter_chains
        .iter()
        .chain(listener.default_filter_chain.iter())
        .filter_map(|chain| match &chain.filter {
            NetworkFilter::Http(hcm) => match &hcm.routes {
                RouteSource::Rds { name, .. } => Some(name.clone()),
                RouteSource::Inline(_) => None,
            },
            NetworkFilter::TcpProxy(_) => None,
        })
        .collect()
}

fn listener_route_timeout(listener: &Listener) -> Duration {
    listener
        .filter_chains
        .iter()
        .chain(listener.default_filter_chain.iter())
        .filter_map(|chain| match &chain.filter {
            NetworkFilter::Http(hcm) => match &hcm.routes {
                RouteSource::Rds { source, .. } => Some(source.initial_fetch_timeout),
                RouteSource::Inline(_) => None,
            },
            NetworkFilter::TcpProxy(_) => None,
        })
        .max()
        .unwrap_or_default()
}

impl Client {
    fn node(&self) -> xds_api::envoy::config::core::v3::Node {
        let mut node = self.server.node.proto.clone();
        if node.user_agent_name.is_empty() {
            node.user_agent_name = "remora".into();
        }
        node
    }

    async fn run(mut self) {
        // Initial fetch timeouts.
        for (type_url, source) in [(CDS, self.config.cds), (LDS, self.config.lds)] {
            if let Some(source) = source {
                if !source.initial_fetch_timeout.is_zero() {
                    self.timer(source.initial_fetch_timeout, Event::InitialFetch(type_url));
                }
            } else {
                self.initial_done.insert(type_url);
            }
        }
        self.check_ready();
        let mut attempt: u32 = 0;
        loop {
            let connected = match self.connect().await {
                Ok(channel) => {
                    self.server.xds.update(|s| s.connected = true);
                    let got_response = match self.config.flavor {
                        AdsFlavor::StateOfTheWorld => self.run_sotw(channel).await,
                        AdsFlavor::Delta => self.run_delta(channel).await,
                    };
                    self.server.xds.update(|s| s.connected = false);
                    got_response
                }
                Err(error) => {
                    tracing::warn!(%error, "xDS: cannot connect to the ADS cluster");
                    false
                }
            };
            if connected {
                attempt = 0;
            }
            // Jittered exponential backoff: 0.5 s doubling up to 30 s, full jitter.
            let ceiling = Duration::from_millis(500)
                .saturating_mul(1 << attempt.min(6))
                .min(Duration::from_secs(30));
            let delay = Duration::from_millis(
                rand::rng()
                    .random_range(ceiling.as_millis() as u64 / 2..=ceiling.as_millis() as u64),
            );
            attempt = attempt.saturating_add(1);
            tracing::info!(?delay, "xDS: stream closed; reconnecting after backoff");
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    Some(event) = self.events.recv() => self.on_event(event, &Sink::Disconnected).await,
                }
            }
        }
    }

    fn timer(&self, after: Duration, event: Event) {
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(event);
        });
    }

    async fn connect(&self) -> anyhow::Result<tonic::transport::Channel> {
        let cluster = self
            .server
            .clusters
            .get(&self.config.ads_cluster)
            .ok_or_else(|| {
                anyhow::anyhow!("ADS cluster {} is not defined", self.config.ads_cluster)
            })?;
        tokio::time::timeout(Duration::from_secs(5), cluster.initialized())
            .await
            .ok();
        let host = cluster
            .choose(&crate::lb::LbContext::default())
            .ok_or_else(|| {
                anyhow::anyhow!("no healthy host in ADS cluster {}", self.config.ads_cluster)
            })?;
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", host.addr))?
            .connect_timeout(cluster.config.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        Ok(endpoint.connect().await?)
    }

    fn subscriptions(&self, type_url: &str) -> Vec<String> {
        match type_url {
            EDS => self.eds_names.iter().cloned().collect(),
            RDS => self.rds_names.iter().cloned().collect(),
            _ => Vec::new(),
        }
    }

    fn wildcard_types(&self) -> Vec<&'static str> {
        let mut types = Vec::new();
        if self.config.cds.is_some() {
            types.push(CDS);
        }
        if self.config.lds.is_some() {
            types.push(LDS);
        }
        types
    }

    // === state of the world ===

    fn sotw_request(
        &self,
        type_url: &'static str,
        error: Option<String>,
        version: Option<String>,
    ) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version
                .unwrap_or_else(|| self.versions.get(type_url).cloned().unwrap_or_default()),
            node: Some(self.node()),
            resource_names: self.subscriptions(type_url),
            type_url: type_url.to_string(),
            response_nonce: self.nonces.get(type_url).cloned().unwrap_or_default(),
            error_detail: error.map(|message| RpcStatus {
                code: 13,
                message,
                details: Vec::new(),
            }),
        }
    }

    async fn run_sotw(&mut self, channel: tonic::transport::Channel) -> bool {
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(64);
        self.nonces.clear();
        for type_url in self.wildcard_types() {
            let _ = tx.send(self.sotw_request(type_url, None, None)).await;
        }
        if !self.eds_names.is_empty() {
            let _ = tx.send(self.sotw_request(EDS, None, None)).await;
        }
        if !self.rds_names.is_empty() {
            let _ = tx.send(self.sotw_request(RDS, None, None)).await;
        }
        let mut inbound = match client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::warn!(%status, "xDS: ADS stream refused");
                return false;
            }
        };
        tracing::info!("xDS: ADS stream (SotW) established");
        let mut got_response = false;
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(response)) => {
                        got_response = true;
                        self.on_sotw_response(response, &tx).await;
                    }
                    Ok(None) => return got_response,
                    Err(status) => {
                        tracing::warn!(%status, "xDS: ADS stream failed");
                        return got_response;
                    }
                },
                Some(event) = self.events.recv() => self.on_event(event, &Sink::Sotw(&tx)).await,
            }
        }
    }

    async fn on_sotw_response(
        &mut self,
        response: DiscoveryResponse,
        tx: &mpsc::Sender<DiscoveryRequest>,
    ) {
        let Some(type_url) = static_type(&response.type_url) else {
            tracing::warn!(type_url = %response.type_url, "xDS: ignoring unknown type");
            return;
        };
        let mut errors = Vec::new();
        let mut incoming = BTreeMap::new();
        for any in &response.resources {
            match resource_name(type_url, any) {
                Ok(name) => {
                    if incoming
                        .insert(name.clone(), (response.version_info.clone(), any.clone()))
                        .is_some()
                    {
                        errors.push(format!(
                            "{} {name}: duplicate resource name in one response",
                            short(type_url)
                        ));
                    }
                }
                Err(error) => errors.push(error),
            }
        }
        if errors.is_empty() {
            let desired = self.desired.entry(type_url).or_default();
            match type_url {
                CDS | LDS => *desired = incoming,
                _ => desired.extend(incoming),
            }
            errors = self.apply(type_url);
        }
        self.nonces.insert(type_url, response.nonce.clone());
        let accepted = errors.is_empty();
        if accepted {
            self.versions
                .insert(type_url, response.version_info.clone());
            self.server.xds.update(|s| {
                s.versions
                    .insert(type_url.to_string(), response.version_info.clone());
            });
        }
        let error = (!accepted).then(|| errors.join("; "));
        if let Some(error) = &error {
            tracing::warn!(type_url, version = %response.version_info, %error, "xDS: NACK");
        }
        let _ = tx.send(self.sotw_request(type_url, error, None)).await;
        self.initial_done.insert(type_url);
        self.resubscribe(&Sink::Sotw(tx)).await;
        self.check_ready();
    }

    // === delta ===

    fn delta_request(
        &self,
        type_url: &'static str,
        subscribe: Vec<String>,
        unsubscribe: Vec<String>,
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.node()),
            type_url: type_url.to_string(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            initial_resource_versions: HashMap::new(),
            response_nonce: String::new(),
            error_detail: None,
        }
    }

    async fn run_delta(&mut self, channel: tonic::transport::Channel) -> bool {
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(64);
        let mut types: Vec<&'static str> = self.wildcard_types();
        if !self.eds_names.is_empty() {
            types.push(EDS);
        }
        if !self.rds_names.is_empty() {
            types.push(RDS);
        }
        for type_url in types {
            let mut request =
                self.delta_request(type_url, self.subscriptions(type_url), Vec::new());
            request.initial_resource_versions = self
                .desired
                .get(type_url)
                .map(|d| {
                    d.iter()
                        .map(|(name, (version, _))| (name.clone(), version.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let _ = tx.send(request).await;
        }
        let mut inbound = match client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::warn!(%status, "xDS: delta ADS stream refused");
                return false;
            }
        };
        tracing::info!("xDS: ADS stream (delta) established");
        let mut got_response = false;
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(response)) => {
                        got_response = true;
                        self.on_delta_response(response, &tx).await;
                    }
                    Ok(None) => return got_response,
                    Err(status) => {
                        tracing::warn!(%status, "xDS: delta ADS stream failed");
                        return got_response;
                    }
                },
                Some(event) = self.events.recv() => self.on_event(event, &Sink::Delta(&tx)).await,
            }
        }
    }

    async fn on_delta_response(
        &mut self,
        response: DeltaDiscoveryResponse,
        tx: &mpsc::Sender<DeltaDiscoveryRequest>,
    ) {
        let Some(type_url) = static_type(&response.type_url) else {
            tracing::warn!(type_url = %response.type_url, "xDS: ignoring unknown type");
            return;
        };
        let mut errors = Vec::new();
        let mut updates = Vec::new();
        for resource in &response.resources {
            let Some(any) = &resource.resource else {
                errors.push(format!(
                    "{} {}: resource body missing",
                    short(type_url),
                    resource.name
                ));
                continue;
            };
            match resource_name(type_url, any) {
                Ok(name) if name == resource.name || resource.name.is_empty() => {
                    updates.push((name, (resource.version.clone(), any.clone())))
                }
                Ok(name) => errors.push(format!(
                    "{} {}: the resource is named {name:?}",
                    short(type_url),
                    resource.name
                )),
                Err(error) => errors.push(error),
            }
        }
        if errors.is_empty() {
            let desired = self.desired.entry(type_url).or_default();
            for (name, value) in updates {
                desired.insert(name, value);
            }
            for name in &response.removed_resources {
                desired.remove(name);
            }
            errors = self.apply(type_url);
        }
        let accepted = errors.is_empty();
        if accepted {
            self.versions
                .insert(type_url, response.system_version_info.clone());
            self.server.xds.update(|s| {
                s.versions
                    .insert(type_url.to_string(), response.system_version_info.clone());
            });
        }
        let mut ack = self.delta_request(type_url, Vec::new(), Vec::new());
        ack.response_nonce = response.nonce.clone();
        if !accepted {
            let message = errors.join("; ");
            tracing::warn!(type_url, %message, "xDS: NACK");
            ack.error_detail = Some(RpcStatus {
                code: 13,
                message,
                details: Vec::new(),
            });
        }
        let _ = tx.send(ack).await;
        self.initial_done.insert(type_url);
        self.resubscribe(&Sink::Delta(tx)).await;
        self.check_ready();
    }

    // === subscriptions ===

    /// Recomputes the EDS and RDS names we need and tells the server about changes.
    async fn resubscribe(&mut self, sink: &Sink<'_>) {
        let mut eds = BTreeSet::new();
        for cluster in self
            .server
            .clusters
            .all()
            .values()
            .chain(self.warming_clusters.values())
        {
            if let DiscoveryType::Eds { service_name, .. } = &cluster.config.discovery {
                eds.insert(service_name.clone());
            }
        }
        let mut rds = BTreeSet::new();
        for listener in self.server.listeners.list() {
            rds.extend(listener_route_names(&listener.config));
        }
        for listener in self.warming_listeners.values() {
            rds.extend(listener_route_names(listener));
        }
        for (type_url, wanted) in [(EDS, eds), (RDS, rds)] {
            let current = if type_url == EDS {
                &self.eds_names
            } else {
                &self.rds_names
            };
            if *current == wanted {
                continue;
            }
            let added: Vec<String> = wanted.difference(current).cloned().collect();
            let removed: Vec<String> = current.difference(&wanted).cloned().collect();
            // Forget resources no longer wanted.
            if let Some(desired) = self.desired.get_mut(type_url) {
                for name in &removed {
                    desired.remove(name);
                }
            }
            if let Some(applied) = self.applied.get_mut(type_url) {
                for name in &removed {
                    applied.remove(name);
                }
            }
            if type_url == EDS {
                self.eds_names = wanted;
            } else {
                self.rds_names = wanted;
                let mut routes = (**self.server.routes.load()).clone();
                for name in &removed {
                    routes.remove(name);
                }
                self.server.routes.store(Arc::new(routes));
            }
            match sink {
                Sink::Sotw(tx) => {
                    let _ = tx.send(self.sotw_request(type_url, None, None)).await;
                }
                Sink::Delta(tx) => {
                    let _ = tx.send(self.delta_request(type_url, added, removed)).await;
                }
                Sink::Disconnected => {}
            }
        }
    }

    // === apply ===

    fn record_error(&self, type_url: &str, name: &str, message: &str) {
        let entry = json!({"details": message, "last_update_attempt": now()});
        self.server.xds.update(|s| {
            s.errors
                .insert((type_url.to_string(), name.to_string()), entry);
        });
    }

    fn clear_error(&self, type_url: &str, name: &str) {
        self.server.xds.update(|s| {
            s.errors.remove(&(type_url.to_string(), name.to_string()));
        });
    }

    /// Applies the desired set of one type; returns NACK messages.
    fn apply(&mut self, type_url: &'static str) -> Vec<String> {
        let desired = self.desired.get(type_url).cloned().unwrap_or_default();
        let mut applied = self.applied.remove(type_url).unwrap_or_default();
        let mut errors = Vec::new();
        let mut changed = Vec::new();
        for (name, (_, any)) in &desired {
            let hash = payload_hash(any);
            if applied.get(name) == Some(&hash) {
                continue;
            }
            // The strictness gate for every xDS resource, on the bytes as received: once decoded,
            // prost has already dropped fields our protos do not declare.
            let checked = strict::check_bytes(message_name(type_url), &any.value, "")
                .map_err(|error| error.to_string());
            let result = checked.and_then(|()| match type_url {
                CDS => self.apply_cluster(name, any),
                EDS => self.apply_endpoints(name, any),
                LDS => self.apply_listener(name, any),
                RDS => self.apply_route(name, any),
                _ => Ok(()),
            });
            match result {
                Ok(()) => {
                    applied.insert(name.clone(), hash);
                    self.clear_error(type_url, name);
                    changed.push(name.clone());
                }
                Err(message) => {
                    let message = format!("{} {name}: {message}", short(type_url));
                    self.record_error(type_url, name, &message);
                    errors.push(message);
                }
            }
        }
        let removed: Vec<String> = applied
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        for name in &removed {
            applied.remove(name);
            self.clear_error(type_url, name);
            match type_url {
                CDS => {
                    self.warming_clusters.remove(name);
                    self.server.clusters.remove(std::slice::from_ref(name));
                }
                LDS => {
                    self.warming_listeners.remove(name);
                    self.server.listeners.remove(&self.server, name);
                }
                RDS => {
                    let mut routes = (**self.server.routes.load()).clone();
                    routes.remove(name);
                    self.server.routes.store(Arc::new(routes));
                }
                _ => {
                    self.endpoint_cache.remove(name);
                    self.server.xds.update(|s| {
                        s.endpoints.remove(name);
                    });
                }
            }
        }
        self.applied.insert(type_url, applied);
        if type_url == RDS {
            self.promote_listeners();
        }
        self.publish_warming();
        if !changed.is_empty() || !removed.is_empty() {
            tracing::info!(type_url, changed = ?changed, removed = ?removed, "xDS: applied");
        }
        errors
    }

    fn apply_cluster(&mut self, name: &str, any: &Any) -> Result<(), String> {
        if self.server.is_static_cluster(name) {
            return Err("a static cluster of that name exists".into());
        }
        let proto = ClusterProto::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
        let model = convert::cluster(&proto, "").map_err(|e| e.to_string())?;
        let runtime = self.server.clusters.build(Arc::new(model));
        self.warming_clusters.remove(name);
        match &runtime.config.discovery {
            DiscoveryType::Eds {
                service_name,
                source,
            } => {
                if let Some(assignment) = self.endpoint_cache.get(service_name) {
                    runtime.set_assignment(assignment);
                    self.server.clusters.insert_all(vec![runtime]);
                } else {
                    if !source.initial_fetch_timeout.is_zero() {
                        self.timer(
                            source.initial_fetch_timeout,
                            Event::ClusterWarming(name.to_string(), Arc::as_ptr(&runtime) as u64),
                        );
                    }
                    self.warming_clusters.insert(name.to_string(), runtime);
                }
            }
            _ => {
                runtime.start_background();
                self.server.clusters.insert_all(vec![runtime]);
            }
        }
        Ok(())
    }

    fn apply_endpoints(&mut self, name: &str, any: &Any) -> Result<(), String> {
        let proto =
            ClusterLoadAssignment::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
        let assignment = convert::load_assignment_resource(&proto).map_err(|e| e.to_string())?;
        let raw = RawConfig::of(&proto);
        self.server.xds.update(|s| {
            s.endpoints.insert(name.to_string(), raw);
        });
        for cluster in self.server.clusters.all().values() {
            if matches!(&cluster.config.discovery, DiscoveryType::Eds { service_name, .. } if service_name == name)
            {
                cluster.set_assignment(&assignment);
            }
        }
        let ready: Vec<String> = self
            .warming_clusters
            .iter()
            .filter(|(_, c)| matches!(&c.config.discovery, DiscoveryType::Eds { service_name, .. } if service_name == name))
            .map(|(n, _)| n.clone())
            .collect();
        for cluster_name in ready {
            if let Some(cluster) = self.warming_clusters.remove(&cluster_name) {
                cluster.set_assignment(&assignment);
                self.server.clusters.insert_all(vec![cluster]);
            }
        }
        self.endpoint_cache.insert(name.to_string(), assignment);
        Ok(())
    }

    fn apply_listener(&mut self, name: &str, any: &Any) -> Result<(), String> {
        if self.server.is_static_listener(name) {
            return Err("a static listener of that name exists".into());
        }
        let proto = ListenerProto::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
        let model = Arc::new(convert::listener(&proto, "").map_err(|e| e.to_string())?);
        self.warming_listeners.remove(name);
        let routes = self.server.routes.load();
        let missing = listener_route_names(&model)
            .iter()
            .any(|r| !routes.contains_key(r));
        if missing {
            let timeout = listener_route_timeout(&model);
            if !timeout.is_zero() {
                self.timer(
                    timeout,
                    Event::ListenerWarming(name.to_string(), Arc::as_ptr(&model) as u64),
                );
            }
            self.warming_listeners.insert(name.to_string(), model);
            Ok(())
        } else {
            self.server
                .listeners
                .add_or_update(&self.server, model)
                .map(|_| ())
                .map_err(|e| format!("cannot bind: {e}"))
        }
    }

    fn apply_route(&mut self, name: &str, any: &Any) -> Result<(), String> {
        let proto = RouteConfiguration::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
        let table = RouteTable::compile(&proto, "").map_err(|e| e.to_string())?;
        let mut routes = (**self.server.routes.load()).clone();
        routes.insert(name.to_string(), Arc::new(table));
        self.server.routes.store(Arc::new(routes));
        Ok(())
    }

    fn promote_listeners(&mut self) {
        let routes = self.server.routes.load_full();
        let ready: Vec<String> = self
            .warming_listeners
            .iter()
            .filter(|(_, l)| {
                listener_route_names(l)
                    .iter()
                    .all(|r| routes.contains_key(r))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in ready {
            if let Some(listener) = self.warming_listeners.remove(&name) {
                self.start_listener(&name, listener);
            }
        }
    }

    fn start_listener(&self, name: &str, listener: Arc<Listener>) {
        if let Err(error) = self.server.listeners.add_or_update(&self.server, listener) {
            let message = format!("Listener {name}: cannot bind: {error}");
            tracing::warn!(%message);
            self.record_error(LDS, name, &message);
        }
    }

    fn publish_warming(&self) {
        let warming: Vec<RawConfig> = self
            .warming_clusters
            .values()
            .map(|c| c.config.raw.clone())
            .collect();
        self.server.xds.update(|s| s.warming_clusters = warming);
    }

    async fn on_event(&mut self, event: Event, sink: &Sink<'_>) {
        match event {
            Event::InitialFetch(type_url) => {
                if self.initial_done.insert(type_url) {
                    tracing::warn!(
                        type_url,
                        "xDS: initial fetch timed out; continuing without it"
                    );
                }
            }
            Event::ClusterWarming(name, id) => {
                if self
                    .warming_clusters
                    .get(&name)
                    .is_some_and(|c| Arc::as_ptr(c) as u64 == id)
                    && let Some(cluster) = self.warming_clusters.remove(&name)
                {
                    tracing::warn!(cluster = %name, "xDS: endpoints did not arrive in time; activating without endpoints");
                    cluster.mark_initialized();
                    self.server.clusters.insert_all(vec![cluster]);
                    self.publish_warming();
                }
            }
            Event::ListenerWarming(name, id) => {
                if self
                    .warming_listeners
                    .get(&name)
                    .is_some_and(|l| Arc::as_ptr(l) as u64 == id)
                    && let Some(listener) = self.warming_listeners.remove(&name)
                {
                    tracing::warn!(listener = %name, "xDS: routes did not arrive in time; starting the listener without them");
                    self.start_listener(&name, listener);
                }
            }
        }
        self.resubscribe(sink).await;
        self.check_ready();
    }

    fn check_ready(&self) {
        if self.server.state() != State::Initializing {
            return;
        }
        let initial = self
            .wildcard_types()
            .iter()
            .all(|t| self.initial_done.contains(t));
        if initial && self.warming_clusters.is_empty() && self.warming_listeners.is_empty() {
            tracing::info!("xDS: initial configuration applied; server is live");
            self.server.set_state(State::Live);
            self.server.registry.gauge("server.live").set(1);
        }
    }
}
