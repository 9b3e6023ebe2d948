//! The command line: a subset of Envoy's flags with the same meaning, plus the injector's
//! `--bootstrap-from-env` and the `wait-ready` probe helper.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "remora-proxy",
    version,
    about = "Remora: an Envoy-compatible sidecar proxy"
)]
pub struct Cli {
    /// Path to the v3 bootstrap (YAML or JSON).
    #[arg(short = 'c', long = "config-path")]
    pub config_path: Option<PathBuf>,
    /// Bootstrap YAML merged over the file (protobuf merge, as Envoy does).
    #[arg(long = "config-yaml")]
    pub config_yaml: Option<String>,
    /// Build the bootstrap from REMORA_* environment variables (sidecar injector).
    #[arg(long = "bootstrap-from-env")]
    pub bootstrap_from_env: bool,
    /// Number of worker threads (default: number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Log level: trace, debug, info, warning, warn, error, critical, off.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    pub log_level: String,
    /// Node id (overrides node.id).
    #[arg(long = "service-node")]
    pub service_node: Option<String>,
    /// Node cluster (overrides node.cluster).
    #[arg(long = "service-cluster")]
    pub service_cluster: Option<String>,
    /// `serve` (default) or `validate` (check the bootstrap and exit 0/1).
    #[arg(long, value_enum, default_value = "serve")]
    pub mode: Mode,
    /// How long draining (SIGTERM, listener updates) waits for open connections, in seconds.
    #[arg(long = "drain-time-s", default_value_t = 600)]
    pub drain_time_s: u64,
    /// Accepted for Envoy compatibility; Remora has no hot restart.
    #[arg(long = "disable-hot-restart")]
    pub disable_hot_restart: bool,
    /// Accepted for Envoy compatibility; Remora has no shared memory.
    #[arg(long = "base-id")]
    pub base_id: Option<u32>,
    /// A file holding the credential for the xDS server (a Kubernetes projected service
    /// account token, or a bootstrap token), sent as `authorization: Bearer ...` on every ADS
    /// stream and certificate request; read again for each, so a rotated token is picked up.
    #[arg(long = "xds-token-file", env = "REMORA_XDS_TOKEN_FILE")]
    pub xds_token_file: Option<PathBuf>,
    /// Make the certificate secret of this name here instead of receiving it by SDS: a key
    /// generated in this process and a certificate request signed by the control plane's
    /// remora.ca.v1.CertificateService on the ADS cluster, renewed at half life.
    #[arg(long = "csr-secret", env = "REMORA_CSR_SECRET")]
    pub csr_secret: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Serve,
    Validate,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exit 0 once GET 127.0.0.1:PORT/ready answers 200, 1 after the timeout.
    WaitReady {
        #[arg(long = "admin-port")]
        admin_port: u16,
        #[arg(long = "timeout-s", default_value_t = 60)]
        timeout_s: u64,
    },
}

impl Cli {
    pub fn drain_time(&self) -> Duration {
        Duration::from_secs(self.drain_time_s)
    }

    /// How this proxy identifies itself to the xDS server.
    pub fn xds_identity(&self) -> XdsIdentity {
        XdsIdentity {
            token_file: self.xds_token_file.clone(),
            csr_secret: self.csr_secret.clone(),
        }
    }
}

/// How the proxy identifies itself to the xDS server beyond the bootstrap (Remora's own).
#[derive(Debug, Clone, Default)]
pub struct XdsIdentity {
    /// `--xds-token-file`.
    pub token_file: Option<PathBuf>,
    /// `--csr-secret`.
    pub csr_secret: Option<String>,
}

/// Polls the admin `/ready` endpoint until it answers 200 or the deadline passes.
pub fn wait_ready(admin_port: u16, timeout: Duration) -> bool {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let mut pause = Duration::from_millis(10);
    loop {
        let ok = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            .and_then(|mut stream| {
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                stream.write_all(
                    b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                )?;
                let mut response = Vec::new();
                stream.read_to_end(&mut response)?;
                Ok(response.starts_with(b"HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if ok {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
