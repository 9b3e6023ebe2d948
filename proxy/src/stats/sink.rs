//! The bootstrap's `stats_sinks`, flushed together every `stats_flush_interval` and once more
//! at shutdown (so statsd gets the last counts; a metrics service's last message is queued, and
//! goes only if its stream sends it before the process exits): metrics services (see [`super::metrics_service`])
//! and statsd and DogStatsD collectors, fed over UDP as Envoy feeds them. To those, each used
//! counter goes out as its change since the last flush (`envoy.NAME:DELTA|c`, a change of zero
//! too) and then each used gauge as its value (`envoy.NAME:VALUE|g`); each histogram value goes
//! out as it is recorded, as a timer (`envoy.NAME:MS|ms`). A line is a datagram of its own
//! unless DogStatsD's `max_bytes_per_datagram` lets one flush's lines share one. DogStatsD
//! lines carry the name left after tag extraction and the tags after `|#`
//! (`envoy.cluster.upstream_rq_total:3|c|#envoy.cluster_name:app`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remora_config::stats::{StatsConfig, StatsSink, StatsdSink};
use xds_api::envoy::config::core::v3::Node;

use super::metrics_service::{MetricsService, OpenChannel};
use super::{Kind, Registry, histogram};

/// The sinks of one bootstrap and what they have been sent.
pub struct Sinks {
    sinks: Vec<Sink>,
    stats: Arc<StatsConfig>,
    /// Each stat sent so far: its value at the last flush and its lines' fixed parts.
    sent: Mutex<HashMap<String, Sent>>,
}

struct Sink {
    socket: UdpSocket,
    prefix: String,
    tagged: bool,
    max_bytes: Option<usize>,
}

struct Sent {
    last: u64,
    /// Per sink, the line up to its value and the tags after its type.
    parts: Vec<(String, String)>,
}

impl Sinks {
    /// Opens a socket to each sink's collector.
    pub fn open(configs: &[StatsdSink], stats: Arc<StatsConfig>) -> std::io::Result<Self> {
        let sinks = configs
            .iter()
            .map(|config| {
                let local: SocketAddr = if config.address.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    ([0u16; 8], 0).into()
                };
                let socket = UdpSocket::bind(local)?;
                socket.connect(config.address)?;
                // A collector that is slow or gone loses lines; a worker never waits for it.
                socket.set_nonblocking(true)?;
                Ok(Sink {
                    socket,
                    prefix: config.prefix.clone(),
                    tagged: config.tagged,
                    max_bytes: config.max_bytes_per_datagram,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Sinks {
            sinks,
            stats,
            sent: Mutex::new(HashMap::new()),
        })
    }

    /// The fixed parts of `name`'s line for each sink: `PREFIX.NAME:` and the tags.
    fn parts(&self, name: &str) -> Vec<(String, String)> {
        let tagged = self
            .sinks
            .iter()
            .any(|s| s.tagged)
            .then(|| self.stats.tags.produce(name));
        self.sinks
            .iter()
            .map(|sink| match (&tagged, sink.tagged) {
                (Some(tagged), true) => {
                    let mut tags = String::new();
                    for (index, (tag, value)) in tagged.tags.iter().enumerate() {
                        tags.push_str(if index == 0 { "|#" } else { "," });
                        let _ = write!(tags, "{tag}:{value}");
                    }
                    (format!("{}.{}:", sink.prefix, tagged.name), tags)
                }
                _ => (format!("{}.{name}:", sink.prefix), String::new()),
            })
            .collect()
    }

    /// Sends every used counter's change and every used gauge's value.
    pub fn flush(&self, registry: &Registry) {
        let matcher = &self.stats.matcher;
        let stats = registry.snapshot(&|stat| stat.used && matcher.admits(&stat.name));
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let mut batches: Vec<String> = vec![String::new(); self.sinks.len()];
        // Counters first, then gauges, as Envoy sends them.
        for (kind, code) in [(Kind::Counter, "|c"), (Kind::Gauge, "|g")] {
            for stat in stats.iter().filter(|stat| stat.kind == kind) {
                let entry = match sent.get_mut(&stat.name) {
                    Some(entry) => entry,
                    None => sent.entry(stat.name.clone()).or_insert(Sent {
                        last: 0,
                        parts: self.parts(&stat.name),
                    }),
                };
                let value = match kind {
                    Kind::Counter => stat.value.saturating_sub(entry.last),
                    Kind::Gauge => stat.value,
                };
                entry.last = stat.value;
                for ((sink, batch), (head, tags)) in
                    self.sinks.iter().zip(&mut batches).zip(&entry.parts)
                {
                    sink.add(batch, format_args!("{head}{value}{code}{tags}"));
                }
            }
        }
        for (sink, batch) in self.sinks.iter().zip(&batches) {
            if !batch.is_empty() {
                let _ = sink.socket.send(batch.as_bytes());
            }
        }
    }

    /// The tap that sends each value of histogram `name` as a timer line, or none for a
    /// histogram the stats matcher leaves out.
    fn tap(self: &Arc<Self>, name: &str) -> Option<histogram::Tap> {
        if !self.stats.matcher.admits(name) {
            return None;
        }
        let lines: Vec<(String, String)> = self
            .parts(name)
            .into_iter()
            .map(|(head, tags)| (head, format!("|ms{tags}")))
            .collect();
        let sinks = self.clone();
        Some(Box::new(move |value| {
            LINE.with_borrow_mut(|line| {
                for (sink, (head, tail)) in sinks.sinks.iter().zip(&lines) {
                    line.clear();
                    let _ = write!(line, "{head}{value}{tail}");
                    let _ = sink.socket.send(line.as_bytes());
                }
            });
        }))
    }
}

thread_local! {
    /// A timer line being written, kept per thread so recording a value allocates nothing.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Sink {
    /// Adds one flushed line: sent at once, or batched up to `max_bytes` with newlines between.
    fn add(&self, batch: &mut String, line: std::fmt::Arguments<'_>) {
        let at = batch.len();
        if at > 0 {
            batch.push('\n');
        }
        let _ = batch.write_fmt(line);
        match self.max_bytes {
            Some(max) if batch.len() <= max => {}
            // The line does not fit: what was batched before it goes, and it starts the next.
            Some(_) if at > 0 => {
                let _ = self.socket.send(&batch.as_bytes()[..at]);
                batch.replace_range(..=at, "");
            }
            _ => {
                let _ = self.socket.send(batch.as_bytes());
                batch.clear();
            }
        }
    }
}

/// Opens the bootstrap's sinks, taps every histogram for the statsd ones, and flushes every
/// `interval` on the current runtime (with none, `stats_flush_on_admin`: only when admin's
/// stats are read). The returned [`Flusher`] takes those flushes and the last at shutdown.
pub fn start(
    configs: &[StatsSink],
    interval: Option<Duration>,
    stats: Arc<StatsConfig>,
    registry: &Arc<Registry>,
    node: &Node,
    open: OpenChannel,
) -> std::io::Result<Option<Arc<Flusher>>> {
    if configs.is_empty() {
        return Ok(None);
    }
    let statsd: Vec<StatsdSink> = configs
        .iter()
        .filter_map(|sink| match sink {
            StatsSink::Statsd(statsd) => Some(statsd.clone()),
            StatsSink::MetricsService(_) => None,
        })
        .collect();
    let statsd = if statsd.is_empty() {
        None
    } else {
        let sinks = Arc::new(Sinks::open(&statsd, stats.clone())?);
        let tapping = sinks.clone();
        registry.tap_histograms(Box::new(move |name| tapping.tap(name)));
        Some(sinks)
    };
    let services = configs
        .iter()
        .filter_map(|sink| match sink {
            StatsSink::MetricsService(config) => Some(MetricsService::new(
                config.clone(),
                stats.clone(),
                node.clone(),
                open.clone(),
            )),
            StatsSink::Statsd(_) => None,
        })
        .collect();
    let flusher = Arc::new(Flusher {
        statsd,
        services,
        registry: registry.clone(),
        on_admin: interval.is_none(),
    });
    let Some(interval) = interval else {
        return Ok(Some(flusher));
    };
    let flushing = flusher.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            flushing.flush();
        }
    });
    Ok(Some(flusher))
}

/// Every sink of the bootstrap, flushed together.
pub struct Flusher {
    statsd: Option<Arc<Sinks>>,
    services: Vec<MetricsService>,
    registry: Arc<Registry>,
    /// `stats_flush_on_admin`: flushed when admin's stats are read, and not at shutdown (as
    /// Envoy, which flushes at exit only on its timer's schedule).
    on_admin: bool,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("statsd", &self.statsd.is_some())
            .field("metrics_services", &self.services.len())
            .field("on_admin", &self.on_admin)
            .finish()
    }
}

impl Flusher {
    /// Admin's stats were read: the flush, with `stats_flush_on_admin`.
    pub fn stats_read(&self) {
        if self.on_admin {
            self.flush();
        }
    }

    /// The last flush, at shutdown (none with `stats_flush_on_admin`, as in Envoy).
    pub fn shutdown(&self) {
        if !self.on_admin {
            self.flush();
        }
    }

    pub fn flush(&self) {
        if let Some(statsd) = &self.statsd {
            statsd.flush(&self.registry);
        }
        for service in &self.services {
            service.flush(&self.registry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collector on loopback, and a sink config pointing at it.
    fn collector(tagged: bool, max: Option<usize>) -> (UdpSocket, StatsdSink) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let config = StatsdSink {
            address: socket.local_addr().unwrap(),
            prefix: "envoy".into(),
            tagged,
            max_bytes_per_datagram: max,
        };
        (socket, config)
    }

    fn datagram(socket: &UdpSocket) -> String {
        let mut buf = [0u8; 65536];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn counters_go_as_changes_then_gauges_as_values() {
        let (collector, config) = collector(false, None);
        let registry = Registry::default();
        let sinks = Sinks::open(&[config], Arc::default()).unwrap();
        let total = registry.counter("cluster.app.upstream_rq_total");
        registry.counter("cluster.app.never_counted");
        registry.gauge("cluster.app.membership_total").set(0);
        total.add(3);
        sinks.flush(&registry);
        assert_eq!(
            datagram(&collector),
            "envoy.cluster.app.upstream_rq_total:3|c"
        );
        assert_eq!(
            datagram(&collector),
            "envoy.cluster.app.membership_total:0|g"
        );
        total.add(2);
        sinks.flush(&registry);
        assert_eq!(
            datagram(&collector),
            "envoy.cluster.app.upstream_rq_total:2|c"
        );
        assert_eq!(
            datagram(&collector),
            "envoy.cluster.app.membership_total:0|g"
        );
        sinks.flush(&registry);
        assert_eq!(
            datagram(&collector),
            "envoy.cluster.app.upstream_rq_total:0|c"
        );
    }

    #[test]
    fn dogstatsd_lines_carry_tags_and_share_datagrams_up_to_the_bound() {
        // Two of these 75-byte lines fit in 160 bytes, with the newline between; three do not.
        let (collector, config) = collector(true, Some(160));
        let registry = Registry::default();
        let sinks = Sinks::open(&[config], Arc::default()).unwrap();
        for cluster in ["a", "b", "c"] {
            registry
                .counter(format!("cluster.{cluster}.upstream_rq_200"))
                .inc();
        }
        sinks.flush(&registry);
        assert_eq!(
            datagram(&collector),
            "envoy.cluster.upstream_rq:1|c|#envoy.response_code:200,envoy.cluster_name:a\n\
             envoy.cluster.upstream_rq:1|c|#envoy.response_code:200,envoy.cluster_name:b"
        );
        assert_eq!(
            datagram(&collector),
            "envoy.cluster.upstream_rq:1|c|#envoy.response_code:200,envoy.cluster_name:c"
        );
    }

    #[test]
    fn histogram_values_go_as_timers_when_recorded() {
        let (collector, config) = collector(true, None);
        let (plain, plain_config) = self::collector(false, None);
        let registry = Arc::new(Registry::default());
        let before = registry.histogram("http.edge.downstream_rq_time");
        let sinks = Arc::new(Sinks::open(&[config, plain_config], Arc::default()).unwrap());
        registry.tap_histograms(Box::new(move |name| sinks.tap(name)));
        let after = super::super::ClusterStats::new(&registry, "app");
        before.record(7);
        after.upstream_rq_time.record(2);
        assert_eq!(
            datagram(&collector),
            "envoy.http.downstream_rq_time:7|ms|#envoy.http_conn_manager_prefix:edge"
        );
        assert_eq!(
            datagram(&collector),
            "envoy.cluster.upstream_rq_time:2|ms|#envoy.cluster_name:app"
        );
        assert_eq!(datagram(&plain), "envoy.http.edge.downstream_rq_time:7|ms");
        assert_eq!(datagram(&plain), "envoy.cluster.app.upstream_rq_time:2|ms");
        assert_eq!(before.snapshot().count(), 1, "still counted");
    }
}
