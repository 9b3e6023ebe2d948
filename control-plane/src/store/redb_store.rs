//! The embedded store: one redb file under `--data-dir`, written in one ACID transaction per
//! commit, so config and version survive a restart together.

use std::path::Path;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use redb::{Database, ReadableTable, TableDefinition};

use super::{Change, CommitOutcome, ConfigState, ConfigStore, load_entry};

const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION_KEY: &str = "version";

pub struct RedbStore {
    database: Arc<Database>,
}

impl RedbStore {
    /// Opens (or creates) `DIR/config.redb`.
    pub fn open(dir: &Path) -> anyhow::Result<RedbStore> {
        std::fs::create_dir_all(dir)?;
        let database = Database::create(dir.join("config.redb"))?;
        let transaction = database.begin_write()?;
        transaction.open_table(RESOURCES)?;
        transaction.open_table(META)?;
        transaction.commit()?;
        Ok(RedbStore {
            database: Arc::new(database),
        })
    }

    fn load_blocking(database: &Database) -> anyhow::Result<ConfigState> {
        let transaction = database.begin_read()?;
        let meta = transaction.open_table(META)?;
        let version = meta
            .get(VERSION_KEY)?
            .map(|value| value.value())
            .unwrap_or(0);
        let table = transaction.open_table(RESOURCES)?;
        let mut state = ConfigState {
            version,
            ..ConfigState::default()
        };
        for entry in table.iter()? {
            let (key, value) = entry?;
            load_entry(&mut state, key.value(), value.value());
        }
        Ok(state)
    }

    fn commit_blocking(
        database: &Database,
        expected_version: u64,
        changes: &[Change],
    ) -> anyhow::Result<CommitOutcome> {
        let transaction = database.begin_write()?;
        let next = {
            let mut meta = transaction.open_table(META)?;
            let current = meta
                .get(VERSION_KEY)?
                .map(|value| value.value())
                .unwrap_or(0);
            if current != expected_version {
                return Ok(CommitOutcome::Conflict);
            }
            let next = current + 1;
            meta.insert(VERSION_KEY, next)?;
            let mut table = transaction.open_table(RESOURCES)?;
            for change in changes {
                let key = change.encoded_key();
                match change.bytes() {
                    Some(bytes) => {
                        table.insert(key.as_str(), bytes.as_ref())?;
                    }
                    None => {
                        table.remove(key.as_str())?;
                    }
                }
            }
            next
        };
        transaction.commit()?;
        Ok(CommitOutcome::Committed(next))
    }
}

impl ConfigStore for RedbStore {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<ConfigState>> {
        let database = self.database.clone();
        async move { tokio::task::spawn_blocking(move || Self::load_blocking(&database)).await? }
            .boxed()
    }

    fn commit(
        &self,
        expected_version: u64,
        changes: Vec<Change>,
    ) -> BoxFuture<'_, anyhow::Result<CommitOutcome>> {
        let database = self.database.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Self::commit_blocking(&database, expected_version, &changes)
            })
            .await?
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Kind;
    use crate::store::ResourceKey;
    use bytes::Bytes;

    #[tokio::test]
    async fn commits_survive_reopening_and_versions_increase() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = ResourceKey::new(Kind::Cluster, "g1", "c1");
        {
            let store = RedbStore::open(dir.path()).expect("open");
            assert_eq!(store.load().await.expect("load").version, 0);
            let outcome = store
                .commit(0, vec![Change::Put(key.clone(), Bytes::from_static(b"x"))])
                .await
                .expect("commit");
            assert_eq!(outcome, CommitOutcome::Committed(1));
            let stale = store.commit(0, vec![]).await.expect("commit");
            assert_eq!(stale, CommitOutcome::Conflict);
        }
        let store = RedbStore::open(dir.path()).expect("reopen");
        let state = store.load().await.expect("load");
        assert_eq!(state.version, 1);
        assert_eq!(
            state.resources.get(&key).map(|b| b.as_ref()),
            Some(&b"x"[..])
        );
        let outcome = store
            .commit(1, vec![Change::Delete(key.clone())])
            .await
            .expect("commit");
        assert_eq!(outcome, CommitOutcome::Committed(2));
        assert!(store.load().await.expect("load").resources.is_empty());
    }
}
