//! Draining: a listener (or the whole server) tells its open connections to finish what they
//! are doing and close, and waits for them up to the drain time before closing them hard.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Finish in-flight work, accept no new streams.
    Draining,
    /// Close now.
    Closed,
}

#[derive(Debug)]
struct Inner {
    phase: watch::Sender<Phase>,
    active: AtomicUsize,
    idle: Notify,
}

/// Owned by whoever decides to drain (a listener).
#[derive(Debug, Clone)]
pub struct Drain(Arc<Inner>);

/// Held by every connection while it is open.
#[derive(Debug)]
pub struct Watch {
    inner: Arc<Inner>,
    rx: watch::Receiver<Phase>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let (phase, _) = watch::channel(Phase::Running);
        Drain(Arc::new(Inner {
            phase,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        }))
    }

    /// Registers a connection.
    pub fn watch(&self) -> Watch {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        Watch {
            inner: self.0.clone(),
            rx: self.0.phase.subscribe(),
        }
    }

    pub fn active(&self) -> usize {
        self.0.active.load(Ordering::Acquire)
    }

    pub fn phase(&self) -> Phase {
        *self.0.phase.borrow()
    }

    /// Asks connections to drain, waits up to `deadline` for them, then closes the rest.
    pub async fn drain(&self, deadline: Duration) {
        self.0.phase.send_replace(Phase::Draining);
        let all_closed = async {
            loop {
                let notified = self.0.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(deadline, all_closed).await.is_err() {
            self.0.phase.send_replace(Phase::Closed);
        }
    }

    /// Signals draining without waiting.
    pub fn start_draining(&self) {
        self.0.phase.send_if_modified(|phase| {
            if *phase == Phase::Running {
                *phase = Phase::Draining;
                true
            } else {
                false
            }
        });
    }
}

impl Watch {
    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&mut self, phase: Phase) {
        loop {
            let current = *self.rx.borrow_and_update();
            if current >= phase {
                return;
            }
            if self.rx.changed().await.is_err() {
                // The drain owner is gone: nothing will ever drain this connection.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves with the phase once it moves beyond `seen`.
    pub async fn next(&mut self, seen: Phase) -> Phase {
        loop {
            let current = *self.rx.borrow_and_update();
            if current > seen {
                return current;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow() >= Phase::Draining
    }

    /// A cheap check for a phase change, for a loop that polls [`Watch::next`] only once told.
    pub fn probe(&self) -> Probe {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        Probe(rx)
    }
}

/// See [`Watch::probe`].
#[derive(Debug)]
pub struct Probe(watch::Receiver<Phase>);

impl Probe {
    /// Whether the phase changed since the last call (one atomic load when it did not).
    pub fn moved(&mut self) -> bool {
        let moved = self.0.has_changed().unwrap_or(false);
        if moved {
            self.0.mark_unchanged();
        }
        moved
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}
