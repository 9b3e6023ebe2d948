//! Checking the peer's certificate as Envoy does: the chain must lead to a trusted CA; then, if
//! SAN matchers are set, one of the peer's subject alternative names must match one of them.
//! The host name is never checked against the certificate (Envoy only sends SNI), so SPIFFE
//! certificates, which carry a URI SAN only, pass. The validation in force is read at each
//! handshake, so a rotated trust bundle applies to the next one.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use remora_config::tls::{SanMatcher, SanType, Validation};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::secrets::{LoadedSecret, SecretSlot};
use super::{PeerCertificate, provider};
use crate::stats::SslStats;

/// The handshake-signature checks every verifier here shares: the crypto provider's, as
/// rustls's own verifiers do.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// A validation context read and ready: its CAs and SAN matchers.
#[derive(Debug)]
pub struct LoadedValidation {
    pub roots: Arc<rustls::RootCertStore>,
    pub san_matchers: Vec<SanMatcher>,
    /// The CA certificates as configured, and where they were read from, for `/certs`.
    pub ca_certificates: Vec<CertificateDer<'static>>,
    pub ca_source: String,
}

/// Which end of the handshake presented the certificate: its extended key usage, if it has
/// one, must allow that role.
#[derive(Debug, Clone, Copy)]
enum PeerRole {
    Server,
    Client,
}

impl LoadedValidation {
    /// Reads the CAs of `validation` (it must have `trusted_ca`).
    pub fn load(validation: &Validation) -> crate::config::ConfigResult<LoadedValidation> {
        let path = &validation.path;
        let Some(trusted_ca) = &validation.trusted_ca else {
            return Err(crate::config::ConfigError::new(
                path,
                "trusted_ca is required to check SANs",
            ));
        };
        let ca_path = format!("{path}.trusted_ca");
        let ca_certificates = super::certificates(&super::read(trusted_ca, &ca_path)?, &ca_path)?;
        let mut store = rustls::RootCertStore::empty();
        for certificate in &ca_certificates {
            store.add(certificate.clone()).map_err(|e| {
                crate::config::ConfigError::new(&ca_path, format!("invalid CA certificate: {e}"))
            })?;
        }
        Ok(LoadedValidation {
            roots: Arc::new(store),
            san_matchers: validation.san_matchers.clone(),
            ca_certificates,
            ca_source: super::source_name(trusted_ca),
        })
    }

    /// This validation with more SAN matchers (a combined context's default ones first).
    fn with_matchers_first(&self, first: &[SanMatcher]) -> LoadedValidation {
        LoadedValidation {
            roots: self.roots.clone(),
            san_matchers: first.iter().chain(&self.san_matchers).cloned().collect(),
            ca_certificates: self.ca_certificates.clone(),
            ca_source: self.ca_source.clone(),
        }
    }

    /// Everything Envoy checks of a peer's certificate, in its order, each failure counted
    /// under Envoy's name: the chain, then the SANs.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
        stats: &SslStats,
    ) -> Result<(), rustls::Error> {
        if let Err(error) = self.verify_chain(end_entity, intermediates, now, role) {
            stats.fail_verify_error.inc();
            return Err(error);
        }
        if !self.sans_match(end_entity) {
            stats.fail_verify_san.inc();
            return Err(san_mismatch());
        }
        Ok(())
    }

    /// Whether the chain leads to a trusted CA, through webpki as rustls's own verifiers do.
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<(), rustls::Error> {
        let certificate = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let usage = match role {
            PeerRole::Server => webpki::KeyUsage::server_auth(),
            PeerRole::Client => webpki::KeyUsage::client_auth(),
        };
        certificate
            .verify_for_usage(
                provider().signature_verification_algorithms.all,
                &self.roots.roots,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(|_| ())
            .map_err(pki_error)
    }

    /// Whether the peer's SANs satisfy the matchers (no matchers: any certificate).
    fn sans_match(&self, end_entity: &CertificateDer<'_>) -> bool {
        if self.san_matchers.is_empty() {
            return true;
        }
        let Some(peer) = PeerCertificate::parse(end_entity) else {
            return false;
        };
        self.san_matchers.iter().any(|matcher| {
            let sans = match matcher.san_type {
                SanType::Dns => peer.dns_sans(),
                SanType::Uri => peer.uri_sans(),
                SanType::Ip => peer.ip_sans(),
                SanType::Email => peer.email_sans(),
            };
            sans.iter().any(|san| matcher.matches(san))
        })
    }
}

/// A webpki error as the rustls error (and so the TLS alert) rustls's own verifiers give it.
fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let certificate = match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertRevoked => CertificateError::Revoked,
        E::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        E::CrlExpired { time, next_update } => {
            CertificateError::ExpiredRevocationListContext { time, next_update }
        }
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(certificate)
}

/// Where a TLS context's validation comes from at handshake time.
#[derive(Debug)]
pub enum ValidationMaterial {
    /// Inline in the config: read once.
    Fixed(Arc<LoadedValidation>),
    /// An SDS secret.
    Secret(Arc<SecretSlot>),
    /// An SDS secret with the default context's SAN matchers added; the merge is kept until
    /// the secret changes.
    Combined {
        default: Vec<SanMatcher>,
        secret: Arc<SecretSlot>,
        merged: ArcSwapOption<(u64, Arc<LoadedValidation>)>,
    },
}

impl ValidationMaterial {
    /// The validation in force; `None` while its secret has not arrived (or is not a
    /// validation context), which fails the handshake.
    pub fn current(&self) -> Option<Arc<LoadedValidation>> {
        let validation_of = |slot: &SecretSlot| {
            let value = slot.current()?;
            match &value.loaded {
                LoadedSecret::Validation(validation) => {
                    Some((value.generation, validation.clone()))
                }
                LoadedSecret::Certificate { .. } => None,
            }
        };
        match self {
            ValidationMaterial::Fixed(validation) => Some(validation.clone()),
            ValidationMaterial::Secret(slot) => validation_of(slot).map(|(_, v)| v),
            ValidationMaterial::Combined {
                default,
                secret,
                merged,
            } => {
                let (generation, dynamic) = validation_of(secret)?;
                if let Some(cached) = &*merged.load()
                    && cached.0 == generation
                {
                    return Some(cached.1.clone());
                }
                let fresh = Arc::new(dynamic.with_matchers_first(default));
                merged.store(Some(Arc::new((generation, fresh.clone()))));
                Some(fresh)
            }
        }
    }

    /// Whether SAN matchers are set now.
    fn has_san_matchers(&self) -> bool {
        self.current().is_some_and(|v| !v.san_matchers.is_empty())
    }
}

fn no_validation_yet() -> rustls::Error {
    rustls::Error::General("the validation context's secret has not arrived".into())
}

fn san_mismatch() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
}

/// Checks an upstream's certificate (Remora originating TLS).
#[derive(Debug)]
pub struct UpstreamVerifier {
    pub material: ValidationMaterial,
    pub stats: Arc<SslStats>,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let validation = self.material.current().ok_or_else(no_validation_yet)?;
        validation.verify(
            end_entity,
            intermediates,
            now,
            PeerRole::Server,
            &self.stats,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Checks a downstream's certificate (Remora terminating TLS). A certificate is required when
/// `require_client_certificate` is set or SAN matchers are (Envoy's rule).
#[derive(Debug)]
pub struct DownstreamVerifier {
    pub material: ValidationMaterial,
    pub require_client_certificate: bool,
    pub stats: Arc<SslStats>,
}

impl ClientCertVerifier for DownstreamVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.require_client_certificate || self.material.has_san_matchers()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The CA names may change with the secret; clients choose their certificate without
        // them (Envoy's default sends none either).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let validation = self.material.current().ok_or_else(no_validation_yet)?;
        validation.verify(
            end_entity,
            intermediates,
            now,
            PeerRole::Client,
            &self.stats,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Accepts any upstream certificate: Envoy does not verify an upstream without a validation
/// context. The handshake's signatures are still checked.
#[derive(Debug)]
pub struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}
