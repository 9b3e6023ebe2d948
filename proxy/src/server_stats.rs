//! The server's own gauges, under Envoy's names: `server.uptime`, `server.concurrency`,
//! `server.memory_allocated|memory_heap_size|memory_physical_size`,
//! `server.total_connections`, `server.parent_connections`,
//! `server.days_until_first_cert_expiring`, and the `server.initialization_time_ms`
//! histogram; and the cluster and listener managers' counts of what is active, warming and
//! draining (`cluster_manager.active_clusters|warming_clusters`,
//! `listener_manager.total_listeners_active|warming|draining`). Envoy refreshes them at each
//! stats flush; so does Remora (every `stats_flush_interval`, 5 s by default, or with
//! `stats_flush_on_admin` at each read), and also whenever the admin reads the stats, so a
//! scrape never shows figures older than its own read. Once a certificate is found, the
//! certificates are read at most once a minute: the figure counts days.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lifecycle::Lifecycle;
use crate::listener::ListenerManager;
use crate::stats::{Registry, Stat};
use crate::store::Store;
use crate::tls::{ContextCertificates, PeerCertificate, Secrets};

/// `days_until_first_cert_expiring` with no certificate loaded, as Envoy shows it.
const NO_CERTIFICATE: u64 = u32::MAX as u64;

/// How long a reading of the certificates' expiry stands. It counts whole days, and walking
/// every TLS context (a thousand clusters' in a mesh, and the files of inline sources) at
/// each stats read would cost more than the figure is worth.
const CERTIFICATES_READ_EVERY: Duration = Duration::from_secs(60);

/// What the gauges are read from.
#[derive(Debug)]
pub struct Sources {
    pub lifecycle: Arc<Lifecycle>,
    pub listeners: Arc<ListenerManager>,
    pub store: Arc<Store>,
    pub secrets: Arc<Secrets>,
    pub xds: Arc<crate::xds::Status>,
}

/// The gauges, and what they are read from.
#[derive(Debug)]
pub struct ServerStats {
    sources: Sources,
    uptime: Arc<Stat>,
    memory_allocated: Arc<Stat>,
    memory_heap_size: Arc<Stat>,
    memory_physical_size: Arc<Stat>,
    total_connections: Arc<Stat>,
    days_until_first_cert_expiring: Arc<Stat>,
    active_clusters: Arc<Stat>,
    warming_clusters: Arc<Stat>,
    listeners_active: Arc<Stat>,
    listeners_warming: Arc<Stat>,
    listeners_draining: Arc<Stat>,
    /// When the certificates were last read.
    certificates_read: Mutex<Option<Instant>>,
}

impl ServerStats {
    /// Registers the gauges (filled at once) and, on the current runtime, refreshes them every
    /// `interval` (with none, only when the admin reads the stats).
    pub fn start(
        registry: &Registry,
        concurrency: usize,
        sources: Sources,
        interval: Option<Duration>,
    ) -> Arc<ServerStats> {
        registry.gauge("server.concurrency").set(concurrency as u64);
        // Remora has no hot restart: no parent, and never a connection of one.
        registry.gauge("server.parent_connections").set(0);
        let stats = Arc::new(ServerStats {
            sources,
            uptime: registry.gauge("server.uptime"),
            memory_allocated: registry.gauge("server.memory_allocated"),
            memory_heap_size: registry.gauge("server.memory_heap_size"),
            memory_physical_size: registry.gauge("server.memory_physical_size"),
            total_connections: registry.gauge("server.total_connections"),
            days_until_first_cert_expiring: registry.gauge("server.days_until_first_cert_expiring"),
            active_clusters: registry.gauge("cluster_manager.active_clusters"),
            warming_clusters: registry.gauge("cluster_manager.warming_clusters"),
            listeners_active: registry.gauge("listener_manager.total_listeners_active"),
            listeners_warming: registry.gauge("listener_manager.total_listeners_warming"),
            listeners_draining: registry.gauge("listener_manager.total_listeners_draining"),
            certificates_read: Mutex::new(None),
        });
        stats.refresh();
        let Some(interval) = interval else {
            return stats;
        };
        let refreshed = Arc::downgrade(&stats);
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(interval);
            timer.tick().await;
            loop {
                timer.tick().await;
                let Some(stats) = refreshed.upgrade() else {
                    return;
                };
                stats.refresh();
            }
        });
        stats
    }

    /// Reads every figure again.
    pub fn refresh(&self) {
        self.uptime
            .set(self.sources.lifecycle.started.elapsed().as_secs());
        let memory = crate::memory::usage();
        self.memory_allocated.set(memory.allocated);
        self.memory_heap_size.set(memory.heap_size);
        self.memory_physical_size.set(memory.physical);
        self.total_connections
            .set(self.sources.listeners.open_connections());
        self.active_clusters
            .set(self.sources.store.load().clusters.len() as u64);
        let xds = self.sources.xds.snapshot();
        self.warming_clusters.set(xds.warming_clusters.len() as u64);
        self.listeners_warming.set(xds.warming_listeners as u64);
        self.listeners_active
            .set(self.sources.listeners.list().len() as u64);
        self.listeners_draining
            .set(self.sources.listeners.draining_count() as u64);
        {
            let mut read = self
                .certificates_read
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Until a certificate is seen (secrets and listeners may come after the first
            // reading), every refresh looks again.
            let found = self.days_until_first_cert_expiring.get() != NO_CERTIFICATE;
            if found && read.is_some_and(|at| at.elapsed() < CERTIFICATES_READ_EVERY) {
                return;
            }
            *read = Some(Instant::now());
        }
        self.days_until_first_cert_expiring
            .set(self.days_until_first_expiry());
    }

    /// Over every TLS context's certificates, each parsed once however many contexts share it
    /// (in a mesh, one workload certificate serves every cluster).
    fn days_until_first_expiry(&self) -> u64 {
        let contexts = tls_contexts(
            &self.sources.listeners,
            &self.sources.store,
            &self.sources.secrets,
        );
        let unique: HashSet<&[u8]> = contexts
            .iter()
            .flat_map(|context| context.ca.iter().chain(&context.chain))
            .map(|(_, der)| der.as_ref())
            .collect();
        let now = jiff::Timestamp::now().as_second();
        unique
            .into_iter()
            .filter_map(PeerCertificate::parse)
            .map(|certificate| days_until(certificate.validity().1, now))
            .min()
            .unwrap_or(NO_CERTIFICATE)
    }
}

/// Whole days from `now` until `end` (seconds since the epoch), none once it has passed.
pub fn days_until(end: i64, now: i64) -> u64 {
    ((end - now).max(0) / 86_400) as u64
}

/// Every TLS context's certificates: the TLS-terminating filter chains of the listeners (by
/// name), then the TLS-originating clusters (by name), as `/certs` lists them.
pub fn tls_contexts(
    listeners: &ListenerManager,
    store: &Store,
    secrets: &Secrets,
) -> Vec<ContextCertificates> {
    let mut contexts = Vec::new();
    let mut active = listeners.list();
    active.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    for listener in &active {
        for chain in listener.config.chains() {
            if let Some(tls) = &chain.tls {
                contexts.push(crate::tls::context_certificates(&tls.common, secrets));
            }
        }
    }
    let snapshot = store.load();
    let mut clusters: Vec<_> = snapshot.clusters.values().collect();
    clusters.sort_by(|a, b| a.name().cmp(b.name()));
    for cluster in clusters {
        if let Some(tls) = &cluster.config.connect.tls {
            contexts.push(crate::tls::context_certificates(&tls.common, secrets));
        }
    }
    contexts
}

#[cfg(test)]
mod tests {
    use super::days_until;

    #[test]
    fn days_are_whole_and_never_below_zero() {
        assert_eq!(days_until(10 * 86_400 + 5, 0), 10);
        assert_eq!(days_until(86_399, 0), 0);
        assert_eq!(days_until(0, 100), 0);
    }
}
