//! Upstream hosts. A [`Host`] is one endpoint as the current config describes it (address,
//! host name, weight, priority, locality, EDS health); its [`HostState`] is what Remora knows
//! about the host from running (stats, in-flight counts, health flags from active checks and
//! outlier detection, when it became usable, its response-time estimate). The state lives in the cluster's registry keyed by address, so an EDS
//! or CDS update that keeps a host keeps its state, and the pools keep its connections.

mod latency;
mod outlier_counters;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use latency::Latency;
pub use outlier_counters::{EjectionRecord, OutlierCounters, Run, Runs};

use super::clock;
use crate::config::{EndpointHealthCheck, HealthStatus, LbEndpoint, Locality};
use crate::stats::{Kind, Stat};

/// One endpoint, as the config describes it now.
#[derive(Debug)]
pub struct Host {
    pub addr: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    pub priority: u32,
    pub locality: Arc<Locality>,
    /// The locality's `load_balancing_weight` (locality weighted balancing).
    pub locality_weight: Option<u32>,
    pub eds_health: HealthStatus,
    /// The endpoint's `health_check_config`, shared with it (see [`Host::health_check`]).
    health_check: Option<Arc<EndpointHealthCheck>>,
    pub state: Arc<HostState>,
}

/// How a host may be used, combining EDS health and what was learnt at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Used only when healthy hosts fall short (EDS `DEGRADED`).
    Degraded,
    Unhealthy,
}

impl Host {
    /// Where and how active health checks reach this host.
    pub fn health_check(&self) -> &EndpointHealthCheck {
        self.health_check
            .as_deref()
            .unwrap_or(EndpointHealthCheck::none())
    }

    pub fn new(addr: SocketAddr, endpoint: &LbEndpoint, state: Arc<HostState>) -> Self {
        Host {
            addr,
            hostname: endpoint.hostname.clone(),
            weight: endpoint.weight.max(1),
            priority: endpoint.priority,
            locality: endpoint.locality.clone(),
            locality_weight: endpoint.locality_weight,
            eds_health: endpoint.health,
            health_check: endpoint.health_check_config.clone(),
            state,
        }
    }

    /// A host made for one connection's original destination (ORIGINAL_DST clusters).
    pub fn original_destination(addr: SocketAddr) -> Self {
        Host {
            addr,
            hostname: String::new(),
            weight: 1,
            priority: 0,
            locality: Arc::default(),
            locality_weight: None,
            eds_health: HealthStatus::Healthy,
            health_check: None,
            state: Arc::default(),
        }
    }

    /// As Envoy: any failure flag (active checks, outlier ejection, EDS) makes the host
    /// unhealthy; otherwise a degraded flag (active checks, EDS) makes it degraded.
    pub fn health(&self) -> Health {
        let flags = self.state.flags();
        if flags & HostState::FAILED_ANY != 0 {
            return Health::Unhealthy;
        }
        match self.eds_health {
            HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout => {
                Health::Unhealthy
            }
            HealthStatus::Degraded => Health::Degraded,
            HealthStatus::Unknown | HealthStatus::Healthy
                if flags & HostState::DEGRADED_ACTIVE_HC != 0 =>
            {
                Health::Degraded
            }
            HealthStatus::Unknown | HealthStatus::Healthy => Health::Healthy,
        }
    }

    /// Left out of the load balancer's availability and panic sums, as Envoy's excluded hosts:
    /// waiting for a first health check (`ignore_new_hosts_until_first_hc`), or taken out by
    /// `x-envoy-immediate-health-check-fail`.
    pub fn excluded(&self) -> bool {
        self.state.flags()
            & (HostState::PENDING_ACTIVE_HC | HostState::EXCLUDED_VIA_IMMEDIATE_HC_FAIL)
            != 0
    }

    pub fn stats(&self) -> &HostStats {
        &self.state.stats
    }
}

/// What Remora learns about a host while running it; outlives config updates that keep the
/// host's address.
#[derive(Debug)]
pub struct HostState {
    pub stats: HostStats,
    /// Health flags set at run time (active health checks, outlier detection), with Envoy's
    /// bit values (the EDS flags are the `Host`'s).
    flags: AtomicU32,
    /// Outlier detection's counters, updated on the request path with atomics only.
    pub outlier: OutlierCounters,
    /// The active checker's counts; only the main runtime touches them.
    pub active: Mutex<ActiveCounts>,
    /// When the host became usable ([`clock`] microseconds): when it joined, or when it passed
    /// an active health check after failing one. Slow start counts from here, as Envoy counts
    /// from the host's creation or last health check pass.
    usable_since: AtomicU64,
    /// Response-time estimate (the peak-EWMA policy).
    pub latency: Latency,
}

impl Default for HostState {
    fn default() -> Self {
        HostState {
            stats: HostStats::default(),
            flags: AtomicU32::new(0),
            outlier: OutlierCounters::default(),
            active: Mutex::default(),
            usable_since: AtomicU64::new(clock::now_micros()),
            latency: Latency::default(),
        }
    }
}

/// Where a host stands with its active checker (Envoy's per-session counters).
#[derive(Debug, Clone, Copy)]
pub struct ActiveCounts {
    pub healthy: u32,
    pub unhealthy: u32,
    /// No check has completed yet.
    pub first_check: bool,
}

impl Default for ActiveCounts {
    fn default() -> Self {
        ActiveCounts {
            healthy: 0,
            unhealthy: 0,
            first_check: true,
        }
    }
}

impl HostState {
    /// Failed an active health check (or has not passed its first one yet).
    pub const FAILED_ACTIVE_HC: u32 = 0x1;
    /// Ejected by outlier detection.
    pub const FAILED_OUTLIER_CHECK: u32 = 0x2;
    /// An active health check answered `x-envoy-degraded`.
    pub const DEGRADED_ACTIVE_HC: u32 = 0x8;
    /// Removed by discovery but kept while its health checks pass.
    pub const PENDING_DYNAMIC_REMOVAL: u32 = 0x20;
    /// New, and excluded until its first health check (`ignore_new_hosts_until_first_hc`).
    pub const PENDING_ACTIVE_HC: u32 = 0x40;
    /// Taken out by `x-envoy-immediate-health-check-fail` until a check passes.
    pub const EXCLUDED_VIA_IMMEDIATE_HC_FAIL: u32 = 0x80;
    /// Its last active health check failed by timing out.
    pub const ACTIVE_HC_TIMEOUT: u32 = 0x100;
    /// Every flag the active checker owns.
    pub const ACTIVE_FLAGS: u32 = Self::FAILED_ACTIVE_HC
        | Self::DEGRADED_ACTIVE_HC
        | Self::PENDING_DYNAMIC_REMOVAL
        | Self::PENDING_ACTIVE_HC
        | Self::EXCLUDED_VIA_IMMEDIATE_HC_FAIL
        | Self::ACTIVE_HC_TIMEOUT;
    const FAILED_ANY: u32 = Self::FAILED_ACTIVE_HC | Self::FAILED_OUTLIER_CHECK;

    pub fn has(&self, flag: u32) -> bool {
        self.flags() & flag != 0
    }

    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    /// Sets or clears `flag`; whether that changed anything.
    pub fn set_flag(&self, flag: u32, on: bool) -> bool {
        let before = if on {
            self.flags.fetch_or(flag, Ordering::AcqRel)
        } else {
            self.flags.fetch_and(!flag, Ordering::AcqRel)
        };
        let changed = (before & flag != 0) != on;
        if changed && !on && flag == Self::FAILED_ACTIVE_HC {
            self.usable_since
                .store(clock::now_micros(), Ordering::Release);
        }
        changed
    }

    /// When the host became usable (see the field), in [`clock`] microseconds.
    pub fn usable_since(&self) -> u64 {
        self.usable_since.load(Ordering::Acquire)
    }

    /// Pretends the host became usable at `micros` (for tests of slow start).
    #[cfg(test)]
    pub fn set_usable_since(&self, micros: u64) {
        self.usable_since.store(micros, Ordering::Release);
    }
}

/// One host's counters and gauges: Envoy's per-host stats, as `/clusters` lists them.
#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_active: Stat,
    pub cx_connect_fail: Stat,
    pub cx_total: Stat,
    pub rq_active: Stat,
    /// Requests that got no response, or a 5xx.
    pub rq_error: Stat,
    pub rq_pending_active: Stat,
    /// Requests that got a response below 500.
    pub rq_success: Stat,
    pub rq_timeout: Stat,
    pub rq_total: Stat,
}

impl HostStats {
    /// Every stat with its name and kind, sorted by name as Envoy's `/clusters` prints them.
    pub fn list(&self) -> [(&'static str, Kind, u64); 9] {
        use Kind::{Counter, Gauge};
        [
            ("cx_active", Gauge, self.cx_active.get()),
            ("cx_connect_fail", Counter, self.cx_connect_fail.get()),
            ("cx_total", Counter, self.cx_total.get()),
            ("rq_active", Gauge, self.rq_active.get()),
            ("rq_error", Counter, self.rq_error.get()),
            ("rq_pending_active", Gauge, self.rq_pending_active.get()),
            ("rq_success", Counter, self.rq_success.get()),
            ("rq_timeout", Counter, self.rq_timeout.get()),
            ("rq_total", Counter, self.rq_total.get()),
        ]
    }
}

/// One unit of a host's gauge (`rq_active`, `cx_active`, `rq_pending_active`), given back when
/// dropped.
pub struct HostGauge {
    state: Arc<HostState>,
    gauge: fn(&HostStats) -> &Stat,
}

impl HostGauge {
    pub fn new(state: &Arc<HostState>, gauge: fn(&HostStats) -> &Stat) -> Self {
        gauge(&state.stats).inc();
        HostGauge {
            state: state.clone(),
            gauge,
        }
    }
}

impl Drop for HostGauge {
    fn drop(&mut self) {
        (self.gauge)(&self.state.stats).dec();
    }
}

impl std::fmt::Debug for HostGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostGauge").finish_non_exhaustive()
    }
}
