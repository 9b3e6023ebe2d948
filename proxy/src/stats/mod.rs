//! Stats: counters, gauges and [`histogram`]s registered at config time under Envoy's names and
//! updated on the hot path through `Arc` handles (no string lookups per request). Handles are
//! get-or-create by name, so stats survive config swaps.

pub mod histogram;
pub mod metrics_service;
pub mod prometheus;
pub mod responses;
pub mod sink;

pub use histogram::Histogram;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use remora_config::matcher::StringMatch;
use remora_config::stats::HistogramBuckets;

/// One counter or gauge.
#[derive(Debug, Default)]
pub struct Stat(AtomicU64, Used);

/// Whether a gauge was ever set, for `/stats?usedonly` (Envoy's "used" flag): a gauge back at
/// zero was still used. A counter is used once it is not zero, so increments never touch this.
#[derive(Debug, Default)]
struct Used(AtomicBool);

impl Stat {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        // Only a gauge taken from its value goes down, so it was used. Skipped when set: a
        // store to a line other cores read would cost more than the load.
        if !self.1.0.load(Ordering::Relaxed) {
            self.1.0.store(true, Ordering::Relaxed);
        }
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Ever changed: a counter or gauge not at zero, or a gauge that went back to it.
    pub fn used(&self) -> bool {
        self.get() != 0 || self.1.0.load(Ordering::Relaxed)
    }
}

/// One stat as `/stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatValue {
    pub name: String,
    pub kind: Kind,
    pub value: u64,
    pub used: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// How a set of derived gauges is read: it hands each gauge's group and name (under the set's
/// prefix: `PREFIX.GROUP.NAME`, or `PREFIX.NAME` for the empty group) and value to the callback.
pub type ReadGauges = Box<dyn Fn(&mut dyn FnMut(&'static str, &'static str, u64)) + Send + Sync>;

/// A name as it appears inside a stat name: Envoy writes `:` as `_` (so cluster
/// `b.shop.svc.cluster.local:80` counts under `cluster.b.shop.svc.cluster.local_80.`).
pub fn stat_name(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains(':') {
        std::borrow::Cow::Owned(name.replace(':', "_"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Stats that live together under one name prefix (a cluster's `cluster.NAME.*`): one
/// allocation for all of them, named only when shown. At a thousand clusters a stat each with
/// its own allocation, name and map entry cost about 5 KB per cluster.
pub trait StatBlock: Send + Sync + 'static {
    /// Every counter and gauge, by its name under the prefix.
    fn each_stat(&self, each: &mut dyn FnMut(&'static str, Kind, &Stat));
    /// Every histogram, likewise.
    fn each_histogram(&self, each: &mut dyn FnMut(&'static str, &Histogram));
}

/// Defines a struct of stats and histograms and its [`StatBlock`] from one list, so a field and
/// the name it is shown under cannot drift apart. Counters in `counters_shown_once_used` are
/// listed from their first count on, as Envoy lists the stats it makes on first use.
macro_rules! stat_block {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            stats { $( $(#[$stat_meta:meta])* $stat:ident: $kind:ident, )* }
            counters_shown_once_used { $( $(#[$lazy_meta:meta])* $lazy:ident, )* }
            histograms { $( $(#[$hist_meta:meta])* $hist:ident, )* }
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $( $(#[$stat_meta])* pub $stat: Stat, )*
            $( $(#[$lazy_meta])* pub $lazy: Stat, )*
            $( $(#[$hist_meta])* pub $hist: Histogram, )*
        }

        impl StatBlock for $name {
            fn each_stat(&self, each: &mut dyn FnMut(&'static str, Kind, &Stat)) {
                $( each(stringify!($stat), Kind::$kind, &self.$stat); )*
                // Envoy makes these at their first count.
                $( if self.$lazy.used() { each(stringify!($lazy), Kind::Counter, &self.$lazy); } )*
            }
            #[allow(unused_variables)] // a block without histograms
            fn each_histogram(&self, each: &mut dyn FnMut(&'static str, &Histogram)) {
                $( each(stringify!($hist), &self.$hist); )*
            }
        }
    };
}

/// A registered [`StatBlock`], typed (to hand the same block out again) and not (to show it).
struct Block {
    typed: Arc<dyn std::any::Any + Send + Sync>,
    shown: Arc<dyn StatBlock>,
}

/// The registry (only touched at config time and by the admin endpoint).
#[derive(Default)]
pub struct Registry {
    stats: Mutex<BTreeMap<String, (Kind, Arc<Stat>)>>,
    /// Blocks by prefix (`cluster.NAME`); their stats show as `PREFIX.FIELD`.
    blocks: Mutex<BTreeMap<String, Block>>,
    histograms: Mutex<BTreeMap<String, Arc<Histogram>>>,
    /// Gauges computed when shown, from state kept elsewhere (circuit breakers): nothing on the
    /// request path updates them. By prefix; each entry reads the whole set.
    derived: Mutex<BTreeMap<String, ReadGauges>>,
    /// Makes the tap of each histogram, by its name (see [`Registry::tap_histograms`]).
    taps: std::sync::OnceLock<MakeTap>,
    /// `histogram_bucket_settings`: bucket bounds by histogram name, the first match wins.
    buckets: std::sync::OnceLock<Vec<(StringMatch, &'static [f64])>>,
}

/// Makes a histogram's [`histogram::Tap`] from its name, or none for a histogram left out.
pub type MakeTap = Box<dyn Fn(&str) -> Option<histogram::Tap> + Send + Sync>;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    fn get(&self, name: String, kind: Kind) -> Arc<Stat> {
        let mut stats = lock(&self.stats);
        stats
            .entry(name)
            .or_insert_with(|| (kind, Arc::new(Stat::default())))
            .1
            .clone()
    }

    pub fn counter(&self, name: impl Into<String>) -> Arc<Stat> {
        self.get(name.into(), Kind::Counter)
    }

    pub fn gauge(&self, name: impl Into<String>) -> Arc<Stat> {
        self.get(name.into(), Kind::Gauge)
    }

    /// Registers (or replaces) the gauges under `prefix` that `read` computes whenever stats
    /// are shown.
    pub fn derived_gauges(&self, prefix: String, read: ReadGauges) {
        lock(&self.derived).insert(prefix, read);
    }

    /// The block registered under `prefix`, made if there is none (get-or-create, as single
    /// stats are, so a block outlives the config that made it).
    pub fn block<T: StatBlock + Default>(&self, prefix: String) -> Arc<T> {
        let mut blocks = lock(&self.blocks);
        if let Some(block) = blocks.get(&prefix)
            && let Ok(typed) = block.typed.clone().downcast::<T>()
        {
            return typed;
        }
        let made = Arc::new(T::default());
        // Names are made only for bucket rules to match: a thousand clusters' blocks need none.
        if self.buckets.get().is_some_and(|rules| !rules.is_empty()) {
            made.each_histogram(&mut |field, histogram| {
                self.set_bounds(&format!("{prefix}.{field}"), histogram);
            });
        }
        if let Some(make) = self.taps.get() {
            made.each_histogram(&mut |field, histogram| {
                tap(make, &format!("{prefix}.{field}"), histogram);
            });
        }
        blocks.insert(
            prefix,
            Block {
                typed: made.clone(),
                shown: made.clone(),
            },
        );
        made
    }

    pub fn histogram(&self, name: impl Into<String>) -> Arc<Histogram> {
        let mut histograms = lock(&self.histograms);
        let name = name.into();
        if let Some(histogram) = histograms.get(&name) {
            return histogram.clone();
        }
        let made = Arc::new(Histogram::default());
        self.set_bounds(&name, &made);
        if let Some(make) = self.taps.get() {
            tap(make, &name, &made);
        }
        histograms.insert(name, made.clone());
        made
    }

    /// Histograms made from now on whose name a rule matches count into that rule's buckets
    /// (the first match wins), as Envoy's `histogram_bucket_settings`. Set once, before the
    /// first histogram is made; the bounds live as long as the process.
    pub fn set_histogram_buckets(&self, rules: &[HistogramBuckets]) {
        let rules = rules
            .iter()
            .map(|rule| {
                let bounds: &'static [f64] = Box::leak(rule.bounds.clone().into_boxed_slice());
                (rule.matcher.clone(), bounds)
            })
            .collect();
        let _ = self.buckets.set(rules);
    }

    fn set_bounds(&self, name: &str, histogram: &Histogram) {
        let rules = self.buckets.get().map_or(&[][..], Vec::as_slice);
        if let Some((_, bounds)) = rules.iter().find(|(matcher, _)| matcher.matches(name)) {
            histogram.set_bounds(bounds);
        }
    }

    /// From now on every histogram, those made before and those made later, hands its values
    /// to the tap `make` gives it by name. Set once; later calls change nothing.
    pub fn tap_histograms(&self, make: MakeTap) {
        // Set first, then walked under the maps' locks, which histograms are made under: one
        // made meanwhile is tapped on creation, and a second tap is refused by the histogram.
        if self.taps.set(make).is_err() {
            return;
        }
        let Some(make) = self.taps.get() else { return };
        for (name, histogram) in lock(&self.histograms).iter() {
            tap(make, name, histogram);
        }
        for (prefix, block) in lock(&self.blocks).iter() {
            block.shown.each_histogram(&mut |field, histogram| {
                tap(make, &format!("{prefix}.{field}"), histogram);
            });
        }
    }

    /// Every histogram whose name `shown` selects (with whether it has values), merged.
    pub fn histogram_snapshots(
        &self,
        shown: &dyn Fn(&str, bool) -> bool,
    ) -> Vec<(String, histogram::Snapshot)> {
        let mut out: Vec<(String, histogram::Snapshot)> = {
            let histograms = lock(&self.histograms);
            histograms
                .iter()
                .map(|(name, histogram)| (name, histogram.snapshot()))
                .filter(|(name, snapshot)| shown(name, snapshot.count() > 0))
                .map(|(name, snapshot)| (name.clone(), snapshot))
                .collect()
        };
        for (prefix, block) in lock(&self.blocks).iter() {
            block.shown.each_histogram(&mut |field, histogram| {
                let name = format!("{prefix}.{field}");
                let snapshot = histogram.snapshot();
                if shown(&name, snapshot.count() > 0) {
                    out.push((name, snapshot));
                }
            });
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Histograms as Envoy's `/stats` prints them, after the counters and gauges.
    pub fn render_histograms_text(&self, shown: &dyn Fn(&str, bool) -> bool) -> String {
        let mut out = String::new();
        for (name, snapshot) in self.histogram_snapshots(shown) {
            out.push_str(&format!("{name}: {}\n", snapshot.summary()));
        }
        out
    }

    /// A copy of every stat `shown` selects, sorted by name.
    pub fn snapshot(&self, shown: &dyn Fn(&StatValue) -> bool) -> Vec<StatValue> {
        let mut values: Vec<StatValue> = {
            let stats = lock(&self.stats);
            stats
                .iter()
                .map(|(name, (kind, stat))| StatValue {
                    name: name.clone(),
                    kind: *kind,
                    value: stat.get(),
                    used: stat.used(),
                })
                .collect()
        };
        for (prefix, block) in lock(&self.blocks).iter() {
            block.shown.each_stat(&mut |field, kind, stat| {
                values.push(StatValue {
                    name: format!("{prefix}.{field}"),
                    kind,
                    value: stat.get(),
                    used: stat.used(),
                });
            });
        }
        for (prefix, read) in lock(&self.derived).iter() {
            read(&mut |group, name, value| {
                values.push(StatValue {
                    name: if group.is_empty() {
                        format!("{prefix}.{name}")
                    } else {
                        format!("{prefix}.{group}.{name}")
                    },
                    kind: Kind::Gauge,
                    value,
                    used: true,
                })
            });
        }
        // Single stats come sorted; the blocks' and derived ones join them here.
        values.sort_by(|a, b| a.name.cmp(&b.name));
        values.retain(|stat| shown(stat));
        values
    }

    /// Envoy's `/stats` text format: `name: value` per line.
    pub fn render_text(&self, shown: &dyn Fn(&StatValue) -> bool) -> String {
        let mut out = String::new();
        for StatValue { name, value, .. } in self.snapshot(shown) {
            out.push_str(&format!("{name}: {value}\n"));
        }
        out
    }
}

fn tap(make: &MakeTap, name: &str, histogram: &Histogram) {
    if let Some(tap) = make(name) {
        histogram.set_tap(tap);
    }
}

/// A registry lock: a panic elsewhere leaves the maps intact, so a poisoned one is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

stat_block! {
    /// `cluster.NAME.*`, one block per cluster (see [`StatBlock`]).
    pub struct ClusterStats {
        stats {
            upstream_rq_total: Counter,
            upstream_rq_active: Gauge,
            upstream_rq_active_overflow: Counter,
            upstream_rq_timeout: Counter,
            /// Retries: made, the requests that succeeded after one, refused by the retry breaker,
            /// stopped at the limit, and back-offs waited.
            upstream_rq_retry: Counter,
            upstream_rq_retry_success: Counter,
            upstream_rq_retry_overflow: Counter,
            upstream_rq_retry_limit_exceeded: Counter,
            upstream_rq_retry_backoff_exponential: Counter,
            /// Attempts cut by the per-try timeout or per-try idle timeout.
            upstream_rq_per_try_timeout: Counter,
            upstream_rq_per_try_idle_timeout: Counter,
            upstream_rq_pending_total: Counter,
            upstream_rq_pending_active: Gauge,
            upstream_rq_pending_overflow: Counter,
            /// HTTP/2 streams reset by the upstream, by the proxy, and taken down with their
            /// connection (Envoy's name for the last).
            upstream_rq_rx_reset: Counter,
            upstream_rq_tx_reset: Counter,
            upstream_rq_pending_failure_eject: Counter,
            upstream_cx_total: Counter,
            upstream_cx_active: Gauge,
            /// Connections ended, failed connects included (Envoy's `upstream_cx_destroy`), and
            /// by which side: the upstream's (refused, closed, reset) or the proxy's.
            upstream_cx_destroy: Counter,
            upstream_cx_destroy_local: Counter,
            upstream_cx_destroy_remote: Counter,
            /// Of those, the ones that ended with a request in flight.
            upstream_cx_destroy_with_active_rq: Counter,
            upstream_cx_destroy_local_with_active_rq: Counter,
            upstream_cx_destroy_remote_with_active_rq: Counter,
            /// Connects (TLS handshakes included) that ran out of `connect_timeout`.
            upstream_cx_connect_timeout: Counter,
            /// Responses whose head the codec could not read.
            upstream_cx_protocol_error: Counter,
            /// HTTP connections by protocol, counted when the pool starts one.
            upstream_cx_http1_total: Counter,
            upstream_cx_http2_total: Counter,
            upstream_cx_connect_fail: Counter,
            upstream_cx_overflow: Counter,
            upstream_cx_idle_timeout: Counter,
            /// Connections closed at `max_requests_per_connection`.
            upstream_cx_max_requests: Counter,
            upstream_cx_tx_bytes_total: Counter,
            upstream_cx_rx_bytes_total: Counter,
            upstream_cx_none_healthy: Counter,
            /// Host sets that gained or lost a host (the first one included), as Envoy counts.
            membership_change: Counter,
            membership_total: Gauge,
            membership_healthy: Gauge,
            membership_degraded: Gauge,
            /// Hosts left out of availability (waiting for a first health check, or taken out by
            /// `x-envoy-immediate-health-check-fail`).
            membership_excluded: Gauge,
            /// Picks made from all hosts because too few were healthy (panic).
            lb_healthy_panic: Counter,
            /// DNS clusters: resolution rounds, and those whose lookups all succeeded or not.
            /// EDS clusters: their subscription's updates (`xds::stats`).
            update_attempt: Counter,
            update_success: Counter,
            update_failure: Counter,
            /// EDS updates that changed nothing, and updates with no assignment (Remora counts
            /// only responses carrying the cluster's assignment, so the latter stays 0).
            update_no_rebuild: Counter,
            update_empty: Counter,
            /// xxHash64 of the last accepted EDS version.
            version: Gauge,
        }
        counters_shown_once_used {
            /// Responses by class, as the router's dynamic stats count them.
            upstream_rq_2xx,
            upstream_rq_3xx,
            upstream_rq_4xx,
            upstream_rq_5xx,
        }
        histograms {
            /// Upstream request start to the end of the response (ms).
            upstream_rq_time,
            /// Connect, TLS included (ms).
            upstream_cx_connect_ms,
            /// Connection lifetime (ms).
            upstream_cx_length_ms,
            /// Requests a connection carried, recorded when it ends.
            upstream_rq_per_cx,
        }
    }
}

impl ClusterStats {
    /// The stats of cluster `cluster`: the same block for as long as the registry lives, so
    /// they outlive the cluster's updates and its removal.
    pub fn new(registry: &Registry, cluster: &str) -> Arc<Self> {
        registry.block(format!("cluster.{}", stat_name(cluster)))
    }
}

stat_block! {
    /// `PREFIX.ssl.*` of a TLS-terminating listener (`listener.ADDR`) or a TLS-originating
    /// cluster (`cluster.NAME`), counted as Envoy counts them.
    pub struct SslStats {
        stats {
            /// Handshakes that completed.
            handshake: Counter,
            /// Handshakes that failed for a reason other than the peer's certificate.
            connection_error: Counter,
            /// The peer's chain does not lead to a trusted CA (or is expired or malformed).
            fail_verify_error: Counter,
            /// The peer's certificate has no SAN that the matchers accept.
            fail_verify_san: Counter,
            /// The peer's certificate matches no `verify_certificate_hash` or
            /// `verify_certificate_spki` pin.
            fail_verify_cert_hash: Counter,
            /// A client certificate was required and none was presented.
            fail_verify_no_cert: Counter,
            /// Handshakes that completed without a client certificate.
            no_certificate: Counter,
            /// Handshakes that resumed a session.
            session_reused: Counter,
        }
        counters_shown_once_used {}
        histograms {}
    }
}

impl SslStats {
    /// The block under `PREFIX.ssl` (`listener.ADDR` or `cluster.NAME`, already a stat name).
    pub fn new(registry: &Registry, prefix: &str) -> Arc<Self> {
        registry.block(format!("{prefix}.ssl"))
    }

    /// Counts a failed handshake as Envoy does: a missing client certificate as
    /// `fail_verify_no_cert`; a certificate that failed verification not again (its own
    /// `fail_verify_*` counted it); anything else as `connection_error`.
    pub fn failed(&self, error: &std::io::Error) {
        let reason = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match reason {
            Some(rustls::Error::NoCertificatesPresented) => self.fail_verify_no_cert.inc(),
            Some(rustls::Error::InvalidCertificate(_)) => {}
            _ => self.connection_error.inc(),
        }
    }
}

/// `cluster.NAME.health_check.*`: created only for clusters with an active checker, as in
/// Envoy.
#[derive(Debug)]
pub struct HealthCheckStats {
    pub attempt: Arc<Stat>,
    pub success: Arc<Stat>,
    pub failure: Arc<Stat>,
    pub passive_failure: Arc<Stat>,
    pub network_failure: Arc<Stat>,
    pub verify_cluster: Arc<Stat>,
    pub healthy: Arc<Stat>,
    pub degraded: Arc<Stat>,
}

impl HealthCheckStats {
    pub fn new(registry: &Registry, cluster: &str) -> Self {
        let cluster = &stat_name(cluster);
        let c = |n: &str| registry.counter(format!("cluster.{cluster}.health_check.{n}"));
        let g = |n: &str| registry.gauge(format!("cluster.{cluster}.health_check.{n}"));
        HealthCheckStats {
            attempt: c("attempt"),
            success: c("success"),
            failure: c("failure"),
            passive_failure: c("passive_failure"),
            network_failure: c("network_failure"),
            verify_cluster: c("verify_cluster"),
            healthy: g("healthy"),
            degraded: g("degraded"),
        }
    }
}

/// `cluster.NAME.outlier_detection.*`: created only for clusters with outlier detection.
/// `ejections_total`, `ejections_consecutive_5xx` and `ejections_success_rate` are Envoy's
/// deprecated counters, kept because Envoy still counts them.
#[derive(Debug)]
pub struct OutlierStats {
    pub ejections_active: Arc<Stat>,
    pub ejections_overflow: Arc<Stat>,
    pub ejections_total: Arc<Stat>,
    pub ejections_enforced_total: Arc<Stat>,
    pub ejections_consecutive_5xx: Arc<Stat>,
    pub ejections_success_rate: Arc<Stat>,
    /// Detected and enforced ejections by kind, indexed by [`EjectionKind`] order:
    /// consecutive_5xx, consecutive_gateway_failure, consecutive_local_origin_failure,
    /// success_rate, local_origin_success_rate, failure_percentage,
    /// local_origin_failure_percentage.
    pub detected: [Arc<Stat>; 7],
    pub enforced: [Arc<Stat>; 7],
    /// Envoy 1.40 lists this counter too (for its degradation monitor extension, which Remora
    /// does not have); it stays 0.
    pub ejections_detected_degradation: Arc<Stat>,
    /// The last interval's cluster success-rate averages and ejection thresholds (percent as
    /// `f64` bits; negative: not computed), external then local origin, for `/clusters`.
    pub rates: [AtomicU64; 4],
}

impl OutlierStats {
    /// (average, ejection threshold) of the external (`local` false) or local-origin success
    /// rates; -1 when not computed.
    pub fn rates(&self, local: bool) -> (f64, f64) {
        let i = if local { 2 } else { 0 };
        (
            f64::from_bits(self.rates[i].load(Ordering::Relaxed)),
            f64::from_bits(self.rates[i + 1].load(Ordering::Relaxed)),
        )
    }

    pub fn set_rates(&self, local: bool, average: f64, threshold: f64) {
        let i = if local { 2 } else { 0 };
        self.rates[i].store(average.to_bits(), Ordering::Relaxed);
        self.rates[i + 1].store(threshold.to_bits(), Ordering::Relaxed);
    }
}

/// Envoy's names for the kinds of ejection, as its stats spell them.
pub const EJECTION_KINDS: [&str; 7] = [
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "consecutive_local_origin_failure",
    "success_rate",
    "local_origin_success_rate",
    "failure_percentage",
    "local_origin_failure_percentage",
];

impl OutlierStats {
    pub fn new(registry: &Registry, cluster: &str) -> Self {
        let cluster = &stat_name(cluster);
        let c = |n: &str| registry.counter(format!("cluster.{cluster}.outlier_detection.{n}"));
        OutlierStats {
            ejections_active: registry.gauge(format!(
                "cluster.{cluster}.outlier_detection.ejections_active"
            )),
            ejections_overflow: c("ejections_overflow"),
            ejections_total: c("ejections_total"),
            ejections_enforced_total: c("ejections_enforced_total"),
            ejections_consecutive_5xx: c("ejections_consecutive_5xx"),
            ejections_success_rate: c("ejections_success_rate"),
            detected: EJECTION_KINDS.map(|kind| c(&format!("ejections_detected_{kind}"))),
            enforced: EJECTION_KINDS.map(|kind| c(&format!("ejections_enforced_{kind}"))),
            ejections_detected_degradation: c("ejections_detected_degradation"),
            rates: std::array::from_fn(|_| AtomicU64::new((-1f64).to_bits())),
        }
    }
}

/// `cluster_manager.cluster_added|cluster_modified|cluster_removed` and
/// `listener_manager.listener_added|listener_modified|listener_removed`: the clusters and
/// listeners the configuration brought, changed and took away, the bootstrap's included.
#[derive(Debug)]
pub struct ManagerStats {
    pub cluster_added: Arc<Stat>,
    pub cluster_modified: Arc<Stat>,
    pub cluster_removed: Arc<Stat>,
    pub listener_added: Arc<Stat>,
    pub listener_modified: Arc<Stat>,
    pub listener_removed: Arc<Stat>,
}

impl ManagerStats {
    pub fn new(registry: &Registry) -> Self {
        let c = |name: &str| registry.counter(name);
        ManagerStats {
            cluster_added: c("cluster_manager.cluster_added"),
            cluster_modified: c("cluster_manager.cluster_modified"),
            cluster_removed: c("cluster_manager.cluster_removed"),
            listener_added: c("listener_manager.listener_added"),
            listener_modified: c("listener_manager.listener_modified"),
            listener_removed: c("listener_manager.listener_removed"),
        }
    }
}

/// `http.PREFIX.*`
#[derive(Debug)]
pub struct HttpStats {
    pub downstream_rq_total: Arc<Stat>,
    pub downstream_rq_active: Arc<Stat>,
    /// `downstream_rq_completed` and `downstream_rq_1xx..5xx`, under `http.PREFIX` and again
    /// under the listener's `listener.ADDR.http.PREFIX`, as Envoy keeps them.
    responses: [ResponseClasses; 2],
    /// Requests by the protocol the client spoke (HTTP/1.0 counts as HTTP/1).
    pub downstream_rq_http1_total: Arc<Stat>,
    pub downstream_rq_http2_total: Arc<Stat>,
    pub downstream_cx_total: Arc<Stat>,
    pub downstream_cx_active: Arc<Stat>,
    /// Connections by protocol, counted at their first request.
    pub downstream_cx_http1_total: Arc<Stat>,
    pub downstream_cx_http2_total: Arc<Stat>,
    pub downstream_cx_http1_active: Arc<Stat>,
    pub downstream_cx_http2_active: Arc<Stat>,
    /// Connections closed, by either side; by which side; and those closed with requests in
    /// flight.
    pub downstream_cx_destroy: Arc<Stat>,
    pub downstream_cx_destroy_local: Arc<Stat>,
    pub downstream_cx_destroy_remote: Arc<Stat>,
    pub downstream_cx_destroy_active_rq: Arc<Stat>,
    pub downstream_cx_destroy_local_active_rq: Arc<Stat>,
    pub downstream_cx_destroy_remote_active_rq: Arc<Stat>,
    /// Connections over TLS.
    pub downstream_cx_ssl_total: Arc<Stat>,
    pub downstream_cx_ssl_active: Arc<Stat>,
    /// HTTP/3: Remora serves none, so these stay 0, as Envoy's do without a QUIC listener.
    pub downstream_cx_http3_total: Arc<Stat>,
    pub downstream_cx_http3_active: Arc<Stat>,
    pub downstream_rq_http3_total: Arc<Stat>,
    /// Bytes read from and written to downstream connections (decrypted, under TLS).
    pub downstream_cx_rx_bytes_total: Arc<Stat>,
    pub downstream_cx_tx_bytes_total: Arc<Stat>,
    /// Connections closed by the connection idle timeout, and by a drain.
    pub downstream_cx_idle_timeout: Arc<Stat>,
    pub downstream_cx_drain_close: Arc<Stat>,
    /// Connections ended by a request the codec refused, or by a protocol error.
    pub downstream_cx_protocol_error: Arc<Stat>,
    /// Upgraded streams (WebSocket and the like) that became tunnels, and those open.
    pub downstream_cx_upgrades_total: Arc<Stat>,
    pub downstream_cx_upgrades_active: Arc<Stat>,
    /// The router's: requests it took, and those it answered with a direct response or a
    /// redirect.
    pub rq_total: Arc<Stat>,
    pub rq_direct_response: Arc<Stat>,
    pub rq_redirect: Arc<Stat>,
    pub downstream_rq_timeout: Arc<Stat>,
    pub downstream_rq_idle_timeout: Arc<Stat>,
    /// Streams reset before their response went out whole, by either side (a refused head
    /// included), and those the proxy reset.
    pub downstream_rq_rx_reset: Arc<Stat>,
    pub downstream_rq_tx_reset: Arc<Stat>,
    /// Requests refused for a path the connection manager cannot normalize, and heads
    /// still arriving at `request_headers_timeout`.
    pub downstream_rq_failed_path_normalization: Arc<Stat>,
    pub downstream_rq_header_timeout: Arc<Stat>,
    pub downstream_rq_max_duration_reached: Arc<Stat>,
    /// Connections closed at `max_requests_per_connection`.
    pub downstream_cx_max_requests_reached: Arc<Stat>,
    pub no_route: Arc<Stat>,
    pub no_cluster: Arc<Stat>,
    /// Request start to the end of the response (ms).
    pub downstream_rq_time: Arc<Histogram>,
    /// Connection lifetime (ms).
    pub downstream_cx_length_ms: Arc<Histogram>,
    /// Tracing decisions (`http.PREFIX.tracing.*`), as Envoy counts them.
    pub tracing_random_sampling: Arc<Stat>,
    pub tracing_service_forced: Arc<Stat>,
    pub tracing_client_enabled: Arc<Stat>,
    pub tracing_not_traceable: Arc<Stat>,
    pub tracing_health_check: Arc<Stat>,
}

impl HttpStats {
    /// The stats of a connection manager with `prefix` on the listener whose stats are
    /// `listener.LISTENER.*`.
    pub fn new(registry: &Registry, prefix: &str, listener: &str) -> Self {
        let c = |n: &str| registry.counter(format!("http.{prefix}.{n}"));
        let g = |n: &str| registry.gauge(format!("http.{prefix}.{n}"));
        HttpStats {
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_active: g("downstream_rq_active"),
            responses: [
                ResponseClasses::new(registry, &format!("http.{prefix}")),
                ResponseClasses::new(registry, &format!("listener.{listener}.http.{prefix}")),
            ],
            downstream_rq_http1_total: c("downstream_rq_http1_total"),
            downstream_rq_http2_total: c("downstream_rq_http2_total"),
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: g("downstream_cx_active"),
            downstream_cx_http1_total: c("downstream_cx_http1_total"),
            downstream_cx_http2_total: c("downstream_cx_http2_total"),
            downstream_cx_http1_active: g("downstream_cx_http1_active"),
            downstream_cx_http2_active: g("downstream_cx_http2_active"),
            downstream_cx_destroy: c("downstream_cx_destroy"),
            downstream_cx_destroy_local: c("downstream_cx_destroy_local"),
            downstream_cx_destroy_remote: c("downstream_cx_destroy_remote"),
            downstream_cx_destroy_active_rq: c("downstream_cx_destroy_active_rq"),
            downstream_cx_destroy_local_active_rq: c("downstream_cx_destroy_local_active_rq"),
            downstream_cx_destroy_remote_active_rq: c("downstream_cx_destroy_remote_active_rq"),
            downstream_cx_ssl_total: c("downstream_cx_ssl_total"),
            downstream_cx_ssl_active: g("downstream_cx_ssl_active"),
            downstream_cx_http3_total: c("downstream_cx_http3_total"),
            downstream_cx_http3_active: g("downstream_cx_http3_active"),
            downstream_rq_http3_total: c("downstream_rq_http3_total"),
            downstream_cx_rx_bytes_total: c("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: c("downstream_cx_tx_bytes_total"),
            downstream_cx_idle_timeout: c("downstream_cx_idle_timeout"),
            downstream_cx_drain_close: c("downstream_cx_drain_close"),
            downstream_cx_protocol_error: c("downstream_cx_protocol_error"),
            downstream_cx_upgrades_total: c("downstream_cx_upgrades_total"),
            downstream_cx_upgrades_active: g("downstream_cx_upgrades_active"),
            rq_total: c("rq_total"),
            rq_direct_response: c("rq_direct_response"),
            rq_redirect: c("rq_redirect"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            downstream_rq_idle_timeout: c("downstream_rq_idle_timeout"),
            downstream_rq_rx_reset: c("downstream_rq_rx_reset"),
            downstream_rq_tx_reset: c("downstream_rq_tx_reset"),
            downstream_rq_failed_path_normalization: c("downstream_rq_failed_path_normalization"),
            downstream_rq_header_timeout: c("downstream_rq_header_timeout"),
            downstream_rq_max_duration_reached: c("downstream_rq_max_duration_reached"),
            downstream_cx_max_requests_reached: c("downstream_cx_max_requests_reached"),
            no_route: c("no_route"),
            no_cluster: c("no_cluster"),
            downstream_rq_time: registry.histogram(format!("http.{prefix}.downstream_rq_time")),
            downstream_cx_length_ms: registry
                .histogram(format!("http.{prefix}.downstream_cx_length_ms")),
            tracing_random_sampling: c("tracing.random_sampling"),
            tracing_service_forced: c("tracing.service_forced"),
            tracing_client_enabled: c("tracing.client_enabled"),
            tracing_not_traceable: c("tracing.not_traceable"),
            tracing_health_check: c("tracing.health_check"),
        }
    }

    /// Counts a response as begun, and its class.
    pub fn response(&self, status: u16) {
        for responses in &self.responses {
            responses.count(status);
        }
    }
}

/// `SCOPE.downstream_rq_completed` and `SCOPE.downstream_rq_1xx..5xx`.
#[derive(Debug)]
struct ResponseClasses {
    completed: Arc<Stat>,
    /// By the status's first digit, 1 to 5.
    classes: [Arc<Stat>; 5],
}

impl ResponseClasses {
    fn new(registry: &Registry, scope: &str) -> Self {
        ResponseClasses {
            completed: registry.counter(format!("{scope}.downstream_rq_completed")),
            classes: std::array::from_fn(|index| {
                registry.counter(format!("{scope}.downstream_rq_{}xx", index + 1))
            }),
        }
    }

    fn count(&self, status: u16) {
        self.completed.inc();
        // Statuses from 600 up count with the 5xx.
        let class = match status / 100 {
            class @ 1..=5 => class as usize,
            _ => 5,
        };
        self.classes[class - 1].inc();
    }
}

/// `listener.ADDR.*`
#[derive(Debug)]
pub struct ListenerStats {
    pub downstream_cx_total: Arc<Stat>,
    pub downstream_cx_active: Arc<Stat>,
    /// Connections closed, and how long they were open (ms).
    pub downstream_cx_destroy: Arc<Stat>,
    pub downstream_cx_length_ms: Arc<Histogram>,
    /// Connections in the listener filters (the TLS inspector), and those it timed out.
    pub downstream_pre_cx_active: Arc<Stat>,
    pub downstream_pre_cx_timeout: Arc<Stat>,
    /// `listener.ADDR.worker_N.*`, by worker.
    pub workers: Vec<WorkerListenerStats>,
    pub no_filter_chain_match: Arc<Stat>,
    /// Connections closed at once: the listener's `connection_limit` was reached.
    pub downstream_cx_overflow: Arc<Stat>,
    /// Connections closed at once: `global_downstream_max_connections` was reached.
    pub downstream_global_cx_overflow: Arc<Stat>,
}

/// `listener.ADDR.worker_N.*`: the connections one worker took.
#[derive(Debug)]
pub struct WorkerListenerStats {
    pub downstream_cx_total: Arc<Stat>,
    pub downstream_cx_active: Arc<Stat>,
}

impl ListenerStats {
    /// The stats of the listener on `addr`, served by `workers` workers.
    pub fn new(registry: &Registry, addr: &str, workers: usize) -> Self {
        // Envoy's stat names have no ':' (it becomes '_'): `listener.127.0.0.1_15001.…`.
        let addr = addr.replace(':', "_");
        ListenerStats {
            downstream_cx_total: registry.counter(format!("listener.{addr}.downstream_cx_total")),
            downstream_cx_active: registry.gauge(format!("listener.{addr}.downstream_cx_active")),
            downstream_cx_destroy: registry
                .counter(format!("listener.{addr}.downstream_cx_destroy")),
            downstream_cx_length_ms: registry
                .histogram(format!("listener.{addr}.downstream_cx_length_ms")),
            downstream_pre_cx_active: registry
                .gauge(format!("listener.{addr}.downstream_pre_cx_active")),
            downstream_pre_cx_timeout: registry
                .counter(format!("listener.{addr}.downstream_pre_cx_timeout")),
            workers: (0..workers.max(1))
                .map(|worker| WorkerListenerStats {
                    downstream_cx_total: registry.counter(format!(
                        "listener.{addr}.worker_{worker}.downstream_cx_total"
                    )),
                    downstream_cx_active: registry.gauge(format!(
                        "listener.{addr}.worker_{worker}.downstream_cx_active"
                    )),
                })
                .collect(),
            no_filter_chain_match: registry
                .counter(format!("listener.{addr}.no_filter_chain_match")),
            downstream_cx_overflow: registry
                .counter(format!("listener.{addr}.downstream_cx_overflow")),
            downstream_global_cx_overflow: registry
                .counter(format!("listener.{addr}.downstream_global_cx_overflow")),
        }
    }
}

/// `tcp.PREFIX.*`
#[derive(Debug)]
pub struct TcpStats {
    pub downstream_cx_total: Arc<Stat>,
    pub downstream_cx_rx_bytes_total: Arc<Stat>,
    pub downstream_cx_tx_bytes_total: Arc<Stat>,
    pub idle_timeout: Arc<Stat>,
    pub downstream_cx_no_route: Arc<Stat>,
    pub upstream_flush_total: Arc<Stat>,
}

impl TcpStats {
    pub fn new(registry: &Registry, prefix: &str) -> Self {
        let c = |n: &str| registry.counter(format!("tcp.{prefix}.{n}"));
        TcpStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_rx_bytes_total: c("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: c("downstream_cx_tx_bytes_total"),
            idle_timeout: c("idle_timeout"),
            downstream_cx_no_route: c("downstream_cx_no_route"),
            upstream_flush_total: c("upstream_flush_total"),
        }
    }
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard(Held);

/// The gauge a [`GaugeGuard`] holds up: a stat of its own, or one in a cluster's block.
#[derive(Debug)]
enum Held {
    Stat(Arc<Stat>),
    Cluster(Arc<ClusterStats>, fn(&ClusterStats) -> &Stat),
}

impl GaugeGuard {
    pub fn new(gauge: &Arc<Stat>) -> Self {
        gauge.inc();
        GaugeGuard(Held::Stat(gauge.clone()))
    }

    /// Holds up the gauge `field` picks in a cluster's stats.
    pub fn cluster(stats: &Arc<ClusterStats>, field: fn(&ClusterStats) -> &Stat) -> Self {
        field(stats).inc();
        GaugeGuard(Held::Cluster(stats.clone(), field))
    }

    /// Takes one unit of a gauge that doubles as a limit, unless it is already at `max`; one
    /// atomic step, so concurrent callers on other workers cannot both slip under the limit.
    pub fn try_acquire(gauge: &Arc<Stat>, max: u64) -> Option<Self> {
        gauge
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| GaugeGuard(Held::Stat(gauge.clone())))
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        match &self.0 {
            Held::Stat(gauge) => gauge.dec(),
            Held::Cluster(stats, field) => field(stats).dec(),
        }
    }
}

impl Stat {
    /// Sets a gauge to an absolute value.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
        self.1.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_shows_under_its_prefix_sorted_among_single_stats() {
        let registry = Registry::default();
        let first = ClusterStats::new(&registry, "b:80");
        first.upstream_rq_total.add(3);
        first.upstream_rq_time.record(7);
        registry.counter("cluster.b_80.zz_single").inc();
        registry.counter("cluster.a.single").inc();
        // The same cluster name gets the same block: counts survive an update of the cluster.
        let again = ClusterStats::new(&registry, "b:80");
        assert!(Arc::ptr_eq(&first, &again));

        let names: Vec<String> = registry
            .snapshot(&|_| true)
            .into_iter()
            .map(|s| s.name)
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "one sorted list");
        assert_eq!(names.first().map(String::as_str), Some("cluster.a.single"));
        assert_eq!(
            names.last().map(String::as_str),
            Some("cluster.b_80.zz_single")
        );
        let total = registry
            .snapshot(&|s| s.name == "cluster.b_80.upstream_rq_total")
            .pop()
            .expect("the block's counter, by its Envoy name");
        assert_eq!((total.value, total.kind), (3, Kind::Counter));
        let active = registry
            .snapshot(&|s| s.name == "cluster.b_80.upstream_rq_active")
            .pop()
            .expect("a gauge of the block");
        assert_eq!(active.kind, Kind::Gauge);
        let histograms = registry.histogram_snapshots(&|name, _| name.starts_with("cluster.b_80"));
        let names: Vec<&str> = histograms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "cluster.b_80.upstream_cx_connect_ms",
                "cluster.b_80.upstream_cx_length_ms",
                "cluster.b_80.upstream_rq_per_cx",
                "cluster.b_80.upstream_rq_time",
            ]
        );
        assert_eq!(histograms[3].1.count(), 1);
    }
}
