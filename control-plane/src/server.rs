//! Wiring of one control-plane process: open the store, start the snapshot hub, serve xDS and
//! the config API until shutdown. Used by the `remora-cp` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::watch;

use crate::api::{ApiState, router};
use crate::ca::{Ca, CaOptions};
use crate::config::ConfigService;
use crate::mesh::hub::MeshHub;
use crate::mesh::translate::MeshSettings;
use crate::metrics::Metrics;
use crate::registry::ProxyRegistry;
use crate::snapshot::SnapshotHub;
use crate::store::ConfigStore;
use crate::store::etcd_store::EtcdStore;
use crate::store::redb_store::RedbStore;
use crate::xds::XdsContext;
use crate::xds::auth::{TokenAuth, XdsAuth};
use crate::xds::certificates::CertificateSigner;
use crate::xds::kube_auth::KubeAuth;
use crate::xds::tls::{ClientAuth, ServingIdentity, XdsTls};

/// Where config is kept.
#[derive(Clone, Debug)]
pub enum StoreChoice {
    /// Embedded redb file in this directory.
    Embedded(PathBuf),
    /// etcd cluster at these endpoints.
    Etcd(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct Options {
    pub xds_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub store: StoreChoice,
    pub token: Option<String>,
    /// Window in which a burst of writes becomes one push.
    pub debounce: Duration,
    /// Generated config for mesh sidecars; `None` serves raw resources only.
    pub mesh: Option<MeshOptions>,
    /// The mesh CA: trust domain, workload certificate lifetime, root files.
    pub ca: CaOptions,
    /// Whether xDS streams must present a bootstrap token.
    pub xds_auth: XdsAuthMode,
    /// Serve the xDS port over TLS with a certificate from the mesh CA naming this identity
    /// and these DNS names; `None`: plaintext.
    pub xds_tls: Option<XdsTlsOptions>,
}

/// The control plane's own identity on its xDS port (`--xds-tls`).
#[derive(Clone, Debug)]
pub struct XdsTlsOptions {
    /// The namespace and service account of its SPIFFE id.
    pub namespace: String,
    pub service_account: String,
    /// DNS names proxies reach it by (e.g. `remora-cp.remora-system.svc`).
    pub dns_names: Vec<String>,
    /// Whether clients are asked for certificates of the mesh CA (`--xds-tls-client-auth`).
    pub client_auth: ClientAuth,
}

/// How xDS streams are authenticated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsAuthMode {
    /// None: a stream gets what its node names (trusted networks only).
    #[default]
    None,
    /// A bootstrap token from `POST /v1/xds-tokens` in the `authorization` metadata.
    Token,
    /// A projected ServiceAccount token (audience `remora`) in the `authorization` metadata,
    /// checked by the API server's TokenReview (needs the Kubernetes source).
    Kubernetes,
}

/// Mesh generation settings.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub settings: MeshSettings,
    /// Follow a Kubernetes API server (with this kubeconfig, or the usual places when
    /// `None`); without it the mesh comes from the REST API only.
    pub kubernetes: Option<Option<PathBuf>>,
}

/// Runs until `shutdown` becomes true.
pub async fn run(options: Options, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    if !options.api_addr.ip().is_loopback() && options.token.is_none() {
        bail!(
            "refusing to serve the config API on non-loopback {} without a bearer token (--token or REMORA_CP_TOKEN)",
            options.api_addr
        );
    }
    let store: Arc<dyn ConfigStore> = match &options.store {
        StoreChoice::Embedded(dir) => Arc::new(
            RedbStore::open(dir)
                .with_context(|| format!("opening the store in {}", dir.display()))?,
        ),
        StoreChoice::Etcd(endpoints) => Arc::new(
            EtcdStore::connect(endpoints)
                .await
                .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?,
        ),
    };
    let ca = Ca::open(store.as_ref(), &options.ca)
        .await
        .context("setting up the mesh CA")?;
    let config = ConfigService::open(store).await.context("loading config")?;
    tracing::info!(
        version = config.current().version,
        resources = config.current().resources.len(),
        "config loaded"
    );
    let hub = SnapshotHub::new(config.commits().borrow().clone(), options.debounce);
    tokio::spawn(hub.clone().run(config.commits()));
    tokio::spawn(config.clone().follow_store());
    let registry = Arc::new(ProxyRegistry::default());
    let metrics = Arc::new(Metrics::default());
    if options.xds_auth == XdsAuthMode::Kubernetes
        && options
            .mesh
            .as_ref()
            .is_none_or(|mesh| mesh.kubernetes.is_none())
    {
        bail!("--xds-auth kubernetes needs the Kubernetes source (--kubernetes)");
    }
    let mut kube_client = None;
    let mesh = match &options.mesh {
        None => None,
        Some(mesh_options) => {
            let sources = usize::from(mesh_options.kubernetes.is_some());
            let mesh = MeshHub::new(
                mesh_options.settings.clone(),
                hub.clone(),
                sources,
                options.debounce,
                Some(ca.clone()),
            );
            tokio::spawn(mesh.clone().run());
            if let Some(kubeconfig) = &mesh_options.kubernetes {
                let client = crate::mesh::kubernetes::client(kubeconfig.as_ref())
                    .await
                    .context("connecting to the Kubernetes API server")?;
                tokio::spawn(crate::mesh::kubernetes::run(
                    client.clone(),
                    mesh.clone(),
                    registry.clone(),
                ));
                tokio::spawn(crate::mesh::trust_bundle::publish(
                    client.clone(),
                    ca.bundle_pem().to_string(),
                ));
                kube_client = Some(client);
            }
            Some(mesh)
        }
    };

    let xds_tls = match &options.xds_tls {
        None => None,
        Some(tls) => {
            let serving = ServingIdentity {
                identity: ca.identity(&tls.namespace, &tls.service_account),
                dns_names: tls.dns_names.clone(),
            };
            tracing::info!(identity = %serving.identity, dns_names = ?serving.dns_names, "xDS over TLS");
            tracing::info!(client_auth = ?tls.client_auth, "xDS client certificates");
            let xds_tls =
                XdsTls::new(ca.clone(), serving, tls.client_auth).context("xDS over TLS")?;
            tokio::spawn(xds_tls.clone().keep_renewed());
            Some(xds_tls)
        }
    };
    let xds_listener = tokio::net::TcpListener::bind(options.xds_addr)
        .await
        .with_context(|| format!("binding xDS on {}", options.xds_addr))?;
    let api_listener = tokio::net::TcpListener::bind(options.api_addr)
        .await
        .with_context(|| format!("binding the API on {}", options.api_addr))?;
    tracing::info!(xds = %options.xds_addr, api = %options.api_addr, "remora-cp serving");

    let auth = match (options.xds_auth, kube_client, &mesh) {
        (XdsAuthMode::None, _, _) => XdsAuth::Open,
        (XdsAuthMode::Token, _, _) => {
            let tokens = TokenAuth::new(config.clone());
            tokio::spawn(tokens.clone().follow_revocations());
            XdsAuth::Tokens(tokens)
        }
        (XdsAuthMode::Kubernetes, Some(client), Some(mesh)) => {
            XdsAuth::Kubernetes(Arc::new(KubeAuth::new(client, mesh.clone())))
        }
        (XdsAuthMode::Kubernetes, _, _) => {
            bail!("--xds-auth kubernetes needs the Kubernetes source (--kubernetes)")
        }
    };
    let signer = CertificateSigner {
        ca: ca.clone(),
        auth: auth.clone(),
        mesh: mesh.clone(),
        registry: registry.clone(),
    };
    let xds = XdsContext {
        hub,
        mesh: mesh.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        auth,
    };
    let mut xds_shutdown = shutdown.clone();
    let xds_task = tokio::spawn(xds.serve(xds_listener, xds_tls, Some(signer), async move {
        let _ = xds_shutdown.wait_for(|stop| *stop).await;
    }));
    let api = router(ApiState {
        config,
        registry,
        metrics,
        token: options.token.clone(),
        mesh,
        ca,
    });
    axum::serve(api_listener, api)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
        .context("serving the API")?;
    xds_task.await.context("xDS server task")??;
    Ok(())
}
