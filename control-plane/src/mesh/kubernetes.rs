//! The Kubernetes source: a watcher and reflector per kind (Namespaces, Services,
//! EndpointSlices, Pods, TrafficPolicies), each change turned into a model update for the hub.
//! After a re-list (the watch was too old to resume) the reflector's store is the truth:
//! objects the source knew but the store no longer holds are removed. The hub serves sidecars
//! once every kind has been listed once.
//!
//! It also writes each TrafficPolicy's status (which sidecars ACKed or NACKed it) back through
//! the status subresource. [`ACCESS`] is every permission this needs — the ClusterRole in
//! `deploy/remora.yaml` grants exactly these.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::mesh::hub::MeshHub;
use crate::mesh::model::{
    EndpointAddress, EndpointHealth, EndpointSet, MeshUpdate, NamespaceSettings, ObjectKey,
    PolicyObject, Protocol, REACH_ANNOTATION, Service, ServicePort, Source, TargetPort, Workload,
};
use crate::mesh::policy::TrafficPolicy;
use crate::registry::ProxyRegistry;

/// Every API permission the control plane uses: (API group, resource, verbs).
pub const ACCESS: &[(&str, &str, &[&str])] = &[
    ("", "namespaces", &["list", "watch"]),
    ("", "services", &["list", "watch"]),
    ("", "pods", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("remora.io", "trafficpolicies", &["list", "watch"]),
    ("remora.io", "trafficpolicies/status", &["patch"]),
];

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Containers the injector adds; their ports are not the app's.
const SIDECAR_CONTAINERS: [&str; 2] = ["remora-proxy", "remora-init"];
/// How often policy status is brought up to date.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// A client from `kubeconfig`, or else the usual places (`KUBECONFIG`, `~/.kube/config`, the
/// in-cluster service account).
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

fn key_of<K: Resource>(object: &K) -> ObjectKey {
    ObjectKey::new(
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default(),
    )
}

/// Drops what the reflector need not keep.
fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

fn namespace_update(namespace: &Namespace, present: bool) -> Vec<MeshUpdate> {
    let name = namespace.name_any();
    let settings = present.then(|| {
        NamespaceSettings::from_reach_annotation(
            namespace
                .annotations()
                .get(REACH_ANNOTATION)
                .map(String::as_str),
        )
    });
    vec![MeshUpdate::Namespace(Source::Kubernetes, name, settings)]
}

/// A Service in the model: ClusterIP (none for headless) and its TCP ports.
pub fn service_model(service: &KubeService) -> Option<Service> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let vip = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|port| {
            let name = port.name.clone().unwrap_or_default();
            let number = u16::try_from(port.port).ok()?;
            let target_port = match &port.target_port {
                None => TargetPort::Number(number),
                Some(IntOrString::Int(target)) => TargetPort::Number(u16::try_from(*target).ok()?),
                Some(IntOrString::String(name)) => TargetPort::Name(name.clone()),
            };
            Some(ServicePort {
                protocol: Protocol::detect(port.app_protocol.as_deref(), &name),
                name,
                port: number,
                target_port: Some(target_port),
            })
        })
        .collect();
    Some(Service {
        key: key_of(service),
        vip,
        ports,
        selector: spec
            .selector
            .clone()
            .filter(|selector| !selector.is_empty()),
    })
}

fn service_update(service: &KubeService, present: bool) -> Vec<MeshUpdate> {
    let model = if present {
        service_model(service)
    } else {
        None
    };
    vec![MeshUpdate::Service(
        Source::Kubernetes,
        key_of(service),
        model,
    )]
}

/// The service an EndpointSlice belongs to.
fn slice_service(slice: &EndpointSlice) -> Option<ObjectKey> {
    let service = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some(ObjectKey::new(
        slice.namespace().as_deref().unwrap_or_default(),
        service,
    ))
}

/// An EndpointSlice as an endpoint set: its TCP ports and its endpoints, with health from
/// their conditions and the pod behind each.
pub fn endpoint_set(slice: &EndpointSlice) -> Option<EndpointSet> {
    let service = slice_service(slice)?;
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return None;
    }
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|port| {
            Some((
                port.name.clone().unwrap_or_default(),
                u16::try_from(port.port?).ok()?,
            ))
        })
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .filter_map(|endpoint| {
            let conditions = endpoint.conditions.as_ref();
            let health = EndpointHealth::from_conditions(
                conditions.and_then(|c| c.ready),
                conditions.and_then(|c| c.serving),
                conditions.and_then(|c| c.terminating),
            );
            // Every address of an endpoint is the same backend; the first one is used.
            let address = endpoint.addresses.first()?.parse::<IpAddr>().ok()?;
            let workload = endpoint
                .target_ref
                .as_ref()
                .filter(|target| target.kind.as_deref() == Some("Pod"))
                .and_then(|target| {
                    Some(ObjectKey::new(
                        target.namespace.as_deref().unwrap_or(&service.namespace),
                        target.name.as_deref()?,
                    ))
                });
            Some(EndpointAddress {
                address,
                zone: endpoint.zone.clone(),
                health,
                workload,
            })
        })
        .collect();
    Some(EndpointSet {
        service,
        ports,
        endpoints,
    })
}

/// A Pod as a workload: its IP, service account and the app's declared TCP ports (native
/// sidecars' too, but not Remora's own containers').
pub fn workload_model(pod: &Pod) -> Workload {
    let spec = pod.spec.as_ref();
    let containers = spec
        .into_iter()
        .flat_map(|spec| spec.containers.iter())
        .chain(
            spec.into_iter()
                .flat_map(|spec| spec.init_containers.iter().flatten())
                .filter(|container| container.restart_policy.as_deref() == Some("Always")),
        )
        .filter(|container| !SIDECAR_CONTAINERS.contains(&container.name.as_str()));
    let ports = containers
        .flat_map(|container| container.ports.iter().flatten())
        .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|port| {
            Some((
                port.name.clone().unwrap_or_default(),
                u16::try_from(port.container_port).ok()?,
            ))
        })
        .collect();
    Workload {
        key: key_of(pod),
        ip: pod
            .status
            .as_ref()
            .and_then(|status| status.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        service_account: spec
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_else(|| "default".to_string()),
        labels: pod.labels().clone(),
        ports,
    }
}

fn pod_update(pod: &Pod, present: bool) -> Vec<MeshUpdate> {
    let model = present.then(|| workload_model(pod));
    vec![MeshUpdate::Workload(Source::Kubernetes, key_of(pod), model)]
}

fn policy_update(policy: &TrafficPolicy, present: bool) -> Vec<MeshUpdate> {
    let key = key_of(policy);
    let model = present.then(|| PolicyObject {
        key: key.clone(),
        generation: policy.metadata.generation.unwrap_or_default(),
        spec: policy.spec.clone(),
    });
    vec![MeshUpdate::Policy(Source::Kubernetes, key, model)]
}

/// How one kind's objects become updates; `false` = the object is gone.
type Convert<K> = fn(&K, bool) -> Vec<MeshUpdate>;

/// Watches one kind into a reflector store, feeding the hub; calls `listed` after the first
/// complete list.
async fn follow<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    reader: Store<K>,
    convert: Convert<K>,
    hub: Arc<MeshHub>,
    listed: tokio::sync::mpsc::Sender<()>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(slim)
        .reflect(writer);
    futures::pin_mut!(stream);
    // What this source has told the hub, by key, so a re-list can remove what went away.
    let mut known: BTreeMap<ObjectKey, K> = BTreeMap::new();
    let mut first_list = true;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                hub.update(convert(&object, true));
                known.insert(key_of(&object), object);
            }
            Ok(watcher::Event::Delete(object)) => {
                hub.update(convert(&object, false));
                known.remove(&key_of(&object));
            }
            Ok(watcher::Event::Init) => {}
            Ok(watcher::Event::InitDone) => {
                let present: BTreeSet<ObjectKey> = reader
                    .state()
                    .iter()
                    .map(|object| key_of(object.as_ref()))
                    .collect();
                let gone: Vec<ObjectKey> = known
                    .keys()
                    .filter(|key| !present.contains(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    if let Some(object) = known.remove(&key) {
                        hub.update(convert(&object, false));
                    }
                }
                if first_list {
                    first_list = false;
                    let _ = listed.send(()).await;
                }
            }
            Err(error) => {
                // A kind the API server does not serve (the TrafficPolicy CRD not installed)
                // counts as listed and empty, so the rest of the mesh is served; the watcher
                // keeps trying and picks it up once installed.
                let not_served = matches!(
                    &error,
                    watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404
                );
                if not_served && first_list {
                    tracing::warn!(kind = %K::kind(&()), "the API server does not serve this kind (for TrafficPolicy: install the CRD, `remora-cp manifests | kubectl apply -f -`); going on without it");
                    first_list = false;
                    let _ = listed.send(()).await;
                } else {
                    tracing::warn!(kind = %K::kind(&()), %error, "Kubernetes watch failed; retrying");
                }
            }
        }
    }
}

/// Runs the source until the process ends.
pub async fn run(client: Client, hub: Arc<MeshHub>, registry: Arc<ProxyRegistry>) {
    let (listed, mut done) = tokio::sync::mpsc::channel(8);
    let (namespaces, namespace_writer) = reflector::store();
    let (services, service_writer) = reflector::store();
    let (slices, slice_writer) = reflector::store();
    let (pods, pod_writer) = reflector::store();
    let (policies, policy_writer) = reflector::store::<TrafficPolicy>();
    tokio::spawn(follow::<Namespace>(
        Api::all(client.clone()),
        namespace_writer,
        namespaces,
        namespace_update,
        hub.clone(),
        listed.clone(),
    ));
    tokio::spawn(follow::<KubeService>(
        Api::all(client.clone()),
        service_writer,
        services,
        service_update,
        hub.clone(),
        listed.clone(),
    ));
    tokio::spawn(follow::<EndpointSlice>(
        Api::all(client.clone()),
        slice_writer,
        slices,
        slice_update,
        hub.clone(),
        listed.clone(),
    ));
    tokio::spawn(follow::<Pod>(
        Api::all(client.clone()),
        pod_writer,
        pods,
        pod_update,
        hub.clone(),
        listed.clone(),
    ));
    tokio::spawn(follow::<TrafficPolicy>(
        Api::all(client.clone()),
        policy_writer,
        policies.clone(),
        policy_update,
        hub.clone(),
        listed,
    ));
    for _ in 0..5 {
        if done.recv().await.is_none() {
            return;
        }
    }
    tracing::info!("Kubernetes source listed every kind");
    hub.source_synced();
    write_statuses(client, hub, registry, policies).await;
}

fn slice_update(slice: &EndpointSlice, present: bool) -> Vec<MeshUpdate> {
    let Some(service) = slice_service(slice) else {
        return Vec::new();
    };
    let set = if present { endpoint_set(slice) } else { None };
    vec![MeshUpdate::Endpoints(
        Source::Kubernetes,
        service,
        slice.name_any(),
        set,
    )]
}

/// Keeps every TrafficPolicy's status up to date.
async fn write_statuses(
    client: Client,
    hub: Arc<MeshHub>,
    registry: Arc<ProxyRegistry>,
    policies: Store<TrafficPolicy>,
) {
    let mut ticker = tokio::time::interval(STATUS_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let stored = policies.state();
        let keys: Vec<ObjectKey> = stored
            .iter()
            .map(|policy| key_of(policy.as_ref()))
            .collect();
        let statuses = hub.policy_statuses(&keys, &registry);
        for policy in stored {
            let key = key_of(policy.as_ref());
            let Some(status) = statuses.get(&key) else {
                continue;
            };
            if policy.status.as_ref() == Some(status) {
                continue;
            }
            let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), &key.namespace);
            // A merge patch keeps fields it does not name: name the empty ones as null.
            let mut fields = serde_json::to_value(status).unwrap_or_default();
            if let Some(object) = fields.as_object_mut() {
                for field in [
                    "observedGeneration",
                    "conditions",
                    "configVersion",
                    "proxies",
                    "ackedProxies",
                    "nackedProxies",
                ] {
                    object.entry(field).or_insert(serde_json::Value::Null);
                }
            }
            let patch = serde_json::json!({"status": fields});
            if let Err(error) = api
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(policy = %key, %error, "cannot write TrafficPolicy status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_slices_give_health_by_conditions_and_the_pod_behind() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "b-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "b"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["198.18.0.5"], "conditions": {"ready": true}, "zone": "z1", "targetRef": {"kind": "Pod", "name": "b-1", "namespace": "shop"}},
                {"addresses": ["198.18.0.6"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["198.18.0.7"], "conditions": {"ready": false, "serving": false, "terminating": false}}
            ]
        }))
        .expect("a slice");
        let set = endpoint_set(&slice).expect("a set");
        assert_eq!(set.service, ObjectKey::new("shop", "b"));
        assert_eq!(set.ports, BTreeMap::from([("http".to_string(), 8080)]));
        assert_eq!(set.endpoints.len(), 3);
        assert_eq!(set.endpoints[2].health, EndpointHealth::Unready);
        assert_eq!(set.endpoints[0].health, EndpointHealth::Healthy);
        assert_eq!(set.endpoints[0].zone.as_deref(), Some("z1"));
        assert_eq!(
            set.endpoints[0].workload,
            Some(ObjectKey::new("shop", "b-1"))
        );
        assert_eq!(set.endpoints[1].health, EndpointHealth::Draining);
    }

    #[test]
    fn services_and_pods_become_model_objects() {
        let service: KubeService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "b", "namespace": "shop"},
            "spec": {"clusterIP": "198.19.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "grpc", "port": 9090, "appProtocol": "kubernetes.io/h2c"},
                {"name": "dns", "port": 53, "protocol": "UDP"}
            ]}
        }))
        .expect("a service");
        let model = service_model(&service).expect("modelled");
        assert_eq!(model.vip, Some("198.19.0.10".parse().unwrap()));
        assert_eq!(model.ports[0].target_port, Some(TargetPort::Number(8080)));
        assert_eq!(model.ports[1].target_port, Some(TargetPort::Number(9090)));
        assert_eq!(
            model
                .ports
                .iter()
                .map(|p| (p.port, p.protocol))
                .collect::<Vec<_>>(),
            [(80, Protocol::Http), (9090, Protocol::Http2)]
        );
        let headless: KubeService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
        }))
        .expect("a service");
        assert_eq!(service_model(&headless).expect("modelled").vip, None);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "b-1", "namespace": "shop"},
            "spec": {
                "serviceAccountName": "b",
                "initContainers": [
                    {"name": "remora-proxy", "restartPolicy": "Always", "ports": [{"containerPort": 15090}]},
                    {"name": "log-shipper", "restartPolicy": "Always", "ports": [{"name": "metrics", "containerPort": 9100}]}
                ],
                "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]
            },
            "status": {"podIP": "198.18.0.5"}
        }))
        .expect("a pod");
        let workload = workload_model(&pod);
        assert_eq!(workload.ip, Some("198.18.0.5".parse().unwrap()));
        assert_eq!(workload.service_account, "b");
        assert_eq!(
            workload.ports,
            [("http".to_string(), 8080), ("metrics".to_string(), 9100)]
        );
    }
}
