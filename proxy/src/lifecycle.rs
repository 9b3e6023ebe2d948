//! Where the server stands (initializing, live, draining) and how it is asked to stop: what
//! the admin endpoints, the xDS client and the process wiring share.
//!
//! Initialization has parts, as Envoy's init manager has targets: the static resources (their
//! clusters' first health checks and the secrets they and the static listeners name) and,
//! with `dynamic_resources`, the xDS client's initial fetch. The server goes live when the
//! last part is done.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use tokio::sync::watch;

use crate::stats::Registry;

/// Server state as `/ready` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Initializing = 0,
    Live = 1,
    Draining = 2,
}

/// A part of initialization the server waits for before it goes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum InitPart {
    /// Static clusters' first health checks, and the secrets static listeners and clusters name.
    Static = 1,
    /// The xDS client's initial fetch and the warming of what it brought.
    Xds = 2,
}

/// Why the server is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// SIGTERM: drain, then exit.
    Drain,
    /// `/quitquitquit` or SIGINT: exit now.
    Quit,
}

/// The server's state and the way to ask it to stop.
#[derive(Debug)]
pub struct Lifecycle {
    state: AtomicU8,
    stop: watch::Sender<Stop>,
    pub started: Instant,
    /// `server.live`: 1 unless draining, initializing included, as in Envoy.
    live: Arc<crate::stats::Stat>,
    /// `server.state` as Envoy numbers it: 0 live, 1 draining, 3 initializing.
    state_gauge: Arc<crate::stats::Stat>,
    /// `listener_manager.workers_started`: 1 once the server is live, as Envoy's workers start
    /// serving only then.
    workers_started: Arc<crate::stats::Stat>,
    /// `server.initialization_time_ms`: from start to live, once.
    initialization_time: Arc<crate::stats::Histogram>,
    /// The [`InitPart`]s not done yet, as bits.
    waiting: AtomicU8,
    /// `/healthcheck/fail` was posted (and no `/healthcheck/ok` since): health checks fail.
    health_check_failed: AtomicBool,
}

impl Lifecycle {
    /// A lifecycle initializing until each of `parts` is done.
    pub(crate) fn new(
        registry: &Registry,
        parts: &[InitPart],
    ) -> (Arc<Self>, watch::Receiver<Stop>) {
        let (stop, stopped) = watch::channel(Stop::Running);
        let lifecycle = Arc::new(Lifecycle {
            state: AtomicU8::new(State::Initializing as u8),
            stop,
            started: Instant::now(),
            live: registry.gauge("server.live"),
            state_gauge: registry.gauge("server.state"),
            workers_started: registry.gauge("listener_manager.workers_started"),
            initialization_time: registry.histogram("server.initialization_time_ms"),
            waiting: AtomicU8::new(parts.iter().fold(0, |bits, part| bits | *part as u8)),
            health_check_failed: AtomicBool::new(false),
        });
        lifecycle.live.set(1);
        lifecycle.state_gauge.set(3);
        (lifecycle, stopped)
    }

    /// Whether `part` of initialization is still to be done.
    pub fn waiting_for(&self, part: InitPart) -> bool {
        self.waiting.load(Ordering::Acquire) & part as u8 != 0
    }

    /// `part` of initialization is done; the server goes live if it was the last.
    pub fn init_done(&self, part: InitPart) {
        let before = self.waiting.fetch_and(!(part as u8), Ordering::AcqRel);
        if before & part as u8 == 0 {
            return;
        }
        if before & !(part as u8) == 0 {
            tracing::info!(?part, "initialization done; server is live");
            self.set_live();
        } else {
            tracing::info!(
                ?part,
                "initialization part done; still waiting for the rest"
            );
        }
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            1 => State::Live,
            2 => State::Draining,
            _ => State::Initializing,
        }
    }

    /// The initial configuration is in: `/ready` answers 200 and `server.state` is 0.
    fn set_live(&self) {
        let went_live = self
            .state
            .compare_exchange(
                State::Initializing as u8,
                State::Live as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if went_live {
            self.state_gauge.set(0);
            self.workers_started.set(1);
            self.initialization_time
                .record_duration(self.started.elapsed());
            // Start-up is over: its code need not stay resident.
            crate::memory::page_out_startup_code_soon();
        }
    }

    /// What `/ready` and `/server_info` report: draining while health checks are failed, as
    /// in Envoy, though nothing else drains.
    pub fn reported_state(&self) -> State {
        match self.state() {
            State::Live if self.health_check_failed() => State::Draining,
            state => state,
        }
    }

    /// Whether `/healthcheck/fail` holds: the health check filter answers 503 and every
    /// connection closes after its current response, as in Envoy.
    pub fn health_check_failed(&self) -> bool {
        self.health_check_failed.load(Ordering::Relaxed)
    }

    /// `/healthcheck/fail` (`true`) or `/healthcheck/ok` (`false`).
    pub fn fail_health_checks(&self, failed: bool) {
        self.health_check_failed.store(failed, Ordering::Relaxed);
        let draining = self.state() == State::Draining;
        self.live.set(u64::from(!failed && !draining));
    }

    pub(crate) fn set_draining(&self) {
        self.state.store(State::Draining as u8, Ordering::Release);
        self.live.set(0);
        self.state_gauge.set(1);
    }

    pub fn request_stop(&self, stop: Stop) {
        self.stop.send_replace(stop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_live_once_every_part_of_initialization_is_done() {
        let registry = Registry::default();
        let (lifecycle, _) = Lifecycle::new(&registry, &[InitPart::Static, InitPart::Xds]);
        let state = registry.gauge("server.state");
        let live = registry.gauge("server.live");
        assert_eq!((lifecycle.state(), state.get()), (State::Initializing, 3));
        assert_eq!(live.get(), 1, "not draining");
        lifecycle.init_done(InitPart::Xds);
        lifecycle.init_done(InitPart::Xds);
        assert!(!lifecycle.waiting_for(InitPart::Xds));
        assert_eq!((lifecycle.state(), state.get()), (State::Initializing, 3));
        lifecycle.init_done(InitPart::Static);
        assert_eq!((lifecycle.state(), state.get()), (State::Live, 0));
        assert_eq!(live.get(), 1);
    }

    #[test]
    fn failed_health_checks_report_draining_until_ok() {
        let registry = Registry::default();
        let (lifecycle, _) = Lifecycle::new(&registry, &[InitPart::Static]);
        lifecycle.init_done(InitPart::Static);
        lifecycle.fail_health_checks(true);
        assert!(lifecycle.health_check_failed());
        assert_eq!(lifecycle.reported_state(), State::Draining);
        assert_eq!(lifecycle.state(), State::Live, "nothing drains");
        assert_eq!(registry.gauge("server.live").get(), 0);
        assert_eq!(registry.gauge("server.state").get(), 0);
        lifecycle.fail_health_checks(false);
        assert_eq!(lifecycle.reported_state(), State::Live);
        assert_eq!(registry.gauge("server.live").get(), 1);
    }

    #[test]
    fn a_server_draining_before_it_was_live_stays_draining() {
        let registry = Registry::default();
        let (lifecycle, _) = Lifecycle::new(&registry, &[InitPart::Static]);
        lifecycle.set_draining();
        lifecycle.init_done(InitPart::Static);
        assert_eq!(lifecycle.state(), State::Draining);
        assert_eq!(registry.gauge("server.live").get(), 0);
        assert_eq!(registry.gauge("server.state").get(), 1);
    }
}
