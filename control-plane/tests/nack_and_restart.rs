//! Against a real Envoy: a config our validator accepts but Envoy rejects is recorded as a NACK
//! (API and `remoractl status`) while Envoy keeps serving the previous config and the rejected
//! version is not resent; a restarted remora-cp is rejoined by Envoy with no version going back.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use remora_tests::echo::EchoServer;
use remora_tests::envoy::Envoy;
use remora_tests::{free_port, wait_for};

/// A route whose regex Rust's `regex` accepts but RE2, and so Envoy, rejects: RE2 has no
/// `x` (verbose) flag.
fn re2_incompatible_route(cluster: &str) -> String {
    format!(
        r#"
"@type": RouteConfiguration
name: local_route
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {{safe_regex: {{regex: '(?x)/x'}}}}
    route: {{cluster: {cluster}}}
  - match: {{prefix: "/"}}
    route: {{cluster: {cluster}}}
"#
    )
}

struct Setup {
    _alpha: EchoServer,
    _beta: EchoServer,
    dir: tempfile::TempDir,
    ingress: SocketAddr,
    listener_port: u16,
}

fn setup() -> Setup {
    let alpha = EchoServer::start("alpha", "127.0.0.1");
    let beta = EchoServer::start("beta", "127.0.0.1");
    let listener_port = free_port();
    Setup {
        ingress: ([127, 0, 0, 1], listener_port).into(),
        listener_port,
        dir: tempfile::tempdir().expect("temp dir"),
        _alpha: alpha,
        _beta: beta,
    }
}

fn base_config(setup: &Setup) -> String {
    documents(&[
        eds_cluster("alpha"),
        endpoints("alpha", setup._alpha.addr),
        eds_cluster("beta"),
        endpoints("beta", setup._beta.addr),
        route("local_route", "alpha"),
        listener("ingress", setup.listener_port, "local_route"),
    ])
}

#[test]
fn envoy_rejection_is_recorded_and_the_previous_config_keeps_serving() {
    if !envoy_or_skip() {
        return;
    }
    let setup = setup();
    let cp = ControlPlane::start(&setup.dir.path().join("data"));
    cp.apply(&base_config(&setup));
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(
        setup.dir.path(),
        "envoy-nack",
        "edge",
        cp.xds,
        admin,
        "GRPC",
    );
    let _envoy = Envoy::start(&bootstrap, admin, &[]);
    wait_for_upstream(setup.ingress, "alpha");

    let bad_version = cp.put("routes", "local_route", &re2_incompatible_route("beta"));
    let proxy = wait_for(
        "Envoy to NACK the RE2-incompatible route",
        Duration::from_secs(30),
        || {
            let proxy = cp.proxy("envoy-nack")?;
            let nack = &proxy["types"]["RDS"]["last_nack"];
            (nack["version"].as_str() == Some(bad_version.to_string().as_str())).then_some(proxy)
        },
    );
    let message = proxy["types"]["RDS"]["last_nack"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(
        !message.is_empty(),
        "the NACK carries Envoy's message: {proxy}"
    );
    assert_ne!(
        proxy["types"]["RDS"]["acked_version"],
        bad_version.to_string()
    );
    for _ in 0..5 {
        assert_eq!(
            upstream_behind(setup.ingress).as_deref(),
            Some("alpha"),
            "Envoy keeps the previous route"
        );
    }

    let status = Command::new(env!("CARGO_BIN_EXE_remoractl"))
        .args(["--server", &format!("http://{}", cp.api), "status"])
        .env("REMORA_CP_TOKEN", TOKEN)
        .output()
        .expect("run remoractl");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        text.contains(&format!("NACK envoy-nack RDS version {bad_version}")),
        "{text}"
    );
    assert!(text.contains("envoy-nack"), "{text}");

    // The next good version goes out and is ACKed; the rejected one was never resent.
    let good_version = cp.put("routes", "local_route", &route("local_route", "beta"));
    wait_for_upstream(setup.ingress, "beta");
    cp.wait_for_ack("envoy-nack", "RDS", good_version);
    let (_, _, metrics) = remora_tests::http_get(cp.api, "/metrics").expect("metrics");
    assert!(metrics.contains("remora_cp_nacks_total 1\n"), "{metrics}");
}

#[test]
fn envoy_rejoins_a_restarted_control_plane_without_going_back() {
    if !envoy_or_skip() {
        return;
    }
    let setup = setup();
    let data = setup.dir.path().join("data").display().to_string();
    let (xds_port, api_port) = (free_port(), free_port());
    let mut cp = ControlPlane::start_with(xds_port, api_port, &["--data-dir", &data]);
    let version = cp.apply(&base_config(&setup));
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(
        setup.dir.path(),
        "envoy-restart",
        "edge",
        cp.xds,
        admin,
        "GRPC",
    );
    let _envoy = Envoy::start(&bootstrap, admin, &[]);
    wait_for_upstream(setup.ingress, "alpha");
    cp.wait_for_ack("envoy-restart", "RDS", version);

    cp.process.kill();
    drop(cp);
    assert_eq!(
        upstream_behind(setup.ingress).as_deref(),
        Some("alpha"),
        "Envoy keeps its config while the control plane is down"
    );
    let cp = ControlPlane::start_with(xds_port, api_port, &["--data-dir", &data]);
    // Every type ACKed once on the new stream (RDS comes last, after LDS), whatever version:
    // the assertions below say which.
    let proxy = wait_for("Envoy to reconnect", Duration::from_secs(60), || {
        let proxy = cp.proxy("envoy-restart")?;
        ["CDS", "EDS", "LDS", "RDS"]
            .iter()
            .all(|xds| proxy["types"][xds]["acked_version"].is_string())
            .then_some(proxy)
    });
    for xds in ["CDS", "EDS", "LDS", "RDS"] {
        let acked: u64 = proxy["types"][xds]["acked_version"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            acked >= version,
            "{xds} went back to {acked} from {version}: {proxy}"
        );
    }
    assert_eq!(upstream_behind(setup.ingress).as_deref(), Some("alpha"));
    let next = cp.put("routes", "local_route", &route("local_route", "beta"));
    assert!(
        next > version,
        "version {next} after restart is not above {version}"
    );
    wait_for_upstream(setup.ingress, "beta");
}
