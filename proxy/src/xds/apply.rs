//! Applying what arrived: received resources are merged into the desired set of their type,
//! then each new or changed resource is converted (through the config gate), built and put in
//! place — clusters and route tables into the config store, listeners into the listener
//! manager. What does not convert keeps its last good version and is reported with its name
//! and field; that message becomes the NACK.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prost_types::Any;
use serde_json::json;
use xds_api::type_urls::{
    CLUSTER as CDS, CLUSTER_LOAD_ASSIGNMENT as EDS, LISTENER as LDS, ROUTE_CONFIGURATION as RDS,
    SECRET as SDS,
};

use super::warming::{Deadline, Warming};
use super::{Received, XdsContext, short};
use crate::config::{
    DiscoveryType, Files, Listener, LoadAssignment, RawConfig, RouteSource, SecretSource, resource,
};
use crate::upstream::Cluster;
use remora_config::tls::SdsSecret;

/// The longest of `timeouts`, zero (wait for ever) being longest of all.
fn longest(timeouts: impl IntoIterator<Item = Duration>) -> Duration {
    timeouts
        .into_iter()
        .try_fold(Duration::ZERO, |longest, t| {
            if t.is_zero() {
                None
            } else {
                Some(longest.max(t))
            }
        })
        .unwrap_or(Duration::ZERO)
}

/// The names of the secrets of `named` that have not arrived, for logs.
fn missing_secrets<'a>(
    secrets: &crate::tls::Secrets,
    named: impl Iterator<Item = &'a SdsSecret>,
) -> Vec<String> {
    named
        .filter(|sds| secrets.peek(sds).is_none())
        .map(|sds| sds.name.clone())
        .collect()
}

/// The desired resources of one type: name → (version, payload).
type Desired = BTreeMap<String, (String, Any)>;

pub struct Applier {
    pub context: XdsContext,
    desired: HashMap<&'static str, Desired>,
    /// The digest of the payload applied, per type and name.
    applied: HashMap<&'static str, BTreeMap<String, u64>>,
    /// Endpoints by EDS service name, for clusters that arrive after their endpoints.
    endpoints: BTreeMap<String, LoadAssignment>,
    pub warming: Warming,
    /// Clusters made ready while applying one response, put in the store together: each
    /// store change copies the snapshot, so one per cluster made a large CDS update quadratic.
    ready: Vec<Arc<Cluster>>,
    /// What the last response did, for the xDS stats.
    pub outcome: Outcome,
    /// Clusters and listeners added, changed and removed.
    manager_stats: crate::stats::ManagerStats,
}

/// What applying one response did, by resource name.
#[derive(Debug, Default)]
pub struct Outcome {
    /// New or changed, and applied.
    pub changed: std::collections::BTreeSet<String>,
    /// The same as already applied.
    pub unchanged: std::collections::BTreeSet<String>,
    /// Removed from the desired set.
    pub removed: Vec<String>,
    /// Clusters made from this response that get their endpoints over EDS.
    pub eds_clusters: Vec<Arc<Cluster>>,
}

/// What an applied update did to one resource.
#[derive(Debug, Clone, Copy)]
enum Change {
    Added,
    Modified,
    Removed,
}

fn digest(any: &Any) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    any.value.hash(&mut hasher);
    hasher.finish()
}

fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}s")
}

/// The RDS route configurations a listener needs.
pub fn route_names(listener: &Listener) -> Vec<String> {
    listener
        .connection_managers()
        .filter_map(|hcm| hcm.rds_name().map(str::to_string))
        .collect()
}

impl Applier {
    pub fn new(context: XdsContext, warming: Warming) -> Self {
        Applier {
            desired: HashMap::new(),
            applied: HashMap::new(),
            endpoints: BTreeMap::new(),
            warming,
            ready: Vec::new(),
            outcome: Outcome::default(),
            manager_stats: crate::stats::ManagerStats::new(&context.registry),
            context,
        }
    }

    /// Merges a received update and applies its type; returns the NACK messages.
    pub fn receive(&mut self, received: &Received) -> Vec<String> {
        self.outcome = Outcome::default();
        if !received.errors.is_empty() {
            return received.errors.clone();
        }
        let desired = self.desired.entry(received.type_url).or_default();
        if received.replace {
            desired.clear();
        }
        for resource in &received.upserts {
            desired.insert(
                resource.name.clone(),
                (resource.version.clone(), resource.payload.clone()),
            );
        }
        for name in &received.removals {
            desired.remove(name);
        }
        self.apply(received.type_url)
    }

    /// Forgets resources no longer subscribed to (named types).
    pub fn forget(&mut self, type_url: &'static str, names: &[String]) {
        if let Some(desired) = self.desired.get_mut(type_url) {
            for name in names {
                desired.remove(name);
            }
        }
        if let Some(applied) = self.applied.get_mut(type_url) {
            for name in names {
                applied.remove(name);
            }
        }
        if type_url == RDS {
            self.context.store.update(|snapshot| {
                for name in names {
                    snapshot.routes.remove(name);
                }
            });
        }
    }

    fn record_error(&self, type_url: &str, name: &str, message: &str) {
        let entry = json!({"details": message, "last_update_attempt": now()});
        self.context.status.update(|s| {
            s.errors
                .insert((type_url.to_string(), name.to_string()), entry);
        });
    }

    fn clear_error(&self, type_url: &str, name: &str) {
        self.context.status.update(|s| {
            s.errors.remove(&(type_url.to_string(), name.to_string()));
        });
    }

    /// Applies the desired set of one type; returns NACK messages.
    fn apply(&mut self, type_url: &'static str) -> Vec<String> {
        let desired = self.desired.get(type_url).cloned().unwrap_or_default();
        let mut applied = self.applied.remove(type_url).unwrap_or_default();
        let mut errors = Vec::new();
        let mut changed = Vec::new();
        // Removals first, as Envoy's LDS does: a listener that replaces a removed one under
        // another name may then take its address.
        let removed: Vec<String> = applied
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        for name in &removed {
            applied.remove(name);
            self.clear_error(type_url, name);
            self.remove(type_url, name);
            self.manager_stat(type_url, Change::Removed);
        }
        for (name, (_, any)) in &desired {
            let hash = digest(any);
            if applied.get(name) == Some(&hash) {
                self.outcome.unchanged.insert(name.clone());
                continue;
            }
            let result = match type_url {
                CDS => self.apply_cluster(name, any),
                EDS => self.apply_endpoints(name, any),
                LDS => self.apply_listener(name, any),
                SDS => self.apply_secret(name, any),
                _ => self.apply_route(name, any),
            };
            let change = match applied.contains_key(name) {
                true => Change::Modified,
                false => Change::Added,
            };
            // Envoy counts a cluster as added or modified before it builds it, so a cluster it
            // then rejects counts too (a static cluster's name is refused before); a listener
            // counts once it is in place.
            if result.is_ok() || type_url == CDS && !self.is_static_cluster(name) {
                self.manager_stat(type_url, change);
            }
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
        self.applied.insert(type_url, applied);
        if type_url == SDS {
            self.promote_clusters_with_secrets();
        }
        self.activate_ready();
        if type_url == RDS || type_url == SDS {
            self.promote_listeners();
        }
        self.publish_warming();
        if !changed.is_empty() || !removed.is_empty() {
            tracing::info!(type_url, changed = ?changed, removed = ?removed, "xDS: applied");
        }
        self.outcome.changed = changed.into_iter().collect();
        self.outcome.removed = removed;
        errors
    }

    /// The bootstrap has a cluster of that name (CDS may not replace it).
    fn is_static_cluster(&self, name: &str) -> bool {
        self.context.static_clusters.iter().any(|n| n == name)
    }

    /// Counts a cluster's or a listener's change in its manager's stats.
    fn manager_stat(&self, type_url: &str, change: Change) {
        let stats = &self.manager_stats;
        let stat = match (type_url, change) {
            (CDS, Change::Added) => &stats.cluster_added,
            (CDS, Change::Modified) => &stats.cluster_modified,
            (CDS, Change::Removed) => &stats.cluster_removed,
            (LDS, Change::Added) => &stats.listener_added,
            (LDS, Change::Modified) => &stats.listener_modified,
            (LDS, Change::Removed) => &stats.listener_removed,
            _ => return,
        };
        stat.inc();
    }

    fn remove(&mut self, type_url: &str, name: &str) {
        let context = &self.context;
        match type_url {
            CDS => {
                self.warming.remove_cluster(name);
                context
                    .store
                    .update(|snapshot| snapshot.clusters.remove(name));
            }
            LDS => {
                self.warming.remove_listener(name);
                context.listeners.remove(name);
            }
            RDS => {
                context
                    .store
                    .update(|snapshot| snapshot.routes.remove(name));
            }
            _ => {
                self.endpoints.remove(name);
                context.status.update(|s| {
                    s.endpoints.remove(name);
                });
            }
        }
    }

    fn apply_cluster(&mut self, name: &str, any: &Any) -> Result<(), String> {
        if self.is_static_cluster(name) {
            return Err("a static cluster of that name exists".into());
        }
        let config = Arc::new(resource::cluster(&any.value).map_err(|e| e.to_string())?);
        let snapshot = self.context.store.load();
        let previous = self
            .warming
            .cluster(name)
            .cloned()
            .or_else(|| snapshot.cluster(name).cloned());
        let cluster = Cluster::new(
            config,
            &self.context.registry,
            self.context.concurrency,
            previous.as_deref(),
            &self.context.secrets,
        )
        .map_err(|e| e.to_string())?;
        // Health checks and DNS run on this (the main) runtime from now on, warming or not.
        cluster.start_background();
        self.warming.remove_cluster(name);
        match &cluster.config.discovery {
            DiscoveryType::Eds {
                service_name,
                source,
            } => {
                self.outcome.eds_clusters.push(cluster.clone());
                if let Some(assignment) = self.endpoints.get(service_name) {
                    cluster.set_assignment(assignment);
                }
                let timeout = source.initial_fetch_timeout;
                if cluster.members.is_initialized() {
                    self.activate_when_checked(cluster);
                } else {
                    self.warming.add_cluster(cluster, timeout);
                }
            }
            _ => self.activate_when_checked(cluster),
        }
        Ok(())
    }

    /// Activates `cluster`, or keeps it warming until its hosts' first health checks when it
    /// has active checks that have not all completed yet.
    fn activate_when_checked(&mut self, cluster: Arc<Cluster>) {
        if !self.has_secrets(&cluster) {
            // Warms until its secrets arrive, as Envoy's clusters do, for as long as their
            // `initial_fetch_timeout`.
            let timeout = self.secret_timeout(cluster.config.connect.sds_secrets());
            tracing::info!(cluster = %cluster.name(), secrets = ?missing_secrets(&self.context.secrets, cluster.config.connect.sds_secrets()), ?timeout, "xDS: cluster warming until its secrets arrive");
            self.warming.add_cluster(cluster, timeout);
            self.publish_warming();
            return;
        }
        if cluster.config.health_check.is_some() && !cluster.members.first_checks_done() {
            self.warming.add_checked_cluster(cluster);
            self.publish_warming();
        } else {
            self.activate_cluster(cluster);
        }
    }

    /// How long what names `named` waits for those of them not in yet: the longest of their
    /// `initial_fetch_timeout`s.
    fn secret_timeout<'a>(&self, named: impl Iterator<Item = &'a SdsSecret>) -> Duration {
        let secrets = &self.context.secrets;
        longest(
            named
                .filter(|sds| secrets.peek(sds).is_none())
                .map(|sds| sds.initial_fetch_timeout),
        )
    }

    fn has_secrets(&self, cluster: &Cluster) -> bool {
        self.context
            .secrets
            .all_ready(cluster.config.connect.sds_secrets())
    }

    /// Activates the warming clusters that waited only for secrets that are in now.
    fn promote_clusters_with_secrets(&mut self) {
        let ready: Vec<String> = self
            .warming
            .clusters()
            .filter(|c| c.members.is_initialized() && self.has_secrets(c))
            .map(|c| c.name().to_string())
            .collect();
        for name in ready {
            if let Some(cluster) = self.warming.remove_cluster(&name) {
                self.activate_when_checked(cluster);
            }
        }
    }

    fn apply_secret(&mut self, name: &str, any: &Any) -> Result<(), String> {
        let secret = resource::secret(&any.value).map_err(|e| e.to_string())?;
        if secret.name != name {
            return Err(format!("the secret is named {:?}", secret.name));
        }
        self.context
            .secrets
            .set(&SecretSource::Ads, &secret)
            .map_err(|e| e.to_string())
    }

    /// Queues `cluster` for the store; [`Applier::activate_ready`] puts it there.
    fn activate_cluster(&mut self, cluster: Arc<Cluster>) {
        self.ready.push(cluster);
    }

    /// Puts the clusters made ready in the store, in one change.
    fn activate_ready(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let ready = std::mem::take(&mut self.ready);
        self.context.store.update(|snapshot| {
            for cluster in ready {
                snapshot
                    .clusters
                    .insert(cluster.name().to_string(), cluster);
            }
        });
    }

    fn apply_endpoints(&mut self, name: &str, any: &Any) -> Result<(), String> {
        let (_, assignment) = resource::load_assignment(&any.value).map_err(|e| e.to_string())?;
        if let Ok(proto) =
            <xds_api::envoy::config::endpoint::v3::ClusterLoadAssignment as prost::Message>::decode(
                any.value.as_slice(),
            )
        {
            let raw = RawConfig::of(&proto);
            self.context.status.update(|s| {
                s.endpoints.insert(name.to_string(), raw);
            });
        }
        let snapshot = self.context.store.load();
        for cluster in snapshot.clusters.values() {
            if matches!(&cluster.config.discovery, DiscoveryType::Eds { service_name, .. } if service_name == name)
            {
                cluster.set_assignment(&assignment);
            }
        }
        for cluster in self.warming.clusters_for(name) {
            cluster.set_assignment(&assignment);
            self.activate_when_checked(cluster);
        }
        self.endpoints.insert(name.to_string(), assignment);
        Ok(())
    }

    /// Every cluster a route table names must exist (active or warming) when it asks for it.
    fn check_clusters(&self, names: &[String], validate: bool) -> Result<(), String> {
        if !validate {
            return Ok(());
        }
        let snapshot = self.context.store.load();
        match names
            .iter()
            .find(|name| snapshot.cluster(name).is_none() && self.warming.cluster(name).is_none())
        {
            Some(name) => Err(format!(
                "route: unknown cluster {name:?} (validate_clusters)"
            )),
            None => Ok(()),
        }
    }

    fn apply_listener(&mut self, name: &str, any: &Any) -> Result<(), String> {
        if self.context.static_listeners.iter().any(|n| n == name) {
            return Err("a static listener of that name exists".into());
        }
        let listener =
            Arc::new(resource::listener(&any.value, Files::Read).map_err(|e| e.to_string())?);
        let warming_holder = self
            .warming
            .listeners()
            .find(|other| listener.collides_with(other))
            .map(|other| other.name.clone());
        if let Some(holder) =
            warming_holder.or_else(|| self.context.listeners.address_holder(&listener))
        {
            return Err(format!(
                "duplicate address {} as existing listener {holder:?}",
                listener.address
            ));
        }
        // Route configurations inline in a listener are validated by default, as in Envoy.
        for hcm in listener.connection_managers() {
            if let RouteSource::Inline(table) = &hcm.routes {
                self.check_clusters(&table.clusters, table.validate_clusters != Some(false))?;
            }
        }
        self.warming.remove_listener(name);
        let routes = self.context.store.load();
        let missing = route_names(&listener)
            .iter()
            .any(|r| !routes.routes.contains_key(r))
            || !self.context.secrets.all_ready(listener.sds_secrets());
        if missing {
            let route_timeout = listener
                .connection_managers()
                .filter_map(|hcm| match &hcm.routes {
                    RouteSource::Rds { source, .. } => Some(source.initial_fetch_timeout),
                    RouteSource::Inline(_) => None,
                })
                .max()
                .unwrap_or_default();
            let timeout = if self.context.secrets.all_ready(listener.sds_secrets()) {
                route_timeout
            } else {
                tracing::info!(listener = %listener.name, secrets = ?missing_secrets(&self.context.secrets, listener.sds_secrets()), "xDS: listener warming until its secrets arrive");
                let secret_timeout = self.secret_timeout(listener.sds_secrets());
                if route_names(&listener).is_empty() {
                    secret_timeout
                } else {
                    longest([route_timeout, secret_timeout])
                }
            };
            self.warming.add_listener(listener, timeout);
            Ok(())
        } else {
            self.context
                .listeners
                .add_or_update(listener)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }

    fn apply_route(&mut self, name: &str, any: &Any) -> Result<(), String> {
        let table = resource::route_table(&any.value, Files::Read).map_err(|e| e.to_string())?;
        // RDS route configurations are validated only when they ask (Envoy's default: false).
        self.check_clusters(&table.clusters, table.validate_clusters == Some(true))?;
        let table = Arc::new(table);
        self.context
            .store
            .update(|snapshot| snapshot.routes.insert(name.to_string(), table));
        Ok(())
    }

    /// Starts the warming listeners whose route configurations have all arrived.
    fn promote_listeners(&mut self) {
        let routes = self.context.store.load();
        let secrets = &self.context.secrets;
        let ready = self.warming.ready_listeners(|l| {
            route_names(l).iter().all(|r| routes.routes.contains_key(r))
                && secrets.all_ready(l.sds_secrets())
        });
        for listener in ready {
            self.start_listener(listener);
        }
    }

    fn start_listener(&self, listener: Arc<Listener>) {
        let name = listener.name.clone();
        if let Err(error) = self.context.listeners.add_or_update(listener) {
            let message = format!("Listener {name}: {error}");
            tracing::warn!(%message);
            self.record_error(LDS, &name, &message);
        }
    }

    fn publish_warming(&self) {
        let warming: Vec<RawConfig> = self
            .warming
            .clusters()
            .map(|c| c.config.raw.clone())
            .collect();
        let listeners = self.warming.listeners().count();
        self.context.status.update(|s| {
            s.warming_clusters = warming;
            s.warming_listeners = listeners;
        });
    }

    /// A warming deadline passed: the cluster or listener goes live without what it waited for.
    /// Returns the subscriptions whose first response did not come in time: the cluster's
    /// endpoints (EDS, by cluster name) or the listener's route tables (RDS).
    pub fn expire(&mut self, deadline: &Deadline) -> Vec<(&'static str, String)> {
        let mut timed_out = Vec::new();
        match deadline {
            Deadline::Cluster { name, digest } => {
                if let Some(cluster) = self.warming.expired_cluster(name, *digest) {
                    if matches!(cluster.config.discovery, DiscoveryType::Eds { .. })
                        && !cluster.members.is_initialized()
                    {
                        timed_out.push((EDS, name.clone()));
                    }
                    let missing = missing_secrets(
                        &self.context.secrets,
                        cluster.config.connect.sds_secrets(),
                    );
                    if missing.is_empty() {
                        tracing::warn!(cluster = %name, "xDS: endpoints did not arrive in time; activating without endpoints");
                    } else {
                        tracing::warn!(cluster = %name, secrets = ?missing, "xDS: secrets did not arrive in time; activating without them (its TLS connections fail until they arrive)");
                    }
                    cluster.members.mark_initialized();
                    self.activate_cluster(cluster);
                    self.activate_ready();
                    self.publish_warming();
                }
            }
            Deadline::Listener { name, digest } => {
                if let Some(listener) = self.warming.expired_listener(name, *digest) {
                    let routes = self.context.store.load();
                    timed_out.extend(
                        route_names(&listener)
                            .into_iter()
                            .filter(|route| !routes.routes.contains_key(route))
                            .map(|route| (RDS, route)),
                    );
                    let missing = missing_secrets(&self.context.secrets, listener.sds_secrets());
                    if missing.is_empty() {
                        tracing::warn!(listener = %name, "xDS: routes did not arrive in time; starting the listener without them");
                    } else {
                        tracing::warn!(listener = %name, secrets = ?missing, "xDS: routes or secrets did not arrive in time; starting the listener without them (its TLS handshakes fail until the secrets arrive)");
                    }
                    self.start_listener(listener);
                    self.publish_warming();
                }
            }
            Deadline::ClusterChecked { name, digest } => {
                if let Some(cluster) = self.warming.expired_cluster(name, *digest) {
                    self.activate_cluster(cluster);
                    self.activate_ready();
                    self.publish_warming();
                }
            }
            Deadline::SecretChanged => {
                self.promote_clusters_with_secrets();
                self.activate_ready();
                self.promote_listeners();
                self.publish_warming();
            }
            Deadline::InitialFetch(_) => {}
        }
        timed_out
    }
}
