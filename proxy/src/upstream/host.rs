//! Upstream hosts. A [`Host`] is one endpoint as the current config describes it (address,
//! host name, weight, priority, locality, EDS health); its [`HostState`] is what Remora knows
//! about the host from running (stats, in-flight counts, health flags from active checks and
//! outlier detection). The state lives in the cluster's registry keyed by address, so an EDS
//! or CDS update that keeps a host keeps its state, and the pools keep its connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::{HealthStatus, LbEndpoint, Locality};
use crate::stats::{Kind, Stat};

/// One endpoint, as the config describes it now.
#[derive(Debug)]
pub struct Host {
    pub addr: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    pub priority: u32,
    pub locality: Arc<Locality>,
    pub eds_health: HealthStatus,
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
    pub fn new(addr: SocketAddr, endpoint: &LbEndpoint, state: Arc<HostState>) -> Self {
        Host {
            addr,
            hostname: endpoint.hostname.clone(),
            weight: endpoint.weight.max(1),
            priority: endpoint.priority,
            locality: endpoint.locality.clone(),
            eds_health: endpoint.health,
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
            eds_health: HealthStatus::Healthy,
            state: Arc::default(),
        }
    }

    pub fn health(&self) -> Health {
        if self.state.flags() & HostState::FAILED_ANY != 0 {
            return Health::Unhealthy;
        }
        match self.eds_health {
            HealthStatus::Unknown | HealthStatus::Healthy => Health::Healthy,
            HealthStatus::Degraded => Health::Degraded,
            HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout => {
                Health::Unhealthy
            }
        }
    }

    pub fn stats(&self) -> &HostStats {
        &self.state.stats
    }
}

/// What Remora learns about a host while running it; outlives config updates that keep the
/// host's address.
#[derive(Debug, Default)]
pub struct HostState {
    pub stats: HostStats,
    /// Health flags set at run time (active health checks, outlier detection).
    flags: AtomicU32,
}

impl HostState {
    /// Failed an active health check.
    pub const FAILED_ACTIVE_HC: u32 = 1;
    /// Ejected by outlier detection.
    pub const FAILED_OUTLIER_CHECK: u32 = 1 << 1;
    const FAILED_ANY: u32 = Self::FAILED_ACTIVE_HC | Self::FAILED_OUTLIER_CHECK;

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
        (before & flag != 0) != on
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
