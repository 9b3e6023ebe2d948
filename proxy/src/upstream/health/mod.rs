//! Health beyond EDS: [`active`] health checks (one session per host and cluster) and
//! [`outlier`] detection. Both run on the main runtime, never on request workers: the request
//! path only counts outcomes with atomics and, rarely, sends an [`Event`] to its cluster's
//! health task. Their state lives in the cluster's members (the [`Watched`] hosts), so it
//! survives CDS and EDS updates that keep a host.

pub mod active;
pub mod outlier;

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::host::HostState;
use crate::config::OutlierDetection;
use crate::stats::OutlierStats;

/// What the request path tells the cluster's health task.
#[derive(Debug)]
pub enum Event {
    /// A run of errors reached its outlier threshold.
    Consecutive(Arc<HostState>, outlier::EjectionKind),
    /// A response carried `x-envoy-immediate-health-check-fail`.
    ImmediateFail(Arc<HostState>),
}

/// The cluster's outlier settings and stats, as the health task uses them.
#[derive(Debug, Clone)]
pub struct OutlierSetup {
    pub config: OutlierDetection,
    pub stats: Arc<OutlierStats>,
    /// The cluster's name, for the event log.
    pub cluster: Arc<str>,
}

/// What the health tasks report to: the cluster's members, which own the hosts and rebuild
/// the usable sets when a host's health moves. A trait, so the health machinery needs nothing
/// from the cluster that runs it.
pub trait Watched: Send + Sync {
    /// The outlier detector's interval, while outlier detection is configured.
    fn outlier_interval(&self) -> Option<Duration>;
    /// The detector's work at each interval.
    fn outlier_tick(&self);
    /// An event from the request path.
    fn on_event(&self, event: Event);
    /// A session finished a check on `state`.
    fn after_check(&self, state: &Arc<HostState>, healthy: bool, changed: active::Transition);
}

/// The cluster's health task: handles events from the request path and runs the outlier
/// detector's interval while outlier detection is configured.
pub async fn supervise(members: Weak<dyn Watched>, mut events: UnboundedReceiver<Event>) {
    let mut next_tick: Option<(Instant, Duration)> = None;
    loop {
        let interval = match members.upgrade() {
            Some(owner) => owner.outlier_interval(),
            None => return,
        };
        // A changed interval restarts the timer, as a new detector would.
        next_tick = match (next_tick, interval) {
            (Some((at, every)), Some(interval)) if every == interval => Some((at, every)),
            (_, Some(interval)) => Some((Instant::now() + interval, interval)),
            (_, None) => None,
        };
        let tick = async {
            match next_tick {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return };
                let Some(owner) = members.upgrade() else { return };
                owner.on_event(event);
            }
            () = tick => {
                let Some(owner) = members.upgrade() else { return };
                owner.outlier_tick();
                if let Some((_, every)) = next_tick {
                    next_tick = Some((Instant::now() + every, every));
                }
            }
        }
    }
}
