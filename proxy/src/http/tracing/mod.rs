//! Tracing, as Envoy's HTTP connection manager does it: the sampling decision (kept in
//! `x-request-id`, [`request_id`]), the trace context read from the request and passed upstream
//! ([`propagation`]), one span per request (SERVER for ingress, CLIENT for egress) and, with
//! `spawn_upstream_span`, one CLIENT span per upstream request, tagged with Envoy's tags; and
//! the spans' way out ([`export`]: a bounded queue per tracer, batched, sent off the workers by
//! the OpenTelemetry ([`otlp`]) or Zipkin ([`zipkin`]) exporter through a cluster).
//!
//! Where a request meets it: the connection manager starts a trace once the route is chosen
//! ([`Tracer::start`]), the router stamps the upstream request ([`ActiveTrace::on_upstream`]),
//! the connection manager records the response ([`ActiveTrace::on_response`]), and the span is
//! finished when the response body ends ([`Completion`], held with the stream's other slots).
//! Only sampled requests allocate; an unsampled one still passes its context on.

pub mod export;
pub mod otlp;
pub mod propagation;
pub mod request_id;
pub mod zipkin;

use crate::error::ResponseFlags;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use remora_config::tracing::{CustomTag, MetadataKind, Provider, TagValue, Tracing};

use crate::http::headers::X_REQUEST_ID;
use crate::http::selected::Selected;
use export::Exporter;
use propagation::Format;
use request_id::{Reason, Sampling, X_CLIENT_TRACE_ID};

pub static X_ENVOY_DECORATOR_OPERATION: HeaderName =
    HeaderName::from_static("x-envoy-decorator-operation");
static X_ENVOY_DOWNSTREAM_SERVICE_CLUSTER: HeaderName =
    HeaderName::from_static("x-envoy-downstream-service-cluster");

/// What every tracer of the process shares: who this proxy is, and where exports run.
#[derive(Debug, Clone)]
pub struct TracingContext {
    pub node_id: Arc<str>,
    pub node_cluster: Arc<str>,
    pub zone: Arc<str>,
    /// The address Zipkin's `localEndpoint` names (the host's first non-loopback IPv4).
    pub local_ip: Option<IpAddr>,
    /// `remora.tracing.propagate_w3c_and_b3`.
    pub propagate_both: bool,
    pub store: Arc<crate::store::Store>,
    /// The bootstrap's `tracing.http`: the tracer of connection managers that name none.
    pub default_provider: Option<Provider>,
}

impl TracingContext {
    pub fn new(
        node: &remora_config::bootstrap::Node,
        propagate_both: bool,
        store: Arc<crate::store::Store>,
        default_provider: Option<Provider>,
    ) -> Self {
        TracingContext {
            node_id: node.id.as_str().into(),
            node_cluster: node.cluster.as_str().into(),
            zone: node
                .proto
                .locality
                .as_ref()
                .map_or("", |locality| locality.zone.as_str())
                .into(),
            local_ip: local_ipv4(),
            propagate_both,
            store,
            default_provider,
        }
    }
}

/// The host's first non-loopback IPv4 address, from the kernel's routing table (what Envoy
/// puts in Zipkin's `localEndpoint`).
fn local_ipv4() -> Option<IpAddr> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").ok()?;
    let mut last: Option<IpAddr> = None;
    for line in trie.lines() {
        let line = line.trim();
        if let Some(address) = line.strip_prefix("|-- ") {
            last = address.parse().ok();
        } else if line.contains("/32 host LOCAL")
            && let Some(ip) = last
            && !ip.is_loopback()
        {
            return Some(ip);
        }
    }
    None
}

/// Which tracer makes the spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    OpenTelemetry {
        always_on: bool,
    },
    Zipkin {
        shared_span_context: bool,
        trace_id_128bit: bool,
    },
}

/// A span's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

/// A connection manager's tracer, built with it.
#[derive(Debug)]
pub struct Tracer {
    config: Tracing,
    driver: Driver,
    /// Contexts read: W3C and/or B3, in order of preference.
    read_w3c: bool,
    read_b3: bool,
    write_w3c: bool,
    write_b3: bool,
    /// An OUTBOUND listener's: spans are CLIENT, named `egress HOST`.
    egress: bool,
    /// A span per upstream request: `spawn_upstream_span`, or Zipkin's
    /// `split_spans_for_request` (its older name for the same split).
    spawn_upstream: bool,
    pub context: TracingContext,
    /// Node, zone and the literal and environment tags (resolved when built, as Envoy reads
    /// the environment once), handed to the exporter with each span.
    tags: Arc<ExportTags>,
    exporter: Arc<Exporter>,
}

impl Tracer {
    /// The tracer of a connection manager with `tracing`, or `None` without a provider (Envoy
    /// then still writes the decision into `x-request-id`, which [`decide`] does alone).
    pub fn build(
        config: &Tracing,
        egress: bool,
        context: &TracingContext,
        registry: &crate::stats::Registry,
    ) -> Option<Arc<Tracer>> {
        let provider = config
            .provider
            .as_ref()
            .or(context.default_provider.as_ref())?;
        let (driver, w3c_first) = match provider {
            Provider::OpenTelemetry(otel) => (
                Driver::OpenTelemetry {
                    always_on: otel.always_on_sampler,
                },
                true,
            ),
            Provider::Zipkin(zipkin) => (
                Driver::Zipkin {
                    shared_span_context: zipkin.shared_span_context,
                    trace_id_128bit: zipkin.trace_id_128bit,
                },
                false,
            ),
        };
        let zipkin_w3c = matches!(provider, Provider::Zipkin(z) if z.w3c_propagation);
        let both = context.propagate_both || zipkin_w3c;
        let fixed = config
            .custom_tags
            .iter()
            .filter_map(|tag| {
                let value = match &tag.value {
                    TagValue::Literal(value) => value.clone(),
                    TagValue::Environment { name, default } => {
                        std::env::var(name).unwrap_or_else(|_| default.clone())
                    }
                    _ => return None,
                };
                (!value.is_empty()).then(|| (tag.tag.as_str().into(), value.as_str().into()))
            })
            .collect();
        Some(Arc::new(Tracer {
            config: config.clone(),
            driver,
            read_w3c: w3c_first || both,
            read_b3: !w3c_first || both,
            write_w3c: w3c_first || both,
            write_b3: !w3c_first || both,
            egress,
            spawn_upstream: config.spawn_upstream_span
                || matches!(provider, Provider::Zipkin(z) if z.split_spans_for_request),
            context: context.clone(),
            tags: Arc::new(ExportTags {
                node_id: context.node_id.clone(),
                zone: context.zone.clone(),
                fixed,
            }),
            exporter: Exporter::for_provider(provider, context, registry, sink),
        }))
    }

    fn sampling(&self, route: Option<&Selected>) -> Sampling {
        sampling(&self.config, route)
    }

    /// Starts the request's trace: decides (writing `x-request-id`), reads the incoming
    /// context, and makes the proxy's span context. Never fails: a context that does not parse
    /// starts a new trace. `carried`: which trace headers `request` may hold. The decision is
    /// counted once the request's filters have run ([`ActiveTrace::settle`]).
    pub fn start(
        self: &Arc<Self>,
        (request, carried): (&mut http::request::Parts, propagation::Carried),
        route: Option<&Selected>,
        peer: SocketAddr,
        scheme: &'static str,
        bytes_received: Option<Arc<AtomicU64>>,
    ) -> ActiveTrace {
        let reason =
            request_id::decide(&mut request.headers, self.sampling(route), carried.forcing);
        let headers = &request.headers;
        let w3c = (self.read_w3c && carried.traceparent)
            .then(|| propagation::read_w3c(headers))
            .flatten();
        let b3 = (self.read_b3 && carried.b3)
            .then(|| propagation::read_b3(headers))
            .flatten();
        let incoming = match self.driver {
            Driver::OpenTelemetry { .. } => w3c.or_else(|| b3.and_then(|b3| b3.context())),
            Driver::Zipkin { .. } => b3.and_then(|b3| b3.context()).or(w3c),
        };
        // B3 may carry a decision without ids.
        let caller_decision = incoming
            .as_ref()
            .and_then(|c| c.sampled)
            .or_else(|| b3.and_then(|b3| b3.sampled()));
        // Envoy's OpenTelemetry tracer samples only what both the caller and the decision
        // sample; its Zipkin tracer lets the caller's decision stand.
        let sampled = match self.driver {
            Driver::OpenTelemetry { always_on: true } => true,
            Driver::OpenTelemetry { always_on: false } => {
                reason.traced() && caller_decision.unwrap_or(true)
            }
            Driver::Zipkin { .. } => caller_decision.unwrap_or(reason.traced()),
        };
        let kind = if self.egress {
            Kind::Client
        } else {
            Kind::Server
        };
        let (trace_id, span_id, parent_id, shared, trace_id_128) = match (&incoming, self.driver) {
            (
                Some(context),
                Driver::Zipkin {
                    shared_span_context: true,
                    ..
                },
            ) if kind == Kind::Server => (
                context.trace_id,
                context.span_id,
                context.parent_id,
                true,
                context.trace_id_128,
            ),
            (Some(context), _) => (
                context.trace_id,
                random_id(),
                Some(context.span_id),
                false,
                context.trace_id_128,
            ),
            (
                None,
                Driver::Zipkin {
                    shared_span_context,
                    trace_id_128bit,
                },
            ) => {
                let trace_id = if trace_id_128bit {
                    rand::random::<u128>() | 1
                } else {
                    u128::from(random_id())
                };
                // Envoy's Zipkin root span takes the trace id's low half as its id.
                (
                    trace_id,
                    trace_id as u64,
                    None,
                    shared_span_context && kind == Kind::Server,
                    trace_id_128bit,
                )
            }
            (None, Driver::OpenTelemetry { .. }) => {
                (rand::random::<u128>() | 1, random_id(), None, false, true)
            }
        };
        let inject_b3 = match incoming.as_ref().map(|c| c.format) {
            Some(Format::B3Single) => Format::B3Single,
            _ => Format::B3Multi,
        };
        let decorator = route.and_then(|selected| selected.route().decorator.as_ref());
        let record = sampled.then(|| {
            let name = self.span_name(request, decorator);
            Box::new(Record::new(
                self,
                request,
                route,
                peer,
                scheme,
                reason,
                &name,
                kind,
                bytes_received,
            ))
        });
        ActiveTrace {
            tracer: self.clone(),
            trace_id,
            span_id,
            parent_id,
            sampled,
            reason,
            shared,
            trace_id_128,
            tracestate: carried
                .tracestate
                .then(|| propagation::read_tracestate(&request.headers))
                .flatten(),
            inject_b3,
            decorator: decorator
                .filter(|d| d.propagate)
                .map(|d| d.operation.clone()),
            record,
        }
    }

    /// The span's name: the route decorator's operation (on ingress, an operation the caller
    /// passed in `x-envoy-decorator-operation` wins), else `ingress` / `egress HOST` for the
    /// OpenTelemetry tracer and the host for Zipkin, as Envoy names them.
    fn span_name<'a>(
        &self,
        request: &'a http::request::Parts,
        decorator: Option<&'a remora_config::tracing::Decorator>,
    ) -> std::borrow::Cow<'a, str> {
        if !self.egress
            && let Some(operation) = request
                .headers
                .get(&X_ENVOY_DECORATOR_OPERATION)
                .and_then(|v| v.to_str().ok())
        {
            return operation.into();
        }
        if let Some(decorator) = decorator {
            return decorator.operation.as_str().into();
        }
        let host = request
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        match self.driver {
            Driver::Zipkin { .. } => host.into(),
            Driver::OpenTelemetry { .. } if self.egress => format!("egress {host}").into(),
            Driver::OpenTelemetry { .. } => "ingress".into(),
        }
    }
}

/// The sampling shares for a request: the route's `tracing` overrides, else the HCM's.
/// The provider's wire format: OTLP or Zipkin.
fn sink(provider: &Provider, context: &TracingContext) -> Box<dyn export::Sink> {
    match provider {
        Provider::OpenTelemetry(otel) => otlp::sink(otel, context),
        Provider::Zipkin(zipkin) => zipkin::sink(zipkin, context),
    }
}

fn sampling(config: &Tracing, route: Option<&Selected>) -> Sampling {
    let overrides = route.and_then(|selected| selected.route().tracing.as_ref());
    Sampling {
        client: overrides
            .and_then(|o| o.client_sampling)
            .unwrap_or(config.client_sampling),
        random: overrides
            .and_then(|o| o.random_sampling)
            .unwrap_or(config.random_sampling),
        overall: overrides
            .and_then(|o| o.overall_sampling)
            .unwrap_or(config.overall_sampling),
    }
}

/// A connection manager with `tracing` but no provider: Envoy still writes the decision into
/// `x-request-id` (and makes no span).
pub fn decide_only(
    config: &Tracing,
    request: &mut http::request::Parts,
    route: Option<&Selected>,
) -> Reason {
    let forcing = request_id::Forcing::of(&request.headers);
    request_id::decide(&mut request.headers, sampling(config, route), forcing)
}

/// A random non-zero span id.
fn random_id() -> u64 {
    rand::random::<u64>() | 1
}

/// The trace of one request while it is in the proxy.
#[derive(Debug)]
pub struct ActiveTrace {
    tracer: Arc<Tracer>,
    pub trace_id: u128,
    pub span_id: u64,
    parent_id: Option<u64>,
    pub sampled: bool,
    /// Why it is traced, or not.
    pub reason: Reason,
    shared: bool,
    trace_id_128: bool,
    tracestate: Option<HeaderValue>,
    inject_b3: Format,
    /// The decorator's operation, when it is propagated.
    decorator: Option<String>,
    /// What a sampled request's span will say (none when not sampled).
    record: Option<Box<Record>>,
}

impl ActiveTrace {
    /// The body byte counter the span reads `request_size` from, for the request body.
    pub fn bytes_received(&self) -> Option<Arc<AtomicU64>> {
        self.record.as_ref().map(|r| r.bytes_received.clone())
    }

    /// Settles the decision once the request's filters have run, and counts it under Envoy's
    /// names. A health check (as the health check filter marked it) is never traced, as in
    /// Envoy: no span, the context sent on says "not sampled", and it counts as
    /// `tracing.health_check` and `tracing.not_traceable`.
    pub fn settle(&mut self, health_check: bool, stats: &crate::stats::HttpStats) {
        if health_check {
            self.sampled = false;
            self.record = None;
            stats.tracing_health_check.inc();
            stats.tracing_not_traceable.inc();
            return;
        }
        match self.reason {
            Reason::Sampling => stats.tracing_random_sampling.inc(),
            Reason::ServiceForced => stats.tracing_service_forced.inc(),
            Reason::ClientForced => stats.tracing_client_enabled.inc(),
            Reason::NotTraceable => stats.tracing_not_traceable.inc(),
        }
    }

    /// Stamps the upstream request: the trace context (of the upstream span when
    /// `spawn_upstream_span`, else of the proxy's span) and, on egress, the decorator.
    pub fn on_upstream(
        &mut self,
        headers: &mut HeaderMap,
        cluster: &str,
        address: SocketAddr,
        protocol: Version,
        body_empty: bool,
    ) {
        let tracer = self.tracer.clone();
        // Without a request body, the request is in and goes out now (with one, when its body
        // ends: not recorded).
        if body_empty && let Some(record) = self.record.as_mut() {
            record.event(event::LAST_DOWNSTREAM_RX);
            record.event(event::FIRST_UPSTREAM_TX);
            record.event(event::LAST_UPSTREAM_TX);
        }
        let mut span_id = self.span_id;
        let mut parent_id = self.parent_id;
        if tracer.spawn_upstream {
            let upstream_span = random_id();
            parent_id = Some(self.span_id);
            span_id = upstream_span;
            if let Some(record) = self.record.as_mut() {
                record.upstream_span = Some((upstream_span, SystemTime::now()));
            }
        }
        if let Some(record) = self.record.as_mut() {
            let cluster = record.keep(cluster);
            record.upstream = Some(Upstream {
                cluster,
                address,
                protocol,
            });
        }
        if tracer.write_w3c {
            headers.insert(
                &propagation::TRACEPARENT,
                propagation::traceparent(self.trace_id, span_id, self.sampled),
            );
            headers.insert(
                &propagation::TRACESTATE,
                self.tracestate
                    .clone()
                    .unwrap_or_else(|| HeaderValue::from_static("")),
            );
        }
        if tracer.write_b3 {
            let wide = self.trace_id_128;
            // B3 names the injected span and that span's own parent.
            let parent = parent_id;
            match self.inject_b3 {
                Format::B3Single => propagation::write_b3_single(
                    headers,
                    self.trace_id,
                    wide,
                    span_id,
                    parent,
                    self.sampled,
                ),
                _ => propagation::write_b3_multi(
                    headers,
                    self.trace_id,
                    wide,
                    span_id,
                    parent,
                    self.sampled,
                ),
            }
        }
        if tracer.egress
            && let Some(operation) = &self.decorator
            && let Ok(value) = HeaderValue::from_str(operation)
        {
            headers.insert(&X_ENVOY_DECORATOR_OPERATION, value);
        }
    }

    /// The upstream's response headers arrived.
    pub fn on_upstream_response(&mut self) {
        if let Some(record) = self.record.as_mut() {
            record.event(event::FIRST_UPSTREAM_RX);
        }
    }

    /// The response is on its way: on ingress, the decorator's operation goes back to the
    /// caller; the span learns the status and response flags.
    pub fn on_response(&mut self, headers: &mut HeaderMap, status: u16, flags: ResponseFlags) {
        if !self.tracer.egress
            && let Some(operation) = &self.decorator
            && let Ok(value) = HeaderValue::from_str(operation)
        {
            headers.insert(&X_ENVOY_DECORATOR_OPERATION, value);
        }
        if let Some(record) = self.record.as_mut() {
            record.status = status;
            record.flags = flags;
            record.event(event::FIRST_DOWNSTREAM_TX);
        }
    }

    /// The trace id, for `%TRACE_ID%`.
    pub fn trace_id(&self) -> crate::http::access_log::TraceId {
        crate::http::access_log::TraceId {
            id: self.trace_id,
            wide: self.trace_id_128,
        }
    }

    /// What finishes the span when the response ends (nothing for an unsampled request).
    pub fn into_completion(self) -> Option<Completion> {
        let ActiveTrace {
            tracer,
            trace_id,
            span_id,
            parent_id,
            shared,
            record,
            ..
        } = self;
        let mut record = record?;
        record.ids = Ids {
            trace_id,
            span_id,
            parent_id,
            shared,
        };
        Some(Completion {
            tracer,
            record: Some(record),
        })
    }
}

/// Ids of a finished span.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ids {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub shared: bool,
}

/// Where a piece of text is in [`Record::text`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Piece(u32, u32);

/// Where the request went upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub cluster: Piece,
    pub address: SocketAddr,
    pub protocol: Version,
}

/// What a sampled request's spans say, gathered as it goes; turned into the exporter's format
/// off the worker. Its text (name, URL, header values, custom tag values) lives in one
/// string, so a sampled request costs the worker three allocations (this, its text, the body
/// byte counter) and keeps no reference to the connection's buffers while it waits in the
/// export queue.
#[derive(Debug)]
pub struct Record {
    pub ids: Ids,
    pub kind: Kind,
    pub start: SystemTime,
    pub started: std::time::Instant,
    pub duration: Duration,
    pub method: Method,
    pub version: Version,
    pub peer: IpAddr,
    text: String,
    name: Piece,
    url: Piece,
    user_agent: Option<Piece>,
    request_id: Option<Piece>,
    client_trace_id: Option<Piece>,
    downstream_cluster: Option<Piece>,
    tracestate: Option<Piece>,
    /// Custom tags whose value comes from the request (literal and environment ones are the
    /// tracer's).
    pub tags: Vec<(Arc<str>, Piece)>,
    pub status: u16,
    pub flags: ResponseFlags,
    pub bytes_received: Arc<AtomicU64>,
    pub bytes_sent: u64,
    pub upstream: Option<Upstream>,
    /// The upstream span's id and start, with `spawn_upstream_span`.
    pub upstream_span: Option<(u64, SystemTime)>,
    pub reason: Reason,
    /// `verbose`: timing events (Envoy's names), in the order they happened.
    pub events: Option<Vec<(&'static str, SystemTime)>>,
}

impl Record {
    /// Keeps `value` in the record's text.
    fn keep(&mut self, value: &str) -> Piece {
        let start = self.text.len() as u32;
        self.text.push_str(value);
        Piece(start, self.text.len() as u32)
    }

    fn keep_header(&mut self, value: Option<&HeaderValue>) -> Option<Piece> {
        let value = value?.to_str().ok()?;
        Some(self.keep(value))
    }

    /// A piece of the record's text.
    pub fn text(&self, piece: Piece) -> &str {
        self.text
            .get(piece.0 as usize..piece.1 as usize)
            .unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.text(self.name)
    }

    pub fn url(&self) -> &str {
        self.text(self.url)
    }

    /// The incoming `tracestate` ("" when none came).
    pub fn tracestate(&self) -> &str {
        self.tracestate.map_or("", |piece| self.text(piece))
    }

    /// The upstream cluster's name, when the request went upstream.
    pub fn cluster(&self) -> Option<&str> {
        self.upstream.as_ref().map(|u| self.text(u.cluster))
    }

    /// Where the request went upstream.
    pub fn set_upstream(&mut self, cluster: &str, address: SocketAddr) {
        let cluster = self.keep(cluster);
        self.upstream = Some(Upstream {
            cluster,
            address,
            protocol: Version::HTTP_11,
        });
    }

    /// A record with a name and URL and nothing else, for the exporters' tests.
    #[cfg(test)]
    pub fn for_test(name: &str, url: &str) -> Self {
        let mut record = Record {
            ids: Ids::default(),
            kind: Kind::Server,
            start: SystemTime::UNIX_EPOCH,
            started: std::time::Instant::now(),
            duration: Duration::ZERO,
            method: Method::GET,
            version: Version::HTTP_11,
            peer: IpAddr::from([127, 0, 0, 1]),
            text: String::new(),
            name: Piece::default(),
            url: Piece::default(),
            user_agent: None,
            request_id: None,
            client_trace_id: None,
            downstream_cluster: None,
            tracestate: None,
            tags: Vec::new(),
            status: 200,
            flags: ResponseFlags::default(),
            bytes_received: Arc::default(),
            bytes_sent: 0,
            upstream: None,
            upstream_span: None,
            reason: Reason::Sampling,
            events: None,
        };
        record.name = record.keep(name);
        record.url = record.keep(url);
        record
    }
}

/// The timing events `verbose` adds, as Envoy names them.
pub mod event {
    pub const LAST_DOWNSTREAM_RX: &str = "last_downstream_rx_byte_received";
    pub const FIRST_UPSTREAM_TX: &str = "first_upstream_tx_byte_sent";
    pub const LAST_UPSTREAM_TX: &str = "last_upstream_tx_byte_sent";
    pub const FIRST_UPSTREAM_RX: &str = "first_upstream_rx_byte_received";
    pub const LAST_UPSTREAM_RX: &str = "last_upstream_rx_byte_received";
    pub const FIRST_DOWNSTREAM_TX: &str = "first_downstream_tx_byte_sent";
    pub const LAST_DOWNSTREAM_TX: &str = "last_downstream_tx_byte_sent";
    /// Envoy's order of the events on a span (by kind, not by time).
    pub const ORDER: [&str; 7] = [
        LAST_DOWNSTREAM_RX,
        FIRST_UPSTREAM_TX,
        LAST_UPSTREAM_TX,
        FIRST_UPSTREAM_RX,
        LAST_UPSTREAM_RX,
        FIRST_DOWNSTREAM_TX,
        LAST_DOWNSTREAM_TX,
    ];
    /// Those that belong on the upstream span too.
    pub const UPSTREAM: [&str; 4] = [
        FIRST_UPSTREAM_TX,
        LAST_UPSTREAM_TX,
        FIRST_UPSTREAM_RX,
        LAST_UPSTREAM_RX,
    ];
}

impl Record {
    fn event(&mut self, name: &'static str) {
        if let Some(events) = self.events.as_mut() {
            events.push((name, SystemTime::now()));
        }
    }
}

impl Record {
    #[allow(clippy::too_many_arguments)]
    fn new(
        tracer: &Tracer,
        request: &http::request::Parts,
        route: Option<&Selected>,
        peer: SocketAddr,
        scheme: &'static str,
        reason: Reason,
        name: &str,
        kind: Kind,
        bytes_received: Option<Arc<AtomicU64>>,
    ) -> Self {
        let headers = &request.headers;
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let path = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let header = |name: &HeaderName| headers.get(name);
        let wanted = [
            header(&header::USER_AGENT),
            header(&X_REQUEST_ID),
            header(&X_CLIENT_TRACE_ID),
            header(&X_ENVOY_DOWNSTREAM_SERVICE_CLUSTER),
            header(&propagation::TRACESTATE),
        ];
        // Room for everything, and a cluster name, so the text grows once.
        let capacity = name.len()
            + scheme.len()
            + 3
            + host.len()
            + path.len()
            + wanted.iter().flatten().map(|v| v.len()).sum::<usize>()
            + 48;
        let mut record = Record {
            ids: Ids::default(),
            kind,
            start: SystemTime::now(),
            started: std::time::Instant::now(),
            duration: Duration::ZERO,
            method: request.method.clone(),
            version: request.version,
            peer: peer.ip(),
            text: String::with_capacity(capacity),
            name: Piece::default(),
            url: Piece::default(),
            user_agent: None,
            request_id: None,
            client_trace_id: None,
            downstream_cluster: None,
            tracestate: None,
            tags: Vec::new(),
            status: 0,
            flags: ResponseFlags::default(),
            bytes_received: bytes_received.unwrap_or_default(),
            bytes_sent: 0,
            upstream: None,
            upstream_span: None,
            reason,
            events: tracer.config.verbose.then(Vec::new),
        };
        record.name = record.keep(name);
        let start = record.text.len();
        record.text.push_str(scheme);
        record.text.push_str("://");
        record.text.push_str(host);
        record.text.push_str(path);
        // `http.url` is cut to `max_path_tag_length`, on a character boundary.
        let mut end = record
            .text
            .len()
            .min(start + tracer.config.max_path_tag_length);
        while !record.text.is_char_boundary(end) {
            end -= 1;
        }
        record.text.truncate(end);
        record.url = Piece(start as u32, end as u32);
        let [
            user_agent,
            request_id,
            client_trace_id,
            downstream_cluster,
            tracestate,
        ] = wanted;
        record.user_agent = record.keep_header(user_agent);
        record.request_id = record.keep_header(request_id);
        record.client_trace_id = record.keep_header(client_trace_id);
        record.downstream_cluster = record.keep_header(downstream_cluster);
        record.tracestate = record.keep_header(tracestate);
        let route_tags = route
            .and_then(|selected| selected.route().tracing.as_ref())
            .map(|t| t.custom_tags.as_slice())
            .unwrap_or_default();
        for tag in tracer.config.custom_tags.iter().chain(route_tags) {
            if let Some(value) = dynamic_tag(tag, request, route) {
                let piece = record.keep(&value);
                record.tags.push((tag.tag.as_str().into(), piece));
            }
        }
        record
    }
}

/// A custom tag whose value depends on the request (literal and environment tags are the
/// tracer's); `None` when it has no value and no default.
fn dynamic_tag(
    tag: &CustomTag,
    request: &http::request::Parts,
    route: Option<&Selected>,
) -> Option<String> {
    let value = match &tag.value {
        TagValue::Literal(_) | TagValue::Environment { .. } => return None,
        TagValue::RequestHeader { name, default } => {
            let value = match name.as_str() {
                ":path" => request
                    .uri
                    .path_and_query()
                    .map(|pq| pq.as_str().to_string()),
                ":method" => Some(request.method.to_string()),
                ":authority" => request
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string),
                ":scheme" => request.uri.scheme_str().map(str::to_string),
                other => request
                    .headers
                    .get(other)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            };
            value.unwrap_or_else(|| default.clone())
        }
        // Remora keeps no dynamic, route, cluster or host metadata yet: the default applies.
        TagValue::Metadata { kind, default, .. } => {
            let _ = (kind == &MetadataKind::Route, route);
            default.clone()
        }
    };
    (!value.is_empty()).then_some(value)
}

/// Finishes a sampled request's spans when dropped: with the stream's other slots, when the
/// response body has ended (or the stream was reset).
#[derive(Debug)]
pub struct Completion {
    tracer: Arc<Tracer>,
    record: Option<Box<Record>>,
}

impl Completion {
    /// Response body bytes, for `response_size`.
    pub fn add_sent(&mut self, bytes: u64) {
        if let Some(record) = self.record.as_mut() {
            record.bytes_sent += bytes;
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            if record.upstream.is_some() {
                record.event(event::LAST_UPSTREAM_RX);
            }
            record.event(event::LAST_DOWNSTREAM_TX);
            if let Some(events) = record.events.as_mut() {
                events.sort_by_key(|(name, _)| event::ORDER.iter().position(|n| n == name));
            }
            record.duration = record.started.elapsed();
            self.tracer.exporter.push(self.tracer.tags.clone(), record);
        }
    }
}

/// A number as text, without allocating.
struct Decimal([u8; 20], usize);

impl Decimal {
    fn new(mut value: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        Decimal(digits, at)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0[self.1..]).unwrap_or("0")
    }
}

/// An address as text, without allocating.
struct Address([u8; 64], usize);

impl Address {
    fn new(address: impl std::fmt::Display) -> Self {
        use std::io::Write as _;
        let mut buffer = [0u8; 64];
        let mut cursor = std::io::Cursor::new(&mut buffer[..]);
        let _ = write!(cursor, "{address}");
        let length = cursor.position() as usize;
        Address(buffer, length)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0[..self.1]).unwrap_or("")
    }
}

/// Envoy's tags for the proxy's span of a finished request (custom tags last), given one by
/// one to `tag`: both exporters write them without collecting them first.
pub fn span_tags(tracer_tags: &ExportTags, record: &Record, tag: &mut dyn FnMut(&str, &str)) {
    let or_dash = |piece: Option<Piece>| piece.map_or("-", |p| record.text(p));
    tag("component", "proxy");
    tag("node_id", &tracer_tags.node_id);
    tag("zone", &tracer_tags.zone);
    if let Some(id) = record.request_id {
        tag("guid:x-request-id", record.text(id));
    }
    if let Some(id) = record.client_trace_id {
        tag("guid:x-client-trace-id", record.text(id));
    }
    tag("http.url", record.url());
    tag("http.method", record.method.as_str());
    tag("downstream_cluster", or_dash(record.downstream_cluster));
    tag("user_agent", or_dash(record.user_agent));
    tag("http.protocol", protocol(record.version));
    tag("peer.address", Address::new(record.peer).as_str());
    tag(
        "request_size",
        Decimal::new(record.bytes_received.load(Ordering::Relaxed)).as_str(),
    );
    tag("response_size", Decimal::new(record.bytes_sent).as_str());
    if let Some(cluster) = record.cluster() {
        tag("upstream_cluster", cluster);
        tag("upstream_cluster.name", cluster);
    }
    tag(
        "http.status_code",
        Decimal::new(u64::from(record.status)).as_str(),
    );
    if record.status >= 500 {
        tag("error", "true");
    }
    tag(
        "response_flags",
        record.flags.render().as_deref().unwrap_or("-"),
    );
    custom_tags(tracer_tags, record, tag);
}

/// The upstream span's tags (`spawn_upstream_span`), custom tags last.
pub fn upstream_span_tags(
    tracer_tags: &ExportTags,
    record: &Record,
    upstream: &Upstream,
    tag: &mut dyn FnMut(&str, &str),
) {
    let address = Address::new(upstream.address);
    let cluster = record.text(upstream.cluster);
    tag("component", "proxy");
    tag("http.protocol", protocol(upstream.protocol));
    tag("upstream_address", address.as_str());
    tag("peer.address", address.as_str());
    tag("upstream_cluster", cluster);
    tag("upstream_cluster.name", cluster);
    tag(
        "http.status_code",
        Decimal::new(u64::from(record.status)).as_str(),
    );
    if record.status >= 500 {
        tag("error", "true");
    }
    tag(
        "response_flags",
        record.flags.render().as_deref().unwrap_or("-"),
    );
    custom_tags(tracer_tags, record, tag);
}

fn custom_tags(tracer_tags: &ExportTags, record: &Record, tag: &mut dyn FnMut(&str, &str)) {
    for (key, value) in &tracer_tags.fixed {
        tag(key, value);
    }
    for (key, value) in &record.tags {
        tag(key, record.text(*value));
    }
}

/// What exporters need of the tracer that made a span.
#[derive(Debug, Clone)]
pub struct ExportTags {
    pub node_id: Arc<str>,
    pub zone: Arc<str>,
    pub fixed: Vec<(Arc<str>, Arc<str>)>,
}

pub fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}
