//! `/stats/prometheus`: the registry in Prometheus' text exposition, as Envoy writes it. Each
//! stat name is split by the bootstrap's tag extraction (`remora_config::stats`) into a metric
//! and labels, so `cluster.backend.upstream_rq_2xx` shows as
//! `envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="backend"}`
//! and dashboards built for Envoy read Remora's stats unchanged. Metrics sharing a name share one
//! `# TYPE` line; counters come first, then gauges, then histograms, each sorted by metric.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use remora_config::stats::{TagProducer, Tagged};

use super::{Kind, Registry, StatValue, histogram};

/// Which histograms are shown, by name and whether they have values.
pub type ShownHistogram<'a> = &'a dyn Fn(&str, bool) -> bool;

/// The exposition of the stats `shown` selects and, given `histograms`, of the histograms it
/// selects.
pub fn render(
    registry: &Registry,
    tags: &TagProducer,
    shown: &dyn Fn(&StatValue) -> bool,
    histograms: Option<ShownHistogram<'_>>,
) -> String {
    let mut counters: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    let mut gauges: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for stat in registry.snapshot(shown) {
        let (metric, labels) = metric_and_labels(&tags.produce(&stat.name));
        let family = match stat.kind {
            Kind::Counter => &mut counters,
            Kind::Gauge => &mut gauges,
        };
        family.entry(metric).or_default().push((labels, stat.value));
    }
    let mut out = String::new();
    for (kind, families) in [("counter", counters), ("gauge", gauges)] {
        for (metric, series) in families {
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            for (labels, value) in series {
                let _ = writeln!(out, "{metric}{{{labels}}} {value}");
            }
        }
    }
    let Some(shown_histogram) = histograms else {
        return out;
    };
    let mut families: BTreeMap<String, Vec<(String, histogram::Snapshot)>> = BTreeMap::new();
    for (name, snapshot) in registry.histogram_snapshots(shown_histogram) {
        let (metric, labels) = metric_and_labels(&tags.produce(&name));
        families.entry(metric).or_default().push((labels, snapshot));
    }
    for (metric, series) in families {
        let _ = writeln!(out, "# TYPE {metric} histogram");
        for (labels, snapshot) in series {
            let sep = if labels.is_empty() { "" } else { "," };
            for (index, total) in snapshot.cumulative().iter().enumerate() {
                let le = snapshot
                    .bounds
                    .get(index)
                    .map_or_else(|| "+Inf".to_string(), |b| histogram::format_value(*b));
                let _ = writeln!(out, "{metric}_bucket{{{labels}{sep}le=\"{le}\"}} {total}");
            }
            let _ = writeln!(out, "{metric}_sum{{{labels}}} {}", snapshot.sum);
            let _ = writeln!(out, "{metric}_count{{{labels}}} {}", snapshot.count());
        }
    }
    out
}

/// The metric name (`envoy_` and the name left after extraction) and the labels, written out.
fn metric_and_labels(tagged: &Tagged) -> (String, String) {
    let mut labels = String::new();
    for (name, value) in &tagged.tags {
        if !labels.is_empty() {
            labels.push(',');
        }
        labels.push_str(&sanitize(name));
        labels.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => labels.push_str("\\\\"),
                '"' => labels.push_str("\\\""),
                '\n' => labels.push_str("\\n"),
                c => labels.push(c),
            }
        }
        labels.push('"');
    }
    (format!("envoy_{}", sanitize(&tagged.name)), labels)
}

/// Prometheus' name alphabet: anything but ASCII letters, digits and `_` becomes `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_render_as_tagged_families() {
        let registry = Registry::default();
        registry.counter("cluster.a.upstream_rq_2xx").add(3);
        registry.counter("cluster.b.upstream_rq_2xx").add(1);
        registry.counter("cluster.a.upstream_rq_5xx").add(2);
        registry.gauge("server.live").add(1);
        registry.histogram("cluster.a.upstream_rq_time").record(2);
        let tags = TagProducer::default();
        let text = render(&registry, &tags, &|_| true, Some(&|_, _| true));
        let expect_in_order = [
            "# TYPE envoy_cluster_upstream_rq_xx counter\n",
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",envoy_cluster_name=\"a\"} 3\n",
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"5\",envoy_cluster_name=\"a\"} 2\n",
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",envoy_cluster_name=\"b\"} 1\n",
            "# TYPE envoy_server_live gauge\nenvoy_server_live{} 1\n",
            "# TYPE envoy_cluster_upstream_rq_time histogram\n",
            "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"a\",le=\"0.5\"} 0\n",
            "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"a\",le=\"+Inf\"} 1\n",
            "envoy_cluster_upstream_rq_time_count{envoy_cluster_name=\"a\"} 1\n",
        ];
        let mut at = 0;
        for want in expect_in_order {
            let found = text[at..]
                .find(want)
                .unwrap_or_else(|| panic!("{want:?} after {at} in\n{text}"));
            at += found + want.len();
        }
        assert_eq!(
            text.matches("# TYPE envoy_cluster_upstream_rq_xx").count(),
            1
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let tagged = Tagged {
            name: "x.y".into(),
            tags: vec![("envoy.a".into(), "q\"b\\s\nn".into())],
        };
        assert_eq!(
            metric_and_labels(&tagged),
            ("envoy_x_y".into(), "envoy_a=\"q\\\"b\\\\s\\nn\"".into())
        );
    }
}
