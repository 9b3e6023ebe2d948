//! Remora's certificate service and xDS over TLS against a real `remora-cp`:
//!
//! - `remora.ca.v1.CertificateService/SignCertificate` signs the request's own key for the
//!   identity the caller's bootstrap token proves (not the names the request asks for);
//!   no token or an unknown one is `UNAUTHENTICATED`, a token without a workload identity
//!   `PERMISSION_DENIED`, a broken request `INVALID_ARGUMENT` saying what is wrong.
//! - Without xDS authentication the node id names the identity (`POD.NAMESPACE`).
//! - With `--xds-tls` the port serves TLS with a certificate from the mesh CA naming the
//!   control plane's SPIFFE id and DNS names; the certificate service answers over
//!   it, and a real Envoy verifying it (trusted_ca + SAN matcher) gets its group's config.
//! - With `--xds-tls-client-auth`, a client certificate of the mesh CA is a credential: a
//!   caller holding a workload certificate renews it with no token, and a real Envoy
//!   presenting one gets its group's config; a sidecar stream in another namespace is refused
//!   naming the certificate's; a certificate of another CA, or none under `require`, is
//!   refused at the handshake.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use remora_tests::envoy::Envoy;
use remora_tests::{free_port, wait_for};
use serde_json::Value;
use tonic::transport::Channel;
use x509_parser::extensions::GeneralName;
use xds_api::remora::ca::v1::SignCertificateRequest;
use xds_api::remora::ca::v1::certificate_service_client::CertificateServiceClient;

const CP_IDENTITY: &str = "spiffe://cluster.local/ns/remora-system/sa/remora-cp";
const CP_DNS_NAME: &str = "remora-cp.remora-system.svc";

/// A `remora-cp` with `args`, started off the async runtime.
async fn start(args: Vec<String>) -> (ControlPlane, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().display().to_string();
    let cp = tokio::task::spawn_blocking(move || {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(["--data-dir", &data]);
        ControlPlane::start_with(free_port(), free_port(), &args)
    })
    .await
    .expect("started");
    (cp, dir)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|arg| arg.to_string()).collect()
}

/// `POST /v1/xds-tokens` with `grant`: the token.
fn token(cp: &ControlPlane, grant: &str) -> String {
    let (status, body) = cp.call("POST", "/v1/xds-tokens", grant);
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().expect("a token").to_string()
}

fn bundle(cp: &ControlPlane) -> String {
    let auth = format!("Bearer {TOKEN}");
    let (status, _, bundle) = remora_tests::http_request(
        cp.api,
        "GET",
        "/v1/ca/bundle",
        &[("Authorization", &auth)],
        "",
    )
    .expect("GET /v1/ca/bundle");
    assert_eq!(status, 200);
    bundle
}

/// A certificate request for a new key, asking for a name the control plane must ignore.
fn new_request() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(vec!["admin.example".to_string()])
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (key, csr)
}

async fn sign(
    channel: Channel,
    node_id: &str,
    csr_pem: &str,
    token: Option<&str>,
) -> Result<xds_api::remora::ca::v1::SignCertificateResponse, tonic::Status> {
    let mut request = tonic::Request::new(SignCertificateRequest {
        csr_pem: csr_pem.to_string(),
        node_id: node_id.to_string(),
    });
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
    }
    CertificateServiceClient::new(channel)
        .sign_certificate(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn plaintext(cp: &ControlPlane) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// The leaf of a PEM chain: its URI and DNS SANs and its public key.
fn leaf_names_and_key(chain_pem: &str) -> (Vec<String>, Vec<u8>) {
    let blocks = pem::parse_many(chain_pem).expect("PEM chain");
    let (_, leaf) = x509_parser::parse_x509_certificate(blocks[0].contents()).expect("leaf");
    let names = leaf
        .subject_alternative_name()
        .expect("SAN extension")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|name| match name {
                    GeneralName::URI(uri) => uri.to_string(),
                    GeneralName::DNSName(dns) => format!("dns:{dns}"),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    (names, leaf.public_key().raw.to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_signed_for_the_tokens_identity_and_refused_saying_why() {
    let (cp, _dir) = start(args(&[
        "--xds-auth",
        "token",
        "--workload-cert-lifetime",
        "2h",
    ]))
    .await;
    let buyer = token(
        &cp,
        r#"{"group": "a-1", "namespace": "shop", "serviceAccount": "buyer"}"#,
    );
    let group_only = token(&cp, r#"{"group": "a-1"}"#);
    let channel = plaintext(&cp).await;
    let (key, csr) = new_request();

    let before = SystemTime::now().duration_since(UNIX_EPOCH).expect("now");
    let signed = sign(channel.clone(), "a-1.shop", &csr, Some(&buyer))
        .await
        .expect("signed");
    assert_eq!(signed.spiffe_id, "spiffe://cluster.local/ns/shop/sa/buyer");
    let (names, public_key) = leaf_names_and_key(&signed.certificate_chain_pem);
    assert_eq!(names, ["spiffe://cluster.local/ns/shop/sa/buyer"]);
    assert_eq!(public_key, key.public_key_der(), "the request's own key");
    assert_eq!(signed.trust_bundle_pem, bundle(&cp));
    let lifetime = signed.not_after_unix_seconds - before.as_secs() as i64;
    assert!(
        (7190..=7210).contains(&lifetime),
        "a 2h certificate, not {lifetime}s"
    );

    // Who may ask.
    let refused = sign(channel.clone(), "a-1.shop", &csr, None)
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("Bearer"),
        "{}",
        refused.message()
    );
    let refused = sign(channel.clone(), "a-1.shop", &csr, Some("not-a-token"))
        .await
        .expect_err("bad token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("unknown or revoked"));
    let refused = sign(channel.clone(), "a-1.shop", &csr, Some(&group_only))
        .await
        .expect_err("no identity");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("no workload identity"),
        "{}",
        refused.message()
    );

    // What is wrong with a request.
    let refused = sign(channel.clone(), "a-1.shop", "hello", Some(&buyer))
        .await
        .expect_err("not PEM");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("not PEM"),
        "{}",
        refused.message()
    );
    let refused = sign(
        channel.clone(),
        "a-1.shop",
        &signed.certificate_chain_pem,
        Some(&buyer),
    )
    .await
    .expect_err("a certificate");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("not a CERTIFICATE REQUEST"),
        "{}",
        refused.message()
    );

    tokio::task::spawn_blocking(move || drop(cp))
        .await
        .expect("stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_xds_authentication_the_node_id_names_the_identity() {
    let (cp, _dir) = start(args(&["--mesh"])).await;
    let channel = plaintext(&cp).await;
    let (_, csr) = new_request();
    let signed = sign(channel.clone(), "web-1.shop", &csr, None)
        .await
        .expect("signed");
    assert_eq!(
        signed.spiffe_id,
        "spiffe://cluster.local/ns/shop/sa/default"
    );
    let refused = sign(channel.clone(), "", &csr, None)
        .await
        .expect_err("no node id");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let refused = sign(channel.clone(), "nodots", &csr, None)
        .await
        .expect_err("no pod");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("\"nodots\""), "{refused:?}");
    tokio::task::spawn_blocking(move || drop(cp))
        .await
        .expect("stopped");
}

/// A TLS client that trusts `bundle_pem` and checks the server's name against
/// `CP_DNS_NAME`, speaking HTTP/2.
fn tls_connector(bundle_pem: &str) -> tokio_rustls::TlsConnector {
    tls_connector_with(bundle_pem, None)
}

/// [`tls_connector`], presenting `client` (certificate chain PEM, key PEM) when given.
fn tls_connector_with(
    bundle_pem: &str,
    client: Option<(&str, &str)>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut bundle_pem.as_bytes()) {
        roots.add(cert.expect("bundle cert")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((chain_pem, key_pem)) => {
            let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("chain");
            let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
                .expect("key")
                .expect("a key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A gRPC channel to `xds` over TLS verified against `bundle_pem`.
async fn tls_channel(xds: SocketAddr, bundle_pem: &str) -> Channel {
    tls_channel_with(xds, bundle_pem, None).await
}

/// [`tls_channel`], presenting `client` (certificate chain PEM, key PEM) when given.
async fn tls_channel_with(
    xds: SocketAddr,
    bundle_pem: &str,
    client: Option<(&str, &str)>,
) -> Channel {
    let connector = tls_connector_with(bundle_pem, client);
    tonic::transport::Endpoint::from_static("http://remora-cp")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(xds).await?;
                let name = rustls::pki_types::ServerName::try_from(CP_DNS_NAME)
                    .expect("name")
                    .to_owned();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .expect("connect over TLS")
}

#[tokio::test(flavor = "multi_thread")]
async fn xds_over_tls_names_the_control_plane_and_serves_signing() {
    let (cp, _dir) = start(args(&[
        "--xds-auth",
        "token",
        "--xds-tls",
        "--xds-tls-dns-name",
        CP_DNS_NAME,
    ]))
    .await;
    let bundle_pem = bundle(&cp);

    // The served certificate: from the mesh CA, naming the control plane.
    let tcp = tokio::net::TcpStream::connect(cp.xds)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from(CP_DNS_NAME)
        .expect("name")
        .to_owned();
    let tls = tls_connector(&bundle_pem)
        .connect(name, tcp)
        .await
        .expect("the handshake verifies against the bundle");
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    let served = session.peer_certificates().expect("a certificate");
    let served_pem = pem::encode(&pem::Pem::new("CERTIFICATE", served[0].to_vec()));
    let (names, _) = leaf_names_and_key(&served_pem);
    assert_eq!(
        names,
        [CP_IDENTITY.to_string(), format!("dns:{CP_DNS_NAME}")]
    );
    drop(tls);

    // Plaintext gRPC finds no server there.
    let plaintext_attempt = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds))
            .expect("endpoint")
            .connect()
            .await
            .ok()?;
        sign(channel, "x.shop", "", None).await.err()
    })
    .await
    .ok()
    .flatten();
    if let Some(status) = plaintext_attempt {
        assert_ne!(status.code(), tonic::Code::Ok);
    }

    // Signing over TLS.
    let buyer = token(
        &cp,
        r#"{"group": "a-1", "namespace": "shop", "serviceAccount": "buyer"}"#,
    );
    let (_, csr) = new_request();
    let channel = tls_channel(cp.xds, &bundle_pem).await;
    let signed = sign(channel.clone(), "a-1.shop", &csr, Some(&buyer))
        .await
        .expect("signed over TLS");
    assert_eq!(signed.spiffe_id, "spiffe://cluster.local/ns/shop/sa/buyer");
    let refused = sign(channel, "a-1.shop", &csr, None)
        .await
        .expect_err("no token over TLS either");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    tokio::task::spawn_blocking(move || drop(cp))
        .await
        .expect("stopped");
}

/// The serial (DER bytes) of the certificate a new TLS connection to `xds` is served.
async fn served_serial(xds: SocketAddr, bundle_pem: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(xds).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(CP_DNS_NAME)
        .expect("name")
        .to_owned();
    let tls = tls_connector(bundle_pem)
        .connect(name, tcp)
        .await
        .expect("the handshake verifies against the bundle");
    let served = tls.get_ref().1.peer_certificates().expect("a certificate");
    let (_, leaf) = x509_parser::parse_x509_certificate(&served[0]).expect("leaf");
    leaf.raw_serial().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_serving_certificate_is_renewed_without_dropping_streams() {
    use tokio_stream::StreamExt;
    use xds_api::envoy::config::core::v3::Node;
    use xds_api::envoy::service::discovery::v3::DiscoveryRequest;
    use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

    // 4 s certificates: renewed every 2 s.
    let (cp, _dir) = start(args(&[
        "--xds-tls",
        "--xds-tls-dns-name",
        CP_DNS_NAME,
        "--workload-cert-lifetime",
        "4s",
    ]))
    .await;
    let cluster = |name: &str| format!("\"@type\": Cluster\nname: {name}\nconnect_timeout: 1s\n");
    cp.put("clusters", "first?group=g", &cluster("first"));
    let bundle_pem = bundle(&cp);
    let first_serial = served_serial(cp.xds, &bundle_pem).await;

    // One ADS stream over TLS, held across the renewal.
    let channel = tls_channel(cp.xds, &bundle_pem).await;
    let (requests, outgoing) = tokio::sync::mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            node: Some(Node {
                id: "renewal".into(),
                cluster: "g".into(),
                ..Default::default()
            }),
            type_url: xds_api::type_urls::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .expect("send");
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .expect("stream")
        .into_inner();
    // Reads (and ACKs) responses until one holds cluster `name`.
    let mut until_cluster = async |name: &str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let response = tokio::time::timeout_at(deadline, responses.next())
                .await
                .unwrap_or_else(|_| panic!("cluster {name} in time"))
                .expect("the stream is open")
                .expect("a response");
            requests
                .send(DiscoveryRequest {
                    version_info: response.version_info.clone(),
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await
                .expect("ack");
            let names: Vec<String> = response
                .resources
                .iter()
                .map(|any| {
                    use prost::Message;
                    xds_api::envoy::config::cluster::v3::Cluster::decode(any.value.as_slice())
                        .expect("cluster")
                        .name
                })
                .collect();
            if names.iter().any(|held| held == name) {
                return;
            }
        }
    };
    until_cluster("first").await;

    // New handshakes get a new certificate...
    remora_tests::wait_for_async(
        "the serving certificate to be renewed",
        Duration::from_secs(20),
        || async { (served_serial(cp.xds, &bundle_pem).await != first_serial).then_some(()) },
    )
    .await;
    // ...and the stream opened before still gets updates.
    cp.put("clusters", "second?group=g", &cluster("second"));
    until_cluster("second").await;

    tokio::task::spawn_blocking(move || drop(cp))
        .await
        .expect("stopped");
}

/// How an Envoy proves who it is to the control plane.
enum Credential<'a> {
    /// A bootstrap token, sent as `authorization: Bearer`.
    Token(&'a str),
    /// A client certificate (PEM files) and no token.
    Certificate(&'a std::path::Path, &'a std::path::Path),
}

/// Rewrites an Envoy bootstrap from [`envoy_bootstrap`] so its ADS cluster speaks TLS to the
/// control plane, verified against `bundle` with a SAN matcher on `identity`, proving itself
/// with `credential`.
fn over_tls(
    bootstrap: &std::path::Path,
    bundle: &std::path::Path,
    identity: &str,
    credential: Credential<'_>,
) {
    let mut text = std::fs::read_to_string(bootstrap).expect("bootstrap");
    let mut certificates = String::new();
    match credential {
        Credential::Token(token) => {
            text = text.replace(
                "grpc_services: [{envoy_grpc: {cluster_name: xds_cluster}}]",
                &format!(
                    "grpc_services: [{{envoy_grpc: {{cluster_name: xds_cluster}}, initial_metadata: [{{key: authorization, value: \"Bearer {token}\"}}]}}]"
                ),
            );
        }
        Credential::Certificate(cert, key) => {
            certificates = format!(
                "\n          tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]",
                cert.display(),
                key.display()
            );
        }
    }
    let transport_socket = format!(
        r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {CP_DNS_NAME}
        common_tls_context:
          alpn_protocols: [h2]{certificates}
          validation_context:
            trusted_ca: {{filename: {bundle}}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{identity}"}}}}]
"#,
        bundle = bundle.display()
    );
    let text = format!("{}{transport_socket}", text.trim_end());
    std::fs::write(bootstrap, text).expect("write");
}

/// A control plane serving xDS over TLS as [`CP_DNS_NAME`] to token holders (and `extra`),
/// holding cluster `only-b` for group `b`; started off any async runtime.
fn group_b_over_tls(extra: &[&str]) -> (ControlPlane, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data").display().to_string();
    let mut args = vec![
        "--data-dir",
        &data,
        "--xds-auth",
        "token",
        "--xds-tls",
        "--xds-tls-dns-name",
        CP_DNS_NAME,
    ];
    args.extend(extra);
    let cp = ControlPlane::start_with(free_port(), free_port(), &args);
    let (status, body) = cp.call(
        "PUT",
        "/v1/clusters/only-b?group=b",
        "\"@type\": Cluster\nname: only-b\nconnect_timeout: 1s\n",
    );
    assert_eq!(status, 200, "{body}");
    (cp, dir)
}

/// Waits for Envoy node `node` to get group b's cluster; the control plane lists it in group b.
fn wait_for_group_b(cp: &ControlPlane, envoy: &Envoy, node: &str) {
    wait_for(
        &format!("{node} to get group b's cluster"),
        Duration::from_secs(30),
        || {
            envoy
                .admin_get("/clusters")
                .contains("only-b::")
                .then_some(())
        },
    );
    let proxy: Value = cp.proxy(node).expect("listed");
    assert_eq!(proxy["group"], "b");
}

#[test]
fn envoy_verifies_the_control_plane_over_xds_tls() {
    if !envoy_or_skip() {
        return;
    }
    let (cp, dir) = group_b_over_tls(&[]);
    let token = token(&cp, r#"{"group": "b"}"#);
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, self::bundle(&cp)).expect("write bundle");

    // The control plane's identity: Envoy connects and gets its group's cluster.
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(dir.path(), "envoy-b", "b", cp.xds, admin, "GRPC");
    over_tls(&bootstrap, &bundle, CP_IDENTITY, Credential::Token(&token));
    let envoy = Envoy::start(&bootstrap, admin, &[]);
    wait_for_group_b(&cp, &envoy, "envoy-b");

    // Another identity expected: Envoy refuses the server and gets nothing.
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(dir.path(), "envoy-wrong", "b", cp.xds, admin, "GRPC");
    over_tls(
        &bootstrap,
        &bundle,
        "spiffe://cluster.local/ns/remora-system/sa/someone-else",
        Credential::Token(&token),
    );
    let wrong = Envoy::start(&bootstrap, admin, &[]);
    wait_for(
        "Envoy to refuse the server's certificate",
        Duration::from_secs(30),
        || {
            (wrong
                .stat("cluster.xds_cluster.ssl.fail_verify_san")
                .unwrap_or(0)
                >= 1)
                .then_some(())
        },
    );
    assert!(cp.proxy("envoy-wrong").is_none());
    assert!(!wrong.admin_get("/clusters").contains("only-b::"));
}

/// The control plane's log line for a handshake refused over the client's certificate.
fn handshake_refusal(log: &str) -> Option<()> {
    log.lines()
        .any(|line| {
            line.contains("xDS TLS handshake failed")
                && line.to_ascii_lowercase().contains("certificate")
        })
        .then_some(())
}

/// A key and a certificate for `shop/buyer`, signed for a certificate request made with the
/// token `buyer` over `channel`: (chain PEM, key PEM).
async fn workload_certificate(channel: Channel, buyer: &str) -> (String, String) {
    let (key, csr) = new_request();
    let signed = sign(channel, "a-1.shop", &csr, Some(buyer))
        .await
        .expect("signed");
    (signed.certificate_chain_pem, key.serialize_pem())
}

/// The first response of an ADS stream for clusters as `node` over `channel`, or the status
/// the stream ended with.
async fn first_ads_response(
    channel: Channel,
    node: xds_api::envoy::config::core::v3::Node,
) -> Result<xds_api::envoy::service::discovery::v3::DiscoveryResponse, tonic::Status> {
    use tokio_stream::StreamExt;
    use xds_api::envoy::service::discovery::v3::DiscoveryRequest;
    use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let (requests, outgoing) = tokio::sync::mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            node: Some(node),
            type_url: xds_api::type_urls::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .expect("send");
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let response = tokio::time::timeout(Duration::from_secs(20), responses.next())
        .await
        .expect("an answer in time")
        .expect("an answer")?;
    drop(requests);
    Ok(response)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_of_the_mesh_ca_is_a_credential_without_a_token() {
    use xds_api::envoy::config::core::v3::Node;
    let (cp, _dir) = start(args(&[
        "--mesh",
        "--xds-auth",
        "token",
        "--xds-tls",
        "--xds-tls-dns-name",
        CP_DNS_NAME,
        "--xds-tls-client-auth",
        "optional",
    ]))
    .await;
    let bundle_pem = bundle(&cp);
    let buyer = token(
        &cp,
        r#"{"group": "a-1", "namespace": "shop", "serviceAccount": "buyer"}"#,
    );
    // The first certificate takes the token; a client without a certificate still may come.
    let (chain, key) = workload_certificate(tls_channel(cp.xds, &bundle_pem).await, &buyer).await;
    let mtls = tls_channel_with(cp.xds, &bundle_pem, Some((&chain, &key))).await;

    // Renewal over mTLS: no token, the certificate's identity.
    let (renewed_key, csr) = new_request();
    let renewed = sign(mtls.clone(), "a-1.shop", &csr, None)
        .await
        .expect("renewed with the certificate alone");
    assert_eq!(renewed.spiffe_id, "spiffe://cluster.local/ns/shop/sa/buyer");
    let (names, public_key) = leaf_names_and_key(&renewed.certificate_chain_pem);
    assert_eq!(names, ["spiffe://cluster.local/ns/shop/sa/buyer"]);
    assert_eq!(public_key, renewed_key.public_key_der());
    // Without a certificate or a token, as before.
    let refused = sign(
        tls_channel(cp.xds, &bundle_pem).await,
        "a-1.shop",
        &csr,
        None,
    )
    .await
    .expect_err("no credential");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // xDS with the certificate: a plain proxy keeps its node's group, as with a Kubernetes
    // token bound to no pod...
    cp.put(
        "clusters",
        "only-g?group=g",
        "\"@type\": Cluster\nname: only-g\nconnect_timeout: 1s\n",
    );
    let served = first_ads_response(
        mtls.clone(),
        Node {
            id: "plain".into(),
            cluster: "g".into(),
            ..Default::default()
        },
    )
    .await
    .expect("served with the certificate");
    assert_eq!(served.type_url, xds_api::type_urls::CLUSTER);
    // ...and a sidecar must be in the certificate's namespace.
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "REMORA_INBOUND_PORT".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("15006".into())),
        },
    );
    let refused = first_ads_response(
        mtls.clone(),
        Node {
            id: "p-1.pay".into(),
            cluster: "p-1".into(),
            metadata: Some(metadata),
            ..Default::default()
        },
    )
    .await
    .expect_err("another namespace");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("client certificate is for namespace \"shop\""),
        "{refused:?}"
    );

    // A certificate of another CA is refused at the handshake.
    let (other_root, other_key) =
        remora_control_plane::ca::generate_root("cluster.local").expect("root");
    let other = remora_control_plane::ca::Ca::from_pem(
        &other_root,
        &other_key,
        &remora_control_plane::ca::CaOptions::default(),
    )
    .expect("another CA");
    let forged = other
        .issue(&other.identity("shop", "buyer"), SystemTime::now())
        .expect("issued");
    let forged_channel = tokio::time::timeout(Duration::from_secs(10), async {
        let connector = tls_connector_with(&bundle_pem, Some((&forged.chain_pem, &forged.key_pem)));
        let channel = try_tls_channel(cp.xds, connector).await.ok()?;
        Some(sign(channel, "a-1.shop", &csr, None).await)
    })
    .await
    .expect("an answer in time");
    if let Some(answer) = forged_channel {
        let status = answer.expect_err("a forged certificate");
        assert_ne!(status.code(), tonic::Code::Ok);
    }
    let log_path = cp.process.log_path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        wait_for("the refusal in the log", Duration::from_secs(10), || {
            handshake_refusal(&std::fs::read_to_string(&log_path).ok()?)
        })
    })
    .await
    .expect("logged");
    tokio::task::spawn_blocking(move || drop(cp))
        .await
        .expect("stopped");
}

/// A gRPC channel over TLS to `xds` whose connection attempt (and first call) may fail.
async fn try_tls_channel(
    xds: SocketAddr,
    connector: tokio_rustls::TlsConnector,
) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_static("http://remora-cp")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(xds).await?;
                let name = rustls::pki_types::ServerName::try_from(CP_DNS_NAME)
                    .expect("name")
                    .to_owned();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn required_client_certificates_refuse_connections_without_one() {
    use remora_control_plane::ca::{Ca, CaOptions, generate_root};
    // The root from files, so the test holds a certificate of the mesh CA from the start, as
    // a proxy would from an earlier request.
    let files = tempfile::tempdir().expect("dir");
    let (root, root_key) = generate_root("cluster.local").expect("root");
    let (cert_path, key_path) = (files.path().join("ca.crt"), files.path().join("ca.key"));
    std::fs::write(&cert_path, &root).expect("write");
    std::fs::write(&key_path, &root_key).expect("write");
    let ca = Ca::from_pem(&root, &root_key, &CaOptions::default()).expect("ca");
    let held = ca
        .issue(&ca.identity("shop", "buyer"), SystemTime::now())
        .expect("issued");
    let (cp, _dir) = start(args(&[
        "--xds-auth",
        "token",
        "--xds-tls",
        "--xds-tls-dns-name",
        CP_DNS_NAME,
        "--xds-tls-client-auth",
        "require",
        "--ca-cert",
        &cert_path.display().to_string(),
        "--ca-key",
        &key_path.display().to_string(),
    ]))
    .await;
    let bundle_pem = bundle(&cp);
    let buyer = token(
        &cp,
        r#"{"group": "a-1", "namespace": "shop", "serviceAccount": "buyer"}"#,
    );
    let (_, csr) = new_request();
    // Without a certificate, even with a token, the connection is refused.
    let attempt = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = try_tls_channel(cp.xds, tls_connector(&bundle_pem))
            .await
            .ok()?;
        Some(sign(channel, "a-1.shop", &csr, Some(&buyer)).await)
    })
    .await
    .expect("an answer in time");
    if let Some(answer) = attempt {
        answer.expect_err("no client certificate");
    }
    let log_path = cp.process.log_path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        wait_for("the refusal in the log", Duration::from_secs(10), || {
            handshake_refusal(&std::fs::read_to_string(&log_path).ok()?)
        })
    })
    .await
    .expect("logged");
    // With the certificate, and no token, the request is signed for its identity.
    let channel =
        tls_channel_with(cp.xds, &bundle_pem, Some((&held.chain_pem, &held.key_pem))).await;
    let signed = sign(channel, "a-1.shop", &csr, None)
        .await
        .expect("signed with the certificate alone");
    assert_eq!(signed.spiffe_id, "spiffe://cluster.local/ns/shop/sa/buyer");
    tokio::task::spawn_blocking(move || drop(cp))
        .await
        .expect("stopped");
}

#[test]
fn envoy_with_a_workload_certificate_needs_no_token() {
    if !envoy_or_skip() {
        return;
    }
    let (cp, dir) = group_b_over_tls(&["--xds-tls-client-auth", "optional"]);
    let bundle_pem = self::bundle(&cp);
    let buyer = token(
        &cp,
        r#"{"group": "b", "namespace": "shop", "serviceAccount": "buyer"}"#,
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (chain, key) = runtime.block_on(async {
        workload_certificate(tls_channel(cp.xds, &bundle_pem).await, &buyer).await
    });
    let bundle = dir.path().join("bundle.pem");
    let cert = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&bundle, &bundle_pem).expect("write");
    std::fs::write(&cert, &chain).expect("write");
    std::fs::write(&key_file, &key).expect("write");

    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(dir.path(), "envoy-b", "b", cp.xds, admin, "GRPC");
    over_tls(
        &bootstrap,
        &bundle,
        CP_IDENTITY,
        Credential::Certificate(&cert, &key_file),
    );
    assert!(
        !std::fs::read_to_string(&bootstrap)
            .expect("bootstrap")
            .contains("authorization")
    );
    let envoy = Envoy::start(&bootstrap, admin, &[]);
    wait_for_group_b(&cp, &envoy, "envoy-b");
}
