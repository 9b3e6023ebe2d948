//! `remora-injector`: the sidecar injector's command line.
//!
//! - `serve`: the admission webhook over HTTPS;
//! - `inject`: manual injection of YAML from a file or stdin, like `istioctl kube-inject`;
//! - `manifests`: the install manifests.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use remora_injector::config::InjectConfig;
use remora_injector::manifests::{self, ManifestConfig};
use remora_injector::server::{self, ReloadingTls};
use remora_injector::webhook::WebhookConfig;
use remora_injector::workload;

#[derive(Parser, Debug)]
#[command(name = "remora-injector", version, about = "Remora sidecar injector")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the mutating admission webhook (POST /inject) over HTTPS.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: SocketAddr,
        /// PEM certificate chain; re-read when it changes.
        #[arg(long, env = "REMORA_TLS_CERT")]
        tls_cert: PathBuf,
        /// PEM private key; re-read when it changes.
        #[arg(long, env = "REMORA_TLS_KEY")]
        tls_key: PathBuf,
        /// How often to check the certificate files for changes, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        reload_interval_ms: u64,
        /// Deny pods that cannot be injected (default: admit them without a sidecar,
        /// with a warning).
        #[arg(long)]
        fail_closed: bool,
        #[command(flatten)]
        inject: InjectConfig,
    },
    /// Inject Pods and workloads from multi-document YAML and print the result.
    Inject {
        /// Input file; `-` or absent reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        #[command(flatten)]
        inject: InjectConfig,
    },
    /// Print the manifests that install Remora into a cluster.
    Manifests {
        #[command(flatten)]
        config: ManifestConfig,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remora-injector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            tls_cert,
            tls_key,
            reload_interval_ms,
            fail_closed,
            inject,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve(
                listen,
                tls_cert,
                tls_key,
                Duration::from_millis(reload_interval_ms.max(10)),
                WebhookConfig {
                    inject,
                    fail_closed,
                },
            ))
        }
        Command::Inject { file, inject } => {
            let input = match file.as_deref() {
                None => read_stdin()?,
                Some(p) if p.as_os_str() == "-" => read_stdin()?,
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?,
            };
            print!("{}", workload::inject_yaml(&input, &inject)?);
            Ok(())
        }
        Command::Manifests { config } => {
            let ca = match &config.ca_bundle_file {
                Some(p) => {
                    Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
                }
                None => None,
            };
            print!("{}", manifests::render(&config, ca.as_deref())?);
            Ok(())
        }
    }
}

fn read_stdin() -> anyhow::Result<String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    Ok(input)
}

async fn serve(
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    reload_interval: Duration,
    config: WebhookConfig,
) -> anyhow::Result<()> {
    let tls = ReloadingTls::load(&cert, &key).context("loading the TLS certificate")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, "remora-injector serving /inject");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tls.spawn_watcher(reload_interval, stop_rx.clone());
    let server = tokio::spawn(server::serve(listener, tls, Arc::new(config), stop_rx));
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::join!(watcher, server);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
