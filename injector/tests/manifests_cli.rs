//! The command line end to end: `manifests` prints exactly `deploy/remora.yaml`, whose
//! objects are valid and whose webhook configuration has the settings we rely on; and
//! `inject` reads stdin or a file like `istioctl kube-inject`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn injector() -> Command {
    Command::new(env!("CARGO_BIN_EXE_remora-injector"))
}

fn run(mut command: Command, stdin: Option<&str>) -> (bool, String, String) {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("spawning: {e}"));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn deploy_file() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/remora.yaml")
}

#[test]
fn committed_manifests_are_what_the_command_prints() {
    let mut command = injector();
    command.arg("manifests");
    let (ok, printed, stderr) = run(command, None);
    assert!(ok, "{stderr}");
    common::check_golden(&deploy_file(), &printed);
}

fn manifest_objects(text: &str) -> Vec<Value> {
    let docs = common::yaml_documents(text);
    for doc in &docs {
        if let Err(e) = common::validate_strict(doc) {
            panic!(
                "{} {} is invalid: {e}",
                doc["kind"], doc["metadata"]["name"]
            );
        }
    }
    docs
}

#[test]
fn manifests_are_valid_and_complete() {
    let text = std::fs::read_to_string(deploy_file()).unwrap_or_default();
    let docs = manifest_objects(&text);
    let kinds: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    for wanted in [
        ("Namespace", "remora-system"),
        ("Deployment", "remora-cp"),
        ("Service", "remora-cp"),
        ("Deployment", "remora-injector"),
        ("Service", "remora-injector"),
        ("ServiceAccount", "remora-cp"),
        ("ClusterRole", "remora-cp"),
        ("ClusterRoleBinding", "remora-cp"),
        ("MutatingWebhookConfiguration", "remora-sidecar-injector"),
    ] {
        assert!(kinds.contains(&wanted), "missing {wanted:?} in {kinds:?}");
    }

    let mwc = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration");
    let webhooks = mwc
        .map(|m| m["webhooks"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default();
    assert_eq!(webhooks.len(), 2);
    for w in &webhooks {
        assert_eq!(w["sideEffects"], "None");
        assert_eq!(w["admissionReviewVersions"], json!(["v1"]));
        assert_eq!(w["failurePolicy"], "Ignore");
        assert_eq!(w["timeoutSeconds"], 10);
        assert_eq!(w["reinvocationPolicy"], "IfNeeded");
        assert_eq!(w["clientConfig"]["service"]["path"], "/inject");
        assert_eq!(w["rules"][0]["resources"], json!(["pods"]));
        assert_eq!(w["rules"][0]["operations"], json!(["CREATE"]));
        let excluded = &w["namespaceSelector"]["matchExpressions"][1];
        assert_eq!(excluded["operator"], "NotIn");
        for ns in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "remora-system",
        ] {
            assert!(
                excluded["values"]
                    .as_array()
                    .is_some_and(|v| v.contains(&json!(ns))),
                "{ns}"
            );
        }
    }
    assert_eq!(
        webhooks[0]["namespaceSelector"]["matchExpressions"][0],
        json!({"key": "remora-injection", "operator": "In", "values": ["enabled"]})
    );
    assert_eq!(
        webhooks[1]["objectSelector"]["matchExpressions"][0],
        json!({"key": "sidecar.remora.io/inject", "operator": "In", "values": ["true"]})
    );

    // The injector is told the control plane's address that its Service really has.
    let injector = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "remora-injector");
    let args = injector
        .map(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap_or_default();
    let args: Vec<&str> = args
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let xds = args
        .iter()
        .position(|a| *a == "--xds-address")
        .and_then(|i| args.get(i + 1));
    assert_eq!(xds, Some(&"remora-cp.remora-system.svc:18000"));
}

#[test]
fn failure_policy_and_ca_bundle_flags() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut command = injector();
    command
        .args(["manifests", "--failure-policy", "fail", "--ca-bundle-file"])
        .arg(&ca);
    let (ok, printed, stderr) = run(command, None);
    assert!(ok, "{stderr}");
    let docs = manifest_objects(&printed);
    let mwc = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .cloned()
        .unwrap_or_default();
    assert_eq!(mwc["webhooks"][0]["failurePolicy"], "Fail");
    assert_eq!(
        mwc["webhooks"][1]["clientConfig"]["caBundle"],
        "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="
    );
}

#[test]
fn inject_reads_stdin_and_files() {
    let input = std::fs::read_to_string(common::golden_dir().join("inject/workloads.yaml"))
        .unwrap_or_default();
    let expected =
        std::fs::read_to_string(common::golden_dir().join("inject/workloads.injected.yaml"))
            .unwrap_or_default();

    let mut from_stdin = injector();
    from_stdin.args(["inject", "-f", "-"]);
    let (ok, printed, stderr) = run(from_stdin, Some(&input));
    assert!(ok, "{stderr}");
    assert_eq!(printed, expected);

    let mut from_file = injector();
    from_file
        .args(["inject", "-f"])
        .arg(common::golden_dir().join("inject/workloads.yaml"));
    let (ok, printed, stderr) = run(from_file, None);
    assert!(ok, "{stderr}");
    assert_eq!(printed, expected);

    // Flags change what is injected.
    let mut with_flags = injector();
    with_flags.args([
        "inject",
        "--proxy-image",
        "reg.example/proxy:9",
        "--xds-address",
        "cp.example:18000",
    ]);
    let (ok, printed, stderr) = run(with_flags, Some(&input));
    assert!(ok, "{stderr}");
    assert!(
        printed.contains("image: reg.example/proxy:9")
            && printed.contains("value: cp.example:18000")
    );
}

#[test]
fn inject_reports_bad_input_without_output() {
    let bad_annotation = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    traffic.remora.io/excludeInboundPorts: ssh\nspec:\n  containers:\n  - name: a\n";
    let (ok, printed, stderr) = run(
        {
            let mut c = injector();
            c.arg("inject");
            c
        },
        Some(bad_annotation),
    );
    assert!(!ok && printed.is_empty());
    assert!(
        stderr.contains("excludeInboundPorts") && stderr.contains("Pod p"),
        "{stderr}"
    );

    let (ok, _, stderr) = run(
        {
            let mut c = injector();
            c.arg("inject");
            c
        },
        Some("a: [unclosed\n"),
    );
    assert!(!ok && stderr.contains("not valid YAML"), "{stderr}");
}

#[test]
fn inject_injects_a_pod_whose_probe_it_cannot_rewrite_and_says_so_on_stderr() {
    let pod = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  template:\n    spec:\n      containers:\n      - name: a\n        readinessProbe:\n          httpGet: {path: /, port: nope}\n";
    let (ok, printed, stderr) = run(
        {
            let mut c = injector();
            c.arg("inject");
            c
        },
        Some(pod),
    );
    assert!(ok, "{stderr}");
    assert!(printed.contains("remora-proxy"), "{printed}");
    assert!(
        printed.contains("port: nope"),
        "the probe must be left as it was: {printed}"
    );
    assert!(
        stderr.contains("Deployment web: readinessProbe of container \"a\" not rewritten")
            && stderr.contains("\"nope\""),
        "{stderr}"
    );
}
