//! The webhook over real HTTPS on 127.0.0.1: AdmissionReview bodies as the API server
//! sends them, malformed bodies, routing, a stalled client, and certificate rotation
//! (a new certificate is served after the files change; a broken one is not).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use remora_injector::server::{self, ReloadingTls};
use remora_injector::webhook::WebhookConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// A test CA that signs serving certificates for `localhost`.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params =
            CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        Self { cert, key }
    }

    /// A serving certificate; returns (cert PEM, key PEM, cert DER).
    fn issue(&self) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let params =
            CertificateParams::new(vec!["localhost".to_string()]).unwrap_or_else(|e| panic!("{e}"));
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .unwrap_or_else(|e| panic!("{e}"));
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

struct Server {
    addr: SocketAddr,
    ca: Ca,
    connector: tokio_rustls::TlsConnector,
    cert_path: PathBuf,
    key_path: PathBuf,
    tls: Arc<ReloadingTls>,
    first_cert_der: Vec<u8>,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

async fn start(config: WebhookConfig) -> Server {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ca = Ca::new();
    let (cert_pem, key_pem, der) = ca.issue();
    let cert_path = dir.path().join("tls.crt");
    let key_path = dir.path().join("tls.key");
    write(&cert_path, &cert_pem);
    write(&key_path, &key_pem);

    let tls = ReloadingTls::load(&cert_path, &key_path).unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop, stop_rx) = watch::channel(false);
    tls.spawn_watcher(Duration::from_millis(20), stop_rx.clone());
    tokio::spawn(server::serve(
        listener,
        Arc::clone(&tls),
        Arc::new(config),
        stop_rx,
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert.der().to_vec()))
        .unwrap_or_else(|e| panic!("{e}"));
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| panic!("{e}"))
    .with_root_certificates(roots)
    .with_no_client_auth();
    Server {
        addr,
        ca,
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        cert_path,
        key_path,
        tls,
        first_cert_der: der,
        _dir: dir,
        _stop: stop,
    }
}

struct Answer {
    status: u16,
    body: Vec<u8>,
    server_cert: Vec<u8>,
}

impl Server {
    async fn request(&self, method: &str, path: &str, body: Vec<u8>) -> Answer {
        let tcp = TcpStream::connect(self.addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let name = ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS: {e}"));
        let server_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "remora-injector.remora-system.svc:443")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|e| panic!("{e}"));
        let response = sender
            .send_request(request)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        Answer {
            status,
            body,
            server_cert,
        }
    }
}

/// A body shaped like what kube-apiserver sends for `kubectl run` in a labelled namespace,
/// including managedFields, a generated-name pod from a ReplicaSet and defaulted fields.
fn apiserver_body(uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
      "kind": "AdmissionReview",
      "apiVersion": "admission.k8s.io/v1",
      "request": {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": "",
        "namespace": "shop",
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "uid": "a1", "groups": ["system:serviceaccounts", "system:authenticated"]},
        "object": {
          "kind": "Pod", "apiVersion": "v1",
          "metadata": {
            "generateName": "web-5c6f7d9b8-",
            "namespace": "shop",
            "creationTimestamp": null,
            "labels": {"app": "web", "pod-template-hash": "5c6f7d9b8"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5c6f7d9b8",
                                 "uid": "b2", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:generateName": {}}}}]
          },
          "spec": {
            "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}],
            "containers": [{
              "name": "web", "image": "nginx:1.27",
              "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
              "readinessProbe": {"httpGet": {"path": "/", "port": "http", "scheme": "HTTP"}, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
              "resources": {},
              "volumeMounts": [{"name": "kube-api-access-x", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
              "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
              "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "serviceAccount": "default", "securityContext": {},
            "schedulerName": "default-scheduler", "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
          },
          "status": {}
        },
        "oldObject": null,
        "dryRun": false,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
      }
    }))
    .unwrap_or_default()
}

#[tokio::test]
async fn injects_a_pod_over_https() {
    let server = start(WebhookConfig::default()).await;
    let uid = "705ab4f5-6393-11e8-b7cc-42010a800002";
    let body = apiserver_body(uid);
    let answer = server.request("POST", "/inject", body.clone()).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.server_cert, server.first_cert_der);
    let review: Value = serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["uid"], uid);
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(review["response"]["patch"].as_str().unwrap_or(""))
        .unwrap_or_else(|e| panic!("patch is not base64: {e}"));
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap_or_else(|e| panic!("{e}"));

    // Apply to the object exactly as sent (not a re-serialised copy), as the API server does.
    let sent: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut pod = sent["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap_or_else(|e| panic!("patch does not apply: {e}"));
    let inits = &pod["spec"]["initContainers"];
    assert_eq!(inits[0]["name"], "remora-init");
    assert_eq!(inits[1]["name"], "remora-proxy");
    assert_eq!(inits[1]["restartPolicy"], "Always");
    // Fields the injector does not model are kept.
    assert_eq!(pod["spec"]["preemptionPolicy"], "PreemptLowerPriority");
    assert_eq!(
        pod["metadata"]["managedFields"][0]["manager"],
        "kube-controller-manager"
    );
    assert!(pod["metadata"]["annotations"]["sidecar.remora.io/status"].is_string());
    let args = inits[0]["args"].as_array().cloned().unwrap_or_default();
    let i = args.iter().position(|a| a == "--exclude-inbound-ports");
    // The app's probe now goes to the proxy's probe port, the only port left out of capture.
    assert_eq!(
        i.and_then(|i| args.get(i + 1)),
        Some(&json!("15021")),
        "{args:?}"
    );
    let probe = pod["spec"]["containers"][0]
        .as_object()
        .and_then(|c| {
            ["readinessProbe", "livenessProbe", "startupProbe"]
                .iter()
                .find_map(|k| c.get(*k))
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(probe["httpGet"]["port"], 15021, "{probe}");
}

#[tokio::test]
async fn malformed_requests_get_http_errors_not_hangs() {
    let server = start(WebhookConfig::default()).await;
    // A client that connects and then says nothing must not block anyone else.
    let _stalled = TcpStream::connect(server.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    for body in [
        b"".to_vec(),
        b"{not json".to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
    ] {
        let answer = server.request("POST", "/inject", body.clone()).await;
        assert_eq!(answer.status, 400, "{:?}", String::from_utf8_lossy(&body));
        assert!(!answer.body.is_empty(), "a 400 carries a message");
    }
    let oversized = vec![b' '; 9 * 1024 * 1024];
    assert_eq!(
        server.request("POST", "/inject", oversized).await.status,
        400
    );
    assert_eq!(server.request("GET", "/inject", vec![]).await.status, 405);
    assert_eq!(server.request("GET", "/nope", vec![]).await.status, 404);
    let health = server.request("GET", "/healthz", vec![]).await;
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok\n"[..]));
}

#[tokio::test]
async fn fail_closed_denies_over_https() {
    let server = start(WebhookConfig {
        fail_closed: true,
        ..WebhookConfig::default()
    })
    .await;
    let mut review: Value = serde_json::from_slice(&apiserver_body("u-1")).unwrap_or_default();
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"traffic.remora.io/excludeOutboundIPRanges": "10.0.0.0/99"});
    let answer = server
        .request(
            "POST",
            "/inject",
            serde_json::to_vec(&review).unwrap_or_default(),
        )
        .await;
    assert_eq!(answer.status, 200);
    let review: Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    assert_eq!(review["response"]["allowed"], false);
    assert_eq!(review["response"]["uid"], "u-1");
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("10.0.0.0/99")
    );
}

#[tokio::test]
async fn serves_the_new_certificate_after_the_files_change() {
    let server = start(WebhookConfig::default()).await;
    assert_eq!(
        server.request("GET", "/healthz", vec![]).await.server_cert,
        server.first_cert_der
    );

    // A broken pair (as seen half-way through a rotation) is refused and the old one kept.
    write(
        &server.cert_path,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    );
    assert!(server.tls.reload_if_changed().is_err());
    assert_eq!(
        server.request("GET", "/healthz", vec![]).await.server_cert,
        server.first_cert_der
    );

    let (cert_pem, key_pem, new_der) = server.ca.issue();
    assert_ne!(new_der, server.first_cert_der);
    write(&server.key_path, &key_pem);
    write(&server.cert_path, &cert_pem);

    remora_tests::wait_for_async(
        "the new certificate served",
        Duration::from_secs(20),
        || async {
            let served = server.request("GET", "/healthz", vec![]).await.server_cert;
            (served == new_der).then_some(())
        },
    )
    .await;
}
