//! Names of generated resources and the host names a service answers to. One place, so the
//! listener that references a route configuration and the route configuration agree.

use std::net::IpAddr;

use crate::mesh::model::{ObjectKey, Protocol};

/// The listener on the outbound capture port (15001).
pub const OUTBOUND_LISTENER: &str = "outbound";
/// The listener on the inbound capture port (15006).
pub const INBOUND_LISTENER: &str = "inbound";
/// The ORIGINAL_DST cluster for destinations the mesh does not know.
pub const PASSTHROUGH_CLUSTER: &str = "passthrough";
/// SDS secret with the workload's certificate and key (mTLS).
pub const WORKLOAD_CERT_SECRET: &str = "remora-workload-cert";
/// SDS secret with the mesh's trust bundle (mTLS).
pub const TRUST_BUNDLE_SECRET: &str = "remora-trust-bundle";

/// `svc.ns.svc.<domain>`.
pub fn service_host(service: &ObjectKey, cluster_domain: &str) -> String {
    format!(
        "{}.{}.svc.{cluster_domain}",
        service.name, service.namespace
    )
}

/// Name of a service port's cluster, endpoints, route configuration and outbound listener
/// or filter chain: `svc.ns.svc.<domain>:port`, what a caller writes in a URL.
pub fn outbound(service: &ObjectKey, port: u16, cluster_domain: &str) -> String {
    format!("{}:{port}", service_host(service, cluster_domain))
}

/// The cluster that reaches the app on `port` inside the sidecar's own pod (`:h2` when it
/// speaks HTTP/2, so pods of one namespace that differ there never share a name).
pub fn inbound(port: u16, protocol: Protocol) -> String {
    match protocol {
        Protocol::Http2 => format!("inbound:{port}:h2"),
        Protocol::Http | Protocol::Tcp => format!("inbound:{port}"),
    }
}

/// The `Host` values that reach a service port: `svc` (from its own namespace only),
/// `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<domain>` and the virtual IP, each with and without the
/// port.
pub fn host_names(
    service: &ObjectKey,
    port: u16,
    vip: Option<IpAddr>,
    cluster_domain: &str,
    same_namespace: bool,
) -> Vec<String> {
    let mut bare = Vec::new();
    if same_namespace {
        bare.push(service.name.clone());
    }
    bare.push(format!("{}.{}", service.name, service.namespace));
    bare.push(format!("{}.{}.svc", service.name, service.namespace));
    bare.push(service_host(service, cluster_domain));
    match vip {
        Some(IpAddr::V4(ip)) => bare.push(ip.to_string()),
        Some(IpAddr::V6(ip)) => bare.push(format!("[{ip}]")),
        None => {}
    }
    bare.into_iter()
        .flat_map(|host| [format!("{host}:{port}"), host])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_cover_every_spelling_with_and_without_port() {
        let svc = ObjectKey::new("shop", "b");
        let names = host_names(
            &svc,
            80,
            Some("198.18.1.2".parse().unwrap()),
            "cluster.local",
            true,
        );
        assert_eq!(
            names,
            [
                "b:80",
                "b",
                "b.shop:80",
                "b.shop",
                "b.shop.svc:80",
                "b.shop.svc",
                "b.shop.svc.cluster.local:80",
                "b.shop.svc.cluster.local",
                "198.18.1.2:80",
                "198.18.1.2"
            ]
        );
        let remote = host_names(&svc, 80, Some("fd00::1".parse().unwrap()), "c.l", false);
        assert_eq!(remote.first().map(String::as_str), Some("b.shop:80"));
        assert!(remote.contains(&"[fd00::1]:80".to_string()));
        assert_eq!(
            outbound(&svc, 80, "cluster.local"),
            "b.shop.svc.cluster.local:80"
        );
    }
}
