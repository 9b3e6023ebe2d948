//! Checking the peer's certificate as Envoy does: the chain must lead to a trusted CA, none of
//! its certificates revoked by the CRLs configured; then, if SAN matchers are set, one of the
//! peer's subject alternative names must match one of them; then, if pins are set, the
//! certificate or its public key must hash to one of them (pins alone need no trusted CA).
//! The host name is never checked against the certificate (Envoy only sends SNI), so SPIFFE
//! certificates, which carry a URI SAN only, pass. The validation in force is read at each
//! handshake, so a rotated trust bundle applies to the next one.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use remora_config::common::DataSource;
use remora_config::tls::{SanMatcher, SanType, Validation};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::secrets::{LoadedSecret, SecretSlot};
use super::{PeerCertificate, provider};
use crate::config::{ConfigError, ConfigResult};
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

/// A revocation list webpki has read, and when it was issued (the newest of an issuer's is
/// the one used, as BoringSSL chooses).
#[derive(Debug, Clone)]
struct Crl {
    this_update: i64,
    list: Arc<webpki::CertRevocationList<'static>>,
}

/// The CAs of `trusted_ca`: the anchors a chain must lead to, and the CRLs the same PEM may
/// carry (Envoy reads both from it).
#[derive(Debug)]
struct Trust {
    roots: rustls::RootCertStore,
    /// For each of `roots`: whether it issued itself. With CRLs checked on the whole chain,
    /// BoringSSL checks the trust anchor too, against a CRL from its issuer: only a
    /// self-issued anchor can have one.
    self_issued: Vec<bool>,
    crls: Vec<Crl>,
    /// The CA certificates as configured, and where they were read from, for `/certs`.
    certificates: Vec<CertificateDer<'static>>,
    source: String,
}

/// A validation context read and ready: its CAs, CRLs and checks.
#[derive(Debug)]
pub struct LoadedValidation {
    /// `None`: no `trusted_ca`, so the chain is not checked, only pins (as in Envoy).
    trust: Option<Arc<Trust>>,
    /// The CRLs of `crl`; `None` when it is unset (a combined context then takes its
    /// default's).
    crl: Option<Vec<Crl>>,
    /// The checks as configured (for a combined context, merged with its default's).
    rules: Validation,
    /// The CRLs in force, `trusted_ca`'s and `crl`'s, newest first.
    crls: Vec<Arc<webpki::CertRevocationList<'static>>>,
}

/// Which end of the handshake presented the certificate: its extended key usage, if it has
/// one, must allow that role.
#[derive(Debug, Clone, Copy)]
enum PeerRole {
    Server,
    Client,
}

/// The CRLs of a `crl`: at least one unless it is empty (which Envoy reads as no `crl`).
fn load_crl(source: &DataSource, path: &str) -> ConfigResult<Vec<Crl>> {
    let pem = super::read(source, path)?;
    let crls = read_crls(&pem, path)?;
    if crls.is_empty() && !pem.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new(path, "no CRL found"));
    }
    Ok(crls)
}

/// The CRLs of a PEM (a `crl` or a `trusted_ca`), each checked by webpki.
fn read_crls(pem: &[u8], path: &str) -> ConfigResult<Vec<Crl>> {
    let mut crls = Vec::new();
    for item in rustls_pemfile::read_all(&mut &pem[..]) {
        let item = item.map_err(|e| ConfigError::new(path, format!("invalid PEM: {e}")))?;
        let rustls_pemfile::Item::Crl(der) = item else {
            continue;
        };
        let index = crls.len();
        let invalid = |e: &dyn std::fmt::Display| {
            ConfigError::new(path, format!("CRL {index} cannot be read: {e}"))
        };
        let list = webpki::OwnedCertRevocationList::from_der(&der).map_err(|e| invalid(&e))?;
        let (_, parsed) = x509_parser::parse_x509_crl(&der).map_err(|e| invalid(&e))?;
        crls.push(Crl {
            this_update: parsed.last_update().timestamp(),
            list: Arc::new(list.into()),
        });
    }
    Ok(crls)
}

impl Trust {
    fn load(trusted_ca: &DataSource, path: &str) -> ConfigResult<Trust> {
        let pem = super::read(trusted_ca, path)?;
        let certificates = super::certificates(&pem, path)?;
        let mut roots = rustls::RootCertStore::empty();
        let mut self_issued = Vec::new();
        for certificate in &certificates {
            roots
                .add(certificate.clone())
                .map_err(|e| ConfigError::new(path, format!("invalid CA certificate: {e}")))?;
            let parsed = x509_parser::parse_x509_certificate(certificate).map(|(_, c)| c);
            self_issued.push(parsed.is_ok_and(|c| c.subject().as_raw() == c.issuer().as_raw()));
        }
        Ok(Trust {
            roots,
            self_issued,
            crls: read_crls(&pem, path)?,
            certificates,
            source: super::source_name(trusted_ca),
        })
    }

    /// Whether `anchor` (one of `roots`) issued itself.
    fn is_self_issued(&self, anchor: &rustls::pki_types::TrustAnchor<'_>) -> bool {
        self.roots
            .roots
            .iter()
            .position(|root| std::ptr::eq(root, anchor))
            .is_some_and(|index| self.self_issued[index])
    }
}

impl LoadedValidation {
    /// Reads the CAs and CRLs of `validation`, which must not need a CA it lacks.
    pub fn load(validation: &Validation) -> ConfigResult<LoadedValidation> {
        if let Some((name, reason)) = validation.missing_trusted_ca() {
            return Err(ConfigError::new(
                format!("{}.{name}", validation.path),
                reason,
            ));
        }
        Self::read(validation)
    }

    /// Reads what `validation` names, whatever it lacks: a combined context's default, whose
    /// SDS secret may bring the rest.
    pub fn read(validation: &Validation) -> ConfigResult<LoadedValidation> {
        let path = &validation.path;
        let trust = match &validation.trusted_ca {
            Some(source) => Some(Arc::new(Trust::load(
                source,
                &format!("{path}.trusted_ca"),
            )?)),
            None => None,
        };
        let crl = match &validation.crl {
            Some(source) => Some(load_crl(source, &format!("{path}.crl"))?),
            None => None,
        };
        Ok(Self::assemble(trust, crl, validation.clone()))
    }

    fn assemble(
        trust: Option<Arc<Trust>>,
        crl: Option<Vec<Crl>>,
        rules: Validation,
    ) -> LoadedValidation {
        let trust_crls = trust.iter().flat_map(|trust| &trust.crls);
        let mut all: Vec<&Crl> = trust_crls.chain(crl.iter().flatten()).collect();
        all.sort_by_key(|crl| std::cmp::Reverse(crl.this_update));
        let crls = all.into_iter().map(|crl| crl.list.clone()).collect();
        LoadedValidation {
            trust,
            crl,
            rules,
            crls,
        }
    }

    /// A combined context's validation: the secret's (this) over the default's, as protobuf
    /// merges them. `None` if the merge needs a CA neither has (Envoy refuses it too).
    fn over_default(&self, default: &LoadedValidation) -> Option<Self> {
        let rules = default.rules.merged(&self.rules);
        let trust = self.trust.clone().or_else(|| default.trust.clone());
        if trust.is_none()
            && let Some((name, reason)) = rules.missing_trusted_ca()
        {
            tracing::warn!(
                secret = %self.rules.path,
                "combined validation context refused: {name}: {reason}"
            );
            return None;
        }
        Some(Self::assemble(
            trust,
            self.crl.clone().or_else(|| default.crl.clone()),
            rules,
        ))
    }

    /// The CA certificates, and where they were read from, for `/certs` (none without a CA).
    pub fn ca_certificates(&self) -> (&str, &[CertificateDer<'static>]) {
        match &self.trust {
            Some(trust) => (&trust.source, &trust.certificates),
            None => ("", &[]),
        }
    }

    /// The SAN matchers in force.
    fn san_matchers(&self) -> &[SanMatcher] {
        self.rules.san_matchers_in_force()
    }

    /// Whether a client must present a certificate: SAN matchers or pins cannot pass without
    /// one (Envoy's rule).
    fn demands_certificate(&self) -> bool {
        !self.rules.san_matchers_in_force().is_empty() || self.rules.has_pins()
    }

    /// Everything Envoy checks of a peer's certificate, in its order, each failure counted
    /// under Envoy's name: the chain (with its CRLs), the SANs, then the pins.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
        stats: &SslStats,
    ) -> Result<(), rustls::Error> {
        if let Some(trust) = &self.trust
            && let Err(error) = self.verify_chain(trust, end_entity, intermediates, now, role)
        {
            stats.fail_verify_error.inc();
            return Err(error);
        }
        if !self.sans_match(end_entity) {
            stats.fail_verify_san.inc();
            return Err(san_mismatch());
        }
        if !self.pins_match(end_entity) {
            stats.fail_verify_cert_hash.inc();
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(())
    }

    /// Whether the peer's certificate matches a pin: the SHA-256 of its DER, or of its
    /// SubjectPublicKeyInfo (no pins: any certificate).
    fn pins_match(&self, end_entity: &CertificateDer<'_>) -> bool {
        let rules = &self.rules;
        if !rules.has_pins() {
            return true;
        }
        let sha256 = |bytes: &[u8]| ring::digest::digest(&ring::digest::SHA256, bytes);
        let whole = sha256(end_entity);
        if rules
            .certificate_hashes
            .iter()
            .any(|hash| hash == whole.as_ref())
        {
            return true;
        }
        if rules.spki_hashes.is_empty() {
            return false;
        }
        let Ok((_, certificate)) = x509_parser::parse_x509_certificate(end_entity) else {
            return false;
        };
        let spki = sha256(certificate.public_key().raw);
        rules.spki_hashes.iter().any(|hash| hash == spki.as_ref())
    }

    /// Whether the chain leads to a trusted CA, through webpki as rustls's own verifiers do,
    /// within `max_verify_depth`, and no certificate of it is revoked. With CRLs, a
    /// certificate whose issuer has none fails, as in Envoy (BoringSSL's
    /// `X509_V_ERR_UNABLE_TO_GET_CRL`).
    fn verify_chain(
        &self,
        trust: &Trust,
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
        let whole_chain = !self.rules.only_verify_leaf_cert_crl;
        let crls: Vec<&webpki::CertRevocationList<'_>> =
            self.crls.iter().map(|crl| &**crl).collect();
        let revocation = webpki::RevocationOptionsBuilder::new(&crls)
            .ok()
            .map(|builder| {
                builder
                    .with_depth(if whole_chain {
                        webpki::RevocationCheckDepth::Chain
                    } else {
                        webpki::RevocationCheckDepth::EndEntity
                    })
                    .with_status_policy(webpki::UnknownStatusPolicy::Deny)
                    .with_expiration_policy(if self.rules.allow_expired_certificate {
                        webpki::ExpirationPolicy::Ignore
                    } else {
                        webpki::ExpirationPolicy::Enforce
                    })
                    .build()
            });
        let max_cas = self
            .rules
            .max_verify_depth
            .map(|depth| depth.max(1) as usize);
        let checked_path = |path: &webpki::VerifiedPath<'_>| {
            if max_cas.is_some_and(|max| path.intermediate_certificates().count() + 1 > max) {
                return Err(webpki::Error::MaximumPathDepthExceeded);
            }
            if revocation.is_some() && whole_chain && !trust.is_self_issued(path.anchor()) {
                return Err(webpki::Error::UnknownRevocationStatus);
            }
            Ok(())
        };
        certificate
            .verify_for_usage(
                provider().signature_verification_algorithms.all,
                &trust.roots.roots,
                intermediates,
                self.check_time(end_entity, intermediates, now),
                usage,
                revocation,
                Some(&checked_path),
            )
            .map(|_| ())
            .map_err(pki_error)
    }

    /// When to check the chain's validity periods: now, or, with `allow_expired_certificate`
    /// (BoringSSL's `NO_CHECK_TIME`, which webpki lacks), the moment nearest to now when every
    /// certificate the peer sent is valid. Without such a moment (their periods do not
    /// overlap), now.
    fn check_time(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> UnixTime {
        if !self.rules.allow_expired_certificate {
            return now;
        }
        let mut valid = (i64::MIN, i64::MAX);
        for der in std::iter::once(end_entity).chain(intermediates) {
            let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der) else {
                return now;
            };
            let period = certificate.validity();
            valid.0 = valid.0.max(period.not_before.timestamp());
            valid.1 = valid.1.min(period.not_after.timestamp());
        }
        let seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        match u64::try_from(seconds.clamp(valid.0, valid.1)) {
            Ok(at) if valid.0 <= valid.1 => {
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(at))
            }
            _ => now,
        }
    }

    /// Whether the peer's SANs satisfy the matchers (no matchers: any certificate).
    fn sans_match(&self, end_entity: &CertificateDer<'_>) -> bool {
        if self.san_matchers().is_empty() {
            return true;
        }
        let Some(peer) = PeerCertificate::parse(end_entity) else {
            return false;
        };
        self.san_matchers().iter().any(|matcher| {
            let sans = match matcher.san_type {
                SanType::Dns => peer.dns_sans(),
                SanType::Uri => peer.uri_sans(),
                SanType::Ip => peer.ip_sans(),
                SanType::Email => peer.email_sans(),
                SanType::OtherName => {
                    return peer
                        .other_names()
                        .iter()
                        .filter(|(oid, _)| matcher.oid.as_ref() == Some(oid))
                        .any(|(_, value)| matcher.matches(value));
                }
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
    /// An SDS secret merged over the default context (its checks, and its CRLs, read once);
    /// the merge is kept until the secret changes.
    Combined {
        default: Box<LoadedValidation>,
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
                let fresh = Arc::new(dynamic.over_default(default)?);
                merged.store(Some(Arc::new((generation, fresh.clone()))));
                Some(fresh)
            }
        }
    }

    /// Whether a client must present a certificate now.
    fn demands_certificate(&self) -> bool {
        self.current().is_some_and(|v| v.demands_certificate())
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
/// `require_client_certificate` is set, or SAN matchers or pins are (Envoy's rule).
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
        self.require_client_certificate || self.material.demands_certificate()
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa,
        KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber, date_time_ymd,
    };

    /// A CA and what it signs.
    struct Ca {
        key: KeyPair,
        certificate: rcgen::Certificate,
    }

    impl Ca {
        fn new(name: &str, issuer: Option<&Ca>, serial: u64) -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.serial_number = Some(SerialNumber::from(serial));
            params.distinguished_name.push(DnType::CommonName, name);
            let certificate = match issuer {
                Some(issuer) => params.signed_by(&key, &issuer.certificate, &issuer.key),
                None => params.self_signed(&key),
            }
            .unwrap();
            Ca { key, certificate }
        }

        fn der(&self) -> CertificateDer<'static> {
            self.certificate.der().clone()
        }

        fn leaf(&self, serial: u64) -> CertificateDer<'static> {
            self.leaf_until(serial, 4000)
        }

        /// A leaf valid from 2020 to the start of `year`.
        fn leaf_until(&self, serial: u64, year: i32) -> CertificateDer<'static> {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["peer.test".to_string()]).unwrap();
            params.serial_number = Some(SerialNumber::from(serial));
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(year, 1, 1);
            params
                .signed_by(&key, &self.certificate, &self.key)
                .unwrap()
                .der()
                .clone()
        }

        /// A CRL of this CA revoking `serials`, valid until `next_update` (a year).
        fn crl(&self, serials: &[u64], next_update: i32) -> String {
            CertificateRevocationListParams {
                this_update: date_time_ymd(2020, 1, 1),
                next_update: date_time_ymd(next_update, 1, 1),
                crl_number: SerialNumber::from(1),
                issuing_distribution_point: None,
                revoked_certs: serials
                    .iter()
                    .map(|serial| RevokedCertParams {
                        serial_number: SerialNumber::from(*serial),
                        revocation_time: date_time_ymd(2020, 1, 1),
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&self.certificate, &self.key)
            .unwrap()
            .pem()
            .unwrap()
        }
    }

    /// A validation trusting `trusted_ca` and checking nothing else.
    fn trusting(trusted_ca: Option<String>) -> Validation {
        Validation {
            trusted_ca: trusted_ca.map(|pem| DataSource::Inline(pem.into_bytes())),
            crl: None,
            only_verify_leaf_cert_crl: false,
            san_matchers: Vec::new(),
            legacy_san_matchers: Vec::new(),
            certificate_hashes: Vec::new(),
            spki_hashes: Vec::new(),
            allow_expired_certificate: false,
            max_verify_depth: None,
            path: "v".to_string(),
        }
    }

    fn validation(trusted_ca: String, crl: Option<String>, leaf_only: bool) -> LoadedValidation {
        LoadedValidation::load(&Validation {
            crl: crl.map(|pem| DataSource::Inline(pem.into_bytes())),
            only_verify_leaf_cert_crl: leaf_only,
            ..trusting(Some(trusted_ca))
        })
        .unwrap()
    }

    /// Whether `chain` (leaf first) passes, and the failure counted if not.
    fn verdict(validation: &LoadedValidation, chain: &[CertificateDer<'static>]) -> &'static str {
        let stats = SslStats::new(&crate::stats::Registry::default(), "t");
        let result = validation.verify(
            &chain[0],
            &chain[1..],
            UnixTime::now(),
            PeerRole::Client,
            &stats,
        );
        let counted = [
            ("fail_verify_error", &stats.fail_verify_error),
            ("fail_verify_san", &stats.fail_verify_san),
            ("fail_verify_cert_hash", &stats.fail_verify_cert_hash),
        ];
        let counted: Vec<&str> = counted
            .into_iter()
            .filter(|(_, counter)| counter.get() > 0)
            .map(|(name, _)| name)
            .collect();
        match (result, counted.as_slice()) {
            (Ok(()), []) => "ok",
            (Err(_), [name]) => name,
            (result, counted) => panic!("{result:?} counted as {counted:?}"),
        }
    }

    /// The outcomes Envoy 1.40 (BoringSSL) gave for these chains and CRLs, run by hand with
    /// a root, an intermediate and leaves of each: a CRL is needed from the issuer of every
    /// certificate checked, the trust anchor included when the whole chain is.
    #[test]
    fn crls_check_the_chain_as_envoy_does() {
        let root = Ca::new("root", None, 1);
        let intermediate = Ca::new("intermediate", Some(&root), 7);
        let by_root = [root.leaf(100)];
        let by_intermediate = [intermediate.leaf(101), intermediate.der()];
        let revoked = [intermediate.leaf(200), intermediate.der()];
        let root_pem = root.certificate.pem();
        let root_crl = root.crl(&[], 2099);
        let intermediate_crl = intermediate.crl(&[200], 2099);
        let both = format!("{root_crl}{intermediate_crl}");
        const OK: &str = "ok";
        const FAIL: &str = "fail_verify_error";
        // Verdicts for a leaf of the root, a leaf of the intermediate, and a revoked one.
        let check = |name: &str, trusted_ca: String, crl: Option<&str>, leaf_only, want| {
            let validation = validation(trusted_ca, crl.map(str::to_string), leaf_only);
            let got = [&by_root[..], &by_intermediate, &revoked].map(|c| verdict(&validation, c));
            assert_eq!(got, want, "{name}");
        };
        check("no CRL", root_pem.clone(), None, false, [OK, OK, OK]);
        check(
            "root's",
            root_pem.clone(),
            Some(&root_crl),
            false,
            [OK, FAIL, FAIL],
        );
        check(
            "root's, leaf",
            root_pem.clone(),
            Some(&root_crl),
            true,
            [OK, FAIL, FAIL],
        );
        let intermediates = Some(intermediate_crl.as_str());
        check(
            "intermediate's",
            root_pem.clone(),
            intermediates,
            false,
            [FAIL; 3],
        );
        check(
            "intermediate's, leaf",
            root_pem.clone(),
            intermediates,
            true,
            [FAIL, OK, FAIL],
        );
        check("both", root_pem.clone(), Some(&both), false, [OK, OK, FAIL]);
        let root_and_crl = format!("{root_pem}{root_crl}");
        check(
            "in trusted_ca",
            root_and_crl.clone(),
            None,
            false,
            [OK, FAIL, FAIL],
        );
        check(
            "one in each",
            root_and_crl,
            intermediates,
            false,
            [OK, OK, FAIL],
        );

        // The root revokes the intermediate: only a whole-chain check sees it.
        let revoking = format!("{}{}", root.crl(&[7], 2099), intermediate.crl(&[], 2099));
        let whole = validation(root_pem.clone(), Some(revoking.clone()), false);
        assert_eq!(verdict(&whole, &by_intermediate), FAIL);
        let leaf_only = validation(root_pem.clone(), Some(revoking), true);
        assert_eq!(verdict(&leaf_only, &by_intermediate), OK);

        // An expired CRL fails every chain it covers.
        let expired = validation(root_pem, Some(root.crl(&[], 2021)), false);
        assert_eq!(verdict(&expired, &by_root), FAIL);

        // A trust anchor that is not self-issued has no CRL from its issuer here: a whole
        // chain check fails, as BoringSSL's does; a leaf-only one passes.
        let anchor = intermediate.certificate.pem();
        let whole = validation(anchor.clone(), Some(both.clone()), false);
        assert_eq!(verdict(&whole, &by_intermediate), FAIL);
        let leaf_only = validation(anchor, Some(both), true);
        assert_eq!(verdict(&leaf_only, &by_intermediate), OK);
        assert_eq!(verdict(&leaf_only, &revoked), FAIL);
    }

    /// Pins as Envoy checks them: the leaf must hash to one pin of either list, after the
    /// chain and the SANs; without `trusted_ca` only the pins are checked.
    #[test]
    fn pins_match_the_certificate_or_its_key() {
        let root = Ca::new("root", None, 1);
        let other = Ca::new("other", None, 2);
        let leaf = [root.leaf(10)];
        let stranger = [other.leaf(11)];
        let sha256 = |bytes: &[u8]| -> [u8; 32] {
            ring::digest::digest(&ring::digest::SHA256, bytes)
                .as_ref()
                .try_into()
                .unwrap()
        };
        let certificate_hash = sha256(&leaf[0]);
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf[0]).unwrap();
        let spki_hash = sha256(parsed.public_key().raw);
        let with = |trusted_ca: Option<String>, hashes: &[[u8; 32]], spkis: &[[u8; 32]]| {
            LoadedValidation::load(&Validation {
                certificate_hashes: hashes.to_vec(),
                spki_hashes: spkis.to_vec(),
                ..trusting(trusted_ca)
            })
            .unwrap()
        };
        let ca = Some(root.certificate.pem());
        let wrong = [0u8; 32];
        for (name, validation) in [
            ("hash", with(ca.clone(), &[wrong, certificate_hash], &[])),
            ("spki", with(ca.clone(), &[], &[spki_hash])),
            ("either list", with(ca.clone(), &[wrong], &[spki_hash])),
        ] {
            assert_eq!(verdict(&validation, &leaf), "ok", "{name}");
            assert!(validation.demands_certificate(), "{name}");
        }
        let mismatch = with(ca.clone(), &[wrong], &[wrong]);
        assert_eq!(verdict(&mismatch, &leaf), "fail_verify_cert_hash");
        // The chain is checked first.
        let pinned = with(ca, &[certificate_hash], &[]);
        assert_eq!(verdict(&pinned, &stranger), "fail_verify_error");

        // Pins alone: any chain, only the pin decides.
        let alone = with(None, &[], &[spki_hash]);
        assert_eq!(verdict(&alone, &leaf), "ok");
        assert_eq!(verdict(&alone, &stranger), "fail_verify_cert_hash");
        assert_eq!(alone.ca_certificates().1.len(), 0);
        // Neither a CA nor pins: refused, as before (Envoy would check nothing).
        let error = LoadedValidation::load(&trusting(None)).unwrap_err();
        assert_eq!(error.path, "v.trusted_ca");
    }

    /// `max_verify_depth` as Envoy 1.40 answered it for the same chains: it counts the CA
    /// certificates above the leaf, trust anchor included, and 0 acts as 1.
    #[test]
    fn max_verify_depth_counts_cas_as_envoy_does() {
        let root = Ca::new("root", None, 1);
        let first = Ca::new("first", Some(&root), 2);
        let second = Ca::new("second", Some(&first), 3);
        let chains = [
            vec![root.leaf(10)],
            vec![first.leaf(11), first.der()],
            vec![second.leaf(12), second.der(), first.der()],
        ];
        const OK: &str = "ok";
        const FAIL: &str = "fail_verify_error";
        let check = |name: &str, trusted_ca: String, depth: Option<u32>, want: [&str; 3]| {
            let validation = LoadedValidation::load(&Validation {
                max_verify_depth: depth,
                ..trusting(Some(trusted_ca))
            })
            .unwrap();
            let got = [&chains[0], &chains[1], &chains[2]].map(|c| verdict(&validation, c));
            assert_eq!(got, want, "{name}, depth {depth:?}");
        };
        let root_pem = root.certificate.pem();
        check("root", root_pem.clone(), None, [OK; 3]);
        check("root", root_pem.clone(), Some(0), [OK, FAIL, FAIL]);
        check("root", root_pem.clone(), Some(1), [OK, FAIL, FAIL]);
        check("root", root_pem.clone(), Some(2), [OK, OK, FAIL]);
        check("root", root_pem.clone(), Some(3), [OK; 3]);
        // An intermediate as the trust anchor: the path is shorter.
        let first_pem = first.certificate.pem();
        check("first", first_pem.clone(), Some(1), [FAIL, OK, FAIL]);
        check("first", first_pem.clone(), Some(2), [FAIL, OK, OK]);
        // Both: the shorter path is found.
        check(
            "both",
            format!("{root_pem}{first_pem}"),
            Some(1),
            [OK, OK, FAIL],
        );
    }

    /// `allow_expired_certificate` as Envoy checks it: no validity period counts, a CRL's
    /// neither.
    #[test]
    fn allow_expired_certificate_skips_validity_periods() {
        let root = Ca::new("root", None, 1);
        let expired = [root.leaf_until(10, 2021)];
        let valid = [root.leaf(11)];
        let with = |allow: bool, crl: Option<String>| {
            LoadedValidation::load(&Validation {
                allow_expired_certificate: allow,
                crl: crl.map(|pem| DataSource::Inline(pem.into_bytes())),
                ..trusting(Some(root.certificate.pem()))
            })
            .unwrap()
        };
        assert_eq!(verdict(&with(false, None), &expired), "fail_verify_error");
        assert_eq!(verdict(&with(true, None), &expired), "ok");
        assert_eq!(verdict(&with(true, None), &valid), "ok");
        let expired_crl = root.crl(&[], 2021);
        assert_eq!(
            verdict(&with(false, Some(expired_crl.clone())), &valid),
            "fail_verify_error"
        );
        assert_eq!(
            verdict(&with(true, Some(expired_crl.clone())), &expired),
            "ok"
        );
        // A revoked certificate stays revoked.
        let revoking = root.crl(&[10], 2021);
        assert_eq!(
            verdict(&with(true, Some(revoking)), &expired),
            "fail_verify_error"
        );
    }

    /// An OTHER_NAME matcher looks only at otherName SANs of its OID; a miss counts as a SAN
    /// mismatch.
    #[test]
    fn other_name_matchers_look_at_their_oid_only() {
        use remora_config::matcher::StringMatch;
        let root = Ca::new("root", None, 1);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::OtherName((
            vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
            "user@example.com".into(),
        ))];
        let leaf = [params
            .signed_by(&key, &root.certificate, &root.key)
            .unwrap()
            .der()
            .clone()];
        let with = |oid: &str, value: &str| {
            LoadedValidation::load(&Validation {
                san_matchers: vec![SanMatcher {
                    san_type: SanType::OtherName,
                    oid: Some(oid.to_string()),
                    matcher: StringMatch::Exact(value.to_string(), false),
                }],
                ..trusting(Some(root.certificate.pem()))
            })
            .unwrap()
        };
        let upn = "1.3.6.1.4.1.311.20.2.3";
        assert_eq!(verdict(&with(upn, "user@example.com"), &leaf), "ok");
        assert_eq!(
            verdict(&with(upn, "other@example.com"), &leaf),
            "fail_verify_san"
        );
        assert_eq!(
            verdict(&with("1.2.3.4", "user@example.com"), &leaf),
            "fail_verify_san"
        );
    }
}
