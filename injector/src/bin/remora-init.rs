//! `remora-init`: installs (or, with `--cleanup`, removes) the nat-table rules that send a
//! pod's TCP traffic through the Remora proxy. Runs as the pod's first init container with
//! NET_ADMIN and NET_RAW. Every flag can also come from an environment variable.

use std::process::ExitCode;

use clap::Parser;
use remora_injector::capture::{self, CaptureConfig, Family};
use remora_injector::ports;

#[derive(Parser, Debug)]
#[command(
    name = "remora-init",
    version,
    about = "Install Remora's traffic-capture rules"
)]
struct Cli {
    /// Proxy port that receives inbound traffic.
    #[arg(long, env = "REMORA_CAPTURE_INBOUND_PORT", default_value_t = ports::INBOUND)]
    inbound_port: u16,
    /// Proxy port that receives outbound traffic.
    #[arg(long, env = "REMORA_CAPTURE_OUTBOUND_PORT", default_value_t = ports::OUTBOUND)]
    outbound_port: u16,
    /// uid of the proxy; its traffic is not captured.
    #[arg(long, env = "REMORA_CAPTURE_PROXY_UID", default_value_t = ports::PROXY_UID)]
    proxy_uid: u32,
    /// gid of the proxy; its traffic is not captured.
    #[arg(long, env = "REMORA_CAPTURE_PROXY_GID", default_value_t = ports::PROXY_UID)]
    proxy_gid: u32,
    /// Inbound ports to capture, comma-separated, or `*` for all.
    #[arg(
        long,
        env = "REMORA_CAPTURE_INCLUDE_INBOUND_PORTS",
        default_value = "*"
    )]
    include_inbound_ports: String,
    /// Inbound ports never captured.
    #[arg(long, env = "REMORA_CAPTURE_EXCLUDE_INBOUND_PORTS", default_value = "")]
    exclude_inbound_ports: String,
    /// Outbound destination ports never captured.
    #[arg(
        long,
        env = "REMORA_CAPTURE_EXCLUDE_OUTBOUND_PORTS",
        default_value = ""
    )]
    exclude_outbound_ports: String,
    /// Outbound destination CIDRs to capture, comma-separated, or `*` for all.
    #[arg(
        long,
        env = "REMORA_CAPTURE_INCLUDE_OUTBOUND_CIDRS",
        default_value = "*"
    )]
    include_outbound_cidrs: String,
    /// Outbound destination CIDRs never captured.
    #[arg(
        long,
        env = "REMORA_CAPTURE_EXCLUDE_OUTBOUND_CIDRS",
        default_value = ""
    )]
    exclude_outbound_cidrs: String,
    /// Leave IPv6 alone (for nodes without ip6tables).
    #[arg(long, env = "REMORA_CAPTURE_NO_IPV6")]
    no_ipv6: bool,
    /// Print the iptables-restore input instead of applying it.
    #[arg(long)]
    dry_run: bool,
    /// Remove the rules and chains an earlier run installed.
    #[arg(long, conflicts_with = "dry_run")]
    cleanup: bool,
}

impl Cli {
    fn capture_config(&self) -> Result<CaptureConfig, capture::CaptureError> {
        Ok(CaptureConfig {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            include_inbound_ports: capture::parse_port_set(&self.include_inbound_ports)?,
            exclude_inbound_ports: capture::parse_ports(&self.exclude_inbound_ports)?,
            exclude_outbound_ports: capture::parse_ports(&self.exclude_outbound_ports)?,
            include_outbound_cidrs: capture::parse_cidr_set(&self.include_outbound_cidrs)?,
            exclude_outbound_cidrs: capture::parse_cidrs(&self.exclude_outbound_cidrs)?,
        })
    }

    fn families(&self) -> Vec<Family> {
        if self.no_ipv6 {
            vec![Family::V4]
        } else {
            vec![Family::V4, Family::V6]
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.capture_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("remora-init: {e}");
            return ExitCode::from(2);
        }
    };
    for family in cli.families() {
        let result = if cli.dry_run {
            print!("# {family}\n{}", capture::ruleset(&config, family));
            Ok(())
        } else if cli.cleanup {
            capture::cleanup(family)
        } else {
            capture::apply(&config, family)
        };
        if let Err(e) = result {
            eprintln!("remora-init: {family}: {e}");
            return ExitCode::FAILURE;
        }
        if !cli.dry_run {
            let done = if cli.cleanup { "removed" } else { "installed" };
            eprintln!("remora-init: {family} capture rules {done}");
        }
    }
    ExitCode::SUCCESS
}
