//! The mesh CA of a real `remora-cp` process: the trust bundle at `GET /v1/ca/bundle`, a root
//! generated once and kept across restarts, a root from `--ca-cert`/`--ca-key`, and a clear
//! refusal to start with a key that does not fit the certificate.

mod common;

use std::process::Command;

use common::*;
use remora_tests::{free_port, http_request};

/// The bundle as the API serves it (status must be 200).
fn bundle(cp: &ControlPlane) -> String {
    let auth = format!("Bearer {TOKEN}");
    let (status, headers, body) = http_request(
        cp.api,
        "GET",
        "/v1/ca/bundle",
        &[("Authorization", auth.as_str())],
        "",
    )
    .expect("GET /v1/ca/bundle");
    assert_eq!(status, 200, "{body}");
    assert!(
        format!("{headers:?}").contains("application/x-pem-file"),
        "{headers:?}"
    );
    body
}

#[test]
fn a_generated_root_is_served_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let first = {
        let cp = ControlPlane::start(&data);
        let (status, _, _) = remora_tests::http_get(cp.api, "/v1/ca/bundle").expect("get");
        assert_eq!(
            status, 401,
            "the bundle is behind the API token like all of /v1"
        );
        bundle(&cp)
    };
    assert!(first.starts_with("-----BEGIN CERTIFICATE-----"), "{first}");
    assert_eq!(first.matches("BEGIN CERTIFICATE").count(), 1);
    let cp = ControlPlane::start(&data);
    assert_eq!(bundle(&cp), first, "the stored root is reused");
}

#[test]
fn a_root_from_files_is_the_bundle_and_a_foreign_key_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = remora_control_plane::ca::generate_root("example.org").expect("a root");
    let cert_path = dir.path().join("ca.crt");
    let key_path = dir.path().join("ca.key");
    std::fs::write(&cert_path, &cert).expect("write");
    std::fs::write(&key_path, &key).expect("write");
    let data = dir.path().join("data");
    let cp = ControlPlane::start_with(
        free_port(),
        free_port(),
        &[
            "--data-dir",
            &data.display().to_string(),
            "--trust-domain",
            "example.org",
            "--ca-cert",
            &cert_path.display().to_string(),
            "--ca-key",
            &key_path.display().to_string(),
        ],
    );
    assert_eq!(
        pem::parse(bundle(&cp)).expect("pem").contents(),
        pem::parse(&cert).expect("pem").contents()
    );
    drop(cp);

    let (_, other_key) = remora_control_plane::ca::generate_root("example.org").expect("root");
    std::fs::write(&key_path, other_key).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_remora-cp"))
        .args(["--xds-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&data)
        .arg("--ca-cert")
        .arg(&cert_path)
        .arg("--ca-key")
        .arg(&key_path)
        .output()
        .expect("run remora-cp");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not belong to the CA certificate") && stderr.contains("ca.key"),
        "{stderr}"
    );
    // --ca-cert alone is a usage error.
    let output = Command::new(env!("CARGO_BIN_EXE_remora-cp"))
        .arg("--ca-cert")
        .arg(&cert_path)
        .output()
        .expect("run remora-cp");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--ca-key"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn replicas_on_one_etcd_share_one_root() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let endpoint = etcd.endpoint.clone();
    // Two replicas starting at once, each finding no root: one root is stored, both use it.
    let starts: Vec<_> = (0..2)
        .map(|_| {
            let endpoint = endpoint.clone();
            std::thread::spawn(move || {
                ControlPlane::start_with(
                    free_port(),
                    free_port(),
                    &["--store", "etcd", "--etcd-endpoints", &endpoint],
                )
            })
        })
        .collect();
    let replicas: Vec<ControlPlane> = starts
        .into_iter()
        .map(|start| start.join().expect("a replica started"))
        .collect();
    let first = bundle(&replicas[0]);
    assert_eq!(bundle(&replicas[1]), first);
    drop(replicas);
    let later = ControlPlane::start_with(
        free_port(),
        free_port(),
        &["--store", "etcd", "--etcd-endpoints", &endpoint],
    );
    assert_eq!(bundle(&later), first);
    drop(etcd);
}
