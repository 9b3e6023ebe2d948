//! TLS with rustls: the model's TLS settings built into rustls configs, for filter chains
//! (terminate) and cluster connections (originate). Inline certificates and keys are read when
//! the config is applied (an error names the field); SDS secrets when they arrive
//! ([`secrets`]). A handshake reads the certificate and validation in force when it starts
//! ([`verify`]), so rotation needs no new config.

use std::sync::Arc;

use remora_config::common::DataSource;
use remora_config::tls::{
    Certificate, CertificateSource, CommonTls, DownstreamTls, TlsVersion, UpstreamTls,
    ValidationSource,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;

use crate::config::{ConfigError, ConfigResult};
use crate::stats::SslStats;

mod peer;
mod resumption;
pub mod secrets;
mod verify;

pub use peer::PeerCertificate;
pub use secrets::Secrets;
pub use verify::LoadedValidation;
/// Also what the probe server's HTTPS probes use: the kubelet does not verify them either.
pub use verify::NoVerification;
use verify::{DownstreamVerifier, UpstreamVerifier, ValidationMaterial};

fn err<T>(path: impl Into<String>, reason: impl Into<String>) -> ConfigResult<T> {
    Err(ConfigError::new(path, reason))
}

/// ring's suites, AES-128 before AES-256 as BoringSSL (Envoy) orders them: the SHA-384 of the
/// AES-256 suites' key schedule was a tenth of a resumed handshake's CPU.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::LazyLock::new(|| {
            use rustls::crypto::ring::cipher_suite as suite;
            Arc::new(rustls::crypto::CryptoProvider {
                cipher_suites: vec![
                    suite::TLS13_AES_128_GCM_SHA256,
                    suite::TLS13_AES_256_GCM_SHA384,
                    suite::TLS13_CHACHA20_POLY1305_SHA256,
                    suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                    suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                    suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                    suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                ],
                ..rustls::crypto::ring::default_provider()
            })
        });
    PROVIDER.clone()
}

/// [`provider`] narrowed to a context's `cipher_suites` (TLS 1.2's; 1.3's are kept) and
/// `ecdh_curves`, in their order; the shared one when it names neither.
fn provider_for(common: &CommonTls) -> Arc<rustls::crypto::CryptoProvider> {
    use remora_config::tls::{CipherSuite as C, Curve};
    use rustls::crypto::ring::{cipher_suite as suite, kx_group};
    let shared = provider();
    if common.cipher_suites.is_none() && common.curves.is_none() {
        return shared;
    }
    let mut narrowed = (*shared).clone();
    if let Some(chosen) = &common.cipher_suites {
        let tls13 = shared.cipher_suites.iter().filter(|s| s.tls13().is_some());
        let tls12 = chosen.iter().map(|chosen| match chosen {
            C::EcdheEcdsaAes128GcmSha256 => suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            C::EcdheRsaAes128GcmSha256 => suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            C::EcdheEcdsaAes256GcmSha384 => suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            C::EcdheRsaAes256GcmSha384 => suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            C::EcdheEcdsaChacha20Poly1305 => suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            C::EcdheRsaChacha20Poly1305 => suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        });
        narrowed.cipher_suites = tls13.copied().chain(tls12).collect();
    }
    if let Some(curves) = &common.curves {
        narrowed.kx_groups = curves
            .iter()
            .map(|curve| match curve {
                Curve::X25519 => kx_group::X25519,
                Curve::P256 => kx_group::SECP256R1,
                Curve::P384 => kx_group::SECP384R1,
            })
            .collect();
    }
    Arc::new(narrowed)
}

fn read(source: &DataSource, path: &str) -> ConfigResult<Vec<u8>> {
    source.read().map_err(|e| match source {
        DataSource::File(file) => ConfigError::new(
            format!("{path}.filename"),
            format!("cannot read {}: {e}", file.display()),
        ),
        DataSource::Inline(_) => ConfigError::new(path, e.to_string()),
    })
}

fn certificates(pem: &[u8], path: &str) -> ConfigResult<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let certs = certs.map_err(|e| ConfigError::new(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return err(path, "no certificate found");
    }
    Ok(certs)
}

/// The rustls versions between the configured minimum and maximum.
fn protocol_versions(common: &CommonTls) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS12, &rustls::version::TLS13];
    match (common.min_version, common.max_version) {
        (TlsVersion::V1_2, TlsVersion::V1_3) => &BOTH,
        (TlsVersion::V1_2, TlsVersion::V1_2) => &BOTH[..1],
        _ => &BOTH[1..],
    }
}

/// The certificate chain and its key, checked to belong together. rustls checks through webpki,
/// which reads only X.509 v3; Envoy (BoringSSL) also serves v1 certificates, which `openssl`
/// older than 3.2 and Envoy's own examples make. For those the key is compared with the public
/// key read straight from the certificate's DER.
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    path: &str,
) -> ConfigResult<Arc<CertifiedKey>> {
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| ConfigError::new(format!("{path}.private_key"), e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    let mismatch = || {
        ConfigError::new(
            path,
            "certificate and key do not match: the private key is not the certificate's",
        )
    };
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => return Err(mismatch()),
        Err(webpki_error) => {
            let certificate = &certified.cert[0];
            let Some(certificate_key) = der::subject_public_key_info(certificate) else {
                return err(
                    format!("{path}.certificate_chain"),
                    format!("the certificate cannot be read: {webpki_error}"),
                );
            };
            if let Some(key) = certified.key.public_key()
                && key.as_ref() != certificate_key
            {
                return Err(mismatch());
            }
        }
    }
    Ok(Arc::new(certified))
}

/// Just enough DER to find a certificate's public key, whatever its X.509 version.
mod der {
    /// One DER element, read from the front of some bytes.
    pub(super) struct Element<'a> {
        pub tag: u8,
        pub content: &'a [u8],
        /// Tag, length and content.
        pub whole: &'a [u8],
        /// What follows the element.
        pub rest: &'a [u8],
    }

    pub(super) fn element(input: &[u8]) -> Option<Element<'_>> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (length, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let length = rest[..count]
                .iter()
                .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
            (length, &rest[count..])
        };
        if rest.len() < length {
            return None;
        }
        let header = input.len() - rest.len();
        Some(Element {
            tag,
            content: &rest[..length],
            whole: &input[..header + length],
            rest: &rest[length..],
        })
    }

    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0; // [0] EXPLICIT, absent in v1

    /// The `subjectPublicKeyInfo` element (tag and all) of a DER certificate.
    pub fn subject_public_key_info(certificate: &[u8]) -> Option<&[u8]> {
        let sequence = |bytes| element(bytes).filter(|e| e.tag == SEQUENCE);
        let certificate = sequence(certificate)?.content;
        let mut tbs = sequence(certificate)?.content;
        if tbs.first() == Some(&VERSION) {
            tbs = element(tbs)?.rest;
        }
        // serialNumber, signature, issuer, validity, subject; then the key.
        for _ in 0..5 {
            tbs = element(tbs)?.rest;
        }
        Some(sequence(tbs)?.whole)
    }
}

fn private_key(pem: &[u8], path: &str) -> ConfigResult<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| ConfigError::new(path, format!("invalid PEM: {e}")))?
        .ok_or_else(|| ConfigError::new(path, "no private key found"))
}

/// Reads every certificate, key and CA file the bootstrap names itself (static listeners,
/// clusters and secrets), as `--mode validate` does in Envoy: an unreadable or mismatched
/// file is an error naming its field.
pub fn check_files(bootstrap: &crate::config::Bootstrap) -> ConfigResult<()> {
    let contexts = bootstrap
        .listeners
        .iter()
        .flat_map(|l| l.chains().filter_map(|c| c.tls.as_ref().map(|t| &t.common)))
        .chain(
            bootstrap
                .clusters
                .iter()
                .filter_map(|c| c.connect.tls.as_ref().map(|t| &t.common)),
        );
    for common in contexts {
        for certificate in &common.certificates {
            if let CertificateSource::Inline(certificate) = certificate {
                load_certificate(certificate)?;
            }
        }
        if let Some(ValidationSource::Inline(validation)) = &common.validation {
            LoadedValidation::load(validation)?;
        }
    }
    for secret in &bootstrap.secrets {
        match &secret.kind {
            remora_config::tls::SecretKind::Certificate(certificate) => {
                load_certificate(certificate)?;
            }
            remora_config::tls::SecretKind::Validation(validation) => {
                LoadedValidation::load(validation)?;
            }
        }
    }
    Ok(())
}

/// Where a data source's bytes come from, as `/certs` names it.
fn source_name(source: &DataSource) -> String {
    match source {
        DataSource::File(path) => path.display().to_string(),
        DataSource::Inline(_) => "<inline>".to_string(),
    }
}

/// The certificates of one TLS context as `/certs` shows them: its CA certificates and its
/// own certificate, each with where it came from. Inline config is read again; SDS secrets
/// are shown as they are in force (nothing while a secret has not arrived).
#[derive(Debug, Default)]
pub struct ContextCertificates {
    pub ca: Vec<(String, CertificateDer<'static>)>,
    pub chain: Vec<(String, CertificateDer<'static>)>,
}

pub fn context_certificates(common: &CommonTls, secrets: &Secrets) -> ContextCertificates {
    let mut shown = ContextCertificates::default();
    let validation = match &common.validation {
        Some(ValidationSource::Inline(validation)) => {
            LoadedValidation::load(validation).ok().map(Arc::new)
        }
        Some(ValidationSource::Sds(sds) | ValidationSource::Combined { secret: sds, .. }) => {
            secrets.peek(sds).and_then(|value| match &value.loaded {
                secrets::LoadedSecret::Validation(loaded) => Some(loaded.clone()),
                secrets::LoadedSecret::Certificate { .. } => None,
            })
        }
        None => None,
    };
    if let Some(loaded) = validation {
        let (source, certificates) = loaded.ca_certificates();
        shown.ca = certificates
            .iter()
            .map(|c| (source.to_string(), c.clone()))
            .collect();
    }
    for certificate in &common.certificates {
        let leaf = match certificate {
            CertificateSource::Inline(certificate) => {
                let path = format!("{}.certificate_chain", certificate.path);
                read(&certificate.chain, &path)
                    .and_then(|pem| certificates(&pem, &path))
                    .ok()
                    .and_then(|chain| chain.into_iter().next())
                    .map(|leaf| (source_name(&certificate.chain), leaf))
            }
            CertificateSource::Sds(sds) => {
                secrets.peek(sds).and_then(|value| match &value.loaded {
                    secrets::LoadedSecret::Certificate { key, source } => {
                        key.cert.first().map(|leaf| (source.clone(), leaf.clone()))
                    }
                    secrets::LoadedSecret::Validation(_) => None,
                })
            }
        };
        shown.chain.extend(leaf);
    }
    shown
}

/// A certificate's chain and key, read and checked to belong together.
fn load_certificate(certificate: &Certificate) -> ConfigResult<Arc<CertifiedKey>> {
    let path = &certificate.path;
    let chain_path = format!("{path}.certificate_chain");
    let key_path = format!("{path}.private_key");
    let chain = certificates(&read(&certificate.chain, &chain_path)?, &chain_path)?;
    let key = private_key(&read(&certificate.key, &key_path)?, &key_path)?;
    certified_key(chain, key, path)
}

/// A TLS context's certificate at handshake time: read once, or an SDS secret's current one.
#[derive(Debug)]
enum CertificateMaterial {
    Fixed(Arc<CertifiedKey>),
    Secret(Arc<secrets::SecretSlot>),
}

impl CertificateMaterial {
    fn new(source: &CertificateSource, secrets: &Arc<Secrets>) -> ConfigResult<Self> {
        Ok(match source {
            CertificateSource::Inline(certificate) => {
                CertificateMaterial::Fixed(load_certificate(certificate)?)
            }
            CertificateSource::Sds(sds) => CertificateMaterial::Secret(secrets.slot(sds)),
        })
    }

    /// The certificate in force; `None` while its secret has not arrived.
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        match self {
            CertificateMaterial::Fixed(key) => Some(key.clone()),
            CertificateMaterial::Secret(slot) => match &slot.current()?.loaded {
                secrets::LoadedSecret::Certificate { key, .. } => Some(key.clone()),
                secrets::LoadedSecret::Validation(_) => None,
            },
        }
    }
}

impl rustls::server::ResolvesServerCert for CertificateMaterial {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for CertificateMaterial {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn validation_material(
    source: &ValidationSource,
    secrets: &Arc<Secrets>,
) -> ConfigResult<ValidationMaterial> {
    Ok(match source {
        ValidationSource::Inline(validation) => {
            ValidationMaterial::Fixed(Arc::new(LoadedValidation::load(validation)?))
        }
        ValidationSource::Sds(sds) => ValidationMaterial::Secret(secrets.slot(sds)),
        ValidationSource::Combined { default, secret } => ValidationMaterial::Combined {
            default: Box::new(LoadedValidation::read(default)?),
            secret: secrets.slot(secret),
            merged: Default::default(),
        },
    })
}

/// A server config for a filter chain's TLS termination.
pub fn server_config(
    tls: &DownstreamTls,
    secrets: &Arc<Secrets>,
    stats: &Arc<SslStats>,
) -> ConfigResult<Arc<rustls::ServerConfig>> {
    let common = &tls.common;
    let cpath = &common.path;
    let builder = rustls::ServerConfig::builder_with_provider(provider_for(common))
        .with_protocol_versions(protocol_versions(common))
        .map_err(|e| ConfigError::new(cpath, e.to_string()))?;
    let builder = match &common.validation {
        Some(source) => builder.with_client_cert_verifier(Arc::new(DownstreamVerifier {
            material: validation_material(source, secrets)?,
            require_client_certificate: tls.require_client_certificate,
            stats: stats.clone(),
        })),
        None => builder.with_no_client_auth(),
    };
    let Some(certificate) = common.certificates.first() else {
        return err(
            format!("{cpath}.tls_certificates"),
            "exactly one certificate is required",
        );
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(CertificateMaterial::new(certificate, secrets)?));
    config.alpn_protocols = common.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Stateless session tickets with keys made at start, as Envoy's default is.
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| ConfigError::new(cpath, format!("cannot make session ticket keys: {e}")))?;
    Ok(Arc::new(config))
}

/// A client config and SNI for a cluster's TLS origination.
pub fn client_config(
    tls: &UpstreamTls,
    secrets: &Arc<Secrets>,
    stats: Arc<SslStats>,
) -> ConfigResult<ClientTls> {
    let common = &tls.common;
    let cpath = &common.path;
    let builder = rustls::ClientConfig::builder_with_provider(provider_for(common))
        .with_protocol_versions(protocol_versions(common))
        .map_err(|e| ConfigError::new(cpath, e.to_string()))?;
    let builder = match &common.validation {
        Some(source) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(UpstreamVerifier {
                material: validation_material(source, secrets)?,
                stats: stats.clone(),
            })),
        // Envoy does not verify the upstream without a validation context.
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification)),
    };
    let mut config = match common.certificates.first() {
        None => builder.with_no_client_auth(),
        Some(certificate) => builder
            .with_client_cert_resolver(Arc::new(CertificateMaterial::new(certificate, secrets)?)),
    };
    config.alpn_protocols = common.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.resumption = if tls.session_resumption {
        rustls::client::Resumption::store(Arc::new(resumption::SessionCache::default()))
    } else {
        rustls::client::Resumption::disabled()
    };
    let sni = match &tls.sni {
        Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
            ConfigError::new(
                format!("{}.sni", cpath.trim_end_matches(".common_tls_context")),
                "not a valid server name",
            )
        })?),
        None => None,
    };
    Ok(ClientTls {
        config: Arc::new(config),
        sni,
        stats,
    })
}

/// TLS origination as a connection uses it.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub sni: Option<ServerName<'static>>,
    /// `cluster.NAME.ssl.*`.
    pub stats: Arc<SslStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER element from its tag and content.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// The same certificate without its version field: what an X.509 v1 certificate looks
    /// like (its signature no longer verifies, which loading a key pair does not check).
    fn as_version_1(der_v3: &[u8]) -> Vec<u8> {
        let certificate = der::element(der_v3).unwrap().content;
        let tbs = der::element(certificate).unwrap();
        assert_eq!(
            tbs.content[0], 0xa0,
            "a v3 certificate starts with its version"
        );
        let tbs_without_version = der::element(tbs.content).unwrap().rest;
        let mut body = tlv(0x30, tbs_without_version);
        body.extend_from_slice(tbs.rest);
        tlv(0x30, &body)
    }

    fn key_pair() -> (rcgen::KeyPair, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (key, cert.der().to_vec())
    }

    fn load(certificate: &[u8], key: &rcgen::KeyPair) -> ConfigResult<Arc<CertifiedKey>> {
        let key = private_key(key.serialize_pem().as_bytes(), "k")?;
        certified_key(vec![CertificateDer::from(certificate.to_vec())], key, "t")
    }

    #[test]
    fn a_certificate_loads_with_its_own_key_only_in_version_3_and_version_1() {
        let (key, v3) = key_pair();
        let (other_key, _) = key_pair();
        let v1 = as_version_1(&v3);
        assert_eq!(
            der::subject_public_key_info(&v1),
            der::subject_public_key_info(&v3)
        );
        assert!(der::subject_public_key_info(&v3).is_some());
        for certificate in [&v3, &v1] {
            load(certificate, &key).expect("own key");
            let error = load(certificate, &other_key).unwrap_err();
            assert!(error.to_string().contains("do not match"), "{error}");
        }
        let error = load(&v1[..v1.len() / 2], &key).unwrap_err();
        assert!(
            error.to_string().contains("certificate cannot be read"),
            "{error}"
        );
    }
}
