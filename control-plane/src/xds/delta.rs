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

use crate::registry::{NackRecord, TypeStatusView, rfc3339};
use crate::resource::Kind;
use crate::snapshot::{Resource, Snapshot, TypeMap};
use crate::xds::frame::{Frame, grpc_frame};
use crate::xds::requests::intern;
use crate::xds::stream::{Outcome, StreamProtocol};

struct Pending {
    nonce: String,
    version: u64,
    committed_at: Instant,
}

/// What the client holds of one type, as far as we know.
enum Held {
    /// Exactly what the subscription selects of this snapshot map: ten thousand clients in
    /// line with their group's snapshot keep no copy of its names and versions.
    InLine(Arc<TypeMap>),
    /// Name → version, while that differs from every snapshot (a reconnect with
    /// `initial_resource_versions`, a subscription change, removals held back).
    Listed(HashMap<String, String>),
}

impl Default for Held {
    fn default() -> Self {
        Held::Listed(HashMap::new())
    }
}

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    /// Subscribed names; equal subscriptions share one set.
    names: Arc<BTreeSet<String>>,
    requested: bool,
    needs_response: bool,
    held: Held,
    /// Names to send again though held (Envoy rebuilding a cluster waits for its endpoints
    /// without asking): treated as not held until sent.
    resend: BTreeSet<String>,
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

    /// The version of `name` the client holds.
    fn held_version(&self, name: &str) -> Option<&str> {
        if self.resend.contains(name) {
            return None;
        }
        match &self.held {
            Held::InLine(map) if self.wants(name) => map.get(name).map(|r| r.version.as_str()),
            Held::InLine(_) => None,
            Held::Listed(versions) => versions.get(name).map(String::as_str),
        }
    }

    /// The names the client holds.
    fn held_names(&self) -> Vec<&String> {
        let not_resent = |name: &&String| !self.resend.contains(*name);
        match &self.held {
            Held::InLine(map) => map
                .keys()
                .filter(|name| self.wants(name))
                .filter(not_resent)
                .collect(),
            Held::Listed(versions) => versions.keys().filter(not_resent).collect(),
        }
    }

    /// What the client holds as a list, to be edited.
    fn listed(&mut self) -> &mut HashMap<String, String> {
        if let Held::InLine(map) = &self.held {
            let versions = map
                .values()
                .filter(|r| self.wants(&r.name))
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect();
            self.held = Held::Listed(versions);
        }
        let Held::Listed(versions) = &mut self.held else {
            unreachable!("made a list above")
        };
        for name in std::mem::take(&mut self.resend) {
            versions.remove(&name);
        }
        versions
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

    fn take_node(request: &mut DeltaDiscoveryRequest) -> Option<Node> {
        request.node.take()
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
        let resubscribing = !request.resource_names_subscribe.is_empty()
            || !request.resource_names_unsubscribe.is_empty();
        if resubscribing {
            // What the client holds stays as it was, whatever the subscription now selects.
            state.listed();
        }
        // Subscription changes count even on a stale nonce.
        if !state.requested {
            state.requested = true;
            state.needs_response = true;
            state.resend.clear();
            state.held = Held::Listed(
                request
                    .initial_resource_versions
                    .clone()
                    .into_iter()
                    .collect(),
            );
            if request.resource_names_subscribe.is_empty()
                && request.resource_names_unsubscribe.is_empty()
            {
                state.wildcard = true;
            }
        }
        let first_request =
            request.response_nonce.is_empty() && !request.initial_resource_versions.is_empty();
        if !resubscribing {
            return Ok(outcome);
        }
        let mut names = Arc::unwrap_or_clone(std::mem::take(&mut state.names));
        for name in &request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                names.insert(name.clone());
                // A client re-subscribing to a name (e.g. Envoy rebuilding a cluster) expects
                // the resource again, unless it told us which version it holds.
                if !first_request {
                    state.listed().remove(name);
                    state.told_absent.remove(name);
                }
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                names.remove(name);
                state.told_absent.remove(name);
            }
            if !state.wildcard && !names.contains(name) {
                state.listed().remove(name);
            }
        }
        state.names = intern(names);
        Ok(outcome)
    }

    fn next_response(&mut self, snapshot: &Snapshot) -> Option<DeltaDiscoveryResponse> {
        crate::xds::next_in_order(self, snapshot)
    }

    fn status_view(&self, kind: Kind) -> TypeStatusView<'_> {
        let state = &self.types[kind.index()];
        TypeStatusView {
            acked_version: state.acked_version.as_deref(),
            pending_nonce: state.pending.as_ref().map(|pending| pending.nonce.as_str()),
            last_nack: state.last_nack.as_ref(),
            secret_names: (kind == Kind::Secret && state.requested)
                .then(|| (state.wildcard, &*state.names)),
        }
    }

    fn subscribes_to(&self, kind: Kind, name: &str) -> bool {
        let state = &self.types[kind.index()];
        state.requested && state.wants(name)
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
        // A client in line with the previous snapshot can differ from this one only on the
        // names it changed (and those to send again); otherwise every name is looked at.
        let candidates: Option<BTreeSet<&String>> = match (&state.held, state.needs_response) {
            (Held::InLine(held), false) if Arc::ptr_eq(held, all) => {
                Some(state.resend.iter().collect())
            }
            (Held::InLine(held), false) => snapshot.changes[kind.index()]
                .as_ref()
                .filter(|change| Arc::ptr_eq(&change.from, held))
                .map(|change| change.names.iter().chain(&state.resend).collect()),
            _ => None,
        };
        let outdated = |r: &&Arc<Resource>| {
            state.wants(&r.name) && state.held_version(&r.name) != Some(r.version.as_str())
        };
        let updates: Vec<Arc<Resource>> = match &candidates {
            Some(names) => names
                .iter()
                .filter_map(|name| all.get(*name))
                .filter(outdated)
                .cloned()
                .collect(),
            None => all.values().filter(outdated).cloned().collect(),
        };
        let gone = |name: &&String| !all.contains_key(*name) || !state.wants(name);
        let removable: Vec<String> = match &candidates {
            Some(names) => names
                .iter()
                .copied()
                .filter(|name| state.held_version(name).is_some())
                .filter(gone)
                .cloned()
                .collect(),
            None => state
                .held_names()
                .into_iter()
                .filter(gone)
                .cloned()
                .collect(),
        };
        // Removals of clusters and endpoints wait until everything else is in place.
        let defer_removals = !allow_removals && matches!(kind, Kind::Cluster | Kind::Endpoint);
        let in_line = !defer_removals || removable.is_empty();
        let mut removed = if defer_removals {
            Vec::new()
        } else {
            removable
        };
        let is_absent = |name: &&String| {
            !all.contains_key(*name)
                && state.held_version(name).is_none()
                && !state.told_absent.contains(*name)
        };
        let absent: Vec<String> = match &candidates {
            Some(names) => names
                .iter()
                .copied()
                .filter(|name| state.names.contains(*name))
                .filter(is_absent)
                .cloned()
                .collect(),
            None => state.names.iter().filter(is_absent).cloned().collect(),
        };
        removed.extend(absent);
        if updates.is_empty() && removed.is_empty() && !state.needs_response {
            if in_line {
                let state = &mut self.types[kind.index()];
                state.held = Held::InLine(all.clone());
                state.resend.clear();
            }
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
            endpoints.resend.extend(
                updates
                    .iter()
                    .filter_map(|cluster| cluster.eds_service.clone()),
            );
        }
        let state = &mut self.types[kind.index()];
        for name in &removed {
            // A removed name the client still asks for (the absent ones among them) is now
            // reported absent.
            if state.names.contains(name) {
                state.told_absent.insert(name.clone());
            }
        }
        if in_line {
            state.held = Held::InLine(all.clone());
            state.resend.clear();
        } else {
            let held = state.listed();
            for resource in &updates {
                held.insert(resource.name.clone(), resource.version.clone());
            }
            for name in &removed {
                held.remove(name);
            }
        }
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
    use std::collections::BTreeMap;

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
            stream
                .status_view(Kind::Listener)
                .last_nack
                .map(|n| n.version.as_str()),
            Some("3")
        );
    }

    /// The next snapshot of a chain: `entries` for `kind`, recording what changed since `from`
    /// as the hub does.
    fn next_snapshot(from: &Snapshot, kind: Kind, entries: &[(String, String)]) -> Snapshot {
        let refs: Vec<(Kind, &str, &str)> = entries
            .iter()
            .map(|(name, content)| (kind, name.as_str(), content.as_str()))
            .collect();
        let mut next = snapshot(from.version + 1, &refs);
        let index = kind.index();
        (next.types[index], next.changes[index]) =
            crate::snapshot::TypeChange::follow(from.of(kind), next.types[index].clone());
        next
    }

    #[test]
    fn comparing_only_changed_names_sends_what_a_full_comparison_sends() {
        let cases = [
            (Kind::Endpoint, vec!["n0", "n1", "n2", "n4", "ghost"]),
            (Kind::Cluster, vec!["*"]),
        ];
        for ((kind, subscribe), first_seed) in cases
            .into_iter()
            .flat_map(|case| [7u64, 11, 23, 99].map(|seed| (case.clone(), seed)))
        {
            // `fast` may use the snapshots' change records; `full` is made to compare everything.
            let mut fast = DeltaStream::single(kind);
            let mut full = DeltaStream::single(kind);
            for stream in [&mut fast, &mut full] {
                stream
                    .on_request(request(kind, &subscribe, &[], ""))
                    .expect("subscribe");
            }
            let mut seed = first_seed;
            let mut random = move |below: u64| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) % below
            };
            let mut contents: BTreeMap<String, String> = BTreeMap::new();
            let mut current = snapshot(1, &[]);
            let mut sent = 0;
            let mut compared_changes_only = 0;
            for step in 0..60 {
                let name = format!("n{}", random(6));
                match random(3) {
                    0 => {
                        contents.remove(&name);
                    }
                    _ => {
                        contents.insert(name, step.to_string());
                    }
                }
                let (subscribe, unsubscribe) = match random(8) {
                    0 => (vec![], vec![format!("n{}", random(6))]),
                    1 => (vec![format!("n{}", random(6))], vec![]),
                    _ => (vec![], vec![]),
                };
                if !subscribe.is_empty() || !unsubscribe.is_empty() {
                    fn names(list: &[String]) -> Vec<&str> {
                        list.iter().map(String::as_str).collect()
                    }
                    for stream in [&mut fast, &mut full] {
                        stream
                            .on_request(request(kind, &names(&subscribe), &names(&unsubscribe), ""))
                            .expect("subscription change");
                    }
                }
                let entries: Vec<(String, String)> = contents.clone().into_iter().collect();
                current = next_snapshot(&current, kind, &entries);
                if matches!(fast.types[kind.index()].held, Held::InLine(_)) {
                    compared_changes_only += 1;
                }
                loop {
                    full.types[kind.index()].listed();
                    let (a, b) = (fast.next_response(&current), full.next_response(&current));
                    let view = |response: &Option<DeltaDiscoveryResponse>| {
                        response.as_ref().map(|response| {
                            let updated: Vec<(String, String)> = response
                                .resources
                                .iter()
                                .map(|r| (r.name.clone(), r.version.clone()))
                                .collect();
                            (updated, response.removed_resources.clone())
                        })
                    };
                    assert_eq!(view(&a), view(&b), "{kind:?} seed {first_seed} step {step}");
                    let (Some(a), Some(b)) = (a, b) else { break };
                    sent += 1;
                    fast.on_request(request(kind, &[], &[], &a.nonce))
                        .expect("ack");
                    full.on_request(request(kind, &[], &[], &b.nonce))
                        .expect("ack");
                }
            }
            assert!(
                sent > 20,
                "{kind:?}: the sequence exercised pushes ({sent})"
            );
            assert!(
                compared_changes_only > 20,
                "{kind:?}: the change records were used ({compared_changes_only})"
            );
        }
    }
}
