//! `remora-quickstart`: a working mesh on this machine in one command. Starts the control plane
//! with its embedded store, a sample upstream, and one proxy bootstrapped to the control plane
//! over ADS; applies sample config through the API; prints what to try; stops everything on
//! Ctrl-C (or SIGTERM). With Jaeger (a `jaeger` binary on PATH, or `--jaeger PATH`) it starts it
//! too, the proxy sends every request's span there over OTLP/gRPC, and the Jaeger UI address is
//! printed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Run a local Remora mesh: control plane, one proxy, a sample upstream")]
struct Args {
    /// Port the proxy serves HTTP on.
    #[arg(long, default_value_t = 10000)]
    proxy_port: u16,
    /// Proxy admin port.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// Control-plane xDS (gRPC) port.
    #[arg(long, default_value_t = 18000)]
    xds_port: u16,
    /// Control-plane API port.
    #[arg(long, default_value_t = 19000)]
    api_port: u16,
    /// Directory for the control plane's store (default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The Jaeger binary to start (default: `jaeger` on PATH, if there is one).
    #[arg(long)]
    jaeger: Option<PathBuf>,
    /// Run without Jaeger even when one is found.
    #[arg(long)]
    no_jaeger: bool,
    /// Jaeger UI and query API port.
    #[arg(long, default_value_t = 16686)]
    jaeger_ui_port: u16,
    /// Jaeger OTLP/gRPC port (the proxy sends its spans there).
    #[arg(long, default_value_t = 4317)]
    jaeger_otlp_port: u16,
}

/// The `jaeger` to start: the one given, else the first on PATH.
fn jaeger_binary(args: &Args) -> Option<PathBuf> {
    if args.no_jaeger {
        return None;
    }
    args.jaeger.clone().or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("jaeger"))
                .find(|path| path.is_file())
        })
    })
}

/// The listener's tracing block and the collector cluster, when Jaeger runs.
fn tracing_config(otlp: Option<SocketAddr>) -> (String, String) {
    let Some(otlp) = otlp else {
        return (String::new(), String::new());
    };
    (
        r#"      tracing:
        provider:
          name: envoy.tracers.opentelemetry
          typed_config:
            "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
            grpc_service: { envoy_grpc: { cluster_name: jaeger }, timeout: 1s }
            service_name: quickstart-proxy
"#
        .to_string(),
        format!(
            r#"---
"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: jaeger
type: STATIC
connect_timeout: 1s
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: {{ http2_protocol_options: {{}} }}
load_assignment:
  cluster_name: jaeger
  endpoints:
  - lb_endpoints:
    - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
"#,
            ip = otlp.ip(),
            port = otlp.port()
        ),
    )
}

/// Kills (SIGTERM, then SIGKILL after a grace period) the processes it owns, in reverse order.
struct Children(Vec<(String, Child)>);

impl Children {
    fn spawn(&mut self, name: &str, command: &mut Command) -> anyhow::Result<()> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early with {status}; see its output above");
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in self.0.iter().rev() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        for (name, child) in self.0.iter_mut().rev() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                eprintln!("{name} did not stop in 10 s; killing it");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {}; build everything first: `cargo build --release --workspace`",
            name,
            exe.display()
        );
    }
    Ok(path)
}

fn bootstrap(args: &Args) -> String {
    format!(
        r#"node:
  id: quickstart-proxy
  cluster: quickstart
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{ cluster_name: xds_cluster }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds_cluster
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds_cluster
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {xds} }} }} }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
"#,
        xds = args.xds_port,
        admin = args.admin_port
    )
}

fn sample_config(args: &Args, upstream: SocketAddr, otlp: Option<SocketAddr>) -> String {
    let (tracing, collector) = tracing_config(otlp);
    format!(
        r#""@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: echo
type: EDS
connect_timeout: 1s
eds_cluster_config: {{ eds_config: {{ ads: {{}}, resource_api_version: V3 }} }}
---
"@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
cluster_name: echo
endpoints:
- lb_endpoints:
  - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
---
"@type": type.googleapis.com/envoy.config.listener.v3.Listener
name: http
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {proxy} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: http
{tracing}      rds:
        route_config_name: local
        config_source: {{ ads: {{}}, resource_api_version: V3 }}
      http_filters:
      - name: envoy.filters.http.router
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
---
"@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
name: local
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {{ prefix: "/" }}
    route: {{ cluster: echo }}
{collector}"#,
        ip = upstream.ip(),
        port = upstream.port(),
        proxy = args.proxy_port
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| work.path().join("cp-data"));
    std::fs::create_dir_all(&data_dir)?;
    let api: SocketAddr = ([127, 0, 0, 1], args.api_port).into();
    let proxy: SocketAddr = ([127, 0, 0, 1], args.proxy_port).into();
    let admin: SocketAddr = ([127, 0, 0, 1], args.admin_port).into();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let stop = stop.clone();
        signal_hook::flag::register(signal, stop)?;
    }

    let upstream = remora_tests::echo::EchoServer::start("echo-1", "127.0.0.1");
    let mut children = Children(Vec::new());
    // Jaeger first, so the proxy's first spans have somewhere to go.
    let jaeger_ui: SocketAddr = ([127, 0, 0, 1], args.jaeger_ui_port).into();
    let otlp = match jaeger_binary(&args) {
        Some(binary) => {
            let config = work.path().join("jaeger.yaml");
            std::fs::write(
                &config,
                // Only the UI and OTLP/gRPC ports matter here; the others take free ones.
                remora_tests::jaeger::config(
                    args.jaeger_otlp_port,
                    remora_tests::free_port(),
                    remora_tests::free_port(),
                    args.jaeger_ui_port,
                    remora_tests::free_port(),
                ),
            )?;
            children.spawn("jaeger", Command::new(&binary).arg("--config").arg(&config))?;
            remora_tests::wait_for_port(jaeger_ui, Duration::from_secs(60));
            Some(SocketAddr::from(([127, 0, 0, 1], args.jaeger_otlp_port)))
        }
        None => None,
    };
    children.spawn(
        "remora-cp",
        Command::new(sibling_binary("remora-cp")?)
            .arg("--xds-addr")
            .arg(format!("127.0.0.1:{}", args.xds_port))
            .arg("--api-addr")
            .arg(api.to_string())
            .arg("--data-dir")
            .arg(&data_dir),
    )?;
    remora_tests::wait_for_port(api, Duration::from_secs(20));

    let applied = remora_tests::http_request(
        api,
        "POST",
        "/v1/apply",
        &[("content-type", "application/yaml")],
        &sample_config(&args, upstream.addr, otlp),
    )
    .context("apply the sample config")?;
    if applied.0 != 200 {
        bail!(
            "the control plane refused the sample config: {} {}",
            applied.0,
            applied.2
        );
    }

    let bootstrap_path = work.path().join("bootstrap.yaml");
    std::fs::write(&bootstrap_path, bootstrap(&args))?;
    children.spawn(
        "remora-proxy",
        Command::new(sibling_binary("remora-proxy")?)
            .arg("-c")
            .arg(&bootstrap_path)
            .args(["--concurrency", "1"]),
    )?;

    // Ready when a request through the proxy reaches the upstream.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        children.check_running()?;
        if let Ok((200, _, body)) = remora_tests::http_get(proxy, "/hello")
            && body.contains("echo-1")
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the proxy did not start serving the sample route within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    println!("Remora mesh is up.");
    println!("  try:            curl -s http://{proxy}/hello");
    println!("  proxy admin:    http://{admin}/stats   http://{admin}/config_dump");
    println!(
        "  control plane:  http://{api}/v1/proxies   (remoractl --server http://{api} status)"
    );
    println!("  bootstrap:      {}", bootstrap_path.display());
    if otlp.is_some() {
        println!(
            "  traces:         http://{jaeger_ui}/search?service=quickstart-proxy   (Jaeger UI; every request is traced)"
        );
    } else {
        println!(
            "  traces:         off (no jaeger found; give --jaeger PATH, see README \"See traces in Jaeger\")"
        );
    }
    println!("Press Ctrl-C to stop.");

    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        children.check_running()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("Stopping...");
    drop(children);
    drop(upstream);
    println!("Stopped.");
    Ok(())
}
