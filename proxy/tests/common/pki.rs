//! Test PKI and mTLS config shared by the TLS end-to-end tests: a CA (root or intermediate)
//! that issues SPIFFE workload certificates and revokes them in CRLs, listeners and clusters
//! with a validation context of the test's choosing, and either proxy running one bootstrap.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use remora_tests::{envoy, http_get};

use crate::common::*;

pub const TRUST_DOMAIN: &str = "spiffe://mesh.test";

/// A CA and what it signs.
pub struct Ca {
    key: rcgen::KeyPair,
    certificate: rcgen::Certificate,
    /// The PEM of this CA and of those between it and the root: what its leaves send after
    /// themselves (nothing for a root).
    chain: String,
}

/// A leaf certificate (followed by its intermediates) and its key, in PEM.
#[derive(Clone)]
pub struct Leaf {
    pub certificate: String,
    pub key: String,
    pub serial: u64,
}

impl Ca {
    pub fn new() -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let certificate = params.self_signed(&key).expect("ca");
        Ca {
            key,
            certificate,
            chain: String::new(),
        }
    }

    /// A CA under this one, named `name` (CRLs find their issuer by name).
    pub fn intermediate(&self, name: &str, serial: u64) -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.serial_number = Some(serial.into());
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .expect("intermediate");
        let chain = format!("{}{}", certificate.pem(), self.chain);
        Ca {
            key,
            certificate,
            chain,
        }
    }

    pub fn pem(&self) -> String {
        self.certificate.pem()
    }

    /// A workload certificate whose only name is `spiffe://mesh.test/ns/NS/sa/SA`.
    pub fn workload(&self, namespace: &str, account: &str, serial: u64) -> Leaf {
        self.leaf(namespace, account, serial, &[])
    }

    /// A server certificate for the tests' own TLS client, which checks the host name
    /// `server.mesh.test` (as a browser would) besides the workload's URI.
    pub fn server(&self, serial: u64) -> Leaf {
        self.leaf("backend", "server", serial, &["server.mesh.test"])
    }

    pub fn leaf(&self, namespace: &str, account: &str, serial: u64, dns: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        let uri = format!("{TRUST_DOMAIN}/ns/{namespace}/sa/{account}");
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("uri"))];
        for name in dns {
            params
                .subject_alt_names
                .push(rcgen::SanType::DnsName((*name).try_into().expect("dns")));
        }
        params.serial_number = Some(serial.to_be_bytes().to_vec().into());
        params.distinguished_name = rcgen::DistinguishedName::new();
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .expect("sign");
        Leaf {
            certificate: format!("{}{}", certificate.pem(), self.chain),
            key: key.serialize_pem(),
            serial,
        }
    }

    /// This CA's CRL (PEM) revoking the certificates of `serials`, current until 2099.
    pub fn crl(&self, serials: &[u64]) -> String {
        let revoked = serials.iter().map(|serial| rcgen::RevokedCertParams {
            serial_number: serial.to_be_bytes().to_vec().into(),
            revocation_time: rcgen::date_time_ymd(2020, 1, 1),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
        rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: 1u64.into(),
            issuing_distribution_point: None,
            revoked_certs: revoked.collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.certificate, &self.key)
        .expect("crl")
        .pem()
        .expect("crl pem")
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

/// A YAML flow string holding `text` (PEM has newlines).
pub fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("json string")
}

pub fn uri_matcher(kind: &str, value: &str) -> String {
    format!("{{san_type: URI, matcher: {{{kind}: \"{value}\"}}}}")
}

/// A listener terminating mTLS: client certificate required, its URI SAN matched.
pub fn mtls_listener(
    name: &str,
    port: u16,
    leaf: &(String, String),
    ca: &str,
    san: &str,
) -> String {
    mtls_listener_checking(
        name,
        port,
        leaf,
        &format!(
            "validation_context: {{trusted_ca: {{filename: \"{ca}\"}}, match_typed_subject_alt_names: [{san}]}}"
        ),
    )
}

/// A listener terminating mTLS, routing to cluster `app`: client certificate required and
/// checked by `validation` (`validation_context: {...}` or another source of one, in YAML
/// flow style).
pub fn mtls_listener_checking(
    name: &str,
    port: u16,
    leaf: &(String, String),
    validation: &str,
) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: [{{certificate_chain: {{filename: "{cert}"}}, private_key: {{filename: "{key}"}}}}]
            {validation}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: app}}}}]}}]
"#,
        cert = leaf.0,
        key = leaf.1,
    )
}

/// A cluster originating mTLS with a client certificate, checking the server's URI SAN.
pub fn mtls_cluster(
    name: &str,
    target: SocketAddr,
    leaf: &(String, String),
    ca: &str,
    san: &str,
) -> String {
    tls_cluster_checking(
        name,
        target,
        Some(leaf),
        &format!("{{trusted_ca: {{filename: \"{ca}\"}}, match_typed_subject_alt_names: [{san}]}}"),
    )
}

/// A cluster originating TLS (SNI `server.mesh.test`), with a client certificate if given,
/// checking the server's with `validation` (a `CertificateValidationContext` in YAML flow
/// style).
pub fn tls_cluster_checking(
    name: &str,
    target: SocketAddr,
    leaf: Option<&(String, String)>,
    validation: &str,
) -> String {
    tls_cluster_validated_by(
        name,
        target,
        leaf,
        &format!("validation_context: {validation}"),
    )
}

/// As [`tls_cluster_checking`], with the validation given as a whole `common_tls_context`
/// entry (`validation_context: ...`, `validation_context_sds_secret_config: ...`).
pub fn tls_cluster_validated_by(
    name: &str,
    target: SocketAddr,
    leaf: Option<&(String, String)>,
    validation_entry: &str,
) -> String {
    let certificates = match leaf {
        Some((cert, key)) => format!(
            "\n          tls_certificates: [{{certificate_chain: {{filename: \"{cert}\"}}, private_key: {{filename: \"{key}\"}}}}]"
        ),
        None => String::new(),
    };
    static_cluster(name, &[target]).replace(
        "    type: STATIC\n",
        &format!(
            r#"    type: STATIC
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: server.mesh.test
        common_tls_context:{certificates}
          {validation_entry}
"#
        ),
    )
}

/// `GET /` on a new TLS connection to `addr` as `server.mesh.test`, read to its end: the status
/// and the connection, which holds the certificate the server presented; `None` if the
/// handshake or the request failed.
pub fn tls_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Option<(
    u16,
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
)> {
    let name = rustls::pki_types::ServerName::try_from("server.mesh.test").expect("name");
    let connection = rustls::ClientConnection::new(config, name).ok()?;
    let socket = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut stream = rustls::StreamOwned::new(connection, socket);
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: server.mesh.test\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let head = String::from_utf8_lossy(&response);
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, stream))
}

/// Either proxy, running one bootstrap.
pub enum Running {
    Remora(Proxy),
    Envoy(envoy::Envoy, #[allow(dead_code)] tempfile::TempDir),
}

impl Running {
    pub fn admin(&self) -> SocketAddr {
        match self {
            Running::Remora(proxy) => proxy.admin,
            Running::Envoy(envoy, _) => envoy.admin,
        }
    }

    pub fn stat(&self, name: &str) -> Option<u64> {
        remora_tests::admin_stat(self.admin(), name)
    }

    /// `/certs`, its contexts in a fixed order (the two proxies list them in their own).
    /// `days_until_expiration` is checked against the expiration time and left out: a mesh
    /// certificate lives a whole number of days, so a second's difference between two reads
    /// moves it by one.
    pub fn certs(&self) -> Vec<serde_json::Value> {
        let (status, _, body) = http_get(self.admin(), "/certs").expect("admin");
        assert_eq!(status, 200, "{body}");
        let mut contexts = echo_json(&body)["certificates"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        for context in &mut contexts {
            for list in ["ca_cert", "cert_chain"] {
                for certificate in context[list].as_array_mut().into_iter().flatten() {
                    let days: i64 = certificate["days_until_expiration"]
                        .as_str()
                        .and_then(|d| d.parse().ok())
                        .expect("days_until_expiration");
                    let expires = certificate["expiration_time"].as_str().expect("time");
                    let expires: jiff::Timestamp = expires.parse().expect("RFC 3339");
                    let left = (expires.as_second() - now) / 86_400;
                    assert!((days - left).abs() <= 1, "{days} days, {left} by the clock");
                    if let Some(fields) = certificate.as_object_mut() {
                        fields.remove("days_until_expiration");
                    }
                }
            }
        }
        contexts.sort_by_key(|c| c.to_string());
        contexts
    }
}

pub fn run(remora: bool, yaml: &str, admin: SocketAddr) -> Running {
    if remora {
        Running::Remora(Proxy::start(yaml, admin, &[]))
    } else {
        let (dir, path) = write_config(yaml);
        envoy::validate(&path).unwrap_or_else(|e| panic!("envoy rejects the bootstrap: {e}"));
        Running::Envoy(envoy::Envoy::start(&path, admin, &[]), dir)
    }
}

pub fn name(remora: bool) -> &'static str {
    if remora { "remora" } else { "envoy" }
}
