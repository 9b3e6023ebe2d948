//! The container images (`deploy/images/build.sh`, buildah, no registry): each is built from
//! this workspace's binaries, saved as a docker-archive, unpacked, and run as a container
//! runtime would run it, in a chroot as the image's user with the image's PATH: every
//! entrypoint answers `--version`, the tags and users are the ones the manifests name, and the
//! init image's `remora-init`, run with the arguments the injector gives it, installs the
//! capture rules in a network namespace with the image's own iptables.

use std::path::{Path, PathBuf};
use std::process::Command;

use remora_tests::netns::{self, missing_prerequisite};
use remora_tests::workspace_binary;
use serde_json::Value;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// An image saved by the build, unpacked: its config and its root filesystem.
struct Unpacked {
    repo_tags: Vec<String>,
    config: Value,
    rootfs: PathBuf,
}

impl Unpacked {
    fn open(archive: &Path, into: &Path) -> Unpacked {
        let raw = into.join("archive");
        let rootfs = into.join("rootfs");
        std::fs::create_dir_all(&raw).unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        netns::run(&[
            "tar",
            "-xf",
            archive.to_str().unwrap(),
            "-C",
            raw.to_str().unwrap(),
        ]);
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(raw.join("manifest.json")).unwrap())
                .unwrap();
        let manifest = &manifest[0];
        for layer in manifest["Layers"].as_array().expect("layers") {
            let layer = raw.join(layer.as_str().unwrap());
            netns::run(&[
                "tar",
                "-xf",
                layer.to_str().unwrap(),
                "-C",
                rootfs.to_str().unwrap(),
            ]);
        }
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(raw.join(manifest["Config"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        // What a container runtime provides: /dev/null (programs open it for their children).
        std::fs::create_dir_all(rootfs.join("dev")).unwrap();
        netns::run(&[
            "mknod",
            "-m",
            "666",
            rootfs.join("dev/null").to_str().unwrap(),
            "c",
            "1",
            "3",
        ]);
        Unpacked {
            repo_tags: manifest["RepoTags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|tag| tag.as_str().unwrap().to_string())
                .collect(),
            config: config["config"].clone(),
            rootfs,
        }
    }

    fn user(&self) -> &str {
        self.config["User"].as_str().unwrap_or("")
    }

    fn path_env(&self) -> String {
        self.config["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find_map(|var| var.strip_prefix("PATH="))
            .expect("the image sets PATH")
            .to_string()
    }

    fn entrypoint(&self) -> Vec<String> {
        self.config["Entrypoint"]
            .as_array()
            .expect("an entrypoint")
            .iter()
            .map(|part| part.as_str().unwrap().to_string())
            .collect()
    }

    /// Runs `command` inside the image as its user, with only the image's PATH, optionally in
    /// network namespace `netns`; returns (success, stdout + stderr).
    fn run(&self, command: &[String], netns: Option<&str>) -> (bool, String) {
        let mut process = match netns {
            Some(ns) => {
                let mut process = Command::new("ip");
                process.args(["netns", "exec", ns, "chroot"]);
                process
            }
            None => Command::new("chroot"),
        };
        process
            .arg(format!("--userspec={}", self.user()))
            .arg(&self.rootfs)
            .args(command)
            .env_clear()
            .env("PATH", self.path_env());
        let out = process.output().expect("run chroot");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Whether `program` resolves through the image's PATH to an executable in the image.
    fn resolves(&self, program: &str) -> bool {
        self.path_env().split(':').any(|dir| {
            let candidate = self.rootfs.join(dir.trim_start_matches('/')).join(program);
            std::fs::metadata(candidate).is_ok_and(|meta| meta.is_file())
        })
    }
}

fn deployment_container(manifests: &[Value], name: &str) -> Value {
    manifests
        .iter()
        .find(|doc| doc["kind"] == "Deployment" && doc["metadata"]["name"] == name)
        .map(|doc| doc["spec"]["template"]["spec"]["containers"][0].clone())
        .unwrap_or_else(|| panic!("no Deployment {name}"))
}

/// `remora/proxy:latest` → `docker.io/remora/proxy:latest`, as a cluster resolves it.
fn qualified(image: &str) -> String {
    format!("docker.io/{image}")
}

#[test]
fn images_hold_runnable_binaries_with_the_tags_users_and_entrypoints_the_manifests_expect() {
    const TEST: &str =
        "images_hold_runnable_binaries_with_the_tags_users_and_entrypoints_the_manifests_expect";
    if let Some(reason) = missing_prerequisite(&["ip", "iptables", "chroot", "tar", "mknod"]) {
        remora_tests::skip(TEST, &reason);
        return;
    }
    if !remora_tests::on_path("buildah") {
        remora_tests::skip(TEST, "buildah is not on PATH (apt-get install buildah)");
        return;
    }
    let bin_dir = workspace_binary("remora-proxy")
        .parent()
        .unwrap()
        .to_path_buf();
    for binary in ["remora-init", "remora-cp", "remoractl", "remora-injector"] {
        workspace_binary(binary);
    }
    let work = tempfile::tempdir().unwrap();
    let archives = work.path().join("archives");
    let out = Command::new("bash")
        .arg(repo_file("deploy/images/build.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--context")
        .arg(work.path().join("context"))
        .arg("--storage")
        .arg(work.path().join("storage"))
        .arg("--archive-dir")
        .arg(&archives)
        .output()
        .expect("run deploy/images/build.sh");
    assert!(
        out.status.success(),
        "build.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let manifests = xds_api::json::parse_yaml_documents(
        &std::fs::read_to_string(repo_file("deploy/remora.yaml")).unwrap(),
    )
    .expect("deploy/remora.yaml");
    let control_plane = deployment_container(&manifests, "remora-cp");
    let injector = deployment_container(&manifests, "remora-injector");
    let injector_args: Vec<&str> = injector["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| arg.as_str().unwrap())
        .collect();
    let flag = |name: &str| {
        let at = injector_args.iter().position(|arg| *arg == name).unwrap();
        injector_args[at + 1].to_string()
    };
    let unpack = |image: &str| {
        Unpacked::open(
            &archives.join(format!("{image}.tar")),
            &work.path().join("unpacked").join(image),
        )
    };
    let uid_of = |container: &Value| {
        let context = &container["securityContext"];
        format!("{}:{}", context["runAsUser"], context["runAsGroup"])
    };

    // Control plane: the Deployment's command resolves on the image's PATH and runs as its user.
    let image = unpack("control-plane");
    assert_eq!(
        image.repo_tags,
        [qualified(control_plane["image"].as_str().unwrap())]
    );
    assert_eq!(image.user(), uid_of(&control_plane));
    let command = control_plane["command"][0].as_str().unwrap();
    assert!(
        image.resolves(command),
        "{command} is not on the image's PATH"
    );
    assert!(image.resolves("remoractl"));
    let (ok, output) = image.run(&[command.into(), "--version".into()], None);
    assert!(ok && output.contains("remora-control-plane"), "{output}");

    // Injector: the Deployment gives only args, so the entrypoint must be the injector.
    let image = unpack("injector");
    assert_eq!(
        image.repo_tags,
        [qualified(injector["image"].as_str().unwrap())]
    );
    assert_eq!(image.user(), uid_of(&injector));
    assert!(injector.get("command").is_none());
    let mut command = image.entrypoint();
    command.push("--version".into());
    let (ok, output) = image.run(&command, None);
    assert!(ok && output.contains("remora-injector"), "{output}");

    // Proxy: the image the injector injects, as uid 1337 (what capture exempts).
    let image = unpack("proxy");
    assert_eq!(image.repo_tags, [qualified(&flag("--proxy-image"))]);
    assert_eq!(image.user(), "1337:1337");
    assert!(image.resolves("remora-proxy"));
    let mut command = image.entrypoint();
    command.push("--version".into());
    let (ok, output) = image.run(&command, None);
    assert!(ok && output.contains("remora-proxy"), "{output}");

    // Init: the command and args the injector writes into a pod, run in a pod's namespace.
    let image = unpack("init");
    assert_eq!(image.repo_tags, [qualified(&flag("--init-image"))]);
    assert_eq!(image.user(), "0:0");
    let init_container = injected_init_container();
    let mut command: Vec<String> =
        serde_json::from_value(init_container["command"].clone()).unwrap();
    let args: Vec<String> = serde_json::from_value(init_container["args"].clone()).unwrap();
    command.extend(args);
    assert!(
        image.resolves(&command[0]),
        "{} is not in the image",
        command[0]
    );
    let pod = PodNamespace::create(&format!("remora-img-{}", std::process::id()));
    let (ok, output) = image.run(&command, Some(&pod.0));
    assert!(ok, "remora-init in the image failed: {output}");
    let rules = netns::run(&["ip", "netns", "exec", &pod.0, "iptables-save", "-t", "nat"]);
    for expected in [
        "-A PREROUTING -p tcp -j REMORA_INBOUND",
        "-A OUTPUT -p tcp -j REMORA_OUTPUT",
        "-A REMORA_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-j REDIRECT --to-ports 15006",
        "-j REDIRECT --to-ports 15001",
        "-m owner --uid-owner 1337 -j RETURN",
    ] {
        assert!(rules.contains(expected), "no `{expected}` in:\n{rules}");
    }
    let rules6 = netns::run(&["ip", "netns", "exec", &pod.0, "ip6tables-save", "-t", "nat"]);
    assert!(rules6.contains("-j REDIRECT --to-ports 15001"), "{rules6}");
}

/// The `remora-init` container the injector adds to a pod whose app probes port 8080 (a
/// probe it rewrites to the proxy's probe port, 15021, which capture then leaves alone).
fn injected_init_container() -> Value {
    let pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  containers:
  - name: web
    image: example.invalid/web
    ports: [{containerPort: 8080}]
    readinessProbe: {httpGet: {path: /ready, port: 8080}}
"#;
    let mut child = Command::new(workspace_binary("remora-injector"))
        .arg("inject")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run remora-injector inject");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), pod.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let injected: Value = serde_yaml::from_slice(&out.stdout).expect("injected pod");
    injected["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|container| container["name"] == "remora-init")
        .cloned()
        .expect("a remora-init container")
}

/// A pod's network namespace (loopback only), deleted on drop.
struct PodNamespace(String);

impl PodNamespace {
    fn create(name: &str) -> PodNamespace {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        netns::run(&["ip", "netns", "add", name]);
        netns::run(&["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]);
        PodNamespace(name.to_string())
    }
}

impl Drop for PodNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
