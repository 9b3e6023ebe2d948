//! The shared store: config kept in etcd under `/remora/`, so several control-plane replicas
//! serve the same config. A commit is one etcd transaction guarded by the version key; each
//! replica watches that key and reloads when another replica writes.
//!
//! Talks etcd's v3 gRPC API through a client generated from our own protos (`protos/etcd`,
//! only the calls used here), so the build needs no system `protoc`.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

use super::{Change, CommitOutcome, ConfigState, ConfigStore, load_entry};

/// The generated etcd v3 messages and clients.
#[allow(clippy::all, missing_docs)]
mod api {
    include!(concat!(env!("OUT_DIR"), "/etcd_api.rs"));
}

use api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use api::etcdserverpb::kv_client::KvClient;
use api::etcdserverpb::request_op::Request as Op;
use api::etcdserverpb::watch_client::WatchClient;
use api::etcdserverpb::watch_request::RequestUnion;
use api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchRequest,
};

const PREFIX: &str = "/remora/";
const RESOURCE_PREFIX: &str = "/remora/res/";
const VERSION_KEY: &str = "/remora/version";

pub struct EtcdStore {
    channel: Channel,
    changes: watch::Receiver<u64>,
}

impl EtcdStore {
    /// Connects to the etcd cluster (`http://host:port` or `host:port` each; requests are
    /// spread over them) and starts watching the version key.
    pub async fn connect(endpoints: &[String]) -> anyhow::Result<EtcdStore> {
        let endpoints = endpoints
            .iter()
            .map(|endpoint| parse_endpoint(endpoint))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if endpoints.is_empty() {
            bail!("no etcd endpoint given");
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        let (sender, changes) = watch::channel(0);
        tokio::spawn(watch_version(channel.clone(), sender));
        Ok(EtcdStore { channel, changes })
    }
}

fn parse_endpoint(endpoint: &str) -> anyhow::Result<Endpoint> {
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    if !url.starts_with("http://") {
        bail!("etcd endpoint {endpoint:?}: only plain http:// endpoints are supported");
    }
    Ok(Endpoint::from_shared(url)
        .with_context(|| format!("etcd endpoint {endpoint:?} is not a URL"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

/// The end of the key range holding every key that starts with `prefix`: the prefix with its
/// last byte incremented (etcd's convention for prefix reads).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: up to the end of the key space.
    vec![0]
}

/// Follows `/remora/version`, re-establishing the watch if the connection drops.
async fn watch_version(channel: Channel, sender: watch::Sender<u64>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow_version(channel.clone(), &sender, &mut backoff).await {
            Ok(()) => tracing::warn!("etcd ended the watch of {VERSION_KEY}"),
            Err(error) => tracing::warn!(error = %format!("{error:#}"), "etcd watch failed"),
        }
        if sender.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One watch of the version key, until the stream ends; ticks `sender` on every change.
async fn follow_version(
    channel: Channel,
    sender: &watch::Sender<u64>,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    // The request stream stays open as long as the watch should: dropping `requests` would
    // end it.
    let (requests, request_stream) = mpsc::channel(1);
    requests
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: VERSION_KEY.as_bytes().to_vec(),
                ..Default::default()
            })),
        })
        .await
        .context("queueing the watch request")?;
    let mut responses = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(request_stream))
        .await
        .context("opening the watch stream")?
        .into_inner();
    while let Some(response) = responses.message().await? {
        if response.created {
            *backoff = Duration::from_millis(100);
            // The watch may have missed writes while it was down.
            sender.send_modify(|tick| *tick += 1);
        }
        if response.canceled {
            bail!("watch cancelled: {}", response.cancel_reason);
        }
        if !response.events.is_empty() {
            sender.send_modify(|tick| *tick += 1);
        }
        if sender.is_closed() {
            return Ok(());
        }
    }
    drop(requests);
    Ok(())
}

impl ConfigStore for EtcdStore {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<ConfigState>> {
        let mut client = KvClient::new(self.channel.clone());
        async move {
            let response = client
                .range(RangeRequest {
                    key: PREFIX.as_bytes().to_vec(),
                    range_end: prefix_end(PREFIX),
                    ..Default::default()
                })
                .await
                .context("reading /remora/ from etcd")?
                .into_inner();
            let mut state = ConfigState::default();
            for kv in response.kvs {
                let key = std::str::from_utf8(&kv.key)
                    .with_context(|| format!("etcd key {:?} is not UTF-8", kv.key))?;
                if key == VERSION_KEY {
                    state.version = std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|value| value.parse().ok())
                        .with_context(|| {
                            format!("{VERSION_KEY} holds {:?}, not a number", kv.value)
                        })?;
                } else if let Some(rest) = key.strip_prefix(RESOURCE_PREFIX) {
                    load_entry(&mut state, rest, &kv.value);
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
        let mut client = KvClient::new(self.channel.clone());
        async move {
            let key = VERSION_KEY.as_bytes().to_vec();
            // Version 0 of a key means it does not exist yet.
            let guard = if expected_version == 0 {
                Compare {
                    result: CompareResult::Equal.into(),
                    target: CompareTarget::Version.into(),
                    key,
                    target_union: Some(TargetUnion::Version(0)),
                }
            } else {
                Compare {
                    result: CompareResult::Equal.into(),
                    target: CompareTarget::Value.into(),
                    key,
                    target_union: Some(TargetUnion::Value(
                        expected_version.to_string().into_bytes(),
                    )),
                }
            };
            let next = expected_version + 1;
            let mut operations = vec![put(VERSION_KEY.to_string(), next.to_string().into_bytes())];
            for change in &changes {
                let key = format!("{RESOURCE_PREFIX}{}", change.encoded_key());
                operations.push(match change.bytes() {
                    Some(bytes) => put(key, bytes.to_vec()),
                    None => RequestOp {
                        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                            key: key.into_bytes(),
                            ..Default::default()
                        })),
                    },
                });
            }
            let response = client
                .txn(TxnRequest {
                    compare: vec![guard],
                    success: operations,
                    failure: Vec::new(),
                })
                .await
                .context("committing to etcd")?
                .into_inner();
            Ok(if response.succeeded {
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

fn put(key: String, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.into_bytes(),
            value,
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_its_last_byte_is_incremented() {
        assert_eq!(prefix_end("/remora/"), b"/remora0");
        assert_eq!(prefix_end("a"), b"b");
    }

    #[test]
    fn endpoints_without_a_scheme_are_http_and_tls_is_refused_clearly() {
        assert_eq!(
            parse_endpoint("127.0.0.1:2379").unwrap().uri().to_string(),
            "http://127.0.0.1:2379/"
        );
        let error = parse_endpoint("https://etcd:2379").unwrap_err().to_string();
        assert!(error.contains("only plain http://"), "{error}");
    }
}
