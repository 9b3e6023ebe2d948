//! Workload identities from a real Kubernetes API server (`remora_tests::kube`: etcd,
//! kube-apiserver, kube-controller-manager; the test writes pod status as a kubelet would):
//! `remora-cp --kubernetes` gives a sidecar the certificate of its pod's
//! `spec.serviceAccountName`, and its clusters of an mTLS service accept exactly the service
//! accounts of the pods behind that service, following a pod that joins with another one.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use prost::Message;
use remora_tests::kube::{self, NODE_NAME};
use remora_tests::{free_port, wait_for};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::config::core::v3::data_source::Specifier;
use xds_api::envoy::extensions::transport_sockets::tls::v3::Secret;
use xds_api::envoy::extensions::transport_sockets::tls::v3::secret::Type as SecretType;
use xds_api::envoy::service::discovery::v3::DiscoveryRequest;
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::type_urls;

const NAMESPACE: &str = "shop";

/// The URI SAN matchers of cluster `name` in sidecar `pod`'s generated config, as
/// `kind:value`.
fn san_matchers(cp: &ControlPlane, pod: &str, name: &str) -> Option<Vec<String>> {
    let (status, config) = cp.call("GET", &format!("/v1/mesh/sidecars/{NAMESPACE}/{pod}"), "");
    if status != 200 {
        return None;
    }
    let cluster = config["clusters"]
        .as_array()?
        .iter()
        .find(|cluster| cluster["name"] == name)?
        .clone();
    let matchers = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        ["combined_validation_context"]["default_validation_context"]
        ["match_typed_subject_alt_names"]
        .as_array()?
        .iter()
        .map(|matcher| {
            let (kind, value) = matcher["matcher"]
                .as_object()
                .and_then(|object| object.iter().next())
                .map(|(kind, value)| (kind.clone(), value.as_str().unwrap_or_default()))
                .unwrap_or_default();
            format!("{kind}:{value}")
        })
        .collect();
    Some(matchers)
}

/// The URI SANs of the workload certificate the sidecar of `pod` receives over ADS.
async fn workload_certificate_sans(cp: &ControlPlane, pod: &str) -> Vec<String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (requests, outgoing) = mpsc::channel(4);
    let metadata: prost_types::Struct = prost_types::Struct {
        fields: [(
            "REMORA_OUTBOUND_PORT".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("15001".into())),
            },
        )]
        .into(),
    };
    requests
        .send(DiscoveryRequest {
            node: Some(Node {
                id: format!("{pod}.{NAMESPACE}"),
                cluster: pod.into(),
                metadata: Some(metadata),
                ..Default::default()
            }),
            type_url: type_urls::SECRET.into(),
            resource_names: vec!["remora-workload-cert".into()],
            ..Default::default()
        })
        .await
        .expect("send");
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(outgoing))
        .await
        .expect("stream")
        .into_inner();
    let response = tokio::time::timeout(Duration::from_secs(30), responses.next())
        .await
        .expect("an SDS response in time")
        .expect("open")
        .expect("a response");
    let secret = Secret::decode(response.resources[0].value.as_slice()).expect("a Secret");
    let Some(SecretType::TlsCertificate(tls)) = secret.r#type else {
        panic!("not a certificate: {secret:?}");
    };
    let Some(Specifier::InlineString(chain)) =
        tls.certificate_chain.and_then(|source| source.specifier)
    else {
        panic!("no inline chain");
    };
    drop(requests);
    let leaf = pem::parse_many(&chain).expect("PEM").remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.contents()).expect("X.509");
    parsed
        .subject_alternative_name()
        .expect("SAN")
        .expect("present")
        .value
        .general_names
        .iter()
        .map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.to_string(),
            other => format!("not a URI: {other:?}"),
        })
        .collect()
}

#[test]
fn sidecars_get_their_pods_service_account_and_clusters_check_the_peers() {
    let test = "sidecars_get_their_pods_service_account_and_clusters_check_the_peers";
    let Some(cluster) = kube::start_or_skip(test) else {
        return;
    };
    cluster.add_node(NODE_NAME, Some("z1"));
    cluster.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
            .to_string(),
    );
    for account in ["buyer", "seller", "seller-batch"] {
        cluster.apply(
            &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": NAMESPACE}})
                .to_string(),
        );
    }
    cluster.apply(
        &json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "b", "namespace": NAMESPACE},
            "spec": {"selector": {"app": "b"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        })
        .to_string(),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data").display().to_string();
    let kubeconfig = cluster.admin_kubeconfig().display().to_string();
    let cp = ControlPlane::start_with(
        free_port(),
        free_port(),
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--data-dir",
            &data,
        ],
    );
    // mTLS for b, through the REST API (the CRD is not installed here).
    let (status, body) = cp.call(
        "PUT",
        &format!("/v1/mesh/trafficpolicies/{NAMESPACE}/b"),
        r#"{"spec": {"service": "b", "mtls": {"mode": "Strict"}}}"#,
    );
    assert_eq!(status, 200, "{body}");
    cluster.run_pod(NAMESPACE, "a-1", "a", "buyer", Ipv4Addr::new(198, 18, 1, 1));
    cluster.run_pod(
        NAMESPACE,
        "b-1",
        "b",
        "seller",
        Ipv4Addr::new(198, 18, 2, 1),
    );

    let cluster_b = "b.shop.svc.cluster.local:80";
    wait_for(
        "A's cluster of b to accept b-1's account",
        Duration::from_secs(90),
        || {
            (san_matchers(&cp, "a-1", cluster_b)?
                == ["exact:spiffe://cluster.local/ns/shop/sa/seller"])
            .then_some(())
        },
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    assert_eq!(
        runtime.block_on(workload_certificate_sans(&cp, "a-1")),
        ["spiffe://cluster.local/ns/shop/sa/buyer"]
    );
    assert_eq!(
        runtime.block_on(workload_certificate_sans(&cp, "b-1")),
        ["spiffe://cluster.local/ns/shop/sa/seller"]
    );

    // A pod of b with another account joins: both are accepted.
    cluster.run_pod(
        NAMESPACE,
        "b-2",
        "b",
        "seller-batch",
        Ipv4Addr::new(198, 18, 2, 2),
    );
    wait_for(
        "both of b's accounts accepted",
        Duration::from_secs(90),
        || {
            (san_matchers(&cp, "a-1", cluster_b)?
                == [
                    "exact:spiffe://cluster.local/ns/shop/sa/seller",
                    "exact:spiffe://cluster.local/ns/shop/sa/seller-batch",
                ])
            .then_some(())
        },
    );
}
