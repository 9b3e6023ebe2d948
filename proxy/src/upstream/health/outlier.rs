//! Outlier detection, as Envoy's detector: every attempt's outcome is counted per host on the
//! request path with atomics only ([`OutlierReporter::report`] into the host's
//! [`crate::upstream::host::OutlierCounters`]); a run of
//! errors reaching its threshold sends one event to the cluster's health task on the main
//! runtime, which ejects the host. The same task runs the detector's interval: unejecting
//! hosts whose ejection time is up, then success-rate and failure-percentage ejections over
//! the interval's counts.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use super::Event;
use crate::config::OutlierDetection;
use crate::stats::OutlierStats;
use crate::upstream::host::{Host, HostState, Run};
use crate::upstream::outcome::Outcome;

/// Why a host is ejected; the order of [`crate::stats::EJECTION_KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionKind {
    Consecutive5xx = 0,
    ConsecutiveGatewayFailure = 1,
    ConsecutiveLocalOriginFailure = 2,
    SuccessRate = 3,
    LocalOriginSuccessRate = 4,
    FailurePercentage = 5,
    LocalOriginFailurePercentage = 6,
}

/// What the request path needs: thresholds and the way to the cluster's health task.
#[derive(Debug)]
pub struct OutlierReporter {
    consecutive_5xx: u32,
    consecutive_gateway_failure: u32,
    consecutive_local_origin_failure: u32,
    split: bool,
    events: UnboundedSender<Event>,
}

impl OutlierReporter {
    pub fn new(config: &OutlierDetection, events: UnboundedSender<Event>) -> Self {
        OutlierReporter {
            consecutive_5xx: config.consecutive_5xx,
            consecutive_gateway_failure: config.consecutive_gateway_failure,
            consecutive_local_origin_failure: config.consecutive_local_origin_failure,
            split: config.split_external_local_origin_errors,
            events,
        }
    }

    /// Counts one attempt as Envoy's router and `tcp_proxy` report it: a request that got a
    /// connection first counts a local-origin success, then its result (a status, a reset as
    /// a failed connection, a route timeout as a 504); local-origin results count as 503/504/200
    /// unless `split_external_local_origin_errors`.
    #[inline]
    pub fn report(&self, host: &Arc<HostState>, outcome: Outcome) {
        match outcome {
            Outcome::Status(status) => {
                self.local_success(host);
                self.status(host, status);
            }
            Outcome::Connected => {
                if self.split {
                    self.local_success(host);
                } else {
                    self.status(host, 200);
                }
            }
            Outcome::ConnectFailed { .. } => self.local_failure(host, 503),
            Outcome::Reset => {
                self.local_success(host);
                self.local_failure(host, 503);
            }
            Outcome::Timeout { route: true } => {
                self.local_success(host);
                self.local_failure(host, 504);
            }
            // The stream idle timeout is the connection manager's; Envoy's router reports
            // nothing for it.
            Outcome::Timeout { route: false } => self.local_success(host),
        }
    }

    #[inline]
    fn local_success(&self, host: &Arc<HostState>) {
        if self.split {
            host.outlier.count_local_success();
        }
    }

    #[inline]
    fn local_failure(&self, host: &Arc<HostState>, status: u16) {
        if !self.split {
            return self.status(host, status);
        }
        if host.outlier.count_local_failure() == self.consecutive_local_origin_failure {
            self.send(host, EjectionKind::ConsecutiveLocalOriginFailure);
        }
    }

    #[inline]
    fn status(&self, host: &Arc<HostState>, status: u16) {
        let runs = host.outlier.count_status(status);
        // Exactly at the threshold, so a run past it sends nothing more.
        if runs.consecutive_gateway_failure == self.consecutive_gateway_failure {
            self.send(host, EjectionKind::ConsecutiveGatewayFailure);
        }
        if runs.consecutive_5xx == self.consecutive_5xx {
            self.send(host, EjectionKind::Consecutive5xx);
        }
    }

    #[cold]
    fn send(&self, host: &Arc<HostState>, kind: EjectionKind) {
        let _ = self.events.send(Event::Consecutive(host.clone(), kind));
    }
}

/// The detector's work on the main runtime, over the cluster's current hosts.
pub struct Detector<'a> {
    pub config: &'a OutlierDetection,
    pub stats: &'a OutlierStats,
    pub hosts: &'a [Arc<Host>],
    /// The cluster's name, for the event log.
    pub cluster: &'a str,
}

/// Takes one whole event line (`main` hands over a writer to the bootstrap's file, so this
/// layer needs nothing from the HTTP one).
pub type LineWriter = Box<dyn Fn(&[u8]) + Send + Sync>;

/// `cluster_manager.outlier_detection.event_log_path`'s writer, once the bootstrap set it.
static EVENT_LOG: OnceLock<LineWriter> = OnceLock::new();

/// Writes every cluster's ejections, and their ends, with `write` from now on (Envoy's
/// outlier event log). Set once, from the bootstrap.
pub fn set_event_log(write: LineWriter) {
    let _ = EVENT_LOG.set(write);
}

impl EjectionKind {
    /// The event log's name for it (Envoy's `OutlierEjectionType`).
    fn event_name(self) -> &'static str {
        match self {
            EjectionKind::Consecutive5xx => "CONSECUTIVE_5XX",
            EjectionKind::ConsecutiveGatewayFailure => "CONSECUTIVE_GATEWAY_FAILURE",
            EjectionKind::ConsecutiveLocalOriginFailure => "CONSECUTIVE_LOCAL_ORIGIN_FAILURE",
            EjectionKind::SuccessRate => "SUCCESS_RATE",
            EjectionKind::LocalOriginSuccessRate => "SUCCESS_RATE_LOCAL_ORIGIN",
            EjectionKind::FailurePercentage => "FAILURE_PERCENTAGE",
            EjectionKind::LocalOriginFailurePercentage => "FAILURE_PERCENTAGE_LOCAL_ORIGIN",
        }
    }
}

/// One ejection, or its end, as the event log records it.
struct EjectionEvent<'a> {
    /// The kind's name in the log (`CONSECUTIVE_5XX`).
    kind: &'static str,
    /// Since the host's last ejection or unejection, if any.
    since_last: Option<Duration>,
    cluster: &'a str,
    host: &'a Host,
    eject: bool,
    ejections: u32,
    enforced: bool,
    /// The ejection's own object (`"eject_consecutive_event":{}`); empty for an unejection.
    detail: &'a str,
}

/// The line as Envoy writes it: `OutlierDetectionEvent` in proto JSON, its fields in Envoy's
/// order.
fn event_line(event: &EjectionEvent<'_>) -> String {
    let EjectionEvent {
        kind,
        since_last,
        cluster,
        host,
        eject,
        ejections,
        enforced,
        detail,
    } = *event;
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut line = format!(
        "{{\"type\":\"{}\",\"timestamp\":\"{}.{:03}Z\"",
        kind,
        now.strftime("%Y-%m-%dT%H:%M:%S"),
        now.subsec_nanosecond() / 1_000_000
    );
    if let Some(since) = since_last {
        let _ = write!(line, ",\"secs_since_last_action\":\"{}\"", since.as_secs());
    }
    let _ = write!(
        line,
        ",\"cluster_name\":{},\"upstream_url\":{},\"action\":\"{}\",\"num_ejections\":{ejections},\"enforced\":{enforced}",
        quote(cluster),
        quote(&host.addr.to_string()),
        if eject { "EJECT" } else { "UNEJECT" },
    );
    if !detail.is_empty() {
        let _ = write!(line, ",{detail}");
    }
    line.push_str("}\n");
    line
}

fn enforced(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && rand::rng().random_range(0..100) < percent)
}

impl Detector<'_> {
    fn ejected_count(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| h.state.has(HostState::FAILED_OUTLIER_CHECK))
            .count()
    }

    fn enforcing(&self, kind: EjectionKind) -> u32 {
        let c = self.config;
        match kind {
            EjectionKind::Consecutive5xx => c.enforcing_consecutive_5xx,
            EjectionKind::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            EjectionKind::ConsecutiveLocalOriginFailure => {
                c.enforcing_consecutive_local_origin_failure
            }
            EjectionKind::SuccessRate => c.enforcing_success_rate,
            EjectionKind::LocalOriginSuccessRate => c.enforcing_local_origin_success_rate,
            EjectionKind::FailurePercentage => c.enforcing_failure_percentage,
            EjectionKind::LocalOriginFailurePercentage => {
                c.enforcing_failure_percentage_local_origin
            }
        }
    }

    /// A run of errors reached its threshold on `state`: eject (unless already ejected, as
    /// Envoy), then restart that run's count. Whether anything changed.
    pub fn on_consecutive(&self, state: &Arc<HostState>, kind: EjectionKind) -> bool {
        if !self.hosts.iter().any(|h| Arc::ptr_eq(&h.state, state))
            || state.has(HostState::FAILED_OUTLIER_CHECK)
        {
            return false;
        }
        self.stats.detected[kind as usize].inc();
        let changed = self.eject(state, kind);
        let run = match kind {
            EjectionKind::Consecutive5xx => {
                self.stats.ejections_consecutive_5xx.inc();
                Run::Consecutive5xx
            }
            EjectionKind::ConsecutiveGatewayFailure => Run::ConsecutiveGatewayFailure,
            _ => Run::ConsecutiveLocalOriginFailure,
        };
        state.outlier.restart(run);
        changed
    }

    /// Envoy's `ejectHost`: within `max_ejection_percent` (or the one host
    /// `always_eject_one_host` allows), and when the kind's `enforcing_*` draw says so.
    fn eject(&self, state: &Arc<HostState>, kind: EjectionKind) -> bool {
        self.eject_with(state, kind, "\"eject_consecutive_event\":{}")
    }

    /// [`Self::eject`], with the event log's detail for the kind.
    fn eject_with(&self, state: &Arc<HostState>, kind: EjectionKind, detail: &str) -> bool {
        let active = self.ejected_count();
        let percent = 100.0 * (active + 1) as f64 / self.hosts.len().max(1) as f64;
        let mut allowed = percent <= f64::from(self.config.max_ejection_percent.min(100));
        if self.config.always_eject_one_host {
            allowed |= active == 0;
        }
        if !allowed {
            self.stats.ejections_overflow.inc();
            return false;
        }
        if matches!(
            kind,
            EjectionKind::Consecutive5xx | EjectionKind::SuccessRate
        ) {
            self.stats.ejections_total.inc();
        }
        if !enforced(self.enforcing(kind)) {
            self.log(state, kind.event_name(), true, false, detail);
            return false;
        }
        self.log(state, kind.event_name(), true, true, detail);
        self.stats.ejections_enforced_total.inc();
        self.stats.enforced[kind as usize].inc();
        state.set_flag(HostState::FAILED_OUTLIER_CHECK, true);
        let mut record = state.outlier.record();
        record.ejections += 1;
        record.last_kind = Some(kind.event_name());
        record.last_ejection = Some(Instant::now());
        let jitter_ms = self.config.max_ejection_time_jitter.as_millis() as u64;
        record.jitter = Duration::from_millis(rand::rng().random_range(0..=jitter_ms));
        let base = self.config.base_ejection_time;
        if base * record.backoff < self.config.max_ejection_time + base {
            record.backoff += 1;
        }
        drop(record);
        self.stats.ejections_active.set(self.ejected_count() as u64);
        true
    }

    /// Writes an ejection (before its record is updated, so the count and time are the last
    /// action's: Envoy counts the new ejection in, hence the `+ 1`) or its end to the event log.
    fn log(
        &self,
        state: &HostState,
        kind: &'static str,
        eject: bool,
        enforced: bool,
        detail: &str,
    ) {
        let Some(write) = EVENT_LOG.get() else {
            return;
        };
        let Some(host) = self
            .hosts
            .iter()
            .find(|h| std::ptr::eq(Arc::as_ptr(&h.state), state))
        else {
            return;
        };
        let record = *state.outlier.record();
        let last = record.last_ejection.max(record.last_unejection);
        let ejections = record.ejections + u32::from(eject && enforced);
        let line = event_line(&EjectionEvent {
            kind,
            since_last: last.map(|at| at.elapsed()),
            cluster: self.cluster,
            host,
            eject,
            ejections,
            enforced,
            detail,
        });
        write(line.as_bytes());
    }

    /// Ends an ejection.
    pub fn uneject(&self, state: &HostState) {
        let kind = state.outlier.record().last_kind;
        self.log(
            state,
            kind.unwrap_or(EjectionKind::Consecutive5xx.event_name()),
            false,
            false,
            "",
        );
        state.set_flag(HostState::FAILED_OUTLIER_CHECK, false);
        state.outlier.reset_consecutive();
        state.outlier.record().last_unejection = Some(Instant::now());
        self.stats.ejections_active.set(self.ejected_count() as u64);
    }

    /// One interval: unejections that are due, success-rate and failure-percentage ejections,
    /// and the backoff of hosts that stayed in. Whether any host's health changed.
    pub fn interval(&self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        let mut external = Vec::with_capacity(self.hosts.len());
        let mut local = Vec::with_capacity(self.hosts.len());
        for host in self.hosts {
            let state = &host.state;
            if state.has(HostState::FAILED_OUTLIER_CHECK) {
                let record = *state.outlier.record();
                let served = self
                    .config
                    .base_ejection_time
                    .saturating_mul(record.backoff)
                    .min(self.config.max_ejection_time)
                    + record.jitter;
                if record
                    .last_ejection
                    .is_none_or(|at| now.duration_since(at) >= served)
                {
                    self.uneject(state);
                    changed = true;
                }
            }
            let (external_counts, local_counts) = state.outlier.take_interval();
            external.push(external_counts);
            local.push(local_counts);
        }
        changed |= self.rates(&external, false);
        changed |= self.rates(&local, true);
        for host in self.hosts {
            if host.state.has(HostState::FAILED_OUTLIER_CHECK) {
                continue;
            }
            let mut record = host.state.outlier.record();
            if record
                .last_unejection
                .is_some_and(|at| now.duration_since(at) >= self.config.interval)
                && record.backoff > 0
            {
                record.backoff -= 1;
            }
        }
        changed
    }

    /// Envoy's `processSuccessRateEjections` over the interval's (requests, successes).
    fn rates(&self, counts: &[(u64, u64)], local: bool) -> bool {
        let c = self.config;
        self.stats.set_rates(local, -1.0, -1.0);
        let hosts = self.hosts.len() as u64;
        if hosts < u64::from(c.success_rate_minimum_hosts)
            && hosts < u64::from(c.failure_percentage_minimum_hosts)
        {
            return false;
        }
        let sr_volume = u64::from(c.success_rate_request_volume);
        let fp_volume = u64::from(c.failure_percentage_request_volume);
        let mut sr_hosts = Vec::new();
        let mut fp_hosts = Vec::new();
        for (host, (total, success)) in self.hosts.iter().zip(counts) {
            if host.state.has(HostState::FAILED_OUTLIER_CHECK) || *total == 0 {
                continue;
            }
            let rate = *success as f64 * 100.0 / *total as f64;
            if *total >= sr_volume.min(fp_volume) {
                host.state.outlier.set_success_rate(local, rate);
            }
            if *total >= sr_volume {
                sr_hosts.push((host, rate));
            }
            if *total >= fp_volume {
                fp_hosts.push((host, rate));
            }
        }
        let mut changed = false;
        if !sr_hosts.is_empty() && sr_hosts.len() as u64 >= u64::from(c.success_rate_minimum_hosts)
        {
            let n = sr_hosts.len() as f64;
            let mean = sr_hosts.iter().map(|(_, r)| r).sum::<f64>() / n;
            let variance = sr_hosts
                .iter()
                .map(|(_, r)| (r - mean).powi(2))
                .sum::<f64>()
                / n;
            let threshold =
                mean - f64::from(c.success_rate_stdev_factor) / 1000.0 * variance.sqrt();
            self.stats.set_rates(local, mean, threshold);
            let kind = if local {
                EjectionKind::LocalOriginSuccessRate
            } else {
                EjectionKind::SuccessRate
            };
            for (host, rate) in &sr_hosts {
                if *rate < threshold {
                    self.stats.ejections_success_rate.inc();
                    self.stats.detected[kind as usize].inc();
                    // Envoy's event holds the rates as whole percents.
                    let detail = format!(
                        "\"eject_success_rate_event\":{{\"host_success_rate\":{},\"cluster_average_success_rate\":{},\"cluster_success_rate_ejection_threshold\":{}}}",
                        *rate as u32,
                        mean as u32,
                        threshold.max(0.0) as u32
                    );
                    changed |= self.eject_with(&host.state, kind, &detail);
                }
            }
        }
        if !fp_hosts.is_empty()
            && fp_hosts.len() as u64 >= u64::from(c.failure_percentage_minimum_hosts)
        {
            let kind = if local {
                EjectionKind::LocalOriginFailurePercentage
            } else {
                EjectionKind::FailurePercentage
            };
            for (host, rate) in &fp_hosts {
                if 100.0 - rate >= f64::from(c.failure_percentage_threshold) {
                    self.stats.detected[kind as usize].inc();
                    let detail = format!(
                        "\"eject_failure_percentage_event\":{{\"host_success_rate\":{}}}",
                        *rate as u32
                    );
                    changed |= self.eject_with(&host.state, kind, &detail);
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_errors_send_one_event_at_the_threshold() {
        let config: OutlierDetection = remora_config::outlier::outlier_detection(
            &xds_api::json::from_yaml_str("{consecutive_5xx: 3, consecutive_gateway_failure: 2}")
                .expect("yaml"),
            "",
        )
        .expect("valid");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let reporter = OutlierReporter::new(&config, tx);
        let host = Arc::new(HostState::default());
        reporter.report(&host, Outcome::Status(500));
        reporter.report(&host, Outcome::Status(200));
        reporter.report(&host, Outcome::Status(500));
        reporter.report(&host, Outcome::Status(503));
        assert!(rx.try_recv().is_err());
        reporter.report(&host, Outcome::Reset);
        let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|event| match event {
                Event::Consecutive(_, kind) => kind,
                other => panic!("{other:?}"),
            })
            .collect();
        // 503 then reset (a 503 without the split): two gateway errors; 500, 503, reset:
        // three 5xx.
        assert_eq!(
            kinds,
            vec![
                EjectionKind::ConsecutiveGatewayFailure,
                EjectionKind::Consecutive5xx
            ]
        );
        reporter.report(&host, Outcome::Status(500));
        assert!(rx.try_recv().is_err(), "past the threshold, no new event");
    }
}
