//! The xDS client: one ADS stream (state-of-the-world `GRPC` or incremental `DELTA_GRPC`) to the
//! bootstrap's `ads_config` cluster carrying CDS, EDS, LDS, RDS and SDS. In parts:
//!
//! - [`transport`]: the connection (through the ADS cluster's connect path, TLS included) and
//!   the reconnect backoff;
//! - [`sotw`] and [`delta`]: the two protocol variants as state machines without I/O, turning
//!   responses into [`Received`] updates and composing subscriptions, ACKs and NACKs;
//! - [`subscriptions`]: which EDS and RDS names the current config needs;
//! - [`apply`]: converting and putting resources in place, with errors that name the resource
//!   and field (the NACK); [`warming`]: clusters wait for endpoints and listeners for routes;
//! - [`status`]: what `/config_dump` shows;
//! - [`sds`]: the streams of secrets whose `sds_config` is a gRPC source of their own.
//!
//! The stream reconnects with jittered exponential backoff; nothing is removed while
//! disconnected, so the last good config keeps serving.

mod apply;
mod csr;
mod delta;
pub mod sds;
mod sotw;
mod stats;
mod status;
mod subscriptions;
mod transport;
mod warming;

use std::collections::BTreeSet;
use std::sync::Arc;

use prost_types::Any;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use xds_api::type_urls::{
    CLUSTER as CDS, CLUSTER_LOAD_ASSIGNMENT as EDS, LISTENER as LDS, ROUTE_CONFIGURATION as RDS,
    SECRET as SDS,
};

pub use status::{Status, StatusSnapshot};

use self::apply::Applier;
use self::warming::{Deadline, Warming};
use crate::config::{AdsFlavor, DiscoveryType, DynamicResources};
use crate::lifecycle::{InitPart, Lifecycle};
use crate::listener::ListenerManager;
use crate::stats::Registry;
use crate::store::Store;

/// What the xDS client needs from the rest of the proxy.
#[derive(Debug, Clone)]
pub struct XdsContext {
    pub config: DynamicResources,
    pub node: Node,
    pub static_clusters: Vec<String>,
    pub static_listeners: Vec<String>,
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub listeners: Arc<ListenerManager>,
    pub lifecycle: Arc<Lifecycle>,
    pub status: Arc<Status>,
    /// Where secrets arriving over ADS go.
    pub secrets: Arc<crate::tls::Secrets>,
    /// The token file and the secret made by certificate request, if any.
    pub identity: crate::cli::XdsIdentity,
    /// Worker count (clusters keep one pool per worker).
    pub concurrency: usize,
    /// The ADS secrets static listeners and clusters name: asked for from the first request
    /// on, as static listeners start only once they are in (or timed out).
    pub static_secrets: std::collections::BTreeSet<String>,
}

/// One resource as received.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub payload: Any,
}

/// What one response brought, for one type.
#[derive(Debug, Clone)]
pub struct Received {
    pub type_url: &'static str,
    /// The response's version (SotW) or system version (delta).
    pub version: String,
    pub nonce: String,
    pub upserts: Vec<Resource>,
    pub removals: Vec<String>,
    /// The upserts are the whole set of the type (SotW listeners and clusters).
    pub replace: bool,
    /// Problems found reading the response itself (they NACK it whole).
    pub errors: Vec<String>,
}

/// The resource types Remora takes.
pub fn known_type(type_url: &str) -> Option<&'static str> {
    [CDS, EDS, LDS, RDS, SDS]
        .into_iter()
        .find(|t| *t == type_url)
}

/// A type's resource name, for messages.
pub fn short(type_url: &str) -> &'static str {
    match type_url {
        CDS => "Cluster",
        EDS => "ClusterLoadAssignment",
        LDS => "Listener",
        RDS => "RouteConfiguration",
        SDS => "Secret",
        _ => "resource",
    }
}

/// A gRPC channel to cluster `name` through the xDS streams' transport (its TLS, or its pipe),
/// for other gRPC clients of the proxy's own; `role` names the stream in errors.
pub async fn grpc_channel(
    store: &Store,
    name: &str,
    role: &str,
) -> anyhow::Result<tonic::transport::Channel> {
    transport::connect_cluster(store, name, role).await
}

/// Starts the ADS client on the current (main) runtime.
pub fn start(context: XdsContext) {
    let mut node = context.node.clone();
    if node.user_agent_name.is_empty() {
        node.user_agent_name = "remora".into();
    }
    let node_once = context.config.node_on_first_message_only;
    let context_secrets = context.secrets.clone();
    let csr = context
        .identity
        .csr_secret
        .clone()
        .map(|name| (Arc::new(context.clone()), name));
    let changed = match context.config.flavor {
        AdsFlavor::StateOfTheWorld => {
            let client = Client::new(context, sotw::Sotw::new(node, node_once));
            let changed = client.applier.warming.sender();
            tokio::spawn(client.run());
            changed
        }
        AdsFlavor::Delta => {
            let client = Client::new(context, delta::Delta::new(node, node_once));
            let changed = client.applier.warming.sender();
            tokio::spawn(client.run());
            changed
        }
    };
    // A secret arriving by another way (a file, an SDS stream of its own) lets what waits
    // for it go live.
    let mut secret_changes = context_secrets.changes();
    let notify = changed.clone();
    tokio::spawn(async move {
        while secret_changes.changed().await.is_ok() {
            if notify.send(Deadline::SecretChanged).is_err() {
                return;
            }
        }
    });
    if let Some((context, name)) = csr {
        tokio::spawn(csr::keep_signed(context, name, changed));
    }
}

type AdsClient = AggregatedDiscoveryServiceClient<tonic::transport::Channel>;

/// A protocol variant of the ADS stream (SotW or delta): its messages and state machine.
trait Variant: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// For logs.
    const NAME: &'static str;
    /// The first requests of a new stream.
    fn start(&mut self, wildcard: &[&'static str]) -> Vec<Self::Request>;
    /// A response read: its update, or a NACK to send at once.
    fn receive(&mut self, response: Self::Response) -> Result<Received, Box<Self::Request>>;
    /// The ACK or NACK of an update.
    fn answer(&mut self, received: &Received, errors: &[String]) -> Self::Request;
    /// The request for a changed subscription, if it changed.
    fn subscribe(
        &mut self,
        type_url: &'static str,
        names: &BTreeSet<String>,
    ) -> Option<Self::Request>;
    /// Opens the stream.
    fn open(
        client: &mut AdsClient,
        requests: tonic::Request<ReceiverStream<Self::Request>>,
    ) -> impl std::future::Future<
        Output = Result<tonic::codec::Streaming<Self::Response>, tonic::Status>,
    > + Send;
}

impl Variant for sotw::Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "SotW";
    fn start(&mut self, wildcard: &[&'static str]) -> Vec<DiscoveryRequest> {
        sotw::Sotw::start(self, wildcard)
    }
    fn receive(&mut self, response: DiscoveryResponse) -> Result<Received, Box<DiscoveryRequest>> {
        sotw::Sotw::receive(self, response)
    }
    fn answer(&mut self, received: &Received, errors: &[String]) -> DiscoveryRequest {
        sotw::Sotw::answer(self, received, errors)
    }
    fn subscribe(
        &mut self,
        type_url: &'static str,
        names: &BTreeSet<String>,
    ) -> Option<DiscoveryRequest> {
        sotw::Sotw::subscribe(self, type_url, names)
    }
    async fn open(
        client: &mut AdsClient,
        requests: tonic::Request<ReceiverStream<DiscoveryRequest>>,
    ) -> Result<tonic::codec::Streaming<DiscoveryResponse>, tonic::Status> {
        Ok(client
            .stream_aggregated_resources(requests)
            .await?
            .into_inner())
    }
}

impl Variant for delta::Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";
    fn start(&mut self, wildcard: &[&'static str]) -> Vec<DeltaDiscoveryRequest> {
        delta::Delta::start(self, wildcard)
    }
    fn receive(
        &mut self,
        response: DeltaDiscoveryResponse,
    ) -> Result<Received, Box<DeltaDiscoveryRequest>> {
        delta::Delta::receive(self, response)
    }
    fn answer(&mut self, received: &Received, errors: &[String]) -> DeltaDiscoveryRequest {
        delta::Delta::answer(self, received, errors)
    }
    fn subscribe(
        &mut self,
        type_url: &'static str,
        names: &BTreeSet<String>,
    ) -> Option<DeltaDiscoveryRequest> {
        delta::Delta::subscribe(self, type_url, names)
    }
    async fn open(
        client: &mut AdsClient,
        requests: tonic::Request<ReceiverStream<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::codec::Streaming<DeltaDiscoveryResponse>, tonic::Status> {
        Ok(client
            .delta_aggregated_resources(requests)
            .await?
            .into_inner())
    }
}

struct Client<V: Variant> {
    protocol: V,
    applier: Applier,
    stats: stats::XdsStats,
    deadlines: mpsc::UnboundedReceiver<Deadline>,
    /// Wildcard types whose first response (or initial fetch timeout) is in.
    initial_done: BTreeSet<&'static str>,
    subscribed: subscriptions::Wanted,
}

/// Where requests go: the current stream, or nowhere while disconnected (the next stream's
/// first requests carry the state).
type Sink<'a, V> = Option<&'a mpsc::Sender<<V as Variant>::Request>>;

impl<V: Variant> Client<V> {
    fn new(context: XdsContext, protocol: V) -> Self {
        let (deadline_tx, deadlines) = mpsc::unbounded_channel();
        let mut stats = stats::XdsStats::new(
            &context.registry,
            context.config.flavor == AdsFlavor::Delta,
            context.config.cds.is_some(),
            context.config.lds.is_some(),
        );
        // Static EDS clusters subscribe now, as those from CDS do when they are made.
        for cluster in context.store.load().clusters.values() {
            if matches!(cluster.config.discovery, DiscoveryType::Eds { .. }) {
                stats.subscribe_endpoints(cluster.name(), cluster.stats.clone());
            }
        }
        Client {
            protocol,
            stats,
            applier: Applier::new(context, Warming::new(deadline_tx)),
            deadlines,
            initial_done: BTreeSet::new(),
            subscribed: subscriptions::Wanted::default(),
        }
    }

    fn context(&self) -> &XdsContext {
        &self.applier.context
    }

    fn wildcard_types(&self) -> Vec<&'static str> {
        let config = &self.context().config;
        let mut types = Vec::new();
        if config.cds.is_some() {
            types.push(CDS);
        }
        if config.lds.is_some() {
            types.push(LDS);
        }
        types
    }

    async fn run(mut self) {
        let config = self.context().config.clone();
        for (type_url, source) in [(CDS, config.cds), (LDS, config.lds)] {
            match source {
                Some(source) => self.applier.warming.schedule(
                    source.initial_fetch_timeout,
                    Deadline::InitialFetch(type_url),
                ),
                None => {
                    self.initial_done.insert(type_url);
                }
            }
        }
        self.check_ready();
        let mut backoff = transport::Backoff::default();
        loop {
            let got_response = match self.stream().await {
                Ok(got_response) => got_response,
                Err(error) => {
                    tracing::warn!(%error, "xDS: cannot open the ADS stream");
                    false
                }
            };
            self.context().status.update(|s| s.connected = false);
            self.stats.set_connected(false);
            for subscription in self.stats.all() {
                subscription.failed();
            }
            if got_response {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::info!(?delay, "xDS: stream closed; reconnecting after backoff");
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    Some(deadline) = self.deadlines.recv() => self.on_deadline(deadline, None).await,
                }
            }
        }
    }

    /// One stream, from connect to close; whether it got any response. `GrpcService.timeout`
    /// bounds connecting and opening the stream.
    async fn stream(&mut self) -> anyhow::Result<bool> {
        let timeout = self.context().config.stream_timeout;
        let (tx, rx) = mpsc::channel(64);
        for request in self.protocol.start(&self.wildcard_types()) {
            let _ = tx.send(request).await;
        }
        // Names wanted before any response (the secrets of static listeners and clusters).
        self.resubscribe(Some(&tx)).await;
        let context = self.context();
        let open = async {
            let channel = transport::connect(context).await?;
            let mut client = AggregatedDiscoveryServiceClient::new(channel);
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            transport::add_credentials(context, request.metadata_mut())?;
            anyhow::Ok(V::open(&mut client, request).await?)
        };
        let mut inbound = match timeout {
            Some(timeout) => tokio::time::timeout(timeout, open).await.map_err(|_| {
                anyhow::anyhow!("no ADS stream within the grpc_service timeout {timeout:?}")
            })??,
            None => open.await?,
        };
        tracing::info!("xDS: ADS stream ({}) established", V::NAME);
        self.context().status.update(|s| s.connected = true);
        self.stats.set_connected(true);
        let mut got_response = false;
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(response)) => {
                        got_response = true;
                        match self.protocol.receive(response) {
                            Ok(received) => self.on_received(received, Some(&tx)).await,
                            Err(nack) => { let _ = tx.send(*nack).await; }
                        }
                    }
                    Ok(None) => return Ok(got_response),
                    Err(status) => {
                        tracing::warn!(%status, "xDS: ADS stream failed");
                        return Ok(got_response);
                    }
                },
                Some(deadline) = self.deadlines.recv() => self.on_deadline(deadline, Some(&tx)).await,
            }
        }
    }

    /// Applies a response, answers it (ACK or NACK), then updates subscriptions.
    async fn on_received(&mut self, received: Received, sink: Sink<'_, V>) {
        let errors = self.applier.receive(&received);
        self.count(&received, !errors.is_empty());
        if errors.is_empty() {
            let version = received.version.clone();
            self.context().status.update(|s| {
                s.versions.insert(received.type_url.to_string(), version);
            });
        } else {
            tracing::warn!(type_url = received.type_url, version = %received.version, error = %errors.join("; "), "xDS: NACK");
        }
        let answer = self.protocol.answer(&received, &errors);
        if let Some(tx) = sink {
            let _ = tx.send(answer).await;
        }
        self.initial_done.insert(received.type_url);
        self.resubscribe(sink).await;
        self.check_ready();
    }

    async fn on_deadline(&mut self, deadline: Deadline, sink: Sink<'_, V>) {
        if let Deadline::InitialFetch(type_url) = deadline {
            if self.initial_done.insert(type_url) {
                if let Some(subscription) = self.stats.wildcard(type_url) {
                    subscription.timed_out();
                }
                tracing::warn!(
                    type_url,
                    "xDS: initial fetch timed out; continuing without it"
                );
            }
        } else {
            for (type_url, name) in self.applier.expire(&deadline) {
                let subscription = if type_url == EDS {
                    self.stats.endpoints.get(&name)
                } else {
                    self.stats.routes.get(&name)
                };
                if let Some(subscription) = subscription {
                    subscription.timed_out();
                }
            }
        }
        self.resubscribe(sink).await;
        self.check_ready();
    }

    /// Counts a response in the stats of the subscriptions it concerns: a wildcard type's, or
    /// those whose resources it carries. A NACK is every one's rejection, as in Envoy.
    fn count(&mut self, received: &Received, nacked: bool) {
        // Taken, so that the outcome holds no cluster until the next response.
        let made = std::mem::take(&mut self.applier.outcome.eds_clusters);
        let outcome = &self.applier.outcome;
        let delta = self.stats.delta;
        let count = |subscription: &stats::Subscription, changed: bool| {
            if nacked {
                subscription.rejected(delta);
            } else {
                subscription.accepted(&received.version, changed);
            }
        };
        match received.type_url {
            CDS | LDS => {
                // Envoy 1.40 counts no `config_reload` for an update that only removes.
                let changed = !outcome.changed.is_empty();
                if let Some(subscription) = self.stats.wildcard(received.type_url) {
                    count(subscription, changed);
                }
                if received.type_url == CDS {
                    for name in &outcome.removed {
                        self.stats.endpoints.remove(name);
                    }
                    for cluster in &made {
                        self.stats
                            .subscribe_endpoints(cluster.name(), cluster.stats.clone());
                    }
                }
            }
            RDS => {
                for resource in &received.upserts {
                    if let Some(subscription) = self.stats.routes.get(&resource.name) {
                        count(subscription, outcome.changed.contains(&resource.name));
                    }
                }
            }
            EDS => {
                let carried: std::collections::HashSet<&str> =
                    received.upserts.iter().map(|r| r.name.as_str()).collect();
                let snapshot = self.applier.context.store.load();
                let clusters = snapshot
                    .clusters
                    .values()
                    .chain(self.applier.warming.clusters());
                for cluster in clusters {
                    let DiscoveryType::Eds { service_name, .. } = &cluster.config.discovery else {
                        continue;
                    };
                    let Some(subscription) = self.stats.endpoints.get(cluster.name()) else {
                        continue;
                    };
                    if !carried.contains(service_name.as_str()) {
                        continue;
                    }
                    let unchanged = outcome.unchanged.contains(service_name);
                    count(subscription, !unchanged);
                    if unchanged && !nacked {
                        cluster.stats.update_no_rebuild.inc();
                    }
                }
            }
            _ => {}
        }
    }

    /// Tells the server about changed EDS and RDS subscriptions, and forgets what is no longer
    /// wanted.
    async fn resubscribe(&mut self, sink: Sink<'_, V>) {
        let wanted = subscriptions::wanted(&self.applier);
        if wanted == self.subscribed {
            return;
        }
        self.stats
            .routes
            .retain(|name, _| wanted.routes.contains(name));
        for name in wanted.routes.difference(&self.subscribed.routes) {
            if let Some(prefix) = subscriptions::route_stat_prefix(&self.applier, name) {
                self.stats.subscribe_routes(name, &prefix);
            }
        }
        for (type_url, names, before) in [
            (EDS, &wanted.endpoints, &self.subscribed.endpoints),
            (RDS, &wanted.routes, &self.subscribed.routes),
            (SDS, &wanted.secrets, &self.subscribed.secrets),
        ] {
            let dropped: Vec<String> = before.difference(names).cloned().collect();
            self.applier.forget(type_url, &dropped);
            if let Some(request) = self.protocol.subscribe(type_url, names)
                && let Some(tx) = sink
            {
                let _ = tx.send(request).await;
            }
        }
        self.subscribed = wanted;
    }

    fn check_ready(&self) {
        let lifecycle = &self.context().lifecycle;
        if !lifecycle.waiting_for(InitPart::Xds) {
            return;
        }
        let initial = self
            .wildcard_types()
            .iter()
            .all(|t| self.initial_done.contains(t));
        if initial && self.applier.warming.is_empty() {
            tracing::info!("xDS: initial configuration applied");
            lifecycle.init_done(InitPart::Xds);
        }
    }
}
