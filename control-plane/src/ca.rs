//! The mesh's certificate authority: one root that signs every workload certificate, whose
//! certificate is the trust bundle proxies verify peers against (`GET /v1/ca/bundle`, and the
//! `remora-trust-bundle` SDS secret).
//!
//! The root comes from files (`--ca-cert`, `--ca-key`) or is generated on first start and kept
//! in the config store, so every replica on one etcd signs with the same root. Workload
//! certificates carry one URI SAN, the workload's SPIFFE id
//! (`spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`), and are short-lived; the mesh hub
//! renews them at half life.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use crate::store::{Change, CommitOutcome, ConfigStore};

/// Where a generated root is kept in the store (never served to proxies).
pub const STORED_ROOT: &str = "ca/root";
/// How long a generated root is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Workload certificates start this long before they are issued, so a peer whose clock is a
/// little behind does not refuse a fresh one.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The longest workload certificate lifetime accepted: they are meant to be short-lived.
const MAX_WORKLOAD_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// How many times a first start retries storing its root when another replica stored first.
const STORE_ATTEMPTS: usize = 8;

/// A workload's identity: `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`, each part non-empty.
    pub fn parse(uri: &str) -> Option<SpiffeId> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        let (namespace, service_account) = path.strip_prefix("ns/")?.split_once("/sa/")?;
        let parts = [trust_domain, namespace, service_account];
        if parts
            .iter()
            .any(|part| part.is_empty() || part.contains('/'))
        {
            return None;
        }
        Some(SpiffeId::new(trust_domain, namespace, service_account))
    }

    /// `spiffe://TRUST_DOMAIN/`: what every identity of the trust domain starts with.
    pub fn trust_domain_prefix(trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/")
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A signed workload certificate and its key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The leaf, then the root (the chain a peer is sent).
    pub chain_pem: String,
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedCertificate {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A root as stored: its certificate and key, PEM.
#[derive(Clone, Serialize, Deserialize)]
struct StoredRoot {
    cert_pem: String,
    key_pem: String,
}

/// The certificate authority.
pub struct Ca {
    /// The root certificate as proxies get it (the trust bundle).
    root_pem: String,
    /// The root as rcgen signs with it: parsed from `root_pem`, so issued certificates name
    /// the root's subject and key identifier exactly.
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    trust_domain: String,
    workload_lifetime: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("workload_lifetime", &self.workload_lifetime)
            .finish_non_exhaustive()
    }
}

/// How the CA is set up.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// The SPIFFE trust domain (`cluster.local`).
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    pub workload_lifetime: Duration,
    /// Root certificate and key files; `None`: generated once and kept in the store.
    pub root_files: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Default for CaOptions {
    fn default() -> Self {
        CaOptions {
            trust_domain: "cluster.local".to_string(),
            workload_lifetime: Duration::from_secs(24 * 3600),
            root_files: None,
        }
    }
}

impl Ca {
    /// A CA signing with the root `cert_pem` (the first certificate in it) and its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str, options: &CaOptions) -> anyhow::Result<Ca> {
        check_trust_domain(&options.trust_domain)?;
        if options.workload_lifetime < Duration::from_secs(2)
            || options.workload_lifetime > MAX_WORKLOAD_LIFETIME
        {
            bail!(
                "the workload certificate lifetime must be between 2s and 366 days, not {:?}",
                options.workload_lifetime
            );
        }
        let issuer_key = KeyPair::from_pem(key_pem)
            .context("the CA key is not a PEM private key rcgen can sign with (PKCS#8 ECDSA P-256/P-384, Ed25519 or RSA)")?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .context("the CA certificate is not a PEM X.509 certificate")?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            bail!("the CA certificate is not a CA (basicConstraints CA:TRUE is missing)");
        }
        // Re-signing the parsed root with the given key gives the issuer rcgen needs; it only
        // lends its subject and key identifier to the certificates issued.
        let issuer = params
            .self_signed(&issuer_key)
            .context("signing with the CA key")?;
        if !same_public_key(cert_pem, &issuer_key)? {
            bail!("the CA key does not belong to the CA certificate");
        }
        Ok(Ca {
            root_pem: first_pem_certificate(cert_pem)?,
            issuer,
            issuer_key,
            trust_domain: options.trust_domain.clone(),
            workload_lifetime: options.workload_lifetime,
        })
    }

    /// Reads the root from `cert_path` and `key_path`.
    pub fn from_files(
        cert_path: &Path,
        key_path: &Path,
        options: &CaOptions,
    ) -> anyhow::Result<Ca> {
        let cert = std::fs::read_to_string(cert_path)
            .with_context(|| format!("reading the CA certificate {}", cert_path.display()))?;
        let key = std::fs::read_to_string(key_path)
            .with_context(|| format!("reading the CA key {}", key_path.display()))?;
        Ca::from_pem(&cert, &key, options)
            .with_context(|| format!("CA from {} and {}", cert_path.display(), key_path.display()))
    }

    /// The root in `store`, or a new one stored there; replicas starting together agree on
    /// the first stored.
    pub async fn from_store(store: &dyn ConfigStore, options: &CaOptions) -> anyhow::Result<Ca> {
        for _ in 0..STORE_ATTEMPTS {
            let state = store.load().await.context("reading the store")?;
            if let Some(bytes) = state.private.get(STORED_ROOT) {
                let root: StoredRoot = serde_json::from_slice(bytes)
                    .with_context(|| format!("the stored CA root ({STORED_ROOT}) is unreadable"))?;
                return Ca::from_pem(&root.cert_pem, &root.key_pem, options)
                    .context("the stored CA root");
            }
            let (cert_pem, key_pem) = generate_root(&options.trust_domain)?;
            let stored = serde_json::to_vec(&StoredRoot {
                cert_pem: cert_pem.clone(),
                key_pem: key_pem.clone(),
            })?;
            let change = Change::PutPrivate(STORED_ROOT.to_string(), Bytes::from(stored));
            match store.commit(state.version, vec![change]).await? {
                CommitOutcome::Committed(_) => {
                    tracing::info!(trust_domain = %options.trust_domain, "generated and stored a new CA root");
                    return Ca::from_pem(&cert_pem, &key_pem, options);
                }
                // Another replica wrote first: take its root (or retry if it wrote something else).
                CommitOutcome::Conflict => continue,
            }
        }
        bail!("could not store a CA root: the store kept changing ({STORE_ATTEMPTS} attempts)")
    }

    /// The CA the options describe: from files if given, else from the store.
    pub async fn open(store: &dyn ConfigStore, options: &CaOptions) -> anyhow::Result<Arc<Ca>> {
        let ca = match &options.root_files {
            Some((cert, key)) => Ca::from_files(cert, key, options)?,
            None => Ca::from_store(store, options).await?,
        };
        Ok(Arc::new(ca))
    }

    /// The trust bundle: the root certificate, PEM.
    pub fn bundle_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn workload_lifetime(&self) -> Duration {
        self.workload_lifetime
    }

    /// The identity of `service_account` in `namespace` in this CA's trust domain.
    pub fn identity(&self, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, namespace, service_account)
    }

    /// The workload identity a certificate of this CA's (DER, already verified against the
    /// bundle) names: its URI SAN `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`, in
    /// this trust domain. Else what is wrong with it.
    pub fn identity_of_certificate(&self, der: &[u8]) -> Result<SpiffeId, String> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| format!("the client certificate is not X.509: {error}"))?;
        let uris: Vec<&str> = certificate
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let [uri] = uris.as_slice() else {
            return Err(format!(
                "the client certificate must name one workload identity (a URI SAN spiffe://{}/ns/NAMESPACE/sa/SERVICE_ACCOUNT), not {uris:?}",
                self.trust_domain
            ));
        };
        SpiffeId::parse(uri)
            .filter(|identity| identity.trust_domain == self.trust_domain)
            .ok_or_else(|| {
                format!(
                    "the client certificate's identity {uri:?} is not a workload of trust domain {:?} (spiffe://{}/ns/NAMESPACE/sa/SERVICE_ACCOUNT)",
                    self.trust_domain, self.trust_domain
                )
            })
    }

    /// A new key and a certificate for `identity`, valid from `now` (less a little clock
    /// skew) for the workload lifetime.
    pub fn issue(&self, identity: &SpiffeId, now: SystemTime) -> anyhow::Result<IssuedCertificate> {
        self.issue_with_dns_names(identity, &[], now)
    }

    /// [`Ca::issue`], naming `dns_names` besides the SPIFFE id: the control plane's own
    /// serving certificate, which clients may check by DNS name or by identity.
    pub fn issue_with_dns_names(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        now: SystemTime,
    ) -> anyhow::Result<IssuedCertificate> {
        let key = KeyPair::generate().context("generating a workload key")?;
        let (params, not_before, not_after) = self.leaf_params(identity, dns_names, now)?;
        let leaf = params
            .signed_by(&key, &self.issuer, &self.issuer_key)
            .with_context(|| format!("signing a certificate for {identity}"))?;
        Ok(IssuedCertificate {
            chain_pem: format!("{}{}", leaf.pem(), self.root_pem),
            key_pem: key.serialize_pem(),
            not_before,
            not_after,
        })
    }

    /// A certificate for `identity` on the public key of the PKCS#10 request `csr_pem`, valid
    /// as [`Ca::issue`]'s. The request's self-signature must verify (its sender holds the key);
    /// the names and extensions it asks for are ignored: the identity is the caller's.
    pub fn sign_request(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
        now: SystemTime,
    ) -> Result<SignedRequest, CsrError> {
        let public_key = requested_public_key(csr_pem)?;
        let (params, _, not_after) = self
            .leaf_params(identity, &[], now)
            .map_err(|error| CsrError::Signing(format!("{error:#}")))?;
        let leaf = params
            .signed_by(&public_key, &self.issuer, &self.issuer_key)
            .map_err(|error| CsrError::Signing(format!("signing for {identity}: {error}")))?;
        let serial = x509_parser::parse_x509_certificate(leaf.der())
            .map(|(_, parsed)| serial_hex(parsed.raw_serial()))
            .map_err(|error| CsrError::Signing(format!("reading back the signed leaf: {error}")))?;
        Ok(SignedRequest {
            chain_pem: format!("{}{}", leaf.pem(), self.root_pem),
            not_after,
            serial,
        })
    }

    /// What every leaf this CA signs says: the SPIFFE id (and `dns_names`) as SANs, usable
    /// as client and server, valid for the workload lifetime. Also the validity it names,
    /// in whole seconds as X.509 keeps it.
    fn leaf_params(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        now: SystemTime,
    ) -> anyhow::Result<(CertificateParams, SystemTime, SystemTime)> {
        let uri = rcgen::Ia5String::try_from(identity.to_string())
            .with_context(|| format!("{identity} is not an IA5 string"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.clone());
        params.subject_alt_names = vec![SanType::URI(uri)];
        for name in dns_names {
            let dns = rcgen::Ia5String::try_from(name.as_str())
                .with_context(|| format!("DNS name {name:?} is not an IA5 string"))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
        let not_after = now + self.workload_lifetime;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        Ok((
            params,
            truncate_to_seconds(not_before),
            truncate_to_seconds(not_after),
        ))
    }
}

/// A certificate signed for a certificate request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedRequest {
    /// The leaf, then the root.
    pub chain_pem: String,
    pub not_after: SystemTime,
    /// The leaf's serial number as Envoy's `/certs` prints it (lowercase hex, no leading
    /// zero bytes), to tell which certificate a proxy serves.
    pub serial: String,
}

/// A serial number in lowercase hex without the leading zero bytes DER may add.
fn serial_hex(raw: &[u8]) -> String {
    let significant = raw
        .iter()
        .position(|&byte| byte != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[significant..]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Why a certificate request was not signed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The request itself is wrong (the caller's fault): what is wrong with it.
    #[error("{0}")]
    BadRequest(String),
    /// Signing failed (ours).
    #[error("{0}")]
    Signing(String),
}

/// The public key of the PKCS#10 request in `csr_pem`, once its self-signature verifies.
fn requested_public_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, CsrError> {
    use x509_parser::prelude::FromDer;
    let bad = |text: String| CsrError::BadRequest(text);
    let block = pem::parse(csr_pem).map_err(|error| bad(format!("csr_pem is not PEM: {error}")))?;
    if !matches!(
        block.tag(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
    ) {
        return Err(bad(format!(
            "csr_pem holds a {:?} PEM block, not a CERTIFICATE REQUEST",
            block.tag()
        )));
    }
    let (rest, request) =
        x509_parser::certification_request::X509CertificationRequest::from_der(block.contents())
            .map_err(|error| {
                bad(format!(
                    "csr_pem is not a PKCS#10 certificate request: {error}"
                ))
            })?;
    if !rest.is_empty() {
        return Err(bad(
            "csr_pem has bytes after the certificate request".to_string()
        ));
    }
    request.verify_signature().map_err(|_| {
        bad("the certificate request's signature does not verify with the key it carries (it must be signed by its own key)".to_string())
    })?;
    rcgen::SubjectPublicKeyInfo::from_der(request.certification_request_info.subject_pki.raw)
        .map_err(|error| {
            bad(format!(
                "the certificate request's key is of a kind this CA does not sign (ECDSA P-256/P-384, Ed25519 or RSA): {error}"
            ))
        })
}

fn truncate_to_seconds(time: SystemTime) -> SystemTime {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs()),
        Err(_) => time,
    }
}

/// A trust domain is a DNS-like name: lowercase letters, digits, `.`, `-`, `_`.
fn check_trust_domain(trust_domain: &str) -> anyhow::Result<()> {
    let valid = !trust_domain.is_empty()
        && trust_domain.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b".-_".contains(&byte)
        });
    if !valid {
        bail!(
            "trust domain {trust_domain:?}: only lowercase letters, digits, '.', '-' and '_' are allowed (SPIFFE)"
        );
    }
    Ok(())
}

/// A new self-signed root for `trust_domain`: (certificate PEM, key PEM).
pub fn generate_root(trust_domain: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.to_string());
    params
        .distinguished_name
        .push(DnType::CommonName, "Remora mesh CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    let cert = params
        .self_signed(&key)
        .context("self-signing the CA root")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The first certificate of a PEM file, re-encoded (drops anything else in the file).
fn first_pem_certificate(pem_text: &str) -> anyhow::Result<String> {
    let der = first_certificate_der(pem_text)?;
    let unix_lines = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    Ok(pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        unix_lines,
    ))
}

fn first_certificate_der(pem_text: &str) -> anyhow::Result<Vec<u8>> {
    let blocks = pem::parse_many(pem_text).context("reading the CA certificate PEM")?;
    blocks
        .into_iter()
        .find(|block| block.tag() == "CERTIFICATE")
        .map(|block| block.into_contents())
        .context("no CERTIFICATE block in the CA certificate PEM")
}

/// Whether `key` is the key of the certificate in `cert_pem`.
fn same_public_key(cert_pem: &str, key: &KeyPair) -> anyhow::Result<bool> {
    let der = first_certificate_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|error| anyhow::anyhow!("parsing the CA certificate: {error}"))?;
    Ok(cert.public_key().raw == key.public_key_der().as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb_store::RedbStore;
    use x509_parser::extensions::GeneralName;

    fn options() -> CaOptions {
        CaOptions {
            workload_lifetime: Duration::from_secs(3600),
            ..CaOptions::default()
        }
    }

    fn generated() -> Ca {
        let (cert, key) = generate_root("cluster.local").expect("root");
        Ca::from_pem(&cert, &key, &options()).expect("ca")
    }

    /// The DER of every certificate in a PEM text.
    fn ders(text: &str) -> Vec<Vec<u8>> {
        pem::parse_many(text)
            .expect("pem")
            .into_iter()
            .map(|block| block.into_contents())
            .collect()
    }

    #[test]
    fn a_workload_certificate_names_only_its_spiffe_id_and_lives_the_configured_time() {
        let ca = generated();
        let identity = ca.identity("shop", "buyer");
        assert_eq!(
            identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/buyer"
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let issued = ca.issue(&identity, now).expect("issue");
        let chain = ders(&issued.chain_pem);
        assert_eq!(chain.len(), 2, "leaf then root");
        assert_eq!(chain[1], ders(ca.bundle_pem())[0]);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("leaf");
        let sans = leaf
            .subject_alternative_name()
            .expect("SAN extension")
            .expect("present")
            .value
            .general_names
            .clone();
        assert_eq!(
            sans,
            vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/buyer")]
        );
        let not_before = leaf.validity().not_before.timestamp();
        let not_after = leaf.validity().not_after.timestamp();
        assert_eq!(not_after, 1_800_000_000 + 3600);
        assert_eq!(not_before, 1_800_000_000 - CLOCK_SKEW.as_secs() as i64);
        assert_eq!(
            issued.not_after,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_003_600)
        );
        assert!(!leaf.is_ca());
        // Signed by the root in the bundle.
        let (_, root) = x509_parser::parse_x509_certificate(&chain[1]).expect("root");
        leaf.verify_signature(Some(root.public_key()))
            .expect("the root signed the leaf");
        assert_eq!(leaf.issuer(), root.subject());
        // The key is the leaf's.
        let key = KeyPair::from_pem(&issued.key_pem).expect("key");
        assert_eq!(leaf.public_key().raw, key.public_key_der().as_slice());
    }

    #[test]
    fn a_certificate_request_is_signed_for_the_callers_identity_on_its_own_key() {
        let ca = generated();
        let key = KeyPair::generate().expect("key");
        // The request asks for other names, among them another identity: ignored.
        let mut asked = CertificateParams::new(vec!["admin.example".to_string()]).expect("params");
        asked.subject_alt_names.push(SanType::URI(
            rcgen::Ia5String::try_from("spiffe://cluster.local/ns/kube-system/sa/admin")
                .expect("uri"),
        ));
        let csr = asked
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let signed = ca
            .sign_request(&ca.identity("shop", "buyer"), &csr, now)
            .expect("signed");
        assert_eq!(
            signed.not_after,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_003_600)
        );
        let chain = ders(&signed.chain_pem);
        assert_eq!(chain.len(), 2, "leaf then root");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("leaf");
        assert_eq!(leaf.public_key().raw, key.public_key_der().as_slice());
        assert_eq!(signed.serial, serial_hex(leaf.raw_serial()));
        assert!(!signed.serial.starts_with("00"));
        let sans = leaf
            .subject_alternative_name()
            .expect("SAN extension")
            .expect("present")
            .value
            .general_names
            .clone();
        assert_eq!(
            sans,
            vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/buyer")]
        );
        assert!(!leaf.is_ca());
        let (_, root) = x509_parser::parse_x509_certificate(&chain[1]).expect("root");
        leaf.verify_signature(Some(root.public_key()))
            .expect("the root signed the leaf");
    }

    #[test]
    fn a_certificate_names_its_identity_and_other_uris_are_refused() {
        let ca = generated();
        let now = SystemTime::now();
        let identity = ca.identity("shop", "buyer");
        let issued = ca.issue(&identity, now).expect("issue");
        let der = ders(&issued.chain_pem).remove(0);
        assert_eq!(ca.identity_of_certificate(&der), Ok(identity.clone()));
        assert_eq!(SpiffeId::parse(&identity.to_string()), Some(identity));
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "https://cluster.local/ns/a/sa/b",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
        // The control plane's own certificate (a DNS name too) still names one identity.
        let serving = ca
            .issue_with_dns_names(
                &ca.identity("remora-system", "remora-cp"),
                &["cp.svc".into()],
                now,
            )
            .expect("issue");
        assert!(
            ca.identity_of_certificate(&ders(&serving.chain_pem)[0])
                .is_ok()
        );
        // Another trust domain's identity is refused, naming what is expected.
        let (cert, key) = generate_root("example.org").expect("root");
        let foreign = Ca::from_pem(
            &cert,
            &key,
            &CaOptions {
                trust_domain: "example.org".into(),
                ..options()
            },
        )
        .expect("ca");
        let foreign_leaf = foreign
            .issue(&foreign.identity("shop", "buyer"), now)
            .expect("issue");
        let error = ca
            .identity_of_certificate(&ders(&foreign_leaf.chain_pem)[0])
            .expect_err("another trust domain");
        assert!(error.contains("\"cluster.local\""), "{error}");
        assert!(ca.identity_of_certificate(b"junk").is_err());
    }

    #[test]
    fn bad_certificate_requests_are_refused_saying_why() {
        let ca = generated();
        let identity = ca.identity("shop", "buyer");
        let now = SystemTime::now();
        let refused = |csr: &str| match ca.sign_request(&identity, csr, now) {
            Err(CsrError::BadRequest(message)) => message,
            other => panic!("expected a bad request, got {other:?}"),
        };
        assert!(refused("hello").contains("not PEM"));
        let issued = ca.issue(&identity, now).expect("issue");
        assert!(refused(&issued.chain_pem).contains("not a CERTIFICATE REQUEST"));
        let garbage = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", vec![1, 2, 3]));
        assert!(refused(&garbage).contains("not a PKCS#10"));
        // A request whose signature was made by another key than the one it carries.
        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .expect("csr");
        let mut der = csr.der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x55;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(
            refused(&tampered).contains("signature does not verify"),
            "{}",
            refused(&tampered)
        );
    }

    #[test]
    fn a_root_from_files_signs_and_is_the_bundle_as_written() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = generate_root("example.org").expect("root");
        let cert_path = dir.path().join("ca.crt");
        let key_path = dir.path().join("ca.key");
        std::fs::write(&cert_path, &cert).expect("write");
        std::fs::write(&key_path, &key).expect("write");
        let options = CaOptions {
            trust_domain: "example.org".into(),
            ..options()
        };
        let ca = Ca::from_files(&cert_path, &key_path, &options).expect("ca");
        assert_eq!(ders(ca.bundle_pem()), ders(&cert));
        let issued = ca
            .issue(&ca.identity("a", "b"), SystemTime::now())
            .expect("issue");
        let chain = ders(&issued.chain_pem);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("leaf");
        let root_der = ders(&cert).remove(0);
        let (_, root) = x509_parser::parse_x509_certificate(&root_der).expect("root");
        leaf.verify_signature(Some(root.public_key()))
            .expect("the file's root signed the leaf");

        // A key of another root is refused, naming the files.
        let (_, other_key) = generate_root("example.org").expect("root");
        std::fs::write(&key_path, &other_key).expect("write");
        let error = format!(
            "{:#}",
            Ca::from_files(&cert_path, &key_path, &options).expect_err("mismatch")
        );
        assert!(error.contains("does not belong"), "{error}");
        assert!(error.contains("ca.key"), "{error}");
        let error = format!(
            "{:#}",
            Ca::from_files(&dir.path().join("absent"), &key_path, &options).expect_err("absent")
        );
        assert!(error.contains("reading the CA certificate"), "{error}");
        // A leaf is not a CA.
        let leaf_pem = issued
            .chain_pem
            .split_inclusive("-----END CERTIFICATE-----")
            .next();
        let error = format!(
            "{:#}",
            Ca::from_pem(leaf_pem.unwrap_or_default(), &issued.key_pem, &options)
                .expect_err("leaf")
        );
        assert!(error.contains("not a CA"), "{error}");
    }

    #[test]
    fn bad_trust_domains_and_lifetimes_are_refused() {
        let (cert, key) = generate_root("cluster.local").expect("root");
        for domain in ["", "Cluster.Local", "a/b"] {
            let options = CaOptions {
                trust_domain: domain.into(),
                ..options()
            };
            let error = Ca::from_pem(&cert, &key, &options).expect_err(domain);
            assert!(error.to_string().contains("trust domain"), "{error}");
        }
        for lifetime in [Duration::from_secs(1), Duration::from_secs(400 * 24 * 3600)] {
            let options = CaOptions {
                workload_lifetime: lifetime,
                ..options()
            };
            let error = Ca::from_pem(&cert, &key, &options).expect_err("refused");
            assert!(error.to_string().contains("lifetime"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_generated_root_is_stored_once_and_shared() {
        let dir = tempfile::tempdir().expect("dir");
        let bundle = {
            let store = Arc::new(RedbStore::open(dir.path()).expect("store"));
            // Two replicas starting at once agree on one root.
            let options = options();
            let (first, second) = tokio::join!(
                Ca::from_store(store.as_ref(), &options),
                Ca::from_store(store.as_ref(), &options)
            );
            let (first, second) = (first.expect("first"), second.expect("second"));
            assert_eq!(first.bundle_pem(), second.bundle_pem());
            first.bundle_pem().to_string()
        };
        // A restart reads it back.
        let store = RedbStore::open(dir.path()).expect("reopen");
        let again = Ca::open(&store, &options()).await.expect("reopened");
        assert_eq!(again.bundle_pem(), bundle);
        let state = store.load().await.expect("load");
        assert!(state.private.get(STORED_ROOT).is_some());
        assert!(
            state.resources.is_empty(),
            "the root is no servable resource"
        );
        assert!(!format!("{state:?}").contains("PRIVATE KEY"));
    }
}
