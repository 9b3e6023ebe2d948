//! `--csr-secret NAME`: the workload certificate made here. A key is generated in this
//! process, a certificate request for it is signed by the control plane's
//! `remora.ca.v1.CertificateService` (on the ADS cluster, with the stream's credentials), and
//! the result becomes secret NAME exactly as if SDS had sent it; the key never leaves the
//! process. Renewed with a new key at half the certificate's life; a failure is retried with
//! the ADS backoff while the current certificate keeps serving.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use remora_config::common::DataSource;
use remora_config::tls::{Certificate, SecretKind, SecretSource};
use tokio::sync::mpsc;
use xds_api::remora::ca::v1::SignCertificateRequest;
use xds_api::remora::ca::v1::certificate_service_client::CertificateServiceClient;

use super::XdsContext;
use super::transport::{self, Backoff};
use super::warming::Deadline;

/// What one signing gave: the secret is set; renew after `renew_in`.
struct Signed {
    renew_in: Duration,
    spiffe_id: String,
}

/// Keeps secret `name` signed for as long as the proxy runs. `changed` tells the xDS client
/// that a secret arrived (listeners and clusters waiting for it go live).
pub async fn keep_signed(
    context: Arc<XdsContext>,
    name: String,
    changed: mpsc::UnboundedSender<Deadline>,
) {
    let mut backoff = Backoff::default();
    loop {
        match sign_once(&context, &name).await {
            Ok(signed) => {
                tracing::info!(secret = %name, spiffe_id = %signed.spiffe_id, renew_in = ?signed.renew_in, "certificate signed by the control plane");
                let _ = changed.send(Deadline::SecretChanged);
                backoff.reset();
                tokio::time::sleep(signed.renew_in).await;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(secret = %name, %error, ?delay, "certificate request failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn sign_once(context: &XdsContext, name: &str) -> anyhow::Result<Signed> {
    let key = rcgen::KeyPair::generate()?;
    // The names are the control plane's to decide; the request carries only the key.
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let channel = transport::connect(context).await?;
    let mut client = CertificateServiceClient::new(channel);
    let mut request = tonic::Request::new(SignCertificateRequest {
        csr_pem: csr.pem()?,
        node_id: context.node.id.clone(),
    });
    transport::add_credentials(context, request.metadata_mut())?;
    let response = client
        .sign_certificate(request)
        .await
        .map_err(|status| anyhow::anyhow!("{}: {}", status.code().description(), status.message()))?
        .into_inner();
    let secret = remora_config::tls::Secret {
        name: name.to_string(),
        kind: SecretKind::Certificate(Certificate {
            chain: DataSource::Inline(response.certificate_chain_pem.into_bytes()),
            key: DataSource::Inline(key.serialize_pem().into_bytes()),
            path: format!("certificate signed for --csr-secret {name}"),
        }),
    };
    context
        .secrets
        .set(&SecretSource::Ads, &secret)
        .map_err(|e| anyhow::anyhow!("the signed certificate does not load: {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let left = (response.not_after_unix_seconds - now).max(0) as u64;
    Ok(Signed {
        // Half life, but not a tight loop if the control plane hands out very short ones.
        renew_in: Duration::from_secs(left / 2).max(Duration::from_secs(1)),
        spiffe_id: response.spiffe_id,
    })
}
