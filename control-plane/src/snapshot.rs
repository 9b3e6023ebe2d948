//! Immutable per-group snapshots of what proxies are served, and the hub that publishes them.
//!
//! A snapshot maps, per resource type, name → [`Resource`] (the encoded `Any` and its version,
//! a hash of the encoded bytes). A proxy of group G sees the global resources plus G's (G's win
//! on a name clash). EDS clusters whose endpoints do not exist yet are held back.
//!
//! Config changes reach the hub through [`SnapshotHub::run`], which debounces bursts of writes
//! into one rebuild and publishes each group's snapshot on its own `watch` channel, only when that
//! group's content changed. Each xDS stream task follows its group's channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::resource::{Kind, Typed};
use crate::store::ConfigState;
use crate::validate::eds_service_name;

/// One resource as sent on the wire.
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub name: String,
    /// Hex of the first 8 bytes of SHA-256 of the encoded resource.
    pub version: String,
    pub body: prost_types::Any,
    /// For an EDS cluster: the ClusterLoadAssignment it takes its endpoints from.
    pub eds_service: Option<String>,
}

impl Resource {
    /// Wraps encoded bytes of a resource of `kind`.
    pub fn new(kind: Kind, name: &str, bytes: &[u8]) -> Resource {
        let eds_service = match (kind, Typed::decode(kind, bytes)) {
            (Kind::Cluster, Ok(Typed::Cluster(cluster))) => {
                eds_service_name(&cluster).map(str::to_string)
            }
            _ => None,
        };
        Resource::with_eds_service(kind, name, bytes, eds_service)
    }

    /// Wraps encoded bytes whose EDS service (for a cluster) the caller already knows.
    pub fn with_eds_service(
        kind: Kind,
        name: &str,
        bytes: &[u8],
        eds_service: Option<String>,
    ) -> Resource {
        Resource {
            name: name.to_string(),
            version: resource_version(bytes),
            body: prost_types::Any {
                type_url: kind.type_url().to_string(),
                value: bytes.to_vec(),
            },
            eds_service,
        }
    }
}

/// The per-resource version of encoded bytes.
pub fn resource_version(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Resources of one type, by name.
pub type TypeMap = BTreeMap<String, Arc<Resource>>;

/// Everything one group's proxies are served at one config version.
#[derive(Debug)]
pub struct Snapshot {
    /// The global config version this snapshot was built from.
    pub version: u64,
    /// When that version was committed (for push latency).
    pub committed_at: Instant,
    /// Indexed by [`Kind::index`].
    pub types: [Arc<TypeMap>; 5],
    /// Per type, how this snapshot differs from the group's previous one, so each stream
    /// diffs only what changed instead of its whole subscription.
    pub changes: [Option<Arc<TypeChange>>; 5],
    /// Response bodies encoded for this snapshot, shared by every stream that sends the same
    /// selection of it.
    pub bodies: SharedBodies,
}

/// Which of a snapshot's resources of one type a response carries: all it holds under a
/// subscription, or only the [`TypeChange`]'s names under it.
#[derive(Clone, Debug)]
pub struct BodyKey {
    pub kind: Kind,
    pub changed_only: bool,
    /// The subscribed names (one shared set per distinct list), or `None` for a wildcard.
    /// Compared by address: holding the set in the key keeps the address from being reused.
    pub names: Option<Arc<BTreeSet<String>>>,
}

impl BodyKey {
    fn names_address(&self) -> usize {
        self.names
            .as_ref()
            .map_or(0, |names| Arc::as_ptr(names) as usize)
    }
}

impl PartialEq for BodyKey {
    fn eq(&self, other: &BodyKey) -> bool {
        self.kind == other.kind
            && self.changed_only == other.changed_only
            && self.names_address() == other.names_address()
    }
}

impl Eq for BodyKey {}

impl std::hash::Hash for BodyKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.changed_only.hash(state);
        self.names_address().hash(state);
    }
}

/// Encoded response bodies of one snapshot by [`BodyKey`]: ten thousand proxies of a group that
/// get the same thousand clusters share one encoding instead of ten thousand.
#[derive(Debug, Default)]
pub struct SharedBodies {
    bodies: Mutex<HashMap<BodyKey, Arc<OnceLock<Bytes>>>>,
}

impl SharedBodies {
    /// The body for `key`, encoded by `encode` on first use. Streams asking meanwhile wait for
    /// that one encoding rather than repeating it.
    pub fn get_or_encode(&self, key: BodyKey, encode: impl FnOnce() -> Bytes) -> Bytes {
        let cell = self
            .bodies
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .entry(key)
            .or_default()
            .clone();
        cell.get_or_init(encode).clone()
    }
}

/// The names added, changed or removed in one type since the map `from`.
#[derive(Debug)]
pub struct TypeChange {
    pub from: Arc<TypeMap>,
    pub names: Vec<String>,
}

impl TypeChange {
    /// The map a snapshot following one with `before` keeps for a type now holding `map`:
    /// `before` itself when nothing changed (streams then tell by pointer that nothing did),
    /// else `map` with the names that changed.
    pub fn follow(
        before: &Arc<TypeMap>,
        map: Arc<TypeMap>,
    ) -> (Arc<TypeMap>, Option<Arc<TypeChange>>) {
        let names = changed_names(before, &map);
        if names.is_empty() {
            return (before.clone(), None);
        }
        let change = TypeChange {
            from: before.clone(),
            names,
        };
        (map, Some(Arc::new(change)))
    }
}

/// Names whose entry differs between two maps (both sorted by name).
pub fn changed_names(old: &TypeMap, new: &TypeMap) -> Vec<String> {
    let mut names = Vec::new();
    let mut old_entries = old.iter().peekable();
    let mut new_entries = new.iter().peekable();
    loop {
        match (old_entries.peek(), new_entries.peek()) {
            (None, None) => return names,
            (Some((name, _)), None) => {
                names.push((*name).clone());
                old_entries.next();
            }
            (None, Some((name, _))) => {
                names.push((*name).clone());
                new_entries.next();
            }
            (Some((old_name, old_resource)), Some((new_name, new_resource))) => {
                match old_name.cmp(new_name) {
                    std::cmp::Ordering::Less => {
                        names.push((*old_name).clone());
                        old_entries.next();
                    }
                    std::cmp::Ordering::Greater => {
                        names.push((*new_name).clone());
                        new_entries.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !Arc::ptr_eq(old_resource, new_resource)
                            && old_resource.version != new_resource.version
                        {
                            names.push((*new_name).clone());
                        }
                        old_entries.next();
                        new_entries.next();
                    }
                }
            }
        }
    }
}

impl Snapshot {
    pub fn empty() -> Snapshot {
        Snapshot {
            version: 0,
            committed_at: Instant::now(),
            types: Default::default(),
            changes: Default::default(),
            bodies: SharedBodies::default(),
        }
    }

    pub fn of(&self, kind: Kind) -> &Arc<TypeMap> {
        &self.types[kind.index()]
    }

    /// Same resources (names and versions) as `other`, whatever the config version.
    fn same_content(&self, other: &Snapshot) -> bool {
        self.types
            .iter()
            .zip(other.types.iter())
            .all(|(mine, theirs)| {
                mine.len() == theirs.len()
                    && mine
                        .iter()
                        .zip(theirs.iter())
                        .all(|((name, a), (other_name, b))| {
                            name == other_name && a.version == b.version
                        })
            })
    }
}

/// A config version as committed, handed from the writer to the hub.
#[derive(Clone, Debug)]
pub struct Committed {
    pub state: Arc<ConfigState>,
    pub at: Instant,
}

/// Encoded resources reused between rebuilds, so unchanged bytes are not hashed again.
type ResourceCache = HashMap<(Kind, Bytes), Arc<Resource>>;

/// Builds the snapshot of one group from a config state.
fn build(
    committed: &Committed,
    previous: Option<&Snapshot>,
    group: &str,
    cache: &ResourceCache,
    next_cache: &mut ResourceCache,
) -> Snapshot {
    let state = &committed.state;
    let mut types: [TypeMap; 5] = Default::default();
    // Global first, then the group's own: a group resource replaces a global one of that name.
    let scopes: &[&str] = if group.is_empty() {
        &[""]
    } else {
        &["", group]
    };
    for &pass_group in scopes {
        for (key, bytes) in state
            .resources
            .iter()
            .filter(|(key, _)| key.group == pass_group)
        {
            let cache_key = (key.kind, bytes.clone());
            let resource = match cache.get(&cache_key).or_else(|| next_cache.get(&cache_key)) {
                Some(resource) if resource.name == key.name => resource.clone(),
                _ => Arc::new(Resource::new(key.kind, &key.name, bytes)),
            };
            next_cache.insert(cache_key, resource.clone());
            types[key.kind.index()].insert(key.name.clone(), resource);
        }
    }
    // Hold back EDS clusters until their endpoints exist: Envoy would keep them warming.
    let endpoints = &types[Kind::Endpoint.index()];
    let waiting: Vec<String> = types[Kind::Cluster.index()]
        .values()
        .filter(|cluster| {
            cluster
                .eds_service
                .as_ref()
                .is_some_and(|service| !endpoints.contains_key(service))
        })
        .map(|cluster| cluster.name.clone())
        .collect();
    for name in waiting {
        types[Kind::Cluster.index()].remove(&name);
    }
    // Unchanged types keep the previous map (cheap equality for every stream); changed ones
    // record which names changed.
    let mut changes: [Option<Arc<TypeChange>>; 5] = Default::default();
    let final_types: [Arc<TypeMap>; 5] = std::array::from_fn(|index| {
        let map = std::mem::take(&mut types[index]);
        match previous {
            Some(previous) => {
                let (map, change) = TypeChange::follow(&previous.types[index], Arc::new(map));
                changes[index] = change;
                map
            }
            None => Arc::new(map),
        }
    });
    Snapshot {
        version: state.version,
        committed_at: committed.at,
        types: final_types,
        changes,
        bodies: SharedBodies::default(),
    }
}

/// Publishes per-group snapshots to the xDS streams.
pub struct SnapshotHub {
    groups: Mutex<HashMap<String, watch::Sender<Arc<Snapshot>>>>,
    latest: Mutex<(Committed, ResourceCache)>,
    debounce: Duration,
    /// Counts rebuilds, for followers that combine group snapshots with their own
    /// (the mesh hub).
    published: watch::Sender<u64>,
}

impl SnapshotHub {
    pub fn new(initial: Committed, debounce: Duration) -> Arc<SnapshotHub> {
        Arc::new(SnapshotHub {
            groups: Mutex::new(HashMap::new()),
            latest: Mutex::new((initial, HashMap::new())),
            debounce,
            published: watch::channel(0).0,
        })
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Arc<Snapshot>>>> {
        self.groups
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Changes after every rebuild.
    pub fn published(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// The config version the snapshots were last built from.
    pub fn committed(&self) -> Committed {
        self.latest
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .0
            .clone()
    }

    /// The snapshot channel of `group`, created from the latest config if new.
    pub fn subscribe(&self, group: &str) -> watch::Receiver<Arc<Snapshot>> {
        if let Some(sender) = self.groups().get(group) {
            return sender.subscribe();
        }
        // Lock order everywhere: `latest`, then `groups`.
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let (committed, cache) = &mut *latest;
        let mut groups = self.groups();
        if let Some(sender) = groups.get(group) {
            return sender.subscribe();
        }
        let mut next_cache = HashMap::new();
        let snapshot = build(committed, None, group, cache, &mut next_cache);
        cache.extend(next_cache);
        let (sender, receiver) = watch::channel(Arc::new(snapshot));
        groups.insert(group.to_string(), sender);
        receiver
    }

    /// Rebuilds every group's snapshot from `committed` and publishes the ones that changed.
    /// Streams subscribing meanwhile are not held up by the rebuild.
    pub fn publish(&self, committed: Committed) {
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let names: Vec<String> = {
            let mut groups = self.groups();
            // Forget groups nobody follows any more.
            groups.retain(|group, sender| group.is_empty() || sender.receiver_count() > 0);
            groups.keys().cloned().collect()
        };
        let mut next_cache = HashMap::new();
        let built: Vec<(String, Snapshot)> = names
            .into_iter()
            .map(|group| {
                let previous = self
                    .groups()
                    .get(&group)
                    .map(|sender| sender.borrow().clone());
                let snapshot = build(
                    &committed,
                    previous.as_deref(),
                    &group,
                    &latest.1,
                    &mut next_cache,
                );
                (group, snapshot)
            })
            .collect();
        *latest = (committed, next_cache);
        let groups = self.groups();
        for (group, snapshot) in built {
            if let Some(sender) = groups.get(&group) {
                sender.send_if_modified(|current| {
                    let changed = !current.same_content(&snapshot);
                    if changed {
                        *current = Arc::new(snapshot);
                    }
                    changed
                });
            }
        }
        drop(groups);
        drop(latest);
        self.published.send_modify(|count| *count += 1);
    }

    /// Follows committed config versions; a burst of writes within the debounce window becomes
    /// one rebuild and one push.
    pub async fn run(self: Arc<Self>, mut commits: watch::Receiver<Committed>) {
        loop {
            if commits.changed().await.is_err() {
                return;
            }
            tokio::time::sleep(self.debounce).await;
            let committed = commits.borrow_and_update().clone();
            let hub = self.clone();
            // Building touches every resource: keep it off the async workers.
            if tokio::task::spawn_blocking(move || hub.publish(committed))
                .await
                .is_err()
            {
                tracing::error!("snapshot rebuild panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ResourceKey;

    fn state(version: u64, entries: &[(Kind, &str, &str, &[u8])]) -> Committed {
        let mut state = ConfigState {
            version,
            ..ConfigState::default()
        };
        for (kind, group, name, bytes) in entries {
            state.resources.insert(
                ResourceKey::new(*kind, group, name),
                Bytes::copy_from_slice(bytes),
            );
        }
        Committed {
            state: Arc::new(state),
            at: Instant::now(),
        }
    }

    fn route(name: &str) -> Vec<u8> {
        Typed::Route(xds_api::envoy::config::route::v3::RouteConfiguration {
            name: name.into(),
            ..Default::default()
        })
        .encode()
    }

    #[test]
    fn groups_see_global_plus_their_own_and_override_by_name() {
        let global = route("r");
        let mut overridden = route("r");
        overridden.extend_from_slice(&[0x18, 0x01]); // validate_clusters = true: different bytes
        let other = route("only-team");
        let hub = SnapshotHub::new(
            state(
                3,
                &[
                    (Kind::Route, "", "r", &global),
                    (Kind::Route, "team", "r", &overridden),
                    (Kind::Route, "team", "only-team", &other),
                ],
            ),
            Duration::ZERO,
        );
        let global_view = hub.subscribe("").borrow().clone();
        let team_view = hub.subscribe("team").borrow().clone();
        assert_eq!(global_view.of(Kind::Route).len(), 1);
        assert_eq!(team_view.of(Kind::Route).len(), 2);
        assert_eq!(team_view.of(Kind::Route)["r"].body.value, overridden);
        assert_eq!(global_view.of(Kind::Route)["r"].body.value, global);
        assert_eq!(team_view.version, 3);
    }

    #[test]
    fn only_groups_whose_content_changed_are_notified() {
        let team_route = route("t");
        let hub = SnapshotHub::new(
            state(1, &[(Kind::Route, "team", "t", &team_route)]),
            Duration::ZERO,
        );
        let mut global = hub.subscribe("");
        let mut team = hub.subscribe("team");
        global.mark_unchanged();
        team.mark_unchanged();
        let changed = route("t2");
        hub.publish(state(
            2,
            &[
                (Kind::Route, "team", "t", &team_route),
                (Kind::Route, "team", "t2", &changed),
            ],
        ));
        assert!(team.has_changed().unwrap_or(false));
        assert!(!global.has_changed().unwrap_or(true));
        assert_eq!(team.borrow().version, 2);
    }

    #[test]
    fn eds_clusters_wait_for_their_endpoints() {
        let cluster = Typed::from_json(Kind::Cluster, &serde_json::json!({"name": "c", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}})).expect("cluster").encode();
        let hub = SnapshotHub::new(
            state(1, &[(Kind::Cluster, "", "c", &cluster)]),
            Duration::ZERO,
        );
        let mut view = hub.subscribe("");
        assert!(view.borrow().of(Kind::Cluster).is_empty());
        let endpoints = Typed::from_json(Kind::Endpoint, &serde_json::json!({"cluster_name": "c"}))
            .expect("cla")
            .encode();
        hub.publish(state(
            2,
            &[
                (Kind::Cluster, "", "c", &cluster),
                (Kind::Endpoint, "", "c", &endpoints),
            ],
        ));
        assert_eq!(view.borrow_and_update().of(Kind::Cluster).len(), 1);
    }

    #[test]
    fn unchanged_types_keep_their_map_and_changed_ones_name_their_changes() {
        let (a, b, b2) = (route("a"), route("b"), route("b2"));
        let hub = SnapshotHub::new(
            state(1, &[(Kind::Route, "", "a", &a), (Kind::Route, "", "b", &b)]),
            Duration::ZERO,
        );
        let mut view = hub.subscribe("");
        let before = view.borrow_and_update().clone();
        let cluster = Typed::from_json(Kind::Cluster, &serde_json::json!({"name": "c"}))
            .expect("cluster")
            .encode();
        hub.publish(state(
            2,
            &[
                (Kind::Route, "", "a", &a),
                (Kind::Route, "", "b", &b2),
                (Kind::Cluster, "", "c", &cluster),
            ],
        ));
        let after = view.borrow_and_update().clone();
        assert!(Arc::ptr_eq(
            before.of(Kind::Listener),
            after.of(Kind::Listener)
        ));
        let change = after.changes[Kind::Route.index()]
            .as_ref()
            .expect("routes changed");
        assert!(Arc::ptr_eq(&change.from, before.of(Kind::Route)));
        assert_eq!(change.names, ["b"]);
        assert_eq!(
            after.changes[Kind::Cluster.index()]
                .as_ref()
                .map(|c| c.names.clone()),
            Some(vec!["c".to_string()])
        );
    }

    #[test]
    fn versions_are_content_hashes() {
        assert_eq!(resource_version(b"a"), resource_version(b"a"));
        assert_ne!(resource_version(b"a"), resource_version(b"b"));
        assert_eq!(resource_version(b"a").len(), 16);
    }
}
