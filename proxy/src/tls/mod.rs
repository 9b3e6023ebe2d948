//! TLS with rustls: `DownstreamTlsContext` on filter chains (terminate) and `UpstreamTlsContext`
//! on clusters (originate). Certificates and keys are read once at config time; the data path
//! only sees ready `rustls` configs.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::extensions::transport_sockets::tls::v3 as tls_pb;

use crate::config::{ConfigError, ConfigResult};

fn err<T>(path: impl Into<String>, reason: impl Into<String>) -> ConfigResult<T> {
    Err(ConfigError::new(path, reason))
}

/// The TLS type URLs and transport socket names Remora understands.
pub const DOWNSTREAM: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub const UPSTREAM: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(source: &Option<core_pb::DataSource>, path: &str) -> ConfigResult<Vec<u8>> {
    use core_pb::data_source::Specifier;
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::Filename(file)) => std::fs::read(file).map_err(|e| {
            ConfigError::new(
                format!("{path}.filename"),
                format!("cannot read {file:?}: {e}"),
            )
        }),
        Some(Specifier::InlineString(text)) => Ok(text.clone().into_bytes()),
        Some(Specifier::InlineBytes(bytes)) => Ok(bytes.clone()),
        Some(_) => err(
            path,
            "only filename, inline_string and inline_bytes are supported",
        ),
        None => err(path, "required"),
    }
}

fn certificates(pem: &[u8], path: &str) -> ConfigResult<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let certs = certs.map_err(|e| ConfigError::new(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return err(path, "no certificate found");
    }
    Ok(certs)
}

/// The TLS versions `tls_params` allow. Envoy's defaults (TLS_AUTO) are 1.2 to 1.3 on both
/// sides, which is all rustls speaks; asking for 1.0 or 1.1 is an error, not a silent 1.2.
fn protocol_versions(
    common: &tls_pb::CommonTlsContext,
    path: &str,
) -> ConfigResult<&'static [&'static rustls::SupportedProtocolVersion]> {
    use tls_pb::tls_parameters::TlsProtocol as P;
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS12, &rustls::version::TLS13];
    let Some(params) = &common.tls_params else {
        return Ok(&BOTH);
    };
    let version = |value: i32, field: &str, auto: P| -> ConfigResult<P> {
        let fpath = format!("{path}.tls_params.{field}");
        match P::try_from(value) {
            Ok(P::TlsAuto) => Ok(auto),
            Ok(P::TlSv10 | P::TlSv11) => err(
                fpath,
                "TLS 1.0 and 1.1 are not supported (Remora speaks TLS 1.2 and 1.3)",
            ),
            Ok(version) => Ok(version),
            Err(_) => err(fpath, format!("unknown TLS version {value}")),
        }
    };
    let min = version(
        params.tls_minimum_protocol_version,
        "tls_minimum_protocol_version",
        P::TlSv12,
    )?;
    let max = version(
        params.tls_maximum_protocol_version,
        "tls_maximum_protocol_version",
        P::TlSv13,
    )?;
    match (min, max) {
        (P::TlSv12, P::TlSv13) => Ok(&BOTH),
        (P::TlSv12, P::TlSv12) => Ok(&BOTH[..1]),
        (P::TlSv13, P::TlSv13) => Ok(&BOTH[1..]),
        _ => err(
            format!("{path}.tls_params"),
            "tls_minimum_protocol_version is above tls_maximum_protocol_version",
        ),
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

fn roots(
    common: &tls_pb::CommonTlsContext,
    path: &str,
) -> ConfigResult<Option<rustls::RootCertStore>> {
    use tls_pb::common_tls_context::ValidationContextType as V;
    match &common.validation_context_type {
        Some(V::ValidationContext(validation)) => {
            let vpath = format!("{path}.validation_context.trusted_ca");
            let mut store = rustls::RootCertStore::empty();
            for cert in certificates(&read(&validation.trusted_ca, &vpath)?, &vpath)? {
                store.add(cert).map_err(|e| {
                    ConfigError::new(&vpath, format!("invalid CA certificate: {e}"))
                })?;
            }
            Ok(Some(store))
        }
        Some(_) => err(path, "only an inline validation_context is supported"),
        None => Ok(None),
    }
}

/// A server config for a filter chain's `DownstreamTlsContext`.
pub fn server_config(
    context: &tls_pb::DownstreamTlsContext,
    path: &str,
) -> ConfigResult<Arc<rustls::ServerConfig>> {
    let cpath = format!("{path}.common_tls_context");
    let Some(common) = &context.common_tls_context else {
        return err(cpath, "required");
    };
    let [certificate] = common.tls_certificates.as_slice() else {
        return err(
            format!("{cpath}.tls_certificates"),
            "exactly one certificate is supported",
        );
    };
    let tpath = format!("{cpath}.tls_certificates[0]");
    let chain = certificates(
        &read(
            &certificate.certificate_chain,
            &format!("{tpath}.certificate_chain"),
        )?,
        &format!("{tpath}.certificate_chain"),
    )?;
    let key = private_key(
        &read(&certificate.private_key, &format!("{tpath}.private_key"))?,
        &format!("{tpath}.private_key"),
    )?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(protocol_versions(common, &cpath)?)
        .map_err(|e| ConfigError::new(&cpath, e.to_string()))?;
    let builder = match roots(common, &cpath)? {
        Some(store) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(store),
                provider(),
            );
            let verifier = if context.require_client_certificate.unwrap_or(false) {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| ConfigError::new(&cpath, e.to_string()))?,
            )
        }
        None if context.require_client_certificate.unwrap_or(false) => {
            return err(
                format!("{path}.require_client_certificate"),
                "needs a validation_context",
            );
        }
        None => builder.with_no_client_auth(),
    };
    let certified = certified_key(chain, key, &tpath)?;
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = common
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(Arc::new(config))
}

/// A client config and SNI for a cluster's `UpstreamTlsContext`.
pub fn client_config(
    context: &tls_pb::UpstreamTlsContext,
    path: &str,
) -> ConfigResult<UpstreamTls> {
    let cpath = format!("{path}.common_tls_context");
    let common = context.common_tls_context.clone().unwrap_or_default();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(protocol_versions(&common, &cpath)?)
        .map_err(|e| ConfigError::new(&cpath, e.to_string()))?;
    let builder = match roots(&common, &cpath)? {
        Some(store) => builder.with_root_certificates(store),
        // Envoy does not verify the upstream without a validation context.
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider()))),
    };
    let mut config = match common.tls_certificates.as_slice() {
        [] => builder.with_no_client_auth(),
        [certificate] => {
            let tpath = format!("{cpath}.tls_certificates[0]");
            let chain = certificates(
                &read(
                    &certificate.certificate_chain,
                    &format!("{tpath}.certificate_chain"),
                )?,
                &tpath,
            )?;
            let key = private_key(
                &read(&certificate.private_key, &format!("{tpath}.private_key"))?,
                &tpath,
            )?;
            let certified = certified_key(chain, key, &tpath)?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        _ => {
            return err(
                format!("{cpath}.tls_certificates"),
                "at most one certificate is supported",
            );
        }
    };
    config.alpn_protocols = common
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    let sni = if context.sni.is_empty() {
        None
    } else {
        Some(
            ServerName::try_from(context.sni.clone())
                .map_err(|_| ConfigError::new(format!("{path}.sni"), "not a valid server name"))?,
        )
    };
    Ok(UpstreamTls {
        config: Arc::new(config),
        sni,
    })
}

/// Upstream TLS as a cluster uses it.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub sni: Option<ServerName<'static>>,
}

#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Extracts a TLS context from a transport socket, or says why not.
pub fn transport_socket<'a>(
    socket: &'a core_pb::TransportSocket,
    expected: &str,
    path: &str,
) -> ConfigResult<&'a prost_types::Any> {
    match &socket.config_type {
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any))
            if any.type_url == expected =>
        {
            Ok(any)
        }
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any)) => err(
            format!("{path}.typed_config"),
            format!("transport socket {} is not supported", any.type_url),
        ),
        None if socket.name == "envoy.transport_sockets.raw_buffer" => {
            err(path, "raw_buffer needs no transport_socket; remove it")
        }
        None => err(path, "typed_config is required"),
    }
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
    fn tls_params_choose_the_versions_and_refuse_what_rustls_cannot_speak() {
        use tls_pb::tls_parameters::TlsProtocol as P;
        let context = |min: P, max: P| tls_pb::CommonTlsContext {
            tls_params: Some(tls_pb::TlsParameters {
                tls_minimum_protocol_version: min as i32,
                tls_maximum_protocol_version: max as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let versions = |min, max| {
            protocol_versions(&context(min, max), "c").map(|list| {
                list.iter()
                    .map(|v| format!("{:?}", v.version))
                    .collect::<Vec<_>>()
            })
        };
        let both = ["TLSv1_2", "TLSv1_3"];
        assert_eq!(versions(P::TlsAuto, P::TlsAuto).unwrap(), both);
        assert_eq!(
            protocol_versions(&tls_pb::CommonTlsContext::default(), "c")
                .unwrap()
                .len(),
            2
        );
        assert_eq!(versions(P::TlSv13, P::TlsAuto).unwrap(), ["TLSv1_3"]);
        assert_eq!(versions(P::TlsAuto, P::TlSv12).unwrap(), ["TLSv1_2"]);
        let error = versions(P::TlSv10, P::TlsAuto).unwrap_err();
        assert_eq!(error.path, "c.tls_params.tls_minimum_protocol_version");
        let error = versions(P::TlSv13, P::TlSv12).unwrap_err();
        assert!(error.to_string().contains("above"), "{error}");
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
