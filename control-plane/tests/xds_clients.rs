//! xDS clients of our own against a real `remora-cp`: group scoping, per-type services, delta
//! removals for names that do not exist, and a proxy that never reads (its flow control
//! exhausted many times over) not holding up others.

mod common;

use std::time::Duration;

use common::*;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use xds_api::envoy::service::route::v3::route_discovery_service_client::RouteDiscoveryServiceClient;
use xds_api::type_urls;

fn node(id: &str, group: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        cluster: group.into(),
        ..Default::default()
    })
}

fn cluster_yaml(name: &str) -> String {
    format!("\"@type\": Cluster\nname: {name}\nconnect_timeout: 1s\n")
}

/// A cluster whose metadata carries `padding` bytes, so a few of them make a response many
/// times larger than an HTTP/2 window.
fn padded_cluster_yaml(name: &str, padding: usize) -> String {
    format!(
        "{}metadata: {{filter_metadata: {{test: {{padding: {}}}}}}}\n",
        cluster_yaml(name),
        "x".repeat(padding)
    )
}

/// Whose HTTP/2 flow-control windows a client advertises (stream and connection alike).
#[derive(Clone, Copy)]
enum Windows {
    /// hyper's defaults.
    Default,
    /// This many bytes: the peer may send no more until the client reads.
    Bytes(u32),
}

/// An ADS SotW client subscribed to clusters (wildcard) that ACKs what it gets.
struct AdsClient {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
}

impl AdsClient {
    async fn connect(cp: &ControlPlane, id: &str, group: &str) -> AdsClient {
        Self::connect_with(cp, id, group, Windows::Default).await
    }

    async fn connect_with(cp: &ControlPlane, id: &str, group: &str, windows: Windows) -> AdsClient {
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds))
            .expect("endpoint");
        if let Windows::Bytes(size) = windows {
            endpoint = endpoint
                .initial_stream_window_size(size)
                .initial_connection_window_size(size);
        }
        let channel = endpoint.connect().await.expect("connect");
        // Responses here can be many MiB (padded clusters).
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
        let (requests, outgoing) = mpsc::channel(8);
        requests
            .send(DiscoveryRequest {
                node: node(id, group),
                type_url: type_urls::CLUSTER.into(),
                ..Default::default()
            })
            .await
            .expect("send");
        let responses = client
            .stream_aggregated_resources(ReceiverStream::new(outgoing))
            .await
            .expect("stream")
            .into_inner();
        AdsClient {
            requests,
            responses,
        }
    }

    /// Reads responses (ACKing each) until the cluster names equal `expected`.
    async fn wait_for_clusters(&mut self, expected: &[&str]) -> DiscoveryResponse {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let response = tokio::time::timeout_at(deadline, self.responses.next())
                .await
                .unwrap_or_else(|_| panic!("no CDS response with {expected:?} in time"))
                .expect("stream open")
                .expect("response");
            self.requests
                .send(DiscoveryRequest {
                    version_info: response.version_info.clone(),
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await
                .expect("ack");
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
            names.sort();
            if names == expected {
                return response;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_scope_what_each_proxy_sees() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = tokio::task::block_in_place(|| {
        let cp = ControlPlane::start(&dir.path().join("data"));
        cp.put("clusters", "shared", &cluster_yaml("shared"));
        cp.put(
            "clusters",
            "team-only?group=team",
            &cluster_yaml("team-only"),
        );
        cp
    });
    let mut team = AdsClient::connect(&cp, "p-team", "team").await;
    let mut other = AdsClient::connect(&cp, "p-other", "other").await;
    team.wait_for_clusters(&["shared", "team-only"]).await;
    other.wait_for_clusters(&["shared"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_reads_does_not_hold_up_the_others() {
    /// The stuck client's stream and connection windows: the control plane may send it no
    /// more than this until it reads.
    const WINDOW: u32 = 64 << 10;
    const PADDED: usize = 4;
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = tokio::task::block_in_place(|| {
        let cp = ControlPlane::start(&dir.path().join("data"));
        for i in 0..PADDED {
            let name = format!("big{i}");
            cp.put("clusters", &name, &padded_cluster_yaml(&name, 1 << 20));
        }
        cp
    });
    let big: Vec<String> = (0..PADDED).map(|i| format!("big{i}")).collect();
    let names = |extra: usize| -> Vec<String> {
        let mut names = big.clone();
        names.extend((0..extra).map(|i| format!("c{i}")));
        names.sort();
        names
    };
    // The stuck proxy subscribes and then neither reads nor ACKs: its first response (all
    // padded clusters, some 4 MiB) is over fifty times its windows, so the control plane's
    // send to it stops at flow control.
    let mut stuck = AdsClient::connect_with(&cp, "stuck", "edge", Windows::Bytes(WINDOW)).await;
    let mut healthy = AdsClient::connect(&cp, "healthy", "edge").await;
    let first = healthy.wait_for_clusters(&as_strs(&names(0))).await;
    let size = prost::Message::encoded_len(&first);
    assert!(
        size > 50 * WINDOW as usize,
        "the response ({size} bytes) must dwarf the stuck client's windows"
    );
    // Every change still reaches the healthy proxy, each time all of the clusters again.
    for round in 0..5 {
        let name = format!("c{round}");
        tokio::task::block_in_place(|| cp.put("clusters", &name, &cluster_yaml(&name)));
        healthy.wait_for_clusters(&as_strs(&names(round + 1))).await;
    }
    // The stuck stream was held, not dropped: the control plane still lists it, its first
    // response unacknowledged; once it reads, it gets that response and, after its ACK, the
    // current state.
    let stuck_status = tokio::task::block_in_place(|| cp.proxy("stuck")).expect("stuck listed");
    assert_eq!(
        stuck_status["types"]["CDS"]["pending_nonce"], "1",
        "{stuck_status}"
    );
    assert!(
        stuck_status["types"]["CDS"]["acked_version"].is_null(),
        "{stuck_status}"
    );
    stuck.wait_for_clusters(&as_strs(&names(5))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_type_services_serve_sotw_and_delta() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = tokio::task::block_in_place(|| {
        let cp = ControlPlane::start(&dir.path().join("data"));
        cp.put("clusters", "c", &cluster_yaml("c"));
        cp.put("routes", "r1", &route("r1", "c"));
        cp
    });
    let mut client = RouteDiscoveryServiceClient::connect(format!("http://{}", cp.xds))
        .await
        .expect("connect");

    // Writes reach streams after the debounce window, so read (and ACK) until they are there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);

    // SotW on the per-type service: named subscription, type URL implied.
    let (requests, outgoing) = mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            node: node("rds-client", ""),
            resource_names: vec!["r1".into()],
            ..Default::default()
        })
        .await
        .expect("send");
    let mut responses = client
        .stream_routes(ReceiverStream::new(outgoing))
        .await
        .expect("stream")
        .into_inner();
    loop {
        let response = tokio::time::timeout_at(deadline, responses.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        assert_eq!(response.type_url, type_urls::ROUTE_CONFIGURATION);
        if response.resources.len() == 1 {
            break;
        }
        requests
            .send(DiscoveryRequest {
                resource_names: vec!["r1".into()],
                response_nonce: response.nonce,
                version_info: response.version_info,
                ..Default::default()
            })
            .await
            .expect("ack");
    }

    // Delta: a name that does not exist comes back in removed_resources.
    let (requests, outgoing) = mpsc::channel(4);
    requests
        .send(DeltaDiscoveryRequest {
            node: node("rds-delta", ""),
            resource_names_subscribe: vec!["r1".into(), "ghost".into()],
            ..Default::default()
        })
        .await
        .expect("send");
    let mut responses = client
        .delta_routes(ReceiverStream::new(outgoing))
        .await
        .expect("stream")
        .into_inner();
    let mut ghost_reported = false;
    loop {
        let response = tokio::time::timeout_at(deadline, responses.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        ghost_reported |= response
            .removed_resources
            .iter()
            .any(|name| name == "ghost");
        assert!(
            response.resources.iter().all(|r| r.name == "r1"),
            "{response:?}"
        );
        if let Some(resource) = response.resources.first() {
            assert_eq!(
                resource.version.len(),
                16,
                "per-resource version is a content hash"
            );
            break;
        }
        requests
            .send(DeltaDiscoveryRequest {
                response_nonce: response.nonce,
                ..Default::default()
            })
            .await
            .expect("ack");
    }
    assert!(
        ghost_reported,
        "a name that does not exist is reported removed"
    );
}

fn as_strs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}
