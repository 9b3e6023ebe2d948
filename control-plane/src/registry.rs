//! The registry of connected proxies shown by `GET /v1/proxies`: one entry per open xDS stream
//! with the ACK, pending and NACK state of each resource type. Streams write it; the API, the
//! mesh hub (policy status) and the Kubernetes source read it. It sits below all of them, so it
//! imports none of them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use xds_api::envoy::config::core::v3::Node;

use crate::resource::Kind;

/// A rejected push.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NackRecord {
    /// The config version the proxy rejected.
    pub version: String,
    pub message: String,
    /// RFC 3339, UTC.
    pub time: String,
}

/// Where one resource type stands with one proxy.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TypeStatus {
    pub acked_version: Option<String>,
    pub pending_nonce: Option<String>,
    pub last_nack: Option<NackRecord>,
    /// For SDS only: the secret names the stream subscribed to (`*` for a wildcard); the
    /// control plane sends no other secret on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_names: Option<Vec<String>>,
}

/// A [`TypeStatus`] as a stream holds it, borrowed: every request and response is followed by
/// a check whether the status changed, and building owned statuses for that check (five per
/// check, two strings each) allocated on every ACK of every stream.
#[derive(Clone, Copy, Debug)]
pub struct TypeStatusView<'a> {
    pub acked_version: Option<&'a str>,
    pub pending_nonce: Option<&'a str>,
    pub last_nack: Option<&'a NackRecord>,
    /// For SDS only, once subscribed: whether by wildcard, and the names.
    pub secret_names: Option<(bool, &'a BTreeSet<String>)>,
}

impl TypeStatusView<'_> {
    /// The SDS subscription as the registry shows it: `*` for a wildcard, then the names.
    fn secret_names(wildcard: bool, names: &BTreeSet<String>) -> impl Iterator<Item = &str> {
        wildcard
            .then_some("*")
            .into_iter()
            .chain(names.iter().map(String::as_str))
    }

    /// Whether `reported` says the same.
    pub fn matches(&self, reported: &TypeStatus) -> bool {
        self.acked_version == reported.acked_version.as_deref()
            && self.pending_nonce == reported.pending_nonce.as_deref()
            && self.last_nack == reported.last_nack.as_ref()
            && match (self.secret_names, &reported.secret_names) {
                (None, None) => true,
                (Some((wildcard, names)), Some(shown)) => {
                    Self::secret_names(wildcard, names).eq(shown.iter().map(String::as_str))
                }
                _ => false,
            }
    }

    pub fn to_status(&self) -> TypeStatus {
        TypeStatus {
            acked_version: self.acked_version.map(str::to_string),
            pending_nonce: self.pending_nonce.map(str::to_string),
            last_nack: self.last_nack.cloned(),
            secret_names: self.secret_names.map(|(wildcard, names)| {
                Self::secret_names(wildcard, names)
                    .map(str::to_string)
                    .collect()
            }),
        }
    }
}

/// A certificate signed for a proxy's own key (`remora.ca.v1.CertificateService`), as the
/// proxies table shows it beside the proxy's streams.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SignedCertificate {
    pub spiffe_id: String,
    /// Its serial number, as the proxy's `/certs` prints it.
    pub serial: String,
    /// RFC 3339, UTC.
    pub signed_at: String,
    /// RFC 3339, UTC.
    pub not_after: String,
    pub peer: Option<String>,
    #[serde(skip)]
    expires: SystemTime,
}

/// One connected stream, as listed by the API.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    pub stream_id: u64,
    pub node_id: String,
    pub group: String,
    pub peer: Option<String>,
    pub connected_since: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// Keyed by xDS short name (CDS, EDS, LDS, RDS, SDS).
    pub types: BTreeMap<&'static str, TypeStatus>,
    /// The last certificate signed for this node's own key, while it is valid: the proxy
    /// makes its key itself (CSR) rather than receiving one over SDS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_certificate: Option<SignedCertificate>,
}

/// Every open xDS stream.
#[derive(Default)]
pub struct ProxyRegistry {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, ProxyStatus>>,
    /// By node id: the last certificate signed for each node's own key.
    signed: Mutex<BTreeMap<String, SignedCertificate>>,
}

impl ProxyRegistry {
    pub fn register(
        self: &Arc<Self>,
        node: &Node,
        peer: Option<SocketAddr>,
        protocol: &'static str,
    ) -> RegisteredStream {
        let stream_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let status = ProxyStatus {
            stream_id,
            node_id: node.id.clone(),
            group: node.cluster.clone(),
            peer: peer.map(|addr| addr.to_string()),
            connected_since: rfc3339(SystemTime::now()),
            protocol,
            types: BTreeMap::new(),
            signed_certificate: None,
        };
        self.lock().insert(stream_id, status);
        RegisteredStream {
            registry: self.clone(),
            stream_id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.streams
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn list(&self) -> Vec<ProxyStatus> {
        let signed = self
            .signed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone();
        let mut list: Vec<ProxyStatus> = self.lock().values().cloned().collect();
        for proxy in &mut list {
            proxy.signed_certificate = signed.get(&proxy.node_id).cloned();
        }
        list
    }

    /// Records that a certificate for `spiffe_id`, valid until `not_after`, was signed for
    /// the key of node `node_id`; forgets records that have expired.
    pub fn record_signed(
        &self,
        node_id: &str,
        spiffe_id: &str,
        serial: &str,
        not_after: SystemTime,
        peer: Option<SocketAddr>,
    ) {
        let now = SystemTime::now();
        let mut signed = self
            .signed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        signed.retain(|_, record| record.expires > now);
        signed.insert(
            node_id.to_string(),
            SignedCertificate {
                spiffe_id: spiffe_id.to_string(),
                serial: serial.to_string(),
                signed_at: rfc3339(now),
                not_after: rfc3339(not_after),
                peer: peer.map(|addr| addr.to_string()),
                expires: not_after,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A stream's entry in the registry; removed when dropped.
pub struct RegisteredStream {
    registry: Arc<ProxyRegistry>,
    stream_id: u64,
}

impl RegisteredStream {
    /// Records several types' status under one lock of the registry all streams share.
    pub fn set_type_statuses(&self, statuses: impl IntoIterator<Item = (Kind, TypeStatus)>) {
        if let Some(entry) = self.registry.lock().get_mut(&self.stream_id) {
            for (kind, status) in statuses {
                if status == TypeStatus::default() {
                    entry.types.remove(kind.xds_name());
                } else {
                    entry.types.insert(kind.xds_name(), status);
                }
            }
        }
    }
}

impl Drop for RegisteredStream {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.stream_id);
    }
}

/// Formats a time as RFC 3339 in UTC with second precision.
pub fn rfc3339(time: SystemTime) -> String {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    jiff::Timestamp::from_second(seconds as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_status_view_matches_its_owned_copy_and_tells_each_field_apart() {
        let names: BTreeSet<String> = ["b".to_string(), "a".to_string()].into();
        let nack = NackRecord {
            version: "3".into(),
            message: "no".into(),
            time: "2026-12-06T00:00:00Z".into(),
        };
        let view = TypeStatusView {
            acked_version: Some("2"),
            pending_nonce: Some("7"),
            last_nack: Some(&nack),
            secret_names: Some((true, &names)),
        };
        let owned = view.to_status();
        assert_eq!(
            owned.secret_names.as_deref(),
            Some(&["*".to_string(), "a".to_string(), "b".to_string()][..])
        );
        assert!(view.matches(&owned));
        let differs = |change: fn(&mut TypeStatus)| {
            let mut other = owned.clone();
            change(&mut other);
            !view.matches(&other)
        };
        assert!(differs(|s| s.acked_version = Some("3".into())));
        assert!(differs(|s| s.pending_nonce = None));
        assert!(differs(|s| s.last_nack = None));
        assert!(differs(|s| s.secret_names = None));
        assert!(differs(
            |s| s.secret_names = Some(vec!["a".into(), "b".into()])
        ));
        assert!(
            !TypeStatusView {
                secret_names: None,
                ..view
            }
            .matches(&owned)
        );
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_798_761_599)), "2026-12-31T23:59:59Z");
    }
}
