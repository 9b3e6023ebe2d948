//! A real Kubernetes control plane for tests: etcd, `kube-apiserver` and
//! `kube-controller-manager` (built by `tests/kube/build.sh` from the release in
//! `tests/kube/version`), running in a network namespace of their own, the cluster's one
//! "node". The test reaches the API server through a loopback port forwarded into that
//! namespace ([`KubeCluster::api_url`], [`KubeCluster::admin_kubeconfig`]); anything inside
//! the node or routed to it reaches it at [`KubeCluster::node_api_url`].
//!
//! The API server runs with a generated CA and serving certificate, client-certificate and
//! ServiceAccount-token authentication, RBAC authorization, and the admission plugins a
//! cluster has (including MutatingAdmissionWebhook). The controller manager runs the
//! controllers a mesh depends on ([`CONTROLLERS`]: EndpointSlices, ServiceAccounts, namespace
//! deletion, garbage collection), each with its own ServiceAccount credentials as in kubeadm
//! clusters; no scheduler or kubelet runs, so tests act as the kubelet through the API
//! ([`KubeCluster::add_node`], then pods with `spec.nodeName` and a patched status).
//!
//! Service ClusterIPs come from [`SERVICE_CIDR`]; inside the node they are routed locally, and
//! [`KubeCluster::route_service`] plays the node's kube-proxy for one of them, so the API
//! server can call a webhook by its Service reference exactly as in a real cluster.
//!
//! Everything stops and the namespace is deleted when the [`KubeCluster`] drops.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::netns::{self, PortForward};
use crate::process::ChildGuard;

/// Service ClusterIPs (`--service-cluster-ip-range`); `198.19.0.1` is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
/// The node's own address (on the loopback interface of its namespace): the API server's
/// advertise address and the address of the `kubernetes` Service's endpoint.
pub const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 254);
/// The API server's secure port inside the node.
pub const API_PORT: u16 = 6443;
/// Name of the Node object [`KubeCluster::add_node`] creates by default.
pub const NODE_NAME: &str = "remora-node";
/// `--controllers` of the controller manager: what a mesh needs and nothing that would act on
/// nodes without kubelets (node lifecycle would mark every pod NotReady).
pub const CONTROLLERS: &str = "serviceaccount-controller,namespace-controller,\
garbage-collector-controller,endpointslice-controller,endpointslice-mirroring-controller,\
root-ca-certificate-publisher-controller";
/// Issuer (and default audience) of ServiceAccount tokens.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The Kubernetes release the tests run (`tests/kube/version`).
pub fn version() -> &'static str {
    include_str!("../kube/version").trim()
}

/// Where `tests/kube/build.sh` puts the binaries: `$REMORA_KUBE_BIN`, else
/// `${REMORA_KUBE_CACHE:-/var/cache/remora/kube}/<version>/bin`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REMORA_KUBE_BIN") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("REMORA_KUBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/remora/kube"));
    cache.join(version()).join("bin")
}

/// Path of `kubectl` as built with the API server.
pub fn kubectl_path() -> PathBuf {
    bin_dir().join("kubectl")
}

/// Why a cluster cannot start on this machine, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    if let Some(reason) = netns::missing_prerequisite(&["ip", "iptables"]) {
        return Some(reason);
    }
    if !crate::on_path("etcd") {
        return Some("etcd is not on PATH (apt-get install etcd-server)".into());
    }
    let dir = bin_dir();
    ["kube-apiserver", "kube-controller-manager", "kubectl"]
        .iter()
        .find(|program| !dir.join(program).is_file())
        .map(|program| {
            format!(
                "{} is missing (build it with tests/kube/build.sh)",
                dir.join(program).display()
            )
        })
}

/// Starts a cluster, or returns `None` after [`crate::skip`] when this machine cannot run one
/// (which fails the test under `REMORA_REQUIRE_ALL=1`).
pub fn start_or_skip(test: &str) -> Option<KubeCluster> {
    if let Some(reason) = missing_prerequisite() {
        crate::skip(test, &reason);
        return None;
    }
    Some(KubeCluster::start())
}

/// A running etcd + kube-apiserver + kube-controller-manager. See the module docs.
pub struct KubeCluster {
    // Field order is drop order: controller manager, API server, etcd, then the forward and
    // the namespace, then the files.
    controller_manager: Option<ChildGuard>,
    api_server: ChildGuard,
    etcd: ChildGuard,
    forward: PortForward,
    node: NodeNamespace,
    dir: tempfile::TempDir,
    admin_kubeconfig: PathBuf,
    ca: CertificateAuthority,
}

/// How long the control plane gets to become ready; generous for a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);

impl KubeCluster {
    /// Starts the cluster and waits until the API server is ready and the controller manager
    /// works (the `default` ServiceAccount exists). Panics, with the components' logs, if it
    /// does not come up. Use [`start_or_skip`] where the binaries may be missing.
    pub fn start() -> KubeCluster {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rkube-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let node = NodeNamespace::create(&name);
        let dir = tempfile::tempdir().expect("cluster temp dir");
        let path = |file: &str| dir.path().join(file);

        let ca = CertificateAuthority::generate("remora-test-kubernetes-ca");
        ca.write(&path("ca.crt"));
        let serving_names = [
            "localhost",
            "127.0.0.1",
            &NODE_ADDRESS.to_string(),
            "198.19.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        ca.issue_server(&serving_names, &path("apiserver"));
        ca.issue_client("remora-test-admin", &["system:masters"], &path("admin"));
        ca.issue_client(
            "system:kube-controller-manager",
            &[],
            &path("controller-manager"),
        );
        let service_account_key = KeyPair::generate().expect("ServiceAccount signing key");
        std::fs::write(path("sa.key"), service_account_key.serialize_pem()).unwrap();
        std::fs::write(path("sa.pub"), service_account_key.public_key_pem()).unwrap();

        let etcd = {
            let mut command = node.command("etcd");
            command
                .args(["--name", "remora-kube", "--data-dir"])
                .arg(path("etcd"))
                .args(["--listen-client-urls", "http://127.0.0.1:2379"])
                .args(["--advertise-client-urls", "http://127.0.0.1:2379"])
                .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
                .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
                .args(["--initial-cluster", "remora-kube=http://127.0.0.1:2380"])
                .args(["--log-level", "warn"]);
            ChildGuard::spawn("etcd", command)
        };

        let api_server = {
            let mut command = node.command(bin_dir().join("kube-apiserver"));
            command
                .arg("--etcd-servers=http://127.0.0.1:2379")
                .arg("--bind-address=0.0.0.0")
                .arg(format!("--secure-port={API_PORT}"))
                .arg(format!("--advertise-address={NODE_ADDRESS}"))
                .arg(format!(
                    "--tls-cert-file={}",
                    path("apiserver.crt").display()
                ))
                .arg(format!(
                    "--tls-private-key-file={}",
                    path("apiserver.key").display()
                ))
                .arg(format!("--client-ca-file={}", path("ca.crt").display()))
                .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
                .arg(format!(
                    "--service-account-key-file={}",
                    path("sa.pub").display()
                ))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    path("sa.key").display()
                ))
                .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
                .arg("--authorization-mode=RBAC")
                .arg(
                    "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,\
                     DefaultTolerationSeconds,PodSecurity,MutatingAdmissionWebhook,\
                     ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,ResourceQuota",
                )
                .arg("--allow-privileged=true")
                .arg("--profiling=false")
                .arg(format!("--cert-dir={}", path("apiserver-certs").display()));
            ChildGuard::spawn("kube-apiserver", command)
        };

        // The test's way in: a loopback port here, forwarded to the API server in the node.
        let forward = PortForward::start(&node.name, ([127, 0, 0, 1], API_PORT).into());
        let api_url = format!("https://{}", forward.local_addr());
        let admin_kubeconfig = path("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &api_url,
            &path("ca.crt"),
            &User::Certificate(path("admin.crt"), path("admin.key")),
        );
        // The controller manager lives in the node and talks to the API server there.
        let controller_manager_kubeconfig = path("controller-manager.kubeconfig");
        write_kubeconfig(
            &controller_manager_kubeconfig,
            &format!("https://127.0.0.1:{API_PORT}"),
            &path("ca.crt"),
            &User::Certificate(
                path("controller-manager.crt"),
                path("controller-manager.key"),
            ),
        );

        let mut cluster = KubeCluster {
            controller_manager: None,
            api_server,
            etcd,
            forward,
            node,
            dir,
            admin_kubeconfig,
            ca,
        };
        cluster.wait_ready();

        let controller_manager = {
            let kubeconfig = controller_manager_kubeconfig.display().to_string();
            let dir = cluster.dir.path();
            let mut command = cluster
                .node
                .command(bin_dir().join("kube-controller-manager"));
            command
                .arg(format!("--kubeconfig={kubeconfig}"))
                .arg(format!("--authentication-kubeconfig={kubeconfig}"))
                .arg(format!("--authorization-kubeconfig={kubeconfig}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!(
                    "--cert-dir={}",
                    dir.join("controller-manager-certs").display()
                ))
                .arg("--leader-elect=false")
                .arg("--use-service-account-credentials=true")
                .arg(format!("--controllers={CONTROLLERS}"))
                .arg(format!("--root-ca-file={}", dir.join("ca.crt").display()))
                .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"));
            ChildGuard::spawn("kube-controller-manager", command)
        };
        cluster.controller_manager = Some(controller_manager);
        // The ServiceAccount controller creates `default` in every namespace; pods need it.
        cluster.wait_until(
            "the controller manager to create the default ServiceAccount",
            START_TIMEOUT,
            |cluster| {
                cluster
                    .kubectl_try(&["get", "serviceaccount", "default", "-n", "default"])
                    .ok()
                    .map(|_| ())
            },
        );
        cluster
    }

    /// Polls `/readyz` (all of the API server's checks, RBAC bootstrap included) until it
    /// answers `ok`, failing early if a component exits.
    fn wait_ready(&mut self) {
        let ready = crate::poll_until(START_TIMEOUT, || {
            for (name, process) in [
                ("etcd", &mut self.etcd),
                ("kube-apiserver", &mut self.api_server),
            ] {
                if let Some(status) = process.try_wait() {
                    panic!(
                        "{name} exited ({status}) while the cluster started:\n{}",
                        process.log()
                    );
                }
            }
            self.kubectl_try(&["get", "--raw", "/readyz", "--request-timeout=5s"])
                .ok()
                .filter(|body| body.trim() == "ok")
        });
        if ready.is_none() {
            panic!(
                "kube-apiserver not ready after {START_TIMEOUT:?}: {:?}\n{}",
                self.kubectl_try(&["get", "--raw", "/readyz?verbose", "--request-timeout=5s"]),
                self.logs()
            );
        }
    }

    /// `https://127.0.0.1:PORT`: the API server as the test process reaches it.
    pub fn api_url(&self) -> String {
        format!("https://{}", self.forward.local_addr())
    }

    /// The API server as reached from inside the node namespace, or from a namespace routed
    /// to [`NODE_ADDRESS`].
    pub fn node_api_url(&self) -> String {
        format!("https://{NODE_ADDRESS}:{API_PORT}")
    }

    /// A kubeconfig for the cluster-admin user (group `system:masters`), pointing at
    /// [`Self::api_url`].
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// PEM file of the CA that signed the API server's certificate and client certificates.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The cluster's CA, to issue more client or serving certificates.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// Name of the node's network namespace (`ip netns exec NAME ...` runs a command there).
    pub fn netns(&self) -> &str {
        &self.node.name
    }

    /// A command that runs `program` inside the node's network namespace.
    pub fn node_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.node.command(program)
    }

    /// A directory that lives as long as the cluster, for a test's own files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An admin client (kube-rs) for the API server. Needs a tokio runtime.
    pub async fn client(&self) -> kube::Client {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// `kubectl --kubeconfig ADMIN`, for the test to add arguments and run.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(kubectl_path());
        command.arg("--kubeconfig").arg(&self.admin_kubeconfig);
        command
    }

    /// Runs kubectl as cluster admin; its stdout, or a message with its stderr.
    pub fn kubectl_try(&self, args: &[&str]) -> Result<String, String> {
        run_kubectl(self.kubectl().args(args), None)
    }

    /// Runs kubectl as cluster admin and returns its stdout; panics with its stderr if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl_try(args)
            .unwrap_or_else(|error| panic!("kubectl {}: {error}", args.join(" ")))
    }

    /// Runs kubectl as cluster admin with `input` on stdin (e.g. `apply -f -`).
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Result<String, String> {
        run_kubectl(self.kubectl().args(args), Some(input))
    }

    /// `kubectl apply -f -` of a (multi-document) YAML or JSON text; panics if it fails.
    pub fn apply(&self, manifests: &str) -> String {
        self.kubectl_with_input(&["apply", "-f", "-"], manifests)
            .unwrap_or_else(|error| panic!("kubectl apply: {error}"))
    }

    /// A token for ServiceAccount `namespace/name`, from the API server's TokenRequest API
    /// (`kubectl create token`), valid for an hour.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> String {
        self.kubectl_ok(&[
            "create",
            "token",
            name,
            "--namespace",
            namespace,
            "--duration",
            "1h",
        ])
        .trim()
        .to_string()
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name` (with exactly the
    /// RBAC that account is bound to), for `server` (default [`Self::api_url`]). Written into
    /// the cluster's directory; the account must exist.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        server: Option<&str>,
    ) -> PathBuf {
        let token = self.service_account_token(namespace, name);
        let path = self
            .dir
            .path()
            .join(format!("sa-{namespace}-{name}.kubeconfig"));
        let server = server.map(str::to_string).unwrap_or_else(|| self.api_url());
        write_kubeconfig(&path, &server, &self.ca_file(), &User::Token(token));
        path
    }

    /// A kube-rs client authenticated as ServiceAccount `namespace/name`.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> kube::Client {
        client_from_kubeconfig(&self.service_account_kubeconfig(namespace, name, None)).await
    }

    /// Creates a Node object `name` (ready, optionally in a `topology.kubernetes.io/zone`) for
    /// pods to be bound to with `spec.nodeName`: the EndpointSlice controller skips pods whose
    /// node does not exist.
    pub fn add_node(&self, name: &str, zone: Option<&str>) {
        let mut labels = serde_json::json!({"kubernetes.io/hostname": name});
        if let Some(zone) = zone {
            labels["topology.kubernetes.io/zone"] = zone.into();
        }
        let node = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels}
        });
        self.apply(&node.to_string());
        let status = serde_json::json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the test acts as this node's kubelet"}],
            "addresses": [{"type": "InternalIP", "address": NODE_ADDRESS.to_string()}]
        }});
        self.kubectl_ok(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
    }

    /// The ClusterIP the API server gave Service `namespace/name`.
    pub fn cluster_ip(&self, namespace: &str, name: &str) -> Ipv4Addr {
        let ip = self.kubectl_ok(&[
            "get",
            "service",
            name,
            "--namespace",
            namespace,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]);
        ip.trim()
            .parse()
            .unwrap_or_else(|_| panic!("service {namespace}/{name} has ClusterIP {ip:?}"))
    }

    /// Plays the node's kube-proxy for one Service port: TCP connections made inside the node
    /// namespace (by the API server, say) to `ClusterIP:port` of Service `namespace/name` go to
    /// `target` (an address in the node, e.g. `127.0.0.1:9443`). Returns the ClusterIP.
    pub fn route_service(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        target: SocketAddr,
    ) -> Ipv4Addr {
        let ip = self.cluster_ip(namespace, name);
        self.node.run(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &format!("{ip}/32"),
            "--dport",
            &port.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &target.to_string(),
        ]);
        ip
    }

    /// A pod of `app` (label `app`) running as `service_account` on the node, Running and
    /// Ready at `ip`: created, then its status written as a kubelet writes it.
    pub fn run_pod(
        &self,
        namespace: &str,
        name: &str,
        app: &str,
        service_account: &str,
        ip: Ipv4Addr,
    ) {
        self.apply(
            &serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
                "spec": {
                    "nodeName": NODE_NAME,
                    "serviceAccountName": service_account,
                    "containers": [{"name": "app", "image": "example.invalid/echo:1",
                                    "ports": [{"name": "http", "containerPort": 8080}]}]
                }
            })
            .to_string(),
        );
        self.kubectl_ok(&[
            "patch",
            "pod",
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &serde_json::json!({"status": {
                "phase": "Running",
                "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "hostIP": NODE_ADDRESS.to_string(),
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True"}
                ]
            }})
            .to_string(),
        ]);
    }

    /// Calls `probe` with the cluster until it returns `Some`; panics with the components' logs
    /// after `timeout`.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&KubeCluster) -> Option<T>,
    ) -> T {
        crate::poll_until(timeout, || probe(self))
            .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
    }

    /// Logs of the three components so far (for assertions or failure messages).
    pub fn logs(&self) -> String {
        format!(
            "----- etcd -----\n{}\n----- kube-apiserver -----\n{}\n----- kube-controller-manager -----\n{}",
            self.etcd.log(),
            self.api_server.log(),
            self.controller_manager
                .as_ref()
                .map(ChildGuard::log)
                .unwrap_or_default()
        )
    }
}

fn run_kubectl(command: &mut Command, input: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}", kubectl_path().display()))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input.as_bytes())
            .map_err(|error| format!("writing kubectl's stdin: {error}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|error| format!("waiting for kubectl: {error}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// How a kubeconfig authenticates.
pub enum User {
    /// Client certificate and key files.
    Certificate(PathBuf, PathBuf),
    /// A bearer token (e.g. a ServiceAccount's).
    Token(String),
}

/// Writes a kubeconfig with one cluster, one user and one current context.
pub fn write_kubeconfig(path: &Path, server: &str, ca_file: &Path, user: &User) {
    let user = match user {
        User::Certificate(cert, key) => serde_json::json!({
            "client-certificate": cert,
            "client-key": key,
        }),
        User::Token(token) => serde_json::json!({ "token": token }),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "remora-test", "cluster": {
            "server": server,
            "certificate-authority": ca_file,
        }}],
        "users": [{"name": "remora-test", "user": user}],
        "contexts": [{"name": "remora-test", "context": {"cluster": "remora-test", "user": "remora-test"}}],
        "current-context": "remora-test",
    });
    std::fs::write(
        path,
        serde_yaml::to_string(&config).expect("kubeconfig as YAML"),
    )
    .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
}

/// A kube-rs client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|error| panic!("kubeconfig {}: {error}", path.display()));
    kube::Client::try_from(config).expect("kube client")
}

/// A CA made for one test run, issuing serving and client certificates (ECDSA P-256).
pub struct CertificateAuthority {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl CertificateAuthority {
    pub fn generate(common_name: &str) -> CertificateAuthority {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        CertificateAuthority { key, cert }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.cert_pem()).expect("write CA certificate");
    }

    /// A serving certificate for `names` (DNS names or IP addresses), written to
    /// `<base>.crt` and `<base>.key`.
    pub fn issue_server(&self, names: &[&str], base: &Path) {
        let mut params = CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("serving certificate names");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, base);
    }

    /// A client certificate for user `user` in `groups` (Kubernetes reads the CN as the user
    /// name and each O as a group), written to `<base>.crt` and `<base>.key`.
    pub fn issue_client(&self, user: &str, groups: &[&str], base: &Path) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, user);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, base);
    }

    fn issue(&self, mut params: CertificateParams, base: &Path) {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign certificate");
        std::fs::write(base.with_extension("crt"), cert.pem()).expect("write certificate");
        std::fs::write(base.with_extension("key"), key.serialize_pem()).expect("write key");
    }
}

/// The node's network namespace: loopback, which also holds [`NODE_ADDRESS`], the
/// Service range routed locally (so connections to a ClusterIP stay in the node: refused
/// unless [`KubeCluster::route_service`] sent it somewhere), and no route anywhere else.
struct NodeNamespace {
    name: String,
}

impl NodeNamespace {
    fn create(name: &str) -> NodeNamespace {
        // Leftovers of a crashed run with the same name would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        netns::run(&["ip", "netns", "add", name]);
        let node = NodeNamespace {
            name: name.to_string(),
        };
        node.run(&["ip", "link", "set", "lo", "up"]);
        node.run(&[
            "ip",
            "addr",
            "add",
            &format!("{NODE_ADDRESS}/32"),
            "dev",
            "lo",
        ]);
        node.run(&["ip", "route", "add", "local", SERVICE_CIDR, "dev", "lo"]);
        // A ClusterIP routed to 127.0.0.1 (route_service) crosses from a non-loopback source.
        node.run(&[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet",
        ]);
        node
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    fn run(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        netns::run(&full)
    }
}

impl Drop for NodeNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
