//! Durable config storage: every stored resource keyed by (kind, group, name), and one global
//! version that increases with every committed write and survives restarts.
//!
//! Two implementations: [`redb_store::RedbStore`] (embedded, one file under `--data-dir`) and
//! [`etcd_store::EtcdStore`] (shared by several control-plane replicas, which watch it to see each
//! other's writes).

pub mod etcd_store;
pub mod redb_store;

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::resource::Kind;

/// Where a resource lives: its kind, its group (empty = global) and its name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ResourceKey {
    pub kind: Kind,
    pub group: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, group: &str, name: &str) -> ResourceKey {
        ResourceKey {
            kind,
            group: group.to_string(),
            name: name.to_string(),
        }
    }

    /// `kind/name` or `kind/name (group G)`, for messages.
    pub fn label(&self) -> String {
        if self.group.is_empty() {
            format!("{}/{}", self.kind, self.name)
        } else {
            format!("{}/{} (group {})", self.kind, self.name, self.group)
        }
    }
}

/// The kinds of mesh object the REST API registers (the Kubernetes source's counterparts).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum MeshKind {
    Namespace,
    Service,
    Endpoints,
    TrafficPolicy,
}

impl MeshKind {
    pub const ALL: [MeshKind; 4] = [
        MeshKind::Namespace,
        MeshKind::Service,
        MeshKind::Endpoints,
        MeshKind::TrafficPolicy,
    ];

    /// The path segment of the API (`/v1/mesh/{collection}`).
    pub fn collection(self) -> &'static str {
        match self {
            MeshKind::Namespace => "namespaces",
            MeshKind::Service => "services",
            MeshKind::Endpoints => "endpoints",
            MeshKind::TrafficPolicy => "trafficpolicies",
        }
    }

    pub fn from_collection(text: &str) -> Option<MeshKind> {
        MeshKind::ALL
            .into_iter()
            .find(|kind| kind.collection() == text)
    }
}

/// Where a mesh object lives. Namespaces have an empty `namespace` and their name in `name`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MeshKey {
    pub kind: MeshKind,
    pub namespace: String,
    pub name: String,
}

impl MeshKey {
    pub fn new(kind: MeshKind, namespace: &str, name: &str) -> MeshKey {
        MeshKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// `kind/namespace/name`, for messages.
    pub fn label(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}/{}", self.kind.collection(), self.name)
        } else {
            format!(
                "{}/{}/{}",
                self.kind.collection(),
                self.namespace,
                self.name
            )
        }
    }
}

/// All stored resources at one version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigState {
    pub version: u64,
    /// Encoded protobuf of each resource.
    pub resources: BTreeMap<ResourceKey, Bytes>,
    /// JSON of each mesh object registered through the REST API.
    pub mesh: BTreeMap<MeshKey, Bytes>,
    /// The control plane's own records (the CA root): never served, never listed by the API.
    pub private: PrivateEntries,
}

/// Records of the control plane itself, by name; their bytes stay out of `Debug` output
/// because they hold keys.
#[derive(Clone, Default, PartialEq)]
pub struct PrivateEntries(BTreeMap<String, Bytes>);

impl PrivateEntries {
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.0.get(name)
    }

    pub fn insert(&mut self, name: String, bytes: Bytes) {
        self.0.insert(name, bytes);
    }

    pub fn remove(&mut self, name: &str) {
        self.0.remove(name);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The records whose names start with `prefix`, with the rest of their names.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Bytes)> {
        self.0
            .range(prefix.to_string()..)
            .map_while(move |(name, bytes)| Some((name.strip_prefix(prefix)?, bytes)))
    }
}

impl std::fmt::Debug for PrivateEntries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl ConfigState {
    /// The state after `changes`, keeping the version (the store assigns the next one).
    pub fn with_changes(&self, changes: &[Change]) -> ConfigState {
        let mut next = self.clone();
        for change in changes {
            match change {
                Change::Put(key, bytes) => {
                    next.resources.insert(key.clone(), bytes.clone());
                }
                Change::Delete(key) => {
                    next.resources.remove(key);
                }
                Change::PutMesh(key, bytes) => {
                    next.mesh.insert(key.clone(), bytes.clone());
                }
                Change::DeleteMesh(key) => {
                    next.mesh.remove(key);
                }
                Change::PutPrivate(name, bytes) => {
                    next.private.insert(name.clone(), bytes.clone());
                }
                Change::DeletePrivate(name) => next.private.remove(name),
            }
        }
        next
    }

    /// Every group that holds at least one resource (not the global scope).
    pub fn groups(&self) -> std::collections::BTreeSet<String> {
        self.resources
            .keys()
            .filter(|key| !key.group.is_empty())
            .map(|key| key.group.clone())
            .collect()
    }
}

/// One write.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Put(ResourceKey, Bytes),
    Delete(ResourceKey),
    PutMesh(MeshKey, Bytes),
    DeleteMesh(MeshKey),
    /// A record of the control plane itself (see [`ConfigState::private`]).
    PutPrivate(String, Bytes),
    DeletePrivate(String),
}

impl Change {
    /// The xDS resource written, if this change writes one.
    pub fn resource_key(&self) -> Option<&ResourceKey> {
        match self {
            Change::Put(key, _) | Change::Delete(key) => Some(key),
            Change::PutMesh(..)
            | Change::DeleteMesh(_)
            | Change::PutPrivate(..)
            | Change::DeletePrivate(_) => None,
        }
    }

    /// The key text both stores use.
    pub(crate) fn encoded_key(&self) -> String {
        match self {
            Change::Put(key, _) | Change::Delete(key) => encode_key(key),
            Change::PutMesh(key, _) | Change::DeleteMesh(key) => encode_mesh_key(key),
            Change::PutPrivate(name, _) | Change::DeletePrivate(name) => {
                format!("{PRIVATE_PREFIX}{name}")
            }
        }
    }

    /// The bytes stored, or `None` for a deletion.
    pub(crate) fn bytes(&self) -> Option<&Bytes> {
        match self {
            Change::Put(_, bytes) | Change::PutMesh(_, bytes) | Change::PutPrivate(_, bytes) => {
                Some(bytes)
            }
            Change::Delete(_) | Change::DeleteMesh(_) | Change::DeletePrivate(_) => None,
        }
    }
}

/// The result of a conditional commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Stored; the new global version.
    Committed(u64),
    /// Someone else committed since `expected_version`: reload and retry.
    Conflict,
}

/// A durable home for the config.
pub trait ConfigStore: Send + Sync + 'static {
    /// Everything stored, with the current version.
    fn load(&self) -> BoxFuture<'_, anyhow::Result<ConfigState>>;

    /// Applies `changes` atomically as version `expected_version + 1`, if the stored version is
    /// still `expected_version`.
    fn commit(
        &self,
        expected_version: u64,
        changes: Vec<Change>,
    ) -> BoxFuture<'_, anyhow::Result<CommitOutcome>>;

    /// For shared stores: a signal that changes whenever another writer may have committed.
    fn external_changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// The key text of private records: `private/{name}`.
const PRIVATE_PREFIX: &str = "private/";

/// Key text shared by both stores: `{collection}/{global|g.GROUP}/{name}`.
pub(crate) fn encode_key(key: &ResourceKey) -> String {
    let scope = if key.group.is_empty() {
        "global".to_string()
    } else {
        format!("g.{}", key.group)
    };
    format!("{}/{}/{}", key.kind.collection(), scope, key.name)
}

/// Mesh objects: `mesh/{collection}/{namespace}/{name}` (namespace `-` for namespaces).
pub(crate) fn encode_mesh_key(key: &MeshKey) -> String {
    let namespace = if key.namespace.is_empty() {
        "-"
    } else {
        &key.namespace
    };
    format!("mesh/{}/{namespace}/{}", key.kind.collection(), key.name)
}

pub(crate) fn decode_mesh_key(text: &str) -> Option<MeshKey> {
    let mut parts = text.strip_prefix("mesh/")?.splitn(3, '/');
    let kind = MeshKind::from_collection(parts.next()?)?;
    let namespace = match parts.next()? {
        "-" => "",
        namespace => namespace,
    };
    Some(MeshKey::new(kind, namespace, parts.next()?))
}

/// Puts one stored entry into a state being loaded.
pub(crate) fn load_entry(state: &mut ConfigState, key: &str, bytes: &[u8]) {
    if let Some(name) = key.strip_prefix(PRIVATE_PREFIX) {
        state
            .private
            .insert(name.to_string(), Bytes::copy_from_slice(bytes));
    } else if let Some(key) = decode_mesh_key(key) {
        state.mesh.insert(key, Bytes::copy_from_slice(bytes));
    } else if let Some(key) = decode_key(key) {
        state.resources.insert(key, Bytes::copy_from_slice(bytes));
    } else {
        tracing::warn!(key, "ignoring unreadable key in store");
    }
}

pub(crate) fn decode_key(text: &str) -> Option<ResourceKey> {
    let mut parts = text.splitn(3, '/');
    let kind = Kind::from_collection(parts.next()?)?;
    let scope = parts.next()?;
    let name = parts.next()?;
    let group = if scope == "global" {
        String::new()
    } else {
        scope.strip_prefix("g.")?.to_string()
    };
    Some(ResourceKey {
        kind,
        group,
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_including_slashes_in_names() {
        for key in [
            ResourceKey::new(Kind::Route, "", "a/b"),
            ResourceKey::new(Kind::Cluster, "team-a", "c"),
        ] {
            assert_eq!(decode_key(&encode_key(&key)), Some(key));
        }
        assert_eq!(decode_key("nonsense"), None);
        for key in [
            MeshKey::new(MeshKind::Service, "shop", "b"),
            MeshKey::new(MeshKind::Namespace, "", "shop"),
        ] {
            assert_eq!(decode_mesh_key(&encode_mesh_key(&key)), Some(key));
        }
    }
}
