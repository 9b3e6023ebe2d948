//! TLS settings of a transport socket: `DownstreamTlsContext` on filter chains (terminate) and
//! `UpstreamTlsContext` on clusters (originate). The model keeps where certificates come from;
//! the proxy's `tls` module reads them and builds rustls configs when the config is applied,
//! so errors about unreadable or mismatched files still name their field.

use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use xds_api::type_urls;

use std::path::PathBuf;

use crate::common::{DataSource, api_version, data_source, duration, unpack};
use crate::error::{ConfigResult, err, field, item};
use crate::matcher::{StringMatch, string_matcher};
use crate::unsupported;

/// A TLS protocol version rustls speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// A certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub chain: DataSource,
    pub key: DataSource,
    /// Where this certificate sits in the config, for errors found when it is loaded.
    pub path: String,
}

/// A subject alternative name type a matcher looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    Dns,
    Uri,
    Ip,
    Email,
    /// `otherName` of the matcher's `oid`.
    OtherName,
}

/// One `match_typed_subject_alt_names` entry: the peer's SANs of `san_type` are matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanMatcher {
    pub san_type: SanType,
    /// For `OtherName`: the type OID, dotted (`1.3.6.1.4.1.311.20.2.3`); else `None`.
    pub oid: Option<String>,
    pub matcher: StringMatch,
}

impl SanMatcher {
    /// Whether one SAN of this matcher's type matches. A DNS SAN with a wildcard label
    /// (`*.example.com`) stands for the names it covers, as Envoy reads it for exact matchers.
    pub fn matches(&self, san: &str) -> bool {
        if self.matcher.matches(san) {
            return true;
        }
        match (&self.matcher, self.san_type) {
            (StringMatch::Exact(want, _), SanType::Dns) => dns_wildcard_covers(san, want),
            _ => false,
        }
    }
}

/// Whether `pattern` (`*.example.com`) covers `name` (`api.example.com`, one label only).
fn dns_wildcard_covers(pattern: &str, name: &str) -> bool {
    let Some(suffix) = pattern.strip_prefix('*') else {
        return false;
    };
    suffix.starts_with('.')
        && name.len() > suffix.len()
        && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        && !name[..name.len() - suffix.len()].contains('.')
}

/// How the peer's certificate is checked (`CertificateValidationContext`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// The CA certificates a peer's chain must lead to. Absent in a combined context's
    /// default, whose SDS secret brings them, or when only pins check the peer (its chain is
    /// then not checked, as in Envoy).
    pub trusted_ca: Option<DataSource>,
    /// Certificate revocation lists (PEM, one or more). When set, or when `trusted_ca` holds
    /// CRLs too, every certificate of the peer's chain must be covered by a CRL of its issuer
    /// and not be listed in it (Envoy's `X509_V_FLAG_CRL_CHECK_ALL`), trust anchor included.
    pub crl: Option<DataSource>,
    /// Only the peer's own certificate is checked against the CRLs (`X509_V_FLAG_CRL_CHECK`).
    pub only_verify_leaf_cert_crl: bool,
    /// `match_typed_subject_alt_names`. Any one matching is enough; none (and no legacy
    /// matchers): any certificate from a trusted CA is accepted.
    pub san_matchers: Vec<SanMatcher>,
    /// The deprecated `match_subject_alt_names`, each expanded to the four SAN types as Envoy
    /// expands it; in force only when there are no typed matchers (Envoy ignores them then).
    pub legacy_san_matchers: Vec<SanMatcher>,
    /// Pins: SHA-256 digests of the peer's whole certificate (`verify_certificate_hash`) and
    /// of its SubjectPublicKeyInfo (`verify_certificate_spki`). If either list is set, the
    /// peer's certificate must match one entry of either.
    pub certificate_hashes: Vec<[u8; 32]>,
    pub spki_hashes: Vec<[u8; 32]>,
    /// Certificates (and CRLs) are not checked for their validity period (BoringSSL's
    /// `X509_V_FLAG_NO_CHECK_TIME`).
    pub allow_expired_certificate: bool,
    /// At most this many CA certificates above the peer's own, trust anchor included (0 acts
    /// as 1), as Envoy's BoringSSL counts `SSL_CTX_set_verify_depth`.
    pub max_verify_depth: Option<u32>,
    pub path: String,
}

impl Validation {
    /// The SAN matchers checked: the typed ones, else the deprecated ones.
    pub fn san_matchers_in_force(&self) -> &[SanMatcher] {
        if self.san_matchers.is_empty() {
            &self.legacy_san_matchers
        } else {
            &self.san_matchers
        }
    }

    /// Whether pins are set: the peer's certificate must match one.
    pub fn has_pins(&self) -> bool {
        !self.certificate_hashes.is_empty() || !self.spki_hashes.is_empty()
    }

    /// Why this validation needs `trusted_ca` it does not have, as Envoy refuses it: the field
    /// that needs it, and the reason. Pins alone need no CA.
    pub fn missing_trusted_ca(&self) -> Option<(&'static str, &'static str)> {
        if self.trusted_ca.is_some() {
            return None;
        }
        // Envoy's checks, in its order.
        if self.crl.is_some() {
            return Some(("crl", "a CRL without trusted_ca is not allowed"));
        }
        if !self.san_matchers_in_force().is_empty() {
            return Some((
                "match_typed_subject_alt_names",
                "SAN-based verification of peer certificates without trusted_ca is insecure and not allowed",
            ));
        }
        if self.allow_expired_certificate {
            return Some((
                "allow_expired_certificate",
                "certificate validity period is always ignored without trusted_ca",
            ));
        }
        if !self.has_pins() {
            return Some((
                "trusted_ca",
                "required (unless verify_certificate_hash or verify_certificate_spki is set)",
            ));
        }
        None
    }

    /// The combined context's rule, protobuf's merge: the SDS secret's fields over the
    /// default's (a message replaces, a list adds on, a `true` stays).
    pub fn merged(&self, dynamic: &Validation) -> Validation {
        Validation {
            trusted_ca: dynamic
                .trusted_ca
                .clone()
                .or_else(|| self.trusted_ca.clone()),
            crl: dynamic.crl.clone().or_else(|| self.crl.clone()),
            only_verify_leaf_cert_crl: self.only_verify_leaf_cert_crl
                || dynamic.only_verify_leaf_cert_crl,
            san_matchers: [&self.san_matchers[..], &dynamic.san_matchers].concat(),
            legacy_san_matchers: [&self.legacy_san_matchers[..], &dynamic.legacy_san_matchers]
                .concat(),
            certificate_hashes: [&self.certificate_hashes[..], &dynamic.certificate_hashes]
                .concat(),
            spki_hashes: [&self.spki_hashes[..], &dynamic.spki_hashes].concat(),
            allow_expired_certificate: self.allow_expired_certificate
                || dynamic.allow_expired_certificate,
            max_verify_depth: dynamic.max_verify_depth.or(self.max_verify_depth),
            path: dynamic.path.clone(),
        }
    }
}

/// Where a secret named by `*_sds_secret_config(s)` comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretSource {
    /// No `sds_config`: `static_resources.secrets`.
    Static,
    /// The ADS stream.
    Ads,
    /// A file holding a `DiscoveryResponse` with the secret, reloaded when it changes.
    File(PathBuf),
    /// An SDS stream of its own (`api_config_source`, `GRPC`) to a cluster: Istio's
    /// `sds-grpc`, the agent's unix socket.
    Grpc(GrpcSecretSource),
}

/// An SDS server reached over gRPC (`StreamSecrets`), one stream per secret, as Envoy opens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrpcSecretSource {
    /// The `envoy_grpc` cluster.
    pub cluster: String,
    /// `set_node_on_first_message_only`.
    pub node_on_first_message_only: bool,
}

/// A secret by name and source (`SdsSecretConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsSecret {
    pub name: String,
    pub source: SecretSource,
    /// How long a listener or cluster naming the secret waits for it before it starts without
    /// it (`sds_config.initial_fetch_timeout`, 15 s by default; zero: for ever).
    pub initial_fetch_timeout: std::time::Duration,
    pub path: String,
}

/// Where a TLS context's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateSource {
    Inline(Certificate),
    Sds(SdsSecret),
}

/// Where a TLS context's validation comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidationSource {
    Inline(Validation),
    Sds(SdsSecret),
    /// `combined_validation_context`: the secret's validation merged over `default`.
    Combined {
        default: Validation,
        secret: SdsSecret,
    },
}

impl ValidationSource {
    /// Whether SAN matchers known from the config alone are set.
    pub fn has_san_matchers(&self) -> bool {
        match self {
            ValidationSource::Inline(v) | ValidationSource::Combined { default: v, .. } => {
                !v.san_matchers_in_force().is_empty()
            }
            ValidationSource::Sds(_) => false,
        }
    }
}

/// A secret resource (`Secret`): a certificate with its key, or a validation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub name: String,
    pub kind: SecretKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretKind {
    Certificate(Certificate),
    Validation(Validation),
}

/// What both directions share (`CommonTlsContext`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonTls {
    pub certificates: Vec<CertificateSource>,
    pub validation: Option<ValidationSource>,
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// `tls_params.cipher_suites`: the TLS 1.2 suites to offer, in order of preference; none
    /// means the defaults. (TLS 1.3's suites are not configured, as in Envoy.)
    pub cipher_suites: Option<Vec<CipherSuite>>,
    /// `tls_params.ecdh_curves`: the key exchange groups, in order; none means the defaults.
    pub curves: Option<Vec<Curve>>,
    pub path: String,
}

/// A TLS 1.2 cipher suite Remora speaks, by the OpenSSL name Envoy's config uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherSuite {
    EcdheEcdsaAes128GcmSha256,
    EcdheRsaAes128GcmSha256,
    EcdheEcdsaAes256GcmSha384,
    EcdheRsaAes256GcmSha384,
    EcdheEcdsaChacha20Poly1305,
    EcdheRsaChacha20Poly1305,
}

impl CipherSuite {
    const NAMES: [(&'static str, CipherSuite); 6] = [
        (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            CipherSuite::EcdheEcdsaAes128GcmSha256,
        ),
        (
            "ECDHE-RSA-AES128-GCM-SHA256",
            CipherSuite::EcdheRsaAes128GcmSha256,
        ),
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            CipherSuite::EcdheEcdsaAes256GcmSha384,
        ),
        (
            "ECDHE-RSA-AES256-GCM-SHA384",
            CipherSuite::EcdheRsaAes256GcmSha384,
        ),
        (
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            CipherSuite::EcdheEcdsaChacha20Poly1305,
        ),
        (
            "ECDHE-RSA-CHACHA20-POLY1305",
            CipherSuite::EcdheRsaChacha20Poly1305,
        ),
    ];
}

/// TLS 1.2 suites Envoy's BoringSSL knows and rustls does not implement (CBC, RSA key
/// exchange, PSK, 3DES): a list may name them, as Envoy's older defaults did, and Remora offers
/// the rest of the list.
const SUITES_NOT_SPOKEN: [&str; 14] = [
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "DES-CBC3-SHA",
    "ECDHE-PSK-AES128-CBC-SHA",
    "ECDHE-PSK-AES256-CBC-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "PSK-AES128-CBC-SHA",
    "PSK-AES256-CBC-SHA",
];

/// A key exchange group Remora speaks, by Envoy's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    X25519,
    P256,
    P384,
}

/// Groups Envoy knows and Remora's TLS library does not (skipped, as [`SUITES_NOT_SPOKEN`]).
const CURVES_NOT_SPOKEN: [&str; 3] = ["P-521", "X25519MLKEM768", "X25519Kyber768Draft00"];

/// `cipher_suites`, each entry a name or a BoringSSL group of equal preference
/// (`[A|B]`, kept in its order here), or none for the defaults.
fn cipher_suites(names: &[String], path: &str) -> ConfigResult<Option<Vec<CipherSuite>>> {
    if names.is_empty() {
        return Ok(None);
    }
    let mut suites = Vec::new();
    for (index, entry) in names.iter().enumerate() {
        let group = entry
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(entry);
        for name in group.split('|') {
            match CipherSuite::NAMES.iter().find(|(known, _)| *known == name) {
                Some((_, suite)) if !suites.contains(suite) => suites.push(*suite),
                Some(_) => {}
                None if SUITES_NOT_SPOKEN.contains(&name) => {}
                None => {
                    return err(
                        item(path, "cipher_suites", index),
                        format!("unknown cipher suite {name:?}"),
                    );
                }
            }
        }
    }
    if suites.is_empty() {
        let spoken: Vec<&str> = CipherSuite::NAMES.iter().map(|(name, _)| *name).collect();
        return err(
            field(path, "cipher_suites"),
            format!(
                "none of these is a suite Remora speaks ({})",
                spoken.join(", ")
            ),
        );
    }
    Ok(Some(suites))
}

/// `ecdh_curves`, or none for the defaults.
fn curves(names: &[String], path: &str) -> ConfigResult<Option<Vec<Curve>>> {
    if names.is_empty() {
        return Ok(None);
    }
    let mut curves = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let curve = match name.as_str() {
            "X25519" => Curve::X25519,
            "P-256" => Curve::P256,
            "P-384" => Curve::P384,
            name if CURVES_NOT_SPOKEN.contains(&name) => continue,
            _ => {
                return err(
                    item(path, "ecdh_curves", index),
                    format!("unknown curve {name:?}"),
                );
            }
        };
        if !curves.contains(&curve) {
            curves.push(curve);
        }
    }
    if curves.is_empty() {
        return err(
            field(path, "ecdh_curves"),
            "none of these is a group Remora speaks (X25519, P-256, P-384)",
        );
    }
    Ok(Some(curves))
}

impl CommonTls {
    /// The SDS secrets this context names: its certificate's and its validation's.
    pub fn sds_secrets(&self) -> impl Iterator<Item = &SdsSecret> {
        let certificates = self.certificates.iter().filter_map(|c| match c {
            CertificateSource::Sds(sds) => Some(sds),
            CertificateSource::Inline(_) => None,
        });
        let validation = self.validation.iter().filter_map(|v| match v {
            ValidationSource::Sds(sds) | ValidationSource::Combined { secret: sds, .. } => {
                Some(sds)
            }
            ValidationSource::Inline(_) => None,
        });
        certificates.chain(validation)
    }
}

/// TLS termination on a filter chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownstreamTls {
    pub common: CommonTls,
    pub require_client_certificate: bool,
}

/// TLS origination to a cluster's hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub common: CommonTls,
    /// Sent as SNI; unset: none (Envoy sends none either).
    pub sni: Option<String>,
    /// Resume TLS sessions (`max_session_keys` other than 0).
    pub session_resumption: bool,
}

/// The TLS context inside a `TransportSocket`, whose type must be `expected`.
fn socket_context<'a>(
    socket: &'a core_pb::TransportSocket,
    expected: &str,
    path: &str,
) -> ConfigResult<&'a prost_types::Any> {
    let core_pb::TransportSocket {
        name: _,
        config_type,
    } = socket;
    match config_type {
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any))
            if any.type_url == expected =>
        {
            Ok(any)
        }
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any)) => err(
            field(path, "typed_config"),
            format!("transport socket {} is not supported", any.type_url),
        ),
        None => err(path, "typed_config is required"),
    }
}

/// Whether `socket` is the plaintext one (`envoy.transport_sockets.raw_buffer`), written out
/// where leaving `transport_socket` unset means the same.
pub fn is_raw_buffer(socket: &core_pb::TransportSocket) -> bool {
    match &socket.config_type {
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any)) => {
            any.type_url == type_urls::RAW_BUFFER
        }
        None => socket.name == "envoy.transport_sockets.raw_buffer",
    }
}

/// A filter chain's `transport_socket`.
pub fn downstream(socket: &core_pb::TransportSocket, path: &str) -> ConfigResult<DownstreamTls> {
    let any = socket_context(socket, type_urls::DOWNSTREAM_TLS_CONTEXT, path)?;
    let path = field(path, "typed_config");
    let tls_pb::DownstreamTlsContext {
        common_tls_context,
        require_client_certificate,
        require_sni,
        disable_stateful_session_resumption,
        session_timeout,
        full_scan_certs_on_sni_mismatch,
        prefer_client_ciphers,
        session_ticket_keys_type,
    } = unpack(any, &path)?;
    unsupported!(
        &path,
        require_sni,
        disable_stateful_session_resumption,
        session_timeout,
        full_scan_certs_on_sni_mismatch,
        prefer_client_ciphers,
        session_ticket_keys_type,
    );
    let cpath = field(&path, "common_tls_context");
    let Some(common) = common_tls_context else {
        return err(cpath, "required");
    };
    let common = common_tls(&common, &cpath, Side::Server)?;
    if common.certificates.len() != 1 {
        return err(
            field(&cpath, "tls_certificates"),
            "exactly one certificate is supported (inline or by SDS)",
        );
    }
    let require_client_certificate = require_client_certificate.unwrap_or(false);
    if require_client_certificate && common.validation.is_none() {
        return err(
            field(&path, "require_client_certificate"),
            "needs a validation_context",
        );
    }
    Ok(DownstreamTls {
        common,
        require_client_certificate,
    })
}

/// A cluster's `transport_socket`.
pub fn upstream(socket: &core_pb::TransportSocket, path: &str) -> ConfigResult<UpstreamTls> {
    let any = socket_context(socket, type_urls::UPSTREAM_TLS_CONTEXT, path)?;
    let path = field(path, "typed_config");
    let tls_pb::UpstreamTlsContext {
        common_tls_context,
        sni,
        auto_host_sni,
        auto_sni_san_validation,
        allow_renegotiation,
        max_session_keys,
        enforce_rsa_key_usage,
    } = unpack(any, &path)?;
    unsupported!(
        &path,
        auto_host_sni,
        auto_sni_san_validation,
        allow_renegotiation,
        enforce_rsa_key_usage,
    );
    let cpath = field(&path, "common_tls_context");
    let common = common_tls(
        &common_tls_context.unwrap_or_default(),
        &cpath,
        Side::Client,
    )?;
    if common.certificates.len() > 1 {
        return err(
            field(&cpath, "tls_certificates"),
            "at most one certificate is supported",
        );
    }
    if !sni.is_empty()
        && (sni.len() > 253
            || sni
                .bytes()
                .any(|b| !(b.is_ascii_alphanumeric() || b == b'.' || b == b'-')))
    {
        return err(field(&path, "sni"), "not a valid server name");
    }
    Ok(UpstreamTls {
        common,
        sni: (!sni.is_empty()).then_some(sni),
        // Envoy's default is 1 (one session kept per server); 0 turns resumption off.
        session_resumption: max_session_keys.is_none_or(|keys| keys > 0),
    })
}

/// Which end of the handshake a context is: their `TLS_AUTO` maximum versions differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

fn common_tls(
    common: &tls_pb::CommonTlsContext,
    path: &str,
    side: Side,
) -> ConfigResult<CommonTls> {
    let tls_pb::CommonTlsContext {
        tls_params,
        tls_certificates,
        tls_certificate_sds_secret_configs,
        alpn_protocols,
        validation_context_type,
    } = common;
    let (min_version, max_version) = match tls_params {
        Some(params) => versions(params, &field(path, "tls_params"), side)?,
        None => versions(&Default::default(), "", side)?,
    };
    let (cipher_suites, curves) = match tls_params {
        Some(params) => {
            let ppath = field(path, "tls_params");
            (
                cipher_suites(&params.cipher_suites, &ppath)?,
                curves(&params.ecdh_curves, &ppath)?,
            )
        }
        None => (None, None),
    };
    if !tls_certificates.is_empty() && !tls_certificate_sds_secret_configs.is_empty() {
        return err(
            field(path, "tls_certificate_sds_secret_configs"),
            "set tls_certificates or tls_certificate_sds_secret_configs, not both",
        );
    }
    let mut certificates = Vec::new();
    for (index, certificate) in tls_certificates.iter().enumerate() {
        let cpath = item(path, "tls_certificates", index);
        certificates.push(CertificateSource::Inline(tls_certificate(
            certificate,
            &cpath,
        )?));
    }
    for (index, sds) in tls_certificate_sds_secret_configs.iter().enumerate() {
        let spath = item(path, "tls_certificate_sds_secret_configs", index);
        certificates.push(CertificateSource::Sds(sds_secret(sds, &spath)?));
    }
    use tls_pb::common_tls_context::ValidationContextType as V;
    let validation = match validation_context_type {
        Some(V::ValidationContext(context)) => Some(ValidationSource::Inline(validation(
            context,
            &field(path, "validation_context"),
            true,
        )?)),
        Some(V::ValidationContextSdsSecretConfig(sds)) => Some(ValidationSource::Sds(sds_secret(
            sds,
            &field(path, "validation_context_sds_secret_config"),
        )?)),
        Some(V::CombinedValidationContext(combined)) => {
            let cpath = field(path, "combined_validation_context");
            let tls_pb::common_tls_context::CombinedCertificateValidationContext {
                default_validation_context,
                validation_context_sds_secret_config,
            } = combined;
            let Some(sds) = validation_context_sds_secret_config else {
                return err(
                    field(&cpath, "validation_context_sds_secret_config"),
                    "required",
                );
            };
            let default = match default_validation_context {
                Some(context) => {
                    validation(context, &field(&cpath, "default_validation_context"), false)?
                }
                None => return err(field(&cpath, "default_validation_context"), "required"),
            };
            Some(ValidationSource::Combined {
                default,
                secret: sds_secret(sds, &field(&cpath, "validation_context_sds_secret_config"))?,
            })
        }
        None => None,
    };
    Ok(CommonTls {
        certificates,
        validation,
        alpn: alpn_list(alpn_protocols, &field(path, "alpn_protocols"))?,
        min_version,
        max_version,
        cipher_suites,
        curves,
        path: path.to_string(),
    })
}

/// The protocols to offer or accept, in order. Envoy joins the entries with commas and splits
/// them again, so `["h2,http/1.1"]` means two protocols, as `["h2", "http/1.1"]` does.
fn alpn_list(entries: &[String], path: &str) -> ConfigResult<Vec<String>> {
    let mut protocols = Vec::new();
    for protocol in entries.iter().flat_map(|entry| entry.split(',')) {
        if protocol.len() > 255 {
            return err(
                path,
                format!("protocol \"{protocol}\" is longer than 255 bytes"),
            );
        }
        if !protocol.is_empty() {
            protocols.push(protocol.to_string());
        }
    }
    Ok(protocols)
}

fn tls_certificate(certificate: &tls_pb::TlsCertificate, path: &str) -> ConfigResult<Certificate> {
    let tls_pb::TlsCertificate {
        certificate_chain,
        private_key,
        watched_directory,
        password,
    } = certificate;
    unsupported!(path, watched_directory, password);
    let required = |source: &Option<core_pb::DataSource>, name: &str| match source {
        Some(source) => data_source(source, &field(path, name)),
        None => err(field(path, name), "required"),
    };
    Ok(Certificate {
        chain: required(certificate_chain, "certificate_chain")?,
        key: required(private_key, "private_key")?,
        path: path.to_string(),
    })
}

/// An `SdsSecretConfig`: the secret's name and where it comes from.
fn sds_secret(sds: &tls_pb::SdsSecretConfig, path: &str) -> ConfigResult<SdsSecret> {
    let tls_pb::SdsSecretConfig { name, sds_config } = sds;
    if name.is_empty() {
        return err(field(path, "name"), "required");
    }
    let (source, initial_fetch_timeout) = match sds_config {
        None => (SecretSource::Static, std::time::Duration::ZERO),
        Some(config) => secret_source(config, &field(path, "sds_config"))?,
    };
    Ok(SdsSecret {
        name: name.clone(),
        source,
        initial_fetch_timeout,
        path: path.to_string(),
    })
}

/// Where a secret comes from, and how long what names it waits for it.
fn secret_source(
    config: &core_pb::ConfigSource,
    path: &str,
) -> ConfigResult<(SecretSource, std::time::Duration)> {
    let core_pb::ConfigSource {
        config_source_specifier,
        initial_fetch_timeout,
        resource_api_version,
    } = config;
    api_version(*resource_api_version, &field(path, "resource_api_version"))?;
    let timeout = match initial_fetch_timeout {
        Some(timeout) => duration(timeout, &field(path, "initial_fetch_timeout"))?,
        None => std::time::Duration::from_secs(15),
    };
    use core_pb::config_source::ConfigSourceSpecifier as S;
    let source = match config_source_specifier {
        Some(S::Ads(core_pb::AggregatedConfigSource {})) => SecretSource::Ads,
        Some(S::Path(file)) if !file.is_empty() => SecretSource::File(PathBuf::from(file)),
        Some(S::PathConfigSource(core_pb::PathConfigSource {
            path: file,
            watched_directory: _,
        })) if !file.is_empty() => SecretSource::File(PathBuf::from(file)),
        Some(S::Path(_) | S::PathConfigSource(_)) => {
            return err(path, "the secret file's path is required");
        }
        Some(S::ApiConfigSource(api)) => {
            SecretSource::Grpc(grpc_secret_source(api, &field(path, "api_config_source"))?)
        }
        _ => {
            return err(
                path,
                "secrets come from `ads: {}`, a gRPC `api_config_source` or a file (`path_config_source`); other sources are not supported",
            );
        }
    };
    Ok((source, timeout))
}

/// An SDS `api_config_source`: `GRPC` to one `envoy_grpc` cluster.
fn grpc_secret_source(
    proto: &core_pb::ApiConfigSource,
    path: &str,
) -> ConfigResult<GrpcSecretSource> {
    let core_pb::ApiConfigSource {
        api_type,
        transport_api_version,
        cluster_names,
        grpc_services,
        refresh_delay,
        request_timeout,
        rate_limit_settings,
        set_node_on_first_message_only,
        config_validators,
    } = proto;
    crate::unsupported!(
        path,
        cluster_names,
        refresh_delay,
        request_timeout,
        rate_limit_settings,
        config_validators
    );
    use core_pb::api_config_source::ApiType;
    if ApiType::try_from(*api_type) != Ok(ApiType::Grpc) {
        return err(
            field(path, "api_type"),
            "Remora streams secrets with GRPC (StreamSecrets) only",
        );
    }
    api_version(
        *transport_api_version,
        &field(path, "transport_api_version"),
    )?;
    let [service] = grpc_services.as_slice() else {
        return err(
            field(path, "grpc_services"),
            "exactly one grpc service is required",
        );
    };
    let cluster = crate::common::envoy_grpc_only(service, &item(path, "grpc_services", 0))?;
    Ok(GrpcSecretSource {
        cluster,
        node_on_first_message_only: *set_node_on_first_message_only,
    })
}

/// A `Secret` resource (static, over ADS or from a file). Session ticket keys and generic
/// secrets are not supported.
pub fn secret(proto: &tls_pb::Secret, path: &str) -> ConfigResult<Secret> {
    let tls_pb::Secret { name, r#type } = proto;
    if name.is_empty() {
        return err(field(path, "name"), "required");
    }
    use tls_pb::secret::Type;
    let kind = match r#type {
        Some(Type::TlsCertificate(certificate)) => SecretKind::Certificate(tls_certificate(
            certificate,
            &field(path, "tls_certificate"),
        )?),
        Some(Type::ValidationContext(context)) => SecretKind::Validation(validation(
            context,
            &field(path, "validation_context"),
            true,
        )?),
        Some(Type::SessionTicketKeys(_)) => {
            return err(field(path, "session_ticket_keys"), "is not supported");
        }
        Some(Type::GenericSecret(_)) => {
            return err(field(path, "generic_secret"), "is not supported");
        }
        None => {
            return err(path, "a secret needs tls_certificate or validation_context");
        }
    };
    Ok(Secret {
        name: name.clone(),
        kind,
    })
}

/// A `CertificateValidationContext`; `needs_ca`: false only for a combined context's
/// default, whose SDS secret brings the CA.
fn validation(
    context: &tls_pb::CertificateValidationContext,
    path: &str,
    needs_ca: bool,
) -> ConfigResult<Validation> {
    let tls_pb::CertificateValidationContext {
        trusted_ca,
        watched_directory,
        verify_certificate_spki,
        verify_certificate_hash,
        match_typed_subject_alt_names,
        match_subject_alt_names,
        crl,
        allow_expired_certificate,
        trust_chain_verification,
        only_verify_leaf_cert_crl,
        max_verify_depth,
    } = context;
    unsupported!(path, watched_directory, trust_chain_verification);
    let max_verify_depth = match max_verify_depth {
        // Envoy's proto rule.
        Some(depth) if *depth > 100 => {
            return err(field(path, "max_verify_depth"), "must be at most 100");
        }
        depth => *depth,
    };
    let trusted_ca = match trusted_ca {
        Some(ca) => Some(data_source(ca, &field(path, "trusted_ca"))?),
        None => None,
    };
    let crl = match crl {
        Some(crl) => Some(data_source(crl, &field(path, "crl"))?),
        None => None,
    };
    let mut san_matchers = Vec::new();
    for (index, typed) in match_typed_subject_alt_names.iter().enumerate() {
        let mpath = item(path, "match_typed_subject_alt_names", index);
        san_matchers.push(san_matcher(typed, &mpath)?);
    }
    // The deprecated form matches any SAN of the four types, as Envoy expands it.
    let mut legacy_san_matchers = Vec::new();
    for (index, matcher) in match_subject_alt_names.iter().enumerate() {
        let matcher = string_matcher(matcher, &item(path, "match_subject_alt_names", index))?;
        for san_type in [SanType::Dns, SanType::Uri, SanType::Email, SanType::Ip] {
            legacy_san_matchers.push(SanMatcher {
                san_type,
                oid: None,
                matcher: matcher.clone(),
            });
        }
    }
    let mut certificate_hashes = Vec::new();
    for (index, hash) in verify_certificate_hash.iter().enumerate() {
        certificate_hashes.push(certificate_hash(
            hash,
            &item(path, "verify_certificate_hash", index),
        )?);
    }
    let mut spki_hashes = Vec::new();
    for (index, hash) in verify_certificate_spki.iter().enumerate() {
        spki_hashes.push(spki_hash(
            hash,
            &item(path, "verify_certificate_spki", index),
        )?);
    }
    let validation = Validation {
        trusted_ca,
        crl,
        only_verify_leaf_cert_crl: *only_verify_leaf_cert_crl,
        san_matchers,
        legacy_san_matchers,
        certificate_hashes,
        spki_hashes,
        allow_expired_certificate: *allow_expired_certificate,
        max_verify_depth,
        path: path.to_string(),
    };
    if needs_ca && let Some((name, reason)) = validation.missing_trusted_ca() {
        let name = match name {
            "match_typed_subject_alt_names" if match_typed_subject_alt_names.is_empty() => {
                "match_subject_alt_names"
            }
            name => name,
        };
        return err(field(path, name), reason);
    }
    Ok(validation)
}

/// A `verify_certificate_hash` entry: a SHA-256 in hex, as `openssl dgst -sha256` prints it or
/// as `openssl x509 -fingerprint -sha256` does (95 characters: pairs joined by colons, whose
/// colons Envoy drops). Either case.
fn certificate_hash(text: &str, path: &str) -> ConfigResult<[u8; 32]> {
    const FORMAT: &str = "must be a hex-encoded SHA-256: 64 hex digits, or 32 pairs joined by colons (95 characters)";
    // Envoy's proto rules first: 64 to 95 characters.
    if text.len() < 64 || text.len() > 95 {
        return err(path, FORMAT);
    }
    let digits: Vec<u8> = if text.len() == 95 {
        text.bytes().filter(|&b| b != b':').collect()
    } else {
        text.bytes().collect()
    };
    let mut hash = [0u8; 32];
    if digits.len() != 64 {
        return err(path, FORMAT);
    }
    for (byte, pair) in hash.iter_mut().zip(digits.chunks(2)) {
        let value = std::str::from_utf8(pair)
            .ok()
            .filter(|pair| pair.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match value {
            Some(value) => *byte = value,
            None => return err(path, FORMAT),
        }
    }
    Ok(hash)
}

/// A `verify_certificate_spki` entry: a SHA-256 in base64 with its padding (44 characters), as
/// HTTP public key pinning writes it.
fn spki_hash(text: &str, path: &str) -> ConfigResult<[u8; 32]> {
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(text);
    match decoded
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
    {
        Some(hash) if text.len() == 44 => Ok(hash),
        _ => err(
            path,
            "must be a base64-encoded SHA-256 (44 characters, as `openssl enc -base64` prints it)",
        ),
    }
}

fn san_matcher(typed: &tls_pb::SubjectAltNameMatcher, path: &str) -> ConfigResult<SanMatcher> {
    let tls_pb::SubjectAltNameMatcher {
        san_type,
        matcher,
        oid,
    } = typed;
    use tls_pb::subject_alt_name_matcher::SanType as T;
    let san_type = match T::try_from(*san_type) {
        Ok(T::Dns) => SanType::Dns,
        Ok(T::Uri) => SanType::Uri,
        Ok(T::IpAddress) => SanType::Ip,
        Ok(T::Email) => SanType::Email,
        Ok(T::OtherName) => SanType::OtherName,
        Ok(T::Unspecified) => return err(field(path, "san_type"), "required"),
        Err(_) => return err(field(path, "san_type"), format!("unknown value {san_type}")),
    };
    // Envoy ignores `oid` for the other types.
    let oid = match san_type {
        SanType::OtherName => Some(dotted_oid(oid, &field(path, "oid"))?),
        _ => None,
    };
    let Some(matcher) = matcher else {
        return err(field(path, "matcher"), "required");
    };
    Ok(SanMatcher {
        san_type,
        oid,
        matcher: string_matcher(matcher, &field(path, "matcher"))?,
    })
}

/// An OTHER_NAME matcher's `oid` in dotted form, written canonically. Envoy also takes
/// BoringSSL's names for some OIDs (`msUPN`); those are refused here rather than guessed.
fn dotted_oid(text: &str, path: &str) -> ConfigResult<String> {
    if text.is_empty() {
        return err(path, "required for OTHER_NAME");
    }
    let arcs: Option<Vec<u64>> = text
        .split('.')
        .map(|arc| {
            (!arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()))
                .then(|| arc.parse().ok())
                .flatten()
        })
        .collect();
    match arcs {
        Some(arcs) if arcs.len() >= 2 && arcs[0] <= 2 && (arcs[0] == 2 || arcs[1] < 40) => Ok(arcs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(".")),
        _ => err(
            path,
            format!("{text:?} is not an OID in dotted form (such as 1.3.6.1.4.1.311.20.2.3)"),
        ),
    }
}

/// The TLS versions `tls_params` allow. Envoy's defaults (TLS_AUTO): at least 1.2 on both
/// sides; at most 1.3 as a server and 1.2 as a client (so sidecars resume sessions without a
/// new key exchange, as TLS 1.2 tickets allow). Asking for 1.0 or 1.1 is an error, not a
/// silent 1.2: rustls speaks 1.2 and 1.3 only.
fn versions(
    params: &tls_pb::TlsParameters,
    path: &str,
    side: Side,
) -> ConfigResult<(TlsVersion, TlsVersion)> {
    use tls_pb::tls_parameters::TlsProtocol as P;
    let tls_pb::TlsParameters {
        tls_minimum_protocol_version,
        tls_maximum_protocol_version,
        // Read by `common_tls`.
        cipher_suites: _,
        ecdh_curves: _,
    } = params;
    let version = |value: i32, name: &str, auto: TlsVersion| -> ConfigResult<TlsVersion> {
        match P::try_from(value) {
            Ok(P::TlsAuto) => Ok(auto),
            Ok(P::TlSv10 | P::TlSv11) => err(
                field(path, name),
                "TLS 1.0 and 1.1 are not supported (Remora speaks TLS 1.2 and 1.3)",
            ),
            Ok(P::TlSv12) => Ok(TlsVersion::V1_2),
            Ok(P::TlSv13) => Ok(TlsVersion::V1_3),
            Err(_) => err(field(path, name), format!("unknown TLS version {value}")),
        }
    };
    let min = version(
        *tls_minimum_protocol_version,
        "tls_minimum_protocol_version",
        TlsVersion::V1_2,
    )?;
    // A client's automatic maximum never falls below a minimum set above it.
    let auto_max = match side {
        Side::Server => TlsVersion::V1_3,
        Side::Client => TlsVersion::V1_2.max(min),
    };
    let max = version(
        *tls_maximum_protocol_version,
        "tls_maximum_protocol_version",
        auto_max,
    )?;
    if min > max {
        return err(
            path,
            "tls_minimum_protocol_version is above tls_maximum_protocol_version",
        );
    }
    Ok((min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_choose_the_versions_and_refuse_what_rustls_cannot_speak() {
        use tls_pb::tls_parameters::TlsProtocol as P;
        let params = |min: P, max: P| tls_pb::TlsParameters {
            tls_minimum_protocol_version: min as i32,
            tls_maximum_protocol_version: max as i32,
            ..Default::default()
        };
        let get = |min, max| versions(&params(min, max), "c.tls_params", Side::Server);
        let client = |min, max| versions(&params(min, max), "c.tls_params", Side::Client);
        use TlsVersion::*;
        assert_eq!(get(P::TlsAuto, P::TlsAuto).unwrap(), (V1_2, V1_3));
        assert_eq!(get(P::TlSv13, P::TlsAuto).unwrap(), (V1_3, V1_3));
        assert_eq!(get(P::TlsAuto, P::TlSv12).unwrap(), (V1_2, V1_2));
        // A client's TLS_AUTO maximum is 1.2, as Envoy's, unless the minimum is above it.
        assert_eq!(client(P::TlsAuto, P::TlsAuto).unwrap(), (V1_2, V1_2));
        assert_eq!(client(P::TlsAuto, P::TlSv13).unwrap(), (V1_2, V1_3));
        assert_eq!(client(P::TlSv13, P::TlsAuto).unwrap(), (V1_3, V1_3));
        let error = get(P::TlSv10, P::TlsAuto).unwrap_err();
        assert_eq!(error.path, "c.tls_params.tls_minimum_protocol_version");
        let error = get(P::TlSv13, P::TlSv12).unwrap_err();
        assert!(error.to_string().contains("above"), "{error}");
    }

    #[test]
    fn alpn_entries_joined_by_commas_are_separate_protocols() {
        let list = |entries: &[&str]| {
            let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
            alpn_list(&entries, "c.alpn_protocols")
        };
        // Envoy's best-practice edge config writes `["h2,http/1.1"]`.
        assert_eq!(list(&["h2,http/1.1"]).unwrap(), ["h2", "http/1.1"]);
        assert_eq!(list(&["h2", "http/1.1"]).unwrap(), ["h2", "http/1.1"]);
        assert_eq!(list(&["h2,", ",http/1.1"]).unwrap(), ["h2", "http/1.1"]);
        assert!(list(&[]).unwrap().is_empty());
        let error = list(&["h2", &"x".repeat(256)]).unwrap_err();
        assert_eq!(error.path, "c.alpn_protocols");
        assert!(error.to_string().contains("255 bytes"), "{error}");
    }

    #[test]
    fn cipher_suites_and_curves_read_as_envoy_names_them() {
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        use CipherSuite::*;
        // Envoy's default server list: groups of equal preference kept in their order.
        let envoys_defaults = names(&[
            "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]",
            "[ECDHE-RSA-AES128-GCM-SHA256|ECDHE-RSA-CHACHA20-POLY1305]",
            "ECDHE-ECDSA-AES128-SHA",
            "ECDHE-RSA-AES256-GCM-SHA384",
        ]);
        assert_eq!(
            cipher_suites(&envoys_defaults, "p").unwrap(),
            Some(vec![
                EcdheEcdsaAes128GcmSha256,
                EcdheEcdsaChacha20Poly1305,
                EcdheRsaAes128GcmSha256,
                EcdheRsaChacha20Poly1305,
                EcdheRsaAes256GcmSha384,
            ])
        );
        assert_eq!(cipher_suites(&[], "p").unwrap(), None);
        let error =
            cipher_suites(&names(&["ECDHE-RSA-AES128-GCM-SHA256", "BOGUS"]), "p").unwrap_err();
        assert_eq!(error.path, "p.cipher_suites[1]");
        assert!(error.to_string().contains("\"BOGUS\""), "{error}");
        let error = cipher_suites(&names(&["AES128-SHA"]), "p").unwrap_err();
        assert_eq!(error.path, "p.cipher_suites");
        assert!(
            error.to_string().contains("ECDHE-RSA-AES128-GCM-SHA256"),
            "{error}"
        );

        use Curve::*;
        assert_eq!(
            curves(&names(&["P-521", "P-256", "X25519"]), "p").unwrap(),
            Some(vec![P256, X25519])
        );
        assert_eq!(
            curves(&names(&["p-256"]), "p").unwrap_err().path,
            "p.ecdh_curves[0]"
        );
        assert_eq!(
            curves(&names(&["P-521"]), "p").unwrap_err().path,
            "p.ecdh_curves"
        );
    }

    #[test]
    fn pins_read_as_envoy_reads_them() {
        // `openssl dgst -sha256` and `openssl x509 -fingerprint -sha256` of one certificate.
        let hex = "489777d29717a552acfab70b4e27a52782832ac61240741174b273cdf7d0960b";
        let fingerprint = "48:97:77:D2:97:17:A5:52:AC:FA:B7:0B:4E:27:A5:27:82:83:2A:C6:12:40:74:11:74:B2:73:CD:F7:D0:96:0B";
        let want = certificate_hash(hex, "h").unwrap();
        assert_eq!(want[..2], [0x48, 0x97]);
        assert_eq!(certificate_hash(&hex.to_uppercase(), "h").unwrap(), want);
        assert_eq!(certificate_hash(fingerprint, "h").unwrap(), want);
        assert_eq!(
            certificate_hash(&fingerprint.to_lowercase(), "h").unwrap(),
            want
        );
        // What Envoy refuses: too short, a colon where the length is not a fingerprint's,
        // a stray character.
        for bad in [
            &hex[..63],
            &format!("{}:{}", &hex[..2], &hex[2..]),
            &fingerprint.replacen(':', "x", 4),
            &hex.replacen('4', "g", 1),
            &format!("{hex}00"),
        ] {
            let error = certificate_hash(bad, "v.verify_certificate_hash[1]").unwrap_err();
            assert_eq!(error.path, "v.verify_certificate_hash[1]", "{bad}");
            assert!(error.to_string().contains("hex-encoded SHA-256"), "{error}");
        }

        let spki = "3YhT8Y2CYBfl3KnWTdcYZVgobAWofxoTIcP53NXfA8c=";
        assert_eq!(spki_hash(spki, "s").unwrap()[..2], [0xdd, 0x88]);
        for bad in [
            spki.trim_end_matches('='),
            "3YhT8Y2CYBfl3KnWTdcYZVgobAWofxoTIcP53NXfA8c",
            "3YhT8Y2CYBfl3KnWTdcYZVgobAWofxoTIcP53NXfA8-=",
            "AAAA",
        ] {
            let error = spki_hash(bad, "v.verify_certificate_spki[0]").unwrap_err();
            assert_eq!(error.path, "v.verify_certificate_spki[0]", "{bad}");
            assert!(
                error.to_string().contains("base64-encoded SHA-256"),
                "{error}"
            );
        }
    }
}
