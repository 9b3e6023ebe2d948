//! The README's "Run Remora on a Kubernetes cluster" commands, run as written with bash against
//! a real API server (`remora_tests::kube`), with `kubectl`, `remora-injector` and
//! `remora-cp` on PATH. Each block marked `<!-- checked: NAME ... -->` is run; between the
//! install and the namespace blocks the test does what the cluster's kubelet and kube-proxy
//! would: it runs the injector with the certificate from the Secret the README created, behind
//! the injector Service's ClusterIP.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use remora_tests::kube::{self, KubeCluster};
use remora_tests::process::ChildGuard;
use remora_tests::{netns, wait_for, workspace_binary};

/// The `sh` code block after each `<!-- checked: NAME ... -->` line of the README.
fn checked_blocks() -> Vec<(String, String)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("<!-- checked: ") else {
            continue;
        };
        let name = rest.split_whitespace().next().unwrap().to_string();
        assert_eq!(
            lines.next(),
            Some("```sh"),
            "block {name} is not an sh block"
        );
        let body: Vec<&str> = lines.by_ref().take_while(|line| *line != "```").collect();
        blocks.push((name, body.join("\n")));
    }
    blocks
}

/// Runs `script` with bash in `dir` as the README's reader would; returns stdout.
fn run_block(cluster: &KubeCluster, dir: &Path, name: &str, script: &str) -> String {
    let bin = dir.join("bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("KUBECONFIG", cluster.admin_kubeconfig())
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "README block {name} failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn readme_kubernetes_commands_install_remora_and_inject_a_pod() {
    const TEST: &str = "readme_kubernetes_commands_install_remora_and_inject_a_pod";
    if !remora_tests::on_path("openssl") {
        remora_tests::skip(TEST, "openssl is not on PATH (apt-get install openssl)");
        return;
    }
    let Some(cluster) = kube::start_or_skip(TEST) else {
        return;
    };
    let blocks = checked_blocks();
    let names: Vec<&str> = blocks.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["install", "namespace", "policy"], "README blocks");
    let block = |wanted: &str| {
        blocks
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, body)| body.clone())
            .unwrap()
    };

    let work = tempfile::tempdir().unwrap();
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, target) in [
        ("kubectl", kube::kubectl_path()),
        ("remora-injector", workspace_binary("remora-injector")),
        ("remora-cp", workspace_binary("remora-cp")),
    ] {
        std::os::unix::fs::symlink(target, bin.join(name)).unwrap();
    }

    run_block(&cluster, work.path(), "install", &block("install"));

    // The kubelet's part: the injector Deployment's pod, with the Secret mounted.
    let tls = work.path().join("mounted");
    std::fs::create_dir_all(&tls).unwrap();
    for file in ["tls.crt", "tls.key"] {
        let encoded = cluster.kubectl_ok(&[
            "-n",
            "remora-system",
            "get",
            "secret",
            "remora-injector-tls",
            "-o",
            &format!("jsonpath={{.data.{}}}", file.replace('.', "\\.")),
        ]);
        let decoded = Command::new("base64")
            .arg("--decode")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                std::io::Write::write_all(&mut child.stdin.take().unwrap(), encoded.as_bytes())?;
                child.wait_with_output()
            })
            .expect("base64 --decode");
        std::fs::write(tls.join(file), decoded.stdout).unwrap();
    }
    let mut command = cluster.node_command(workspace_binary("remora-injector"));
    command
        .args(["serve", "--listen", "127.0.0.1:9443", "--tls-cert"])
        .arg(tls.join("tls.crt"))
        .arg("--tls-key")
        .arg(tls.join("tls.key"));
    let _injector = ChildGuard::spawn("remora-injector", command);
    let netns_name = cluster.netns().to_string();
    wait_for("the injector to listen", Duration::from_secs(30), || {
        netns::in_namespace(&netns_name, || {
            TcpStream::connect_timeout(&"127.0.0.1:9443".parse().unwrap(), Duration::from_secs(1))
                .ok()
                .map(|_| ())
        })
    });
    // kube-proxy's part: the Service's ClusterIP leads to it.
    cluster.route_service(
        "remora-system",
        "remora-injector",
        443,
        "127.0.0.1:9443".parse().unwrap(),
    );

    let output = run_block(&cluster, work.path(), "namespace", &block("namespace"));
    // The last command prints the stored pod's init containers.
    assert_eq!(
        output.lines().last(),
        Some("remora-init remora-proxy"),
        "{output}"
    );

    // The TrafficPolicy CRD comes from `remora-cp manifests`; until the control plane has that
    // command the policy block cannot run, and says so.
    let has_crd_command = Command::new(workspace_binary("remora-cp"))
        .arg("manifests")
        .output()
        .is_ok_and(|out| out.status.success());
    if has_crd_command {
        let listed = run_block(&cluster, work.path(), "policy", &block("policy"));
        assert!(listed.contains("checkout"), "{listed}");
    } else {
        eprintln!("README block policy not run: this remora-cp has no `manifests` command yet");
    }
}
