//! Authenticated xDS against a real `remora-cp --xds-auth token`: bootstrap tokens issued
//! through the config API decide which group a stream gets; a stream with no token, an unknown
//! one or a revoked one is refused with `UNAUTHENTICATED`, one whose node names another group
//! with `PERMISSION_DENIED`; a real Envoy with its token in `initial_metadata` gets its group's
//! config. Revoking a token ends the streams open with it (`UNAUTHENTICATED`, `token revoked`)
//! and refuses their reconnects, for a gRPC client and a real Envoy alike.

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

/// An open ADS stream: its requests and responses.
struct AdsStream {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
}

/// Opens an ADS stream as a node of `group` with `token` (if any) and returns the cluster
/// names of its first CDS response that has any, or the status the stream ended with.
async fn first_clusters(
    cp: &ControlPlane,
    group: &str,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let (names, stream) = open_with_clusters(cp, group, token).await?;
    drop(stream);
    Ok(names)
}

/// [`first_clusters`], and the stream, still open.
async fn open_with_clusters(
    cp: &ControlPlane,
    group: &str,
    token: Option<&str>,
) -> Result<(Vec<String>, AdsStream), tonic::Status> {
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
        // ACKed, so the next change is pushed.
        requests
            .send(DiscoveryRequest {
                version_info: response.version_info.clone(),
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await
            .expect("ack");
        if !names.is_empty() {
            names.sort();
            break names;
        }
    };
    Ok((
        names,
        AdsStream {
            requests,
            responses,
        },
    ))
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
    let envoy = envoy_with_token(&cp, dir.path(), &token);
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

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_token_ends_its_open_streams_and_refuses_their_reconnects() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_path_buf();
    let cp = tokio::task::spawn_blocking(move || start(&data))
        .await
        .expect("started");
    let revoked = issue(&cp, r#"{"group": "a"}"#);
    let revoked_token = revoked["token"].as_str().expect("a token").to_string();
    let kept_token = issue(&cp, r#"{"group": "b"}"#)["token"]
        .as_str()
        .expect("a token")
        .to_string();
    // Two streams of the token to revoke, one of another token.
    let (_, mut first) = open_with_clusters(&cp, "a", Some(&revoked_token))
        .await
        .expect("served");
    let (_, mut second) = open_with_clusters(&cp, "a", Some(&revoked_token))
        .await
        .expect("served");
    let (_, mut other) = open_with_clusters(&cp, "b", Some(&kept_token))
        .await
        .expect("served");
    let id = revoked["id"].as_str().expect("id").to_string();
    let (status, body) = cp.call("DELETE", &format!("/v1/xds-tokens/{id}"), "");
    assert_eq!(status, 200, "{body}");

    // Both streams of the revoked token end with the reason.
    for stream in [&mut first, &mut second] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let ended = loop {
            match tokio::time::timeout_at(deadline, stream.responses.next())
                .await
                .expect("the stream to end in time")
            {
                // A push that was on its way: the end follows.
                Some(Ok(_)) => continue,
                Some(Err(status)) => break status,
                None => panic!("the stream ended without a status"),
            }
        };
        assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
        assert!(ended.message().contains("token revoked"), "{ended:?}");
        assert!(ended.message().contains(&id), "{ended:?}");
    }
    // The control plane lists none of them, logs why, and refuses the token from now on.
    let api = cp.api;
    tokio::task::spawn_blocking(move || {
        wait_for(
            "the revoked streams to leave /v1/proxies",
            Duration::from_secs(30),
            || {
                let auth = format!("Bearer {TOKEN}");
                let (_, _, body) = remora_tests::http_request(
                    api,
                    "GET",
                    "/v1/proxies",
                    &[("Authorization", &auth)],
                    "",
                )
                .ok()?;
                let proxies: Value = serde_json::from_str(&body).ok()?;
                let groups: Vec<&str> = proxies["proxies"]
                    .as_array()?
                    .iter()
                    .filter_map(|proxy| proxy["group"].as_str())
                    .collect();
                (groups == ["b"]).then_some(())
            },
        )
    })
    .await
    .expect("listed");
    let refused = first_clusters(&cp, "a", Some(&revoked_token))
        .await
        .expect_err("reconnecting with a revoked token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("token revoked"), "{refused:?}");
    let log = cp.process.log();
    assert!(
        log.lines()
            .any(|line| line.contains("closed: its credential was revoked")
                && line.contains("token revoked")),
        "{log}"
    );

    // The other token's stream goes on: a new cluster of its group still reaches it.
    let (status, body) = cp.call(
        "PUT",
        "/v1/clusters/more-b?group=b",
        "\"@type\": Cluster\nname: more-b\nconnect_timeout: 1s\n",
    );
    assert_eq!(status, 200, "{body}");
    let response = tokio::time::timeout(Duration::from_secs(30), other.responses.next())
        .await
        .expect("a push in time")
        .expect("open")
        .expect("a response");
    assert_eq!(response.type_url, type_urls::CLUSTER);
    drop(other.requests);
    tokio::task::spawn_blocking(move || drop(cp))
        .await
        .expect("stopped");
}

/// An Envoy of group `b` with ADS at `cp`, presenting `token` on its xDS stream.
fn envoy_with_token(cp: &ControlPlane, dir: &std::path::Path, token: &str) -> Envoy {
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(dir, "envoy-b", "b", cp.xds, admin, "GRPC");
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
    Envoy::start(&bootstrap, admin, &[])
}

#[test]
fn envoy_is_disconnected_when_its_token_is_revoked_and_cannot_reconnect() {
    if !envoy_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = start(&dir.path().join("data"));
    let issued = issue(&cp, r#"{"group": "b"}"#);
    let token = issued["token"].as_str().expect("token");
    let id = issued["id"].as_str().expect("id");
    let envoy = envoy_with_token(&cp, dir.path(), token);
    wait_for(
        "Envoy connected with its token",
        Duration::from_secs(30),
        || {
            (envoy.stat("control_plane.connected_state") == Some(1)
                && envoy.admin_get("/clusters").contains("only-b::")
                && cp.proxy("envoy-b").is_some())
            .then_some(())
        },
    );
    let refusals_before = cp.process.log().matches("xDS stream refused").count();

    let (status, body) = cp.call("DELETE", &format!("/v1/xds-tokens/{id}"), "");
    assert_eq!(status, 200, "{body}");
    // Envoy's stream ends: it says it is not connected, and the control plane lists it no more.
    wait_for(
        "Envoy to lose its xDS stream",
        Duration::from_secs(30),
        || {
            (envoy.stat("control_plane.connected_state") == Some(0)
                && cp.proxy("envoy-b").is_none())
            .then_some(())
        },
    );
    // It reconnects (Envoy retries with backoff) and is refused, the control plane saying why.
    let refusal = wait_for(
        "Envoy's reconnect to be refused",
        Duration::from_secs(30),
        || {
            let log = cp.process.log();
            let refusals: Vec<&str> = log
                .lines()
                .filter(|line| line.contains("xDS stream refused"))
                .collect();
            refusals
                .get(refusals_before..)
                .and_then(|new| new.iter().find(|line| line.contains("token revoked")))
                .map(|line| line.to_string())
        },
    );
    assert!(refusal.contains(id), "{refusal}");
    // The control plane logs the refusal before Envoy has read it: until then Envoy still
    // counts its new stream as connected.
    wait_for("Envoy to take the refusal", Duration::from_secs(30), || {
        (envoy.stat("control_plane.connected_state") == Some(0) && cp.proxy("envoy-b").is_none())
            .then_some(())
    });
    let log = cp.process.log();
    assert!(
        log.lines()
            .any(|line| line.contains("closed: its credential was revoked")
                && line.contains("envoy-b")
                && line.contains("token revoked")),
        "{log}"
    );
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
