//! Incremental xDS (`DeltaAggregatedResources` and `Delta{Clusters,...}`).
//!
//! Per type the stream keeps the subscription (wildcard and/or names) and what it believes the
//! client holds (name → version, seeded from `initial_resource_versions` on reconnect and updated
//! on every send). A push carries only resources whose version differs, and `removed_resources`
//! for names that went away or were asked for but do not exist.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tonic::Status;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as WireResource,
};

use crate::registry::{NackRecord, TypeStatus, rfc3339};
use crate::resource::Kind;
use crate::snapshot::{Resource, Snapshot};
use crate::xds::frame::{Frame, grpc_frame};
use crate::xds::stream::{Outcome, StreamProtocol};

struct Pending {
    nonce: String,
    version: u64,
    committed_at: Instant,
}

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    requested: bool,
    needs_response: bool,
    /// Name → version the client holds, as far as we know.
    known: HashMap<String, String>,
    /// Subscribed names already reported as not existing.
    told_absent: HashSet<String>,
    last_nonce: Option<String>,
    pending: Option<Pending>,
    acked_version: Option<String>,
    last_nack: Option<NackRecord>,
}

impl TypeState {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// One delta stream (ADS, or a per-type service when `only` is set).
pub struct DeltaStream {
    types: [TypeState; 5],
    only: Option<Kind>,
    next_nonce: u64,
}

impl DeltaStream {
    pub fn aggregated() -> DeltaStream {
        DeltaStream {
            types: Default::default(),
            only: None,
            next_nonce: 0,
        }
    }

    pub fn single(kind: Kind) -> DeltaStream {
        DeltaStream {
            only: Some(kind),
            ..DeltaStream::aggregated()
        }
    }
}

impl StreamProtocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn frame(response: DeltaDiscoveryResponse) -> Frame {
        grpc_frame(&response)
    }

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<Option<Outcome>, Status> {
        let kind = match (self.only, request.type_url.as_str()) {
            (Some(kind), "") => kind,
            (Some(kind), url) if url == kind.type_url() => kind,
            (Some(kind), url) => {
                return Err(Status::invalid_argument(format!(
                    "this service serves {}, not {url}",
                    kind.type_url()
                )));
            }
            (None, "") => return Err(Status::invalid_argument("type_url is required on ADS")),
            (None, url) => match Kind::from_type_url(url) {
                Some(kind) => kind,
                None => return Ok(None),
            },
        };
        tracing::debug!(
            type_url = %request.type_url,
            subscribe = ?request.resource_names_subscribe,
            unsubscribe = ?request.resource_names_unsubscribe,
            nonce = %request.response_nonce,
            error = request.error_detail.is_some(),
            "delta request"
        );
        let state = &mut self.types[kind.index()];
        let mut outcome = None;
        if !request.response_nonce.is_empty()
            && state.last_nonce.as_deref() == Some(request.response_nonce.as_str())
            && let Some(pending) = state.pending.take()
        {
            match &request.error_detail {
                Some(error) => {
                    tracing::warn!(type_url = %request.type_url, version = pending.version, message = %error.message, "proxy rejected a delta push");
                    state.last_nack = Some(NackRecord {
                        version: pending.version.to_string(),
                        message: error.message.clone(),
                        time: rfc3339(SystemTime::now()),
                    });
                    outcome = Some(Outcome::Nack);
                }
                None => {
                    state.acked_version = Some(pending.version.to_string());
                    outcome = Some(Outcome::Ack {
                        latency: pending.committed_at.elapsed(),
                    });
                }
            }
        }
        // Subscription changes count even on a stale nonce.
        if !state.requested {
            state.requested = true;
            state.needs_response = true;
            state.known = request
                .initial_resource_versions
                .clone()
                .into_iter()
                .collect();
            if request.resource_names_subscribe.is_empty()
                && request.resource_names_unsubscribe.is_empty()
            {
                state.wildcard = true;
            }
        }
        let first_request =
            request.response_nonce.is_empty() && !request.initial_resource_versions.is_empty();
        for name in &request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                state.names.insert(name.clone());
                // A client re-subscribing to a name (e.g. Envoy rebuilding a cluster) expects
                // the resource again, unless it told us which version it holds.
                if !first_request {
                    state.known.remove(name);
                    state.told_absent.remove(name);
                }
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(name);
                state.told_absent.remove(name);
            }
            if !state.wants(name) {
                state.known.remove(name);
            }
        }
        Ok(outcome)
    }

    fn next_response(&mut self, snapshot: &Snapshot) -> Option<DeltaDiscoveryResponse> {
        crate::xds::next_in_order(self, snapshot)
    }

    fn status(&self, kind: Kind) -> TypeStatus {
        let state = &self.types[kind.index()];
        TypeStatus {
            acked_version: state.acked_version.clone(),
            pending_nonce: state.pending.as_ref().map(|pending| pending.nonce.clone()),
            last_nack: state.last_nack.clone(),
        }
    }
}

impl crate::xds::TypeSchedule for DeltaStream {
    type Response = DeltaDiscoveryResponse;

    fn only(&self) -> Option<Kind> {
        self.only
    }

    fn is_pending(&self, kind: Kind) -> bool {
        self.types[kind.index()].pending.is_some()
    }

    fn is_requested(&self, kind: Kind) -> bool {
        self.types[kind.index()].requested
    }

    fn plan(
        &mut self,
        kind: Kind,
        snapshot: &Snapshot,
        allow_removals: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let state = &self.types[kind.index()];
        let all = snapshot.of(kind);
        let updates: Vec<Arc<Resource>> = all
            .values()
            .filter(|r| state.wants(&r.name) && state.known.get(&r.name) != Some(&r.version))
            .cloned()
            .collect();
        // Removals of clusters and endpoints wait until everything else is in place.
        let defer_removals = !allow_removals && matches!(kind, Kind::Cluster | Kind::Endpoint);
        let mut removed: Vec<String> = state
            .known
            .keys()
            .filter(|name| !all.contains_key(*name) || !state.wants(name))
            .filter(|_| !defer_removals)
            .cloned()
            .collect();
        let absent: Vec<String> = state
            .names
            .iter()
            .filter(|name| {
                !all.contains_key(*name)
                    && !state.known.contains_key(*name)
                    && !state.told_absent.contains(*name)
            })
            .cloned()
            .collect();
        removed.extend(absent.iter().cloned());
        if updates.is_empty() && removed.is_empty() && !state.needs_response {
            return None;
        }
        removed.sort();
        removed.dedup();
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        if kind == Kind::Cluster {
            // Envoy rebuilds a changed cluster and waits for its endpoints without asking again,
            // so they are sent again after it.
            let endpoints = &mut self.types[Kind::Endpoint.index()];
            for service in updates
                .iter()
                .filter_map(|cluster| cluster.eds_service.as_ref())
            {
                endpoints.known.remove(service);
            }
        }
        let state = &mut self.types[kind.index()];
        for resource in &updates {
            state
                .known
                .insert(resource.name.clone(), resource.version.clone());
        }
        for name in &removed {
            state.known.remove(name);
        }
        state.told_absent.extend(absent);
        state.needs_response = false;
        state.last_nonce = Some(nonce.clone());
        state.pending = Some(Pending {
            nonce: nonce.clone(),
            version: snapshot.version,
            committed_at: snapshot.committed_at,
        });
        Some(DeltaDiscoveryResponse {
            system_version_info: snapshot.version.to_string(),
            resources: updates
                .iter()
                .map(|r| WireResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: kind.type_url().to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{TypeMap, resource_version};

    fn snapshot(version: u64, entries: &[(Kind, &str, &str)]) -> Snapshot {
        let mut types: [TypeMap; 5] = Default::default();
        for (kind, name, content) in entries {
            let bytes = format!("{name}={content}").into_bytes();
            types[kind.index()].insert(
                name.to_string(),
                Arc::new(Resource {
                    name: name.to_string(),
                    version: resource_version(&bytes),
                    body: prost_types::Any {
                        type_url: kind.type_url().into(),
                        value: bytes,
                    },
                    eds_service: None,
                }),
            );
        }
        Snapshot {
            version,
            committed_at: Instant::now(),
            types: types.map(Arc::new),
            changes: Default::default(),
            bodies: Default::default(),
        }
    }

    fn request(
        kind: Kind,
        subscribe: &[&str],
        unsubscribe: &[&str],
        nonce: &str,
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: kind.type_url().into(),
            resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
        response.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn only_changed_resources_and_removals_are_sent() {
        let mut stream = DeltaStream::single(Kind::Cluster);
        stream
            .on_request(request(Kind::Cluster, &["*"], &[], ""))
            .expect("ok");
        let first = stream
            .next_response(&snapshot(
                1,
                &[(Kind::Cluster, "a", "1"), (Kind::Cluster, "b", "1")],
            ))
            .expect("sent");
        assert_eq!(names(&first), ["a", "b"]);
        stream
            .on_request(request(Kind::Cluster, &[], &[], &first.nonce))
            .expect("ack");
        let second = stream
            .next_response(&snapshot(2, &[(Kind::Cluster, "a", "2")]))
            .expect("sent");
        assert_eq!(names(&second), ["a"]);
        assert!(
            second.removed_resources.is_empty(),
            "removal waits for the update's ACK"
        );
        stream
            .on_request(request(Kind::Cluster, &[], &[], &second.nonce))
            .expect("ack");
        let third = stream
            .next_response(&snapshot(2, &[(Kind::Cluster, "a", "2")]))
            .expect("removal");
        assert!(third.resources.is_empty());
        assert_eq!(third.removed_resources, ["b"]);
    }

    #[test]
    fn reconnect_with_initial_versions_sends_only_differences() {
        let snap = snapshot(5, &[(Kind::Route, "r1", "1"), (Kind::Route, "r2", "1")]);
        let r1_version = snap.of(Kind::Route)["r1"].version.clone();
        let mut stream = DeltaStream::single(Kind::Route);
        let mut first = request(Kind::Route, &["r1", "r2", "ghost"], &[], "");
        first
            .initial_resource_versions
            .insert("r1".into(), r1_version);
        first
            .initial_resource_versions
            .insert("r2".into(), "old".into());
        stream.on_request(first).expect("ok");
        let response = stream.next_response(&snap).expect("sent");
        assert_eq!(names(&response), ["r2"]);
        assert_eq!(response.removed_resources, ["ghost"]);
        stream
            .on_request(request(Kind::Route, &[], &[], &response.nonce))
            .expect("ack");
        assert!(
            stream.next_response(&snap).is_none(),
            "ghost is reported once"
        );
        stream
            .on_request(request(Kind::Route, &[], &["r2"], ""))
            .expect("unsubscribe");
        assert!(stream.next_response(&snap).is_none());
    }

    #[test]
    fn a_nack_is_recorded_and_not_answered_with_a_resend() {
        let snap = snapshot(3, &[(Kind::Listener, "l", "1")]);
        let mut stream = DeltaStream::aggregated();
        stream
            .on_request(request(Kind::Listener, &[], &[], ""))
            .expect("ok");
        let response = stream.next_response(&snap).expect("sent");
        let mut nack = request(Kind::Listener, &[], &[], &response.nonce);
        nack.error_detail = Some(xds_api::google::rpc::Status {
            code: 3,
            message: "no".into(),
            details: vec![],
        });
        assert_eq!(stream.on_request(nack).expect("ok"), Some(Outcome::Nack));
        assert!(stream.next_response(&snap).is_none());
        assert_eq!(
            stream.status(Kind::Listener).last_nack.map(|n| n.version),
            Some("3".into())
        );
    }
}
