//! Certificate checks beyond a trusted CA and SANs, each run under Remora and under Envoy with
//! the same bootstrap: CRLs (the whole chain or only the leaf; inline, and rotated by file
//! SDS) and pins on a certificate or on its key, on both ends of a connection. The two proxies
//! must let the same handshakes through and count the refused ones alike in `ssl.*`.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/pki.rs"]
mod pki;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pki::*;
use remora_tests::echo::EchoServer;
use remora_tests::{envoy, free_port, http_get, wait_for};

/// The `ssl.*` counters compared between the proxies.
const SSL_COUNTERS: [&str; 6] = [
    "handshake",
    "connection_error",
    "fail_verify_error",
    "fail_verify_san",
    "fail_verify_cert_hash",
    "fail_verify_no_cert",
];

/// The first certificate of a PEM chain, in DER.
fn leaf_der(leaf: &Leaf) -> Vec<u8> {
    rustls_pemfile::certs(&mut leaf.certificate.as_bytes())
        .next()
        .expect("a certificate")
        .expect("pem")
        .to_vec()
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// `verify_certificate_spki`'s form: the base64 SHA-256 of the key, as HPKP writes it.
fn spki_pin(leaf: &Leaf) -> String {
    use base64::Engine;
    let der = leaf_der(leaf);
    let (_, certificate) = x509_parser::parse_x509_certificate(&der).expect("x509");
    base64::engine::general_purpose::STANDARD.encode(sha256(certificate.public_key().raw))
}

/// `verify_certificate_hash`'s form: the SHA-256 of the certificate, as `openssl x509
/// -fingerprint -sha256` prints it (`fingerprint`) or in lowercase hex.
fn hash_pin(leaf: &Leaf, fingerprint: bool) -> String {
    let bytes = sha256(&leaf_der(leaf));
    if fingerprint {
        let pairs: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        pairs.join(":")
    } else {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The two files of a leaf.
fn files(dir: &std::path::Path, stem: &str, leaf: &Leaf) -> (String, String) {
    (
        write(dir, &format!("{stem}.pem"), &leaf.certificate),
        write(dir, &format!("{stem}.key"), &leaf.key),
    )
}

/// One request on a new connection presenting `leaf` as the client certificate and trusting
/// `ca` for the server (`server.mesh.test`): the status, or `None` if the handshake (or the
/// request after it: TLS 1.3 servers refuse a client certificate after the client is done)
/// failed.
fn mtls_get(addr: SocketAddr, ca: &str, leaf: &Leaf) -> Option<u16> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pemfile::certs(&mut ca.as_bytes()) {
        roots.add(certificate.expect("pem")).expect("ca");
    }
    let chain: Vec<_> = rustls_pemfile::certs(&mut leaf.certificate.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain");
    let key = rustls_pemfile::private_key(&mut leaf.key.as_bytes())
        .expect("key pem")
        .expect("a key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    config.resumption = rustls::client::Resumption::disabled();
    tls_get(addr, Arc::new(config)).map(|(status, _)| status)
}

/// The `ssl.*` counters of `prefix` (`listener.ADDR` or `cluster.NAME`) once `failed`
/// handshakes have been counted as failing verification.
fn ssl_counts(running: &Running, prefix: &str, failed: u64) -> BTreeMap<&'static str, u64> {
    let stat = |name: &str| running.stat(&format!("{prefix}.ssl.{name}")).unwrap_or(0);
    wait_for(
        &format!("{prefix}: {failed} verification failures counted"),
        Duration::from_secs(10),
        || {
            let counted = stat("fail_verify_error")
                + stat("fail_verify_san")
                + stat("fail_verify_cert_hash")
                + stat("fail_verify_no_cert");
            (counted >= failed).then_some(())
        },
    );
    SSL_COUNTERS
        .iter()
        .map(|name| (*name, stat(name)))
        .collect()
}

/// What one proxy did in a scenario: the status of each request (`None`: refused) and the
/// `ssl.*` counters of each TLS context, by name.
type Outcome = BTreeMap<String, (Vec<Option<u16>>, BTreeMap<&'static str, u64>)>;

/// Runs `scenario` under Remora, then under Envoy when it is installed; the two must agree.
/// Returns Remora's outcome.
fn on_both(what: &str, scenario: impl Fn(bool) -> Outcome) -> Outcome {
    let remora = scenario(true);
    if envoy::available_or_skip(what) {
        let envoy = scenario(false);
        for (context, (statuses, counts)) in &remora {
            let (envoy_statuses, envoy_counts) = &envoy[context];
            assert_eq!(
                statuses, envoy_statuses,
                "{what}, {context}: requests let through (Remora, Envoy)"
            );
            assert_eq!(
                counts, envoy_counts,
                "{what}, {context}: ssl.* counters (Remora, Envoy)"
            );
        }
    }
    remora
}

const OK: Option<u16> = Some(200);
const REFUSED: Option<u16> = None;

/// A proxy terminating mTLS checks client certificates against CRLs and pins: a leaf of the
/// root and one of an intermediate, each also revoked, are presented to listeners checking
/// the whole chain (with both CAs' CRLs, and with only the intermediate's), only the leaf, the
/// key's SPKI, the certificate's hash, a hash alone without a CA, and deprecated SAN matchers
/// alone and beside typed ones (which put them out of force).
#[test]
fn client_certificates_checked_by_crls_and_pins_as_envoy_checks_them() {
    let dir = tempfile::tempdir().expect("dir");
    let root = Ca::new();
    let intermediate = root.intermediate("intermediate", 50);
    let ca = write(dir.path(), "ca.pem", &root.pem());
    let server = files(dir.path(), "server", &root.server(1));
    let clients = [
        root.workload("frontend", "client", 2),
        root.workload("frontend", "client", 3),
        intermediate.workload("frontend", "client", 5),
        intermediate.workload("frontend", "client", 6),
    ];
    let both_crls = write(
        dir.path(),
        "both-crls.pem",
        &format!("{}{}", root.crl(&[3]), intermediate.crl(&[6])),
    );
    let intermediate_crl = write(dir.path(), "intermediate-crl.pem", &intermediate.crl(&[6]));
    let good = &clients[0];
    // Each listener: its name, its validation context, what each client gets.
    let listeners = [
        (
            "whole_chain",
            format!("{{trusted_ca: {{filename: \"{ca}\"}}, crl: {{filename: \"{both_crls}\"}}}}"),
            [OK, REFUSED, OK, REFUSED],
        ),
        (
            // No CRL from the root: its own leaves fail, and so does the intermediate.
            "whole_chain_without_roots_crl",
            format!(
                "{{trusted_ca: {{filename: \"{ca}\"}}, crl: {{filename: \"{intermediate_crl}\"}}}}"
            ),
            [REFUSED; 4],
        ),
        (
            // Only the leaf: the intermediate's leaves pass, the root's still have no CRL.
            "leaf_only",
            format!(
                "{{trusted_ca: {{filename: \"{ca}\"}}, crl: {{filename: \"{intermediate_crl}\"}}, only_verify_leaf_cert_crl: true}}"
            ),
            [REFUSED, REFUSED, OK, REFUSED],
        ),
        (
            "spki_pin",
            format!(
                "{{trusted_ca: {{filename: \"{ca}\"}}, verify_certificate_spki: [\"{}\"]}}",
                spki_pin(good)
            ),
            [OK, REFUSED, REFUSED, REFUSED],
        ),
        (
            "hash_pin",
            format!(
                "{{trusted_ca: {{filename: \"{ca}\"}}, verify_certificate_hash: [\"{}\"]}}",
                hash_pin(good, true)
            ),
            [OK, REFUSED, REFUSED, REFUSED],
        ),
        (
            "hash_pin_without_ca",
            format!(
                "{{verify_certificate_hash: [\"{}\"]}}",
                hash_pin(good, false)
            ),
            [OK, REFUSED, REFUSED, REFUSED],
        ),
        (
            // The deprecated matchers alone are in force...
            "legacy_san_matchers",
            format!(
                "{{trusted_ca: {{filename: \"{ca}\"}}, match_subject_alt_names: [{{prefix: \"spiffe://\"}}]}}"
            ),
            [OK; 4],
        ),
        (
            // ...and out of force beside typed ones, which Envoy checks alone.
            "typed_san_matchers_over_legacy",
            format!(
                "{{trusted_ca: {{filename: \"{ca}\"}}, match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"spiffe://nobody\"}}}}], match_subject_alt_names: [{{prefix: \"spiffe://\"}}]}}"
            ),
            [REFUSED; 4],
        ),
    ];
    let app = EchoServer::start("app", "127.0.0.1");
    let outcome = on_both("CRLs and pins on client certificates", |remora| {
        let (admin, admin_yaml) = admin_block();
        let ports: Vec<u16> = listeners.iter().map(|_| free_port()).collect();
        let yaml = bootstrap(
            &admin_yaml,
            &listeners
                .iter()
                .zip(&ports)
                .map(|((name, validation, _), port)| {
                    mtls_listener_checking(
                        name,
                        *port,
                        &server,
                        &format!("validation_context: {validation}"),
                    )
                })
                .collect::<Vec<_>>(),
            &[static_cluster("app", &[app.addr])],
        );
        let running = run(remora, &yaml, admin);
        let mut outcome = Outcome::new();
        for ((name, _, want), port) in listeners.iter().zip(&ports) {
            let statuses: Vec<Option<u16>> = clients
                .iter()
                .map(|client| mtls_get(loopback(*port), &root.pem(), client))
                .collect();
            let refused = want.iter().filter(|status| status.is_none()).count() as u64;
            let prefix = format!("listener.127.0.0.1_{port}");
            let counts = ssl_counts(&running, &prefix, refused);
            outcome.insert(name.to_string(), (statuses, counts));
        }
        outcome
    });
    for (name, _, want) in &listeners {
        let (statuses, counts) = &outcome[*name];
        assert_eq!(statuses, want, "{name}");
        let refused = want.iter().filter(|status| status.is_none()).count() as u64;
        let counter = if name.contains("pin") {
            "fail_verify_cert_hash"
        } else if name.contains("san") {
            "fail_verify_san"
        } else {
            "fail_verify_error"
        };
        assert_eq!(counts[counter], refused, "{name}: {counts:?}");
    }
}

/// A proxy originating TLS checks server certificates against CRLs and pins: each cluster
/// reaches a server presenting a good, a revoked or an intermediate's certificate.
#[test]
fn server_certificates_checked_by_crls_and_pins_as_envoy_checks_them() {
    let dir = tempfile::tempdir().expect("dir");
    let root = Ca::new();
    let intermediate = root.intermediate("intermediate", 50);
    let ca = write(dir.path(), "ca.pem", &root.pem());
    let app = EchoServer::start("app", "127.0.0.1");
    let good = root.server(20);
    let revoked = root.server(21);
    let by_intermediate = intermediate.server(22);
    let front = |stem: &str, leaf: &Leaf| {
        let (cert, key) = files(dir.path(), stem, leaf);
        ads::TlsFront::start(app.addr, cert.as_ref(), key.as_ref())
    };
    let (good_front, revoked_front, intermediate_front) = (
        front("good", &good),
        front("revoked", &revoked),
        front("intermediate", &by_intermediate),
    );
    let both_crls = write(
        dir.path(),
        "both-crls.pem",
        &format!("{}{}", root.crl(&[21]), intermediate.crl(&[])),
    );
    let intermediate_crl = write(dir.path(), "intermediate-crl.pem", &intermediate.crl(&[]));
    let whole_chain =
        format!("{{trusted_ca: {{filename: \"{ca}\"}}, crl: {{filename: \"{both_crls}\"}}}}");
    let intermediate_only = |leaf_only: bool| {
        format!(
            "{{trusted_ca: {{filename: \"{ca}\"}}, crl: {{filename: \"{intermediate_crl}\"}}, only_verify_leaf_cert_crl: {leaf_only}}}"
        )
    };
    let spki = format!(
        "{{trusted_ca: {{filename: \"{ca}\"}}, verify_certificate_spki: [\"{}\"]}}",
        spki_pin(&good)
    );
    let hash = format!(
        "{{trusted_ca: {{filename: \"{ca}\"}}, verify_certificate_hash: [\"{}\"]}}",
        hash_pin(&good, false)
    );
    // Each cluster: its name, the server it reaches, its validation context, the status.
    let clusters = [
        ("crl_good", good_front.addr, whole_chain.clone(), 200),
        ("crl_revoked", revoked_front.addr, whole_chain, 503),
        (
            "crl_leaf_only",
            intermediate_front.addr,
            intermediate_only(true),
            200,
        ),
        (
            "crl_whole_chain_without_roots_crl",
            intermediate_front.addr,
            intermediate_only(false),
            503,
        ),
        ("spki_match", good_front.addr, spki.clone(), 200),
        ("spki_mismatch", intermediate_front.addr, spki, 503),
        ("hash_match", good_front.addr, hash.clone(), 200),
        ("hash_mismatch", revoked_front.addr, hash, 503),
    ];
    let outcome = on_both("CRLs and pins on server certificates", |remora| {
        let (admin, admin_yaml) = admin_block();
        let port = free_port();
        let routes: String = clusters
            .iter()
            .map(|(name, ..)| {
                format!(
                    "              - match: {{prefix: \"/{name}\"}}\n                route: {{cluster: {name}}}\n"
                )
            })
            .collect();
        let yaml = bootstrap(
            &admin_yaml,
            &[http_listener(
                "outbound",
                port,
                "",
                &format!(
                    "            - name: all\n              domains: [\"*\"]\n              routes:\n{routes}"
                ),
            )],
            &clusters
                .iter()
                .map(|(name, target, validation, _)| {
                    tls_cluster_checking(name, *target, None, validation)
                })
                .collect::<Vec<_>>(),
        );
        let running = run(remora, &yaml, admin);
        let mut outcome = Outcome::new();
        for (name, _, _, want) in &clusters {
            let (status, _, _) = http_get(loopback(port), &format!("/{name}")).expect("request");
            let refused = u64::from(*want != 200);
            let counts = ssl_counts(&running, &format!("cluster.{name}"), refused);
            outcome.insert(name.to_string(), (vec![Some(status)], counts));
        }
        outcome
    });
    for (name, _, _, want) in &clusters {
        let (statuses, counts) = &outcome[*name];
        assert_eq!(statuses, &[Some(*want)], "{name}");
        let counter = if name.contains("crl") {
            "fail_verify_error"
        } else {
            "fail_verify_cert_hash"
        };
        assert_eq!(
            counts[counter],
            u64::from(*want != 200),
            "{name}: {counts:?}"
        );
    }
}

/// A validation context secret from a watched file carries a CRL; a new version of the file
/// revoking the client's certificate refuses the next handshake.
#[test]
fn a_crl_rotated_by_file_sds_refuses_the_next_handshake() {
    let dir = tempfile::tempdir().expect("dir");
    let root = Ca::new();
    let server = files(dir.path(), "server", &root.server(1));
    let client = root.workload("frontend", "client", 2);
    let secret = |revoked: &[u64]| {
        format!(
            "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  name: trust\n  validation_context:\n    trusted_ca: {{inline_string: {}}}\n    crl: {{inline_string: {}}}\n",
            quoted(&root.pem()),
            quoted(&root.crl(revoked)),
        )
    };
    let app = EchoServer::start("app", "127.0.0.1");
    on_both("a CRL rotated by file SDS", |remora| {
        let secret_path = dir.path().join(format!("trust-{remora}.yaml"));
        std::fs::write(&secret_path, secret(&[])).expect("write");
        let (admin, admin_yaml) = admin_block();
        let port = free_port();
        // Envoy needs a node to use SDS, files included.
        let yaml = bootstrap(
            &format!("node: {{id: crl-rotation, cluster: test}}\n{admin_yaml}"),
            &[mtls_listener_checking(
                "inbound",
                port,
                &server,
                &format!(
                    "validation_context_sds_secret_config: {{name: trust, sds_config: {{path_config_source: {{path: \"{}\"}}}}}}",
                    secret_path.display()
                ),
            )],
            &[static_cluster("app", &[app.addr])],
        );
        let running = run(remora, &yaml, admin);
        let addr = loopback(port);
        let first = wait_for("the secret in force", Duration::from_secs(10), || {
            mtls_get(addr, &root.pem(), &client).map(Some)
        });
        // Replaced in one step, as a Kubernetes secret volume does.
        let aside = secret_path.with_extension("next");
        std::fs::write(&aside, secret(&[2])).expect("write");
        std::fs::rename(&aside, &secret_path).expect("rename");
        wait_for("the new CRL in force", Duration::from_secs(20), || {
            mtls_get(addr, &root.pem(), &client).is_none().then_some(())
        });
        let after = mtls_get(addr, &root.pem(), &client);
        let revoked = running
            .stat(&format!("listener.127.0.0.1_{port}.ssl.fail_verify_error"))
            .is_some_and(|count| count >= 1);
        BTreeMap::from([(
            "inbound".to_string(),
            (
                vec![first, after],
                BTreeMap::from([("revoked counted", u64::from(revoked))]),
            ),
        )])
    });
}
