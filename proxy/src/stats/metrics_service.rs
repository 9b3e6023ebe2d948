//! The metrics service stats sink (`envoy.stat_sinks.metrics_service`): every stats flush goes
//! as one `StreamMetricsMessage` on a `StreamMetrics` stream to the sink's cluster, as Envoy
//! sends it: one Prometheus metric family per used counter (its value, or its change since the
//! last flush with `report_counters_as_deltas`), per used gauge, and per histogram that has
//! values, a summary and a histogram family (or one of them, by `histogram_emit_mode`) of what
//! was recorded since the last flush. Names are full stat names, or tag-extracted with the tags
//! as labels (`emit_tags_as_labels`). The first message of each stream carries the node. A
//! stream that ends is opened again at the next flush; a flush that finds the stream busy is
//! dropped, never queued without bound.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use remora_config::stats::{MetricsServiceSink, StatsConfig, Tagged};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use xds_api::envoy::config::core::v3::Node;
use xds_api::envoy::service::metrics::v3::StreamMetricsMessage;
use xds_api::envoy::service::metrics::v3::metrics_service_client::MetricsServiceClient;
use xds_api::envoy::service::metrics::v3::stream_metrics_message::Identifier;
use xds_api::io::prometheus::client as prom;

use super::histogram::{self, Snapshot};
use super::{Kind, Registry};

/// Opens a gRPC channel to a cluster, by name (the xDS client's transport, given by the
/// server so that stats need not know the upstream side).
pub type OpenChannel = Arc<
    dyn Fn(
            String,
        )
            -> Pin<Box<dyn Future<Output = anyhow::Result<tonic::transport::Channel>> + Send>>
        + Send
        + Sync,
>;

/// One metrics service sink and what it has sent.
pub struct MetricsService {
    config: MetricsServiceSink,
    stats: Arc<StatsConfig>,
    node: Node,
    open: OpenChannel,
    /// The open stream's queue; closed once its stream ends.
    stream: Mutex<Option<mpsc::Sender<StreamMetricsMessage>>>,
    /// Counter values and histogram snapshots at the last flush, by name.
    last: Mutex<Last>,
}

#[derive(Default)]
struct Last {
    counters: HashMap<String, u64>,
    histograms: HashMap<String, Snapshot>,
    /// Family names and labels by stat name, with `emit_tags_as_labels`: tag extraction runs
    /// once per stat, not at every flush.
    names: HashMap<String, (String, Vec<prom::LabelPair>)>,
}

impl MetricsService {
    pub fn new(
        config: MetricsServiceSink,
        stats: Arc<StatsConfig>,
        node: Node,
        open: OpenChannel,
    ) -> Self {
        MetricsService {
            config,
            stats,
            node,
            open,
            stream: Mutex::new(None),
            last: Mutex::default(),
        }
    }

    /// Sends this flush's message, on the open stream or a new one.
    pub fn flush(&self, registry: &Registry) {
        let families = self.families(registry);
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = stream.as_ref().is_none_or(mpsc::Sender::is_closed);
        if fresh {
            *stream = Some(self.open_stream());
        }
        let message = StreamMetricsMessage {
            identifier: fresh.then(|| Identifier {
                node: Some(self.node.clone()),
            }),
            envoy_metrics: families,
        };
        if let Some(sender) = stream.as_ref()
            && sender.try_send(message).is_err()
        {
            tracing::warn!(cluster = %self.config.cluster, "metrics service: the stream is behind; this flush is dropped");
        }
    }

    /// A new `StreamMetrics` stream, fed by the returned queue.
    fn open_stream(&self) -> mpsc::Sender<StreamMetricsMessage> {
        let (sender, receiver) = mpsc::channel(2);
        let (open, cluster) = (self.open.clone(), self.config.cluster.clone());
        tokio::spawn(async move {
            let result = async {
                let channel = open(cluster.clone()).await?;
                MetricsServiceClient::new(channel)
                    .stream_metrics(ReceiverStream::new(receiver))
                    .await?;
                anyhow::Ok(())
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(%cluster, %error, "metrics service: stream ended; reopening at the next flush");
            }
        });
        sender
    }

    /// This flush's metric families: counters, gauges, then histograms, each sorted by name.
    fn families(&self, registry: &Registry) -> Vec<prom::MetricFamily> {
        let matcher = &self.stats.matcher;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let stats = registry.snapshot(&|stat| stat.used && matcher.admits(&stat.name));
        for kind in [Kind::Counter, Kind::Gauge] {
            for stat in stats.iter().filter(|stat| stat.kind == kind) {
                let (family_type, value) = match kind {
                    Kind::Counter => {
                        let before = last.counters.insert(stat.name.clone(), stat.value);
                        let value = if self.config.counters_as_deltas {
                            stat.value.saturating_sub(before.unwrap_or(0))
                        } else {
                            stat.value
                        };
                        (prom::MetricType::Counter, value as f64)
                    }
                    Kind::Gauge => (prom::MetricType::Gauge, stat.value as f64),
                };
                let mut metric = metric(now_ms);
                let (name, labels) = self.name(&mut last.names, &stat.name);
                metric.label = labels;
                match kind {
                    Kind::Counter => metric.counter = Some(prom::Counter { value: Some(value) }),
                    Kind::Gauge => metric.gauge = Some(prom::Gauge { value: Some(value) }),
                }
                out.push(family(name, family_type, metric));
            }
        }
        let histograms = registry.histogram_snapshots(&|name, used| used && matcher.admits(name));
        for (name, cumulative) in histograms {
            let interval = match last.histograms.get(&name) {
                Some(earlier) => cumulative.since(earlier),
                None => cumulative.since(&Snapshot::empty(cumulative.bounds)),
            };
            let (family_name, labels) = self.name(&mut last.names, &name);
            let count = interval.count();
            if self.config.summaries {
                let mut metric = metric(now_ms);
                metric.label = labels.clone();
                metric.summary = Some(prom::Summary {
                    sample_count: Some(count),
                    sample_sum: Some(interval.sum as f64),
                    quantile: histogram::QUANTILES
                        .iter()
                        .map(|percent| prom::Quantile {
                            // 99.9 / 100 is not 0.999 in binary; Envoy sends 0.999.
                            quantile: Some((percent * 10.0).round() / 1000.0),
                            value: Some(interval.quantile(*percent).unwrap_or(f64::NAN)),
                        })
                        .collect(),
                });
                out.push(family(
                    family_name.clone(),
                    prom::MetricType::Summary,
                    metric,
                ));
            }
            if self.config.histograms {
                let mut metric = metric(now_ms);
                metric.label = labels;
                metric.histogram = Some(prom::Histogram {
                    sample_count: Some(count),
                    sample_sum: Some(interval.sum as f64),
                    bucket: interval
                        .bounds
                        .iter()
                        .zip(interval.cumulative())
                        .map(|(bound, total)| prom::Bucket {
                            cumulative_count: Some(total),
                            upper_bound: Some(*bound),
                        })
                        .collect(),
                });
                out.push(family(family_name, prom::MetricType::Histogram, metric));
            }
            last.histograms.insert(name, cumulative);
        }
        out
    }

    /// A stat's family name and labels: its full name, or its tag-extracted name and tags
    /// (kept in `names` after the first time).
    fn name(
        &self,
        names: &mut HashMap<String, (String, Vec<prom::LabelPair>)>,
        stat: &str,
    ) -> (String, Vec<prom::LabelPair>) {
        if !self.config.tags_as_labels {
            return (stat.to_string(), Vec::new());
        }
        if let Some(known) = names.get(stat) {
            return known.clone();
        }
        let Tagged { name, tags } = self.stats.tags.produce(stat);
        let labels: Vec<prom::LabelPair> = tags
            .into_iter()
            .map(|(name, value)| prom::LabelPair {
                name: Some(name),
                value: Some(value),
            })
            .collect();
        names.insert(stat.to_string(), (name.clone(), labels.clone()));
        (name, labels)
    }
}

/// A metric stamped with the flush's time; its value is set by the caller.
fn metric(now_ms: i64) -> prom::Metric {
    prom::Metric {
        timestamp_ms: Some(now_ms),
        ..Default::default()
    }
}

fn family(name: String, family_type: prom::MetricType, metric: prom::Metric) -> prom::MetricFamily {
    prom::MetricFamily {
        name: Some(name),
        help: None,
        r#type: Some(family_type as i32),
        metric: vec![metric],
    }
}
