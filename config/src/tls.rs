//! TLS settings of a transport socket: `DownstreamTlsContext` on filter chains (terminate) and
//! `UpstreamTlsContext` on clusters (originate). The model keeps where certificates come from;
//! the proxy's `tls` module reads them and builds rustls configs when the config is applied,
//! so errors about unreadable or mismatched files still name their field.

use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use xds_api::type_urls;

use crate::common::{DataSource, data_source, unpack};
use crate::error::{ConfigResult, err, field, item};
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

/// How the peer's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    pub trusted_ca: DataSource,
    pub path: String,
}

/// What both directions share (`CommonTlsContext`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonTls {
    pub certificates: Vec<Certificate>,
    pub validation: Option<Validation>,
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    pub path: String,
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
}

/// The TLS context inside a `TransportSocket`, whose type must be `expected`.
fn socket_context<'a>(
    socket: &'a core_pb::TransportSocket,
    expected: &str,
    path: &str,
) -> ConfigResult<&'a prost_types::Any> {
    let core_pb::TransportSocket { name, config_type } = socket;
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
        None if name == "envoy.transport_sockets.raw_buffer" => {
            err(path, "raw_buffer needs no transport_socket; remove it")
        }
        None => err(path, "typed_config is required"),
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
    let common = common_tls(&common, &cpath)?;
    if common.certificates.len() != 1 {
        return err(
            field(&cpath, "tls_certificates"),
            "exactly one certificate is supported",
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
        max_session_keys,
        enforce_rsa_key_usage,
    );
    let cpath = field(&path, "common_tls_context");
    let common = common_tls(&common_tls_context.unwrap_or_default(), &cpath)?;
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
    })
}

fn common_tls(common: &tls_pb::CommonTlsContext, path: &str) -> ConfigResult<CommonTls> {
    let tls_pb::CommonTlsContext {
        tls_params,
        tls_certificates,
        tls_certificate_sds_secret_configs,
        alpn_protocols,
        validation_context_type,
    } = common;
    unsupported!(path, tls_certificate_sds_secret_configs);
    let (min_version, max_version) = match tls_params {
        Some(params) => versions(params, &field(path, "tls_params"))?,
        None => (TlsVersion::V1_2, TlsVersion::V1_3),
    };
    let mut certificates = Vec::new();
    for (index, certificate) in tls_certificates.iter().enumerate() {
        let cpath = item(path, "tls_certificates", index);
        let tls_pb::TlsCertificate {
            certificate_chain,
            private_key,
            watched_directory,
            password,
        } = certificate;
        unsupported!(&cpath, watched_directory, password);
        let required = |source: &Option<core_pb::DataSource>, name: &str| match source {
            Some(source) => data_source(source, &field(&cpath, name)),
            None => err(field(&cpath, name), "required"),
        };
        certificates.push(Certificate {
            chain: required(certificate_chain, "certificate_chain")?,
            key: required(private_key, "private_key")?,
            path: cpath.clone(),
        });
    }
    use tls_pb::common_tls_context::ValidationContextType as V;
    let validation = match validation_context_type {
        Some(V::ValidationContext(context)) => {
            Some(validation(context, &field(path, "validation_context"))?)
        }
        Some(V::ValidationContextSdsSecretConfig(_)) => {
            return err(
                field(path, "validation_context_sds_secret_config"),
                "SDS is not supported; use an inline validation_context",
            );
        }
        Some(V::CombinedValidationContext(_)) => {
            return err(
                field(path, "combined_validation_context"),
                "is not supported; use an inline validation_context",
            );
        }
        None => None,
    };
    Ok(CommonTls {
        certificates,
        validation,
        alpn: alpn_protocols.clone(),
        min_version,
        max_version,
        path: path.to_string(),
    })
}

fn validation(
    context: &tls_pb::CertificateValidationContext,
    path: &str,
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
    unsupported!(
        path,
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
    );
    let Some(trusted_ca) = trusted_ca else {
        return err(field(path, "trusted_ca"), "required");
    };
    Ok(Validation {
        trusted_ca: data_source(trusted_ca, &field(path, "trusted_ca"))?,
        path: field(path, "trusted_ca"),
    })
}

/// The TLS versions `tls_params` allow. Envoy's defaults (TLS_AUTO) are 1.2 to 1.3 on both
/// sides, which is all rustls speaks; asking for 1.0 or 1.1 is an error, not a silent 1.2.
fn versions(params: &tls_pb::TlsParameters, path: &str) -> ConfigResult<(TlsVersion, TlsVersion)> {
    use tls_pb::tls_parameters::TlsProtocol as P;
    let tls_pb::TlsParameters {
        tls_minimum_protocol_version,
        tls_maximum_protocol_version,
        cipher_suites,
        ecdh_curves,
    } = params;
    unsupported!(path, cipher_suites, ecdh_curves);
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
    let max = version(
        *tls_maximum_protocol_version,
        "tls_maximum_protocol_version",
        TlsVersion::V1_3,
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
        let get = |min, max| versions(&params(min, max), "c.tls_params");
        use TlsVersion::*;
        assert_eq!(get(P::TlsAuto, P::TlsAuto).unwrap(), (V1_2, V1_3));
        assert_eq!(get(P::TlSv13, P::TlsAuto).unwrap(), (V1_3, V1_3));
        assert_eq!(get(P::TlsAuto, P::TlSv12).unwrap(), (V1_2, V1_2));
        let error = get(P::TlSv10, P::TlsAuto).unwrap_err();
        assert_eq!(error.path, "c.tls_params.tls_minimum_protocol_version");
        let error = get(P::TlSv13, P::TlSv12).unwrap_err();
        assert!(error.to_string().contains("above"), "{error}");
    }
}
