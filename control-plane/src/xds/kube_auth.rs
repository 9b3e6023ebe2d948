//! `--xds-auth kubernetes`: a stream's (or certificate request's) `authorization: Bearer`
//! token is a projected ServiceAccount token with audience `remora`, checked by the API
//! server's TokenReview. The identity is the token's service account
//! (`system:serviceaccount:NAMESPACE:NAME`). A projected token is bound to its pod
//! (TokenReview's extra `authentication.kubernetes.io/pod-name`): the node must then be that
//! pod (`POD.NAMESPACE`), and its group is the pod's as the injector names it (its `app`
//! label, else its service account). A token bound to no pod leaves the group to the node.
//!
//! Reviews are cached for a short time by the token's SHA-256, so reconnecting sidecars do
//! not each cost the API server a request; a refused token is cached for less, and an API
//! server that cannot be reached is not cached at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::mesh::hub::MeshHub;
use crate::mesh::model::ObjectKey;

/// The API permissions this needs (on top of the Kubernetes source's).
pub const ACCESS: &[(&str, &str, &[&str])] =
    &[("authentication.k8s.io", "tokenreviews", &["create"])];
/// The audience projected tokens for Remora are minted for.
pub const AUDIENCE: &str = "remora";
/// TokenReview's extra key naming the pod a token is bound to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
/// How long an accepted token's review is reused.
const ACCEPTED_FOR: Duration = Duration::from_secs(60);
/// How long a refused token's review is reused.
const REFUSED_FOR: Duration = Duration::from_secs(5);
/// Reviews kept at most; expired ones are dropped first, then all when still full.
const MAX_CACHED: usize = 10_000;

/// What a TokenReview said about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountToken {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to, if any.
    pub pod: Option<String>,
}

struct Cached {
    review: Result<ServiceAccountToken, Status>,
    until: Instant,
}

/// Checks tokens with the API server.
pub struct KubeAuth {
    client: kube::Client,
    mesh: Arc<MeshHub>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl KubeAuth {
    pub fn new(client: kube::Client, mesh: Arc<MeshHub>) -> KubeAuth {
        KubeAuth {
            client,
            mesh,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Who `token` is, and the group of its pod (when bound to one).
    pub async fn authenticate(
        &self,
        token: &str,
    ) -> Result<(ServiceAccountToken, Option<String>), Status> {
        let account = self.review(token).await?;
        let group = match &account.pod {
            None => None,
            Some(pod) => {
                let key = ObjectKey::new(&account.namespace, pod);
                Some(self.mesh.injected_group(&key).ok_or_else(|| {
                    Status::unavailable(format!(
                        "pod {}/{pod} that the token is bound to is not known to the control plane (yet); retry",
                        account.namespace
                    ))
                })?)
            }
        };
        Ok((account, group))
    }

    async fn review(&self, token: &str) -> Result<ServiceAccountToken, Status> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(cached) = self.lock().get(&hash).filter(|cached| cached.until > now) {
            return cached.review.clone();
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "TokenReview failed");
                Status::unavailable(format!(
                    "cannot check the token with the Kubernetes API server (TokenReview): {error}"
                ))
            })?;
        let reviewed = reviewed_account(answer.status.unwrap_or_default());
        let until = now
            + if reviewed.is_ok() {
                ACCEPTED_FOR
            } else {
                REFUSED_FOR
            };
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, cached| cached.until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(
            hash,
            Cached {
                review: reviewed.clone(),
                until,
            },
        );
        reviewed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Cached>> {
        self.cache
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The service account a TokenReview's status names, or why the token is refused.
pub fn reviewed_account(status: TokenReviewStatus) -> Result<ServiceAccountToken, Status> {
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .filter(|error| !error.is_empty())
            .map(|error| format!(": {error}"))
            .unwrap_or_default();
        return Err(Status::unauthenticated(format!(
            "the Kubernetes API server did not accept the token for audience {AUDIENCE:?}{reason} (mount a projected service account token with audience {AUDIENCE:?})"
        )));
    }
    if let Some(audiences) = &status.audiences
        && !audiences.iter().any(|audience| audience == AUDIENCE)
    {
        return Err(Status::unauthenticated(format!(
            "the token is for audiences {audiences:?}, not {AUDIENCE:?}"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(namespace, account)| !namespace.is_empty() && !account.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "the token is {username:?}'s, not a service account's"
            ))
        })?;
    let pod = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get(POD_NAME_EXTRA))
        .and_then(|values| values.first())
        .filter(|pod| !pod.is_empty())
        .cloned();
    Ok(ServiceAccountToken {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        pod,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(username: &str, pod: Option<&str>, audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_string()),
                extra: pod.map(|pod| [(POD_NAME_EXTRA.to_string(), vec![pod.to_string()])].into()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_review_names_the_service_account_and_its_pod() {
        let account = reviewed_account(status(
            "system:serviceaccount:shop:buyer",
            Some("a-1"),
            &["remora"],
        ))
        .expect("accepted");
        assert_eq!(
            account,
            ServiceAccountToken {
                namespace: "shop".into(),
                service_account: "buyer".into(),
                pod: Some("a-1".into()),
            }
        );
        let unbound = reviewed_account(status(
            "system:serviceaccount:shop:buyer",
            None,
            &["remora"],
        ))
        .expect("accepted");
        assert_eq!(unbound.pod, None);
    }

    #[test]
    fn refused_reviews_say_why() {
        let refused = reviewed_account(TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..Default::default()
        })
        .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(
            refused.message().contains("token has expired"),
            "{refused:?}"
        );
        let refused = reviewed_account(status("system:serviceaccount:shop:buyer", None, &["api"]))
            .expect_err("other audience");
        assert!(refused.message().contains("\"api\""), "{refused:?}");
        let refused =
            reviewed_account(status("alice", None, &["remora"])).expect_err("not an account");
        assert!(refused.message().contains("alice"), "{refused:?}");
    }
}
