//! Who a sidecar is, and the SDS secrets that prove it: the workload certificate
//! (`remora-workload-cert`, certificate chain and key inline) and the trust bundle
//! (`remora-trust-bundle`) its TLS contexts name (see `translate::cluster::mesh_tls_context`).
//!
//! A sidecar's identity is its pod's service account: `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SA`,
//! with the service account from the workload (a pod's `spec.serviceAccountName`), or
//! `default` while the workload is unknown (the REST source has no workloads; Kubernetes gives
//! a pod without one `default` too). Sidecars of one identity share one certificate, issued
//! when the first of their xDS streams subscribes to `remora-workload-cert` (an Envoy sidecar
//! over SDS; a Remora sidecar that makes its own key asks the certificate service instead and
//! never subscribes, so none is made for it), re-issued at half its life while a stream of the
//! identity still subscribes, and forgotten when none does.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use tokio::time::Instant;
use xds_api::envoy::config::core::v3::DataSource;
use xds_api::envoy::config::core::v3::data_source::Specifier;
use xds_api::envoy::extensions::transport_sockets::tls::v3::secret::Type as SecretType;
use xds_api::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate,
};

use crate::ca::{Ca, IssuedCertificate, SpiffeId};
use crate::mesh::model::{Inputs, ObjectKey};
use crate::mesh::names;
use crate::mesh::sidecar::Sidecar;
use crate::resource::Kind;
use crate::snapshot::{Resource, TypeMap};

/// How long a failed renewal waits before the next attempt.
const RETRY_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(30);

/// The service account of a pod that names none (Kubernetes' rule).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The service account `workload` runs as, if the mesh knows the workload.
pub fn known_service_account<'a>(inputs: &'a Inputs, workload: &ObjectKey) -> Option<&'a str> {
    inputs
        .workload(workload)
        .map(|workload| workload.service_account.as_str())
        .filter(|account| !account.is_empty())
}

/// The identity of the sidecar of `workload`.
pub fn workload_identity(inputs: &Inputs, workload: &ObjectKey, trust_domain: &str) -> SpiffeId {
    let account = known_service_account(inputs, workload).unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    SpiffeId::new(trust_domain, &workload.namespace, account)
}

/// The identity of a connected sidecar: the service account its credential proves, else its
/// workload's.
pub fn sidecar_identity(inputs: &Inputs, sidecar: &Sidecar, trust_domain: &str) -> SpiffeId {
    match &sidecar.service_account {
        Some(account) => SpiffeId::new(trust_domain, sidecar.namespace(), account),
        None => workload_identity(inputs, &sidecar.workload, trust_domain),
    }
}

fn inline(text: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineString(text.to_string())),
        ..Default::default()
    })
}

fn secret_resource(secret: &Secret) -> Arc<Resource> {
    Arc::new(Resource::with_eds_service(
        Kind::Secret,
        &secret.name,
        &secret.encode_to_vec(),
        None,
    ))
}

/// The `remora-workload-cert` secret of an issued certificate.
pub fn certificate_secret(issued: &IssuedCertificate) -> Secret {
    Secret {
        name: names::WORKLOAD_CERT_SECRET.to_string(),
        r#type: Some(SecretType::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&issued.chain_pem),
            private_key: inline(&issued.key_pem),
            ..Default::default()
        })),
    }
}

/// The `remora-trust-bundle` secret.
pub fn trust_bundle_secret(bundle_pem: &str) -> Secret {
    Secret {
        name: names::TRUST_BUNDLE_SECRET.to_string(),
        r#type: Some(SecretType::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle_pem),
                ..Default::default()
            },
        )),
    }
}

struct Issued {
    /// Both secrets, shared by every sidecar of the identity.
    secrets: Arc<TypeMap>,
    renew_at: Instant,
}

/// The secrets of every identity whose certificate a connected sidecar subscribes to.
pub struct WorkloadSecrets {
    ca: Arc<Ca>,
    bundle: Arc<Resource>,
    /// The trust bundle alone: what a sidecar that wants no certificate gets (one map for all).
    bundle_only: Arc<TypeMap>,
    issued: HashMap<SpiffeId, Issued>,
}

impl std::fmt::Debug for WorkloadSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSecrets")
            .field("identities", &self.issued.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl WorkloadSecrets {
    pub fn new(ca: Arc<Ca>) -> WorkloadSecrets {
        let bundle = secret_resource(&trust_bundle_secret(ca.bundle_pem()));
        let bundle_only = Arc::new(TypeMap::from([(bundle.name.clone(), bundle.clone())]));
        WorkloadSecrets {
            ca,
            bundle,
            bundle_only,
            issued: HashMap::new(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// Signs a new certificate for `identity`; `None` (logged) if signing failed, so the
    /// sidecar gets the bundle alone until its identity changes or it subscribes again.
    fn issue(&self, identity: &SpiffeId, now: Instant) -> Option<Issued> {
        let issued = match self.ca.issue(identity, SystemTime::now()) {
            Ok(issued) => issued,
            Err(error) => {
                tracing::error!(%identity, error = format!("{error:#}"), "cannot issue a workload certificate");
                return None;
            }
        };
        tracing::debug!(%identity, not_after = ?issued.not_after, "issued a workload certificate");
        let certificate = secret_resource(&certificate_secret(&issued));
        let secrets = TypeMap::from([
            (certificate.name.clone(), certificate),
            (self.bundle.name.clone(), self.bundle.clone()),
        ]);
        Some(Issued {
            secrets: Arc::new(secrets),
            renew_at: now + self.ca.workload_lifetime() / 2,
        })
    }

    /// The secrets of a sidecar of `identity`: the trust bundle, and with `certificate` the
    /// identity's certificate too, issued if it has none yet.
    pub fn secrets(&mut self, identity: &SpiffeId, certificate: bool) -> Arc<TypeMap> {
        if !certificate {
            return self.bundle_only.clone();
        }
        if let Some(issued) = self.issued.get(identity) {
            return issued.secrets.clone();
        }
        match self.issue(identity, Instant::now()) {
            Some(issued) => {
                let secrets = issued.secrets.clone();
                self.issued.insert(identity.clone(), issued);
                secrets
            }
            None => self.bundle_only.clone(),
        }
    }

    /// Whether a certificate of `identity` is held (for tests and logs).
    pub fn holds(&self, identity: &SpiffeId) -> bool {
        self.issued.contains_key(identity)
    }

    /// Re-issues every certificate at or past half its life; the identities renewed.
    pub fn renew_due(&mut self, now: Instant) -> BTreeSet<SpiffeId> {
        let due: Vec<SpiffeId> = self
            .issued
            .iter()
            .filter(|(_, issued)| issued.renew_at <= now)
            .map(|(identity, _)| identity.clone())
            .collect();
        let mut renewed = BTreeSet::new();
        for identity in due {
            match self.issue(&identity, now) {
                Some(issued) => {
                    self.issued.insert(identity.clone(), issued);
                    renewed.insert(identity);
                }
                // The old certificate is still valid: try again a little later rather than
                // at once, in a loop.
                None => {
                    if let Some(issued) = self.issued.get_mut(&identity) {
                        issued.renew_at = now + RETRY_AFTER_FAILURE;
                    }
                }
            }
        }
        renewed
    }

    /// When the next certificate is due for renewal.
    pub fn next_renewal(&self) -> Option<Instant> {
        self.issued.values().map(|issued| issued.renew_at).min()
    }

    /// Forgets the certificates of identities not in `wanted` (no stream subscribes to them).
    pub fn retain(&mut self, wanted: &BTreeSet<SpiffeId>) {
        self.issued.retain(|identity, _| {
            let keep = wanted.contains(identity);
            if !keep {
                tracing::debug!(%identity, "no stream subscribes to the workload certificate any more: dropped");
            }
            keep
        });
    }
}
