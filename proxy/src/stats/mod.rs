//! Stats: counters and gauges registered at config time under Envoy's names and updated on the
//! hot path through `Arc<AtomicU64>` handles (no string lookups per request). Handles are
//! get-or-create by name, so stats survive config swaps.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// The registry (only touched at config time and by the admin endpoint).
#[derive(Debug, Default)]
pub struct Registry {
    stats: Mutex<BTreeMap<String, (Kind, Arc<Stat>)>>,
}

impl Registry {
    fn get(&self, name: String, kind: Kind) -> Arc<Stat> {
        let mut stats = self
            .stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
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

    /// A copy of every stat `shown` selects, sorted by name.
    pub fn snapshot(&self, shown: &dyn Fn(&StatValue) -> bool) -> Vec<StatValue> {
        let stats = self
            .stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stats
            .iter()
            .map(|(name, (kind, stat))| StatValue {
                name: name.clone(),
                kind: *kind,
                value: stat.get(),
                used: stat.used(),
            })
            .filter(|stat| shown(stat))
            .collect()
    }

    /// Envoy's `/stats` text format: `name: value` per line.
    pub fn render_text(&self, shown: &dyn Fn(&StatValue) -> bool) -> String {
        let mut out = String::new();
        for StatValue { name, value, .. } in self.snapshot(shown) {
            out.push_str(&format!("{name}: {value}\n"));
        }
        out
    }

    /// Prometheus text exposition, with Envoy's `envoy_` prefix and dots as underscores.
    pub fn render_prometheus(&self, shown: &dyn Fn(&StatValue) -> bool) -> String {
        let mut out = String::new();
        for StatValue {
            name, kind, value, ..
        } in self.snapshot(shown)
        {
            let metric: String = format!("envoy_{name}")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            out.push_str(&format!("# TYPE {metric} {kind}\n{metric} {value}\n"));
        }
        out
    }
}

/// `cluster.NAME.*`
#[derive(Debug)]
pub struct ClusterStats {
    pub upstream_rq_total: Arc<Stat>,
    pub upstream_rq_active: Arc<Stat>,
    pub upstream_rq_active_overflow: Arc<Stat>,
    pub upstream_rq_2xx: Arc<Stat>,
    pub upstream_rq_3xx: Arc<Stat>,
    pub upstream_rq_4xx: Arc<Stat>,
    pub upstream_rq_5xx: Arc<Stat>,
    pub upstream_rq_timeout: Arc<Stat>,
    pub upstream_rq_pending_total: Arc<Stat>,
    pub upstream_rq_pending_active: Arc<Stat>,
    pub upstream_rq_pending_overflow: Arc<Stat>,
    pub upstream_cx_total: Arc<Stat>,
    pub upstream_cx_active: Arc<Stat>,
    pub upstream_cx_connect_fail: Arc<Stat>,
    pub upstream_cx_overflow: Arc<Stat>,
    pub upstream_cx_idle_timeout: Arc<Stat>,
    pub upstream_cx_tx_bytes_total: Arc<Stat>,
    pub upstream_cx_rx_bytes_total: Arc<Stat>,
    pub upstream_cx_none_healthy: Arc<Stat>,
    pub membership_total: Arc<Stat>,
    pub membership_healthy: Arc<Stat>,
    pub membership_degraded: Arc<Stat>,
    /// Picks made from all hosts because too few were healthy (panic).
    pub lb_healthy_panic: Arc<Stat>,
    /// DNS clusters: resolution rounds, and those whose lookups all succeeded or not.
    pub update_attempt: Arc<Stat>,
    pub update_success: Arc<Stat>,
    pub update_failure: Arc<Stat>,
}

impl ClusterStats {
    pub fn new(registry: &Registry, cluster: &str) -> Self {
        let c = |n: &str| registry.counter(format!("cluster.{cluster}.{n}"));
        let g = |n: &str| registry.gauge(format!("cluster.{cluster}.{n}"));
        ClusterStats {
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_active: g("upstream_rq_active"),
            upstream_rq_active_overflow: c("upstream_rq_active_overflow"),
            upstream_rq_2xx: c("upstream_rq_2xx"),
            upstream_rq_3xx: c("upstream_rq_3xx"),
            upstream_rq_4xx: c("upstream_rq_4xx"),
            upstream_rq_5xx: c("upstream_rq_5xx"),
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_pending_total: c("upstream_rq_pending_total"),
            upstream_rq_pending_active: g("upstream_rq_pending_active"),
            upstream_rq_pending_overflow: c("upstream_rq_pending_overflow"),
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: g("upstream_cx_active"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_overflow: c("upstream_cx_overflow"),
            upstream_cx_idle_timeout: c("upstream_cx_idle_timeout"),
            upstream_cx_tx_bytes_total: c("upstream_cx_tx_bytes_total"),
            upstream_cx_rx_bytes_total: c("upstream_cx_rx_bytes_total"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            membership_total: g("membership_total"),
            membership_healthy: g("membership_healthy"),
            membership_degraded: g("membership_degraded"),
            lb_healthy_panic: c("lb_healthy_panic"),
            update_attempt: c("update_attempt"),
            update_success: c("update_success"),
            update_failure: c("update_failure"),
        }
    }

    pub fn response(&self, status: u16) {
        match status {
            200..=299 => self.upstream_rq_2xx.inc(),
            300..=399 => self.upstream_rq_3xx.inc(),
            400..=499 => self.upstream_rq_4xx.inc(),
            _ => self.upstream_rq_5xx.inc(),
        }
    }
}

/// `http.PREFIX.*`
#[derive(Debug)]
pub struct HttpStats {
    pub downstream_rq_total: Arc<Stat>,
    pub downstream_rq_active: Arc<Stat>,
    pub downstream_rq_1xx: Arc<Stat>,
    pub downstream_rq_2xx: Arc<Stat>,
    pub downstream_rq_3xx: Arc<Stat>,
    pub downstream_rq_4xx: Arc<Stat>,
    pub downstream_rq_5xx: Arc<Stat>,
    pub downstream_cx_total: Arc<Stat>,
    pub downstream_cx_active: Arc<Stat>,
    pub downstream_rq_timeout: Arc<Stat>,
    pub downstream_rq_idle_timeout: Arc<Stat>,
    pub no_route: Arc<Stat>,
    pub no_cluster: Arc<Stat>,
    /// The CORS filter's origin checks (`http.PREFIX.cors.origin_valid|origin_invalid`).
    pub cors_origin_valid: Arc<Stat>,
    pub cors_origin_invalid: Arc<Stat>,
}

impl HttpStats {
    pub fn new(registry: &Registry, prefix: &str) -> Self {
        let c = |n: &str| registry.counter(format!("http.{prefix}.{n}"));
        let g = |n: &str| registry.gauge(format!("http.{prefix}.{n}"));
        HttpStats {
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_active: g("downstream_rq_active"),
            downstream_rq_1xx: c("downstream_rq_1xx"),
            downstream_rq_2xx: c("downstream_rq_2xx"),
            downstream_rq_3xx: c("downstream_rq_3xx"),
            downstream_rq_4xx: c("downstream_rq_4xx"),
            downstream_rq_5xx: c("downstream_rq_5xx"),
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: g("downstream_cx_active"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            downstream_rq_idle_timeout: c("downstream_rq_idle_timeout"),
            no_route: c("no_route"),
            no_cluster: c("no_cluster"),
            cors_origin_valid: c("cors.origin_valid"),
            cors_origin_invalid: c("cors.origin_invalid"),
        }
    }

    pub fn response(&self, status: u16) {
        match status {
            100..=199 => self.downstream_rq_1xx.inc(),
            200..=299 => self.downstream_rq_2xx.inc(),
            300..=399 => self.downstream_rq_3xx.inc(),
            400..=499 => self.downstream_rq_4xx.inc(),
            _ => self.downstream_rq_5xx.inc(),
        }
    }
}

/// `listener.ADDR.*`
#[derive(Debug)]
pub struct ListenerStats {
    pub downstream_cx_total: Arc<Stat>,
    pub downstream_cx_active: Arc<Stat>,
    pub no_filter_chain_match: Arc<Stat>,
    /// Connections closed at once: the listener's `connection_limit` was reached.
    pub downstream_cx_overflow: Arc<Stat>,
    /// Connections closed at once: `global_downstream_max_connections` was reached.
    pub downstream_global_cx_overflow: Arc<Stat>,
}

impl ListenerStats {
    pub fn new(registry: &Registry, addr: &str) -> Self {
        // Envoy's stat names have no ':' (it becomes '_'): `listener.127.0.0.1_15001.…`.
        let addr = addr.replace(':', "_");
        ListenerStats {
            downstream_cx_total: registry.counter(format!("listener.{addr}.downstream_cx_total")),
            downstream_cx_active: registry.gauge(format!("listener.{addr}.downstream_cx_active")),
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
pub struct GaugeGuard(Arc<Stat>);

impl GaugeGuard {
    pub fn new(gauge: &Arc<Stat>) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
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
            .map(|_| GaugeGuard(gauge.clone()))
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Stat {
    /// Sets a gauge to an absolute value.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
        self.1.0.store(true, Ordering::Relaxed);
    }
}
