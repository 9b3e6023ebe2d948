//! The single write path for config: validate the state a write would produce, commit it to the
//! store as one new version, and hand the committed state to the snapshot hub. Also follows a
//! shared store for writes made by other replicas.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Mutex, watch};

use crate::snapshot::Committed;
use crate::store::{Change, CommitOutcome, ConfigState, ConfigStore};
use crate::validate::{Findings, Problem, check_state};

/// Why a write was not stored.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("validation failed")]
    Invalid(Findings),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("store error: {0}")]
    Store(#[from] anyhow::Error),
}

/// A stored write.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WriteOutcome {
    pub version: u64,
    /// Written resources that are stored but held back from proxies (e.g. EDS clusters
    /// without endpoints).
    pub waiting: Vec<Problem>,
    /// Written resources a Remora proxy would refuse (see `Findings::remora`).
    pub remora: Vec<Problem>,
}

pub struct ConfigService {
    store: Arc<dyn ConfigStore>,
    commits: watch::Sender<Committed>,
    writer: Mutex<()>,
}

/// How many times a write is retried when another replica committed first.
const COMMIT_ATTEMPTS: usize = 8;

impl ConfigService {
    /// Loads the stored config.
    pub async fn open(store: Arc<dyn ConfigStore>) -> anyhow::Result<Arc<ConfigService>> {
        let state = store.load().await?;
        let (commits, _) = watch::channel(Committed {
            state: Arc::new(state),
            at: Instant::now(),
        });
        Ok(Arc::new(ConfigService {
            store,
            commits,
            writer: Mutex::new(()),
        }))
    }

    /// Follow committed versions (the snapshot hub does).
    pub fn commits(&self) -> watch::Receiver<Committed> {
        self.commits.subscribe()
    }

    pub fn current(&self) -> Arc<ConfigState> {
        self.commits.borrow().state.clone()
    }

    /// Validates and stores `changes` as one new version. Deleting something absent is
    /// `NotFound`.
    pub async fn write(&self, changes: Vec<Change>) -> Result<WriteOutcome, WriteError> {
        self.write_or_check(changes, false).await
    }

    /// Validates `changes` as `write` would, and stores nothing (the version is the current).
    pub async fn check(&self, changes: Vec<Change>) -> Result<WriteOutcome, WriteError> {
        self.write_or_check(changes, true).await
    }

    async fn write_or_check(
        &self,
        changes: Vec<Change>,
        dry_run: bool,
    ) -> Result<WriteOutcome, WriteError> {
        let _writer = self.writer.lock().await;
        for _ in 0..COMMIT_ATTEMPTS {
            let base = self.current();
            for change in &changes {
                match change {
                    Change::Delete(key) if !base.resources.contains_key(key) => {
                        return Err(WriteError::NotFound(key.label()));
                    }
                    Change::DeleteMesh(key) if !base.mesh.contains_key(key) => {
                        return Err(WriteError::NotFound(key.label()));
                    }
                    Change::DeletePrivate(name) if !base.private.contains(name) => {
                        return Err(WriteError::NotFound(name.clone()));
                    }
                    _ => {}
                }
            }
            let mut next = base.with_changes(&changes);
            let changed: BTreeSet<_> = changes
                .iter()
                .filter_map(Change::resource_key)
                .cloned()
                .collect();
            let mut findings = check_state(&next, &changed);
            if !findings.errors.is_empty() {
                return Err(WriteError::Invalid(findings));
            }
            if dry_run {
                return Ok(WriteOutcome {
                    version: base.version,
                    waiting: findings.waiting,
                    remora: findings.remora,
                });
            }
            match self.store.commit(base.version, changes.clone()).await? {
                CommitOutcome::Committed(version) => {
                    next.version = version;
                    self.publish(next);
                    let written: BTreeSet<String> = changed
                        .iter()
                        .map(|key| format!("{}/{}", key.kind, key.name))
                        .collect();
                    findings
                        .waiting
                        .retain(|problem| written.contains(&problem.resource));
                    return Ok(WriteOutcome {
                        version,
                        waiting: findings.waiting,
                        remora: findings.remora,
                    });
                }
                CommitOutcome::Conflict => self.reload_locked().await?,
            }
        }
        Err(WriteError::Store(anyhow::anyhow!(
            "the store kept changing under this write; try again"
        )))
    }

    fn publish(&self, state: ConfigState) {
        self.commits.send_replace(Committed {
            state: Arc::new(state),
            at: Instant::now(),
        });
    }

    async fn reload_locked(&self) -> anyhow::Result<()> {
        let state = self.store.load().await?;
        if state.version != self.current().version {
            tracing::info!(version = state.version, "config changed in the store");
            self.publish(state);
        }
        Ok(())
    }

    /// Reloads whenever a shared store reports a change (another replica wrote).
    pub async fn follow_store(self: Arc<Self>) {
        let Some(mut changes) = self.store.external_changes() else {
            return;
        };
        while changes.changed().await.is_ok() {
            let _writer = self.writer.lock().await;
            if let Err(error) = self.reload_locked().await {
                tracing::warn!(%error, "cannot reload config from the store");
            }
        }
    }
}
