//! The trust bundle where injected sidecars can read it: with the Kubernetes source, the mesh
//! CA's root goes into ConfigMap `remora-ca-root-cert` (key `root-cert.pem`) in every
//! namespace labelled for injection (`remora-injection=enabled`, the injector webhook's
//! namespace selector), so a sidecar verifies the xDS server (`REMORA_XDS_CA`) before it has
//! talked to it. Written by server-side apply as field manager `remora-cp`: a namespace
//! labelled later gets it at once, and every minute each labelled namespace's copy is applied
//! again, which restores one deleted or edited by hand.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

/// The ConfigMap holding the trust bundle in each injected namespace.
pub const CONFIGMAP_NAME: &str = "remora-ca-root-cert";
/// Its key: the root certificate(s), PEM.
pub const CONFIGMAP_KEY: &str = "root-cert.pem";
/// Namespaces whose pods are injected (the injector's namespace label).
pub const INJECTION_SELECTOR: &str = "remora-injection=enabled";
/// How often every copy is applied again.
const RESYNC: Duration = Duration::from_secs(60);
/// The API permissions this needs (on top of the Kubernetes source's, which lists and
/// watches namespaces): server-side apply creates a missing ConfigMap.
pub const ACCESS: &[(&str, &str, &[&str])] = &[("", "configmaps", &["create", "patch"])];

/// The ConfigMap for `bundle_pem`.
pub fn configmap(bundle_pem: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIGMAP_NAME,
            "labels": {"app.kubernetes.io/managed-by": "remora-cp"}
        },
        "data": {CONFIGMAP_KEY: bundle_pem}
    })
}

/// Keeps the bundle in every labelled namespace until the process ends.
pub async fn publish(client: Client, bundle_pem: String) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut events = watcher(
        namespaces,
        watcher::Config::default().labels(INJECTION_SELECTOR),
    )
    .default_backoff()
    .boxed();
    let manifest = configmap(&bundle_pem);
    let mut labelled = BTreeSet::new();
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(namespace) | watcher::Event::InitApply(namespace))) => {
                    let name = namespace.name_any();
                    if labelled.insert(name.clone()) {
                        apply(&client, &name, &manifest).await;
                    }
                }
                Some(Ok(watcher::Event::Delete(namespace))) => {
                    labelled.remove(&namespace.name_any());
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                Some(Err(error)) => {
                    tracing::warn!(%error, "watching namespaces for the trust bundle failed; retrying");
                }
                None => return,
            },
            _ = resync.tick() => {
                for name in &labelled {
                    apply(&client, name, &manifest).await;
                }
            }
        }
    }
}

/// Applies the ConfigMap in `namespace`; failures are logged (the next resync retries).
async fn apply(client: &Client, namespace: &str, manifest: &serde_json::Value) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply("remora-cp").force();
    match configmaps
        .patch(CONFIGMAP_NAME, &params, &Patch::Apply(manifest))
        .await
    {
        Ok(_) => tracing::debug!(%namespace, "trust bundle ConfigMap applied"),
        Err(error) => tracing::warn!(
            %namespace,
            %error,
            "cannot apply ConfigMap {CONFIGMAP_NAME} (the control plane needs create and patch on configmaps)"
        ),
    }
}
