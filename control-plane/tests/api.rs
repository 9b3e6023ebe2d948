//! The config API and `remoractl` against a real `remora-cp` process: validation with field
//! paths, all-or-nothing apply, dry runs, warnings about what Remora proxies would reject,
//! groups, 404s, authentication, metrics, and refusing to expose the API without a token.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn remoractl(cp: &ControlPlane, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_remoractl"))
        .args(["--server", &format!("http://{}", cp.api)])
        .args(args)
        .env("REMORA_CP_TOKEN", TOKEN)
        .output()
        .expect("run remoractl");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn writes_are_validated_and_scoped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = ControlPlane::start(&dir.path().join("data"));

    let (status, _, _) = remora_tests::http_get(cp.api, "/v1/clusters").expect("get");
    assert_eq!(status, 401, "a token is required");

    let (status, body) = cp.call("PUT", "/v1/routes/r", &route("r", "missing"));
    assert_eq!(status, 400, "{body}");
    let problem = &body["problems"][0];
    assert_eq!(problem["resource"], "routes/r");
    assert_eq!(problem["field"], "virtual_hosts[0].routes[0].route.cluster");
    assert!(
        problem["reason"].as_str().unwrap_or("").contains("missing"),
        "{body}"
    );

    let (status, body) = cp.call(
        "PUT",
        "/v1/clusters/c",
        "name: c\nconnect_timeout: 1s\nbogus_field: 1\n",
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["problems"][0]["field"], "bogus_field", "{body}");

    let (status, body) = cp.call("PUT", "/v1/clusters/svc", &eds_cluster("svc"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["waiting"][0]["resource"], "clusters/svc",
        "an EDS cluster without endpoints waits: {body}"
    );

    // All or nothing: one bad document keeps the others out.
    let json_batch = serde_json::json!([
        {"@type": "Cluster", "name": "a", "connect_timeout": "1s"},
        {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": "bad",
         "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nope"}}]}]}
    ]);
    let (status, _, text) = remora_tests::http_request(
        cp.api,
        "POST",
        "/v1/apply",
        &[
            ("Authorization", &format!("Bearer {TOKEN}")),
            ("Content-Type", "application/json"),
        ],
        &json_batch.to_string(),
    )
    .expect("apply");
    assert_eq!(status, 400, "{text}");
    let (status, _) = cp.call("GET", "/v1/clusters/a", "");
    assert_eq!(status, 404, "nothing from a refused apply is stored");

    // Groups: a global route cannot use a group's cluster; the group's route can.
    let (status, body) = cp.call(
        "PUT",
        "/v1/clusters/team-only?group=team",
        "name: team-only\nconnect_timeout: 1s\n",
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = cp.call("PUT", "/v1/routes/r", &route("r", "team-only"));
    assert_eq!(status, 400);
    let (status, body) = cp.call("PUT", "/v1/routes/r?group=team", &route("r", "team-only"));
    assert_eq!(status, 200, "{body}");
    let (_, listed) = cp.call("GET", "/v1/routes", "");
    assert_eq!(listed["items"][0]["group"], "team");

    // A cluster in use cannot be deleted out from under its route.
    let (status, body) = cp.call("DELETE", "/v1/clusters/team-only?group=team", "");
    assert_eq!(status, 400, "{body}");
    let (status, _) = cp.call("DELETE", "/v1/clusters/never", "");
    assert_eq!(status, 404);

    let (_, _, metrics) = remora_tests::http_get(cp.api, "/metrics").expect("metrics");
    assert!(
        metrics.contains("remora_cp_connected_proxies 0"),
        "{metrics}"
    );
}

#[test]
fn remoractl_applies_gets_deletes_and_explains_failures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = ControlPlane::start(&dir.path().join("data"));
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        documents(&[
            eds_cluster("web"),
            endpoints("web", "127.0.0.1:8080".parse().expect("addr")),
            route("web", "web"),
        ]),
    )
    .expect("write");
    let (ok, output) = remoractl(&cp, &["apply", "-f", &file.display().to_string()]);
    assert!(ok, "{output}");
    assert!(
        output.contains("clusters/web") && output.contains("routes/web"),
        "{output}"
    );

    let (ok, output) = remoractl(&cp, &["get", "routes", "web"]);
    assert!(ok && output.contains("cluster: web"), "{output}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, route("web", "elsewhere")).expect("write");
    let (ok, output) = remoractl(&cp, &["apply", "-f", &bad.display().to_string()]);
    assert!(!ok, "a bad apply fails: {output}");
    assert!(
        output.contains("virtual_hosts[0].routes[0].route.cluster"),
        "{output}"
    );

    let (ok, output) = remoractl(&cp, &["delete", "listeners", "ghost"]);
    assert!(!ok && output.contains("404"), "{output}");
    let (ok, output) = remoractl(&cp, &["delete", "routes", "web"]);
    assert!(ok, "{output}");
    let (ok, output) = remoractl(&cp, &["status"]);
    assert!(ok && output.contains("no proxies"), "{output}");
}

#[test]
fn the_api_is_not_exposed_beyond_loopback_without_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_remora-cp"))
        .args([
            "--api-addr",
            "0.0.0.0:1",
            "--xds-addr",
            "127.0.0.1:1",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("REMORA_CP_TOKEN")
        .output()
        .expect("run remora-cp");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("without a bearer token"), "{stderr}");
    let _ = Duration::ZERO;
}

#[test]
fn a_dry_run_stores_nothing_and_names_what_remora_proxies_would_reject() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = ControlPlane::start(&dir.path().join("data"));
    // Valid for Envoy; a Remora proxy refuses `upstream_bind_config` (it would NACK it).
    let bound = "\"@type\": Cluster\nname: bound\nconnect_timeout: 1s\n\
        upstream_bind_config: {source_address: {address: 127.0.0.2, port_value: 0}}\n";
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, documents(&[bound.to_string(), eds_cluster("web")])).expect("write");
    let path = file.display().to_string();

    let (ok, output) = remoractl(&cp, &["apply", "--dry-run", "-f", &path]);
    assert!(ok, "{output}");
    assert!(output.contains("dry run"), "{output}");
    assert!(
        output.contains("Remora proxies would reject clusters/bound at upstream_bind_config"),
        "{output}"
    );
    assert!(output.contains("waiting: clusters/web"), "{output}");
    let (status, _) = cp.call("GET", "/v1/clusters/bound", "");
    assert_eq!(status, 404, "a dry run stores nothing");

    // The same write for real is stored (an Envoy fleet takes it) and carries the warning.
    let (ok, output) = remoractl(&cp, &["apply", "-f", &path]);
    assert!(ok, "{output}");
    assert!(
        output.contains("warning: Remora proxies would reject clusters/bound"),
        "{output}"
    );
    let (status, _) = cp.call("GET", "/v1/clusters/bound", "");
    assert_eq!(status, 200);

    // A dry run of what is refused fails like the write would.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, route("r", "nowhere")).expect("write");
    let (ok, output) = remoractl(
        &cp,
        &["apply", "--dry-run", "-f", &bad.display().to_string()],
    );
    assert!(!ok, "{output}");
    assert!(output.contains("route.cluster"), "{output}");
}
