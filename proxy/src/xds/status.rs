//! What the xDS client knows, for `/config_dump`: versions per type, the last error per
//! resource, the endpoints and warming clusters as received, and whether the stream is up.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::Value;

use crate::config::RawConfig;

/// What the xDS client knows: versions and the last error per resource.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<StatusSnapshot>,
}

#[derive(Debug, Default, Clone)]
pub struct StatusSnapshot {
    pub versions: BTreeMap<String, String>,
    pub errors: BTreeMap<(String, String), Value>,
    /// Each active ClusterLoadAssignment as received, for `/config_dump`.
    pub endpoints: BTreeMap<String, RawConfig>,
    pub warming_clusters: Vec<RawConfig>,
    /// Listeners waiting for their routes or secrets.
    pub warming_listeners: usize,
    pub connected: bool,
}

impl StatusSnapshot {
    pub fn version(&self, type_url: &str) -> String {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }
    pub fn error(&self, type_url: &str, name: &str) -> Option<Value> {
        self.errors
            .get(&(type_url.to_string(), name.to_string()))
            .cloned()
    }
    pub fn errors(&self) -> Vec<(String, String, Value)> {
        self.errors
            .iter()
            .map(|((t, n), v)| (t.clone(), n.clone(), v.clone()))
            .collect()
    }
}

impl Status {
    pub fn snapshot(&self) -> StatusSnapshot {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }
}
