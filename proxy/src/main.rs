//! `remora-proxy`: parse the command line, load the bootstrap, run the proxy.

use clap::Parser;
use remora_proxy::admin::logging;
use remora_proxy::cli::{Cli, Command, Mode};
use remora_proxy::config::sources::{self, Sources};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::WaitReady {
        admin_port,
        timeout_s,
    }) = &cli.command
    {
        let ready =
            remora_proxy::cli::wait_ready(*admin_port, std::time::Duration::from_secs(*timeout_s));
        if !ready {
            eprintln!(
                "remora-proxy wait-ready: 127.0.0.1:{admin_port}/ready not 200 after {timeout_s}s"
            );
        }
        return if ready { 0.into() } else { 1.into() };
    }
    if !logging::is_level(&cli.log_level) {
        eprintln!(
            "error: invalid log level specified {:?} (one of trace, debug, info, warning, error, critical, off)",
            cli.log_level
        );
        return 1.into();
    }
    init_logging(&cli.log_level);
    let given = Sources {
        config_path: cli.config_path.clone(),
        config_yaml: cli.config_yaml.clone(),
        from_env: cli.bootstrap_from_env,
        service_node: cli.service_node.clone(),
        service_cluster: cli.service_cluster.clone(),
    };
    let bootstrap = match sources::load(&given) {
        Ok(bootstrap) => bootstrap,
        Err(error) => {
            eprintln!("error: invalid bootstrap: {error}");
            return 1.into();
        }
    };
    remora_proxy::http::codec_guard::strip_fragments(bootstrap.runtime.strip_path_fragment);
    if let Some(format) = &bootstrap.app_log {
        remora_proxy::app_log::set_format(format.clone());
    }
    if cli.mode != Mode::Validate
        && let Some(path) = &bootstrap.outlier_event_log
    {
        let sink = remora_proxy::http::access_log::Sink::for_path(path);
        remora_proxy::upstream::health::outlier::set_event_log(Box::new(move |line| {
            sink.append(line)
        }));
    }
    // The app's probes the injector rewrote: checked in both modes, served in `serve`.
    let app_probes = if cli.bootstrap_from_env {
        match remora_proxy::probes::from_env() {
            Ok(probes) => probes,
            Err(error) => {
                eprintln!("error: invalid bootstrap: {error}");
                return 1.into();
            }
        }
    } else {
        None
    };
    if cli.mode == Mode::Validate {
        if let Err(error) = remora_proxy::tls::check_files(&bootstrap) {
            eprintln!("error: invalid bootstrap: {error}");
            return 1.into();
        }
        println!("configuration is valid");
        return 0.into();
    }
    if let Some(probes) = app_probes {
        let listen = probes.listen;
        if let Err(error) = remora_proxy::probes::spawn(probes) {
            eprintln!("error: probe server cannot listen on {listen}: {error}");
            return 1.into();
        }
    }
    remora_proxy::memory::release_config_memory();
    let concurrency = cli.concurrency.filter(|n| *n > 0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    match remora_proxy::server::run(bootstrap, concurrency, cli.drain_time(), cli.xds_identity()) {
        Ok(()) => 0.into(),
        Err(error) => {
            eprintln!("error: {error:#}");
            1.into()
        }
    }
}

/// Logs to stderr at `-l`'s level, through a filter that admin's `/logging` can swap.
fn init_logging(level: &str) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, reload};
    let initial = EnvFilter::new(logging::initial_filter(level));
    let (filter, handle) = reload::Layer::new(initial);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .event_format(remora_proxy::app_log::Lines::default()),
        )
        .init();
    logging::install(
        level,
        Box::new(move |directives| {
            let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }),
    );
}
