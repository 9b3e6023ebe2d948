//! `remora.ca.v1.CertificateService` on the xDS port: a Remora sidecar (`--csr-secret`) makes
//! its key itself and sends a PKCS#10 request; the mesh CA signs the request's public key for
//! the caller's workload identity, so the key never leaves the pod.
//!
//! Who the caller is follows the ADS stream's rules ([`XdsAuth`]): with authenticated xDS the
//! credential's identity, never the request, names the certificate (a credential without a
//! workload identity is refused). Without authentication the control plane trusts the node id
//! the request carries, as it trusts a stream's node for SDS: the identity of the connected
//! sidecar with that id, else of the pod the id names (`POD.NAMESPACE`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use xds_api::remora::ca::v1::certificate_service_server::CertificateService;
use xds_api::remora::ca::v1::{SignCertificateRequest, SignCertificateResponse};

use crate::ca::{Ca, CsrError, SpiffeId};
use crate::mesh::hub::MeshHub;
use crate::registry::ProxyRegistry;
use crate::xds::auth::{Caller, XdsAuth};
use crate::xds::tls::connection_of;

/// Largest certificate request accepted: a PEM request is well under 4 KiB.
const MAX_CSR_BYTES: usize = 64 << 10;

/// Signs certificate requests of authenticated callers.
#[derive(Clone)]
pub struct CertificateSigner {
    pub ca: Arc<Ca>,
    pub auth: XdsAuth,
    /// The mesh, for the identity of an unauthenticated caller's node.
    pub mesh: Option<Arc<MeshHub>>,
    pub registry: Arc<ProxyRegistry>,
}

impl CertificateSigner {
    /// The identity to sign for: the credential's, else the node's as the mesh knows it.
    async fn identity(
        &self,
        request: &Request<SignCertificateRequest>,
    ) -> Result<SpiffeId, Status> {
        let node_id = &request.get_ref().node_id;
        let (_, client) = connection_of(request.extensions());
        match self
            .auth
            .authenticate(request.metadata().as_ref(), &client)
            .await?
        {
            Some(caller) => caller_identity(&self.ca, &caller, node_id),
            None => {
                if node_id.is_empty() {
                    return Err(Status::unauthenticated(
                        "without xDS authentication the caller is known by its node id: set node_id",
                    ));
                }
                self.mesh
                    .as_ref()
                    .and_then(|mesh| mesh.identity_of_node(node_id))
                    .ok_or_else(|| {
                        Status::permission_denied(format!(
                            "node {node_id:?} has no workload identity here: it must be POD.NAMESPACE of a mesh sidecar (mesh generation on)"
                        ))
                    })
            }
        }
    }
}

/// The identity an authenticated caller's credential proves.
fn caller_identity(ca: &Ca, caller: &Caller, node_id: &str) -> Result<SpiffeId, Status> {
    caller.check_node_id(node_id)?;
    match caller.workload() {
        Some((namespace, account)) => Ok(ca.identity(namespace, account)),
        None => Err(Status::permission_denied(format!(
            "this credential is for group {:?} only and names no workload identity (namespace and service account): nothing to sign",
            caller.group().unwrap_or_default()
        ))),
    }
}

#[tonic::async_trait]
impl CertificateService for CertificateSigner {
    async fn sign_certificate(
        &self,
        request: Request<SignCertificateRequest>,
    ) -> Result<Response<SignCertificateResponse>, Status> {
        let (peer, _) = connection_of(request.extensions());
        let identity = match self.identity(&request).await {
            Ok(identity) => identity,
            Err(status) => {
                tracing::info!(?peer, node = %request.get_ref().node_id, %status, "certificate request refused");
                return Err(status);
            }
        };
        let request = request.into_inner();
        if request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "csr_pem is {} bytes; a certificate request is at most {MAX_CSR_BYTES}",
                request.csr_pem.len()
            )));
        }
        let signed = self
            .ca
            .sign_request(&identity, &request.csr_pem, SystemTime::now())
            .map_err(|error| match error {
                CsrError::BadRequest(message) => {
                    tracing::info!(?peer, node = %request.node_id, %message, "bad certificate request");
                    Status::invalid_argument(message)
                }
                CsrError::Signing(message) => {
                    tracing::error!(%identity, %message, "cannot sign a certificate request");
                    Status::internal(format!("the CA could not sign: {message}"))
                }
            })?;
        let not_after = signed
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_secs() as i64)
            .unwrap_or(0);
        tracing::info!(node = %request.node_id, %identity, serial = %signed.serial, not_after, "signed a certificate request");
        self.registry.record_signed(
            &request.node_id,
            &identity.to_string(),
            &signed.serial,
            signed.not_after,
            peer,
        );
        Ok(Response::new(SignCertificateResponse {
            certificate_chain_pem: signed.chain_pem,
            trust_bundle_pem: self.ca.bundle_pem().to_string(),
            not_after_unix_seconds: not_after,
            spiffe_id: identity.to_string(),
        }))
    }
}
