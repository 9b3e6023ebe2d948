//! Traffic capture: the nat-table rules that steer a pod's TCP traffic through the proxy.
//!
//! `remora-init` runs this module inside the pod's network namespace before any other
//! container starts. Inbound TCP (PREROUTING) is redirected to the proxy's inbound port,
//! locally originated TCP (OUTPUT) to its outbound port; the proxy's own uid/gid is exempt
//! so its upstream connections do not loop back into it. The rules live in chains named
//! `REMORA_*` and are installed in one `iptables-restore --noflush` transaction that also
//! removes the jumps of an earlier run, so re-running replaces our rules atomically and
//! leaves everyone else's alone.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Chain reached from PREROUTING for inbound traffic.
pub const CHAIN_INBOUND: &str = "REMORA_INBOUND";
/// Chain that redirects to the proxy's inbound port.
pub const CHAIN_IN_REDIRECT: &str = "REMORA_IN_REDIRECT";
/// Chain reached from OUTPUT for locally originated traffic.
pub const CHAIN_OUTPUT: &str = "REMORA_OUTPUT";
/// Chain that redirects to the proxy's outbound port.
pub const CHAIN_REDIRECT: &str = "REMORA_REDIRECT";
/// Every chain we own, in declaration order.
pub const CHAINS: [&str; 4] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];
/// Prefix that marks a chain as ours.
pub const CHAIN_PREFIX: &str = "REMORA_";

/// An error in capture settings or while applying them.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("invalid port {0:?}: expected an integer 1-65535")]
    InvalidPort(String),
    #[error("invalid CIDR {0:?}: expected ADDRESS/PREFIX, e.g. 10.0.0.0/8 or fd00::/8")]
    InvalidCidr(String),
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
}

/// An IP network in CIDR notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX`; a bare address means a single host.
    pub fn parse(text: &str) -> Result<Self, CaptureError> {
        let invalid = || CaptureError::InvalidCidr(text.to_string());
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.trim().parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            Some(p) => p.trim().parse::<u8>().map_err(|_| invalid())?,
            None => max,
        };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Self { addr, prefix })
    }

    fn family(&self) -> Family {
        if self.addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A set of ports: every port, or the listed ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSet {
    All,
    Only(Vec<u16>),
}

/// A set of networks: every address, or the listed networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CidrSet {
    All,
    Only(Vec<Cidr>),
}

fn split_list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Parses a comma-separated list of ports (`"8080, 9090"`); empty text is an empty list.
pub fn parse_ports(text: &str) -> Result<Vec<u16>, CaptureError> {
    let mut ports = split_list(text)
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(CaptureError::InvalidPort(p.to_string())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Parses a port list where `*` means every port.
pub fn parse_port_set(text: &str) -> Result<PortSet, CaptureError> {
    if text.trim() == "*" {
        Ok(PortSet::All)
    } else {
        parse_ports(text).map(PortSet::Only)
    }
}

/// Parses a comma-separated list of CIDRs; empty text is an empty list.
pub fn parse_cidrs(text: &str) -> Result<Vec<Cidr>, CaptureError> {
    let mut cidrs = split_list(text)
        .map(Cidr::parse)
        .collect::<Result<Vec<_>, _>>()?;
    cidrs.sort_unstable();
    cidrs.dedup();
    Ok(cidrs)
}

/// Parses a CIDR list where `*` means every address.
pub fn parse_cidr_set(text: &str) -> Result<CidrSet, CaptureError> {
    if text.trim() == "*" {
        Ok(CidrSet::All)
    } else {
        parse_cidrs(text).map(CidrSet::Only)
    }
}

/// Formats ports the way the parsers read them back.
pub fn format_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The address family a ruleset is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore_program(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn save_program(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn loopback_host(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// Source address the proxy binds for inbound passthrough to the app, as Envoy does.
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// What to capture and where to send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub include_inbound_ports: PortSet,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub include_outbound_cidrs: CidrSet,
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            inbound_port: crate::ports::INBOUND,
            outbound_port: crate::ports::OUTBOUND,
            proxy_uid: crate::ports::PROXY_UID,
            proxy_gid: crate::ports::PROXY_UID,
            include_inbound_ports: PortSet::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_cidrs: CidrSet::All,
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

/// The `iptables-restore` input (nat table) that installs our chains for one family.
///
/// Chain declarations (`:REMORA_X - [0:0]`) create the chain or, under `--noflush`, empty
/// the existing one, which is what makes re-running replace rather than append.
pub fn ruleset(config: &CaptureConfig, family: Family) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    out.push_str(&install_rules(config, family));
    out.push_str("COMMIT\n");
    out
}

fn install_rules(config: &CaptureConfig, family: Family) -> String {
    let uid = config.proxy_uid;
    let gid = config.proxy_gid;
    let lo_host = family.loopback_host();
    let mut rules: Vec<String> = Vec::new();
    let mut rule = |r: String| rules.push(r);

    rule(format!(
        "-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        config.inbound_port
    ));
    rule(format!(
        "-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    ));

    // Inbound: excluded ports pass straight to the app; the rest goes to the proxy.
    for port in &config.exclude_inbound_ports {
        rule(format!(
            "-A {CHAIN_INBOUND} -p tcp --dport {port} -j RETURN"
        ));
    }
    match &config.include_inbound_ports {
        PortSet::All => rule(format!("-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}")),
        PortSet::Only(ports) => {
            for port in ports {
                rule(format!(
                    "-A {CHAIN_INBOUND} -p tcp --dport {port} -j {CHAIN_IN_REDIRECT}"
                ));
            }
        }
    }

    // Outbound, in order: the proxy's passthrough connections to the app; the proxy
    // reaching the pod's own IP (an app calling itself through a service) is inbound
    // traffic; other loopback traffic stays local; the proxy itself is never captured.
    rule(format!(
        "-A {CHAIN_OUTPUT} -s {} -o lo -j RETURN",
        family.passthrough_source()
    ));
    rule(format!(
        "-A {CHAIN_OUTPUT} ! -d {lo_host} -o lo -p tcp -m owner --uid-owner {uid} -j {CHAIN_IN_REDIRECT}"
    ));
    rule(format!(
        "-A {CHAIN_OUTPUT} -o lo -m owner ! --uid-owner {uid} -j RETURN"
    ));
    rule(format!(
        "-A {CHAIN_OUTPUT} -m owner --uid-owner {uid} -j RETURN"
    ));
    rule(format!(
        "-A {CHAIN_OUTPUT} ! -d {lo_host} -o lo -p tcp -m owner --gid-owner {gid} -j {CHAIN_IN_REDIRECT}"
    ));
    rule(format!(
        "-A {CHAIN_OUTPUT} -o lo -m owner ! --gid-owner {gid} -j RETURN"
    ));
    rule(format!(
        "-A {CHAIN_OUTPUT} -m owner --gid-owner {gid} -j RETURN"
    ));
    rule(format!("-A {CHAIN_OUTPUT} -d {lo_host} -j RETURN"));
    for port in &config.exclude_outbound_ports {
        rule(format!("-A {CHAIN_OUTPUT} -p tcp --dport {port} -j RETURN"));
    }
    for cidr in config
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| c.family() == family)
    {
        rule(format!("-A {CHAIN_OUTPUT} -d {cidr} -j RETURN"));
    }
    match &config.include_outbound_cidrs {
        CidrSet::All => rule(format!("-A {CHAIN_OUTPUT} -j {CHAIN_REDIRECT}")),
        CidrSet::Only(cidrs) => {
            for cidr in cidrs.iter().filter(|c| c.family() == family) {
                rule(format!("-A {CHAIN_OUTPUT} -d {cidr} -j {CHAIN_REDIRECT}"));
            }
        }
    }

    // Hooks last, so traffic meets complete chains the moment the transaction commits.
    rule(format!("-A PREROUTING -p tcp -j {CHAIN_INBOUND}"));
    rule(format!("-A OUTPUT -p tcp -j {CHAIN_OUTPUT}"));

    let mut text = rules.join("\n");
    text.push('\n');
    text
}

/// Restore commands that undo whatever an earlier run left, read from `iptables-save`
/// output: delete each rule in a built-in chain that jumps to one of ours, then flush
/// and delete our chains.
pub fn removal_commands(saved_nat: &str) -> Vec<String> {
    let mut in_nat = false;
    let mut deletes = Vec::new();
    let mut chains = Vec::new();
    for line in saved_nat.lines() {
        let line = line.trim();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if name.starts_with(CHAIN_PREFIX) {
                chains.push(name.to_string());
            }
        } else if let Some(spec) = line.strip_prefix("-A ") {
            let chain = spec.split_whitespace().next().unwrap_or_default();
            let jumps_to_ours = spec
                .split_whitespace()
                .skip_while(|w| *w != "-j")
                .nth(1)
                .is_some_and(|target| target.starts_with(CHAIN_PREFIX));
            if !chain.starts_with(CHAIN_PREFIX) && jumps_to_ours {
                deletes.push(format!("-D {spec}"));
            }
        }
    }
    let mut commands = deletes;
    commands.extend(chains.iter().map(|c| format!("-F {c}")));
    commands.extend(chains.iter().map(|c| format!("-X {c}")));
    commands
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CaptureError> {
    let spawn_err = |source| CaptureError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let output = child.wait_with_output().map_err(spawn_err)?;
    if !output.status.success() {
        return Err(CaptureError::Failed {
            program: program.to_string(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn saved_nat(family: Family) -> Result<String, CaptureError> {
    run(family.save_program(), &["-t", "nat"], None)
}

/// Installs the rules for one family, replacing any earlier run's, in one transaction.
pub fn apply(config: &CaptureConfig, family: Family) -> Result<(), CaptureError> {
    let removal = removal_commands(&saved_nat(family)?);
    // Old jumps go first; the chain declarations then empty our chains in place, so the
    // `-F`/`-X` part of the removal is not needed when reinstalling.
    let deletes: Vec<&String> = removal.iter().filter(|c| c.starts_with("-D ")).collect();
    let mut input = String::from("*nat\n");
    for chain in CHAINS {
        input.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for delete in deletes {
        input.push_str(delete);
        input.push('\n');
    }
    input.push_str(&install_rules(config, family));
    input.push_str("COMMIT\n");
    run(family.restore_program(), &["--noflush"], Some(&input))?;
    Ok(())
}

/// Removes every rule and chain this module installed for one family.
pub fn cleanup(family: Family) -> Result<(), CaptureError> {
    let removal = removal_commands(&saved_nat(family)?);
    if removal.is_empty() {
        return Ok(());
    }
    let mut input = String::from("*nat\n");
    for command in removal {
        input.push_str(&command);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    run(family.restore_program(), &["--noflush"], Some(&input))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_sorted_and_deduplicated() {
        assert_eq!(parse_ports(" 9090,80 ,80").ok(), Some(vec![80, 9090]));
        assert_eq!(parse_ports("").ok(), Some(vec![]));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("70000").is_err());
        assert!(parse_ports("http").is_err());
        assert_eq!(parse_port_set("*").ok(), Some(PortSet::All));
    }

    #[test]
    fn parses_cidrs_of_both_families() {
        let cidrs = parse_cidrs("10.0.0.0/8, fd00::/8,192.168.1.1").ok();
        let shown: Option<Vec<String>> = cidrs.map(|c| c.iter().map(ToString::to_string).collect());
        assert_eq!(
            shown,
            Some(vec![
                "10.0.0.0/8".to_string(),
                "192.168.1.1/32".to_string(),
                "fd00::/8".to_string()
            ])
        );
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("not-an-ip/8").is_err());
        assert_eq!(parse_cidr_set("*").ok(), Some(CidrSet::All));
    }

    #[test]
    fn cidrs_of_the_other_family_are_left_out() {
        let config = CaptureConfig {
            exclude_outbound_cidrs: parse_cidrs("10.0.0.0/8,fd00::/8").unwrap_or_default(),
            ..CaptureConfig::default()
        };
        let v4 = ruleset(&config, Family::V4);
        let v6 = ruleset(&config, Family::V6);
        assert!(v4.contains("-d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::/8"));
        assert!(v6.contains("-d fd00::/8 -j RETURN") && !v6.contains("10.0.0.0/8"));
    }

    #[test]
    fn removal_finds_only_our_jumps_and_chains() {
        let saved = "\
# Generated by iptables-save
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j REMORA_NOT_NAT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:REMORA_INBOUND - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j REMORA_INBOUND
-A PREROUTING -p tcp -j OTHER
-A OUTPUT -p tcp -j REMORA_OUTPUT
-A REMORA_INBOUND -p tcp -j REMORA_IN_REDIRECT
COMMIT
";
        assert_eq!(
            removal_commands(saved),
            vec![
                "-D PREROUTING -p tcp -j REMORA_INBOUND",
                "-D OUTPUT -p tcp -j REMORA_OUTPUT",
                "-F REMORA_INBOUND",
                "-X REMORA_INBOUND",
            ]
        );
    }
}
