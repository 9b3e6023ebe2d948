//! The fault injection filter (`envoy.filters.http.fault`), as Envoy applies it: for a request
//! that meets the conditions (upstream cluster, headers, downstream node), a delay for a share
//! of requests, then an abort for a share of requests, each fixed in the config or taken from
//! the request's `x-envoy-fault-*` headers. A route's `HTTPFault` replaces the filter's own.
//!
//! The delay is a timer awaited in the request's own task, so it holds no worker, and a
//! client that goes away drops the task, timer and all. Stats: `http.PREFIX.fault.*`, and per
//! `x-envoy-downstream-service-cluster` `http.PREFIX.fault.CLUSTER.{delays,aborts}_injected`.
//! Access log flags: `DI` for a delay, `FI` for an abort.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, StatusCode};
use remora_config::filters::PerRouteConfig;
use remora_config::filters::fault::{Abort, AbortSource, DelaySource, Fault as FaultConfig};
use remora_config::route::{Action, ClusterSpec};

use super::{filter_reply, header_number, most_specific};
use crate::error::ResponseFlag;
use crate::http::filter::{Flow, HttpFilter, Stream};
use crate::http::local_reply::LocalReply;
use crate::stats::{GaugeGuard, Registry, Stat};

static DELAY_REQUEST: HeaderName = HeaderName::from_static("x-envoy-fault-delay-request");
static DELAY_PERCENTAGE: HeaderName =
    HeaderName::from_static("x-envoy-fault-delay-request-percentage");
static ABORT_REQUEST: HeaderName = HeaderName::from_static("x-envoy-fault-abort-request");
static ABORT_GRPC_REQUEST: HeaderName = HeaderName::from_static("x-envoy-fault-abort-grpc-request");
static ABORT_PERCENTAGE: HeaderName =
    HeaderName::from_static("x-envoy-fault-abort-request-percentage");
static DOWNSTREAM_CLUSTER: HeaderName =
    HeaderName::from_static("x-envoy-downstream-service-cluster");
static DOWNSTREAM_NODE: HeaderName = HeaderName::from_static("x-envoy-downstream-service-node");

const ABORT_BODY: &str = "fault filter abort";

/// `http.PREFIX.fault.*`, shared by the fault filters of one connection manager.
#[derive(Debug)]
struct FaultStats {
    delays_injected: Arc<Stat>,
    aborts_injected: Arc<Stat>,
    faults_overflow: Arc<Stat>,
    /// Requests with a fault in progress (a gauge).
    active_faults: Arc<Stat>,
    /// For the per-downstream-cluster counters, made as those clusters show up.
    registry: Arc<Registry>,
    /// `http.PREFIX.fault.`
    prefix: String,
}

impl FaultStats {
    fn new(registry: Arc<Registry>, stat_prefix: &str) -> Self {
        let prefix = format!("http.{stat_prefix}.fault.");
        let counter = |name: &str| registry.counter(format!("{prefix}{name}"));
        // Envoy has this one too; Remora refuses `response_rate_limit`, so it stays 0.
        counter("response_rl_injected");
        FaultStats {
            delays_injected: counter("delays_injected"),
            aborts_injected: counter("aborts_injected"),
            faults_overflow: counter("faults_overflow"),
            active_faults: registry.gauge(format!("{prefix}active_faults")),
            registry,
            prefix,
        }
    }

    /// Counts an injected fault (`what`: `delays_injected` or `aborts_injected`), also for the
    /// downstream cluster when there is one.
    fn injected(&self, what: &str, downstream_cluster: Option<&str>) {
        if let Some(cluster) = downstream_cluster {
            self.registry
                .counter(format!("{}{cluster}.{what}", self.prefix))
                .inc();
        }
        match what {
            "delays_injected" => self.delays_injected.inc(),
            _ => self.aborts_injected.inc(),
        }
    }

    /// One active fault for the stream, unless `max` are active already (then the fault is
    /// not injected, and `faults_overflow` counts it).
    fn activate(&self, max: Option<u32>) -> Option<GaugeGuard> {
        let guard = match max {
            None => Some(GaugeGuard::new(&self.active_faults)),
            Some(max) => GaugeGuard::try_acquire(&self.active_faults, u64::from(max)),
        };
        if guard.is_none() {
            self.faults_overflow.inc();
        }
        guard
    }
}

/// The filter, under its configured name (its per-route configs' key).
#[derive(Debug)]
pub struct Fault {
    name: String,
    config: Arc<FaultConfig>,
    stats: Arc<FaultStats>,
}

impl Fault {
    pub fn new(
        name: &str,
        config: Arc<FaultConfig>,
        registry: Arc<Registry>,
        stat_prefix: &str,
    ) -> Self {
        Fault {
            name: name.to_string(),
            config,
            stats: Arc::new(FaultStats::new(registry, stat_prefix)),
        }
    }
}

/// What a request's headers say about an abort, read before any delay.
#[derive(Debug, Clone, Copy)]
struct AbortHeaders {
    http: Option<u64>,
    grpc: Option<u64>,
    percentage: Option<u64>,
}

impl AbortHeaders {
    fn read(headers: &HeaderMap) -> Self {
        AbortHeaders {
            http: header_number(headers, &ABORT_REQUEST),
            grpc: header_number(headers, &ABORT_GRPC_REQUEST),
            percentage: header_number(headers, &ABORT_PERCENTAGE),
        }
    }
}

/// A header's share: a numerator over the configured denominator, never above the configured
/// numerator; one that does not fit a u32 is ignored, as in Envoy.
fn header_share(
    configured: remora_config::filters::fault::Fraction,
    header: Option<u64>,
) -> remora_config::filters::fault::Fraction {
    match header.and_then(|n| u32::try_from(n).ok()) {
        Some(numerator) => configured.at_most(numerator),
        None => configured,
    }
}

/// The abort this request gets, if any: the HTTP status and, for a gRPC abort, the gRPC status
/// (then the HTTP status is 200).
fn abort_status(abort: &Abort, headers: &AbortHeaders) -> Option<(StatusCode, Option<u64>)> {
    let share = match abort.source {
        AbortSource::Header => header_share(abort.percentage, headers.percentage),
        _ => abort.percentage,
    };
    if !share.takes(rand::random()) {
        return None;
    }
    match abort.source {
        AbortSource::Http(status) => Some((StatusCode::from_u16(status).ok()?, None)),
        AbortSource::Grpc(status) => Some((StatusCode::OK, Some(u64::from(status)))),
        AbortSource::Header => match headers.http {
            Some(status @ 200..600) => Some((StatusCode::from_u16(status as u16).ok()?, None)),
            _ => headers.grpc.map(|grpc| (StatusCode::OK, Some(grpc))),
        },
    }
}

/// The delay this request gets, if any.
fn delay_duration(config: &FaultConfig, headers: &HeaderMap) -> Option<Duration> {
    let delay = config.delay.as_ref()?;
    let share = match delay.source {
        DelaySource::Header => {
            header_share(delay.percentage, header_number(headers, &DELAY_PERCENTAGE))
        }
        DelaySource::Fixed(_) => delay.percentage,
    };
    if !share.takes(rand::random()) {
        return None;
    }
    let duration = match delay.source {
        DelaySource::Fixed(duration) => duration,
        DelaySource::Header => Duration::from_millis(header_number(headers, &DELAY_REQUEST)?),
    };
    // Envoy delays whole milliseconds, and only by more than zero.
    let duration = Duration::from_millis(duration.as_millis().try_into().unwrap_or(u64::MAX));
    (!duration.is_zero()).then_some(duration)
}

fn abort_reply(status: StatusCode, grpc_status: Option<u64>) -> LocalReply {
    filter_reply(
        status,
        (ABORT_BODY, "fault_filter_abort"),
        ResponseFlag::FaultInjected,
        grpc_status,
    )
}

/// The request's conditions: cluster, downstream node, headers.
fn applies(config: &FaultConfig, stream: &Stream<'_>) -> bool {
    let headers = &stream.request.headers;
    if !config.upstream_cluster.is_empty() {
        // The route's cluster as Envoy's route entry names it. A weighted cluster is picked by
        // the router, after the filters, so it never matches here.
        let cluster = stream.route.and_then(|route| match &route.route().action {
            Action::Forward(forward) => match &forward.cluster {
                ClusterSpec::Name(name) => Some(name.as_str()),
                ClusterSpec::Header(name) => headers.get(name).and_then(|v| v.to_str().ok()),
                ClusterSpec::Weighted { .. } => None,
            },
            _ => None,
        });
        if cluster != Some(config.upstream_cluster.as_str()) {
            return false;
        }
    }
    if !config.downstream_nodes.is_empty() {
        let node = headers.get(&DOWNSTREAM_NODE).and_then(|v| v.to_str().ok());
        if !node.is_some_and(|node| config.downstream_nodes.iter().any(|n| n == node)) {
            return false;
        }
    }
    config.headers.iter().all(|m| m.matches(headers))
}

/// The fault kept in the stream until it ends (Envoy's active fault lasts as long).
struct ActiveFault(#[allow(dead_code)] GaugeGuard);

impl HttpFilter for Fault {
    fn on_request(&self, stream: &mut Stream<'_>) -> Flow {
        let config = most_specific(stream, &self.name, |config| match config {
            PerRouteConfig::Fault(fault) => Some(fault),
            _ => None,
        })
        .unwrap_or(&self.config)
        .clone();
        if !applies(&config, stream) {
            return Flow::Continue;
        }
        let headers = &stream.request.headers;
        let downstream_cluster = headers
            .get(&DOWNSTREAM_CLUSTER)
            .and_then(|v| v.to_str().ok())
            .filter(|cluster| !cluster.is_empty() && !config.disable_downstream_cluster_stats)
            .map(str::to_string);
        let abort_headers = AbortHeaders::read(headers);
        if let Some(duration) = delay_duration(&config, headers)
            && let Some(active) = self.stats.activate(config.max_active_faults)
        {
            tracing::debug!(?duration, "fault: delaying request");
            self.stats
                .injected("delays_injected", downstream_cluster.as_deref());
            stream.add_flag(ResponseFlag::DelayInjected);
            let stats = self.stats.clone();
            return Flow::Pause(Box::pin(async move {
                tokio::time::sleep(duration).await;
                // A delay can be followed by an abort; otherwise the fault is over.
                let abort = config
                    .abort
                    .as_ref()
                    .and_then(|abort| abort_status(abort, &abort_headers));
                match abort {
                    Some((status, grpc_status)) => {
                        stats.injected("aborts_injected", downstream_cluster.as_deref());
                        drop(active);
                        Flow::Reply(abort_reply(status, grpc_status))
                    }
                    None => {
                        drop(active);
                        Flow::Continue
                    }
                }
            }));
        }
        if let Some((status, grpc_status)) = config
            .abort
            .as_ref()
            .and_then(|abort| abort_status(abort, &abort_headers))
            && let Some(active) = self.stats.activate(config.max_active_faults)
        {
            self.stats
                .injected("aborts_injected", downstream_cluster.as_deref());
            stream.set_state(ActiveFault(active));
            return Flow::Reply(abort_reply(status, grpc_status));
        }
        Flow::Continue
    }
}
