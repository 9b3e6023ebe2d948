//! The generator: holds the mesh inputs and, derived from them, the Envoy resources sidecars
//! need, and rebuilds only what an input change touches.
//!
//! - Per service port (whatever the caller): its cluster, ClusterLoadAssignment, route
//!   configurations (one with the short host name for callers of its own namespace, one
//!   without), outbound filter chain and, in the port-listener layout, its listener.
//! - Per caller namespace, a [`View`]: the clusters, routes and outbound listener of the
//!   services its sidecars may reach, shared by all of them.
//! - Per workload, its inbound ports, from which its sidecar's inbound listener is built.
//!
//! Resources are encoded and hashed once and shared (`Arc`) by every view and sidecar that
//! holds them; a map that comes out equal to the one before keeps the old `Arc`, so the xDS
//! streams see no change where there is none.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use prost::Message;
use xds_api::envoy::config::listener::v3::FilterChain;

use crate::ca::SpiffeId;
use crate::mesh::identity::known_service_account;
use crate::mesh::model::{
    EndpointSet, Inputs, MeshUpdate, NamespaceSettings, ObjectKey, PolicyObject, Protocol, Service,
    Source, TargetPort, Workload,
};
use crate::mesh::names;
use crate::mesh::policy::{Effective, MtlsMode, mesh_defaults};
use crate::mesh::sidecar::Sidecar;
use crate::mesh::translate::cluster::PeerIdentities;
use crate::mesh::translate::listener::InboundPort;
use crate::mesh::translate::route::RouteInputs;
use crate::mesh::translate::{MeshSettings, OutboundLayout, cluster, endpoints, listener, route};
use crate::resource::Kind;
use crate::snapshot::{Resource, TypeChange, TypeMap, changed_names};

fn resource<M: Message>(kind: Kind, name: &str, message: &M) -> Arc<Resource> {
    Arc::new(Resource::with_eds_service(
        kind,
        name,
        &message.encode_to_vec(),
        None,
    ))
}

/// An EDS cluster, whose endpoints are the assignment of the same name.
fn eds_cluster(
    name: &str,
    message: &xds_api::envoy::config::cluster::v3::Cluster,
) -> Arc<Resource> {
    Arc::new(Resource::with_eds_service(
        Kind::Cluster,
        name,
        &message.encode_to_vec(),
        Some(name.to_string()),
    ))
}

/// A map shared by many sidecars, and how it differs from the one it replaced.
#[derive(Clone, Debug, Default)]
pub struct Shared {
    pub map: Arc<TypeMap>,
    pub change: Option<Arc<TypeChange>>,
}

impl Shared {
    /// Takes `next` if it differs from the current map (names or versions).
    fn replace(&mut self, next: TypeMap) -> bool {
        let names = changed_names(&self.map, &next);
        if names.is_empty() {
            return false;
        }
        self.change = Some(Arc::new(TypeChange {
            from: self.map.clone(),
            names,
        }));
        self.map = Arc::new(next);
        true
    }

    /// Applies upserts and removals to a copy of the map.
    fn edit(&mut self, upserts: Vec<Arc<Resource>>, removals: Vec<String>) -> bool {
        let mut names = Vec::new();
        let mut next: Option<TypeMap> = None;
        for resource in upserts {
            if self
                .map
                .get(&resource.name)
                .is_some_and(|old| old.version == resource.version)
            {
                continue;
            }
            names.push(resource.name.clone());
            next.get_or_insert_with(|| (*self.map).clone())
                .insert(resource.name.clone(), resource);
        }
        for name in removals {
            if self.map.contains_key(&name) {
                next.get_or_insert_with(|| (*self.map).clone())
                    .remove(&name);
                names.push(name);
            }
        }
        let Some(next) = next else {
            return false;
        };
        names.sort();
        names.dedup();
        self.change = Some(Arc::new(TypeChange {
            from: self.map.clone(),
            names,
        }));
        self.map = Arc::new(next);
        true
    }
}

/// What one service port turns into.
#[derive(Debug)]
struct PortOutput {
    name: String,
    port: u16,
    port_name: String,
    protocol: Protocol,
    effective: Effective,
    cluster: Arc<Resource>,
    /// For callers in the service's own namespace (with the short name) and for the others.
    routes: Option<(Arc<Resource>, Arc<Resource>)>,
    chain: Option<(FilterChain, u64)>,
    port_listener: Option<Arc<Resource>>,
    /// Services this port's routes split traffic to.
    split_targets: Vec<ObjectKey>,
}

#[derive(Debug)]
struct ServiceOutput {
    ports: Vec<PortOutput>,
}

/// What the sidecars of one namespace see.
#[derive(Debug, Default)]
pub struct View {
    /// Services whose ports are in the view (for policy status).
    pub visible: BTreeSet<ObjectKey>,
    pub clusters: Shared,
    pub routes: Shared,
    /// Port-listener layout only.
    pub port_listeners: Shared,
    /// (name, hash) of every chain in the capture listener, to tell when it must be rebuilt.
    chain_hashes: Vec<(String, u64)>,
    chains: Vec<FilterChain>,
    /// The capture listener by outbound port, built when a sidecar asks.
    outbound: HashMap<u16, Arc<Resource>>,
}

/// What a policy came to, for its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyState {
    pub service: ObjectKey,
    pub generation: i64,
    /// Why the policy is not in effect, if it is not.
    pub rejected: Option<(String, String)>,
    /// Split targets that do not exist (left out).
    pub warnings: Vec<String>,
    /// The config version that first carried its current form.
    pub applied_version: u64,
    /// The resource types that version changed for it.
    pub kinds: BTreeSet<Kind>,
    /// What a Remora proxy would reject in the service's generated resources (its own config
    /// conversion's verdict), so the status says so before any NACK.
    pub remora_rejects: Vec<String>,
}

/// What [`Generator::rebuild`] changed.
#[derive(Debug, Default)]
pub struct Rebuilt {
    pub endpoints_changed: bool,
    /// Namespaces whose view changed.
    pub views_changed: BTreeSet<String>,
    pub workloads_changed: BTreeSet<ObjectKey>,
}

impl Rebuilt {
    pub fn is_empty(&self) -> bool {
        !self.endpoints_changed
            && self.views_changed.is_empty()
            && self.workloads_changed.is_empty()
    }
}

#[derive(Debug, Default)]
struct Dirty {
    services: BTreeSet<ObjectKey>,
    endpoints: BTreeSet<ObjectKey>,
    workloads: BTreeSet<ObjectKey>,
    policies: BTreeSet<ObjectKey>,
    /// Every view (a service's visibility or a namespace's reach changed).
    all_views: bool,
    views: BTreeSet<String>,
}

/// The generated parts of one sidecar's snapshot.
#[derive(Clone, Debug)]
pub struct SidecarParts {
    pub clusters: Shared,
    pub endpoints: Shared,
    pub routes: Shared,
    pub listeners: Arc<TypeMap>,
}

#[derive(Debug)]
pub struct Generator {
    settings: MeshSettings,
    inputs: Inputs,
    services: BTreeMap<ObjectKey, ServiceOutput>,
    endpoints: Shared,
    /// Workload → services whose endpoints name it, and the reverse.
    workload_services: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    service_workloads: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Target → services whose routes split traffic to it.
    split_sources: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Who may answer for each service, as its clusters were last built with.
    service_peers: HashMap<ObjectKey, PeerIdentities>,
    inbound: HashMap<ObjectKey, Arc<Vec<InboundPort>>>,
    inbound_listeners: HashMap<(ObjectKey, u16), Arc<Resource>>,
    inbound_clusters: HashMap<(u16, Protocol), Arc<Resource>>,
    passthrough: Arc<Resource>,
    views: HashMap<String, View>,
    policies: BTreeMap<ObjectKey, PolicyState>,
    dirty: Dirty,
}

impl Generator {
    pub fn new(settings: MeshSettings) -> Generator {
        Generator {
            settings,
            inputs: Inputs::default(),
            services: BTreeMap::new(),
            endpoints: Shared::default(),
            workload_services: HashMap::new(),
            service_workloads: HashMap::new(),
            split_sources: HashMap::new(),
            service_peers: HashMap::new(),
            inbound: HashMap::new(),
            inbound_listeners: HashMap::new(),
            inbound_clusters: HashMap::new(),
            passthrough: resource(
                Kind::Cluster,
                names::PASSTHROUGH_CLUSTER,
                &cluster::passthrough_cluster(),
            ),
            views: HashMap::new(),
            policies: BTreeMap::new(),
            dirty: Dirty::default(),
        }
    }

    pub fn settings(&self) -> &MeshSettings {
        &self.settings
    }

    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    // ---- input changes: each marks what it touches ----

    /// Takes in one change from a source.
    pub fn apply(&mut self, update: MeshUpdate) {
        match update {
            MeshUpdate::Service(source, key, value) => self.set_service(source, key, value),
            MeshUpdate::Endpoints(source, service, name, value) => {
                self.set_endpoints(source, service, &name, value)
            }
            MeshUpdate::Workload(source, key, value) => self.set_workload(source, key, value),
            MeshUpdate::Namespace(source, name, value) => self.set_namespace(source, &name, value),
            MeshUpdate::Policy(source, key, value) => self.set_policy(source, key, value),
        }
    }

    pub fn set_service(&mut self, source: Source, key: ObjectKey, service: Option<Service>) {
        let layer = self.inputs.layer_mut(source);
        let changed = match service {
            Some(service) => {
                let same = layer.services.get(&key).is_some_and(|old| **old == service);
                if !same {
                    layer.services.insert(key.clone(), Arc::new(service));
                }
                !same
            }
            None => layer.services.remove(&key).is_some(),
        };
        if changed {
            self.dirty.services.insert(key.clone());
            self.dirty.endpoints.insert(key.clone());
            if let Some(sources) = self.split_sources.get(&key) {
                self.dirty.services.extend(sources.iter().cloned());
            }
        }
    }

    pub fn set_endpoints(
        &mut self,
        source: Source,
        service: ObjectKey,
        set_name: &str,
        set: Option<EndpointSet>,
    ) {
        let layer = self.inputs.layer_mut(source);
        let changed = match set {
            Some(set) => {
                let sets = layer.endpoints.entry(service.clone()).or_default();
                let same = sets.get(set_name).is_some_and(|old| **old == set);
                if !same {
                    sets.insert(set_name.to_string(), Arc::new(set));
                }
                !same
            }
            None => {
                let removed = layer
                    .endpoints
                    .get_mut(&service)
                    .is_some_and(|sets| sets.remove(set_name).is_some());
                if layer
                    .endpoints
                    .get(&service)
                    .is_some_and(BTreeMap::is_empty)
                {
                    layer.endpoints.remove(&service);
                }
                removed
            }
        };
        if changed {
            self.dirty.endpoints.insert(service);
        }
    }

    pub fn set_workload(&mut self, source: Source, key: ObjectKey, workload: Option<Workload>) {
        let layer = self.inputs.layer_mut(source);
        let changed = match workload {
            Some(workload) => {
                let same = layer
                    .workloads
                    .get(&key)
                    .is_some_and(|old| **old == workload);
                if !same {
                    layer.workloads.insert(key.clone(), Arc::new(workload));
                }
                !same
            }
            None => layer.workloads.remove(&key).is_some(),
        };
        if changed {
            self.dirty.workloads.insert(key);
        }
    }

    pub fn set_namespace(
        &mut self,
        source: Source,
        name: &str,
        settings: Option<NamespaceSettings>,
    ) {
        let layer = self.inputs.layer_mut(source);
        let changed = match settings {
            Some(settings) => {
                layer.namespaces.insert(name.to_string(), settings.clone()) != Some(settings)
            }
            None => layer.namespaces.remove(name).is_some(),
        };
        if changed {
            self.dirty.views.insert(name.to_string());
        }
    }

    pub fn set_policy(&mut self, source: Source, key: ObjectKey, policy: Option<PolicyObject>) {
        let layer = self.inputs.layer_mut(source);
        let old_target = layer
            .policies
            .get(&key)
            .map(|old| ObjectKey::new(&key.namespace, &old.spec.service));
        let changed = match policy {
            Some(policy) => {
                let same = layer.policies.get(&key).is_some_and(|old| **old == policy);
                if !same {
                    let target = ObjectKey::new(&key.namespace, &policy.spec.service);
                    self.dirty.services.insert(target);
                    layer.policies.insert(key.clone(), Arc::new(policy));
                }
                !same
            }
            None => layer.policies.remove(&key).is_some(),
        };
        if changed {
            if let Some(old_target) = old_target {
                self.dirty.services.insert(old_target);
            }
            self.dirty.policies.insert(key);
        }
    }

    /// Whether any input changed since the last rebuild.
    pub fn is_dirty(&self) -> bool {
        let dirty = &self.dirty;
        !(dirty.services.is_empty()
            && dirty.endpoints.is_empty()
            && dirty.workloads.is_empty()
            && dirty.policies.is_empty()
            && !dirty.all_views
            && dirty.views.is_empty())
    }

    // ---- rebuilding ----

    /// Brings every derived resource up to date; `version` is the config version the result
    /// will be published as (recorded for policy status).
    pub fn rebuild(&mut self, version: u64) -> Rebuilt {
        let mut rebuilt = Rebuilt::default();
        let mut dirty = std::mem::take(&mut self.dirty);
        // Endpoints or pods that changed may change who answers for a service, which its
        // clusters check: such services are rebuilt too.
        let mut peers_may_change: BTreeSet<ObjectKey> = dirty.endpoints.clone();
        for workload in &dirty.workloads {
            if let Some(services) = self.workload_services.get(workload) {
                peers_may_change.extend(services.iter().cloned());
            }
        }
        for key in peers_may_change {
            if !dirty.services.contains(&key)
                && self.services.contains_key(&key)
                && self.service_peers.get(&key) != Some(&self.peer_identities(&key))
            {
                dirty.services.insert(key);
            }
        }
        self.dirty.views = dirty.views;
        self.dirty.all_views = dirty.all_views;
        let mut endpoint_services = dirty.endpoints;
        let mut workloads = dirty.workloads;
        // A changed service (or its policy) may select other pods, or change their ports'
        // protocol or mTLS mode: every workload of its namespace is looked at again.
        let namespaces: BTreeSet<&String> =
            dirty.services.iter().map(|key| &key.namespace).collect();
        for namespace in namespaces {
            for layer in &self.inputs.layers {
                workloads.extend(
                    layer
                        .workloads
                        .keys()
                        .filter(|key| key.namespace == *namespace)
                        .cloned(),
                );
            }
        }

        for key in &dirty.services {
            let (kinds, visibility_changed) = self.rebuild_service(key);
            endpoint_services.insert(key.clone());
            if let Some(referenced) = self.service_workloads.get(key) {
                workloads.extend(referenced.iter().cloned());
            }
            if !kinds.is_empty() || visibility_changed {
                self.dirty.all_views = true;
            }
            self.update_policy_states(key, &dirty.policies, &kinds, version);
        }
        for key in &dirty.policies {
            if !self.inputs.policies().contains_key(key) {
                self.policies.remove(key);
            }
        }

        if !endpoint_services.is_empty() {
            let (upserts, removals) = self.rebuild_endpoints(&endpoint_services, &mut workloads);
            rebuilt.endpoints_changed = self.endpoints.edit(upserts, removals);
        }

        for key in &workloads {
            let ports = self.inbound_ports(key);
            let changed = self.inbound.get(key).is_none_or(|old| **old != ports);
            if changed {
                if ports.is_empty() {
                    self.inbound.remove(key);
                } else {
                    self.inbound.insert(key.clone(), Arc::new(ports));
                }
                self.inbound_listeners
                    .retain(|(workload, _), _| workload != key);
                self.dirty.views.insert(key.namespace.clone());
                rebuilt.workloads_changed.insert(key.clone());
            }
        }

        let namespaces: Vec<String> = if self.dirty.all_views {
            self.views.keys().cloned().collect()
        } else {
            self.dirty
                .views
                .iter()
                .filter(|namespace| self.views.contains_key(*namespace))
                .cloned()
                .collect()
        };
        self.dirty.all_views = false;
        self.dirty.views.clear();
        for namespace in namespaces {
            if self.rebuild_view(&namespace) {
                rebuilt.views_changed.insert(namespace);
            }
        }
        rebuilt
    }

    /// The effective policy of each port of `service`, and the keys of the policies used.
    fn effective(&self, service: &Service) -> (Vec<Effective>, Vec<(ObjectKey, Option<String>)>) {
        let base = if self.settings.mesh_defaults {
            mesh_defaults()
        } else {
            Effective::default()
        };
        let policies = self.inputs.policies_for(&service.key);
        // Per scope (None = every port), the first valid policy by name applies; later ones
        // are reported as conflicting.
        let mut chosen: BTreeMap<Option<u16>, &PolicyObject> = BTreeMap::new();
        let mut verdicts = Vec::new();
        for policy in policies {
            let problems = policy.spec.problems();
            if !problems.is_empty() {
                verdicts.push((policy.key.clone(), Some(problems.join("; "))));
                continue;
            }
            if let Some(port) = policy.spec.port
                && !service.ports.iter().any(|p| p.port == port)
            {
                verdicts.push((
                    policy.key.clone(),
                    Some(format!(
                        "spec.port: service {} has no port {port}",
                        service.key.name
                    )),
                ));
                continue;
            }
            match chosen.get(&policy.spec.port) {
                Some(first) => verdicts.push((
                    policy.key.clone(),
                    Some(format!(
                        "conflicts with TrafficPolicy {} for the same service and port, which applies",
                        first.key.name
                    )),
                )),
                None => {
                    chosen.insert(policy.spec.port, policy);
                    verdicts.push((policy.key.clone(), None));
                }
            }
        }
        let effective = service
            .ports
            .iter()
            .map(|port| {
                let mut effective = base.clone();
                if let Some(wide) = chosen.get(&None) {
                    effective.apply(&wide.spec);
                }
                if let Some(specific) = chosen.get(&Some(port.port)) {
                    effective.apply(&specific.spec);
                }
                effective
            })
            .collect();
        (effective, verdicts)
    }

    /// Recomputes one service's outputs; returns the kinds whose resources changed, and
    /// whether who may see it changed.
    fn rebuild_service(&mut self, key: &ObjectKey) -> (BTreeSet<Kind>, bool) {
        let mut kinds = BTreeSet::new();
        let old = self.services.remove(key);
        for targets in self.split_sources.values_mut() {
            targets.remove(key);
        }
        let Some(service) = self.inputs.service(key).cloned() else {
            self.service_peers.remove(key);
            if let Some(old) = old
                && !old.ports.is_empty()
            {
                kinds.extend([Kind::Cluster, Kind::Route, Kind::Listener]);
            }
            return (kinds, false);
        };
        let (effective, _) = self.effective(&service);
        let domain = self.settings.cluster_domain.clone();
        let host = names::service_host(key, &domain);
        let peers = self.peer_identities(key);
        let mut ports = Vec::new();
        for (port, effective) in service.ports.iter().zip(effective) {
            let name = names::outbound(key, port.port, &domain);
            let cluster_resource = eds_cluster(
                &name,
                &cluster::service_cluster(&name, &host, port.protocol, &effective, &peers),
            );
            let mut split_targets = Vec::new();
            // A headless service has no chain to use a route configuration.
            let routes = (port.protocol.is_http() && service.vip.is_some()).then(|| {
                let split_cluster = |target: &str| {
                    let target_key = ObjectKey::new(&key.namespace, target);
                    let target_service = self.inputs.service(&target_key)?;
                    target_service
                        .ports
                        .iter()
                        .any(|p| p.port == port.port)
                        .then(|| names::outbound(&target_key, port.port, &domain))
                };
                for route in &effective.routes {
                    for split in &route.split {
                        split_targets.push(ObjectKey::new(&key.namespace, &split.service));
                    }
                }
                let build = |same_namespace: bool| {
                    let config = route::route_configuration(&RouteInputs {
                        name: &name,
                        cluster: &name,
                        domains: names::host_names(
                            key,
                            port.port,
                            service.vip,
                            &domain,
                            same_namespace,
                        ),
                        policy: &effective,
                        split_cluster: &split_cluster,
                    });
                    resource(Kind::Route, &name, &config)
                };
                (build(true), build(false))
            });
            let chain = service.vip.map(|vip| {
                let chain =
                    listener::outbound_chain(&name, vip, port.port, port.protocol, &effective);
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                chain.encode_to_vec().hash(&mut hasher);
                (chain, hasher.finish())
            });
            let port_listener = match (self.settings.outbound_layout, service.vip) {
                (OutboundLayout::PortListeners, Some(vip)) => Some(resource(
                    Kind::Listener,
                    &name,
                    &listener::port_listener(&name, vip, port.port, port.protocol, &effective),
                )),
                _ => None,
            };
            ports.push(PortOutput {
                name,
                port: port.port,
                port_name: port.name.clone(),
                protocol: port.protocol,
                effective,
                cluster: cluster_resource,
                routes,
                chain,
                port_listener,
                split_targets,
            });
        }
        for port in &ports {
            for target in &port.split_targets {
                self.split_sources
                    .entry(target.clone())
                    .or_default()
                    .insert(key.clone());
            }
        }
        kinds.extend(compare_outputs(old.as_ref(), &ports));
        let exports = |ports: &[PortOutput]| -> Vec<Option<Vec<String>>> {
            ports
                .iter()
                .map(|port| port.effective.export_to.clone())
                .collect()
        };
        let visibility_changed =
            old.as_ref().map(|old| exports(&old.ports)) != Some(exports(&ports));
        self.services.insert(key.clone(), ServiceOutput { ports });
        self.service_peers.insert(key.clone(), peers);
        (kinds, visibility_changed)
    }

    /// Who may answer for `service`: the identities of its endpoints' workloads, or any of
    /// the trust domain while one of them (or every one: no endpoints yet) is unknown.
    fn peer_identities(&self, service: &ObjectKey) -> PeerIdentities {
        let trust_domain = &self.settings.trust_domain;
        let anyone = || PeerIdentities::TrustDomain(SpiffeId::trust_domain_prefix(trust_domain));
        let mut ids = BTreeSet::new();
        for set in self.inputs.endpoint_sets(service) {
            for endpoint in &set.endpoints {
                let Some(workload) = &endpoint.workload else {
                    return anyone();
                };
                let Some(account) = known_service_account(&self.inputs, workload) else {
                    return anyone();
                };
                ids.insert(SpiffeId::new(trust_domain, &workload.namespace, account).to_string());
            }
        }
        if ids.is_empty() {
            anyone()
        } else {
            PeerIdentities::Known(ids)
        }
    }

    fn update_policy_states(
        &mut self,
        service: &ObjectKey,
        changed_policies: &BTreeSet<ObjectKey>,
        kinds: &BTreeSet<Kind>,
        version: u64,
    ) {
        let verdicts = match self.inputs.service(service) {
            Some(found) => self.effective(&found.clone()).1,
            None => self
                .inputs
                .policies_for(service)
                .into_iter()
                .map(|policy| {
                    (
                        policy.key.clone(),
                        Some(format!(
                            "service {} does not exist in namespace {}",
                            service.name, service.namespace
                        )),
                    )
                })
                .collect(),
        };
        let remora_rejects = self.remora_rejects(service);
        for (key, problem) in verdicts {
            let generation = self
                .inputs
                .policies()
                .get(&key)
                .map(|policy| policy.generation)
                .unwrap_or_default();
            let warnings = self.missing_split_targets(&key);
            let state = self.policies.entry(key.clone()).or_default();
            let rejected = problem.map(|message| {
                let reason = if message.starts_with("conflicts") {
                    "Conflicted"
                } else if message.starts_with("service ") {
                    "ServiceNotFound"
                } else {
                    "Invalid"
                };
                (reason.to_string(), message)
            });
            let fresh = changed_policies.contains(&key) || state.rejected != rejected;
            state.service = service.clone();
            state.generation = generation;
            state.warnings = warnings;
            state.remora_rejects.clone_from(&remora_rejects);
            if fresh || !kinds.is_empty() {
                state.applied_version = version;
                state.kinds = if rejected.is_some() {
                    BTreeSet::new()
                } else {
                    kinds.clone()
                };
            }
            state.rejected = rejected;
        }
    }

    /// The Remora proxy's verdict on a service's generated clusters and routes.
    fn remora_rejects(&self, service: &ObjectKey) -> Vec<String> {
        let Some(output) = self.services.get(service) else {
            return Vec::new();
        };
        let mut rejects = Vec::new();
        for port in &output.ports {
            let resources = std::iter::once((Kind::Cluster, &port.cluster)).chain(
                port.routes
                    .iter()
                    .flat_map(|(local, remote)| [(Kind::Route, local), (Kind::Route, remote)]),
            );
            for (kind, resource) in resources {
                if let Err(error) =
                    remora_config::resource::check(kind.type_url(), &resource.body.value)
                {
                    let reject = format!(
                        "{} {}: {}: {}",
                        kind.xds_name(),
                        resource.name,
                        error.path,
                        error.reason
                    );
                    if !rejects.contains(&reject) {
                        rejects.push(reject);
                    }
                }
            }
        }
        rejects
    }

    fn missing_split_targets(&self, policy: &ObjectKey) -> Vec<String> {
        let policies = self.inputs.policies();
        let Some(policy) = policies.get(policy) else {
            return Vec::new();
        };
        let mut missing = Vec::new();
        for route in &policy.spec.routes {
            for split in &route.split {
                let key = ObjectKey::new(&policy.key.namespace, &split.service);
                if self.inputs.service(&key).is_none() {
                    missing.push(format!(
                        "split target service {} does not exist; its share stays with {}",
                        split.service, policy.spec.service
                    ));
                }
            }
        }
        missing
    }

    /// The assignments of the given services; collects the workloads whose endpoints changed.
    fn rebuild_endpoints(
        &mut self,
        services: &BTreeSet<ObjectKey>,
        workloads: &mut BTreeSet<ObjectKey>,
    ) -> (Vec<Arc<Resource>>, Vec<String>) {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        let domain = self.settings.cluster_domain.clone();
        for key in services {
            let sets = self.inputs.endpoint_sets(key);
            let named: BTreeSet<ObjectKey> = sets
                .iter()
                .flat_map(|set| set.endpoints.iter())
                .filter_map(|endpoint| endpoint.workload.clone())
                .collect();
            let before = self.service_workloads.remove(key).unwrap_or_default();
            for workload in before.symmetric_difference(&named) {
                workloads.insert(workload.clone());
            }
            // Endpoints of a workload may change ports without changing which workloads.
            workloads.extend(named.iter().cloned());
            for workload in &before {
                if let Some(services) = self.workload_services.get_mut(workload) {
                    services.remove(key);
                    if services.is_empty() {
                        self.workload_services.remove(workload);
                    }
                }
            }
            for workload in &named {
                self.workload_services
                    .entry(workload.clone())
                    .or_default()
                    .insert(key.clone());
            }
            if !named.is_empty() {
                self.service_workloads.insert(key.clone(), named);
            }
            let wanted: BTreeMap<String, &str> = match self.services.get(key) {
                Some(output) => output
                    .ports
                    .iter()
                    .map(|port| (port.name.clone(), port.port_name.as_str()))
                    .collect(),
                None => BTreeMap::new(),
            };
            let prefix = format!("{}:", names::service_host(key, &domain));
            removals.extend(
                self.endpoints
                    .map
                    .range(prefix.clone()..)
                    .take_while(|(name, _)| name.starts_with(&prefix))
                    .filter(|(name, _)| !wanted.contains_key(*name))
                    .map(|(name, _)| name.clone()),
            );
            for (name, port_name) in wanted {
                let sets: Vec<&EndpointSet> = sets.iter().map(|set| set.as_ref()).collect();
                let assignment = endpoints::load_assignment(&name, port_name, &sets);
                upserts.push(resource(Kind::Endpoint, &name, &assignment));
            }
        }
        (upserts, removals)
    }

    /// The app ports of a workload: the target ports of the services that select it, where
    /// services' endpoints send traffic, and its declared container ports.
    fn inbound_ports(&self, key: &ObjectKey) -> Vec<InboundPort> {
        let mut ports: BTreeMap<u16, InboundPort> = BTreeMap::new();
        let mut modes: BTreeMap<u16, Vec<MtlsMode>> = BTreeMap::new();
        if let Some(workload) = self.inputs.workload(key) {
            for (service_key, service) in self.inputs.services() {
                if service_key.namespace != key.namespace || !service.selects(&workload.labels) {
                    continue;
                }
                let Some(output) = self.services.get(service_key) else {
                    continue;
                };
                for (port, generated) in service.ports.iter().zip(&output.ports) {
                    let number = match &port.target_port {
                        Some(TargetPort::Number(number)) => Some(*number),
                        Some(TargetPort::Name(name)) => workload
                            .ports
                            .iter()
                            .find(|(port_name, _)| port_name == name)
                            .map(|(_, number)| *number),
                        None => None,
                    };
                    if let Some(number) = number {
                        ports.entry(number).or_insert(InboundPort {
                            port: number,
                            protocol: port.protocol,
                            mtls: MtlsMode::Disable,
                        });
                        modes
                            .entry(number)
                            .or_default()
                            .push(generated.effective.mtls);
                    }
                }
            }
        }
        for service in self.workload_services.get(key).into_iter().flatten() {
            let Some(output) = self.services.get(service) else {
                continue;
            };
            for set in self.inputs.endpoint_sets(service) {
                if !set
                    .endpoints
                    .iter()
                    .any(|endpoint| endpoint.workload.as_ref() == Some(key))
                {
                    continue;
                }
                for port in &output.ports {
                    if let Some(&number) = set.ports.get(&port.port_name) {
                        ports.entry(number).or_insert(InboundPort {
                            port: number,
                            protocol: port.protocol,
                            mtls: MtlsMode::Disable,
                        });
                        modes.entry(number).or_default().push(port.effective.mtls);
                    }
                }
            }
        }
        for (port, modes) in modes {
            if let Some(entry) = ports.get_mut(&port) {
                entry.mtls = if modes.iter().all(|mode| *mode == MtlsMode::Strict) {
                    MtlsMode::Strict
                } else if modes.iter().any(|mode| *mode != MtlsMode::Disable) {
                    MtlsMode::Permissive
                } else {
                    MtlsMode::Disable
                };
            }
        }
        if let Some(workload) = self.inputs.workload(key) {
            for (name, number) in &workload.ports {
                ports.entry(*number).or_insert(InboundPort {
                    port: *number,
                    protocol: Protocol::detect(None, name),
                    mtls: MtlsMode::Disable,
                });
            }
        }
        ports.into_values().collect()
    }

    fn inbound_cluster(&mut self, port: u16, protocol: Protocol) -> Arc<Resource> {
        let protocol = if protocol == Protocol::Http2 {
            Protocol::Http2
        } else {
            Protocol::Tcp
        };
        self.inbound_clusters
            .entry((port, protocol))
            .or_insert_with(|| {
                resource(
                    Kind::Cluster,
                    &names::inbound(port, protocol),
                    &cluster::inbound_cluster(port, protocol),
                )
            })
            .clone()
    }

    /// Rebuilds the view of `namespace`; whether anything in it changed.
    fn rebuild_view(&mut self, namespace: &str) -> bool {
        let reach = self.inputs.namespace(namespace).reach;
        let mut visible = BTreeSet::new();
        let mut clusters = TypeMap::new();
        let mut routes = TypeMap::new();
        let mut port_listeners = TypeMap::new();
        let mut chains: Vec<(&FilterChain, u64)> = Vec::new();
        let mut split_targets: BTreeSet<(ObjectKey, u16)> = BTreeSet::new();
        for (key, output) in &self.services {
            if let Some(reach) = &reach
                && key.namespace != namespace
                && !reach.contains(&key.namespace)
            {
                continue;
            }
            for port in &output.ports {
                if !port.effective.exported_to(&key.namespace, namespace) {
                    continue;
                }
                visible.insert(key.clone());
                clusters.insert(port.name.clone(), port.cluster.clone());
                if let Some((local, remote)) = &port.routes {
                    let route = if key.namespace == namespace {
                        local
                    } else {
                        remote
                    };
                    routes.insert(port.name.clone(), route.clone());
                }
                if let Some((chain, hash)) = &port.chain {
                    chains.push((chain, *hash));
                }
                if let Some(listener) = &port.port_listener {
                    port_listeners.insert(port.name.clone(), listener.clone());
                }
                for target in &port.split_targets {
                    split_targets.insert((target.clone(), port.port));
                }
            }
        }
        for (target, port) in split_targets {
            if let Some(output) = self.services.get(&target)
                && let Some(port) = output.ports.iter().find(|p| p.port == port)
            {
                clusters.insert(port.name.clone(), port.cluster.clone());
            }
        }
        clusters.insert(
            names::PASSTHROUGH_CLUSTER.to_string(),
            self.passthrough.clone(),
        );
        let inbound: BTreeSet<(u16, Protocol)> = self
            .inbound
            .iter()
            .filter(|(workload, _)| workload.namespace == namespace)
            .flat_map(|(_, ports)| ports.iter().map(|port| (port.port, port.protocol)))
            .collect();
        chains.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let chain_hashes: Vec<(String, u64)> = chains
            .iter()
            .map(|(chain, hash)| (chain.name.clone(), *hash))
            .collect();
        let chain_list: Vec<FilterChain> =
            chains.into_iter().map(|(chain, _)| chain.clone()).collect();
        for (port, protocol) in inbound {
            let resource = self.inbound_cluster(port, protocol);
            clusters.insert(resource.name.clone(), resource);
        }
        let view = self.views.entry(namespace.to_string()).or_default();
        let mut changed = view.clusters.replace(clusters);
        changed |= view.routes.replace(routes);
        changed |= view.port_listeners.replace(port_listeners);
        if view.chain_hashes != chain_hashes {
            view.chain_hashes = chain_hashes;
            view.chains = chain_list;
            view.outbound.clear();
            changed = true;
        }
        view.visible = visible;
        changed
    }

    // ---- what sidecars get ----

    /// Starts following `namespace` (a sidecar of it connected).
    pub fn ensure_view(&mut self, namespace: &str) {
        if !self.views.contains_key(namespace) {
            self.rebuild_view(namespace);
        }
    }

    /// Stops following namespaces no sidecar is in.
    pub fn retain_views(&mut self, live: &BTreeSet<String>) {
        self.views.retain(|namespace, _| live.contains(namespace));
    }

    pub fn view(&self, namespace: &str) -> Option<&View> {
        self.views.get(namespace)
    }

    pub fn endpoints(&self) -> &Shared {
        &self.endpoints
    }

    pub fn policy_states(&self) -> &BTreeMap<ObjectKey, PolicyState> {
        &self.policies
    }

    /// The generated resources of one sidecar.
    pub fn sidecar_parts(&mut self, sidecar: &Sidecar) -> SidecarParts {
        let namespace = sidecar.namespace().to_string();
        self.ensure_view(&namespace);
        let mut listeners = TypeMap::new();
        if let Some(port) = sidecar.inbound_port
            && let Some(ports) = self.inbound.get(&sidecar.workload).cloned()
        {
            let listener = self
                .inbound_listeners
                .entry((sidecar.workload.clone(), port))
                .or_insert_with(|| {
                    resource(
                        Kind::Listener,
                        names::INBOUND_LISTENER,
                        &listener::inbound_listener(port, &ports),
                    )
                })
                .clone();
            listeners.insert(listener.name.clone(), listener);
        }
        let view = self.views.get_mut(&namespace).expect("view ensured above");
        if let Some(port) = sidecar.outbound_port {
            let chains = &view.chains;
            let outbound = view
                .outbound
                .entry(port)
                .or_insert_with(|| {
                    resource(
                        Kind::Listener,
                        names::OUTBOUND_LISTENER,
                        &listener::outbound_listener(port, chains.clone()),
                    )
                })
                .clone();
            listeners.insert(outbound.name.clone(), outbound);
        }
        listeners.extend(
            view.port_listeners
                .map
                .iter()
                .map(|(name, resource)| (name.clone(), resource.clone())),
        );
        SidecarParts {
            clusters: view.clusters.clone(),
            endpoints: self.endpoints.clone(),
            routes: view.routes.clone(),
            listeners: Arc::new(listeners),
        }
    }
}

/// The kinds whose resources differ between a service's old and new outputs.
fn compare_outputs(old: Option<&ServiceOutput>, new: &[PortOutput]) -> BTreeSet<Kind> {
    let mut kinds = BTreeSet::new();
    let old_ports: &[PortOutput] = old.map(|old| old.ports.as_slice()).unwrap_or(&[]);
    if old_ports.len() != new.len() {
        kinds.extend([Kind::Cluster, Kind::Listener]);
        if new
            .iter()
            .chain(old_ports)
            .any(|port| port.routes.is_some())
        {
            kinds.insert(Kind::Route);
        }
        return kinds;
    }
    for (before, after) in old_ports.iter().zip(new) {
        if before.name != after.name || before.cluster.version != after.cluster.version {
            kinds.insert(Kind::Cluster);
        }
        let routes = |port: &PortOutput| {
            port.routes
                .as_ref()
                .map(|(a, b)| (a.version.clone(), b.version.clone()))
        };
        if routes(before) != routes(after) {
            kinds.insert(Kind::Route);
        }
        let chain = |port: &PortOutput| port.chain.as_ref().map(|(_, hash)| *hash);
        let port_listener =
            |port: &PortOutput| port.port_listener.as_ref().map(|l| l.version.clone());
        if chain(before) != chain(after)
            || port_listener(before) != port_listener(after)
            || before.effective.mtls != after.effective.mtls
            || before.protocol != after.protocol
        {
            kinds.insert(Kind::Listener);
        }
    }
    kinds
}
