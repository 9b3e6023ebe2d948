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

/// All stored resources at one version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigState {
    pub version: u64,
    /// Encoded protobuf of each resource.
    pub resources: BTreeMap<ResourceKey, Bytes>,
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
}

impl Change {
    pub fn key(&self) -> &ResourceKey {
        match self {
            Change::Put(key, _) | Change::Delete(key) => key,
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

/// Key text shared by both stores: `{collection}/{global|g.GROUP}/{name}`.
pub(crate) fn encode_key(key: &ResourceKey) -> String {
    let scope = if key.group.is_empty() {
        "global".to_string()
    } else {
        format!("g.{}", key.group)
    };
    format!("{}/{}/{}", key.kind.collection(), scope, key.name)
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
    }
}
