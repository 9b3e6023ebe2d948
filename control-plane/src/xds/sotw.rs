//! State-of-the-world xDS (`StreamAggregatedResources` and `Stream{Clusters,...}`).
//!
//! Per type the stream tracks the subscription (wildcard or names), the response awaiting an
//! ACK, what the client holds (the view it last ACKed) and the last rejected view. Clusters and
//! listeners are sent as full sets; endpoints, routes and secrets carry only what changed, or
//! the whole subscription when it changes. A NACKed view is never sent again; the next
//! different one is.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use prost::Message;
use tonic::Status;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::discovery::v3::DiscoveryResponse;

use crate::registry::{NackRecord, TypeStatusView, rfc3339};
use crate::resource::Kind;
use crate::snapshot::{BodyKey, Resource, Snapshot, TypeMap};
use crate::xds::frame::Frame;
use crate::xds::requests::{SotwRequest, intern};
use crate::xds::stream::{Outcome, StreamProtocol};

/// A subset of one type's resources: everything in `source`, or only `names`.
#[derive(Clone, Debug)]
struct View {
    source: Arc<TypeMap>,
    names: Option<Arc<BTreeSet<String>>>,
}

impl View {
    fn iter(&self) -> Box<dyn Iterator<Item = &Arc<Resource>> + '_> {
        match &self.names {
            None => Box::new(self.source.values()),
            Some(names) => Box::new(names.iter().filter_map(|name| self.source.get(name))),
        }
    }

    fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        match &self.names {
            Some(names) if !names.contains(name) => None,
            _ => self.source.get(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The same map under the same subscription (a cheap, conservative equality).
    fn identical(&self, other: &View) -> bool {
        self.same_names(other) && Arc::ptr_eq(&self.source, &other.source)
    }

    /// The same subscription.
    fn same_names(&self, other: &View) -> bool {
        match (&self.names, &other.names) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }

    /// Same names with the same versions.
    fn same_as(&self, other: &View) -> bool {
        if self.identical(other) {
            return true;
        }
        let mut mine = self.iter();
        let mut theirs = other.iter();
        loop {
            match (mine.next(), theirs.next()) {
                (None, None) => return true,
                (Some(a), Some(b)) if a.name == b.name && a.version == b.version => {}
                _ => return false,
            }
        }
    }
}

/// What the client asked for.
#[derive(Clone, Debug, Default, PartialEq)]
struct Subscription {
    wildcard: bool,
    names: Arc<BTreeSet<String>>,
}

struct Pending {
    nonce: String,
    version: u64,
    view: View,
    committed_at: Instant,
}

#[derive(Default)]
struct TypeState {
    subscription: Subscription,
    /// The client has sent a request for this type.
    requested: bool,
    /// The client has named resources at some point (an empty list then means "none").
    named_before: bool,
    /// A request is waiting for an answer even if nothing changed.
    needs_response: bool,
    last_nonce: Option<String>,
    pending: Option<Pending>,
    held: Option<View>,
    acked_version: Option<String>,
    rejected: Option<(u64, View)>,
    last_nack: Option<NackRecord>,
    /// Hash of the last request's resource_names, in the order sent.
    names_fingerprint: Option<u64>,
}

/// One SotW stream (ADS, or a per-type service when `only` is set).
pub struct SotwStream {
    types: [TypeState; 5],
    only: Option<Kind>,
    next_nonce: u64,
}

impl SotwStream {
    pub fn aggregated() -> SotwStream {
        SotwStream {
            types: Default::default(),
            only: None,
            next_nonce: 0,
        }
    }

    pub fn single(kind: Kind) -> SotwStream {
        SotwStream {
            only: Some(kind),
            ..SotwStream::aggregated()
        }
    }

    fn kind_of(&self, type_url: &str) -> Result<Option<Kind>, Status> {
        match (self.only, type_url) {
            (Some(kind), "") => Ok(Some(kind)),
            (Some(kind), url) if url == kind.type_url() => Ok(Some(kind)),
            (Some(kind), url) => Err(Status::invalid_argument(format!(
                "this service serves {}, not {url}",
                kind.type_url()
            ))),
            (None, "") => Err(Status::invalid_argument("type_url is required on ADS")),
            (None, url) => Ok(Kind::from_type_url(url)),
        }
    }
}

impl StreamProtocol for SotwStream {
    type Request = SotwRequest;
    type Response = SotwResponse;
    const NAME: &'static str = "sotw";

    fn frame(response: SotwResponse) -> Frame {
        response.frame()
    }

    fn take_node(request: &mut SotwRequest) -> Option<Node> {
        request.request.node.take()
    }

    fn on_request(&mut self, request: SotwRequest) -> Result<Option<Outcome>, Status> {
        let SotwRequest {
            request,
            names: encoded_names,
        } = request;
        let Some(kind) = self.kind_of(&request.type_url)? else {
            tracing::debug!(type_url = %request.type_url, "ignoring a request for a type this server does not serve");
            return Ok(None);
        };
        tracing::debug!(
            type_url = %request.type_url,
            nonce = %request.response_nonce,
            version = %request.version_info,
            error = request.error_detail.is_some(),
            "sotw request"
        );
        let state = &mut self.types[kind.index()];
        let mut outcome = None;
        if !request.response_nonce.is_empty() {
            if state.last_nonce.as_deref() != Some(request.response_nonce.as_str()) {
                // Stale: the client has not seen our latest response yet.
                return Ok(None);
            }
            if state.pending.is_none() {
                // Our latest response was already ACKed: this is a fresh request for the same
                // nonce (Envoy re-adds a watch when it rebuilds a cluster or listener), so it
                // gets an answer even if the names did not change.
                state.needs_response = true;
            }
            if let Some(pending) = state.pending.take() {
                debug_assert_eq!(pending.nonce, request.response_nonce);
                match &request.error_detail {
                    Some(error) => {
                        tracing::warn!(type_url = %request.type_url, version = pending.version, message = %error.message, "proxy rejected a push");
                        state.last_nack = Some(NackRecord {
                            version: pending.version.to_string(),
                            message: error.message.clone(),
                            time: rfc3339(SystemTime::now()),
                        });
                        state.rejected = Some((pending.version, pending.view));
                        outcome = Some(Outcome::Nack);
                    }
                    None => {
                        state.acked_version = Some(pending.version.to_string());
                        state.held = Some(pending.view);
                        outcome = Some(Outcome::Ack {
                            latency: pending.committed_at.elapsed(),
                        });
                    }
                }
            }
        }
        // Envoy repeats the same list (often thousands of EDS names) on every ACK: a hash of the
        // list as sent tells without decoding it.
        let fingerprint = encoded_names.fingerprint();
        if state.requested && state.names_fingerprint == Some(fingerprint) {
            if request.response_nonce.is_empty() {
                state.needs_response = true;
            }
            return Ok(outcome);
        }
        let resource_names = encoded_names.decode()?;
        state.names_fingerprint = Some(fingerprint);
        let unchanged = if resource_names.is_empty() {
            state.subscription.names.is_empty() && state.subscription.wildcard != state.named_before
        } else {
            let names: Vec<&String> = resource_names.iter().filter(|name| *name != "*").collect();
            state.subscription.wildcard == (names.len() != resource_names.len())
                && names.len() == state.subscription.names.len()
                && names
                    .iter()
                    .all(|name| state.subscription.names.contains(*name))
        };
        if unchanged && state.requested {
            if request.response_nonce.is_empty() {
                state.needs_response = true;
            }
            return Ok(outcome);
        }
        let subscription = if resource_names.is_empty() {
            Subscription {
                wildcard: !state.named_before,
                names: Arc::default(),
            }
        } else {
            state.named_before = true;
            let wildcard = resource_names.iter().any(|name| name == "*");
            Subscription {
                wildcard,
                names: intern(
                    resource_names
                        .into_iter()
                        .filter(|name| name != "*")
                        .collect(),
                ),
            }
        };
        if !state.requested
            || request.response_nonce.is_empty()
            || subscription != state.subscription
        {
            state.needs_response = true;
        }
        state.requested = true;
        state.subscription = subscription;
        Ok(outcome)
    }

    fn next_response(&mut self, snapshot: &Snapshot) -> Option<SotwResponse> {
        crate::xds::next_in_order(self, snapshot)
    }

    fn status_view(&self, kind: Kind) -> TypeStatusView<'_> {
        let state = &self.types[kind.index()];
        TypeStatusView {
            acked_version: state.acked_version.as_deref(),
            pending_nonce: state.pending.as_ref().map(|pending| pending.nonce.as_str()),
            last_nack: state.last_nack.as_ref(),
            secret_names: (kind == Kind::Secret && state.requested)
                .then(|| (state.subscription.wildcard, &*state.subscription.names)),
        }
    }

    fn subscribes_to(&self, kind: Kind, name: &str) -> bool {
        let state = &self.types[kind.index()];
        state.requested && (state.subscription.wildcard || state.subscription.names.contains(name))
    }
}

impl crate::xds::TypeSchedule for SotwStream {
    type Response = SotwResponse;

    fn only(&self) -> Option<Kind> {
        self.only
    }

    fn is_pending(&self, kind: Kind) -> bool {
        self.types[kind.index()].pending.is_some()
    }

    fn is_requested(&self, kind: Kind) -> bool {
        self.types[kind.index()].requested
    }

    /// Plans the response for `kind`, if one is due.
    fn plan(
        &mut self,
        kind: Kind,
        snapshot: &Snapshot,
        allow_removals: bool,
    ) -> Option<SotwResponse> {
        let state = &self.types[kind.index()];
        let desired = View {
            source: snapshot.of(kind).clone(),
            names: (!state.subscription.wildcard).then(|| state.subscription.names.clone()),
        };
        if !state.needs_response
            && state
                .held
                .as_ref()
                .is_some_and(|held| held.identical(&desired))
        {
            return None;
        }
        if !state.needs_response
            && let Some((version, rejected)) = &state.rejected
            && (*version == snapshot.version || rejected.same_as(&desired))
        {
            return None;
        }
        // Everything the subscription selects: the same bytes for every stream so subscribed.
        let everything = BodyKey {
            kind,
            changed_only: false,
            names: desired.names.clone(),
        };
        // When the client holds the group's previous snapshot under the same subscription, the
        // snapshot's record of changed names says what differs without comparing every name.
        let change = state.held.as_ref().and_then(|held| {
            snapshot.changes[kind.index()].as_ref().filter(|change| {
                Arc::ptr_eq(&change.from, &held.source) && held.same_names(&desired)
            })
        });
        let (view, selection) = if kind.is_full_state() {
            let mut view = desired;
            let mut selection = Selection::Shared(everything);
            if !allow_removals && let Some(held) = &state.held {
                // Make before break: keep what is being removed until the rest is in place.
                let removed = |r: &&Arc<Resource>| !view.contains(&r.name);
                let retained: Vec<_> = match change {
                    Some(change) => change
                        .names
                        .iter()
                        .filter_map(|name| held.get(name))
                        .filter(removed)
                        .cloned()
                        .collect(),
                    None => held.iter().filter(removed).cloned().collect(),
                };
                if !retained.is_empty() {
                    let mut merged: TypeMap =
                        view.iter().map(|r| (r.name.clone(), r.clone())).collect();
                    merged.extend(retained.into_iter().map(|r| (r.name.clone(), r)));
                    view = View {
                        source: Arc::new(merged),
                        names: None,
                    };
                    selection = Selection::Own(view.iter().cloned().collect());
                }
            }
            let unchanged = match (&state.held, change, &selection) {
                (Some(held), Some(change), Selection::Shared(_)) => !change
                    .names
                    .iter()
                    .any(|name| held.contains(name) || view.contains(name)),
                (Some(held), _, _) => held.same_as(&view),
                (None, _, _) => false,
            };
            if !state.needs_response && unchanged {
                return None;
            }
            (view, selection)
        } else {
            let selection = match (&state.held, state.needs_response) {
                (Some(held), false) => match change {
                    // Only the changed names need a look, and every stream so placed sends the
                    // same.
                    Some(change) => {
                        if !change.names.iter().any(|name| desired.contains(name)) {
                            return None;
                        }
                        Selection::Shared(BodyKey {
                            changed_only: true,
                            ..everything
                        })
                    }
                    _ => {
                        let changed: Vec<_> = desired
                            .iter()
                            .filter(|r| {
                                held.get(&r.name).is_none_or(|old| old.version != r.version)
                            })
                            .cloned()
                            .collect();
                        if changed.is_empty() {
                            return None;
                        }
                        Selection::Own(changed)
                    }
                },
                _ => Selection::Shared(everything),
            };
            (desired, selection)
        };
        let body = match selection {
            Selection::Shared(key) => snapshot.bodies.get_or_encode(key.clone(), || {
                let view = View {
                    source: snapshot.of(kind).clone(),
                    names: key.names.clone(),
                };
                match (&snapshot.changes[kind.index()], key.changed_only) {
                    (Some(change), true) => encode_body(
                        kind,
                        snapshot.version,
                        change.names.iter().filter_map(|name| view.get(name)),
                    ),
                    _ => encode_body(kind, snapshot.version, view.iter()),
                }
            }),
            Selection::Own(resources) => encode_body(kind, snapshot.version, resources.iter()),
        };
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        tracing::debug!(
            type_url = %kind.type_url(),
            %nonce,
            version = snapshot.version,
            bytes = body.len(),
            "sotw response"
        );
        let state = &mut self.types[kind.index()];
        state.needs_response = false;
        state.last_nonce = Some(nonce.clone());
        state.pending = Some(Pending {
            nonce: nonce.clone(),
            version: snapshot.version,
            view,
            committed_at: snapshot.committed_at,
        });
        Some(SotwResponse { nonce, body })
    }
}

/// Where a response's resources come from.
enum Selection {
    /// A selection of the snapshot every stream in the same place shares.
    Shared(BodyKey),
    /// This stream's own list.
    Own(Vec<Arc<Resource>>),
}

/// The fields of a response every stream sending these resources at this version shares:
/// `version_info`, `resources`, `type_url`.
fn encode_body<'a>(
    kind: Kind,
    version: u64,
    resources: impl Iterator<Item = &'a Arc<Resource>>,
) -> Bytes {
    let resources: Vec<&Arc<Resource>> = resources.collect();
    let version = version.to_string();
    let length = prost::encoding::string::encoded_len(1, &version)
        + resources
            .iter()
            .map(|resource| prost::encoding::message::encoded_len(2, &resource.body))
            .sum::<usize>()
        + prost::encoding::string::encoded_len(4, &kind.type_url().to_string());
    let mut body = Vec::with_capacity(length);
    prost::encoding::string::encode(1, &version, &mut body);
    for resource in resources {
        prost::encoding::message::encode(2, &resource.body, &mut body);
    }
    prost::encoding::string::encode(4, &kind.type_url().to_string(), &mut body);
    debug_assert_eq!(body.len(), length);
    body.into()
}

/// A planned response: the stream's nonce and the body it may share with other streams.
#[derive(Debug)]
pub struct SotwResponse {
    pub nonce: String,
    body: Bytes,
}

impl SotwResponse {
    /// The gRPC frame: the nonce (field 5) first, then the shared fields.
    pub fn frame(self) -> Frame {
        let own_len = prost::encoding::string::encoded_len(5, &self.nonce);
        Frame::with_shared(
            |buf| prost::encoding::string::encode(5, &self.nonce, buf),
            own_len,
            self.body,
        )
    }

    /// The response as a message (for tests and tools; streams send [`SotwResponse::frame`]).
    pub fn to_message(&self) -> DiscoveryResponse {
        let mut message = DiscoveryResponse::decode(&self.body[..]).unwrap_or_default();
        message.nonce = self.nonce.clone();
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::resource_version;
    use xds_api::envoy::service::discovery::v3::DiscoveryRequest;
    use xds_api::google::rpc::Status as RpcStatus;

    fn resource(kind: Kind, name: &str, content: &str) -> (String, Arc<Resource>) {
        let bytes = format!("{name}={content}").into_bytes();
        (
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
        )
    }

    fn snapshot(version: u64, entries: &[(Kind, &str, &str)]) -> Snapshot {
        let mut types: [TypeMap; 5] = Default::default();
        for (kind, name, content) in entries {
            let (name, resource) = resource(*kind, name, content);
            types[kind.index()].insert(name, resource);
        }
        Snapshot {
            version,
            committed_at: Instant::now(),
            types: types.map(Arc::new),
            changes: Default::default(),
            bodies: Default::default(),
        }
    }

    fn message(kind: Kind, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: kind.type_url().into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn request(kind: Kind, names: &[&str], nonce: &str) -> SotwRequest {
        message(kind, names, nonce).into()
    }

    fn nack(kind: Kind, nonce: &str) -> SotwRequest {
        DiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 3,
                message: "bad".into(),
                details: vec![],
            }),
            ..message(kind, &[], nonce)
        }
        .into()
    }

    fn names(response: &SotwResponse) -> Vec<String> {
        response
            .to_message()
            .resources
            .iter()
            .map(|any| String::from_utf8_lossy(&any.value).into_owned())
            .collect()
    }

    #[test]
    fn wildcard_clusters_then_named_endpoints_in_order() {
        let snap = snapshot(
            1,
            &[
                (Kind::Cluster, "a", "1"),
                (Kind::Endpoint, "a", "1"),
                (Kind::Listener, "l", "1"),
            ],
        );
        let mut stream = SotwStream::aggregated();
        stream
            .on_request(request(Kind::Cluster, &[], ""))
            .expect("ok");
        stream
            .on_request(request(Kind::Listener, &[], ""))
            .expect("ok");
        let cds = stream.next_response(&snap).expect("CDS first");
        assert_eq!(cds.to_message().type_url, Kind::Cluster.type_url());
        assert_eq!(names(&cds), ["a=1"]);
        assert!(
            stream.next_response(&snap).is_none(),
            "LDS waits for the CDS ACK"
        );
        let outcome = stream
            .on_request(request(Kind::Cluster, &[], &cds.nonce))
            .expect("ok");
        assert!(matches!(outcome, Some(Outcome::Ack { .. })));
        stream
            .on_request(request(Kind::Endpoint, &["a"], ""))
            .expect("ok");
        let eds = stream.next_response(&snap).expect("EDS next");
        assert_eq!(eds.to_message().type_url, Kind::Endpoint.type_url());
        stream
            .on_request(request(Kind::Endpoint, &["a"], &eds.nonce))
            .expect("ok");
        let lds = stream.next_response(&snap).expect("then LDS");
        assert_eq!(lds.to_message().type_url, Kind::Listener.type_url());
        stream
            .on_request(request(Kind::Listener, &[], &lds.nonce))
            .expect("ok");
        assert!(stream.next_response(&snap).is_none(), "nothing changed");
        assert_eq!(stream.status_view(Kind::Listener).acked_version, Some("1"));
    }

    #[test]
    fn a_nacked_version_is_not_resent_but_the_next_one_is() {
        let mut stream = SotwStream::single(Kind::Cluster);
        stream
            .on_request(request(Kind::Cluster, &[], ""))
            .expect("ok");
        let first = stream
            .next_response(&snapshot(1, &[(Kind::Cluster, "a", "1")]))
            .expect("sent");
        stream
            .on_request(request(Kind::Cluster, &[], &first.nonce))
            .expect("ack");
        let bad = snapshot(2, &[(Kind::Cluster, "a", "2")]);
        let second = stream.next_response(&bad).expect("sent");
        let outcome = stream
            .on_request(nack(Kind::Cluster, &second.nonce))
            .expect("nack");
        assert_eq!(outcome, Some(Outcome::Nack));
        assert!(
            stream.next_response(&bad).is_none(),
            "the rejected version is not resent"
        );
        // A new config version with the same rejected content is not resent either.
        assert!(
            stream
                .next_response(&snapshot(3, &[(Kind::Cluster, "a", "2")]))
                .is_none()
        );
        let status = stream.status_view(Kind::Cluster);
        assert_eq!(status.acked_version, Some("1"));
        assert_eq!(status.last_nack.map(|n| n.version.as_str()), Some("2"));
        let fixed = stream
            .next_response(&snapshot(4, &[(Kind::Cluster, "a", "3")]))
            .expect("new version sent");
        assert_eq!(names(&fixed), ["a=3"]);
    }

    #[test]
    fn stale_nonces_are_ignored() {
        let snap = snapshot(1, &[(Kind::Cluster, "a", "1")]);
        let mut stream = SotwStream::aggregated();
        stream
            .on_request(request(Kind::Cluster, &[], ""))
            .expect("ok");
        let first = stream.next_response(&snap).expect("sent");
        assert_eq!(
            stream
                .on_request(request(Kind::Cluster, &[], "999"))
                .expect("ok"),
            None
        );
        assert_eq!(
            stream.status_view(Kind::Cluster).pending_nonce,
            Some(first.nonce.as_str())
        );
    }

    #[test]
    fn removed_clusters_stay_until_the_rest_is_acked() {
        let mut stream = SotwStream::aggregated();
        stream
            .on_request(request(Kind::Cluster, &[], ""))
            .expect("ok");
        stream
            .on_request(request(Kind::Route, &["r"], ""))
            .expect("ok");
        let old = snapshot(
            1,
            &[(Kind::Cluster, "old", "1"), (Kind::Route, "r", "to-old")],
        );
        let cds = stream.next_response(&old).expect("cds");
        stream
            .on_request(request(Kind::Cluster, &[], &cds.nonce))
            .expect("ack");
        let rds = stream.next_response(&old).expect("rds");
        stream
            .on_request(request(Kind::Route, &["r"], &rds.nonce))
            .expect("ack");
        // The route moves to a new cluster and the old cluster goes away.
        let new = snapshot(
            2,
            &[(Kind::Cluster, "new", "1"), (Kind::Route, "r", "to-new")],
        );
        let cds = stream.next_response(&new).expect("cds with both");
        assert_eq!(names(&cds), ["new=1", "old=1"]);
        stream
            .on_request(request(Kind::Cluster, &[], &cds.nonce))
            .expect("ack");
        let rds = stream.next_response(&new).expect("rds");
        assert_eq!(names(&rds), ["r=to-new"]);
        stream
            .on_request(request(Kind::Route, &["r"], &rds.nonce))
            .expect("ack");
        let cds = stream.next_response(&new).expect("removal last");
        assert_eq!(names(&cds), ["new=1"]);
    }

    #[test]
    fn named_types_send_only_what_changed_unless_the_subscription_changes() {
        let mut stream = SotwStream::single(Kind::Endpoint);
        stream
            .on_request(request(Kind::Endpoint, &["a", "b"], ""))
            .expect("ok");
        let first = stream
            .next_response(&snapshot(
                1,
                &[(Kind::Endpoint, "a", "1"), (Kind::Endpoint, "b", "1")],
            ))
            .expect("sent");
        assert_eq!(first.to_message().resources.len(), 2);
        stream
            .on_request(request(Kind::Endpoint, &["a", "b"], &first.nonce))
            .expect("ack");
        let update = snapshot(
            2,
            &[
                (Kind::Endpoint, "a", "2"),
                (Kind::Endpoint, "b", "1"),
                (Kind::Endpoint, "c", "1"),
            ],
        );
        let second = stream.next_response(&update).expect("sent");
        assert_eq!(names(&second), ["a=2"]);
        stream
            .on_request(request(Kind::Endpoint, &["a", "b", "c"], &second.nonce))
            .expect("ack + subscribe");
        let third = stream.next_response(&update).expect("whole subscription");
        assert_eq!(names(&third), ["a=2", "b=1", "c=1"]);
    }

    #[test]
    fn a_repeated_request_after_the_ack_is_answered_again() {
        let snap = snapshot(1, &[(Kind::Endpoint, "a", "1")]);
        let mut stream = SotwStream::single(Kind::Endpoint);
        stream
            .on_request(request(Kind::Endpoint, &["a"], ""))
            .expect("ok");
        let first = stream.next_response(&snap).expect("sent");
        stream
            .on_request(request(Kind::Endpoint, &["a"], &first.nonce))
            .expect("ack");
        assert!(
            stream.next_response(&snap).is_none(),
            "an ACK is not answered"
        );
        stream
            .on_request(request(Kind::Endpoint, &["a"], &first.nonce))
            .expect("re-request");
        let again = stream.next_response(&snap).expect("answered");
        assert_eq!(names(&again), ["a=1"]);
    }

    #[test]
    fn ads_requires_a_type_url() {
        let mut stream = SotwStream::aggregated();
        assert!(stream.on_request(SotwRequest::default()).is_err());
    }

    /// Decodes a whole gRPC frame as written on the wire.
    fn unframe(frame: Frame) -> DiscoveryResponse {
        let bytes = frame.to_bytes();
        assert_eq!(bytes[0], 0, "uncompressed");
        let length = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
        assert_eq!(
            length,
            bytes.len() - 5,
            "the header gives the message length"
        );
        DiscoveryResponse::decode(&bytes[5..]).expect("a response")
    }

    #[test]
    fn streams_in_the_same_place_share_one_encoded_body() {
        let first = snapshot(
            1,
            &[
                (Kind::Cluster, "a", "1"),
                (Kind::Cluster, "b", "1"),
                (Kind::Endpoint, "a", "1"),
                (Kind::Endpoint, "b", "1"),
            ],
        );
        let mut streams = [SotwStream::aggregated(), SotwStream::aggregated()];
        let mut sent = Vec::new();
        for stream in &mut streams {
            stream
                .on_request(request(Kind::Cluster, &[], ""))
                .expect("cds");
            let cds = stream.next_response(&first).expect("cds");
            stream
                .on_request(request(Kind::Cluster, &[], &cds.nonce))
                .expect("ack");
            stream
                .on_request(request(Kind::Endpoint, &["b", "a"], ""))
                .expect("eds");
            let eds = stream.next_response(&first).expect("eds");
            stream
                .on_request(request(Kind::Endpoint, &["b", "a"], &eds.nonce))
                .expect("ack");
            sent.push((cds, eds));
        }
        assert_eq!(
            sent[0].0.body.as_ptr(),
            sent[1].0.body.as_ptr(),
            "one CDS body"
        );
        assert_eq!(
            sent[0].1.body.as_ptr(),
            sent[1].1.body.as_ptr(),
            "one EDS body"
        );
        let (cds, eds) = sent.pop().expect("two");
        let nonce = cds.nonce.clone();
        let cds = unframe(SotwStream::frame(cds));
        assert_eq!(
            (
                cds.version_info.as_str(),
                cds.nonce.as_str(),
                cds.type_url.as_str()
            ),
            ("1", nonce.as_str(), Kind::Cluster.type_url())
        );
        assert_eq!(cds.resources.len(), 2);
        assert_eq!(unframe(SotwStream::frame(eds)).resources.len(), 2);

        // Endpoint "a" changes: both streams send only it, from one shared body.
        let (_, changed) = resource(Kind::Endpoint, "a", "2");
        let mut endpoints = (**first.of(Kind::Endpoint)).clone();
        endpoints.insert("a".into(), changed);
        let mut second = snapshot(2, &[]);
        second.types = first.types.clone();
        second.types[Kind::Endpoint.index()] = Arc::new(endpoints);
        second.changes[Kind::Endpoint.index()] = Some(Arc::new(crate::snapshot::TypeChange {
            from: first.of(Kind::Endpoint).clone(),
            names: vec!["a".into()],
        }));
        let updates: Vec<SotwResponse> = streams
            .iter_mut()
            .map(|stream| stream.next_response(&second).expect("the change"))
            .collect();
        assert_eq!(updates[0].body.as_ptr(), updates[1].body.as_ptr());
        assert_eq!(names(&updates[0]), ["a=2"]);
        assert_ne!(
            updates[0].nonce, "",
            "each stream numbers its own responses"
        );
    }
}
