//! `remora-cp`: the Remora control plane (xDS server + config API).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use remora_control_plane::ca::CaOptions;
use remora_control_plane::mesh::translate::{MeshSettings, OutboundLayout};
use remora_control_plane::server::{
    MeshOptions, Options, StoreChoice, XdsAuthMode, XdsTlsOptions, run,
};
use remora_control_plane::xds::tls::ClientAuth;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// Embedded redb file under --data-dir.
    Embedded,
    /// etcd at --etcd-endpoints.
    Etcd,
}

/// The Remora control plane: serves xDS to proxies and a config API to operators.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// gRPC address for xDS (ADS and the per-type services).
    #[arg(long, default_value = "127.0.0.1:18000")]
    xds_addr: SocketAddr,
    /// HTTP address for the config API.
    #[arg(long, default_value = "127.0.0.1:19000")]
    api_addr: SocketAddr,
    /// Directory of the embedded store.
    #[arg(long, default_value = "remora-cp-data")]
    data_dir: PathBuf,
    #[arg(long, value_enum, default_value = "embedded")]
    store: StoreKind,
    /// Comma-separated etcd endpoints (with --store etcd).
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Bearer token required on /v1 requests; required when --api-addr is not loopback.
    #[arg(long, env = "REMORA_CP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Debounce window for pushes, in milliseconds.
    #[arg(long, default_value_t = 50)]
    debounce_ms: u64,
    /// Generate sidecar config from services, endpoints and traffic policies registered
    /// through the REST API (/v1/mesh/...).
    #[arg(long)]
    mesh: bool,
    /// Generate sidecar config from a Kubernetes API server (implies --mesh): in the cluster
    /// with the pod's service account, else from --kubeconfig or $KUBECONFIG.
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig file for --kubernetes.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The cluster's DNS domain, for service host names.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Turn off the mesh defaults (retries of idempotent failures with a retry budget,
    /// outlier detection, lifted circuit breakers; docs/mesh.md): services then start from
    /// Envoy's bare defaults.
    #[arg(long)]
    no_mesh_defaults: bool,
    /// How sidecars receive service ports: chains in the capture listener (Remora and
    /// Envoy), or a bind_to_port=false listener per VIP:port (Envoy only, for now).
    #[arg(long, value_enum, default_value = "capture-chains")]
    outbound_layout: OutboundLayout,
    /// The mesh CA's root certificate (PEM); with --ca-key. Without both, a root is generated
    /// on first start and kept in the store (shared by replicas on one etcd).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM, PKCS#8).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The SPIFFE trust domain of workload identities
    /// (spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of workload certificates (e.g. 24h, 90m, 30s); renewed at half life.
    #[arg(long, default_value = "24h", value_parser = parse_lifetime)]
    workload_cert_lifetime: Duration,
    /// How xDS streams and certificate requests are authenticated: `none` (a stream gets
    /// what its node names), `token` (a bootstrap token from POST /v1/xds-tokens in the
    /// `authorization` metadata decides its group and a sidecar's identity), or `kubernetes`
    /// (a projected service account token with audience `remora`, checked by TokenReview:
    /// its service account is the identity, its pod decides the group; needs --kubernetes).
    #[arg(long, value_enum, default_value = "none")]
    xds_auth: XdsAuthMode,
    /// Serve the xDS port (ADS, and the certificate service) over TLS, with a certificate
    /// the mesh CA issues to the control plane: its SPIFFE id
    /// (spiffe://TRUST_DOMAIN/ns/--xds-tls-namespace/sa/--xds-tls-service-account) and each
    /// --xds-tls-dns-name; renewed at half life. Proxies verify it with the trust bundle.
    #[arg(long)]
    xds_tls: bool,
    /// A DNS name proxies reach the xDS port by, in its certificate (repeat for more).
    #[arg(long = "xds-tls-dns-name", requires = "xds_tls")]
    xds_tls_dns_names: Vec<String>,
    /// The namespace of the control plane's own SPIFFE id.
    #[arg(long, default_value = "remora-system", env = "POD_NAMESPACE")]
    xds_tls_namespace: String,
    /// The service account of the control plane's own SPIFFE id.
    #[arg(long, default_value = "remora-cp")]
    xds_tls_service_account: String,
    /// Ask xDS clients for a certificate of the mesh CA (with --xds-tls): `none`, `optional`
    /// (a client presenting none authenticates as --xds-auth says), or `require`. A client
    /// certificate naming spiffe://TRUST_DOMAIN/ns/NS/sa/SA identifies the caller as that
    /// service account, as a Kubernetes token of it would, when it sends no bearer token: a
    /// proxy holding a workload certificate renews it without a token.
    #[arg(long, value_enum, default_value = "none", requires = "xds_tls")]
    xds_tls_client_auth: ClientAuth,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `24h`, `90m`, `30s` or a bare number of seconds.
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(split) => text.split_at(split),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with h, m or s (e.g. 24h)"))?;
    let seconds = match unit {
        "h" => number.checked_mul(3600),
        "m" => number.checked_mul(60),
        "s" => Some(number),
        _ => None,
    }
    .ok_or_else(|| format!("{text:?}: expected a number with h, m or s (e.g. 24h)"))?;
    Ok(Duration::from_secs(seconds))
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the TrafficPolicy CustomResourceDefinition (YAML) and exit.
    Manifests,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if let Some(Command::Manifests) = args.command {
        print!("{}", remora_control_plane::mesh::policy::crd_manifest());
        return std::process::ExitCode::SUCCESS;
    }
    let store = match args.store {
        StoreKind::Embedded => StoreChoice::Embedded(args.data_dir),
        StoreKind::Etcd if args.etcd_endpoints.is_empty() => {
            eprintln!("remora-cp: --store etcd needs --etcd-endpoints URL[,URL...]");
            return std::process::ExitCode::from(2);
        }
        StoreKind::Etcd => StoreChoice::Etcd(args.etcd_endpoints),
    };
    let options = Options {
        xds_addr: args.xds_addr,
        api_addr: args.api_addr,
        store,
        token: args.token.filter(|token| !token.is_empty()),
        debounce: Duration::from_millis(args.debounce_ms),
        mesh: (args.mesh || args.kubernetes).then(|| MeshOptions {
            settings: MeshSettings {
                cluster_domain: args.cluster_domain.clone(),
                mesh_defaults: !args.no_mesh_defaults,
                outbound_layout: args.outbound_layout,
                trust_domain: args.trust_domain.clone(),
            },
            kubernetes: args.kubernetes.then(|| args.kubeconfig.clone()),
        }),
        ca: CaOptions {
            trust_domain: args.trust_domain.clone(),
            workload_lifetime: args.workload_cert_lifetime,
            root_files: args.ca_cert.clone().zip(args.ca_key.clone()),
        },
        xds_auth: args.xds_auth,
        xds_tls: args.xds_tls.then(|| XdsTlsOptions {
            namespace: args.xds_tls_namespace.clone(),
            service_account: args.xds_tls_service_account.clone(),
            dns_names: args.xds_tls_dns_names.clone(),
            client_auth: args.xds_tls_client_auth,
        }),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        let _ = stop.send(true);
    });
    match run(options, stopped).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("remora-cp: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
