//! A cluster at run time: its config, stats, members (hosts by priority, with state kept by
//! address) and connection pools. A CDS update builds a new [`Cluster`] that takes over the
//! old one's members (unless where hosts come from changed) and its pools (unless how
//! connections are made changed), so hosts keep their stats, health and connections.
//!
//! STATIC clusters take their endpoints from config, EDS clusters from EDS resources,
//! STRICT_DNS and LOGICAL_DNS resolve in the background (per `dns_lookup_family`),
//! ORIGINAL_DST uses the downstream connection's original destination.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::breakers::{Breakers, ConnectionReadings};
use super::connect::Connector;
use super::health::active::{Checker, Target, Transition};
use super::health::outlier::{Detector, OutlierReporter};
use super::health::{Event, OutlierSetup, Watched};
use super::host::{Host, HostState};
use super::lb::{LbContext, LoadBalancer};
use super::outcome::Outcome;
use super::pool::Pools;
use super::priority::{PrioritySet, Settings};
use crate::config::{
    self, ConfigResult, DiscoveryType, EndpointAddress, HealthStatus, LbEndpoint, LoadAssignment,
};
use crate::stats::{ClusterStats, HealthCheckStats, OutlierStats, Registry};

/// A cluster's hosts: their state by address and the current priority set, with the health
/// machinery that moves their flags. Shared by the cluster objects that follow one another
/// through CDS updates.
#[derive(Debug)]
pub struct Members {
    me: Weak<Members>,
    stats: Arc<ClusterStats>,
    /// State by address, for the hosts of the current endpoints.
    states: Mutex<HashMap<SocketAddr, Arc<HostState>>>,
    /// The endpoints hosts are made from, kept to rebuild the set when health changes.
    endpoints: Mutex<Vec<(SocketAddr, LbEndpoint)>>,
    /// Hosts discovery removed that stay while their health checks pass (Envoy's
    /// `PENDING_DYNAMIC_REMOVAL`).
    lingering: Mutex<Vec<(SocketAddr, LbEndpoint)>>,
    set: ArcSwap<PrioritySet>,
    policy: Mutex<(Arc<dyn LoadBalancer>, Settings)>,
    initialized: AtomicBool,
    init: Notify,
    health: Mutex<HealthControl>,
    /// Where the request path reports to the health task. Made, with the task, only for a
    /// cluster that needs one (outlier detection, or an immediate health-check failure):
    /// most clusters have neither, and a channel and a task each cost about 1.5 KB.
    events: OnceLock<UnboundedSender<Event>>,
    /// Woken when a host's health check completes (for the first-check wait).
    checked: Notify,
}

/// Active checking and outlier detection of one cluster (main runtime only).
#[derive(Debug, Default)]
struct HealthControl {
    checker: Option<Arc<Checker>>,
    /// Shared, so an interval's work clones a pointer, and most clusters' members hold 8 bytes.
    outlier: Option<Arc<OutlierSetup>>,
    ignore_new_hosts: bool,
    ignore_health_on_removal: bool,
    /// One checker session per host address, with where it probes.
    sessions: HashMap<SocketAddr, (Target, tokio::task::AbortHandle)>,
    /// The main runtime, once the cluster's background work started.
    runtime: Option<tokio::runtime::Handle>,
    /// The health task's end of the events channel, until the task starts.
    events: Option<UnboundedReceiver<Event>>,
    supervisor: Option<tokio::task::AbortHandle>,
}

/// How a cluster config wants its hosts' health watched.
#[derive(Debug, Default)]
pub struct HealthSettings {
    pub checker: Option<Arc<Checker>>,
    pub outlier: Option<Arc<OutlierSetup>>,
    pub ignore_new_hosts: bool,
    pub ignore_health_on_removal: bool,
}

impl Drop for Members {
    fn drop(&mut self) {
        let control = self.health.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, (_, task)) in control.sessions.drain() {
            task.abort();
        }
        if let Some(task) = control.supervisor.take() {
            task.abort();
        }
    }
}

fn eds_failed(health: HealthStatus) -> bool {
    matches!(
        health,
        HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout
    )
}

impl Members {
    fn new(
        stats: Arc<ClusterStats>,
        policy: Arc<dyn LoadBalancer>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Members {
            me: me.clone(),
            stats,
            states: Mutex::default(),
            endpoints: Mutex::default(),
            lingering: Mutex::default(),
            set: ArcSwap::default(),
            policy: Mutex::new((policy, settings)),
            initialized: AtomicBool::new(false),
            init: Notify::new(),
            health: Mutex::default(),
            events: OnceLock::new(),
            checked: Notify::new(),
        })
    }

    /// The current hosts, by priority.
    pub fn set(&self) -> arc_swap::Guard<Arc<PrioritySet>> {
        self.set.load()
    }

    /// Replaces the endpoints (an EDS update, a DNS answer or a new static config) and marks
    /// the cluster warm. A host whose address stays keeps its state. With active health
    /// checks, a removed host whose checks pass stays until they fail, as in Envoy (unless
    /// `ignore_health_on_host_removal`).
    pub fn set_endpoints(&self, endpoints: Vec<(SocketAddr, LbEndpoint)>, overprovisioning: u32) {
        {
            let mut policy = lock(&self.policy);
            policy.1.overprovisioning = overprovisioning;
        }
        let linger = {
            let control = lock(&self.health);
            control.checker.is_some() && !control.ignore_health_on_removal
        };
        {
            let mut current = lock(&self.endpoints);
            let mut lingering = lock(&self.lingering);
            let states = lock(&self.states);
            let kept = |addr: &SocketAddr| endpoints.iter().any(|(a, _)| a == addr);
            let mut staying = Vec::new();
            if linger {
                for (addr, endpoint) in current.drain(..).chain(lingering.drain(..)) {
                    if kept(&addr) || staying.iter().any(|(a, _): &(SocketAddr, _)| *a == addr) {
                        continue;
                    }
                    if let Some(state) = states.get(&addr)
                        && !state.has(HostState::FAILED_ACTIVE_HC)
                        && !eds_failed(endpoint.health)
                    {
                        state.set_flag(HostState::PENDING_DYNAMIC_REMOVAL, true);
                        staying.push((addr, endpoint));
                    }
                }
            } else {
                lingering.clear();
            }
            for (addr, _) in &endpoints {
                if let Some(state) = states.get(addr) {
                    state.set_flag(HostState::PENDING_DYNAMIC_REMOVAL, false);
                }
            }
            *lingering = staying;
            *current = endpoints;
        }
        self.rebuild();
        if !self.initialized.swap(true, Ordering::AcqRel) {
            self.init.notify_waiters();
        }
    }

    /// A cluster whose endpoints did not arrive in time is used without them.
    pub fn mark_initialized(&self) {
        if !self.initialized.swap(true, Ordering::AcqRel) {
            self.init.notify_waiters();
        }
    }

    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
    }

    /// Waits until the cluster has its first endpoints.
    pub async fn initialized(&self) {
        loop {
            let notified = self.init.notified();
            if self.is_initialized() {
                return;
            }
            notified.await;
        }
    }

    fn set_policy(&self, policy: Arc<dyn LoadBalancer>, settings: Settings) {
        {
            let mut current = lock(&self.policy);
            // The overprovisioning factor comes with the endpoints.
            let overprovisioning = current.1.overprovisioning;
            *current = (
                policy,
                Settings {
                    overprovisioning,
                    ..settings
                },
            );
        }
        self.rebuild();
    }

    /// Installs a cluster config's health settings. A changed checker restarts the sessions
    /// (hosts keep their flags); a removed one clears its flags; removed outlier detection
    /// ends every ejection.
    fn configure_health(&self, settings: HealthSettings) {
        let mut cleared = 0;
        {
            let mut control = lock(&self.health);
            let same_checker = match (&control.checker, &settings.checker) {
                (Some(a), Some(b)) => {
                    a.config == b.config
                        && a.cluster_name == b.cluster_name
                        && Arc::ptr_eq(&a.connector, &b.connector)
                }
                (None, None) => true,
                _ => false,
            };
            if !same_checker {
                for (_, (_, task)) in control.sessions.drain() {
                    task.abort();
                }
                if settings.checker.is_none() {
                    cleared |= HostState::ACTIVE_FLAGS;
                }
                control.checker = settings.checker;
            }
            if settings.outlier.is_none() && control.outlier.is_some() {
                cleared |= HostState::FAILED_OUTLIER_CHECK;
            }
            control.outlier = settings.outlier;
            control.ignore_new_hosts = settings.ignore_new_hosts;
            control.ignore_health_on_removal = settings.ignore_health_on_removal;
        }
        if cleared != 0 {
            for state in lock(&self.states).values() {
                state.set_flag(cleared, false);
            }
            if cleared & HostState::PENDING_DYNAMIC_REMOVAL != 0 {
                lock(&self.lingering).clear();
            }
        }
    }

    /// Starts the checker sessions, and the health task if it has events to read, on the
    /// current (main) runtime.
    fn start_health(&self) {
        {
            let mut control = lock(&self.health);
            control.runtime = Some(tokio::runtime::Handle::current());
            self.spawn_supervisor(&mut control);
        }
        let hosts = self.set().hosts.clone();
        self.sync_sessions(&hosts);
    }

    /// Where the request path reports to the health task; the first call makes the channel
    /// (and starts the task, once the main runtime is known).
    fn events(&self) -> UnboundedSender<Event> {
        self.events
            .get_or_init(|| {
                let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
                let mut control = lock(&self.health);
                control.events = Some(receiver);
                self.spawn_supervisor(&mut control);
                sender
            })
            .clone()
    }

    /// Starts the health task on the main runtime, once that is known and events can come.
    fn spawn_supervisor(&self, control: &mut HealthControl) {
        if let Some(runtime) = &control.runtime
            && let Some(events) = control.events.take()
        {
            let task = runtime.spawn(super::health::supervise(self.me.clone(), events));
            control.supervisor = Some(task.abort_handle());
        }
    }

    /// One session per checked host: new hosts get one, removed hosts lose theirs, a host
    /// whose check address or name changed gets a new one.
    fn sync_sessions(&self, hosts: &[Arc<Host>]) {
        let mut control = lock(&self.health);
        let (Some(checker), Some(runtime)) = (control.checker.clone(), control.runtime.clone())
        else {
            return;
        };
        let mut sessions = std::mem::take(&mut control.sessions);
        let mut kept = HashMap::with_capacity(hosts.len());
        for host in hosts {
            if host.health_check().disabled || kept.contains_key(&host.addr) {
                continue;
            }
            let target = Target {
                addr: host.health_check().target(host.addr),
                hostname: host.health_check().hostname.clone(),
            };
            match sessions.remove(&host.addr) {
                Some((old, task)) if old == target => {
                    kept.insert(host.addr, (old, task));
                }
                other => {
                    if let Some((_, task)) = other {
                        task.abort();
                    }
                    let task = runtime.spawn(super::health::active::run(
                        self.me.clone(),
                        checker.clone(),
                        host.state.clone(),
                        target.clone(),
                    ));
                    kept.insert(host.addr, (target, task.abort_handle()));
                }
            }
        }
        for (_, (_, task)) in sessions {
            task.abort();
        }
        control.sessions = kept;
        drop(control);
        self.refresh_check_gauges();
    }

    /// `health_check.healthy` and `health_check.degraded`: the checked hosts that pass, and
    /// those that pass degraded.
    fn refresh_check_gauges(&self) {
        let control = lock(&self.health);
        let Some(checker) = &control.checker else {
            return;
        };
        let set = self.set();
        let checked = set
            .hosts
            .iter()
            .filter(|h| control.sessions.contains_key(&h.addr));
        let (mut healthy, mut degraded) = (0, 0);
        for host in checked {
            healthy += u64::from(!host.state.has(HostState::FAILED_ACTIVE_HC));
            degraded += u64::from(host.state.has(HostState::DEGRADED_ACTIVE_HC));
        }
        checker.stats.healthy.set(healthy);
        checker.stats.degraded.set(degraded);
    }

    /// Waits until every checked host has had its first health check (at once without
    /// active checks), as Envoy waits before a cluster is initialized.
    pub async fn health_ready(&self) {
        loop {
            let notified = self.checked.notified();
            if self.first_checks_done() {
                return;
            }
            notified.await;
        }
    }

    /// Every checked host has had its first health check.
    pub fn first_checks_done(&self) -> bool {
        let addrs: Vec<SocketAddr> = lock(&self.health).sessions.keys().copied().collect();
        let states = lock(&self.states);
        addrs.iter().all(|addr| {
            states.get(addr).is_none_or(|state| {
                !state
                    .active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .first_check
            })
        })
    }

    /// Rebuilds the priority set from the endpoints and the hosts' current health.
    pub fn rebuild(&self) {
        let (checked, pending) = {
            let control = lock(&self.health);
            (control.checker.is_some(), control.ignore_new_hosts)
        };
        let endpoints = lock(&self.endpoints);
        let mut lingering = lock(&self.lingering);
        let mut states = lock(&self.states);
        let mut kept = HashMap::with_capacity(endpoints.len());
        // A lingering host goes once its checks fail.
        lingering.retain(|(addr, _)| {
            states
                .get(addr)
                .is_some_and(|state| !state.has(HostState::FAILED_ACTIVE_HC))
        });
        let hosts: Vec<Arc<Host>> = endpoints
            .iter()
            .chain(lingering.iter())
            .map(|(addr, endpoint)| {
                let state = kept
                    .entry(*addr)
                    .or_insert_with(|| {
                        states.get(addr).cloned().unwrap_or_else(|| {
                            // A new host under active checks starts failed (and, when asked,
                            // excluded) until its first check, as in Envoy.
                            let state = Arc::new(HostState::default());
                            if checked && !endpoint.health_check().disabled {
                                state.set_flag(HostState::FAILED_ACTIVE_HC, true);
                                if pending {
                                    state.set_flag(HostState::PENDING_ACTIVE_HC, true);
                                }
                            }
                            state
                        })
                    })
                    .clone();
                Arc::new(Host::new(*addr, endpoint, state))
            })
            .collect();
        *states = kept;
        drop(states);
        drop(lingering);
        drop(endpoints);
        let (policy, settings) = lock(&self.policy).clone();
        let set = PrioritySet::new(hosts, policy.as_ref(), settings);
        if !same_addresses(&self.set.load().hosts, &set.hosts) {
            self.stats.membership_change.inc();
        }
        self.stats.membership_total.set(set.hosts.len() as u64);
        self.stats
            .membership_healthy
            .set(set.healthy_count() as u64);
        self.stats
            .membership_degraded
            .set(set.degraded_count() as u64);
        self.stats
            .membership_excluded
            .set(set.hosts.iter().filter(|h| h.excluded()).count() as u64);
        let hosts = set.hosts.clone();
        self.set.store(Arc::new(set));
        self.sync_sessions(&hosts);
    }
}

/// Whether two host lists name the same addresses (a rebuild for health alone changes none):
/// Envoy's `membership_change` counts only hosts added or removed.
fn same_addresses(before: &[Arc<Host>], after: &[Arc<Host>]) -> bool {
    before.len() == after.len() && {
        let before: std::collections::HashSet<SocketAddr> = before.iter().map(|h| h.addr).collect();
        after.iter().all(|host| before.contains(&host.addr))
    }
}

impl Watched for Members {
    /// A session finished a check: rebuild when the host's health moved, end an outlier
    /// ejection on success when configured, and wake the first-check wait.
    fn after_check(&self, state: &Arc<HostState>, healthy: bool, changed: Transition) {
        let mut rebuild = changed == Transition::Changed;
        if healthy
            && !state.has(HostState::FAILED_ACTIVE_HC)
            && state.has(HostState::FAILED_OUTLIER_CHECK)
        {
            let outlier = lock(&self.health).outlier.clone();
            if let Some(setup) = outlier
                && setup.config.successful_active_health_check_uneject_host
            {
                let set = self.set();
                Detector {
                    config: &setup.config,
                    stats: &setup.stats,
                    hosts: &set.hosts,
                    cluster: &setup.cluster,
                }
                .uneject(state);
                rebuild = true;
            }
        }
        if rebuild {
            self.rebuild();
        } else {
            self.refresh_check_gauges();
        }
        self.checked.notify_waiters();
    }

    /// An event from the request path.
    fn on_event(&self, event: Event) {
        let changed = match event {
            Event::Consecutive(state, kind) => {
                let outlier = lock(&self.health).outlier.clone();
                let Some(setup) = outlier else { return };
                let set = self.set();
                Detector {
                    config: &setup.config,
                    stats: &setup.stats,
                    hosts: &set.hosts,
                    cluster: &setup.cluster,
                }
                .on_consecutive(&state, kind)
            }
            Event::ImmediateFail(state) => {
                let checker = lock(&self.health).checker.clone();
                let Some(checker) = checker else { return };
                super::health::active::on_passive_failure(&checker, &state) == Transition::Changed
            }
        };
        if changed {
            self.rebuild();
        }
    }

    fn outlier_interval(&self) -> Option<std::time::Duration> {
        lock(&self.health)
            .outlier
            .as_ref()
            .map(|o| o.config.interval)
    }

    /// The outlier detector's interval.
    fn outlier_tick(&self) {
        let outlier = lock(&self.health).outlier.clone();
        let Some(setup) = outlier else { return };
        let set = self.set();
        let changed = Detector {
            config: &setup.config,
            stats: &setup.stats,
            hosts: &set.hosts,
            cluster: &setup.cluster,
        }
        .interval();
        drop(set);
        if changed {
            self.rebuild();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The live state of one cluster.
#[derive(Debug)]
pub struct Cluster {
    pub config: Arc<config::Cluster>,
    pub stats: Arc<ClusterStats>,
    /// The router's dynamic stats of this cluster's responses, made as they are first used.
    pub responses: crate::stats::responses::ResponseStats,
    pub members: Arc<Members>,
    pub connector: Arc<Connector>,
    pub pools: Arc<Pools>,
    /// Requests and retries in flight, against each priority's thresholds.
    pub breakers: Arc<Breakers>,
    /// The HIGH priority's own connections (Envoy keeps a pool per priority), made when a
    /// `priority: HIGH` route first uses the cluster.
    high: Arc<OnceLock<(Arc<Connector>, Arc<Pools>)>>,
    workers: usize,
    /// Outlier detection's counting on the request path, when configured.
    outlier: Option<OutlierReporter>,
    background: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.background).take() {
            task.abort();
        }
    }
}

/// What must be equal for a new cluster config to keep the old one's connections.
fn same_connections(a: &config::Cluster, b: &config::Cluster) -> bool {
    a.connect == b.connect
        && a.protocol == b.protocol
        && a.http2 == b.http2
        && a.idle_timeout == b.idle_timeout
        && a.max_headers_count == b.max_headers_count
        && a.thresholds.max_connections == b.thresholds.max_connections
        && a.thresholds.max_pending_requests == b.thresholds.max_pending_requests
        && a.thresholds_high.max_connections == b.thresholds_high.max_connections
        && a.thresholds_high.max_pending_requests == b.thresholds_high.max_pending_requests
        && a.per_host_max_connections == b.per_host_max_connections
}

/// The priority set's settings from a cluster's config (the overprovisioning factor comes with
/// its endpoints).
fn balancing_settings(config: &config::Cluster) -> Settings {
    let balancing = &config.load_balancing;
    Settings {
        overprovisioning: config.load_assignment.overprovisioning,
        panic_threshold: balancing.panic_threshold,
        locality_weighted: balancing.locality_weighted,
        fail_traffic_on_panic: balancing.fail_traffic_on_panic,
    }
}

/// What must be equal for a new cluster config to keep the old one's hosts.
fn same_hosts(a: &config::Cluster, b: &config::Cluster) -> bool {
    a.discovery == b.discovery
        && match a.discovery {
            DiscoveryType::Eds { .. } | DiscoveryType::OriginalDst => true,
            _ => a.load_assignment == b.load_assignment,
        }
}

impl Cluster {
    /// Builds a cluster; `previous` is the cluster it replaces, if any. Reads TLS files, so
    /// an error names the field at fault.
    pub fn new(
        config: Arc<config::Cluster>,
        registry: &Arc<Registry>,
        workers: usize,
        previous: Option<&Cluster>,
        secrets: &Arc<crate::tls::Secrets>,
    ) -> ConfigResult<Arc<Self>> {
        let stats = match previous {
            Some(previous) if previous.config.stats_name == config.stats_name => {
                previous.stats.clone()
            }
            _ => ClusterStats::new(registry, &config.stats_name),
        };
        let policy = super::lb::policy(&config.load_balancing);
        let settings = balancing_settings(&config);
        let (connector, pools, high) = match previous {
            Some(previous) if same_connections(&previous.config, &config) => (
                previous.connector.clone(),
                previous.pools.clone(),
                previous.high.clone(),
            ),
            _ => {
                let tls = config
                    .connect
                    .tls
                    .as_ref()
                    .map(|tls| {
                        let stats = crate::stats::SslStats::new(
                            registry,
                            &format!("cluster.{}", crate::stats::stat_name(&config.stats_name)),
                        );
                        crate::tls::client_config(tls, secrets, stats)
                    })
                    .transpose()?;
                let connector = Arc::new(Connector::new(
                    &config.connect,
                    config.thresholds.max_connections,
                    stats.clone(),
                    tls,
                ));
                let pools = Arc::new(Pools::new(
                    &config,
                    &config.thresholds,
                    connector.clone(),
                    workers,
                ));
                (connector, pools, Arc::default())
            }
        };
        let breakers = Breakers::new(config.thresholds, config.thresholds_high);
        let default_readings: Arc<ConnectionReadings> = {
            let (connector, pools) = (Arc::downgrade(&connector), Arc::downgrade(&pools));
            Arc::new(move || Some((connector.upgrade()?.readings(), pools.upgrade()?.pending())))
        };
        let high_readings: Arc<ConnectionReadings> = {
            let high = Arc::downgrade(&high);
            Arc::new(move || {
                let high = high.upgrade()?;
                let (connector, pools) = high.get()?;
                Some((connector.readings(), pools.pending()))
            })
        };
        breakers.register_gauges(
            registry,
            &config.stats_name,
            [default_readings, high_readings],
        );
        let members = match previous {
            Some(previous) if same_hosts(&previous.config, &config) => {
                let members = previous.members.clone();
                members.set_policy(policy, settings);
                members
            }
            _ => Members::new(stats.clone(), policy, settings),
        };
        let checker = config.health_check.as_ref().map(|check| {
            Arc::new(Checker {
                config: Arc::new(crate::config::HealthCheck::clone(check)),
                cluster_name: config.name.clone(),
                stats: Arc::new(HealthCheckStats::new(registry, &config.stats_name)),
                cluster_stats: stats.clone(),
                connector: connector.clone(),
            })
        });
        let outlier_setup = config.outlier_detection.as_ref().map(|od| {
            Arc::new(OutlierSetup {
                config: (**od).clone(),
                stats: Arc::new(OutlierStats::new(registry, &config.stats_name)),
                cluster: config.name.as_str().into(),
            })
        });
        let outlier = config
            .outlier_detection
            .as_ref()
            .map(|od| OutlierReporter::new(od, members.events()));
        members.configure_health(HealthSettings {
            checker,
            outlier: outlier_setup,
            ignore_new_hosts: config.ignore_new_hosts_until_first_hc,
            ignore_health_on_removal: config.ignore_health_on_host_removal,
        });
        let cluster = Arc::new(Cluster {
            responses: crate::stats::responses::ResponseStats::new(
                registry,
                &config.stats_name,
                &stats,
            ),
            config,
            stats,
            members,
            connector,
            pools,
            breakers,
            high,
            workers,
            outlier,
            background: Mutex::new(None),
        });
        match cluster.config.discovery {
            DiscoveryType::Static => {
                cluster.members.set_endpoints(
                    ip_endpoints(&cluster.config.load_assignment),
                    cluster.config.load_assignment.overprovisioning,
                );
            }
            DiscoveryType::OriginalDst => cluster.members.mark_initialized(),
            _ => {}
        }
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Applies an EDS update.
    pub fn set_assignment(&self, assignment: &LoadAssignment) {
        self.members
            .set_endpoints(ip_endpoints(assignment), assignment.overprovisioning);
    }

    /// Picks an upstream host.
    pub fn choose(&self, context: &LbContext<'_>) -> Option<Arc<Host>> {
        if self.config.discovery == DiscoveryType::OriginalDst {
            return context
                .original_dst
                .map(|addr| Arc::new(Host::original_destination(addr)));
        }
        let set = self.members.set();
        let chosen = set.choose(context)?;
        if chosen.panic {
            self.stats.lb_healthy_panic.inc();
        }
        Some(chosen.host.clone())
    }

    /// The connection pools of a priority (HIGH's are made on first use).
    pub fn pools_for(&self, high: bool) -> &Arc<Pools> {
        if !high {
            return &self.pools;
        }
        let (_, pools) = self.high.get_or_init(|| {
            // The same TLS origination as DEFAULT's, under HIGH's connection limit.
            let connector = Arc::new(Connector::new(
                &self.config.connect,
                self.config.thresholds_high.max_connections,
                self.stats.clone(),
                self.connector.tls().cloned(),
            ));
            let pools = Pools::new(
                &self.config,
                &self.config.thresholds_high,
                connector.clone(),
                self.workers,
            );
            (connector, Arc::new(pools))
        });
        pools
    }

    /// What happened with a host: the router and `tcp_proxy` report every attempt here. Only
    /// atomics: the host's stats and, with outlier detection, its outlier counters.
    #[inline]
    pub fn record_outcome(&self, host: &Host, outcome: Outcome) {
        outcome.count(host.stats());
        if let Some(outlier) = &self.outlier {
            outlier.report(&host.state, outcome);
        }
    }

    /// The outlier detector's stats, when the cluster has one.
    pub fn outlier_stats(&self) -> Option<Arc<OutlierStats>> {
        lock(&self.members.health)
            .outlier
            .as_ref()
            .map(|setup| setup.stats.clone())
    }

    /// A response carried `x-envoy-immediate-health-check-fail`: with active health checks,
    /// the host is excluded now and failed by the health task, as in Envoy.
    pub fn immediate_health_check_fail(&self, host: &Host) {
        if self.config.health_check.is_some() {
            host.state
                .set_flag(HostState::EXCLUDED_VIA_IMMEDIATE_HC_FAIL, true);
            let _ = self
                .members
                .events()
                .send(Event::ImmediateFail(host.state.clone()));
        }
    }

    /// How long a host took to answer a request sent at `sent_at` (until its response headers):
    /// the router reports it beside the outcome of every answered attempt. The peak-EWMA policy
    /// balances on it; other policies do not keep it.
    pub fn record_response_time(&self, host: &Host, sent_at: tokio::time::Instant) {
        // Only the peak-EWMA policy reads it: other clusters skip the clock read.
        if let config::LbPolicy::PeakEwma(peak_ewma) = &self.config.load_balancing.policy {
            host.state.latency.observe(
                sent_at.elapsed(),
                super::clock::now_micros(),
                peak_ewma.decay,
            );
        }
    }

    /// Starts, on the current (main) runtime, the cluster's health task and checker sessions,
    /// and DNS resolution for STRICT_DNS and LOGICAL_DNS clusters.
    pub fn start_background(self: &Arc<Self>) {
        self.members.start_health();
        let logical = match self.config.discovery {
            DiscoveryType::StrictDns => false,
            DiscoveryType::LogicalDns => true,
            _ => return,
        };
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                cluster.stats.update_attempt.inc();
                let mut endpoints = Vec::new();
                let mut failed = false;
                let with_ttl = cluster.config.respect_dns_ttl;
                // The shortest TTL of this round's answers (Envoy takes the smallest too).
                let mut ttl: Option<std::time::Duration> = None;
                for endpoint in &cluster.config.load_assignment.endpoints {
                    match &endpoint.address {
                        EndpointAddress::Ip(addr) => endpoints.push((*addr, endpoint.clone())),
                        EndpointAddress::Dns { host, port } => {
                            match super::dns::resolve(host, *port, with_ttl).await {
                                Ok(answer) => {
                                    if let Some(answer_ttl) = answer.ttl {
                                        ttl = Some(ttl.map_or(answer_ttl, |t| t.min(answer_ttl)));
                                    }
                                    let family = cluster.config.dns_lookup_family;
                                    let addrs = family.select(answer.addrs);
                                    // LOGICAL_DNS: one host, the answer's first address.
                                    let keep = if logical { 1 } else { addrs.len() };
                                    endpoints.extend(
                                        addrs
                                            .into_iter()
                                            .take(keep)
                                            .map(|addr| (addr, endpoint.clone())),
                                    );
                                }
                                Err(error) => {
                                    failed = true;
                                    tracing::warn!(cluster = %cluster.config.name, %host, %error, "DNS resolution failed; keeping the last answer")
                                }
                            }
                        }
                    }
                }
                // A failed lookup keeps the hosts of the last good round, as Envoy does.
                if failed {
                    cluster.stats.update_failure.inc();
                } else {
                    cluster.stats.update_success.inc();
                    cluster
                        .members
                        .set_endpoints(endpoints, cluster.config.load_assignment.overprovisioning);
                }
                // `respect_dns_ttl`: again when the answer expires; a TTL of zero (or a
                // failed round) keeps the configured rate, as in Envoy.
                let refresh = match ttl {
                    Some(ttl) if !failed && !ttl.is_zero() => ttl,
                    _ => cluster.config.dns_refresh_rate,
                };
                drop(cluster);
                tokio::time::sleep(refresh).await;
            }
        });
        *lock(&self.background) = Some(task.abort_handle());
    }
}

/// The endpoints with an IP address (names are resolved in the background).
fn ip_endpoints(assignment: &LoadAssignment) -> Vec<(SocketAddr, LbEndpoint)> {
    let mut endpoints: Vec<_> = assignment
        .endpoints
        .iter()
        .filter_map(|endpoint| match endpoint.address {
            EndpointAddress::Ip(addr) => Some((addr, endpoint.clone())),
            EndpointAddress::Dns { .. } => None,
        })
        .collect();
    // Kept until the next update: no spare capacity.
    endpoints.shrink_to_fit();
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::RoundRobin;

    fn endpoint(port: u16) -> (SocketAddr, LbEndpoint) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        (
            addr,
            LbEndpoint {
                address: EndpointAddress::Ip(addr),
                hostname: String::new(),
                weight: 1,
                health: HealthStatus::Healthy,
                priority: 0,
                locality: Arc::default(),
                locality_weight: None,
                health_check_config: None,
            },
        )
    }

    fn checked_members(ignore_new_hosts: bool) -> Arc<Members> {
        let registry = Registry::default();
        let stats = ClusterStats::new(&registry, "c");
        let members = Members::new(
            stats.clone(),
            Arc::new(RoundRobin::default()),
            Settings::default(),
        );
        let check: crate::config::HealthCheck = remora_config::health_check::health_check(
            &xds_api::json::from_yaml_str(
                "{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, \
                 tcp_health_check: {}}",
            )
            .expect("yaml"),
            "",
            false,
        )
        .expect("valid");
        let connector = Arc::new(Connector::new(
            &crate::config::ConnectOptions {
                connect_timeout: std::time::Duration::from_secs(1),
                tcp_keepalive: None,
                tls: None,
            },
            1024,
            stats.clone(),
            None,
        ));
        members.configure_health(HealthSettings {
            checker: Some(Arc::new(Checker {
                config: Arc::new(check),
                cluster_name: "c".into(),
                stats: Arc::new(HealthCheckStats::new(&registry, "c")),
                cluster_stats: stats,
                connector,
            })),
            outlier: None,
            ignore_new_hosts,
            ignore_health_on_removal: false,
        });
        members
    }

    fn flags(members: &Members) -> Vec<(u16, u32)> {
        members
            .set()
            .hosts
            .iter()
            .map(|h| (h.addr.port(), h.state.flags()))
            .collect()
    }

    #[test]
    fn new_hosts_start_failed_and_excluded_until_their_first_check() {
        let members = checked_members(true);
        members.set_endpoints(vec![endpoint(1), endpoint(2)], 140);
        let waiting = HostState::FAILED_ACTIVE_HC | HostState::PENDING_ACTIVE_HC;
        assert_eq!(flags(&members), vec![(1, waiting), (2, waiting)]);
        assert_eq!(members.stats.membership_excluded.get(), 2);
        let first = members.set().hosts[0].state.clone();
        super::super::health::active::on_success(&first, false, 3);
        members.rebuild();
        assert_eq!(flags(&members), vec![(1, 0), (2, waiting)]);
        assert_eq!(
            (
                members.stats.membership_healthy.get(),
                members.stats.membership_excluded.get()
            ),
            (1, 1)
        );
    }

    #[test]
    fn removed_hosts_linger_while_their_checks_pass() {
        let members = checked_members(false);
        members.set_endpoints(vec![endpoint(1), endpoint(2), endpoint(3)], 140);
        for host in &members.set().hosts[..2] {
            host.state.set_flag(HostState::FAILED_ACTIVE_HC, false);
        }
        // 1 passes its checks and stays; 3 never passed and goes at once.
        members.set_endpoints(vec![endpoint(2)], 140);
        assert_eq!(
            flags(&members),
            vec![(2, 0), (1, HostState::PENDING_DYNAMIC_REMOVAL)]
        );
        // Back in the endpoints: no longer pending removal.
        members.set_endpoints(vec![endpoint(1), endpoint(2)], 140);
        assert_eq!(flags(&members), vec![(1, 0), (2, 0)]);
        members.set_endpoints(vec![endpoint(2)], 140);
        let lingering = members.set().hosts[1].state.clone();
        super::super::health::active::on_failure(
            &lingering,
            super::super::health::active::Failure::Network,
            1,
        );
        members.rebuild();
        assert_eq!(flags(&members), vec![(2, 0)]);
    }
}
