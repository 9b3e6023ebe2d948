//! Authenticated xDS against a real `remora-cp --xds-auth token`: bootstrap tokens issued
//! through the config API decide which group a stream gets; a stream with no token, an unknown
//! one or a revoked one is refused with `UNAUTHENTICATED`, one whose node names another group
//! with `PERMISSION_DENIED`; a real Envoy with its token in `initial_metadata` gets its group's
//! config.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use remora_tests::envoy::Envoy;
use remora_tests::{free_port, wait_for};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use xds_api::type_urls;

/// A `remora-cp --xds-auth token` with its store in `data`, and a cluster in each of groups
/// `a` and `b`.
fn start(data: &std::path::Path) -> ControlPlane {
    let data = data.display().to_string();
    let cp = ControlPlane::start_with(
        free_port(),
        free_port(),
        &["--xds-auth", "token", "--data-dir", &data],
    );
    for group in ["a", "b"] {
        let (status, body) = cp.call(
            "PUT",
            &format!("/v1/clusters/only-{group}?group={group}"),
            &format!("\"@type\": Cluster\nname: only-{group}\nconnect_timeout: 1s\n"),
        );
        assert_eq!(status, 200, "{body}");
    }
    cp
}

/// `POST /v1/xds-tokens` with `grant`; the answer (token, id, grant).
fn issue(cp: &ControlPlane, grant: &str) -> Value {
    let (status, body) = cp.call("POST", "/v1/xds-tokens", grant);
    assert_eq!(status, 200, "{body}");
    body
}

/// Opens an ADS stream as a node of `group` with `token` (if any) and returns the cluster
/// names of its first CDS response that has any, or the status the stream ended with.
async fn first_clusters(
    cp: &ControlPlane,
    group: &str,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (requests, outgoing) = mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            node: Some(Node {
                id: "probe".into(),
                cluster: group.into(),
                ..Default::default()
            }),
            type_url: type_urls::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .expect("send");
    let mut request = tonic::Request::new(ReceiverStream::new(outgoing));
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
    }
    let mut responses = client
        .stream_aggregated_resources(request)
        .await?
        .into_inner();
    // The first answer may come before the group's clusters are published: ACK and read on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let names = loop {
        let response: DiscoveryResponse = tokio::time::timeout_at(deadline, responses.next())
            .await
            .expect("clusters in time")
            .expect("stream open")?;
        let mut names: Vec<String> = response
            .resources
            .iter()
            .map(|any| {
                use prost::Message;
                xds_api::envoy::config::cluster::v3::Cluster::decode(any.value.as_slice())
                    .expect("cluster")
                    .name
            })
            .collect();
        if !names.is_empty() {
            names.sort();
            break names;
        }
        requests
            .send(DiscoveryRequest {
                version_info: response.version_info.clone(),
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await
            .expect("ack");
    };
    drop(requests);
    Ok(names)
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_decide_the_group_and_streams_without_one_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_path_buf();
    let cp = tokio::task::spawn_blocking(move || start(&data))
        .await
        .expect("started");
    let grant_a = issue(&cp, r#"{"group": "a"}"#);
    let token_a = grant_a["token"].as_str().expect("a token").to_string();

    let refused = first_clusters(&cp, "a", None).await.expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        refused.message().contains("POST /v1/xds-tokens"),
        "{refused:?}"
    );
    let refused = first_clusters(&cp, "a", Some("not-a-token"))
        .await
        .expect_err("bad token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        refused.message().contains("unknown or revoked"),
        "{refused:?}"
    );

    // The token's group, whatever the node leaves out; another group named is refused.
    assert_eq!(
        first_clusters(&cp, "", Some(&token_a))
            .await
            .expect("served"),
        ["only-a"]
    );
    assert_eq!(
        first_clusters(&cp, "a", Some(&token_a))
            .await
            .expect("served"),
        ["only-a"]
    );
    let refused = first_clusters(&cp, "b", Some(&token_a))
        .await
        .expect_err("group b with a's token");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("\"b\""), "{refused:?}");

    // Listed without the token; revoked, it opens no stream.
    let (status, listed) = cp.call("GET", "/v1/xds-tokens", "");
    assert_eq!(status, 200);
    assert!(!listed.to_string().contains(&token_a), "{listed}");
    assert_eq!(listed["tokens"][0]["group"], "a");
    let id = grant_a["id"].as_str().expect("id");
    let (status, body) = cp.call("DELETE", &format!("/v1/xds-tokens/{id}"), "");
    assert_eq!(status, 200, "{body}");
    let refused = first_clusters(&cp, "a", Some(&token_a))
        .await
        .expect_err("revoked");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // Grants are checked.
    for bad in [
        r#"{"group": ""}"#,
        r#"{"group": "a", "namespace": "shop"}"#,
        r#"{"groups": "a"}"#,
    ] {
        let (status, body) = cp.call("POST", "/v1/xds-tokens", bad);
        assert_eq!(status, 400, "{bad}: {body}");
    }
    tokio::task::spawn_blocking(move || drop(cp))
        .await
        .expect("stopped");
}

#[test]
fn envoy_with_its_token_in_initial_metadata_gets_its_groups_config() {
    if !envoy_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = start(&dir.path().join("data"));
    let token = issue(&cp, r#"{"group": "b"}"#)["token"]
        .as_str()
        .expect("token")
        .to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(dir.path(), "envoy-b", "b", cp.xds, admin, "GRPC");
    // The token goes with every xDS stream Envoy opens.
    let text = std::fs::read_to_string(&bootstrap).expect("bootstrap");
    let text = text.replace(
        "grpc_services: [{envoy_grpc: {cluster_name: xds_cluster}}]",
        &format!(
            "grpc_services: [{{envoy_grpc: {{cluster_name: xds_cluster}}, initial_metadata: [{{key: authorization, value: \"Bearer {token}\"}}]}}]"
        ),
    );
    assert!(text.contains("initial_metadata"), "{text}");
    std::fs::write(&bootstrap, text).expect("write");
    let envoy = Envoy::start(&bootstrap, admin, &[]);
    wait_for(
        "Envoy to get group b's cluster",
        Duration::from_secs(30),
        || {
            envoy
                .admin_get("/clusters")
                .contains("only-b::")
                .then_some(())
        },
    );
    assert!(!envoy.admin_get("/clusters").contains("only-a::"));
}

/// `remoractl ARGS` against `cp`: success, standard output, standard error.
fn remoractl(cp: &ControlPlane, args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_remoractl"))
        .args(["--server", &format!("http://{}", cp.api)])
        .args(args)
        .env("REMORA_CP_TOKEN", TOKEN)
        .output()
        .expect("run remoractl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn remoractl_issues_lists_and_revokes_tokens_and_prints_the_bundle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = start(dir.path());
    let (ok, token, stderr) = remoractl(
        &cp,
        &[
            "xds-token",
            "issue",
            "--group",
            "b-1",
            "--namespace",
            "shop",
            "--service-account",
            "seller",
        ],
    );
    assert!(ok, "{stderr}");
    let token = token.trim();
    assert_eq!(token.len(), 64, "{token}");
    let id = stderr
        .split_whitespace()
        .nth(1)
        .expect("the id on standard error")
        .to_string();
    let (ok, listed, _) = remoractl(&cp, &["xds-token", "list"]);
    assert!(ok);
    assert!(
        listed.lines().any(|line| line.starts_with(&id)
            && line.contains("b-1")
            && line.contains("shop")
            && line.contains("seller")),
        "{listed}"
    );
    assert!(!listed.contains(token));
    let (ok, _, stderr) = remoractl(
        &cp,
        &[
            "xds-token",
            "issue",
            "--group",
            "b-1",
            "--namespace",
            "shop",
        ],
    );
    assert!(!ok && stderr.contains("--service-account"), "{stderr}");
    let (ok, revoked, stderr) = remoractl(&cp, &["xds-token", "revoke", &id]);
    assert!(ok, "{stderr}");
    assert!(revoked.contains(&id));
    let (ok, _, stderr) = remoractl(&cp, &["xds-token", "revoke", &id]);
    assert!(!ok && stderr.contains("no xDS token"), "{stderr}");

    let (ok, bundle, stderr) = remoractl(&cp, &["ca-bundle"]);
    assert!(ok, "{stderr}");
    assert!(
        bundle.starts_with("-----BEGIN CERTIFICATE-----"),
        "{bundle}"
    );
}
