//! Who an xDS stream is. With `--xds-auth token`, every stream presents a bootstrap token in
//! its initial metadata (`authorization: Bearer TOKEN`; Envoy sets it with the gRPC service's
//! `initial_metadata`). Tokens are issued through the config API (`POST /v1/xds-tokens`) for
//! one group and, for mesh sidecars, one workload identity (namespace and service account);
//! the store keeps only their SHA-256, so replicas on one etcd accept the same tokens and a
//! leaked store does not leak them.
//!
//! The credential, not the node, decides: a stream gets the group its token names (a node
//! naming another group in `node.cluster` is refused), and a sidecar gets the certificate of
//! the token's identity (a sidecar in another namespace is refused). Without a token, or with
//! an unknown one, the stream ends at once with `UNAUTHENTICATED`.
//!
//! Revoking a token (`DELETE /v1/xds-tokens/ID`, on any replica: each follows the store) also
//! ends the streams open with it, with `UNAUTHENTICATED` and `token revoked` ([`TokenAuth`]
//! keeps the open streams of each token); the proxy's reconnect is then refused, naming the
//! revocation while this process remembers it. Certificate requests are single calls, checked
//! when made.
//!
//! With `--xds-tls-client-auth`, a client certificate of the mesh CA is a credential too, in any
//! mode: a caller with no bearer token whose certificate names
//! `spiffe://TD/ns/NAMESPACE/sa/SERVICE_ACCOUNT` is that service account, with the rules of a
//! Kubernetes token bound to no pod (the node keeps its group; a sidecar must be in that
//! namespace and gets that identity). A bearer token, when sent, decides instead.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tonic::Status;
use xds_api::envoy::config::core::v3::Node;

use crate::ca::SpiffeId;
use crate::config::ConfigService;
use crate::mesh::model::ObjectKey;
use crate::mesh::sidecar::Sidecar;
use crate::xds::kube_auth::{AUDIENCE, KubeAuth, ServiceAccountToken};
use crate::xds::tls::ClientCertificate;

/// Where token grants are kept among the store's private records: `xds-token/SHA256HEX`.
pub const TOKEN_RECORD_PREFIX: &str = "xds-token/";
/// How many hex digits of a token's hash name it in the API.
const ID_DIGITS: usize = 16;
/// How many revoked tokens a process remembers, to tell a reconnect why it is refused.
const REMEMBERED_REVOCATIONS: usize = 4096;

/// What a token allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grant {
    /// The group whose resources the stream receives.
    pub group: String,
    /// For mesh sidecars: the namespace and service account whose certificate they get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl Grant {
    /// What is wrong with a grant asked for, if anything.
    pub fn problem(&self) -> Option<String> {
        let name_ok = |text: &str| {
            !text.is_empty()
                && text
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"-._".contains(&byte))
        };
        if !name_ok(&self.group) {
            return Some(format!(
                "group {:?}: a non-empty name of letters, digits, '-', '.', '_'",
                self.group
            ));
        }
        match (&self.namespace, &self.service_account) {
            (None, None) => None,
            (Some(namespace), Some(account)) if name_ok(namespace) && name_ok(account) => None,
            (Some(_), Some(_)) => {
                Some("namespace and serviceAccount: names of letters, digits, '-', '.', '_'".into())
            }
            _ => Some("namespace and serviceAccount go together (a workload identity)".into()),
        }
    }
}

/// A new token: 32 random bytes, hex.
pub fn new_token() -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a token"))?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The private record name of a token.
pub fn record_name(token: &str) -> String {
    format!(
        "{TOKEN_RECORD_PREFIX}{}",
        hex(&Sha256::digest(token.as_bytes()))
    )
}

/// The id the API shows for a token record (`xds-token/HASH` → the hash's first digits).
pub fn id_of(record_hash: &str) -> &str {
    record_hash.get(..ID_DIGITS).unwrap_or(record_hash)
}

/// How streams are authenticated.
#[derive(Clone, Default)]
pub enum XdsAuth {
    /// Any stream is served what its node asks for (trusted networks only).
    #[default]
    Open,
    /// Streams must present a token issued through the config API.
    Tokens(Arc<TokenAuth>),
    /// Streams must present a projected ServiceAccount token (audience `remora`), checked by
    /// the API server's TokenReview.
    Kubernetes(Arc<KubeAuth>),
}

/// Who an authenticated stream or certificate request is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The grant of a bootstrap token, and the token's record hash (`xds-token/HASH`).
    Token { hash: String, grant: Grant },
    /// A Kubernetes service account; with a pod-bound token, its pod and that pod's group.
    ServiceAccount {
        account: ServiceAccountToken,
        group: Option<String>,
    },
    /// A client certificate of the mesh CA naming this workload identity.
    Certificate(SpiffeId),
}

impl Caller {
    /// What kind of credential it is, for messages.
    pub fn credential(&self) -> &'static str {
        match self {
            Caller::Token { .. } => "bootstrap token",
            Caller::ServiceAccount { .. } => "service account token",
            Caller::Certificate(_) => "client certificate",
        }
    }

    /// The group whose resources the caller may receive; `None`: the node's own.
    pub fn group(&self) -> Option<&str> {
        match self {
            Caller::Token { grant, .. } => Some(&grant.group),
            Caller::ServiceAccount { group, .. } => group.as_deref(),
            Caller::Certificate(_) => None,
        }
    }

    /// The workload identity (namespace, service account) the credential proves, if any.
    pub fn workload(&self) -> Option<(&str, &str)> {
        match self {
            Caller::Token { grant, .. } => grant
                .namespace
                .as_deref()
                .zip(grant.service_account.as_deref()),
            Caller::ServiceAccount { account, .. } => {
                Some((&account.namespace, &account.service_account))
            }
            Caller::Certificate(identity) => Some((&identity.namespace, &identity.service_account)),
        }
    }

    /// The pod a credential is bound to (a projected service account token).
    pub fn pod(&self) -> Option<ObjectKey> {
        match self {
            Caller::Token { .. } | Caller::Certificate(_) => None,
            Caller::ServiceAccount { account, .. } => account
                .pod
                .as_ref()
                .map(|pod| ObjectKey::new(&account.namespace, pod)),
        }
    }

    /// Whether the caller may speak as node `node_id`: a pod-bound credential only as
    /// `POD.NAMESPACE` of its pod (a bootstrap token is bound to no node).
    pub fn check_node_id(&self, node_id: &str) -> Result<(), Status> {
        match self.pod() {
            Some(pod) if node_id != format!("{}.{}", pod.name, pod.namespace) => {
                Err(Status::permission_denied(format!(
                    "node {node_id:?} is not the pod the token is bound to ({}.{})",
                    pod.name, pod.namespace
                )))
            }
            _ => Ok(()),
        }
    }
}

impl XdsAuth {
    /// Who the credential in `headers` (else the connection's `client` certificate) is,
    /// `None` when authentication is off and no certificate names the caller, or the status
    /// that ends the stream or request.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        client: &ClientCertificate,
    ) -> Result<Option<Caller>, Status> {
        if !headers.contains_key(http::header::AUTHORIZATION) {
            match client {
                ClientCertificate::Identity(identity) => {
                    return Ok(Some(Caller::Certificate(identity.clone())));
                }
                ClientCertificate::Unusable(problem) => {
                    return Err(Status::unauthenticated(problem.clone()));
                }
                ClientCertificate::Absent => {}
            }
        }
        let tokens = match self {
            XdsAuth::Open => return Ok(None),
            XdsAuth::Tokens(tokens) => tokens,
            XdsAuth::Kubernetes(kube) => {
                let token = bearer_token(headers).map_err(|problem| {
                    Status::unauthenticated(format!(
                        "{problem}: this xDS server requires a projected service account token with audience {AUDIENCE:?} in the initial metadata, 'authorization: Bearer TOKEN'"
                    ))
                })?;
                let (account, group) = kube.authenticate(token).await?;
                return Ok(Some(Caller::ServiceAccount { account, group }));
            }
        };
        let token = bearer_token(headers).map_err(|problem| {
            Status::unauthenticated(format!(
                "{problem}: this xDS server requires a bootstrap token in the initial metadata, 'authorization: Bearer TOKEN' (tokens come from POST /v1/xds-tokens)"
            ))
        })?;
        tokens.authenticate(token).map(Some)
    }

    /// Follows the credential `caller` authenticated with, for a stream that lives on: the
    /// [`Revocation`] resolves when it is withdrawn. `None` for credentials never withdrawn
    /// while a stream is open (no authentication, Kubernetes tokens).
    pub fn follow(&self, caller: &Caller) -> Option<Revocation> {
        match (self, caller) {
            (XdsAuth::Tokens(tokens), Caller::Token { hash, .. }) => Some(tokens.follow(hash)),
            _ => None,
        }
    }
}

/// `--xds-auth token`: bootstrap tokens checked against the store, and the streams open with
/// each, closed when it is revoked.
pub struct TokenAuth {
    config: Arc<ConfigService>,
    next_stream: AtomicU64,
    /// Open streams by token record hash: each one's way to be told to end.
    streams: Mutex<HashMap<String, HashMap<u64, oneshot::Sender<Status>>>>,
    /// Token record hashes seen revoked by this process, oldest first (bounded).
    revoked: Mutex<VecDeque<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The status that ends a stream of a revoked token, or refuses the token again.
fn revoked_status(hash: &str) -> Status {
    let id = id_of(hash);
    Status::unauthenticated(format!(
        "token revoked: the bootstrap token {id} was revoked (DELETE /v1/xds-tokens/{id}); issue a new one with POST /v1/xds-tokens"
    ))
}

impl TokenAuth {
    pub fn new(config: Arc<ConfigService>) -> Arc<TokenAuth> {
        Arc::new(TokenAuth {
            config,
            next_stream: AtomicU64::new(0),
            streams: Mutex::new(HashMap::new()),
            revoked: Mutex::new(VecDeque::new()),
        })
    }

    /// The grant of `token`, or why it is refused.
    fn authenticate(&self, token: &str) -> Result<Caller, Status> {
        let name = record_name(token);
        let hash = name.trim_start_matches(TOKEN_RECORD_PREFIX);
        let state = self.config.current();
        let Some(record) = state.private.get(&name) else {
            if lock(&self.revoked).iter().any(|revoked| revoked == hash) {
                return Err(revoked_status(hash));
            }
            return Err(Status::unauthenticated(
                "unknown or revoked bootstrap token",
            ));
        };
        serde_json::from_slice(record)
            .map(|grant| Caller::Token {
                hash: hash.to_string(),
                grant,
            })
            .map_err(|_| Status::internal("the stored grant of this token is unreadable"))
    }

    /// Registers a stream of the token with record hash `hash`.
    fn follow(self: &Arc<Self>, hash: &str) -> Revocation {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        lock(&self.streams)
            .entry(hash.to_string())
            .or_default()
            .insert(stream, sender);
        let revocation = Revocation {
            receiver,
            registered: Some((self.clone(), hash.to_string(), stream)),
        };
        // Revoked between the stream's authentication and now: the follower may have looked
        // before this stream was registered.
        let name = format!("{TOKEN_RECORD_PREFIX}{hash}");
        if !self.config.current().private.contains(&name) {
            self.close(hash);
        }
        revocation
    }

    /// Ends every stream of the token with record hash `hash`.
    fn close(&self, hash: &str) {
        let streams = lock(&self.streams).remove(hash).unwrap_or_default();
        if !streams.is_empty() {
            tracing::info!(
                token = id_of(hash),
                streams = streams.len(),
                "token revoked: closing its xDS streams"
            );
        }
        for (_, sender) in streams {
            let _ = sender.send(revoked_status(hash));
        }
    }

    /// Follows the config's commits (local writes and other replicas' alike): remembers the
    /// tokens that went away and ends their streams. Runs until the config service is gone.
    pub async fn follow_revocations(self: Arc<Self>) {
        let mut commits = self.config.commits();
        let mut known = token_hashes(&commits.borrow_and_update().state.private);
        while commits.changed().await.is_ok() {
            let state = commits.borrow_and_update().state.clone();
            let now = token_hashes(&state.private);
            let gone: Vec<String> = known.difference(&now).cloned().collect();
            known = now;
            if !gone.is_empty() {
                let mut revoked = lock(&self.revoked);
                for hash in &gone {
                    revoked.push_back(hash.clone());
                }
                while revoked.len() > REMEMBERED_REVOCATIONS {
                    revoked.pop_front();
                }
            }
            // Every followed token that is gone, not only those seen going: a stream may have
            // registered with a token revoked just before.
            let followed: Vec<String> = lock(&self.streams)
                .keys()
                .filter(|hash| {
                    !state
                        .private
                        .contains(&format!("{TOKEN_RECORD_PREFIX}{hash}"))
                })
                .cloned()
                .collect();
            for hash in followed {
                self.close(&hash);
            }
        }
    }

    fn forget(&self, hash: &str, stream: u64) {
        let mut streams = lock(&self.streams);
        if let Some(open) = streams.get_mut(hash) {
            open.remove(&stream);
            if open.is_empty() {
                streams.remove(hash);
            }
        }
    }
}

fn token_hashes(private: &crate::store::PrivateEntries) -> BTreeSet<String> {
    private
        .with_prefix(TOKEN_RECORD_PREFIX)
        .map(|(hash, _)| hash.to_string())
        .collect()
}

/// One stream's watch on its credential: [`Revocation::revoked`] gives the status to end the
/// stream with once the credential is withdrawn. Dropped with the stream, it stops following.
pub struct Revocation {
    receiver: oneshot::Receiver<Status>,
    registered: Option<(Arc<TokenAuth>, String, u64)>,
}

impl Revocation {
    /// Resolves with the status to end the stream with, once the credential is revoked.
    pub async fn revoked(&mut self) -> Status {
        match (&mut self.receiver).await {
            Ok(status) => status,
            // The registry went away (the server is stopping): nothing will revoke it.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Revocation {
    fn drop(&mut self) {
        if let Some((tokens, hash, stream)) = self.registered.take() {
            tokens.forget(&hash, stream);
        }
    }
}

/// The token of `authorization: Bearer TOKEN`, or what is wrong with the header.
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, &'static str> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or("no authorization metadata")?;
    value
        .to_str()
        .ok()
        .and_then(|text| text.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or("the authorization metadata is not 'Bearer TOKEN'")
}

/// Applies `grant` to the stream's node: the node's group becomes the grant's (a different
/// group named by the node is refused); a sidecar must be in the grant's namespace and takes
/// its service account.
pub fn authorize(
    caller: &Caller,
    node: &mut Node,
    sidecar: Option<&mut Sidecar>,
) -> Result<(), Status> {
    caller.check_node_id(&node.id)?;
    if let Some(group) = caller.group() {
        if !node.cluster.is_empty() && node.cluster != group {
            return Err(Status::permission_denied(format!(
                "node.cluster is {:?} but the credential is for group {group:?}",
                node.cluster
            )));
        }
        node.cluster = group.to_string();
    }
    let group = node.cluster.clone();
    let Some(sidecar) = sidecar else {
        return Ok(());
    };
    if let Some(pod) = caller.pod()
        && sidecar.workload != pod
    {
        return Err(Status::permission_denied(format!(
            "sidecar {} says it is pod {}/{} but the token is bound to pod {}/{}",
            sidecar.node_id,
            sidecar.workload.namespace,
            sidecar.workload.name,
            pod.namespace,
            pod.name
        )));
    }
    sidecar.group = group.clone();
    let Some((namespace, account)) = caller.workload() else {
        return Err(Status::permission_denied(format!(
            "mesh sidecar {} needs a credential with a workload identity (namespace and service account); this one is for group {group:?} only",
            sidecar.node_id
        )));
    };
    if sidecar.namespace() != namespace {
        return Err(Status::permission_denied(format!(
            "sidecar {} is in namespace {:?} but the {} is for namespace {namespace:?}",
            sidecar.node_id,
            sidecar.namespace(),
            caller.credential()
        )));
    }
    sidecar.service_account = Some(account.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::model::ObjectKey;

    fn sidecar(namespace: &str) -> Sidecar {
        Sidecar {
            node_id: format!("p.{namespace}"),
            group: String::new(),
            workload: ObjectKey::new(namespace, "p"),
            inbound_port: Some(15006),
            outbound_port: None,
            service_account: None,
        }
    }

    #[test]
    fn the_grant_decides_group_and_identity() {
        let grant = Caller::Token {
            hash: "00".into(),
            grant: Grant {
                group: "web".into(),
                namespace: Some("shop".into()),
                service_account: Some("buyer".into()),
            },
        };
        let mut node = Node::default();
        let mut mesh = sidecar("shop");
        authorize(&grant, &mut node, Some(&mut mesh)).expect("allowed");
        assert_eq!(node.cluster, "web");
        assert_eq!(mesh.group, "web");
        assert_eq!(mesh.service_account.as_deref(), Some("buyer"));

        let mut other_group = Node {
            cluster: "db".into(),
            ..Node::default()
        };
        let status = authorize(&grant, &mut other_group, None).expect_err("refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("\"db\""), "{}", status.message());

        let status = authorize(&grant, &mut Node::default(), Some(&mut sidecar("pay")))
            .expect_err("other namespace");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);

        let group_only = Caller::Token {
            hash: "00".into(),
            grant: Grant {
                group: "web".into(),
                namespace: None,
                service_account: None,
            },
        };
        authorize(&group_only, &mut Node::default(), None).expect("a plain proxy");
        let status = authorize(
            &group_only,
            &mut Node::default(),
            Some(&mut sidecar("shop")),
        )
        .expect_err("a sidecar needs an identity");
        assert!(status.message().contains("workload identity"));
    }

    #[test]
    fn a_pod_bound_service_account_pins_node_pod_and_group() {
        let caller = |pod: Option<&str>, group: Option<&str>| Caller::ServiceAccount {
            account: ServiceAccountToken {
                namespace: "shop".into(),
                service_account: "buyer".into(),
                pod: pod.map(str::to_string),
            },
            group: group.map(str::to_string),
        };
        let bound = caller(Some("p"), Some("web"));
        let mut node = Node {
            id: "p.shop".into(),
            ..Node::default()
        };
        let mut mesh = sidecar("shop");
        authorize(&bound, &mut node, Some(&mut mesh)).expect("its own pod");
        assert_eq!(mesh.group, "web");
        assert_eq!(mesh.service_account.as_deref(), Some("buyer"));

        // Another node id, or the right id with metadata naming another pod.
        let mut other = Node {
            id: "q.shop".into(),
            ..Node::default()
        };
        let status = authorize(&bound, &mut other, None).expect_err("another node");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("p.shop"), "{}", status.message());
        let mut impostor = sidecar("shop");
        impostor.workload = ObjectKey::new("shop", "q");
        let status = authorize(
            &bound,
            &mut Node {
                id: "p.shop".into(),
                ..Node::default()
            },
            Some(&mut impostor),
        )
        .expect_err("metadata naming another pod");
        assert!(status.message().contains("shop/q"), "{}", status.message());

        // Unbound: the node keeps its group, within the account's namespace.
        let unbound = caller(None, None);
        let mut node = Node {
            id: "p.shop".into(),
            cluster: "anything".into(),
            ..Node::default()
        };
        let mut mesh = sidecar("shop");
        authorize(&unbound, &mut node, Some(&mut mesh)).expect("unbound");
        assert_eq!(mesh.group, "anything");
        authorize(&unbound, &mut Node::default(), Some(&mut sidecar("pay")))
            .expect_err("another namespace");
    }

    #[tokio::test]
    async fn revoking_a_token_ends_its_streams_and_is_named_when_it_is_tried_again() {
        use crate::store::Change;
        use crate::store::redb_store::RedbStore;
        use std::time::Duration;
        let dir = tempfile::tempdir().expect("dir");
        let store = Arc::new(RedbStore::open(dir.path()).expect("store"));
        let config = ConfigService::open(store).await.expect("config");
        let tokens = TokenAuth::new(config.clone());
        tokio::spawn(tokens.clone().follow_revocations());
        let auth = XdsAuth::Tokens(tokens.clone());
        let grant = Grant {
            group: "web".into(),
            namespace: None,
            service_account: None,
        };
        let token = new_token().expect("token");
        let record = record_name(&token);
        let other = new_token().expect("token");
        for name in [&record, &record_name(&other)] {
            let stored = serde_json::to_vec(&grant).expect("json");
            config
                .write(vec![Change::PutPrivate(name.clone(), stored.into())])
                .await
                .expect("stored");
        }
        let caller = tokens.authenticate(&token).expect("known");
        let mut streams = [
            auth.follow(&caller).expect("followed"),
            auth.follow(&caller).expect("followed"),
        ];
        let mut unrelated = auth
            .follow(&tokens.authenticate(&other).expect("known"))
            .expect("followed");

        config
            .write(vec![Change::DeletePrivate(record.clone())])
            .await
            .expect("revoked");
        let id = id_of(record.trim_start_matches(TOKEN_RECORD_PREFIX)).to_string();
        for stream in &mut streams {
            let status = tokio::time::timeout(Duration::from_secs(10), stream.revoked())
                .await
                .expect("ended");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(status.message().contains("token revoked"), "{status:?}");
            assert!(status.message().contains(&id), "{status:?}");
        }
        // Trying the token again is refused, naming the revocation; an unknown one is not.
        let refused = tokens.authenticate(&token).expect_err("revoked");
        assert!(refused.message().contains("token revoked"), "{refused:?}");
        let unknown = tokens.authenticate("nonsense").expect_err("unknown");
        assert!(
            unknown.message().contains("unknown or revoked"),
            "{unknown:?}"
        );
        // A stream that authenticated just before the revocation and follows just after
        // ends at once.
        let mut late = auth.follow(&caller).expect("followed");
        let status = tokio::time::timeout(Duration::from_secs(10), late.revoked())
            .await
            .expect("ended at once");
        assert!(status.message().contains("token revoked"), "{status:?}");
        // The other token's stream goes on; streams that end are forgotten.
        assert!(
            tokio::time::timeout(Duration::from_millis(1), unrelated.revoked())
                .await
                .is_err()
        );
        drop(streams);
        drop(late);
        assert_eq!(lock(&tokens.streams).len(), 1);
        drop(unrelated);
        assert!(lock(&tokens.streams).is_empty());
    }

    #[test]
    fn grants_are_checked_and_tokens_are_stored_hashed() {
        let token = new_token().expect("token");
        assert_eq!(token.len(), 64);
        assert_ne!(new_token().expect("token"), token);
        let record = record_name(&token);
        assert!(!record.contains(&token));
        assert_eq!(
            id_of(record.trim_start_matches(TOKEN_RECORD_PREFIX)).len(),
            16
        );
        let bad = |json: serde_json::Value| {
            serde_json::from_value::<Grant>(json)
                .map(|grant| grant.problem())
                .unwrap_or_else(|error| Some(error.to_string()))
        };
        assert_eq!(bad(serde_json::json!({"group": "web"})), None);
        assert_eq!(
            bad(serde_json::json!({"group": "web", "namespace": "shop", "serviceAccount": "b"})),
            None
        );
        assert!(bad(serde_json::json!({"group": ""})).is_some());
        assert!(bad(serde_json::json!({"group": "a/b"})).is_some());
        assert!(bad(serde_json::json!({"group": "web", "namespace": "shop"})).is_some());
        assert!(bad(serde_json::json!({"group": "web", "nodeCluster": "x"})).is_some());
    }
}
