//! The shared store: config kept in etcd under `/remora/`, so several control-plane replicas
//! serve the same config. A commit is one etcd transaction guarded by the version key; each
//! replica watches that key and reloads when another replica writes.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{Change, CommitOutcome, ConfigState, ConfigStore, load_entry};

const PREFIX: &str = "/remora/";
const RESOURCE_PREFIX: &str = "/remora/res/";
const VERSION_KEY: &str = "/remora/version";

pub struct EtcdStore {
    client: Client,
    changes: watch::Receiver<u64>,
}

impl EtcdStore {
    /// Connects to the etcd cluster and starts watching the version key.
    pub async fn connect(endpoints: &[String]) -> anyhow::Result<EtcdStore> {
        let client = Client::connect(endpoints, None).await?;
        let (sender, changes) = watch::channel(0);
        tokio::spawn(watch_version(client.clone(), sender));
        Ok(EtcdStore { client, changes })
    }
}

/// Follows `/remora/version`, re-establishing the watch if the connection drops.
async fn watch_version(mut client: Client, sender: watch::Sender<u64>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.watch(VERSION_KEY, None::<WatchOptions>).await {
            Ok((_watcher, mut stream)) => {
                backoff = Duration::from_millis(100);
                // The watch may have missed writes while it was down.
                sender.send_modify(|tick| *tick += 1);
                loop {
                    match stream.message().await {
                        Ok(Some(_response)) => sender.send_modify(|tick| *tick += 1),
                        Ok(None) => break,
                        Err(error) => {
                            tracing::warn!(%error, "etcd watch failed");
                            break;
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot watch etcd"),
        }
        if sender.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

impl ConfigStore for EtcdStore {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<ConfigState>> {
        let mut client = self.client.clone();
        async move {
            let response = client
                .get(PREFIX, Some(GetOptions::new().with_prefix()))
                .await?;
            let mut state = ConfigState::default();
            for kv in response.kvs() {
                let key = kv.key_str()?;
                if key == VERSION_KEY {
                    state.version = kv.value_str()?.parse()?;
                } else if let Some(rest) = key.strip_prefix(RESOURCE_PREFIX) {
                    load_entry(&mut state, rest, kv.value());
                }
            }
            Ok(state)
        }
        .boxed()
    }

    fn commit(
        &self,
        expected_version: u64,
        changes: Vec<Change>,
    ) -> BoxFuture<'_, anyhow::Result<CommitOutcome>> {
        let mut client = self.client.clone();
        async move {
            let guard = if expected_version == 0 {
                Compare::version(VERSION_KEY, CompareOp::Equal, 0)
            } else {
                Compare::value(VERSION_KEY, CompareOp::Equal, expected_version.to_string())
            };
            let next = expected_version + 1;
            let mut operations = vec![TxnOp::put(VERSION_KEY, next.to_string(), None)];
            for change in &changes {
                let key = format!("{RESOURCE_PREFIX}{}", change.encoded_key());
                operations.push(match change.bytes() {
                    Some(bytes) => TxnOp::put(key, bytes.to_vec(), None),
                    None => TxnOp::delete(key, None),
                });
            }
            let response = client
                .txn(Txn::new().when([guard]).and_then(operations))
                .await?;
            Ok(if response.succeeded() {
                CommitOutcome::Committed(next)
            } else {
                CommitOutcome::Conflict
            })
        }
        .boxed()
    }

    fn external_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }
}
