//! Filter chain selection with Envoy's precedence: destination port, destination IP (longest
//! prefix), server name (exact, then longest wildcard), transport protocol, application
//! protocols, direct source IP, source type, source IP, source port. At each step the most
//! specific match wins and the search never backtracks to a less specific branch.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::{CidrRange, FilterChain, Listener, SourceType};
use crate::tls::PeerCertificate;

/// What is known about a connection when a chain is chosen.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Local (or original destination) address.
    pub destination: SocketAddr,
    pub source: SocketAddr,
    pub direct_source: SocketAddr,
    /// The SNI of the downstream's TLS hello (shared: access log entries keep it).
    pub server_name: Option<Arc<str>>,
    pub transport_protocol: &'static str,
    pub application_protocols: Vec<String>,
    /// The downstream's TLS certificate, once a handshake on this connection verified one.
    pub peer_certificate: Option<Arc<PeerCertificate>>,
    /// This proxy terminated TLS on the connection (with or without a client certificate);
    /// `transport_protocol` alone also says `tls` for TLS passed through.
    pub tls_terminated: bool,
}

/// Narrows `candidates` to those with the best score; `None` scores mean "does not match";
/// a score of 0 means "field unset" (wildcard).
fn narrow(
    candidates: Vec<&Arc<FilterChain>>,
    score: impl Fn(&FilterChain) -> Option<u32>,
) -> Vec<&Arc<FilterChain>> {
    let scored: Vec<(u32, &Arc<FilterChain>)> = candidates
        .into_iter()
        .filter_map(|c| score(c).map(|s| (s, c)))
        .collect();
    let best = scored.iter().map(|(s, _)| *s).max();
    match best {
        Some(best) => scored
            .into_iter()
            .filter(|(s, _)| *s == best)
            .map(|(_, c)| c)
            .collect(),
        None => Vec::new(),
    }
}

fn cidr_score(ranges: &[CidrRange], ip: IpAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|r| r.contains(ip))
        .map(|r| u32::from(r.len) + 1)
        .max()
}

fn server_name_score(names: &[String], sni: Option<&str>) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    let mut best = None;
    for name in names {
        if name == sni {
            return Some(u32::MAX);
        }
        if let Some(suffix) = name.strip_prefix('*')
            && sni.len() > suffix.len()
            && sni.ends_with(suffix)
        {
            best = best.max(Some(suffix.len() as u32 + 1));
        }
    }
    best
}

fn is_local(source: IpAddr, destination: IpAddr) -> bool {
    source.is_loopback() || source == destination
}

/// The chain for a connection, or the listener's default chain, or `None`.
pub fn select<'a>(listener: &'a Listener, info: &ConnectionInfo) -> Option<&'a Arc<FilterChain>> {
    let mut candidates: Vec<&Arc<FilterChain>> = listener.filter_chains.iter().collect();
    let dst_port = info.destination.port();
    candidates = narrow(candidates, |c| match c.filter_match.destination_port {
        None => Some(0),
        Some(p) if p == dst_port => Some(1),
        Some(_) => None,
    });
    candidates = narrow(candidates, |c| {
        cidr_score(&c.filter_match.prefix_ranges, info.destination.ip())
    });
    candidates = narrow(candidates, |c| {
        server_name_score(&c.filter_match.server_names, info.server_name.as_deref())
    });
    candidates = narrow(candidates, |c| match &c.filter_match.transport_protocol {
        None => Some(0),
        Some(t) if t == info.transport_protocol => Some(1),
        Some(_) => None,
    });
    candidates = narrow(candidates, |c| {
        let wanted = &c.filter_match.application_protocols;
        if wanted.is_empty() {
            Some(0)
        } else if info
            .application_protocols
            .iter()
            .any(|p| wanted.contains(p))
        {
            Some(1)
        } else {
            None
        }
    });
    candidates = narrow(candidates, |c| {
        cidr_score(
            &c.filter_match.direct_source_prefix_ranges,
            info.direct_source.ip(),
        )
    });
    candidates = narrow(candidates, |c| match c.filter_match.source_type {
        SourceType::Any => Some(0),
        SourceType::SameIpOrLoopback if is_local(info.source.ip(), info.destination.ip()) => {
            Some(1)
        }
        SourceType::External if !is_local(info.source.ip(), info.destination.ip()) => Some(1),
        _ => None,
    });
    candidates = narrow(candidates, |c| {
        cidr_score(&c.filter_match.source_prefix_ranges, info.source.ip())
    });
    candidates = narrow(candidates, |c| {
        if c.filter_match.source_ports.is_empty() {
            Some(0)
        } else if c.filter_match.source_ports.contains(&info.source.port()) {
            Some(1)
        } else {
            None
        }
    });
    candidates
        .first()
        .copied()
        .or(listener.default_filter_chain.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(yaml: &str) -> Listener {
        let proto: xds_api::envoy::config::listener::v3::Listener =
            xds_api::json::from_yaml_str(yaml).expect("listener yaml");
        remora_config::listener::listener(&proto, "", crate::config::Files::Read)
            .expect("valid listener")
    }

    const TCP: &str = r#"filters: [{name: t, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c}}]"#;

    fn info(dst: &str, src: &str, sni: Option<&str>) -> ConnectionInfo {
        ConnectionInfo {
            destination: dst.parse().expect("addr"),
            source: src.parse().expect("addr"),
            direct_source: src.parse().expect("addr"),
            server_name: sni.map(Arc::from),
            transport_protocol: if sni.is_some() { "tls" } else { "raw_buffer" },
            application_protocols: Vec::new(),
            peer_certificate: None,
            tls_terminated: false,
        }
    }

    #[test]
    fn precedence_and_no_backtracking() {
        let l = listener(&format!(
            r#"
name: l
address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}
filter_chains:
- {{name: port, filter_chain_match: {{destination_port: 8080, server_names: [a.com]}}, {TCP}}}
- {{name: wide, filter_chain_match: {{prefix_ranges: [{{address_prefix: 10.0.0.0, prefix_len: 8}}]}}, {TCP}}}
- {{name: narrow, filter_chain_match: {{prefix_ranges: [{{address_prefix: 10.1.0.0, prefix_len: 16}}]}}, {TCP}}}
- {{name: wild, filter_chain_match: {{server_names: ["*.b.com"]}}, {TCP}}}
- {{name: any, {TCP}}}
default_filter_chain: {{name: default, {TCP}}}
"#
        ));
        let name = |i: ConnectionInfo| select(&l, &i).map(|c| c.name.clone());
        assert_eq!(
            name(info("10.1.2.3:80", "1.1.1.1:5", None)).as_deref(),
            Some("narrow")
        );
        assert_eq!(
            name(info("10.2.2.3:80", "1.1.1.1:5", None)).as_deref(),
            Some("wide")
        );
        assert_eq!(
            name(info("192.168.0.1:80", "1.1.1.1:5", Some("x.b.com"))).as_deref(),
            Some("wild")
        );
        assert_eq!(
            name(info("192.168.0.1:80", "1.1.1.1:5", None)).as_deref(),
            Some("any")
        );
        // Port 8080 matches the `port` chain's port, but its server name does not: no backtracking.
        assert_eq!(
            name(info("192.168.0.1:8080", "1.1.1.1:5", None)).as_deref(),
            Some("default")
        );
    }
}
