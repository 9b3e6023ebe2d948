//! The health check filter (`envoy.filters.http.health_check`): a request whose headers match is
//! the proxy's own health check. It is answered here (200, empty; 503 while `/healthcheck/fail`
//! holds or a listed cluster has too few healthy hosts), or passed on in pass-through mode
//! (503 here while health checks are failed). Responses to health checks, answered or passed
//! on, name the node's cluster in `x-envoy-upstream-healthchecked-cluster`; while health checks
//! are failed, every response through the filter carries `x-envoy-immediate-health-check-fail:
//! true`. Health checks are marked: the access log's `not_health_check_filter` leaves them
//! out, and they are not traced. Those answered here are counted as Envoy counts them
//! (`http.PREFIX.health_check.*`).

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode};
use remora_config::filters::health_check::HealthCheck as Config;

use super::Server;
use crate::http::filter::{Flow, HttpFilter, Stream};
use crate::http::local_reply::LocalReply;
use crate::lifecycle::Lifecycle;
use crate::stats::Stat;
use crate::store::Store;

static HEALTHCHECKED_CLUSTER: HeaderName =
    HeaderName::from_static("x-envoy-upstream-healthchecked-cluster");
static IMMEDIATE_FAIL: HeaderName = HeaderName::from_static("x-envoy-immediate-health-check-fail");

/// `http.PREFIX.health_check.*`.
#[derive(Debug)]
struct Stats {
    request_total: Arc<Stat>,
    ok: Arc<Stat>,
    failed: Arc<Stat>,
    failed_cluster_not_found: Arc<Stat>,
    failed_cluster_empty: Arc<Stat>,
    failed_cluster_unhealthy: Arc<Stat>,
}

#[derive(Debug)]
pub struct HealthCheck {
    config: Arc<Config>,
    lifecycle: Arc<Lifecycle>,
    store: Arc<Store>,
    /// The node's cluster, as the answers name it (empty when the node names none, as in
    /// Envoy).
    local_cluster: HeaderValue,
    stats: Stats,
}

impl HealthCheck {
    pub fn new(config: Arc<Config>, server: &Server<'_>) -> Self {
        let counter = |name: &str| {
            server
                .registry
                .counter(format!("http.{}.health_check.{name}", server.stat_prefix))
        };
        // Envoy lists these two as well; Remora has no cached answers or degraded hosts here.
        counter("cached_response");
        counter("degraded");
        HealthCheck {
            config,
            lifecycle: server.lifecycle.clone(),
            store: server.store.clone(),
            local_cluster: HeaderValue::from_str(server.local_cluster)
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            stats: Stats {
                request_total: counter("request_total"),
                ok: counter("ok"),
                failed: counter("failed"),
                failed_cluster_not_found: counter("failed_cluster_not_found"),
                failed_cluster_empty: counter("failed_cluster_empty"),
                failed_cluster_unhealthy: counter("failed_cluster_unhealthy"),
            },
        }
    }

    fn matches(&self, stream: &Stream<'_>) -> bool {
        let pseudo = stream.pseudo_headers();
        self.config
            .headers
            .iter()
            .all(|header| header.matches_request(&pseudo, &stream.request.headers))
    }

    /// Whether the listed clusters are healthy enough; counts the first that is not.
    fn clusters_healthy(&self) -> bool {
        if self.config.min_healthy.is_empty() {
            return true;
        }
        let snapshot = self.store.load();
        for (name, min_percent) in &self.config.min_healthy {
            let Some(cluster) = snapshot.cluster(name) else {
                self.stats.failed_cluster_not_found.inc();
                return false;
            };
            let total = cluster.stats.membership_total.get();
            let healthy = cluster.stats.membership_healthy.get();
            if total == 0 {
                if *min_percent > 0.0 {
                    self.stats.failed_cluster_empty.inc();
                    return false;
                }
                continue;
            }
            if (healthy as f64) * 100.0 < min_percent * total as f64 {
                self.stats.failed_cluster_unhealthy.inc();
                return false;
            }
        }
        true
    }
}

impl HttpFilter for HealthCheck {
    fn on_request(&self, stream: &mut Stream<'_>) -> Flow {
        if !self.matches(stream) {
            return Flow::Continue;
        }
        stream.mark_health_check();
        let failed = self.lifecycle.health_check_failed();
        if self.config.pass_through && !failed {
            return Flow::Continue;
        }
        // Envoy counts only the health checks it answers itself.
        self.stats.request_total.inc();
        let healthy = !failed && self.clusters_healthy();
        let (status, details) = if healthy {
            self.stats.ok.inc();
            (StatusCode::OK, "health_check_ok")
        } else {
            self.stats.failed.inc();
            (StatusCode::SERVICE_UNAVAILABLE, "health_check_failed")
        };
        let mut reply = LocalReply::new(status);
        reply.details = details.into();
        Flow::Reply(reply)
    }

    fn on_response(&self, stream: &mut Stream<'_>, response: &mut Response<()>) {
        let headers = response.headers_mut();
        if stream.is_health_check() {
            headers.insert(&HEALTHCHECKED_CLUSTER, self.local_cluster.clone());
        }
        if self.lifecycle.health_check_failed() {
            headers.insert(&IMMEDIATE_FAIL, HeaderValue::from_static("true"));
        }
    }
}
