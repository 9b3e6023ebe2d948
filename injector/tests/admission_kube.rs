//! Injection through a real API server's admission chain: the MutatingWebhookConfiguration
//! rendered by `remora-injector manifests --ca-bundle-file` is applied with `kubectl`, the
//! injector runs in the cluster's node with the Deployment's own arguments and a certificate
//! for its Service name, and the API server calls it by Service reference (the node plays
//! kube-proxy for the ClusterIP). Pods are created with kube-rs and read back as stored.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::kube::Client;
use ::kube::api::{Api, DeleteParams, PostParams};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use remora_injector::inject::{INJECT_KEY, NAMESPACE_LABEL, STATUS_ANNOTATION};
use remora_injector::manifests::{NAMESPACE, WEBHOOK_PORT};
use remora_tests::kube::{self, CertificateAuthority, KubeCluster};
use remora_tests::process::ChildGuard;
use remora_tests::{netns, wait_for_async};
use serde_json::{Value, json};

/// The injector's Service name, as the API server dials it (and as its certificate names it,
/// following docs/injection.md).
const SERVICE_HOST: &str = "remora-injector.remora-system.svc";
/// Where the injector listens inside the node (its Deployment says 0.0.0.0:9443).
const LISTEN: &str = "127.0.0.1:9443";

/// A cluster with Remora's manifests applied and the injector serving behind its Service.
struct Installed {
    cluster: KubeCluster,
    injector: Option<ChildGuard>,
    tls_dir: PathBuf,
}

impl Installed {
    fn start(test: &str) -> Option<Installed> {
        let cluster = kube::start_or_skip(test)?;
        // docs/injection.md, step 1: a CA and a serving certificate for the Service name.
        let tls_dir = cluster.dir().join("webhook-tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        let ca = CertificateAuthority::generate("remora-webhook-ca");
        ca.write(&tls_dir.join("ca.crt"));
        ca.issue_server(&[SERVICE_HOST], &tls_dir.join("tls"));
        let mut installed = Installed {
            cluster,
            injector: None,
            tls_dir,
        };
        // Step 2: the manifests with the CA bundle, then the Secret the Deployment mounts.
        installed.install(&["--ca-bundle-file"]);
        installed.cluster.kubectl_ok(&[
            "-n",
            NAMESPACE,
            "create",
            "secret",
            "tls",
            "remora-injector-tls",
            "--cert",
            &installed.tls_dir.join("tls.crt").display().to_string(),
            "--key",
            &installed.tls_dir.join("tls.key").display().to_string(),
        ]);
        installed.start_injector();
        let target: SocketAddr = LISTEN.parse().unwrap();
        installed
            .cluster
            .route_service(NAMESPACE, "remora-injector", 443, target);
        Some(installed)
    }

    /// `remora-injector manifests --ca-bundle-file CA [extra]`, applied with kubectl; returns
    /// the rendered text.
    fn install(&self, flags: &[&str]) -> String {
        let mut args: Vec<String> = vec!["manifests".into()];
        for flag in flags {
            args.push(flag.to_string());
            if *flag == "--ca-bundle-file" {
                args.push(self.tls_dir.join("ca.crt").display().to_string());
            }
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_remora-injector"))
            .args(&args)
            .output()
            .expect("run remora-injector manifests");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let manifests = String::from_utf8(out.stdout).unwrap();
        self.cluster.apply(&manifests);
        manifests
    }

    /// Runs the injector in the node with the arguments of its Deployment as stored by the
    /// API server, except the listen address (loopback) and the mounted certificate paths.
    fn start_injector(&mut self) {
        let deployment: Value = serde_json::from_str(&self.cluster.kubectl_ok(&[
            "get",
            "deployment",
            "remora-injector",
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ]))
        .unwrap();
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let mount = container["volumeMounts"][0]["mountPath"]
            .as_str()
            .expect("the TLS volume mount");
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("injector args")
            .iter()
            .map(|arg| {
                let arg = arg.as_str().expect("string arg");
                if arg == format!("0.0.0.0:{WEBHOOK_PORT}") {
                    LISTEN.to_string()
                } else if let Some(file) = arg.strip_prefix(mount) {
                    self.tls_dir
                        .join(file.trim_start_matches('/'))
                        .display()
                        .to_string()
                } else {
                    arg.to_string()
                }
            })
            .collect();
        assert_eq!(args[0], "serve", "{args:?}");
        let mut command = self
            .cluster
            .node_command(env!("CARGO_BIN_EXE_remora-injector"));
        command.args(&args);
        self.injector = Some(ChildGuard::spawn("remora-injector", command));
        let netns = self.cluster.netns().to_string();
        remora_tests::wait_for(
            "the injector to listen in the node",
            Duration::from_secs(30),
            || {
                netns::in_namespace(&netns, || {
                    TcpStream::connect_timeout(&LISTEN.parse().unwrap(), Duration::from_secs(1))
                        .ok()
                        .map(|_| ())
                })
            },
        );
    }

    fn stop_injector(&mut self) {
        if let Some(mut injector) = self.injector.take() {
            injector.kill();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn create_namespace(client: &Client, name: &str, labels: Value) {
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap_or_else(|error| panic!("create namespace {name}: {error}"));
    // Pods need the namespace's `default` ServiceAccount, which the controller manager adds.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    wait_for_async(
        "the default ServiceAccount",
        Duration::from_secs(60),
        || {
            let accounts = accounts.clone();
            async move { accounts.get_opt("default").await.ok().flatten() }
        },
    )
    .await;
}

fn pod(name: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{
            "name": "app",
            "image": "example.invalid/app:1",
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}
        }]}
    }))
    .unwrap()
}

fn init_container_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.init_containers.as_ref())
        .map(|containers| containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

fn injected(pod: &Pod) -> bool {
    let status = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| annotations.contains_key(STATUS_ANNOTATION));
    let names = init_container_names(pod);
    let sidecar = names == ["remora-init", "remora-proxy"];
    assert_eq!(
        status, sidecar,
        "half an injection: {names:?}, status {status}"
    );
    sidecar
}

/// Creates `pod` in `namespace` and returns the pod as the API server stored it.
async fn create(client: &Client, namespace: &str, pod: &Pod) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create(&PostParams::default(), pod)
        .await
        .unwrap_or_else(|error| panic!("create pod in {namespace}: {error}"));
    let name = pod.metadata.name.as_deref().unwrap();
    pods.get(name).await.expect("read the stored pod")
}

#[test]
fn pods_are_injected_through_the_api_server_as_the_selectors_and_opt_outs_say() {
    let Some(installed) = Installed::start(
        "pods_are_injected_through_the_api_server_as_the_selectors_and_opt_outs_say",
    ) else {
        return;
    };
    runtime().block_on(async {
        let client = installed.cluster.client().await;
        create_namespace(&client, "shop", json!({NAMESPACE_LABEL: "enabled"})).await;
        create_namespace(&client, "plain", json!({})).await;

        let stored = create(
            &client,
            "shop",
            &pod("web", json!({"app": "web"}), json!({})),
        )
        .await;
        assert!(injected(&stored), "{:?}", init_container_names(&stored));
        let spec = stored.spec.as_ref().unwrap();
        let init = &spec.init_containers.as_ref().unwrap()[0];
        let init_args = init.args.clone().unwrap_or_default().join(" ");
        // The app's probe is rewritten to the proxy's probe port, which alone is left out
        // of inbound capture (docs/injection.md, Probes); the API server accepted the result.
        assert!(
            init_args.contains("--exclude-inbound-ports 15021"),
            "{init_args}"
        );
        assert!(!init_args.contains("8080"), "{init_args}");
        let app_probe = spec.containers[0]
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref());
        assert_eq!(
            app_probe.map(|g| g.path.as_deref()),
            Some(Some("/app-health/app/readyz"))
        );
        let proxy = &spec.init_containers.as_ref().unwrap()[1];
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        assert_eq!(proxy.image.as_deref(), Some("remora/proxy:latest"));
        let env: Vec<_> = proxy.env.iter().flatten().collect();
        let xds = env
            .iter()
            .find(|var| var.name == "REMORA_XDS_ADDRESS")
            .and_then(|var| var.value.clone());
        assert_eq!(xds.as_deref(), Some("remora-cp.remora-system.svc:18000"));

        let stored = create(&client, "plain", &pod("web", json!({}), json!({}))).await;
        assert!(
            !injected(&stored),
            "a pod in an unlabelled namespace got a sidecar"
        );

        let stored = create(
            &client,
            "plain",
            &pod("asked", json!({INJECT_KEY: "true"}), json!({})),
        )
        .await;
        assert!(
            injected(&stored),
            "a pod labelled {INJECT_KEY}=true got none"
        );

        let stored = create(
            &client,
            "shop",
            &pod("no-by-label", json!({INJECT_KEY: "false"}), json!({})),
        )
        .await;
        assert!(!injected(&stored), "the opt-out label was ignored");

        let stored = create(
            &client,
            "shop",
            &pod("no-by-annotation", json!({}), json!({INJECT_KEY: "false"})),
        )
        .await;
        assert!(!injected(&stored), "the opt-out annotation was ignored");

        // Authenticated xDS over TLS by annotation: the API server accepts the projected
        // token and the trust bundle's ConfigMap volume, mounted in the proxy.
        let stored = create(
            &client,
            "shop",
            &pod(
                "secure",
                json!({}),
                json!({"sidecar.remora.io/xdsAuth": "true", "sidecar.remora.io/xdsTLS": "true"}),
            ),
        )
        .await;
        assert!(injected(&stored));
        let spec = stored.spec.as_ref().unwrap();
        let volumes: Vec<_> = spec.volumes.iter().flatten().collect();
        let token = volumes
            .iter()
            .find(|v| v.name == "remora-xds-token")
            .and_then(|v| v.projected.as_ref())
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s.first())
            .and_then(|s| s.service_account_token.as_ref())
            .expect("the projected token volume");
        assert_eq!(token.audience.as_deref(), Some("remora"));
        assert_eq!(token.expiration_seconds, Some(3600));
        let bundle = volumes
            .iter()
            .find(|v| v.name == "remora-ca-root-cert")
            .and_then(|v| v.config_map.as_ref())
            .expect("the trust bundle volume");
        assert_eq!(bundle.name, "remora-ca-root-cert");
        let proxy = &spec.init_containers.as_ref().unwrap()[1];
        let mounts: Vec<_> = proxy
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("remora-xds-token", "/var/run/secrets/remora/tokens"),
                ("remora-ca-root-cert", "/var/run/secrets/remora/ca")
            ]
        );

        // Dry run: the webhook is called (sideEffects: None allows it) and nothing is stored.
        let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
        let dry = pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &pod("dry", json!({}), json!({})),
            )
            .await
            .expect("a dry-run create");
        assert!(injected(&dry), "the dry-run answer has no sidecar");
        assert!(pods.get_opt("dry").await.unwrap().is_none());
    });
}

#[test]
fn an_unreachable_injector_admits_pods_without_a_sidecar_unless_failure_policy_is_fail() {
    let Some(mut installed) = Installed::start(
        "an_unreachable_injector_admits_pods_without_a_sidecar_unless_failure_policy_is_fail",
    ) else {
        return;
    };
    let runtime = runtime();
    let client = runtime.block_on(installed.cluster.client());
    runtime.block_on(async {
        create_namespace(&client, "shop", json!({NAMESPACE_LABEL: "enabled"})).await;
        // The webhook is in the path while the injector is up ...
        let stored = create(&client, "shop", &pod("before", json!({}), json!({}))).await;
        assert!(injected(&stored));
    });

    // ... and with it down, failurePolicy: Ignore (the default) admits pods untouched.
    installed.stop_injector();
    runtime.block_on(async {
        let stored = create(&client, "shop", &pod("during", json!({}), json!({}))).await;
        assert!(!injected(&stored), "injected with the injector down?");
    });

    // The same outage with --failure-policy fail refuses the pod, naming the webhook.
    let manifests = installed.install(&["--ca-bundle-file", "--failure-policy", "fail"]);
    assert!(manifests.contains("failurePolicy: Fail"));
    runtime.block_on(async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
        let error = pods
            .create(
                &PostParams::default(),
                &pod("refused", json!({}), json!({})),
            )
            .await
            .expect_err("a pod admitted past a failing webhook with failurePolicy: Fail");
        let message = error.to_string();
        assert!(message.contains("namespace.sidecar.remora.io"), "{message}");
        let _ = pods.delete("refused", &DeleteParams::default()).await;
    });
}

/// docs/injection.md names the certificate files this test writes; keep them in step.
#[test]
fn the_install_docs_issue_the_certificate_for_the_service_name_the_api_server_dials() {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/injection.md"))
            .unwrap();
    assert!(docs.contains(&format!("subjectAltName=DNS:{SERVICE_HOST}")));
    assert!(docs.contains("remora-injector manifests --ca-bundle-file ca.crt"));
    assert!(docs.contains("create secret tls remora-injector-tls"));
}
