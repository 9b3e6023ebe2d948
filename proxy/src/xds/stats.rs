//! The xDS client's stats under Envoy's names, so that the dashboards and alerts platform teams
//! built on Envoy (a NACK is `update_rejected`, a lost control plane `connected_state` 0) read
//! Remora the same way:
//! - each subscription's updates: `cluster_manager.cds.*`, `listener_manager.lds.*`,
//!   `http.PREFIX.rds.ROUTE.*` (the prefix of the first connection manager that asked for the
//!   route table), and an EDS cluster's own `cluster.NAME.*`;
//! - the stream: `control_plane.connected_state`, `pending_requests`, `rate_limit_enforced`
//!   (Remora neither queues nor rate-limits its requests: both stay 0).
//!
//! Counted as Envoy 1.40 counts them (observed side by side in `tests/xds.rs`):
//! `update_attempt` is one when the subscription starts and one more at each response,
//! stream failure or initial fetch timeout; a response is an `update_success` or an
//! `update_rejected` (a NACK); a stream that fails or closes is an `update_failure` of every
//! subscription; `version` is the xxHash64 of the version string and `update_time` the time of
//! the last accepted update (ms since the Unix epoch); `config_reload` counts the accepted
//! updates that added or changed a resource, not those that only removed one (over delta xDS a
//! NACK counts two attempts, as in Envoy). An EDS or RDS subscription counts the responses
//! that carry its resource.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::stats::{ClusterStats, Registry, Stat};

/// Milliseconds since the Unix epoch, as Envoy's `update_time` gauges hold them.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The gauge value of a version string.
pub fn version_hash(version: &str) -> u64 {
    xxhash_rust::xxh64::xxh64(version.as_bytes(), 0)
}

/// Where a subscription's attempt, success, failure and version live: its own stats, or the
/// EDS cluster's block, which has them under the same names for every cluster.
enum Counters {
    Own {
        attempt: Arc<Stat>,
        success: Arc<Stat>,
        failure: Arc<Stat>,
        version: Arc<Stat>,
    },
    Cluster(Arc<ClusterStats>),
}

/// One subscription's stats.
pub struct Subscription {
    counters: Counters,
    rejected: Arc<Stat>,
    init_fetch_timeout: Arc<Stat>,
    update_time: Arc<Stat>,
    /// `config_reload` and `config_reload_time_ms` (CDS and RDS only, as in Envoy).
    reload: Option<(Arc<Stat>, Arc<Stat>)>,
}

impl Subscription {
    /// The stats under `prefix`, counting the start as the first attempt.
    fn own(registry: &Registry, prefix: &str, reloads: bool) -> Self {
        let counter = |name: &str| registry.counter(format!("{prefix}.{name}"));
        let gauge = |name: &str| registry.gauge(format!("{prefix}.{name}"));
        let subscription = Subscription {
            counters: Counters::Own {
                attempt: counter("update_attempt"),
                success: counter("update_success"),
                failure: counter("update_failure"),
                version: gauge("version"),
            },
            rejected: counter("update_rejected"),
            init_fetch_timeout: counter("init_fetch_timeout"),
            update_time: gauge("update_time"),
            reload: reloads.then(|| (counter("config_reload"), gauge("config_reload_time_ms"))),
        };
        subscription.attempt().inc();
        subscription
    }

    /// The EDS subscription of the cluster whose stats are `block`, under `cluster.NAME`.
    pub fn endpoints(registry: &Registry, cluster: &str, block: Arc<ClusterStats>) -> Self {
        let prefix = format!("cluster.{}", crate::stats::stat_name(cluster));
        let subscription = Subscription {
            counters: Counters::Cluster(block),
            rejected: registry.counter(format!("{prefix}.update_rejected")),
            init_fetch_timeout: registry.counter(format!("{prefix}.init_fetch_timeout")),
            update_time: registry.gauge(format!("{prefix}.update_time")),
            reload: None,
        };
        subscription.attempt().inc();
        subscription
    }

    fn attempt(&self) -> &Stat {
        match &self.counters {
            Counters::Own { attempt, .. } => attempt,
            Counters::Cluster(block) => &block.update_attempt,
        }
    }

    /// An accepted update of `version`; `changed`: it changed the config.
    pub fn accepted(&self, version: &str, changed: bool) {
        let (success, version_gauge) = match &self.counters {
            Counters::Own {
                success, version, ..
            } => (&**success, &**version),
            Counters::Cluster(block) => (&block.update_success, &block.version),
        };
        self.attempt().inc();
        success.inc();
        version_gauge.set(version_hash(version));
        let now = now_ms();
        self.update_time.set(now);
        if changed && let Some((reloads, at)) = &self.reload {
            reloads.inc();
            at.set(now);
        }
    }

    /// A NACKed update. Over delta xDS Envoy counts it as two attempts (one as the update
    /// arrives, one as it fails); so does Remora, for the same figures.
    pub fn rejected(&self, delta: bool) {
        self.attempt().inc();
        if delta {
            self.attempt().inc();
        }
        self.rejected.inc();
    }

    /// The stream failed or closed.
    pub fn failed(&self) {
        self.attempt().inc();
        match &self.counters {
            Counters::Own { failure, .. } => failure.inc(),
            Counters::Cluster(block) => block.update_failure.inc(),
        }
    }

    /// The first response did not come within `initial_fetch_timeout`.
    pub fn timed_out(&self) {
        self.attempt().inc();
        self.init_fetch_timeout.inc();
    }
}

/// The xDS client's stats.
pub struct XdsStats {
    registry: Arc<Registry>,
    /// The stream is delta xDS.
    pub delta: bool,
    pub cds: Option<Subscription>,
    pub lds: Option<Subscription>,
    /// By route table name.
    pub routes: BTreeMap<String, Subscription>,
    /// By cluster name: the EDS clusters' subscriptions.
    pub endpoints: BTreeMap<String, Subscription>,
    connected: Arc<Stat>,
}

impl XdsStats {
    pub fn new(registry: &Arc<Registry>, delta: bool, cds: bool, lds: bool) -> Self {
        // Remora sends each request at once, unqueued and not rate-limited.
        registry.gauge("control_plane.pending_requests");
        registry.counter("control_plane.rate_limit_enforced");
        XdsStats {
            registry: registry.clone(),
            delta,
            cds: cds.then(|| Subscription::own(registry, "cluster_manager.cds", true)),
            lds: lds.then(|| Subscription::own(registry, "listener_manager.lds", false)),
            routes: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            connected: registry.gauge("control_plane.connected_state"),
        }
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.set(u64::from(connected));
    }

    /// Starts the subscription of route table `name`, asked for by the connection manager with
    /// `stat_prefix`; a table already subscribed keeps its stats.
    pub fn subscribe_routes(&mut self, name: &str, stat_prefix: &str) {
        if !self.routes.contains_key(name) {
            let prefix = format!("http.{stat_prefix}.rds.{name}");
            // Envoy's count of responses without the table; Remora counts only responses
            // that carry it, so this stays 0.
            self.registry.counter(format!("{prefix}.update_empty"));
            let subscription = Subscription::own(&self.registry, &prefix, true);
            self.routes.insert(name.to_string(), subscription);
        }
    }

    /// Starts the EDS subscription of a cluster made (or remade) from CDS, as each of Envoy's
    /// EDS clusters starts its own.
    pub fn subscribe_endpoints(&mut self, cluster: &str, block: Arc<ClusterStats>) {
        let subscription = Subscription::endpoints(&self.registry, cluster, block);
        self.endpoints.insert(cluster.to_string(), subscription);
    }

    /// The subscription of a wildcard type (CDS or LDS), if the bootstrap asks for it.
    pub fn wildcard(&self, type_url: &str) -> Option<&Subscription> {
        match type_url {
            super::CDS => self.cds.as_ref(),
            _ => self.lds.as_ref(),
        }
    }

    /// Every subscription, for a stream that failed.
    pub fn all(&self) -> impl Iterator<Item = &Subscription> {
        self.cds
            .iter()
            .chain(self.lds.iter())
            .chain(self.routes.values())
            .chain(self.endpoints.values())
    }
}
