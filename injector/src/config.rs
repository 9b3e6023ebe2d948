//! Injection settings shared by the webhook (`serve`) and manual injection (`inject`):
//! images, the control plane's address and how the proxy authenticates to it, proxy
//! resources, the sidecar mode and the probe rewrite. Each has a
//! command-line flag; per-pod annotations override some of them (see [`crate::inject`]).

/// Default proxy image.
pub const DEFAULT_PROXY_IMAGE: &str = "remora/proxy:latest";
/// Default image of the capture init container (it holds `remora-init` and iptables).
pub const DEFAULT_INIT_IMAGE: &str = "remora/init:latest";
/// Default xDS address of the control plane, as the install manifests name it.
pub const DEFAULT_XDS_ADDRESS: &str = "remora-cp.remora-system.svc:18000";
/// Audience of the projected ServiceAccount token the control plane's TokenReview expects.
pub const DEFAULT_XDS_TOKEN_AUDIENCE: &str = "remora";
/// Lifetime asked for the projected token; the kubelet renews it at 80% of that.
pub const DEFAULT_XDS_TOKEN_EXPIRATION_S: u32 = 3600;

/// How injected pods are built.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// Proxy image (pod annotation `sidecar.remora.io/proxyImage` overrides it).
    #[arg(long, env = "REMORA_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// Image of the init container that installs the capture rules.
    #[arg(long, env = "REMORA_INIT_IMAGE", default_value = DEFAULT_INIT_IMAGE)]
    pub init_image: String,
    /// host:port of the control plane's xDS server, handed to the proxy.
    #[arg(long, env = "REMORA_XDS_ADDRESS", default_value = DEFAULT_XDS_ADDRESS)]
    pub xds_address: String,
    /// Proxy CPU request (annotation `sidecar.remora.io/proxyCPU`).
    #[arg(long, default_value = "100m")]
    pub proxy_cpu: String,
    /// Proxy memory request (annotation `sidecar.remora.io/proxyMemory`).
    #[arg(long, default_value = "128Mi")]
    pub proxy_memory: String,
    /// Proxy CPU limit (annotation `sidecar.remora.io/proxyCPULimit`).
    #[arg(long, default_value = "2")]
    pub proxy_cpu_limit: String,
    /// Proxy memory limit (annotation `sidecar.remora.io/proxyMemoryLimit`).
    #[arg(long, default_value = "1Gi")]
    pub proxy_memory_limit: String,
    /// Inject the proxy as a regular first container with a postStart wait, instead of a
    /// native sidecar (for clusters older than Kubernetes 1.29). Annotation
    /// `sidecar.remora.io/nativeSidecar: "true"|"false"` decides per pod.
    #[arg(long)]
    pub legacy_sidecar: bool,
    /// Seconds the legacy-mode postStart hook and the startup probe give the proxy to
    /// become ready.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout_s: u32,
    /// imagePullPolicy of the injected containers.
    #[arg(long, default_value = "IfNotPresent")]
    pub image_pull_policy: String,
    /// Authenticate the proxy to the control plane: mount a projected ServiceAccount token
    /// (audience `--xds-token-audience`) for the xDS stream, and have the proxy make its own
    /// key and get its workload certificate signed (`REMORA_CSR_SECRET`). Off by default, for
    /// control planes without authentication; annotation `sidecar.remora.io/xdsAuth`
    /// decides per pod.
    #[arg(long)]
    pub xds_auth: bool,
    /// Audience of the projected token (`--xds-auth`).
    #[arg(long, default_value = DEFAULT_XDS_TOKEN_AUDIENCE)]
    pub xds_token_audience: String,
    /// Requested lifetime of the projected token in seconds (Kubernetes' minimum is 600).
    #[arg(long, default_value_t = DEFAULT_XDS_TOKEN_EXPIRATION_S,
          value_parser = clap::value_parser!(u32).range(600..))]
    pub xds_token_expiration_s: u32,
    /// Speak xDS over TLS, verified against the mesh's trust bundle: mount the ConfigMap
    /// `remora-ca-root-cert` the control plane publishes. Off by default; annotation
    /// `sidecar.remora.io/xdsTLS` decides per pod.
    #[arg(long)]
    pub xds_tls: bool,
    /// Subject alternative name the control plane's certificate must carry (`--xds-tls`):
    /// a `spiffe://` URI or a DNS name. Unset: the chain is checked, and the name the proxy
    /// connects to is sent as SNI.
    #[arg(long)]
    pub xds_san: Option<String>,
    /// Rewrite the app's HTTP, TCP and gRPC probes to the proxy's probe port (annotation
    /// `sidecar.remora.io/rewriteAppHTTPProbers` decides per pod).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub rewrite_app_probes: bool,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            init_image: DEFAULT_INIT_IMAGE.to_string(),
            xds_address: DEFAULT_XDS_ADDRESS.to_string(),
            proxy_cpu: "100m".to_string(),
            proxy_memory: "128Mi".to_string(),
            proxy_cpu_limit: "2".to_string(),
            proxy_memory_limit: "1Gi".to_string(),
            legacy_sidecar: false,
            ready_timeout_s: 120,
            image_pull_policy: "IfNotPresent".to_string(),
            xds_auth: false,
            xds_token_audience: DEFAULT_XDS_TOKEN_AUDIENCE.to_string(),
            xds_token_expiration_s: DEFAULT_XDS_TOKEN_EXPIRATION_S,
            xds_tls: false,
            xds_san: None,
            rewrite_app_probes: true,
        }
    }
}
