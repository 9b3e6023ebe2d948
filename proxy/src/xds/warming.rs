//! Warming: a new EDS cluster waits for its endpoints, a new listener for its route
//! configurations, each until `initial_fetch_timeout`; a cluster with active health checks
//! then waits for its hosts' first checks. Entries are keyed by resource name and
//! the digest of the config they came from, so a deadline set for one version never acts on
//! the next.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Listener;
use crate::upstream::Cluster;

/// Something the client loop must act on later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deadline {
    /// The initial fetch of a type timed out.
    InitialFetch(&'static str),
    /// A warming cluster's endpoints did not arrive in time.
    Cluster { name: String, digest: u64 },
    /// A warming listener's routes did not arrive in time.
    Listener { name: String, digest: u64 },
    /// A warming cluster's hosts all had their first active health check.
    ClusterChecked { name: String, digest: u64 },
    /// A secret arrived other than over ADS (a signed certificate request).
    SecretChanged,
}

/// What is warming, by name.
#[derive(Debug)]
pub struct Warming {
    clusters: BTreeMap<String, (u64, Arc<Cluster>)>,
    listeners: BTreeMap<String, (u64, Arc<Listener>)>,
    deadlines: mpsc::UnboundedSender<Deadline>,
}

impl Warming {
    pub fn new(deadlines: mpsc::UnboundedSender<Deadline>) -> Self {
        Warming {
            clusters: BTreeMap::new(),
            listeners: BTreeMap::new(),
            deadlines,
        }
    }

    /// A handle for telling the client loop about changes from elsewhere.
    pub fn sender(&self) -> mpsc::UnboundedSender<Deadline> {
        self.deadlines.clone()
    }

    /// Sends `deadline` back to the client loop after `after` (zero: never, as Envoy's
    /// `initial_fetch_timeout: 0s` waits forever).
    pub fn schedule(&self, after: Duration, deadline: Deadline) {
        if after.is_zero() {
            return;
        }
        let deadlines = self.deadlines.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = deadlines.send(deadline);
        });
    }

    pub fn add_cluster(&mut self, cluster: Arc<Cluster>, timeout: Duration) {
        let name = cluster.name().to_string();
        let digest = cluster.config.raw.digest();
        self.schedule(
            timeout,
            Deadline::Cluster {
                name: name.clone(),
                digest,
            },
        );
        self.clusters.insert(name, (digest, cluster));
    }

    /// Keeps `cluster` warming until every host had its first active health check, as
    /// Envoy initializes a cluster (each check is bounded by its timeout).
    pub fn add_checked_cluster(&mut self, cluster: Arc<Cluster>) {
        let name = cluster.name().to_string();
        let digest = cluster.config.raw.digest();
        let deadlines = self.deadlines.clone();
        let waiting = cluster.clone();
        let deadline = Deadline::ClusterChecked {
            name: name.clone(),
            digest,
        };
        tokio::spawn(async move {
            waiting.members.health_ready().await;
            let _ = deadlines.send(deadline);
        });
        self.clusters.insert(name, (digest, cluster));
    }

    pub fn add_listener(&mut self, listener: Arc<Listener>, timeout: Duration) {
        let name = listener.name.clone();
        let digest = listener.raw.digest();
        self.schedule(
            timeout,
            Deadline::Listener {
                name: name.clone(),
                digest,
            },
        );
        self.listeners.insert(name, (digest, listener));
    }

    pub fn remove_cluster(&mut self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters.remove(name).map(|(_, cluster)| cluster)
    }

    pub fn remove_listener(&mut self, name: &str) -> Option<Arc<Listener>> {
        self.listeners.remove(name).map(|(_, listener)| listener)
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name).map(|(_, cluster)| cluster)
    }

    /// The warming cluster a deadline was set for, if it is still that version.
    pub fn expired_cluster(&mut self, name: &str, digest: u64) -> Option<Arc<Cluster>> {
        match self.clusters.get(name) {
            Some((current, _)) if *current == digest => self.remove_cluster(name),
            _ => None,
        }
    }

    pub fn expired_listener(&mut self, name: &str, digest: u64) -> Option<Arc<Listener>> {
        match self.listeners.get(name) {
            Some((current, _)) if *current == digest => self.remove_listener(name),
            _ => None,
        }
    }

    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values().map(|(_, cluster)| cluster)
    }

    pub fn listeners(&self) -> impl Iterator<Item = &Arc<Listener>> {
        self.listeners.values().map(|(_, listener)| listener)
    }

    /// The warming listeners whose routes are all known now (they leave warming).
    pub fn ready_listeners(
        &mut self,
        has_routes: impl Fn(&Listener) -> bool,
    ) -> Vec<Arc<Listener>> {
        let ready: Vec<String> = self
            .listeners
            .iter()
            .filter(|(_, (_, listener))| has_routes(listener))
            .map(|(name, _)| name.clone())
            .collect();
        ready
            .iter()
            .filter_map(|name| self.remove_listener(name))
            .collect()
    }

    /// The warming clusters fed by EDS resource `service` (they leave warming).
    pub fn clusters_for(&mut self, service: &str) -> Vec<Arc<Cluster>> {
        let ready: Vec<String> = self
            .clusters
            .iter()
            .filter(|(_, (_, cluster))| {
                matches!(&cluster.config.discovery, crate::config::DiscoveryType::Eds { service_name, .. } if service_name == service)
            })
            .map(|(name, _)| name.clone())
            .collect();
        ready
            .iter()
            .filter_map(|name| self.remove_cluster(name))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty() && self.listeners.is_empty()
    }
}
