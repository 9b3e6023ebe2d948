//! The mesh hub: feeds source updates to the [`Generator`], and publishes each connected
//! sidecar's snapshot — its generated resources merged with the raw resources of its group
//! (raw wins on a name clash, so an operator can override one generated resource) — on the
//! sidecar's own `watch` channel, which its xDS stream follows like a group's.
//!
//! Sources queue updates and wake the hub; the hub waits the debounce window, applies the
//! queue, rebuilds what changed and republishes only the sidecars whose inputs changed. Maps
//! shared by many sidecars keep their `Arc` and carry the names that changed, so each stream
//! diffs only those. Sidecars are served nothing until every source has synced once: a
//! restarted control plane must not push a half-known mesh to proxies that hold a whole one.
//!
//! With a CA, each sidecar also gets the trust bundle, and its identity's certificate once its
//! stream subscribes to it ([`SidecarLease::want_certificate`]: issued then, while the
//! stream waits, so an Envoy's first SDS answer carries it); the hub wakes when the next
//! certificate is due for renewal and republishes the sidecars of the identities renewed, and
//! of those whose identity changed (a pod's service account). A certificate no stream
//! subscribes to any more is dropped and not renewed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, watch};

use crate::ca::{Ca, SpiffeId};
use crate::mesh::generate::{Generator, Rebuilt, Shared, SidecarParts};
use crate::mesh::identity::{WorkloadSecrets, sidecar_identity};
use crate::mesh::model::{MeshUpdate, ObjectKey, Source};
use crate::mesh::policy::{NackedProxy, PolicyCondition, ProxyCounts, TrafficPolicyStatus};
use crate::mesh::sidecar::Sidecar;
use crate::mesh::stored::to_update;
use crate::mesh::translate::MeshSettings;
use crate::registry::{ProxyRegistry, ProxyStatus};
use crate::resource::Kind;
use crate::snapshot::{Snapshot, SnapshotHub, TypeChange, TypeMap};
use crate::store::MeshKey;

struct SidecarEntry {
    sidecar: Sidecar,
    sender: watch::Sender<Arc<Snapshot>>,
    /// The sidecar's group in the raw hub (held so the raw hub keeps publishing it).
    raw: watch::Receiver<Arc<Snapshot>>,
    /// The raw snapshot its current snapshot was built from.
    raw_seen: Arc<Snapshot>,
    /// Its identity as last published (with a CA).
    identity: Option<SpiffeId>,
    /// Its stream subscribes to the workload certificate (so its snapshot carries it).
    wants_certificate: bool,
}

struct HubState {
    generator: Generator,
    /// The version of the last publish.
    version: u64,
    /// By subscription id.
    sidecars: BTreeMap<u64, SidecarEntry>,
    next_id: u64,
    /// REST mesh objects as last applied, and the store version they came from.
    rest_seen: BTreeMap<MeshKey, Bytes>,
    /// Workload certificates and the trust bundle; `None` without a CA.
    secrets: Option<WorkloadSecrets>,
}

impl HubState {
    /// A sidecar's identity and its secrets, with a CA: the trust bundle, and with
    /// `certificate` the identity's certificate (issued if new).
    fn identity_and_secrets(
        &mut self,
        sidecar: &Sidecar,
        certificate: bool,
    ) -> (Option<SpiffeId>, Option<Arc<TypeMap>>) {
        let Some(secrets) = self.secrets.as_mut() else {
            return (None, None);
        };
        let identity = sidecar_identity(self.generator.inputs(), sidecar, secrets.trust_domain());
        let map = secrets.secrets(&identity, certificate);
        (Some(identity), Some(map))
    }

    /// Drops the certificates of identities no sidecar stream subscribes to.
    fn retain_wanted_certificates(&mut self) {
        let Some(secrets) = self.secrets.as_mut() else {
            return;
        };
        let wanted: BTreeSet<SpiffeId> = self
            .sidecars
            .values()
            .filter(|entry| entry.wants_certificate)
            .filter_map(|entry| entry.identity.clone())
            .collect();
        secrets.retain(&wanted);
    }
}

/// One sidecar stream's place in the hub: the snapshots it follows, and its say in which
/// secrets are made for it.
pub struct MeshSubscription {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub lease: SidecarLease,
}

/// A sidecar stream's hold on the hub. Dropping it (the stream ended) lets the hub forget the
/// sidecar and, if no other stream of its identity wants it, its certificate.
pub struct SidecarLease {
    hub: Arc<MeshHub>,
    id: u64,
    wants_certificate: bool,
}

impl SidecarLease {
    pub fn wants_certificate(&self) -> bool {
        self.wants_certificate
    }

    /// Whether the stream subscribes to the workload certificate now. The first time it does,
    /// the identity's certificate is issued (unless another stream of the identity holds one)
    /// and the sidecar's snapshot republished with it before this returns; when it stops, the
    /// certificate leaves its snapshot, and is dropped once no stream of the identity wants it.
    pub async fn want_certificate(&mut self, wanted: bool) {
        if self.wants_certificate == wanted {
            return;
        }
        self.wants_certificate = wanted;
        let hub = self.hub.clone();
        let id = self.id;
        if tokio::task::spawn_blocking(move || hub.set_certificate_wanted(id, wanted))
            .await
            .is_err()
        {
            tracing::error!("updating a sidecar's certificate subscription panicked");
        }
        // The next renewal may now be sooner (or later) than the one the hub waits for.
        self.hub.reschedule.notify_one();
    }
}

impl Drop for SidecarLease {
    fn drop(&mut self) {
        lock(&self.hub.released).push(self.id);
        // A certificate no one else wants goes at the next publish; otherwise there is no
        // hurry to forget the sidecar.
        if self.wants_certificate {
            self.hub.wake.notify_one();
        }
    }
}

struct Queue {
    updates: Vec<MeshUpdate>,
    since: Option<Instant>,
}

pub struct MeshHub {
    raw: Arc<SnapshotHub>,
    queue: Mutex<Queue>,
    wake: Notify,
    /// A certificate was issued: the next renewal may be sooner than the one waited for.
    reschedule: Notify,
    state: Mutex<HubState>,
    /// Subscriptions whose streams ended, to forget at the next publish.
    released: Mutex<Vec<u64>>,
    /// Sources still to finish their first sync.
    pending_sources: Mutex<usize>,
    sync_requested: AtomicBool,
    synced: watch::Sender<bool>,
    debounce: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// `raw` and `generated` as one map; raw wins on a name clash. When the raw map is empty the
/// generated one is used as it is, with its recorded change.
fn merge(raw: &Arc<TypeMap>, generated: &Shared) -> (Arc<TypeMap>, Option<Arc<TypeChange>>) {
    if raw.is_empty() {
        return (generated.map.clone(), generated.change.clone());
    }
    if generated.map.is_empty() {
        return (raw.clone(), None);
    }
    let mut merged = (*generated.map).clone();
    merged.extend(
        raw.iter()
            .map(|(name, resource)| (name.clone(), resource.clone())),
    );
    (Arc::new(merged), None)
}

/// A sidecar's snapshot from its group's raw snapshot and its generated parts. Types equal to
/// the previous snapshot's keep its map.
fn compose(
    raw: &Snapshot,
    parts: &SidecarParts,
    secrets: Option<&Arc<TypeMap>>,
    previous: Option<&Snapshot>,
    version: u64,
    committed_at: Instant,
) -> Snapshot {
    let listeners = Shared {
        map: parts.listeners.clone(),
        change: None,
    };
    let secrets = Shared {
        map: secrets.cloned().unwrap_or_default(),
        change: None,
    };
    let merged = [
        merge(raw.of(Kind::Cluster), &parts.clusters),
        merge(raw.of(Kind::Endpoint), &parts.endpoints),
        merge(raw.of(Kind::Listener), &listeners),
        merge(raw.of(Kind::Route), &parts.routes),
        merge(raw.of(Kind::Secret), &secrets),
    ];
    let mut types: [Arc<TypeMap>; 5] = Default::default();
    let mut changes: [Option<Arc<TypeChange>>; 5] = Default::default();
    for (index, (map, known)) in merged.into_iter().enumerate() {
        let Some(previous) = previous else {
            types[index] = map;
            continue;
        };
        let before = &previous.types[index];
        if Arc::ptr_eq(before, &map) {
            types[index] = map;
            continue;
        }
        match known {
            Some(change) if Arc::ptr_eq(&change.from, before) => {
                types[index] = map;
                changes[index] = Some(change);
            }
            _ => (types[index], changes[index]) = TypeChange::follow(before, map),
        }
    }
    Snapshot {
        version,
        committed_at,
        types,
        changes,
        bodies: Default::default(),
    }
}

impl MeshHub {
    /// A hub waiting for `sources` sources to sync (0: serve at once).
    /// With `ca`, sidecars also get their workload certificate and the trust bundle.
    pub fn new(
        settings: MeshSettings,
        raw: Arc<SnapshotHub>,
        sources: usize,
        debounce: Duration,
        ca: Option<Arc<Ca>>,
    ) -> Arc<MeshHub> {
        let (synced, _) = watch::channel(sources == 0);
        Arc::new(MeshHub {
            raw,
            queue: Mutex::new(Queue {
                updates: Vec::new(),
                since: None,
            }),
            wake: Notify::new(),
            reschedule: Notify::new(),
            state: Mutex::new(HubState {
                generator: Generator::new(settings),
                version: 0,
                sidecars: BTreeMap::new(),
                next_id: 0,
                rest_seen: BTreeMap::new(),
                secrets: ca.map(WorkloadSecrets::new),
            }),
            released: Mutex::new(Vec::new()),
            pending_sources: Mutex::new(sources),
            sync_requested: AtomicBool::new(false),
            synced,
            debounce,
        })
    }

    /// Queues updates from a source.
    pub fn update(&self, updates: impl IntoIterator<Item = MeshUpdate>) {
        let mut queue = lock(&self.queue);
        let before = queue.updates.len();
        queue.updates.extend(updates);
        if queue.updates.len() > before {
            queue.since.get_or_insert_with(Instant::now);
            drop(queue);
            self.wake.notify_one();
        }
    }

    /// A source has delivered everything it knows once.
    pub fn source_synced(&self) {
        let mut pending = lock(&self.pending_sources);
        if *pending > 0 {
            *pending -= 1;
            if *pending == 0 {
                // Served once the queued updates are applied.
                self.sync_requested.store(true, Ordering::SeqCst);
                self.wake.notify_one();
            }
        }
    }

    /// Whether sidecars are being served.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// The snapshot channel of one sidecar (after the sources have synced). Its secrets are
    /// the trust bundle until the stream wants its certificate
    /// ([`SidecarLease::want_certificate`]).
    pub async fn subscribe(self: &Arc<Self>, sidecar: Sidecar) -> MeshSubscription {
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|synced| *synced).await;
        let raw = self.raw.subscribe(&sidecar.group);
        let hub = self.clone();
        let subscribe = move || {
            let raw_seen = raw.borrow().clone();
            let mut state = lock(&hub.state);
            let parts = state.generator.sidecar_parts(&sidecar);
            let (identity, secrets) = state.identity_and_secrets(&sidecar, false);
            let version = state.version;
            let snapshot = compose(
                &raw_seen,
                &parts,
                secrets.as_ref(),
                None,
                version,
                Instant::now(),
            );
            let (sender, receiver) = watch::channel(Arc::new(snapshot));
            state.next_id += 1;
            let id = state.next_id;
            state.sidecars.insert(
                id,
                SidecarEntry {
                    sidecar,
                    sender,
                    raw,
                    raw_seen,
                    identity,
                    wants_certificate: false,
                },
            );
            (id, receiver)
        };
        let (id, snapshots) = match tokio::task::spawn_blocking(subscribe).await {
            Ok(subscribed) => subscribed,
            Err(_) => (0, watch::channel(Arc::new(Snapshot::empty())).1),
        };
        MeshSubscription {
            snapshots,
            lease: SidecarLease {
                hub: self.clone(),
                id,
                wants_certificate: false,
            },
        }
    }

    /// Puts the workload certificate into the snapshot of subscription `id`, or takes it out,
    /// and republishes it at once. Blocking (it may sign): runs on a blocking thread.
    fn set_certificate_wanted(&self, id: u64, wanted: bool) {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let Some(entry) = state.sidecars.get_mut(&id) else {
            return;
        };
        entry.wants_certificate = wanted;
        let sidecar = entry.sidecar.clone();
        let (identity, secrets) = state.identity_and_secrets(&sidecar, wanted);
        let Some(secrets) = secrets else {
            return;
        };
        let version = state.version + 1;
        let Some(entry) = state.sidecars.get_mut(&id) else {
            return;
        };
        tracing::debug!(node = %entry.sidecar.node_id, identity = ?identity, wanted, "workload certificate subscription");
        entry.identity = identity;
        let previous = entry.sender.borrow().clone();
        let index = Kind::Secret.index();
        if !Arc::ptr_eq(&previous.types[index], &secrets) {
            // The other types stay as they were, with their records of what changed.
            let mut types = previous.types.clone();
            let mut changes = previous.changes.clone();
            (types[index], changes[index]) = TypeChange::follow(&previous.types[index], secrets);
            entry.sender.send_replace(Arc::new(Snapshot {
                version,
                committed_at: Instant::now(),
                types,
                changes,
                bodies: Default::default(),
            }));
            state.version = version;
        }
        if !wanted {
            state.retain_wanted_certificates();
        }
    }

    /// Applies queued updates and the REST objects of the latest commit, and republishes what
    /// changed. Blocking: runs on a blocking thread.
    pub fn publish(&self) {
        let (updates, since) = {
            let mut queue = lock(&self.queue);
            (std::mem::take(&mut queue.updates), queue.since.take())
        };
        let committed = self.raw.committed();
        let mut state = lock(&self.state);
        let state = &mut *state;
        let rest_updates = rest_diff(&state.rest_seen, &committed.state.mesh);
        if !rest_updates.is_empty() {
            state.rest_seen = committed.state.mesh.clone();
        }
        for update in updates.into_iter().chain(rest_updates) {
            state.generator.apply(update);
        }
        let version = state.version + 1;
        // Forget sidecars whose streams ended, and views no sidecar needs.
        for id in std::mem::take(&mut *lock(&self.released)) {
            state.sidecars.remove(&id);
        }
        state
            .sidecars
            .retain(|_, entry| entry.sender.receiver_count() > 0);
        // Nor certificates no stream wants, which are not worth renewing.
        state.retain_wanted_certificates();
        let live: BTreeSet<String> = state
            .sidecars
            .values()
            .map(|entry| entry.sidecar.namespace().to_string())
            .collect();
        state.generator.retain_views(&live);
        let rebuilt = if state.generator.is_dirty() {
            state.generator.rebuild(version)
        } else {
            Rebuilt::default()
        };
        let committed_at = since.unwrap_or(committed.at);
        let renewed = match state.secrets.as_mut() {
            Some(secrets) => secrets.renew_due(tokio::time::Instant::now()),
            None => BTreeSet::new(),
        };
        let mut published = false;
        let mut sidecars = std::mem::take(&mut state.sidecars);
        for entry in sidecars.values_mut() {
            let raw_now = entry.raw.borrow().clone();
            let raw_changed = !Arc::ptr_eq(&raw_now, &entry.raw_seen);
            let generated_changed = rebuilt.endpoints_changed
                || rebuilt.views_changed.contains(entry.sidecar.namespace())
                || rebuilt.workloads_changed.contains(&entry.sidecar.workload);
            let identity_now = state.secrets.as_ref().map(|secrets| {
                sidecar_identity(
                    state.generator.inputs(),
                    &entry.sidecar,
                    secrets.trust_domain(),
                )
            });
            let secrets_changed = identity_now != entry.identity
                || (entry.wants_certificate
                    && entry
                        .identity
                        .as_ref()
                        .is_some_and(|identity| renewed.contains(identity)));
            if !raw_changed && !generated_changed && !secrets_changed {
                continue;
            }
            let parts = state.generator.sidecar_parts(&entry.sidecar);
            let (identity, secrets) =
                state.identity_and_secrets(&entry.sidecar, entry.wants_certificate);
            entry.identity = identity;
            let previous = entry.sender.borrow().clone();
            let snapshot = compose(
                &raw_now,
                &parts,
                secrets.as_ref(),
                Some(&previous),
                version,
                committed_at,
            );
            entry.raw_seen = raw_now;
            let unchanged = snapshot
                .types
                .iter()
                .zip(previous.types.iter())
                .all(|(now, before)| Arc::ptr_eq(now, before));
            tracing::debug!(node = %entry.sidecar.node_id, version, raw_changed, generated_changed, unchanged, "mesh publish");
            if !unchanged {
                entry.sender.send_replace(Arc::new(snapshot));
                published = true;
            }
        }
        state.sidecars = sidecars;
        // A sidecar whose identity changed left its old one's certificate.
        state.retain_wanted_certificates();
        if published || !rebuilt.is_empty() {
            state.version = version;
        }
        if self.sync_requested.swap(false, Ordering::SeqCst) {
            self.synced.send_replace(true);
        }
    }

    /// Follows source updates and raw commits until the process ends; first takes in the
    /// REST objects already stored.
    pub async fn run(self: Arc<Self>) {
        let mut raw_published = self.raw.published();
        self.wake.notify_one();
        loop {
            let next_renewal = lock(&self.state)
                .secrets
                .as_ref()
                .and_then(WorkloadSecrets::next_renewal);
            let renewal = async {
                match next_renewal {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = renewal => {}
                // Only to wait for the new next renewal.
                _ = self.reschedule.notified() => continue,
                changed = raw_published.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            tokio::time::sleep(self.debounce).await;
            let hub = self.clone();
            if tokio::task::spawn_blocking(move || hub.publish())
                .await
                .is_err()
            {
                tracing::error!("mesh publish panicked");
            }
        }
    }

    /// The group the injector gives the sidecar of pod `key` (its `app` label, else its
    /// service account, else `default`; `injector/src/inject.rs`), if the mesh knows the pod.
    pub fn injected_group(&self, key: &ObjectKey) -> Option<String> {
        let state = lock(&self.state);
        let workload = state.generator.inputs().workload(key)?;
        let group = workload
            .labels
            .get("app")
            .filter(|app| !app.is_empty())
            .cloned()
            .or_else(|| Some(workload.service_account.clone()).filter(|sa| !sa.is_empty()))
            .unwrap_or_else(|| crate::mesh::identity::DEFAULT_SERVICE_ACCOUNT.to_string());
        Some(group)
    }

    /// The identity the mesh gives the sidecar with `node_id`, trusting the id (no xDS
    /// authentication): a connected sidecar's identity as last published, else that of the
    /// pod the id names (`POD.NAMESPACE`), with its service account when the mesh knows the
    /// pod. `None` for an id that names no pod, or without a CA.
    pub fn identity_of_node(&self, node_id: &str) -> Option<SpiffeId> {
        let state = lock(&self.state);
        let trust_domain = state.secrets.as_ref()?.trust_domain().to_string();
        if let Some(identity) = state
            .sidecars
            .values()
            .find(|entry| entry.sidecar.node_id == node_id)
            .and_then(|entry| entry.identity.clone())
        {
            return Some(identity);
        }
        let (pod, namespace) = node_id.rsplit_once('.')?;
        if pod.is_empty() || namespace.is_empty() {
            return None;
        }
        Some(crate::mesh::identity::workload_identity(
            state.generator.inputs(),
            &ObjectKey::new(namespace, pod),
            &trust_domain,
        ))
    }

    /// The generated resources a sidecar would get now, for the API (`remoractl`-style
    /// inspection): name → resource per kind.
    pub fn sidecar_config(&self, sidecar: &Sidecar) -> [Arc<TypeMap>; 5] {
        let raw = self.raw.subscribe(&sidecar.group).borrow().clone();
        let mut state = lock(&self.state);
        let parts = state.generator.sidecar_parts(sidecar);
        // Inspection shows no private keys and issues no certificate.
        compose(&raw, &parts, None, None, 0, Instant::now()).types
    }

    /// What to report about a policy: whether it is in effect and which sidecars that
    /// receive its service ACKed or NACKed the version that carries it.
    pub fn policy_status(
        &self,
        key: &ObjectKey,
        registry: &ProxyRegistry,
    ) -> Option<TrafficPolicyStatus> {
        self.policy_statuses(std::slice::from_ref(key), registry)
            .remove(key)
    }

    /// [`Self::policy_status`] of several policies, from one look at the connected proxies.
    pub fn policy_statuses(
        &self,
        keys: &[ObjectKey],
        registry: &ProxyRegistry,
    ) -> BTreeMap<ObjectKey, TrafficPolicyStatus> {
        let listed = registry.list();
        let state = lock(&self.state);
        // The newest stream of each sidecar node, with the sidecar's namespace.
        let mut streams: HashMap<&str, &ProxyStatus> = HashMap::new();
        for proxy in &listed {
            let newer = streams
                .get(proxy.node_id.as_str())
                .is_none_or(|known| known.stream_id < proxy.stream_id);
            if newer {
                streams.insert(proxy.node_id.as_str(), proxy);
            }
        }
        let namespaces: HashMap<&str, &str> = state
            .sidecars
            .values()
            .map(|entry| (entry.sidecar.node_id.as_str(), entry.sidecar.namespace()))
            .collect();
        let mut statuses = BTreeMap::new();
        for key in keys {
            let Some(policy) = state.generator.policy_states().get(key) else {
                continue;
            };
            let mut status = TrafficPolicyStatus {
                observed_generation: Some(policy.generation),
                ..Default::default()
            };
            let mut condition = PolicyCondition {
                kind: "Accepted".into(),
                status: "True".into(),
                reason: "Accepted".into(),
                message: policy.warnings.join("; "),
            };
            if let Some((reason, message)) = &policy.rejected {
                condition.status = "False".into();
                condition.reason = reason.clone();
                condition.message = message.clone();
                status.conditions.push(condition);
                statuses.insert(key.clone(), status);
                continue;
            }
            status.conditions.push(condition);
            status.conditions.push(PolicyCondition {
                kind: "RemoraProxyCompatible".into(),
                status: if policy.remora_rejects.is_empty() {
                    "True"
                } else {
                    "False"
                }
                .into(),
                reason: if policy.remora_rejects.is_empty() {
                    "Supported"
                } else {
                    "Unsupported"
                }
                .into(),
                message: policy.remora_rejects.join("; "),
            });
            status.config_version = Some(policy.applied_version.to_string());
            let mut counts = ProxyCounts::default();
            for (node, proxy) in &streams {
                // Only sidecars whose view holds the service.
                let receives = namespaces.get(node).is_some_and(|namespace| {
                    state
                        .generator
                        .view(namespace)
                        .is_some_and(|view| view.visible.contains(&policy.service))
                });
                if !receives {
                    continue;
                }
                counts.total += 1;
                let mut acked = true;
                let mut nack = None;
                for kind in &policy.kinds {
                    let type_status = proxy
                        .types
                        .get(kind.xds_name())
                        .cloned()
                        .unwrap_or_default();
                    let acked_version = type_status
                        .acked_version
                        .as_deref()
                        .and_then(|version| version.parse::<u64>().ok())
                        .unwrap_or(0);
                    if acked_version >= policy.applied_version {
                        continue;
                    }
                    acked = false;
                    if let Some(record) = type_status.last_nack
                        && record
                            .version
                            .parse::<u64>()
                            .is_ok_and(|version| version >= policy.applied_version)
                    {
                        nack = Some(record);
                    }
                }
                if acked {
                    counts.acked += 1;
                    status.acked_proxies.push(node.to_string());
                } else if let Some(record) = nack {
                    counts.nacked += 1;
                    status.nacked_proxies.push(NackedProxy {
                        proxy: node.to_string(),
                        version: record.version,
                        message: record.message,
                    });
                } else {
                    counts.pending += 1;
                }
            }
            status.acked_proxies.sort();
            status.acked_proxies.truncate(50);
            status.nacked_proxies.sort_by(|a, b| a.proxy.cmp(&b.proxy));
            status.nacked_proxies.truncate(50);
            status.proxies = Some(counts);
            statuses.insert(key.clone(), status);
        }
        statuses
    }

    /// Keys of every policy the generator knows, with their source.
    pub fn policies(&self) -> Vec<(Source, ObjectKey)> {
        let state = lock(&self.state);
        let inputs = state.generator.inputs();
        let mut keys = Vec::new();
        for (index, source) in [Source::Kubernetes, Source::Rest].into_iter().enumerate() {
            keys.extend(
                inputs.layers[index]
                    .policies
                    .keys()
                    .map(|key| (source, key.clone())),
            );
        }
        keys
    }
}

/// Updates that turn the REST objects `seen` into `now`.
fn rest_diff(seen: &BTreeMap<MeshKey, Bytes>, now: &BTreeMap<MeshKey, Bytes>) -> Vec<MeshUpdate> {
    let mut updates = Vec::new();
    for (key, bytes) in now {
        if seen.get(key) != Some(bytes) {
            match to_update(key, Some(bytes)) {
                Ok(update) => updates.push(update),
                Err(error) => {
                    tracing::warn!(object = %key.label(), %error, "ignoring unreadable mesh object")
                }
            }
        }
    }
    for key in seen.keys() {
        if !now.contains_key(key)
            && let Ok(update) = to_update(key, None)
        {
            updates.push(update);
        }
    }
    updates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::model::{
        EndpointAddress, EndpointHealth, EndpointSet, PolicyObject, Protocol, Service, ServicePort,
    };
    use crate::snapshot::Committed;
    use crate::store::ConfigState;
    use crate::xds::requests::SotwRequest;
    use crate::xds::sotw::SotwStream;
    use crate::xds::stream::{Outcome, StreamProtocol};
    use xds_api::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

    fn raw_hub() -> Arc<SnapshotHub> {
        SnapshotHub::new(
            Committed {
                state: Arc::new(ConfigState::default()),
                at: Instant::now(),
            },
            Duration::ZERO,
        )
    }

    fn service_b() -> Vec<MeshUpdate> {
        let key = ObjectKey::new("shop", "b");
        vec![
            MeshUpdate::Service(
                Source::Rest,
                key.clone(),
                Some(Service {
                    key: key.clone(),
                    vip: Some("198.19.0.10".parse().unwrap()),
                    ports: vec![ServicePort {
                        name: "http".into(),
                        port: 80,
                        protocol: Protocol::Http,
                        target_port: None,
                    }],
                    selector: None,
                }),
            ),
            MeshUpdate::Endpoints(
                Source::Rest,
                key.clone(),
                "rest".into(),
                Some(EndpointSet {
                    service: key,
                    ports: [("http".to_string(), 8080)].into(),
                    endpoints: vec![EndpointAddress {
                        address: "198.18.2.1".parse().unwrap(),
                        zone: None,
                        health: EndpointHealth::Healthy,
                        workload: Some(ObjectKey::new("shop", "b-1")),
                    }],
                }),
            ),
        ]
    }

    fn sidecar(pod: &str) -> Sidecar {
        Sidecar {
            node_id: format!("{pod}.shop"),
            group: pod.into(),
            workload: ObjectKey::new("shop", pod),
            inbound_port: Some(15006),
            outbound_port: Some(15001),
            service_account: None,
        }
    }

    fn request(kind: Kind, names: &[String], nonce: &str, version: &str) -> SotwRequest {
        DiscoveryRequest {
            type_url: kind.type_url().into(),
            resource_names: names.to_vec(),
            response_nonce: nonce.into(),
            version_info: version.into(),
            ..Default::default()
        }
        .into()
    }

    /// Answers everything the stream sends with an ACK until it has nothing more to send;
    /// the responses sent.
    fn ack_all(stream: &mut SotwStream, snapshot: &Snapshot) -> Vec<DiscoveryResponse> {
        let mut sent = Vec::new();
        while let Some(response) = stream.next_response(snapshot) {
            let response = response.to_message();
            let kind = Kind::from_type_url(&response.type_url).expect("a kind");
            let outcome = stream
                .on_request(request(kind, &[], &response.nonce, &response.version_info))
                .expect("ack");
            assert!(matches!(outcome, Some(Outcome::Ack { .. })));
            sent.push(response);
        }
        sent
    }

    #[tokio::test]
    async fn a_policy_change_reaches_every_sidecar_of_the_namespace() {
        let hub = MeshHub::new(MeshSettings::default(), raw_hub(), 0, Duration::ZERO, None);
        hub.update(service_b());
        hub.publish();
        let mut receivers = Vec::new();
        let mut streams = Vec::new();
        for pod in ["b-1", "a-1"] {
            let subscription = hub.subscribe(sidecar(pod)).await;
            let mut stream = SotwStream::aggregated();
            stream
                .on_request(request(Kind::Cluster, &[], "", ""))
                .expect("cds");
            stream
                .on_request(request(Kind::Listener, &[], "", ""))
                .expect("lds");
            let snapshot = subscription.snapshots.borrow().clone();
            let sent = ack_all(&mut stream, &snapshot);
            assert!(sent.len() >= 2, "{pod}: {sent:?}");
            receivers.push(subscription);
            streams.push(stream);
        }
        let key = ObjectKey::new("shop", "b");
        hub.update([MeshUpdate::Policy(
            Source::Rest,
            key.clone(),
            Some(PolicyObject {
                key,
                generation: 1,
                spec: serde_json::from_value(
                    serde_json::json!({"service": "b", "connectTimeout": "2s"}),
                )
                .expect("spec"),
            }),
        )]);
        hub.publish();
        for (subscription, stream) in receivers.iter_mut().zip(streams.iter_mut()) {
            let receiver = &mut subscription.snapshots;
            assert!(receiver.has_changed().expect("open"));
            let snapshot = receiver.borrow_and_update().clone();
            let sent = ack_all(stream, &snapshot);
            assert!(
                sent.iter()
                    .any(|response| response.type_url == Kind::Cluster.type_url()),
                "no CDS push: {sent:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_raw_resource_of_the_sidecars_group_replaces_the_generated_one() {
        use crate::resource::Typed;
        use crate::store::ResourceKey;
        let name = "b.shop.svc.cluster.local:80";
        let raw_route = Typed::from_json(
            Kind::Route,
            &serde_json::json!({"name": name, "virtual_hosts": [{"name": "mine", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 418}}]}]}),
        )
        .expect("a route")
        .encode();
        let mut state = ConfigState {
            version: 1,
            ..ConfigState::default()
        };
        state.resources.insert(
            ResourceKey::new(Kind::Route, "a", name),
            bytes::Bytes::from(raw_route.clone()),
        );
        let raw = SnapshotHub::new(
            Committed {
                state: Arc::new(state),
                at: Instant::now(),
            },
            Duration::ZERO,
        );
        let hub = MeshHub::new(MeshSettings::default(), raw, 0, Duration::ZERO, None);
        hub.update(service_b());
        hub.publish();
        // Group "a" holds the raw route; group "b" does not.
        let overridden = hub.subscribe(sidecar("a")).await.snapshots.borrow().clone();
        assert_eq!(overridden.of(Kind::Route)[name].body.value, raw_route);
        assert!(
            overridden.of(Kind::Cluster).contains_key(name),
            "generated clusters stay"
        );
        let generated = hub.subscribe(sidecar("b")).await.snapshots.borrow().clone();
        assert_ne!(generated.of(Kind::Route)[name].body.value, raw_route);
    }

    mod secrets {
        use super::*;
        use crate::ca::{CaOptions, generate_root};
        use crate::mesh::model::Workload;
        use crate::mesh::names;
        use prost::Message;
        use xds_api::envoy::extensions::transport_sockets::tls::v3::Secret;
        use xds_api::envoy::extensions::transport_sockets::tls::v3::secret::Type as SecretType;

        const LIFETIME: Duration = Duration::from_secs(3600);

        fn hub_with_ca() -> Arc<MeshHub> {
            let (cert, key) = generate_root("cluster.local").expect("root");
            let options = CaOptions {
                workload_lifetime: LIFETIME,
                ..CaOptions::default()
            };
            let ca = Arc::new(Ca::from_pem(&cert, &key, &options).expect("ca"));
            MeshHub::new(
                MeshSettings::default(),
                raw_hub(),
                0,
                Duration::ZERO,
                Some(ca),
            )
        }

        fn workload(pod: &str, service_account: &str) -> MeshUpdate {
            let key = ObjectKey::new("shop", pod);
            MeshUpdate::Workload(
                Source::Kubernetes,
                key.clone(),
                Some(Workload {
                    key,
                    ip: None,
                    service_account: service_account.into(),
                    labels: BTreeMap::new(),
                    ports: Vec::new(),
                }),
            )
        }

        fn secret(snapshot: &Snapshot, name: &str) -> Secret {
            let resource = snapshot
                .of(Kind::Secret)
                .get(name)
                .unwrap_or_else(|| panic!("no secret {name}"));
            Secret::decode(resource.body.value.as_slice()).expect("a Secret")
        }

        /// The certificate chain of the workload secret, and the URI SANs of its leaf.
        fn workload_certificate(snapshot: &Snapshot) -> (String, Vec<String>) {
            let Some(SecretType::TlsCertificate(tls)) =
                secret(snapshot, names::WORKLOAD_CERT_SECRET).r#type
            else {
                panic!("not a tls_certificate");
            };
            let text = |source: Option<xds_api::envoy::config::core::v3::DataSource>| match source
                .and_then(|source| source.specifier)
            {
                Some(xds_api::envoy::config::core::v3::data_source::Specifier::InlineString(
                    text,
                )) => text,
                other => panic!("not inline: {other:?}"),
            };
            let chain = text(tls.certificate_chain);
            assert!(text(tls.private_key).contains("PRIVATE KEY"));
            let leaf = pem::parse_many(&chain).expect("pem").remove(0);
            let (_, parsed) = x509_parser::parse_x509_certificate(leaf.contents()).expect("leaf");
            let uris = parsed
                .subject_alternative_name()
                .expect("SAN")
                .expect("present")
                .value
                .general_names
                .iter()
                .map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => uri.to_string(),
                    other => panic!("a SAN that is not a URI: {other:?}"),
                })
                .collect();
            (chain, uris)
        }

        /// A sidecar's subscription whose stream has asked for its workload certificate.
        async fn with_certificate(hub: &Arc<MeshHub>, sidecar: Sidecar) -> MeshSubscription {
            let mut subscription = hub.subscribe(sidecar).await;
            subscription.lease.want_certificate(true).await;
            subscription
        }

        fn holds(hub: &MeshHub, account: &str) -> bool {
            lock(&hub.state).secrets.as_ref().is_some_and(|secrets| {
                secrets.holds(&SpiffeId::new("cluster.local", "shop", account))
            })
        }

        #[tokio::test]
        async fn a_sidecar_gets_its_service_accounts_certificate_and_the_bundle() {
            let hub = hub_with_ca();
            hub.update([workload("a-1", "buyer")]);
            hub.publish();
            let mut subscription = with_certificate(&hub, sidecar("a-1")).await;
            let receiver = &mut subscription.snapshots;
            let snapshot = receiver.borrow_and_update().clone();
            let (_, uris) = workload_certificate(&snapshot);
            assert_eq!(uris, ["spiffe://cluster.local/ns/shop/sa/buyer"]);
            let bundle = secret(&snapshot, names::TRUST_BUNDLE_SECRET);
            assert!(
                matches!(bundle.r#type, Some(SecretType::ValidationContext(ref context)) if context.trusted_ca.is_some())
            );
            // A pod the mesh does not know runs as `default`.
            let unknown = with_certificate(&hub, sidecar("z-9")).await;
            assert_eq!(
                workload_certificate(&unknown.snapshots.borrow()).1,
                ["spiffe://cluster.local/ns/shop/sa/default"]
            );
            // Two sidecars of one identity share its certificate.
            hub.update([workload("a-2", "buyer")]);
            hub.publish();
            let twin = with_certificate(&hub, sidecar("a-2")).await;
            assert_eq!(
                workload_certificate(&twin.snapshots.borrow()).0,
                workload_certificate(&snapshot).0
            );
            assert!(!receiver.has_changed().expect("open"));
            // A credential's service account wins over the workload's.
            let proven = Sidecar {
                service_account: Some("auditor".into()),
                ..sidecar("a-3")
            };
            let proven = with_certificate(&hub, proven).await;
            assert_eq!(
                workload_certificate(&proven.snapshots.borrow()).1,
                ["spiffe://cluster.local/ns/shop/sa/auditor"]
            );
            // Inspection through the API shows no keys.
            assert!(hub.sidecar_config(&sidecar("a-1"))[4].is_empty());
        }

        #[tokio::test]
        async fn a_certificate_is_issued_when_subscribed_to_and_dropped_when_no_stream_wants_it() {
            let hub = hub_with_ca();
            hub.update([workload("a-1", "buyer"), workload("a-2", "buyer")]);
            hub.publish();
            // A sidecar that makes its own key never subscribes: the bundle only, nothing issued.
            let mut first = hub.subscribe(sidecar("a-1")).await;
            let snapshot = first.snapshots.borrow_and_update().clone();
            assert!(
                snapshot
                    .of(Kind::Secret)
                    .contains_key(names::TRUST_BUNDLE_SECRET)
            );
            assert!(
                !snapshot
                    .of(Kind::Secret)
                    .contains_key(names::WORKLOAD_CERT_SECRET)
            );
            hub.publish();
            assert!(
                !holds(&hub, "buyer"),
                "issued for a sidecar that never asked"
            );
            assert!(!first.snapshots.has_changed().expect("open"));

            // Subscribing republishes the snapshot with the certificate before it returns.
            first.lease.want_certificate(true).await;
            assert!(first.snapshots.has_changed().expect("open"));
            let with = first.snapshots.borrow_and_update().clone();
            let (chain, _) = workload_certificate(&with);
            assert!(with.version > snapshot.version);
            assert!(
                Arc::ptr_eq(with.of(Kind::Cluster), snapshot.of(Kind::Cluster)),
                "only the secrets change"
            );
            assert!(holds(&hub, "buyer"));

            // A second stream of the identity shares it; the first unsubscribing keeps it.
            let second = with_certificate(&hub, sidecar("a-2")).await;
            assert_eq!(workload_certificate(&second.snapshots.borrow()).0, chain);
            first.lease.want_certificate(false).await;
            let without = first.snapshots.borrow_and_update().clone();
            assert!(
                !without
                    .of(Kind::Secret)
                    .contains_key(names::WORKLOAD_CERT_SECRET)
            );
            assert!(holds(&hub, "buyer"), "the second stream still wants it");

            // The last stream that wanted it ends: dropped at the next publish, not renewed.
            drop(second);
            hub.publish();
            assert!(!holds(&hub, "buyer"));
            assert_eq!(
                lock(&hub.state)
                    .secrets
                    .as_ref()
                    .and_then(WorkloadSecrets::next_renewal),
                None
            );
            // Subscribing again issues a new one.
            first.lease.want_certificate(true).await;
            let again = first.snapshots.borrow_and_update().clone();
            assert_ne!(workload_certificate(&again).0, chain);
            // Unsubscribing as the only one drops it at once.
            first.lease.want_certificate(false).await;
            assert!(!holds(&hub, "buyer"));
        }

        #[tokio::test(start_paused = true)]
        async fn certificates_are_renewed_at_half_life() {
            let hub = hub_with_ca();
            hub.update([workload("a-1", "buyer")]);
            hub.publish();
            let mut subscription = with_certificate(&hub, sidecar("a-1")).await;
            let receiver = &mut subscription.snapshots;
            let first = workload_certificate(&receiver.borrow_and_update()).0;
            let issued_at = tokio::time::Instant::now();
            assert_eq!(
                lock(&hub.state)
                    .secrets
                    .as_ref()
                    .and_then(WorkloadSecrets::next_renewal),
                Some(issued_at + LIFETIME / 2)
            );
            tokio::time::advance(LIFETIME / 2 - Duration::from_secs(1)).await;
            hub.publish();
            assert!(!receiver.has_changed().expect("open"), "renewed too early");
            tokio::time::advance(Duration::from_secs(1)).await;
            hub.publish();
            assert!(
                receiver.has_changed().expect("open"),
                "not renewed at half life"
            );
            let renewed = receiver.borrow_and_update().clone();
            let (second, uris) = workload_certificate(&renewed);
            assert_ne!(second, first);
            assert_eq!(uris, ["spiffe://cluster.local/ns/shop/sa/buyer"]);
            assert_eq!(
                lock(&hub.state)
                    .secrets
                    .as_ref()
                    .and_then(WorkloadSecrets::next_renewal),
                Some(issued_at + LIFETIME)
            );
        }

        #[tokio::test(start_paused = true)]
        async fn the_running_hub_renews_without_being_asked() {
            let hub = hub_with_ca();
            hub.update([workload("a-1", "buyer")]);
            tokio::spawn(hub.clone().run());
            // The hub settles with nothing to renew before the sidecar connects.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut subscription = with_certificate(&hub, sidecar("a-1")).await;
            let receiver = &mut subscription.snapshots;
            let mut previous = workload_certificate(&receiver.borrow_and_update()).0;
            let started = tokio::time::Instant::now();
            // Paused time jumps to the next timer: the renewal, if the hub waits for it.
            for renewal in 1..=2u32 {
                tokio::time::timeout(LIFETIME * 10, async {
                    loop {
                        receiver.changed().await.expect("open");
                        let now = workload_certificate(&receiver.borrow_and_update()).0;
                        if now != previous {
                            previous = now;
                            break;
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("renewal {renewal} never came"));
                let elapsed = started.elapsed();
                assert!(
                    elapsed >= LIFETIME / 2 * renewal
                        && elapsed < LIFETIME / 2 * renewal + Duration::from_secs(1),
                    "renewal {renewal} after {elapsed:?}"
                );
            }
        }

        #[tokio::test]
        async fn a_new_service_account_means_a_new_certificate_and_gone_sidecars_are_forgotten() {
            let hub = hub_with_ca();
            hub.update([workload("a-1", "buyer")]);
            hub.publish();
            let mut subscription = with_certificate(&hub, sidecar("a-1")).await;
            subscription.snapshots.borrow_and_update();
            hub.update([workload("a-1", "seller")]);
            hub.publish();
            assert!(subscription.snapshots.has_changed().expect("open"));
            let snapshot = subscription.snapshots.borrow_and_update().clone();
            assert_eq!(
                workload_certificate(&snapshot).1,
                ["spiffe://cluster.local/ns/shop/sa/seller"]
            );
            assert!(
                !holds(&hub, "buyer"),
                "the old identity's certificate is dropped"
            );
            drop(subscription);
            hub.publish();
            assert_eq!(
                lock(&hub.state)
                    .secrets
                    .as_ref()
                    .and_then(WorkloadSecrets::next_renewal),
                None,
                "no sidecar, no certificate to renew"
            );
        }
    }
}
