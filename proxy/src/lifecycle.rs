//! Where the server stands (initializing, live, draining) and how it is asked to stop: what
//! the admin endpoints, the xDS client and the process wiring share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
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
    live: Arc<crate::stats::Stat>,
}

impl Lifecycle {
    pub(crate) fn new(registry: &Registry) -> (Arc<Self>, watch::Receiver<Stop>) {
        let (stop, stopped) = watch::channel(Stop::Running);
        let lifecycle = Arc::new(Lifecycle {
            state: AtomicU8::new(State::Initializing as u8),
            stop,
            started: Instant::now(),
            live: registry.gauge("server.live"),
        });
        (lifecycle, stopped)
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            1 => State::Live,
            2 => State::Draining,
            _ => State::Initializing,
        }
    }

    /// The initial configuration is in: `/ready` answers 200 and `server.live` is 1.
    pub fn set_live(&self) {
        let before = self.state.swap(State::Live as u8, Ordering::AcqRel);
        self.live.set(1);
        if before == State::Initializing as u8 {
            // Start-up is over: its code need not stay resident.
            crate::memory::page_out_startup_code();
        }
    }

    pub(crate) fn set_draining(&self) {
        self.state.store(State::Draining as u8, Ordering::Release);
    }

    pub fn request_stop(&self, stop: Stop) {
        self.stop.send_replace(stop);
    }
}
