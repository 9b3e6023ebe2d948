//! `--xds-auth kubernetes` against a real Kubernetes API server (`remora_tests::kube`): a
//! projected ServiceAccount token with audience `remora`, bound to a pod (what the kubelet
//! mounts; here minted by `kubectl create token --bound-object-kind Pod`), checked by
//! TokenReview, names the identity and the pod decides the group:
//!
//! - the certificate service signs for the token's service account, and only for the node
//!   `POD.NAMESPACE` of the bound pod;
//! - an ADS stream of the bound pod in the pod's group (its `app` label) is served; one naming
//!   another group or another pod is `PERMISSION_DENIED`; a token for another audience, or
//!   none, is `UNAUTHENTICATED`;
//! - the trust bundle is published as ConfigMap `remora-ca-root-cert` in namespaces labelled
//!   `remora-injection=enabled`, including one labelled later, and in no other.

mod common;

use std::time::Duration;

use common::*;
use remora_tests::kube::{self, KubeCluster};
use remora_tests::{free_port, wait_for};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::DiscoveryRequest;
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::remora::ca::v1::SignCertificateRequest;
use xds_api::remora::ca::v1::certificate_service_client::CertificateServiceClient;
use xds_api::type_urls;

const NAMESPACE: &str = "shop";

fn apply(cluster: &KubeCluster, object: serde_json::Value) {
    cluster.apply(&object.to_string());
}

/// `kubectl create token` for `buyer` in `shop` with `extra` flags.
fn token(cluster: &KubeCluster, extra: &[&str]) -> String {
    let mut args = vec![
        "create",
        "token",
        "buyer",
        "--namespace",
        NAMESPACE,
        "--duration",
        "1h",
    ];
    args.extend(extra);
    cluster.kubectl_ok(&args).trim().to_string()
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
    }
    request
}

async fn channel(cp: &ControlPlane) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

async fn sign(
    cp: &ControlPlane,
    node_id: &str,
    token: Option<&str>,
) -> Result<String, tonic::Status> {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let request = SignCertificateRequest {
        csr_pem: csr,
        node_id: node_id.to_string(),
    };
    CertificateServiceClient::new(channel(cp).await)
        .sign_certificate(with_token(request, token))
        .await
        .map(|response| response.into_inner().spiffe_id)
}

/// Opens an ADS stream as sidecar `node_id` of `group`: Ok once the first response came, or
/// the status the stream ended with.
async fn ads(
    cp: &ControlPlane,
    node_id: &str,
    group: &str,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let (requests, outgoing) = mpsc::channel(4);
    let metadata = prost_types::Struct {
        fields: [(
            "REMORA_INBOUND_PORT".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("15006".into())),
            },
        )]
        .into(),
    };
    requests
        .send(DiscoveryRequest {
            node: Some(Node {
                id: node_id.into(),
                cluster: group.into(),
                metadata: Some(metadata),
                ..Default::default()
            }),
            type_url: type_urls::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .expect("send");
    let mut responses = AggregatedDiscoveryServiceClient::new(channel(cp).await)
        .stream_aggregated_resources(with_token(ReceiverStream::new(outgoing), token))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), responses.next())
        .await
        .expect("an answer in time")
        .expect("an answer");
    drop(requests);
    first.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn service_account_tokens_name_the_identity_and_their_pod_decides_the_group() {
    let test = "service_account_tokens_name_the_identity_and_their_pod_decides_the_group";
    let Some(cluster) = tokio::task::spawn_blocking(move || kube::start_or_skip(test))
        .await
        .expect("started")
    else {
        return;
    };
    apply(
        &cluster,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NAMESPACE, "labels": {"remora-injection": "enabled"}}}),
    );
    apply(
        &cluster,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plain"}}),
    );
    apply(
        &cluster,
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "buyer", "namespace": NAMESPACE}}),
    );
    apply(
        &cluster,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "a-1", "namespace": NAMESPACE, "labels": {"app": "web"}},
               "spec": {"serviceAccountName": "buyer",
                        "containers": [{"name": "app", "image": "example.invalid/app:1"}]}}),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data").display().to_string();
    let kubeconfig = cluster.admin_kubeconfig().display().to_string();
    let cp = tokio::task::spawn_blocking(move || {
        ControlPlane::start_with(
            free_port(),
            free_port(),
            &[
                "--kubernetes",
                "--kubeconfig",
                &kubeconfig,
                "--xds-auth",
                "kubernetes",
                "--data-dir",
                &data,
            ],
        )
    })
    .await
    .expect("started");
    let bound = token(
        &cluster,
        &[
            "--audience",
            "remora",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "a-1",
        ],
    );
    let default_audience = token(&cluster, &[]);

    // Signed for the token's service account, once the control plane knows the pod.
    let spiffe_id = remora_tests::wait_for_async(
        "the control plane to know pod a-1",
        Duration::from_secs(30),
        || async {
            match sign(&cp, "a-1.shop", Some(&bound)).await {
                Ok(spiffe_id) => Some(spiffe_id),
                Err(status) if status.code() == tonic::Code::Unavailable => None,
                Err(status) => panic!("refused: {status:?}"),
            }
        },
    )
    .await;
    assert_eq!(spiffe_id, "spiffe://cluster.local/ns/shop/sa/buyer");
    let refused = sign(&cp, "b-1.shop", Some(&bound))
        .await
        .expect_err("another pod");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("a-1.shop"), "{refused:?}");

    // The pod decides the group.
    ads(&cp, "a-1.shop", "web", Some(&bound))
        .await
        .expect("the pod's own group");
    ads(&cp, "a-1.shop", "", Some(&bound))
        .await
        .expect("no group named: the pod's");
    let refused = ads(&cp, "a-1.shop", "payments", Some(&bound))
        .await
        .expect_err("another group");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("\"web\""), "{refused:?}");
    let refused = ads(&cp, "b-1.shop", "web", Some(&bound))
        .await
        .expect_err("another pod");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // Who is not let in.
    let refused = ads(&cp, "a-1.shop", "web", Some(&default_audience))
        .await
        .expect_err("another audience");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("remora"), "{refused:?}");
    let refused = sign(&cp, "a-1.shop", None).await.expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("projected service account token"),
        "{refused:?}"
    );

    // The trust bundle in labelled namespaces.
    let (status, _, bundle) = remora_tests::http_request(
        cp.api,
        "GET",
        "/v1/ca/bundle",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "",
    )
    .expect("GET /v1/ca/bundle");
    assert_eq!(status, 200);
    let published = |namespace: &str| {
        cluster
            .kubectl_try(&[
                "get",
                "configmap",
                "remora-ca-root-cert",
                "--namespace",
                namespace,
                "-o",
                "jsonpath={.data.root-cert\\.pem}",
            ])
            .ok()
    };
    let in_shop = wait_for("the bundle in shop", Duration::from_secs(30), || {
        published(NAMESPACE)
    });
    assert_eq!(in_shop, bundle);
    cluster.kubectl_ok(&["label", "namespace", "plain", "team=x"]);
    assert!(published("plain").is_none(), "not labelled for injection");
    cluster.kubectl_ok(&["label", "namespace", "plain", "remora-injection=enabled"]);
    let in_plain = wait_for(
        "the bundle in a namespace labelled later",
        Duration::from_secs(30),
        || published("plain"),
    );
    assert_eq!(in_plain, bundle);

    tokio::task::spawn_blocking(move || {
        drop(cp);
        drop(cluster);
    })
    .await
    .expect("stopped");
}
