//! Mesh mTLS with certificates from the control plane's CA, end to end with real Envoy 1.40 as
//! both sidecars (the Remora proxy takes SDS later): services registered through the REST API,
//! pods in network namespaces with the capture rules of `remora-init`, each sidecar Envoy fed
//! by `remora-cp` over ADS, its workload certificate and the trust bundle as SDS secrets.
//!
//! - A's Envoy originates mTLS to B's Envoy, which requires a client certificate: the request
//!   passes, both sides count handshakes, and A holds a certificate naming its SPIFFE id,
//!   issued by the root `GET /v1/ca/bundle` serves.
//! - The same connection made by a cluster whose SAN matcher expects another identity is
//!   refused by A's Envoy itself: 503 with response flag UF and `ssl.fail_verify_san`; with
//!   B's real identity it passes.
//! - With 6 s certificates, renewed every 3 s, A's Envoy takes two renewals while requests
//!   keep passing, none failed.
//! - With `--xds-auth token`, each sidecar presents a bootstrap token for its own identity and
//!   gets that identity's certificate; the request still passes.
//!
//! Needs root, iproute2, iptables, util-linux and Envoy.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use remora_tests::echo::EchoServer;
use remora_tests::mesh::{ControlPlane, pod_ip, start_envoy_sidecar_with_token};
use remora_tests::netns::{listen_in, missing_prerequisite};
use remora_tests::pods::{Node, PodNet, call, request_from, sidecar_admin, sidecar_stat};
use remora_tests::process::ChildGuard;
use remora_tests::wait_for;
use serde_json::{Value, json};

const VIP_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// Where A's Envoy listens for the identity probes (inside pod A).
const PROBE_PORT: u16 = 15090;
const B_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/default";

fn prerequisites(test: &str) -> bool {
    match missing_prerequisite(&["ip", "iptables-restore", "iptables-save", "setpriv"]) {
        Some(reason) => {
            remora_tests::skip(test, &reason);
            false
        }
        None => remora_tests::envoy::available_or_skip(test),
    }
}

/// A cluster of A's own group that reaches B's pod directly over mesh mTLS, accepting only
/// `identity` as the answering certificate's URI SAN.
fn cluster_expecting(name: &str, b_ip: Ipv4Addr, identity: &str) -> Value {
    let sds = |secret: &str| json!({"name": secret, "sds_config": {"ads": {}, "resource_api_version": "V3"}});
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": b_ip.to_string(), "port_value": 8080}}}}]}]},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "b.shop.svc.cluster.local",
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [sds("remora-workload-cert")],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": identity}}]
                        },
                        "validation_context_sds_secret_config": sds("remora-trust-bundle")
                    }
                }
            }
        }
    })
}

/// A listener of A's group on 127.0.0.1:PROBE_PORT: `/wrong` goes to the cluster expecting
/// another identity, the rest to the one expecting B's; each request is logged with its
/// response flags.
fn probe_listener() -> Value {
    json!({
        "name": "identity-probe",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": PROBE_PORT}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "identity_probe",
                "access_log": [{
                    "name": "envoy.access_loggers.stdout",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                        "log_format": {"text_format_source": {"inline_string": "probe %REQ(:PATH)% %RESPONSE_CODE% flags=%RESPONSE_FLAGS%\n"}}
                    }
                }],
                "route_config": {"name": "identity-probe", "virtual_hosts": [{
                    "name": "probe",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/wrong"}, "route": {"cluster": "b-as-someone-else"}},
                        {"match": {"prefix": "/"}, "route": {"cluster": "b-as-itself"}}
                    ]
                }]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        }]}]
    })
}

/// Pods A and B with Envoy sidecars fed by one `remora-cp`, B's echo app behind service `b`
/// with mTLS `Strict`, both sidecars in sync.
/// Fields drop in order: processes first, the network last.
struct MeshPair {
    a_envoy: ChildGuard,
    _b_envoy: ChildGuard,
    _echo: EchoServer,
    cp: ControlPlane,
    a: PodNet,
    b: PodNet,
    _node: Node,
    _dirs: [tempfile::TempDir; 2],
}

impl MeshPair {
    fn start(prefix: &str, cp_args: &[&str]) -> MeshPair {
        Self::start_with_tokens(prefix, cp_args, None)
    }

    /// With `accounts`: `remora-cp` was started with `--xds-auth token`, and each sidecar
    /// presents a token for its own group and namespace `shop` with service account
    /// `accounts.0` (A) or `accounts.1` (B).
    fn start_with_tokens(
        prefix: &str,
        cp_args: &[&str],
        accounts: Option<(&str, &str)>,
    ) -> MeshPair {
        let node = Node::create(&format!("{prefix}{}", std::process::id()));
        let cp = ControlPlane::start(&node.netns, cp_args, &[]);
        let token = |pod: &str, account: &str| {
            let (status, answer) = cp.call(
                "POST",
                "/v1/xds-tokens",
                &json!({"group": pod, "namespace": "shop", "serviceAccount": account}),
            );
            assert_eq!(status, 200, "{answer}");
            answer["token"].as_str().expect("a token").to_string()
        };
        let tokens = accounts.map(|(a, b)| (token("a-1", a), token("b-1", b)));
        cp.put(
            "/v1/mesh/services/shop/b",
            json!({"vip": VIP_B.to_string(), "ports": [{"name": "http", "port": 80}]}),
        );
        cp.put(
            "/v1/mesh/trafficpolicies/shop/b",
            json!({"spec": {"service": "b", "mtls": {"mode": "Strict"}}}),
        );
        let b = node.add_pod("b-1", pod_ip(2, 1));
        let echo =
            EchoServer::start_on("b-1", listen_in(&b.netns, "0.0.0.0:8080".parse().unwrap()));
        cp.put(
            "/v1/mesh/endpoints/shop/b",
            json!({"ports": {"http": 8080}, "endpoints": [{"address": b.ip.to_string(), "ready": true, "workload": "b-1"}]}),
        );
        // One directory per Envoy: each gets its own copy of the binary there.
        let dirs = [
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        ];
        let b_envoy = start_envoy_sidecar_with_token(
            &b,
            "shop",
            dirs[0].path(),
            tokens.as_ref().map(|(_, b)| b.as_str()),
        );
        let a = node.add_pod("a-1", pod_ip(1, 1));
        let a_envoy = start_envoy_sidecar_with_token(
            &a,
            "shop",
            dirs[1].path(),
            tokens.as_ref().map(|(a, _)| a.as_str()),
        );
        for node_id in ["a-1.shop", "b-1.shop"] {
            wait_for(
                &format!("{node_id} in sync"),
                Duration::from_secs(30),
                || cp.in_sync(node_id).then_some(()),
            );
        }
        MeshPair {
            a_envoy,
            _b_envoy: b_envoy,
            _echo: echo,
            cp,
            a,
            b,
            _node: node,
            _dirs: dirs,
        }
    }
}

/// The serial numbers of the workload certificates (those with a URI SAN) the sidecar in
/// `pod` holds, from its admin `/certs`.
fn workload_serials(pod: &PodNet) -> BTreeSet<String> {
    let body = sidecar_admin(pod, "/certs").unwrap_or_default();
    let certs: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut serials = BTreeSet::new();
    for context in certs["certificates"].as_array().into_iter().flatten() {
        for cert in context["cert_chain"].as_array().into_iter().flatten() {
            let has_uri = cert["subject_alt_names"]
                .as_array()
                .is_some_and(|sans| sans.iter().any(|san| san["uri"].is_string()));
            if has_uri && let Some(serial) = cert["serial_number"].as_str() {
                serials.insert(serial.to_string());
            }
        }
    }
    serials
}

#[test]
fn envoy_sidecars_talk_mtls_with_certificates_from_the_control_plane_ca() {
    let test = "envoy_sidecars_talk_mtls_with_certificates_from_the_control_plane_ca";
    if !prerequisites(test) {
        return;
    }
    let pair = MeshPair::start("mt", &["--mesh"]);
    let MeshPair {
        cp, a, b, a_envoy, ..
    } = &pair;

    // A → A's Envoy → mTLS → B's Envoy (client certificate required) → B.
    let upstream = wait_for("a request over mTLS", Duration::from_secs(30), || {
        let (status, upstream) = call(a, VIP_B, "/", Some("b.shop"));
        (status == 200).then_some(upstream)
    });
    assert_eq!(upstream, "b-1");
    let cluster_stat = |name: &str| {
        sidecar_stat(
            a,
            &format!("cluster.b.shop.svc.cluster.local_80.ssl.{name}"),
        )
        .unwrap_or(0)
    };
    assert!(
        cluster_stat("handshake") >= 1,
        "A's Envoy made no TLS handshake"
    );
    assert_eq!(cluster_stat("fail_verify_san"), 0);
    assert!(
        sidecar_stat(b, "listener.0.0.0.0_15006.ssl.handshake").unwrap_or(0) >= 1,
        "B's Envoy took no TLS handshake"
    );
    assert_eq!(
        sidecar_stat(b, "listener.0.0.0.0_15006.ssl.no_certificate").unwrap_or(0),
        0,
        "A's Envoy presented its certificate"
    );

    // A's Envoy holds its own identity and the root the API serves.
    let certs = sidecar_admin(a, "/certs").unwrap_or_default();
    assert!(
        certs.contains("spiffe://cluster.local/ns/shop/sa/default"),
        "{certs}"
    );
    let (status, _, bundle) = remora_tests::http_request(cp.api, "GET", "/v1/ca/bundle", &[], "")
        .expect("GET /v1/ca/bundle");
    assert_eq!(status, 200);
    let root = pem::parse(&bundle).expect("the bundle is PEM");
    let root_serial: String = {
        // The serial as Envoy prints it: lowercase hex without leading zero bytes.
        let (_, cert) =
            x509_parser::parse_x509_certificate(root.contents()).expect("the bundle parses");
        cert.raw_serial()
            .iter()
            .skip_while(|byte| **byte == 0)
            .map(|byte| format!("{byte:02x}"))
            .collect()
    };
    assert!(
        certs.contains(&root_serial),
        "Envoy's trust bundle is not the API's root {root_serial}: {certs}"
    );

    // The same connection, made by clusters that expect a given identity.
    for (name, identity) in [
        ("b-as-itself", B_IDENTITY),
        (
            "b-as-someone-else",
            "spiffe://cluster.local/ns/shop/sa/someone-else",
        ),
    ] {
        cp.put(
            &format!("/v1/clusters/{name}?group=a-1"),
            cluster_expecting(name, b.ip, identity),
        );
    }
    cp.put("/v1/listeners/identity-probe?group=a-1", probe_listener());
    wait_for(
        "A's Envoy in sync with the probe",
        Duration::from_secs(30),
        || cp.in_sync("a-1.shop").then_some(()),
    );
    let probe = SocketAddr::from(([127, 0, 0, 1], PROBE_PORT));
    let status = wait_for("the probe listener", Duration::from_secs(30), || {
        request_from(a, probe, "GET", "/", &[])
            .ok()
            .map(|(status, _, _)| status)
    });
    assert_eq!(status, 200, "B's own identity is accepted");
    let (status, _, body) = request_from(a, probe, "GET", "/wrong", &[]).expect("request");
    assert_eq!(status, 503, "{body}");
    assert!(
        sidecar_stat(a, "cluster.b-as-someone-else.ssl.fail_verify_san").unwrap_or(0) >= 1,
        "refused for its SAN"
    );
    wait_for("the access log line", Duration::from_secs(10), || {
        a_envoy
            .log()
            .contains("probe /wrong 503 flags=UF")
            .then_some(())
    });
}

#[test]
fn envoy_sidecars_take_renewed_certificates_without_a_failed_request() {
    let test = "envoy_sidecars_take_renewed_certificates_without_a_failed_request";
    if !prerequisites(test) {
        return;
    }
    // Certificates for 6 s: renewed every 3 s.
    let pair = MeshPair::start("mr", &["--mesh", "--workload-cert-lifetime", "6s"]);
    wait_for("a request over mTLS", Duration::from_secs(30), || {
        (call(&pair.a, VIP_B, "/", Some("b.shop")).0 == 200).then_some(())
    });
    let mut seen: BTreeSet<String> = workload_serials(&pair.a);
    assert!(!seen.is_empty(), "A's Envoy holds no workload certificate");
    let (mut requests, mut failures) = (0u32, Vec::new());
    // Requests all along, until A's Envoy has held three certificates (two renewals).
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "A's Envoy saw only {seen:?} in 40 s"
        );
        let (status, _) = call(&pair.a, VIP_B, "/", Some("b.shop"));
        requests += 1;
        if status != 200 {
            failures.push(status);
        }
        seen.extend(workload_serials(&pair.a));
    }
    assert!(
        failures.is_empty(),
        "{} of {requests} failed: {failures:?}",
        failures.len()
    );
    // B's Envoy took the TLS connections A's opened (pooled ones are kept across renewals).
    assert!(sidecar_stat(&pair.b, "listener.0.0.0.0_15006.ssl.handshake").unwrap_or(0) >= 1);
    eprintln!("{requests} requests across {} certificates", seen.len());
}

#[test]
fn sidecars_with_bootstrap_tokens_get_the_identity_their_token_proves() {
    let test = "sidecars_with_bootstrap_tokens_get_the_identity_their_token_proves";
    if !prerequisites(test) {
        return;
    }
    let pair = MeshPair::start_with_tokens(
        "ma",
        &["--mesh", "--xds-auth", "token"],
        Some(("buyer", "seller")),
    );
    let status = wait_for("a request over mTLS", Duration::from_secs(30), || {
        let (status, _) = call(&pair.a, VIP_B, "/", Some("b.shop"));
        (status == 200).then_some(status)
    });
    assert_eq!(status, 200);
    for (pod, identity) in [
        (&pair.a, "spiffe://cluster.local/ns/shop/sa/buyer"),
        (&pair.b, "spiffe://cluster.local/ns/shop/sa/seller"),
    ] {
        let certs = sidecar_admin(pod, "/certs").unwrap_or_default();
        assert!(certs.contains(identity), "{}: {certs}", pod.name);
    }
    // The proxies table shows each stream under its token's group.
    let proxies = pair.cp.proxies();
    for (node_id, group) in [("a-1.shop", "a-1"), ("b-1.shop", "b-1")] {
        assert!(
            proxies
                .iter()
                .any(|proxy| proxy["node_id"] == node_id && proxy["group"] == group),
            "{node_id} in group {group}: {proxies:?}"
        );
    }
}
