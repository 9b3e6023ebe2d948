//! The config store: one immutable [`Snapshot`] of the route tables (RDS) and clusters in use,
//! swapped atomically. A request loads the snapshot once and reads its routes and clusters
//! from it, so it sees one consistent view even while xDS updates land. Listeners are not in
//! it: a connection keeps the listener config it was accepted with (see `listener`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::RouteTable;
use crate::upstream::Cluster;

/// A map by config name, looked up on every request: foldhash, as SipHash costs more than the
/// lookup's other work. The keys come from config, so a request cannot grow colliding ones.
pub type ByName<T> = HashMap<String, T, foldhash::fast::RandomState>;

/// The route tables and clusters in use at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// RDS route configurations by name (inline ones live in their listener's config).
    pub routes: ByName<Arc<RouteTable>>,
    pub clusters: ByName<Arc<Cluster>>,
}

impl Snapshot {
    #[inline]
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }
}

/// Holds the current snapshot; readers never block, writers take turns.
#[derive(Debug, Default)]
pub struct Store {
    current: ArcSwap<Snapshot>,
    write: Mutex<()>,
}

impl Store {
    /// The snapshot in use now.
    #[inline]
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes a change: `change` edits a copy of the current snapshot, which then replaces it.
    pub fn update<T>(&self, change: impl FnOnce(&mut Snapshot) -> T) -> T {
        let _turn = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = (**self.current.load()).clone();
        let result = change(&mut next);
        self.current.store(Arc::new(next));
        result
    }
}
