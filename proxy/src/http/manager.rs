//! The connection manager as configured: what every connection and request of one HCM
//! shares (config, stats, filters, access logs, the config store, the tracer). The connection
//! manager serves connections with it; the router reads it.

use std::sync::Arc;

use http::header::HeaderValue;

use crate::config::{ConfigResult, HttpConnectionManager, RouteSource, RouteTable};
use crate::http::access_log::{self, AccessLogs};
use crate::http::filter::FilterChain;
use crate::http::tracing::{Tracer, TracingContext};
use crate::lifecycle::Lifecycle;
use crate::stats::{HttpStats, Registry};
use crate::store::Store;

/// A connection manager built from its config: what every connection and request of one filter
/// chain shares.
#[derive(Debug)]
pub struct Manager {
    pub config: Arc<HttpConnectionManager>,
    pub stats: Arc<HttpStats>,
    pub filters: FilterChain,
    /// The access logs, bound to their writers (empty: nothing is recorded).
    pub(super) logs: Arc<AccessLogs>,
    pub server_header: HeaderValue,
    pub(super) store: Arc<Store>,
    /// The HCM's tracer (`tracing` with a provider).
    pub tracer: Option<Arc<Tracer>>,
    /// The server's state: while `/healthcheck/fail` holds, connections close after their
    /// response.
    pub lifecycle: Arc<Lifecycle>,
}

impl Manager {
    /// Builds the manager: filters, stats, and access logs (a file is opened now, so a path
    /// that cannot be written fails the config, not the first request). `path` is where its
    /// config is, for errors; `listener` is its listener's stats name (`listener.ADDR`'s ADDR).
    pub fn build(
        config: Arc<HttpConnectionManager>,
        registry: &Arc<Registry>,
        store: Arc<Store>,
        tracing: (&TracingContext, bool),
        lifecycle: &Arc<Lifecycle>,
        (path, listener): (&str, &str),
    ) -> ConfigResult<Arc<Self>> {
        let (tracing_context, egress) = tracing;
        let tracer = config
            .tracing
            .as_ref()
            .and_then(|t| Tracer::build(t, egress, tracing_context, registry));
        let logs = access_log::for_filter(&config.access_logs, registry, path)?;
        Ok(Arc::new(Manager {
            stats: Arc::new(HttpStats::new(registry, &config.stat_prefix, listener)),
            filters: crate::http::filters::build(
                &config.filters,
                &crate::http::filters::Server {
                    registry,
                    stat_prefix: &config.stat_prefix,
                    lifecycle,
                    local_cluster: &tracing_context.node_cluster,
                    store: &store,
                },
            ),
            lifecycle: lifecycle.clone(),
            server_header: HeaderValue::from_str(&config.server_name)
                .unwrap_or_else(|_| HeaderValue::from_static("envoy")),
            logs,
            store,
            tracer,
            config,
        }))
    }

    /// The route table a request uses: inline, or the named RDS table of `snapshot`.
    pub(super) fn table(&self, snapshot: &crate::store::Snapshot) -> Option<Arc<RouteTable>> {
        match &self.config.routes {
            RouteSource::Inline(table) => Some(table.clone()),
            RouteSource::Rds { name, .. } => snapshot.routes.get(name).cloned(),
        }
    }
}
