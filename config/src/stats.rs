//! `stats_config`: how a stat's name becomes a Prometheus metric and its labels, and which
//! stats exist at all.
//!
//! Envoy names a stat by a dotted path with its variable parts inside
//! (`cluster.backend.upstream_rq_200`); tag extraction cuts those parts out as tags
//! (`envoy.cluster_name="backend"`, `envoy.response_code="200"`), leaving the metric's name
//! (`cluster.upstream_rq`). Envoy's built-in extractors ([`DEFAULT_TAGS`]) run unless
//! `use_all_default_tags: false`; `stats_tags` adds its own after them. Dashboards built for
//! Envoy read these labels, so the extractors and their order follow Envoy 1.40's.

use xds_api::envoy::config::metrics::v3 as metrics_pb;
use xds_api::type_urls;

use crate::error::{ConfigError, ConfigResult, err, field, item};
use crate::matcher::{StringMatch, ascii_perl_classes, string_matcher};

/// The bootstrap's `stats_config`, compiled.
#[derive(Debug, Clone, Default)]
pub struct StatsConfig {
    pub tags: TagProducer,
    pub matcher: StatsMatcher,
    /// `histogram_bucket_settings`, in order.
    pub histogram_buckets: Vec<HistogramBuckets>,
}

/// One `histogram_bucket_settings` rule: the histograms it takes and their bucket bounds.
#[derive(Debug, Clone)]
pub struct HistogramBuckets {
    pub matcher: StringMatch,
    /// Upper bounds, ascending.
    pub bounds: Vec<f64>,
}

/// `stats_matcher`: which stats exist. Envoy never creates the others; Remora keeps counting
/// them but shows them nowhere.
#[derive(Debug, Clone, Default)]
pub enum StatsMatcher {
    #[default]
    All,
    RejectAll,
    Include(Vec<StringMatch>),
    Exclude(Vec<StringMatch>),
}

impl StatsMatcher {
    pub fn admits(&self, name: &str) -> bool {
        match self {
            StatsMatcher::All => true,
            StatsMatcher::RejectAll => false,
            StatsMatcher::Include(list) => list.iter().any(|m| m.matches(name)),
            StatsMatcher::Exclude(list) => !list.iter().any(|m| m.matches(name)),
        }
    }
}

/// A stat name split into its metric name and tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tagged {
    pub name: String,
    /// `(tag name, value)`, in Envoy's order (see [`TagProducer::produce`]).
    pub tags: Vec<(String, String)>,
}

/// The tag extractors in force, compiled.
#[derive(Debug, Clone)]
pub struct TagProducer {
    extractors: Vec<Extractor>,
    fixed: Vec<(String, String)>,
}

impl Default for TagProducer {
    /// Envoy's built-in tags alone, as with no `stats_config`.
    fn default() -> Self {
        let mut producer = TagProducer {
            extractors: Vec::new(),
            fixed: Vec::new(),
        };
        for default in DEFAULT_TAGS {
            producer.extractors.push(default.compile());
        }
        producer
    }
}

#[derive(Debug, Clone)]
struct Extractor {
    tag: String,
    /// The name's first segment this extractor can match, when it can only match one.
    prefix: Option<String>,
    how: How,
}

#[derive(Debug, Clone)]
enum How {
    /// Group 1 is cut from the name; group 2 (else group 1) is the value. `unless`: a value
    /// that makes no tag (the admin listener's `admin`).
    Regex {
        regex: Pattern,
        unless: Option<&'static str>,
        /// Text every name it matches contains: names without it skip the regex (most names,
        /// for the patterns every name is offered, as Envoy's hints do).
        needs: Option<&'static str>,
    },
    /// Envoy's dotted patterns: `*` one segment, `$` the segment taken as the value, `**` any
    /// number of segments.
    Segments(Vec<Segment>),
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    One,
    Value,
    Any,
}

/// Built-in patterns are RE2 (the linear `regex` crate); `stats_tags` patterns are
/// ECMAScript in Envoy, and Istio's use lookahead (`(?=\.)`), which needs a backtracking
/// engine.
#[derive(Debug, Clone)]
enum Pattern {
    Linear(regex::Regex),
    Backtracking(fancy_regex::Regex),
}

impl Pattern {
    /// Group 1's byte range and the value (group 2, else group 1).
    fn find(&self, name: &str) -> Option<(std::ops::Range<usize>, String)> {
        let (cut, value) = match self {
            Pattern::Linear(regex) => {
                let caps = regex.captures(name)?;
                let cut = caps.get(1)?;
                (cut.range(), caps.get(2).unwrap_or(cut).as_str().to_string())
            }
            // A pattern that backtracks past its limit makes no tag, as a mismatch would.
            Pattern::Backtracking(regex) => {
                let caps = regex.captures(name).ok()??;
                let cut = caps.get(1)?;
                (cut.range(), caps.get(2).unwrap_or(cut).as_str().to_string())
            }
        };
        Some((cut, value))
    }
}

impl TagProducer {
    /// Splits `name` into its metric name and tags. Every extractor reads the whole name; the
    /// parts they cut go together at the end. Tags come as Envoy lists them: those of
    /// extractors that can match any name, then the fixed ones, then those of the extractors
    /// for the name's first segment; each group in config order, built-in ones first. A tag
    /// already taken for the name is not taken again (the first extractor of a name wins).
    pub fn produce(&self, name: &str) -> Tagged {
        let first = name.split('.').next().unwrap_or_default();
        // Each segment and where it starts, split once for every dotted pattern.
        let segments: Vec<(usize, &str)> = name
            .split('.')
            .scan(0, |at, segment| {
                let start = *at;
                *at += segment.len() + 1;
                Some((start, segment))
            })
            .collect();
        let mut tags: Vec<(String, String)> = Vec::new();
        let mut cut = vec![false; name.len()];
        let mut run = |extractor: &Extractor, tags: &mut Vec<(String, String)>| {
            if tags.iter().any(|(tag, _)| *tag == extractor.tag) {
                return;
            }
            if let Some((range, value)) = extractor.extract(name, &segments) {
                cut[range].iter_mut().for_each(|c| *c = true);
                tags.push((extractor.tag.clone(), value));
            }
        };
        for extractor in self.extractors.iter().filter(|e| e.prefix.is_none()) {
            run(extractor, &mut tags);
        }
        tags.extend(self.fixed.iter().cloned());
        for extractor in &self.extractors {
            if extractor.prefix.as_deref() == Some(first) {
                run(extractor, &mut tags);
            }
        }
        let kept: Vec<u8> = name
            .bytes()
            .zip(&cut)
            .filter(|(_, cut)| !**cut)
            .map(|(b, _)| b)
            .collect();
        Tagged {
            // Cuts fall on whole segments and their dots, so what is left is still UTF-8.
            name: String::from_utf8(kept).unwrap_or_else(|_| name.to_string()),
            tags,
        }
    }
}

impl Extractor {
    fn extract(
        &self,
        name: &str,
        segments: &[(usize, &str)],
    ) -> Option<(std::ops::Range<usize>, String)> {
        match &self.how {
            How::Regex {
                regex,
                unless,
                needs,
            } => {
                if needs.is_some_and(|text| !name.contains(text)) {
                    return None;
                }
                let (range, value) = regex.find(name)?;
                (Some(value.as_str()) != *unless).then_some((range, value))
            }
            How::Segments(pattern) => {
                let index = segments_match(pattern, segments, 0, 0)??;
                let (start, value) = segments[index];
                // The segment and the dot after it; the last segment takes the dot before it.
                let range = if start + value.len() < name.len() {
                    start..start + value.len() + 1
                } else {
                    start.saturating_sub(1)..name.len()
                };
                Some((range, value.to_string()))
            }
        }
    }
}

/// Whether `pattern[p..]` matches all of `segments[s..]`, and the index `$` took there.
fn segments_match(
    pattern: &[Segment],
    segments: &[(usize, &str)],
    p: usize,
    s: usize,
) -> Option<Option<usize>> {
    let Some(want) = pattern.get(p) else {
        return (s == segments.len()).then_some(None);
    };
    if *want == Segment::Any {
        return (s..=segments.len())
            .find_map(|from| segments_match(pattern, segments, p + 1, from));
    }
    let (_, segment) = segments.get(s)?;
    if let Segment::Literal(literal) = want
        && segment != literal
    {
        return None;
    }
    let rest = segments_match(pattern, segments, p + 1, s + 1)?;
    Some(if *want == Segment::Value {
        Some(s)
    } else {
        rest
    })
}

/// A built-in extractor: Envoy's tag name and pattern.
struct DefaultTag {
    name: &'static str,
    kind: DefaultKind,
}

enum DefaultKind {
    /// An RE2 pattern with the placeholders of [`expand`], and a value that makes no tag.
    Regex(&'static str, Option<&'static str>),
    /// A dotted pattern (see [`How::Segments`]).
    Segments(&'static str),
}

const fn re(name: &'static str, pattern: &'static str) -> DefaultTag {
    DefaultTag {
        name,
        kind: DefaultKind::Regex(pattern, None),
    }
}

const fn seg(name: &'static str, pattern: &'static str) -> DefaultTag {
    DefaultTag {
        name,
        kind: DefaultKind::Segments(pattern),
    }
}

/// Envoy 1.40's built-in tags, in its order (the order labels are listed in).
const DEFAULT_TAGS: &[DefaultTag] = &[
    re("envoy.response_code", r"_rq(_(\d{3}))$"),
    re("envoy.response_code_class", r"_rq_((\d))xx$"),
    re(
        "envoy.dynamo_partition_id",
        r"^http\.<VALUE>\.dynamodb\.table\.<VALUE>\.capacity\.<VALUE>(\.__partition_id=(\w{7}))$",
    ),
    re(
        "envoy.dynamo_operation",
        r"^http\.<VALUE>\.dynamodb.(?:operation|table\.<VALUE>\.capacity)(\.(<VALUE>))(?:\.|$)",
    ),
    seg(
        "envoy.mongo_callsite",
        "mongo.*.collection.*.callsite.$.query.**",
    ),
    re(
        "envoy.dynamo_table",
        r"^http\.<VALUE>\.dynamodb.(?:table|error)\.((<VALUE>)\.)",
    ),
    seg("envoy.mongo_collection", "mongo.*.collection.$.**.query.*"),
    seg("envoy.mongo_cmd", "mongo.*.cmd.$.**"),
    seg("envoy.grpc_bridge_method", "cluster.*.grpc.*.$.**"),
    seg("envoy.http_user_agent", "http.*.user_agent.$.**"),
    seg("envoy.virtual_cluster", "vhost.*.vcluster.$.**"),
    seg("envoy.fault_downstream_cluster", "http.*.fault.$.**"),
    re(
        "envoy.ssl_cipher",
        r"^listener\..*?\.ssl\.ciphers(\.(<CIPHER>))$",
    ),
    re(
        "envoy.ssl_curve",
        r"^<LISTENER_OR_CLUSTER>\.ssl\.curves(\.(<CIPHER>))$",
    ),
    re(
        "envoy.ssl_sigalg",
        r"^<LISTENER_OR_CLUSTER>\.ssl\.sigalgs(\.(<CIPHER>))$",
    ),
    re(
        "envoy.ssl_version",
        r"^<LISTENER_OR_CLUSTER>\.ssl\.versions(\.(<TLS_VERSION>))$",
    ),
    re(
        "envoy.ssl_cipher_suite",
        r"^cluster\.<VALUE>\.ssl\.ciphers(\.(<CIPHER>))$",
    ),
    seg("envoy.grpc_bridge_service", "cluster.*.grpc.$.**"),
    seg("envoy.tcp_prefix", "tcp.$.**"),
    seg("envoy.udp_prefix", "udp.$.**"),
    seg("envoy.clientssl_prefix", "auth.clientssl.$.**"),
    seg("envoy.ratelimit_prefix", "ratelimit.$.**"),
    seg("envoy.cluster_name", "cluster.$.**"),
    re(
        "envoy.http_conn_manager_prefix",
        r"^listener\..*?\.http\.((<VALUE>)\.)",
    ),
    seg("envoy.ext_authz_prefix", "cluster.*.ext_authz.$.**"),
    seg("envoy.ext_authz_prefix", "http.*.ext_authz.$.**"),
    seg("envoy.http_conn_manager_prefix", "http.$.**"),
    re(
        "envoy.worker_id",
        r"^(?:listener\.(?:<ADDRESS>|<VALUE>)\.|server\.|listener_manager\.)worker_((\d+)\.)",
    ),
    DefaultTag {
        name: "envoy.listener_address",
        kind: DefaultKind::Regex(r"^listener\.((<ADDRESS>|<VALUE>)\.)", Some("admin")),
    },
    seg("envoy.virtual_host", "vhost.$.**"),
    seg("envoy.mongo_prefix", "mongo.$.**"),
    re(
        "envoy.rds_route_config",
        r"^http\.<VALUE>\.rds\.((<ROUTE_CONFIG>)\.)\w+?$",
    ),
    seg("envoy.route", "vhost.*.route.$.**"),
    seg("envoy.thrift_prefix", "thrift.$.**"),
    seg("envoy.redis_prefix", "redis.$.**"),
    seg(
        "envoy.local_http_ratelimit_prefix",
        "$.http_local_rate_limit.**",
    ),
    seg(
        "envoy.local_network_ratelimit_prefix",
        "local_rate_limit.$.**",
    ),
    seg(
        "envoy.local_listener_ratelimit_prefix",
        "listener_local_ratelimit.$.**",
    ),
    seg("envoy.dns_filter_prefix", "dns_filter.$.**"),
];

/// Text a built-in pattern's matches always contain.
fn literal_hint(tag: &str) -> Option<&'static str> {
    Some(match tag {
        "envoy.response_code" | "envoy.response_code_class" => "_rq_",
        "envoy.worker_id" => "worker_",
        "envoy.http_conn_manager_prefix" => ".http.",
        "envoy.rds_route_config" => ".rds.",
        t if t.starts_with("envoy.dynamo_") => ".dynamodb",
        t if t.starts_with("envoy.ssl_") => ".ssl.",
        _ => return None,
    })
}

/// The placeholders the built-in patterns share.
fn expand(pattern: &str) -> String {
    pattern
        .replace(
            "<ADDRESS>",
            r"(?:(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+)",
        )
        .replace("<CIPHER>", r"[\w-]+")
        .replace("<TLS_VERSION>", r"TLSv\d\.\d")
        .replace("<VALUE>", r"[^\.]+")
        .replace("<ROUTE_CONFIG>", r"[\w\-\.]+")
        .replace("<LISTENER_OR_CLUSTER>", r"(?:listener|cluster)\..*?")
}

impl DefaultTag {
    fn compile(&self) -> Extractor {
        match self.kind {
            DefaultKind::Regex(pattern, unless) => {
                let pattern = ascii_perl_classes(&expand(pattern));
                Extractor {
                    tag: self.name.to_string(),
                    prefix: regex_prefix(&pattern),
                    how: How::Regex {
                        // The table is ours and tested: it compiles.
                        regex: Pattern::Linear(
                            regex::Regex::new(&pattern).expect("built-in tag pattern"),
                        ),
                        unless,
                        needs: literal_hint(self.name),
                    },
                }
            }
            DefaultKind::Segments(pattern) => segments_extractor(self.name, pattern),
        }
    }
}

fn segments_extractor(tag: &str, pattern: &str) -> Extractor {
    let segments: Vec<Segment> = pattern
        .split('.')
        .map(|s| match s {
            "*" => Segment::One,
            "$" => Segment::Value,
            "**" => Segment::Any,
            literal => Segment::Literal(literal.to_string()),
        })
        .collect();
    let prefix = match segments.first() {
        Some(Segment::Literal(first)) => Some(first.clone()),
        _ => None,
    };
    Extractor {
        tag: tag.to_string(),
        prefix,
        how: How::Segments(segments),
    }
}

/// The first segment a pattern can only match: the word after `^` when a dot (`\.`, or the
/// lookahead `(?=\.)`) follows it.
fn regex_prefix(pattern: &str) -> Option<String> {
    let rest = pattern.strip_prefix('^')?;
    let word_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .unwrap_or(rest.len());
    let (word, after) = rest.split_at(word_len);
    let dotted = after.starts_with(r"\.") || after.starts_with(r"(?=\.)");
    (!word.is_empty() && (dotted || after == "$")).then(|| word.to_string())
}

/// Reads `stats_config`.
pub fn stats_config(proto: &metrics_pb::StatsConfig, path: &str) -> ConfigResult<StatsConfig> {
    let metrics_pb::StatsConfig {
        stats_tags,
        use_all_default_tags,
        stats_matcher,
        histogram_bucket_settings,
    } = proto;
    let mut histogram_buckets = Vec::new();
    for (index, rule) in histogram_bucket_settings.iter().enumerate() {
        let rpath = item(path, "histogram_bucket_settings", index);
        let metrics_pb::HistogramBucketSettings { r#match, buckets } = rule;
        let Some(matcher) = r#match else {
            return err(field(&rpath, "match"), "required");
        };
        let matcher = string_matcher(matcher, &field(&rpath, "match"))?;
        if buckets.is_empty() {
            return err(field(&rpath, "buckets"), "at least one bound is required");
        }
        if let Some(bad) = buckets
            .iter()
            .find(|b| b.is_nan() || **b <= 0.0 || b.is_infinite())
        {
            return err(
                field(&rpath, "buckets"),
                format!("{bad} is not a positive bound"),
            );
        }
        let mut bounds = buckets.clone();
        bounds.sort_by(f64::total_cmp);
        if bounds.windows(2).any(|pair| pair[0] == pair[1]) {
            return err(field(&rpath, "buckets"), "bounds must be distinct");
        }
        histogram_buckets.push(HistogramBuckets { matcher, bounds });
    }
    let mut tags = if use_all_default_tags.is_none_or(|v| v) {
        TagProducer::default()
    } else {
        TagProducer {
            extractors: Vec::new(),
            fixed: Vec::new(),
        }
    };
    for (index, specifier) in stats_tags.iter().enumerate() {
        let spath = item(path, "stats_tags", index);
        let metrics_pb::TagSpecifier {
            tag_name,
            tag_value,
        } = specifier;
        if tag_name.is_empty() {
            return err(field(&spath, "tag_name"), "must not be empty");
        }
        use metrics_pb::tag_specifier::TagValue;
        match tag_value {
            Some(TagValue::FixedValue(value)) => tags.fixed.push((tag_name.clone(), value.clone())),
            Some(TagValue::Regex(pattern)) if !pattern.is_empty() => {
                // ECMAScript's `\d` and `\w` are ASCII; an error quotes the pattern as written.
                let regex = fancy_regex::Regex::new(&ascii_perl_classes(pattern))
                    .or_else(|_| fancy_regex::Regex::new(pattern).map_err(Box::new))
                    .map_err(|error| {
                        ConfigError::new(field(&spath, "regex"), format!("invalid regex: {error}"))
                    })?;
                tags.extractors.push(Extractor {
                    tag: tag_name.clone(),
                    prefix: regex_prefix(pattern),
                    how: How::Regex {
                        regex: Pattern::Backtracking(regex),
                        unless: None,
                        needs: None,
                    },
                });
            }
            // No pattern: the built-in one of that name.
            _ => {
                let builtin: Vec<Extractor> = DEFAULT_TAGS
                    .iter()
                    .filter(|d| d.name == tag_name)
                    .map(DefaultTag::compile)
                    .collect();
                if builtin.is_empty() {
                    return err(
                        field(&spath, "regex"),
                        format!(
                            "required: `{tag_name}` is not one of Envoy's built-in tags, so it \
                             has no pattern of its own"
                        ),
                    );
                }
                tags.extractors.extend(builtin);
            }
        }
    }
    use metrics_pb::stats_matcher::StatsMatcher as Which;
    let list = |list: &xds_api::envoy::r#type::matcher::v3::ListStringMatcher, name: &str| {
        list.patterns
            .iter()
            .enumerate()
            .map(|(i, m)| {
                string_matcher(
                    m,
                    &item(&format!("{path}.stats_matcher.{name}"), "patterns", i),
                )
            })
            .collect::<ConfigResult<Vec<_>>>()
    };
    let matcher = match stats_matcher
        .as_ref()
        .and_then(|m| m.stats_matcher.as_ref())
    {
        None | Some(Which::RejectAll(false)) => StatsMatcher::All,
        Some(Which::RejectAll(true)) => StatsMatcher::RejectAll,
        Some(Which::InclusionList(l)) => StatsMatcher::Include(list(l, "inclusion_list")?),
        Some(Which::ExclusionList(l)) => StatsMatcher::Exclude(list(l, "exclusion_list")?),
    };
    Ok(StatsConfig {
        tags,
        matcher,
        histogram_buckets,
    })
}

/// Envoy's name for a sink's stats when no `prefix` is set.
pub const DEFAULT_SINK_PREFIX: &str = "envoy";

/// One of the bootstrap's `stats_sinks`: a statsd or DogStatsD collector Remora sends to over
/// UDP, as Envoy's `envoy.stat_sinks.statsd` and `envoy.stat_sinks.dog_statsd` do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsdSink {
    pub address: std::net::SocketAddr,
    /// Put before every name, with a dot.
    pub prefix: String,
    /// DogStatsD: names after tag extraction, their tags after `|#` (statsd: full names).
    pub tagged: bool,
    /// Lines of one flush share a datagram up to this many bytes; `None`: one per datagram.
    pub max_bytes_per_datagram: Option<usize>,
}

/// One of the bootstrap's `stats_sinks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsSink {
    Statsd(StatsdSink),
    MetricsService(MetricsServiceSink),
}

/// `envoy.stat_sinks.metrics_service`: every flush streamed over gRPC (`StreamMetrics`) to a
/// cluster, as Prometheus metric families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsServiceSink {
    /// The `envoy_grpc` cluster.
    pub cluster: String,
    /// `report_counters_as_deltas`: a counter's change since the last flush, not its value.
    pub counters_as_deltas: bool,
    /// `emit_tags_as_labels`: names after tag extraction, their tags as labels.
    pub tags_as_labels: bool,
    /// `histogram_emit_mode`: a summary family, a histogram family, or both, per histogram.
    pub summaries: bool,
    pub histograms: bool,
}

/// Reads one of `stats_sinks`. Envoy picks a sink by its `typed_config`'s type.
pub fn stats_sink(proto: &metrics_pb::StatsSink, path: &str) -> ConfigResult<StatsSink> {
    if let Some(metrics_pb::stats_sink::ConfigType::TypedConfig(any)) = &proto.config_type
        && any.type_url
            == format!(
                "{}envoy.config.metrics.v3.MetricsServiceConfig",
                type_urls::PREFIX
            )
    {
        let typed = field(path, "typed_config");
        let config: metrics_pb::MetricsServiceConfig = crate::common::unpack(any, &typed)?;
        return metrics_service_sink(&config, &typed).map(StatsSink::MetricsService);
    }
    statsd_sink(proto, path).map(StatsSink::Statsd)
}

fn metrics_service_sink(
    proto: &metrics_pb::MetricsServiceConfig,
    path: &str,
) -> ConfigResult<MetricsServiceSink> {
    let metrics_pb::MetricsServiceConfig {
        grpc_service,
        report_counters_as_deltas,
        transport_api_version,
        emit_tags_as_labels,
        histogram_emit_mode,
    } = proto;
    crate::common::api_version(
        *transport_api_version,
        &field(path, "transport_api_version"),
    )?;
    let Some(service) = grpc_service else {
        return err(field(path, "grpc_service"), "required");
    };
    let cluster = crate::common::envoy_grpc_only(service, &field(path, "grpc_service"))?;
    use metrics_pb::HistogramEmitMode as Mode;
    let (summaries, histograms) = match Mode::try_from(*histogram_emit_mode) {
        Ok(Mode::SummaryAndHistogram) => (true, true),
        Ok(Mode::Summary) => (true, false),
        Ok(Mode::Histogram) => (false, true),
        Err(_) => return err(field(path, "histogram_emit_mode"), "unknown mode"),
    };
    Ok(MetricsServiceSink {
        cluster,
        counters_as_deltas: report_counters_as_deltas.unwrap_or(false),
        tags_as_labels: *emit_tags_as_labels,
        summaries,
        histograms,
    })
}

fn statsd_sink(proto: &metrics_pb::StatsSink, path: &str) -> ConfigResult<StatsdSink> {
    use metrics_pb::stats_sink::ConfigType;
    let metrics_pb::StatsSink { name, config_type } = proto;
    let Some(ConfigType::TypedConfig(any)) = config_type else {
        return err(
            field(path, "typed_config"),
            format!("required: the settings of sink {name:?}, with their @type"),
        );
    };
    let typed = field(path, "typed_config");
    let prefix = |prefix: &str| {
        if prefix.is_empty() {
            DEFAULT_SINK_PREFIX.to_string()
        } else {
            prefix.to_string()
        }
    };
    if any.type_url == format!("{}envoy.config.metrics.v3.StatsdSink", type_urls::PREFIX) {
        let metrics_pb::StatsdSink {
            statsd_specifier,
            prefix: given,
        } = crate::common::unpack(any, &typed)?;
        use metrics_pb::statsd_sink::StatsdSpecifier;
        let address = match statsd_specifier {
            Some(StatsdSpecifier::Address(address)) => {
                crate::common::socket_address(&Some(address), &field(&typed, "address"))?
            }
            Some(StatsdSpecifier::TcpClusterName(_)) => {
                return err(
                    field(&typed, "tcp_cluster_name"),
                    "Remora sends statsd over UDP only: set `address` instead",
                );
            }
            None => return err(field(&typed, "address"), "required"),
        };
        return Ok(StatsdSink {
            address,
            prefix: prefix(&given),
            tagged: false,
            max_bytes_per_datagram: None,
        });
    }
    if any.type_url == format!("{}envoy.config.metrics.v3.DogStatsdSink", type_urls::PREFIX) {
        let metrics_pb::DogStatsdSink {
            dog_statsd_specifier,
            prefix: given,
            max_bytes_per_datagram,
        } = crate::common::unpack(any, &typed)?;
        use metrics_pb::dog_statsd_sink::DogStatsdSpecifier;
        let address = match dog_statsd_specifier {
            Some(DogStatsdSpecifier::Address(address)) => {
                crate::common::socket_address(&Some(address), &field(&typed, "address"))?
            }
            None => return err(field(&typed, "address"), "required"),
        };
        let max_bytes_per_datagram = match max_bytes_per_datagram {
            Some(0) => {
                return err(
                    field(&typed, "max_bytes_per_datagram"),
                    "must be greater than 0",
                );
            }
            Some(bytes) => Some(usize::try_from(bytes).unwrap_or(usize::MAX)),
            None => None,
        };
        return Ok(StatsdSink {
            address,
            prefix: prefix(&given),
            tagged: true,
            max_bytes_per_datagram,
        });
    }
    err(
        typed,
        format!(
            "stats sink {} is not supported: Remora pushes to statsd \
             (envoy.config.metrics.v3.StatsdSink), DogStatsD \
             (envoy.config.metrics.v3.DogStatsdSink) and a metrics service \
             (envoy.config.metrics.v3.MetricsServiceConfig), and serves /stats/prometheus",
            any.type_url
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(producer: &TagProducer, name: &str) -> (String, Vec<(String, String)>) {
        let t = producer.produce(name);
        (t.name, t.tags)
    }

    fn tags(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// A stat name, its metric name and its tags.
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    );

    #[test]
    fn the_built_in_tags_split_names_as_envoy_does() {
        let p = TagProducer::default();
        // Each expectation is what Envoy 1.40's /stats/prometheus printed for the name.
        let cases: &[Case] = &[
            (
                "cluster.svc.upstream_rq_200",
                "cluster.upstream_rq",
                &[
                    ("envoy.response_code", "200"),
                    ("envoy.cluster_name", "svc"),
                ],
            ),
            (
                "cluster.svc.upstream_rq_2xx",
                "cluster.upstream_rq_xx",
                &[
                    ("envoy.response_code_class", "2"),
                    ("envoy.cluster_name", "svc"),
                ],
            ),
            // A dotted cluster name: the first segment is the name, the rest stays.
            (
                "cluster.other.dotted.name.upstream_cx_total",
                "cluster.dotted.name.upstream_cx_total",
                &[("envoy.cluster_name", "other")],
            ),
            (
                "listener.127.0.0.1_19910.http.ingress_http.downstream_rq_2xx",
                "listener.http.downstream_rq_xx",
                &[
                    ("envoy.response_code_class", "2"),
                    ("envoy.http_conn_manager_prefix", "ingress_http"),
                    ("envoy.listener_address", "127.0.0.1_19910"),
                ],
            ),
            (
                "listener.127.0.0.1_19910.worker_0.downstream_cx_total",
                "listener.worker_downstream_cx_total",
                &[
                    ("envoy.worker_id", "0"),
                    ("envoy.listener_address", "127.0.0.1_19910"),
                ],
            ),
            (
                "listener.admin.downstream_cx_total",
                "listener.admin.downstream_cx_total",
                &[],
            ),
            (
                "http.ingress_http.downstream_cx_total",
                "http.downstream_cx_total",
                &[("envoy.http_conn_manager_prefix", "ingress_http")],
            ),
            (
                "tcp.tcpstats.downstream_cx_total",
                "tcp.downstream_cx_total",
                &[("envoy.tcp_prefix", "tcpstats")],
            ),
            (
                "vhost.backend.vcluster.vc1.upstream_rq_200",
                "vhost.vcluster.upstream_rq",
                &[
                    ("envoy.response_code", "200"),
                    ("envoy.virtual_cluster", "vc1"),
                    ("envoy.virtual_host", "backend"),
                ],
            ),
            (
                "server.worker_0.watchdog_miss",
                "server.worker_watchdog_miss",
                &[("envoy.worker_id", "0")],
            ),
            ("server.live", "server.live", &[]),
            (
                "http.ingress_http.rds.local_route.v1.config_reload",
                "http.rds.config_reload",
                &[
                    ("envoy.http_conn_manager_prefix", "ingress_http"),
                    ("envoy.rds_route_config", "local_route.v1"),
                ],
            ),
        ];
        for (name, metric, want) in cases {
            assert_eq!(tagged(&p, name), (metric.to_string(), tags(want)), "{name}");
        }
    }

    fn config(yaml_like: metrics_pb::StatsConfig) -> ConfigResult<StatsConfig> {
        stats_config(&yaml_like, "stats_config")
    }

    fn specifier(
        name: &str,
        value: Option<metrics_pb::tag_specifier::TagValue>,
    ) -> metrics_pb::TagSpecifier {
        metrics_pb::TagSpecifier {
            tag_name: name.into(),
            tag_value: value,
        }
    }

    #[test]
    fn istio_tags_with_lookahead_and_fixed_values_apply_after_the_built_in_ones() {
        use metrics_pb::tag_specifier::TagValue::*;
        let stats = config(metrics_pb::StatsConfig {
            stats_tags: vec![
                specifier("clname", Some(Regex(r"^cluster\.((.+?\.name)\.)".into()))),
                // Istio's, with a lookahead.
                specifier(
                    "listener_http",
                    Some(Regex(r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)".into())),
                ),
                specifier("team", Some(FixedValue("core".into()))),
                // A second extractor of a tag already taken: the first wins, as in Envoy.
                specifier("envoy.cluster_name", Some(Regex(r"^cluster\.((.+)\.)".into()))),
            ],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            tagged(&stats.tags, "cluster.other.dotted.name.upstream_rq_2xx"),
            (
                "cluster.upstream_rq_xx".to_string(),
                tags(&[
                    ("envoy.response_code_class", "2"),
                    ("team", "core"),
                    ("envoy.cluster_name", "other"),
                    ("clname", "other.dotted.name"),
                ])
            )
        );
        assert_eq!(
            regex_prefix(r"^listener(?=\.).*?\.http"),
            Some("listener".into())
        );
        assert_eq!(regex_prefix(r"^cluster(\.(.+);)"), None);
    }

    #[test]
    fn without_the_built_in_tags_only_the_named_ones_apply() {
        use metrics_pb::tag_specifier::TagValue::*;
        let stats = config(metrics_pb::StatsConfig {
            use_all_default_tags: Some(false),
            stats_tags: vec![
                specifier("cluster_name", Some(Regex(r"^cluster(\.(.+);)".into()))),
                specifier("envoy.listener_address", None),
            ],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            tagged(&stats.tags, "cluster.xds-grpc;.upstream_rq_200"),
            (
                "cluster.upstream_rq_200".to_string(),
                tags(&[("cluster_name", "xds-grpc")])
            )
        );
        assert_eq!(
            tagged(
                &stats.tags,
                "listener.10.0.0.1_80.worker_1.downstream_cx_total"
            ),
            (
                "listener.worker_1.downstream_cx_total".to_string(),
                tags(&[("envoy.listener_address", "10.0.0.1_80")])
            )
        );
    }

    #[test]
    fn bad_tag_specifiers_are_named() {
        use metrics_pb::tag_specifier::TagValue::*;
        let error = config(metrics_pb::StatsConfig {
            stats_tags: vec![specifier("mine", None)],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(error.path, "stats_config.stats_tags[0].regex");
        assert!(error.reason.contains("built-in"), "{error}");
        let error = config(metrics_pb::StatsConfig {
            stats_tags: vec![specifier("x", Some(Regex("a(b".into())))],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(error.path, "stats_config.stats_tags[0].regex");
    }

    #[test]
    fn the_matcher_admits_by_list() {
        use xds_api::envoy::r#type::matcher::v3 as m;
        let prefix = |p: &str| m::StringMatcher {
            match_pattern: Some(m::string_matcher::MatchPattern::Prefix(p.into())),
            ignore_case: false,
        };
        let stats = config(metrics_pb::StatsConfig {
            stats_matcher: Some(metrics_pb::StatsMatcher {
                stats_matcher: Some(metrics_pb::stats_matcher::StatsMatcher::InclusionList(
                    m::ListStringMatcher {
                        patterns: vec![prefix("server"), prefix("cluster.xds")],
                    },
                )),
            }),
            ..Default::default()
        })
        .unwrap();
        assert!(stats.matcher.admits("server.live"));
        assert!(stats.matcher.admits("cluster.xds.upstream_rq_total"));
        assert!(!stats.matcher.admits("cluster.app.upstream_rq_total"));
        assert!(StatsMatcher::All.admits("x"));
        assert!(!StatsMatcher::RejectAll.admits("x"));
    }
}
