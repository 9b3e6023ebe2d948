//! A cluster's dynamic stats of upstream responses, as Envoy's router charges them when its
//! `dynamic_stats` is on (the default): `upstream_rq_completed`, `upstream_rq_<N>xx`,
//! `upstream_rq_<code>` and the `upstream_rq_time` histogram under `cluster.NAME`, and each
//! again under `cluster.NAME.external` or `cluster.NAME.internal`, by whether the request came
//! from an internal client (`x-envoy-internal`). They are made at first use, as Envoy makes
//! them: a cluster that never answers holds none, which keeps a thousand idle clusters small.
//! A response costs a few atomic adds; a status code not seen before takes a write lock once.

use std::sync::{Arc, OnceLock, RwLock};

use super::{ClusterStats, Histogram, Registry, Stat, stat_name};

/// Which of the three sets a stat belongs to.
#[derive(Debug, Clone, Copy)]
enum Scope {
    Plain = 0,
    External = 1,
    Internal = 2,
}

/// One set: `PREFIX.upstream_rq_*`.
#[derive(Debug)]
struct ScopeStats {
    completed: Arc<Stat>,
    /// `upstream_rq_1xx` .. `upstream_rq_5xx`, but those the cluster's fixed block has.
    classes: [OnceLock<Arc<Stat>>; 5],
    /// `upstream_rq_<code>`, as codes appear.
    codes: RwLock<Vec<(u16, Arc<Stat>)>>,
    /// `upstream_rq_time` (the plain set's is the fixed block's).
    time: Option<Arc<Histogram>>,
}

/// Where a response's `upstream_rq_time` goes: the cluster's own histogram and its
/// `external.` or `internal.` counterpart.
#[derive(Debug, Clone)]
pub struct ResponseTime {
    pub cluster: Arc<ClusterStats>,
    pub variant: Arc<Histogram>,
}

impl ResponseTime {
    pub fn record(&self, elapsed: std::time::Duration) {
        self.cluster.upstream_rq_time.record_duration(elapsed);
        self.variant.record_duration(elapsed);
    }
}

/// The dynamic response stats of one cluster.
#[derive(Debug)]
pub struct ResponseStats {
    registry: Arc<Registry>,
    /// `cluster.NAME`.
    prefix: Box<str>,
    /// The fixed stats of the cluster, whose class counters and `upstream_rq_time` are the
    /// plain set's.
    fixed: Arc<ClusterStats>,
    /// Boxed: a set is 130 bytes, and most of a thousand clusters never make one.
    scopes: [OnceLock<Box<ScopeStats>>; 3],
}

impl ResponseStats {
    pub fn new(registry: &Arc<Registry>, cluster: &str, fixed: &Arc<ClusterStats>) -> Self {
        ResponseStats {
            registry: registry.clone(),
            prefix: format!("cluster.{}", stat_name(cluster)).into(),
            fixed: fixed.clone(),
            scopes: Default::default(),
        }
    }

    /// Counts an upstream response with `status` to a request from an internal client or not.
    pub fn count(&self, status: u16, internal: bool) {
        for scope in [Scope::Plain, variant(internal)] {
            let stats = self.scope(scope);
            stats.completed.inc();
            self.class(scope, stats, status).inc();
            self.count_code(scope, stats, status);
        }
    }

    /// Where the `upstream_rq_time` of a response to such a request goes.
    pub fn time(&self, internal: bool) -> ResponseTime {
        let variant = self.scope(variant(internal));
        ResponseTime {
            cluster: self.fixed.clone(),
            variant: variant
                .time
                .clone()
                .expect("a variant set has its own histogram"),
        }
    }

    fn scope(&self, scope: Scope) -> &ScopeStats {
        self.scopes[scope as usize].get_or_init(|| {
            Box::new(ScopeStats {
                completed: self
                    .registry
                    .counter(self.name(scope, "upstream_rq_completed")),
                classes: Default::default(),
                codes: RwLock::default(),
                time: match scope {
                    Scope::Plain => None,
                    _ => Some(
                        self.registry
                            .histogram(self.name(scope, "upstream_rq_time")),
                    ),
                },
            })
        })
    }

    fn class<'a>(&'a self, scope: Scope, stats: &'a ScopeStats, status: u16) -> &'a Stat {
        let class = (status / 100).clamp(1, 5);
        match (scope, class) {
            (Scope::Plain, 2) => &self.fixed.upstream_rq_2xx,
            (Scope::Plain, 3) => &self.fixed.upstream_rq_3xx,
            (Scope::Plain, 4) => &self.fixed.upstream_rq_4xx,
            (Scope::Plain, 5) => &self.fixed.upstream_rq_5xx,
            _ => stats.classes[usize::from(class - 1)].get_or_init(|| {
                self.registry
                    .counter(self.name(scope, &format!("upstream_rq_{class}xx")))
            }),
        }
    }

    /// Adds one to `upstream_rq_<status>`, made the first time the code is seen.
    fn count_code(&self, scope: Scope, stats: &ScopeStats, status: u16) {
        let add = |codes: &[(u16, Arc<Stat>)]| {
            codes
                .iter()
                .find(|(code, _)| *code == status)
                .map(|(_, stat)| stat.inc())
                .is_some()
        };
        if add(&stats.codes.read().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let mut codes = stats.codes.write().unwrap_or_else(|p| p.into_inner());
        if add(&codes) {
            return;
        }
        let stat = self
            .registry
            .counter(self.name(scope, &format!("upstream_rq_{status}")));
        stat.inc();
        codes.push((status, stat));
    }

    fn name(&self, scope: Scope, stat: &str) -> String {
        match scope {
            Scope::Plain => format!("{}.{stat}", self.prefix),
            Scope::External => format!("{}.external.{stat}", self.prefix),
            Scope::Internal => format!("{}.internal.{stat}", self.prefix),
        }
    }
}

fn variant(internal: bool) -> Scope {
    if internal {
        Scope::Internal
    } else {
        Scope::External
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_count_under_envoys_names_once_each() {
        let registry = Arc::new(Registry::default());
        let fixed = ClusterStats::new(&registry, "app");
        let stats = ResponseStats::new(&registry, "app", &fixed);
        stats.count(200, false);
        stats.count(200, false);
        stats.count(503, true);
        let value = |name: &str| registry.counter(name).get();
        assert_eq!(value("cluster.app.upstream_rq_completed"), 3);
        assert_eq!(value("cluster.app.upstream_rq_200"), 2);
        assert_eq!(value("cluster.app.upstream_rq_503"), 1);
        assert_eq!(fixed.upstream_rq_2xx.get(), 2);
        assert_eq!(fixed.upstream_rq_5xx.get(), 1);
        assert_eq!(value("cluster.app.external.upstream_rq_completed"), 2);
        assert_eq!(value("cluster.app.external.upstream_rq_2xx"), 2);
        assert_eq!(value("cluster.app.external.upstream_rq_200"), 2);
        assert_eq!(value("cluster.app.internal.upstream_rq_503"), 1);
        assert_eq!(value("cluster.app.internal.upstream_rq_5xx"), 1);
        assert_eq!(value("cluster.app.internal.upstream_rq_200"), 0);
        let time = stats.time(false);
        assert!(Arc::ptr_eq(&time.cluster, &fixed));
        assert!(Arc::ptr_eq(
            &time.variant,
            &registry.histogram("cluster.app.external.upstream_rq_time")
        ));
    }
}
