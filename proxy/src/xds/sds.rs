//! SDS over a stream of its own: a secret whose `sds_config` is a gRPC `api_config_source`
//! (Istio's `sds-grpc` cluster, the agent's unix socket) is fetched with `StreamSecrets` from
//! that source's cluster, one stream per secret, as Envoy opens them. Each response's secret is
//! read through the config gate and put in its slot, then ACKed; a response that does not read
//! is NACKed with the reason, and the last good version keeps serving. A closed stream reopens
//! after the ADS stream's backoff.

use std::sync::{Arc, Weak};

use remora_config::tls::GrpcSecretSource;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use xds_api::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use xds_api::google::rpc::Status as RpcStatus;
use xds_api::type_urls::SECRET;

use super::transport;
use crate::config::SecretSource;
use crate::store::Store;
use crate::tls::Secrets;
use crate::tls::secrets::OpenStream;

/// What [`Secrets::open_streams_with`] takes: each secret's stream runs on the current runtime
/// for as long as the secrets live.
pub fn opener(store: Arc<Store>, mut node: Node, secrets: &Arc<Secrets>) -> OpenStream {
    if node.user_agent_name.is_empty() {
        node.user_agent_name = "remora".into();
    }
    let runtime = tokio::runtime::Handle::current();
    let secrets = Arc::downgrade(secrets);
    Box::new(move |source, name| {
        runtime.spawn(keep_streaming(
            store.clone(),
            node.clone(),
            secrets.clone(),
            source,
            name,
        ));
    })
}

async fn keep_streaming(
    store: Arc<Store>,
    node: Node,
    secrets: Weak<Secrets>,
    source: GrpcSecretSource,
    name: String,
) {
    let mut backoff = transport::Backoff::default();
    let stream = Stream {
        node,
        secrets,
        source,
        name,
    };
    loop {
        match stream.run(&store).await {
            Ok(true) => backoff.reset(),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(secret = %stream.name, cluster = %stream.source.cluster, %error, "SDS: cannot open the stream");
            }
        }
        if stream.secrets.strong_count() == 0 {
            return;
        }
        let delay = backoff.next_delay();
        tracing::info!(secret = %stream.name, ?delay, "SDS: stream closed; reconnecting after backoff");
        tokio::time::sleep(delay).await;
    }
}

/// One secret's subscription.
struct Stream {
    node: Node,
    secrets: Weak<Secrets>,
    source: GrpcSecretSource,
    name: String,
}

impl Stream {
    /// One stream, from connect to close; whether it got any response.
    async fn run(&self, store: &Store) -> anyhow::Result<bool> {
        let channel = transport::connect_cluster(store, &self.source.cluster, "SDS").await?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(4);
        tx.send(self.request("", "", None, true)).await?;
        let mut inbound = client
            .stream_secrets(ReceiverStream::new(rx))
            .await?
            .into_inner();
        tracing::info!(secret = %self.name, cluster = %self.source.cluster, "SDS: stream established");
        let mut accepted = String::new();
        let mut got_response = false;
        loop {
            let response = match inbound.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(got_response),
                Err(status) => {
                    tracing::warn!(secret = %self.name, %status, "SDS: stream failed");
                    return Ok(got_response);
                }
            };
            got_response = true;
            let error = self.apply(&response).err();
            match &error {
                None => accepted = response.version_info.clone(),
                Some(error) => {
                    tracing::warn!(secret = %self.name, version = %response.version_info, %error, "SDS: NACK");
                }
            }
            let answer = self.request(&accepted, &response.nonce, error, false);
            if tx.send(answer).await.is_err() {
                return Ok(got_response);
            }
        }
    }

    /// The secret of `response` into its slot, checked as Envoy checks an SDS update.
    fn apply(&self, response: &DiscoveryResponse) -> Result<(), String> {
        let name = &self.name;
        let [any] = response.resources.as_slice() else {
            return Err(match response.resources.len() {
                0 => format!("Missing SDS resources for {name} in onConfigUpdate()"),
                n => format!("Unexpected SDS secrets length: {n}"),
            });
        };
        if any.type_url != SECRET {
            return Err(format!("a {} where a Secret was asked for", any.type_url));
        }
        let secret = remora_config::resource::secret(&any.value)
            .map_err(|error| format!("Secret {name}: {error}"))?;
        if secret.name != *name {
            return Err(format!(
                "Unexpected SDS secret (expecting {name}): {}",
                secret.name
            ));
        }
        let Some(secrets) = self.secrets.upgrade() else {
            return Ok(());
        };
        secrets
            .set(&SecretSource::Grpc(self.source.clone()), &secret)
            .map_err(|error| format!("Secret {name}: {error}"))
    }

    /// A request: the first (`first`), an ACK, or a NACK (with `error`).
    fn request(
        &self,
        version: &str,
        nonce: &str,
        error: Option<String>,
        first: bool,
    ) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_string(),
            node: (first || !self.source.node_on_first_message_only).then(|| self.node.clone()),
            resource_names: vec![self.name.clone()],
            type_url: SECRET.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: error.map(|message| RpcStatus {
                code: 13,
                message,
                details: Vec::new(),
            }),
        }
    }
}
