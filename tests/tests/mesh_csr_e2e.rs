//! Remora sidecars that make their own keys, end to end: `remora-cp --mesh --xds-auth token
//! --xds-tls`, services registered through the REST API, pods in network namespaces with the
//! capture rules of `remora-init`, and two `remora-proxy` sidecars started as the injector
//! starts them plus `--csr-secret remora-workload-cert --xds-token-file FILE`, with ADS over TLS
//! verified against the bundle of `GET /v1/ca/bundle` and the control plane's SPIFFE id
//! (`REMORA_XDS_CA`, `REMORA_XDS_SAN`).
//!
//! - A → A's sidecar → mTLS (B requires it) → B's sidecar → B: the request passes, and B's
//!   sidecar counts the TLS handshake with a client certificate.
//! - Each sidecar holds a certificate naming its token's identity whose serial is the one the
//!   control plane signed for its certificate request, and the control plane never sent it
//!   `remora-workload-cert` (its SDS subscription names only the trust bundle): the key was
//!   made in the sidecar.
//! - The control plane signed no workload certificate of its own for them: it issues one only
//!   when a stream subscribes to `remora-workload-cert`.
//! - Revoking A's token ends its sidecar's stream (the control plane lists it no more) and its
//!   reconnects are refused, the sidecar's log saying `token revoked`.
//! - An ADS stream with no token or a bad one is refused with `UNAUTHENTICATED` over the same
//!   TLS port, and the sidecar says so in its log.
//!
//! Needs root, iproute2, iptables and util-linux.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use remora_tests::echo::EchoServer;
use remora_tests::mesh::{ControlPlane, SidecarSpec, pod_ip, start_sidecar};
use remora_tests::netns::{listen_in, missing_prerequisite};
use remora_tests::pods::{Node, PodNet, call, sidecar_admin, sidecar_stat, spawn_in_pod};
use remora_tests::wait_for;
use serde_json::{Value, json};

const VIP_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CP_IDENTITY: &str = "spiffe://cluster.local/ns/remora-system/sa/remora-cp";

fn prerequisites(test: &str) -> bool {
    match missing_prerequisite(&["ip", "iptables-restore", "iptables-save", "setpriv"]) {
        Some(reason) => {
            remora_tests::skip(test, &reason);
            false
        }
        None => true,
    }
}

/// Writes `text` to `dir/name`, readable by the sidecar's user.
fn readable_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

/// The injected sidecar of `pod`, over TLS to the control plane, with its token in
/// `token_file` and its workload certificate made by certificate request.
fn csr_sidecar(pod: &str, bundle: &Path, token_file: &Path) -> SidecarSpec {
    let mut spec = SidecarSpec::injected(pod, "shop", pod);
    spec.proxy_command.extend([
        "--csr-secret".to_string(),
        "remora-workload-cert".to_string(),
        "--xds-token-file".to_string(),
        token_file.display().to_string(),
    ]);
    spec.proxy_env.extend([
        ("REMORA_XDS_CA".to_string(), bundle.display().to_string()),
        ("REMORA_XDS_SAN".to_string(), CP_IDENTITY.to_string()),
    ]);
    spec
}

/// The serials of the certificates with a URI SAN `identity` the sidecar in `pod` holds.
fn serials_naming(pod: &PodNet, identity: &str) -> Vec<String> {
    let body = sidecar_admin(pod, "/certs").unwrap_or_default();
    let certs: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut serials = Vec::new();
    for context in certs["certificates"].as_array().into_iter().flatten() {
        for cert in context["cert_chain"].as_array().into_iter().flatten() {
            let names_identity = cert["subject_alt_names"]
                .as_array()
                .is_some_and(|sans| sans.iter().any(|san| san["uri"] == identity));
            if names_identity && let Some(serial) = cert["serial_number"].as_str() {
                serials.push(serial.to_string());
            }
        }
    }
    serials.sort();
    serials.dedup();
    serials
}

#[test]
fn remora_sidecars_with_their_own_keys_talk_mtls_over_an_authenticated_tls_control_plane() {
    let test =
        "remora_sidecars_with_their_own_keys_talk_mtls_over_an_authenticated_tls_control_plane";
    if !prerequisites(test) {
        return;
    }
    let node = Node::create(&format!("mc{}", std::process::id()));
    let cp = ControlPlane::start(
        &node.netns,
        &[
            "--mesh",
            "--xds-auth",
            "token",
            "--xds-tls",
            "--xds-tls-dns-name",
            "remora-cp.remora-system.svc",
        ],
        &[],
    );
    let files = tempfile::tempdir().expect("dir");
    let (status, _, bundle) = remora_tests::http_request(cp.api, "GET", "/v1/ca/bundle", &[], "")
        .expect("GET /v1/ca/bundle");
    assert_eq!(status, 200);
    let bundle = readable_file(files.path(), "root-cert.pem", &bundle);
    let token_file = |pod: &str, account: &str| {
        let (status, answer) = cp.call(
            "POST",
            "/v1/xds-tokens",
            &json!({"group": pod, "namespace": "shop", "serviceAccount": account}),
        );
        assert_eq!(status, 200, "{answer}");
        let token = answer["token"].as_str().expect("a token");
        let id = answer["id"].as_str().expect("an id").to_string();
        (
            readable_file(files.path(), &format!("{pod}.token"), token),
            id,
        )
    };
    cp.put(
        "/v1/mesh/services/shop/b",
        json!({"vip": VIP_B.to_string(), "ports": [{"name": "http", "port": 80}]}),
    );
    cp.put(
        "/v1/mesh/trafficpolicies/shop/b",
        json!({"spec": {"service": "b", "mtls": {"mode": "Strict"}}}),
    );
    let b = node.add_pod("b-1", pod_ip(2, 1));
    let _echo = EchoServer::start_on("b-1", listen_in(&b.netns, "0.0.0.0:8080".parse().unwrap()));
    cp.put(
        "/v1/mesh/endpoints/shop/b",
        json!({"ports": {"http": 8080}, "endpoints": [{"address": b.ip.to_string(), "ready": true, "workload": "b-1"}]}),
    );
    let _b_sidecar = start_sidecar(
        &b,
        &csr_sidecar("b-1", &bundle, &token_file("b-1", "seller").0),
    );
    let a = node.add_pod("a-1", pod_ip(1, 1));
    let (a_token, a_token_id) = token_file("a-1", "buyer");
    let a_sidecar = start_sidecar(&a, &csr_sidecar("a-1", &bundle, &a_token));
    for node_id in ["a-1.shop", "b-1.shop"] {
        wait_for(
            &format!("{node_id} in sync"),
            Duration::from_secs(30),
            || cp.in_sync(node_id).then_some(()),
        );
    }

    // A → mTLS → B.
    let upstream = wait_for("a request over mTLS", Duration::from_secs(30), || {
        let (status, upstream) = call(&a, VIP_B, "/", Some("b.shop"));
        (status == 200).then_some(upstream)
    });
    assert_eq!(upstream, "b-1");
    // Over mTLS: B's inbound listener took a handshake with A's certificate.
    assert!(
        sidecar_stat(&b, "listener.0.0.0.0_15006.ssl.handshake").unwrap_or(0) >= 1,
        "B's sidecar took no TLS handshake"
    );
    assert_eq!(
        sidecar_stat(&b, "listener.0.0.0.0_15006.ssl.no_certificate").unwrap_or(0),
        0,
        "A's sidecar presented its certificate"
    );

    // Each sidecar serves the certificate signed for its own request, for its token's
    // identity; the control plane never sent it a workload certificate.
    let proxies = cp.proxies();
    for (pod, identity) in [
        (&a, "spiffe://cluster.local/ns/shop/sa/buyer"),
        (&b, "spiffe://cluster.local/ns/shop/sa/seller"),
    ] {
        let node_id = format!("{}.shop", pod.name);
        let entry = proxies
            .iter()
            .find(|proxy| proxy["node_id"] == node_id.as_str())
            .unwrap_or_else(|| panic!("{node_id} listed: {proxies:?}"));
        let signed = &entry["signed_certificate"];
        assert_eq!(signed["spiffe_id"], identity, "{entry}");
        let serial = signed["serial"].as_str().expect("a serial").to_string();
        assert_eq!(
            serials_naming(pod, identity),
            [serial],
            "{node_id} serves the certificate signed for its request"
        );
        let subscribed = entry["types"]["SDS"]["secret_names"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            !subscribed.is_empty()
                && !subscribed
                    .iter()
                    .any(|name| name == "remora-workload-cert" || name == "*"),
            "{node_id} asked SDS for {subscribed:?}"
        );
        assert!(
            subscribed.iter().any(|name| name == "remora-trust-bundle"),
            "{node_id} asked SDS for {subscribed:?}"
        );
    }

    // Nor did it make a key and certificate for their identities that no one would get.
    let log = cp.process.log();
    assert!(
        log.contains("signed a certificate request")
            && !log.contains("issued a workload certificate"),
        "the control plane issued an SDS certificate no sidecar asked for:\n{log}"
    );

    // Without a token, or with a bad one, the same TLS port refuses the stream.
    for (pod, token) in [("c-1", None), ("d-1", Some("not-a-token"))] {
        let refused = node.add_pod(pod, pod_ip(3, if token.is_none() { 1 } else { 2 }));
        let mut spec = SidecarSpec::injected(pod, "shop", pod);
        spec.proxy_env
            .push(("REMORA_XDS_CA".to_string(), bundle.display().to_string()));
        spec.proxy_env
            .push(("REMORA_XDS_SAN".to_string(), CP_IDENTITY.to_string()));
        if let Some(token) = token {
            let file = readable_file(files.path(), &format!("{pod}.token"), token);
            spec.proxy_command
                .extend(["--xds-token-file".to_string(), file.display().to_string()]);
        }
        let proxy = spawn_in_pod(
            &format!("sidecar-{pod}"),
            &refused,
            &spec.proxy_command,
            &spec.proxy_env,
            spec.proxy_uid,
            spec.proxy_uid,
        );
        let expected = if token.is_none() {
            "requires a bootstrap token"
        } else {
            "unknown or revoked bootstrap token"
        };
        wait_for(
            &format!("{pod}'s stream to be refused"),
            Duration::from_secs(30),
            || {
                // The proxy prints the gRPC code by its description.
                let log = proxy.log();
                (log.contains(tonic::Code::Unauthenticated.description()) && log.contains(expected))
                    .then_some(())
            },
        );
        assert!(
            !cp.proxies()
                .iter()
                .any(|proxy| proxy["node_id"] == format!("{pod}.shop").as_str()),
            "{pod} has no stream"
        );
    }

    // Revoking A's token ends its sidecar's stream; its reconnects are refused, saying why.
    let (status, answer) = cp.call(
        "DELETE",
        &format!("/v1/xds-tokens/{a_token_id}"),
        &Value::Null,
    );
    assert_eq!(status, 200, "{answer}");
    wait_for(
        "a-1's stream to end and its reconnect to be refused",
        Duration::from_secs(30),
        || {
            let listed = cp
                .proxies()
                .iter()
                .any(|proxy| proxy["node_id"] == "a-1.shop");
            let log = a_sidecar.log();
            (!listed
                && log.contains(tonic::Code::Unauthenticated.description())
                && log.contains("token revoked"))
            .then_some(())
        },
    );
    assert!(
        cp.proxies()
            .iter()
            .any(|proxy| proxy["node_id"] == "b-1.shop"),
        "b-1's token still holds"
    );
    let log = cp.process.log();
    assert!(
        log.lines()
            .any(|line| line.contains("closed: its credential was revoked")
                && line.contains("a-1.shop")),
        "{log}"
    );
}
