//! The admin endpoint on `admin.address`: readiness, server info, stats (text, JSON and
//! Prometheus), config dump (with `?resource=` and `?mask=`), clusters, listeners, log levels,
//! draining and quitting, TLS certificates (`/certs`), the heap (`/memory`), the runtime
//! layers (`/runtime`) and the list of commands (`/help`), each answering as Envoy's does.

mod certs;
mod clusters;
pub mod logging;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::config::Bootstrap;
use crate::http::access_log::AccessLogs;
use crate::lifecycle::{Lifecycle, State, Stop};
use crate::listener::ListenerManager;
use crate::stats::Registry;
use crate::stats::{Kind, StatValue};
use crate::store::Store;

/// What the admin endpoint reads and acts on.
#[derive(Debug)]
pub struct Context {
    pub lifecycle: Arc<Lifecycle>,
    pub bootstrap: Arc<Bootstrap>,
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub listeners: Arc<ListenerManager>,
    pub xds: Arc<crate::xds::Status>,
    /// SDS and static secrets, for `/certs`.
    pub secrets: Arc<crate::tls::Secrets>,
    pub concurrency: usize,
    pub drain_time: std::time::Duration,
    /// The admin's own access logs (`access_log_path`, `access_log`).
    pub logs: Arc<AccessLogs>,
    /// The stats sinks, which reading stats flushes under `stats_flush_on_admin`.
    pub sinks: Option<Arc<crate::stats::sink::Flusher>>,
    /// The `server.*` gauges, refreshed when stats are read.
    pub server_stats: Arc<crate::server_stats::ServerStats>,
}

impl Context {
    pub fn is_static_cluster(&self, name: &str) -> bool {
        self.bootstrap.clusters.iter().any(|c| c.name == name)
    }

    pub fn is_static_listener(&self, name: &str) -> bool {
        self.bootstrap.listeners.iter().any(|l| l.name == name)
    }
}

/// Serves the admin API until the process exits.
pub async fn serve(server: Arc<Context>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let limits = server.listeners.limits().clone();
        let admitted = if limits.admin_ignores_global() {
            None
        } else {
            match crate::listener::Admitted::try_new(&limits, None) {
                Some(admitted) => Some(admitted),
                None => continue, // over global_downstream_max_connections: closed
            }
        };
        let local = stream.local_addr().unwrap_or(peer);
        let server = server.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let service = hyper::service::service_fn(move |request| {
                logged(server.clone(), request, peer, local)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Answers an admin request and writes its access log line (`access_log_path`,
/// `access_log`), as Envoy logs admin requests.
async fn logged(
    server: Arc<Context>,
    request: Request<Incoming>,
    peer: std::net::SocketAddr,
    local: std::net::SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if server.logs.is_empty() {
        return handle(server, request).await;
    }
    // Envoy's admin connection manager uses the remote address, so its log lines show the
    // peer in `x-forwarded-for`.
    let mut request = request;
    crate::http::headers::append_xff(request.headers_mut(), peer);
    let mut entry = crate::http::access_log::Entry::new(
        &request,
        (std::time::Instant::now(), peer, local),
        &server.logs,
    );
    let (head, body) = request.into_parts();
    entry.capture_request(&head);
    let request = Request::from_parts(head, body);
    let response = handle(server.clone(), request).await?;
    entry.capture_response(response.status().as_u16(), response.headers());
    entry.bytes_sent = http_body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    drop(crate::http::access_log::PendingLine { entry });
    Ok(response)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    response
}

fn json_response(value: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_string_pretty(value).unwrap_or_default(),
    )));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// Whether the query names `name`, with or without a value (`?graceful`, `?usedonly=1`).
fn has_param(query: &str, name: &str) -> bool {
    query
        .split('&')
        .any(|pair| pair.split('=').next() == Some(name))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            // On bytes: a `%` before a multi-byte character must not split it.
            b'%' if let Some(byte) = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok()) =>
            {
                out.push(byte);
                i += 3;
                continue;
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    server: Arc<Context>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let query = request.uri().query().unwrap_or("");
    let post = request.method() == Method::POST;
    let response = match path {
        "/ready" => match server.lifecycle.reported_state() {
            State::Live => text(StatusCode::OK, "LIVE\n"),
            State::Initializing => text(StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING\n"),
            State::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n"),
        },
        "/certs" => json_response(&certs::render(&server)),
        "/server_info" => json_response(&json!({
            "version": format!("remora/{}", env!("CARGO_PKG_VERSION")),
            "state": match server.lifecycle.reported_state() { State::Live => "LIVE", State::Initializing => "INITIALIZING", State::Draining => "DRAINING" },
            "uptime_current_epoch": format!("{}s", server.lifecycle.started.elapsed().as_secs()),
            "node": {"id": server.bootstrap.node.id, "cluster": server.bootstrap.node.cluster},
            "command_line_options": {"concurrency": server.concurrency, "drain_time": format!("{}s", server.drain_time.as_secs())},
        })),
        "/stats" | "/stats/prometheus" => {
            server.server_stats.refresh();
            if let Some(sinks) = &server.sinks {
                sinks.stats_read();
            }
            match StatsQuery::parse(query, &server.bootstrap.stats.matcher) {
                Ok(stats) if path == "/stats/prometheus" || stats.format == Some("prometheus") => {
                    let histograms = stats.select_histogram();
                    let body = crate::stats::prometheus::render(
                        &server.registry,
                        &server.bootstrap.stats.tags,
                        &stats.select(),
                        stats
                            .histograms
                            .then_some(&histograms as &dyn Fn(&str, bool) -> bool),
                    );
                    text(StatusCode::OK, body)
                }
                Ok(stats) if stats.format == Some("json") => {
                    let mut list: Vec<Value> = server
                        .registry
                        .snapshot(&stats.select())
                        .into_iter()
                        .map(|stat| json!({"name": stat.name, "value": stat.value}))
                        .collect();
                    if stats.histograms {
                        let computed: Vec<Value> = server
                            .registry
                            .histogram_snapshots(&stats.select_histogram())
                            .into_iter()
                            .map(|(name, snapshot)| {
                                let values: Vec<Value> = crate::stats::histogram::QUANTILES
                                    .iter()
                                    .map(|q| {
                                        let value = snapshot.quantile(*q);
                                        json!({"interval": value, "cumulative": value})
                                    })
                                    .collect();
                                json!({"name": name, "values": values})
                            })
                            .collect();
                        if !computed.is_empty() {
                            list.push(json!({"histograms": {
                                "supported_quantiles": crate::stats::histogram::QUANTILES,
                                "computed_quantiles": computed,
                            }}));
                        }
                    }
                    json_response(&json!({"stats": list}))
                }
                Ok(stats) => {
                    let mut body = server.registry.render_text(&stats.select());
                    if stats.histograms {
                        body.push_str(
                            &server
                                .registry
                                .render_histograms_text(&stats.select_histogram()),
                        );
                    }
                    text(StatusCode::OK, body)
                }
                Err(error) => text(StatusCode::BAD_REQUEST, error),
            }
        }
        "/config_dump" => {
            let resource = query_param(query, "resource").map(percent_decode);
            let mask = query_param(query, "mask").map(percent_decode);
            let dump = config_dump(&server, resource.as_deref(), mask.as_deref());
            crate::memory::release_config_memory();
            json_response(&dump)
        }
        "/clusters" if query_param(query, "format") == Some("json") => {
            json_response(&clusters::clusters_json(&server))
        }
        "/clusters" => text(StatusCode::OK, clusters::clusters_text(&server)),
        "/listeners" if query_param(query, "format") == Some("json") => {
            json_response(&clusters::listeners_json(&server))
        }
        "/listeners" => text(StatusCode::OK, clusters::listeners_text(&server)),
        "/logging" if post => {
            let (status, body) = logging::handle(query);
            text(status, body)
        }
        "/drain_listeners" if post => {
            let (graceful, inbound_only) = (
                has_param(query, "graceful"),
                has_param(query, "inboundonly"),
            );
            let server2 = server.clone();
            tokio::spawn(async move {
                server2
                    .listeners
                    .drain_all(server2.drain_time, graceful, inbound_only)
                    .await
            });
            text(StatusCode::OK, "OK\n")
        }
        "/quitquitquit" if post => {
            server.lifecycle.request_stop(Stop::Quit);
            text(StatusCode::OK, "OK\n")
        }
        "/healthcheck/fail" | "/healthcheck/ok" if post => {
            server
                .lifecycle
                .fail_health_checks(path == "/healthcheck/fail");
            text(StatusCode::OK, "OK\n")
        }
        "/drain_listeners" | "/quitquitquit" | "/logging" | "/healthcheck/fail"
        | "/healthcheck/ok" => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {} not allowed, POST required.", request.method()),
        ),
        "/memory" => json_response(&memory_json(crate::memory::usage())),
        "/runtime" => json_response(&runtime_json(&server.bootstrap.runtime.layers)),
        "/" | "/help" => text(StatusCode::OK, help_text()),
        _ => text(StatusCode::NOT_FOUND, "invalid path\n"),
    };
    Ok(response)
}

/// One admin command as `/help` lists it.
struct Command {
    path: &'static str,
    /// It takes POST only.
    post: bool,
    what: &'static str,
    /// Its query parameters and what they do.
    params: &'static [(&'static str, &'static str)],
}

/// The admin commands, in `/help`'s order.
const COMMANDS: &[Command] = &[
    Command {
        path: "/",
        post: false,
        what: "this list",
        params: &[],
    },
    Command {
        path: "/certs",
        post: false,
        what: "the TLS certificates in use",
        params: &[],
    },
    Command {
        path: "/clusters",
        post: false,
        what: "the clusters, their hosts and their state",
        params: &[("format", "text or json")],
    },
    Command {
        path: "/config_dump",
        post: false,
        what: "the configuration in use, static and from xDS",
        params: &[
            ("resource", "one resource type's field, as in Envoy"),
            ("mask", "a field mask to apply to each resource"),
        ],
    },
    Command {
        path: "/drain_listeners",
        post: true,
        what: "stop the listeners, after draining their connections",
        params: &[
            ("graceful", "drain for the drain time first"),
            ("inboundonly", "only inbound listeners"),
        ],
    },
    Command {
        path: "/healthcheck/fail",
        post: true,
        what: "make the proxy fail its health checks",
        params: &[],
    },
    Command {
        path: "/healthcheck/ok",
        post: true,
        what: "make the proxy pass its health checks again",
        params: &[],
    },
    Command {
        path: "/help",
        post: false,
        what: "this list",
        params: &[],
    },
    Command {
        path: "/listeners",
        post: false,
        what: "the listeners and their addresses",
        params: &[("format", "text or json")],
    },
    Command {
        path: "/logging",
        post: true,
        what: "show or change the log levels",
        params: &[
            ("level", "every logger's level"),
            ("paths", "LOGGER:LEVEL,..."),
        ],
    },
    Command {
        path: "/memory",
        post: false,
        what: "what the heap holds",
        params: &[],
    },
    Command {
        path: "/quitquitquit",
        post: true,
        what: "exit now",
        params: &[],
    },
    Command {
        path: "/ready",
        post: false,
        what: "the server's state: 200 when LIVE, 503 otherwise",
        params: &[],
    },
    Command {
        path: "/runtime",
        post: false,
        what: "the runtime layers and their values",
        params: &[],
    },
    Command {
        path: "/server_info",
        post: false,
        what: "version, state, node and uptime",
        params: &[],
    },
    Command {
        path: "/stats",
        post: false,
        what: "the stats",
        params: &[
            ("usedonly", "only stats that were ever written"),
            ("filter", "a regular expression names must match"),
            ("format", "json or prometheus"),
            ("type", "All, Counters, Gauges, Histograms or TextReadouts"),
        ],
    },
    Command {
        path: "/stats/prometheus",
        post: false,
        what: "the stats in Prometheus' text format",
        params: &[
            ("usedonly", "only stats that were ever written"),
            ("filter", "a regular expression names must match"),
        ],
    },
];

/// `/help` (and `/`): one line per command, its parameters indented below, as Envoy lays out
/// its list.
fn help_text() -> String {
    let mut out = String::from("admin commands are:\n");
    for Command {
        path,
        post,
        what,
        params,
    } in COMMANDS
    {
        let method = if *post { " (POST)" } else { "" };
        out.push_str(&format!("  {path}{method}: {what}\n"));
        for (name, meaning) in *params {
            out.push_str(&format!("      {name}: {meaning}\n"));
        }
    }
    out
}

/// `/memory` in Envoy's shape (numbers as strings). Remora runs on glibc's allocator, which has
/// no page heap or thread caches: those stay 0.
fn memory_json(usage: crate::memory::Usage) -> Value {
    json!({
        "allocated": usage.allocated.to_string(),
        "heap_size": usage.heap_size.to_string(),
        "pageheap_unmapped": "0",
        "pageheap_free": usage.free.to_string(),
        "total_thread_cache": "0",
        "total_physical_bytes": usage.physical.to_string(),
    })
}

/// `/runtime` in Envoy's shape: the layers' names, and for each key its value in each layer
/// (empty where a layer does not set it) and the value that holds (the last layer's).
fn runtime_json(layers: &[(String, Vec<(String, String)>)]) -> Value {
    let mut entries = serde_json::Map::new();
    for (index, (_, values)) in layers.iter().enumerate() {
        for (key, value) in values {
            let entry = entries.entry(key.clone()).or_insert_with(
                || json!({"layer_values": vec![""; layers.len()], "final_value": ""}),
            );
            entry["layer_values"][index] = json!(value);
            entry["final_value"] = json!(value);
        }
    }
    let names: Vec<&str> = layers.iter().map(|(name, _)| name.as_str()).collect();
    json!({"entries": entries, "layers": names})
}

/// `/stats` query parameters, checked as Envoy checks them.
struct StatsQuery<'a> {
    filter: Option<regex::Regex>,
    /// `?type=`: `None` for all, `Some(None)` for histograms or text readouts only.
    kinds: Option<Option<Kind>>,
    /// Histograms are shown (`type` absent, `All` or `Histograms`).
    histograms: bool,
    used_only: bool,
    format: Option<&'a str>,
    /// The bootstrap's `stats_matcher`: a stat it leaves out is never shown.
    matcher: &'a remora_config::stats::StatsMatcher,
}

impl<'a> StatsQuery<'a> {
    fn parse(
        query: &'a str,
        matcher: &'a remora_config::stats::StatsMatcher,
    ) -> Result<Self, String> {
        let filter = match query_param(query, "filter").map(percent_decode) {
            Some(filter) => Some(regex::Regex::new(&filter).map_err(|error| {
                // The regex crate's message spans lines; its last one names the problem.
                let message = error.to_string();
                let reason = message.lines().last().unwrap_or_default();
                let reason = reason.trim().trim_start_matches("error: ");
                format!("Invalid re2 regex: {reason}: {filter}")
            })?),
            None => None,
        };
        let kinds = match query_param(query, "type") {
            None | Some("All") => None,
            Some("Counters") => Some(Some(Kind::Counter)),
            Some("Gauges") => Some(Some(Kind::Gauge)),
            // Histograms (shown apart) and text readouts (none are kept).
            Some("Histograms" | "TextReadouts") => Some(None),
            Some(_) => return Err("invalid &type= param".into()),
        };
        let histograms = matches!(
            query_param(query, "type"),
            None | Some("All" | "Histograms")
        );
        Ok(StatsQuery {
            filter,
            kinds,
            histograms,
            used_only: has_param(query, "usedonly"),
            format: query_param(query, "format"),
            matcher,
        })
    }

    /// Whether a histogram is shown (by name, and whether it has values).
    fn select_histogram(&self) -> impl Fn(&str, bool) -> bool + '_ {
        move |name, used| {
            (!self.used_only || used)
                && self.matcher.admits(name)
                && self.filter.as_ref().is_none_or(|re| re.is_match(name))
        }
    }

    /// Whether a stat is shown.
    fn select(&self) -> impl Fn(&StatValue) -> bool + '_ {
        move |stat| {
            self.kinds.is_none_or(|wanted| wanted == Some(stat.kind))
                && (!self.used_only || stat.used)
                && self.matcher.admits(&stat.name)
                && self
                    .filter
                    .as_ref()
                    .is_none_or(|re| re.is_match(&stat.name))
        }
    }
}

/// One config dump section: its type and its named resource lists.
type Section<'a> = (&'a str, Vec<(&'a str, Vec<Value>)>);

/// Envoy-shaped config dump.
pub fn config_dump(server: &Context, resource: Option<&str>, mask: Option<&str>) -> Value {
    let xds = server.xds.snapshot();
    let mut static_clusters = Vec::new();
    let mut dynamic_active_clusters = Vec::new();
    let snapshot = server.store.load();
    let clusters = &snapshot.clusters;
    let mut names: Vec<&String> = clusters.keys().collect();
    names.sort();
    for name in names {
        let Some(cluster) = clusters.get(name) else {
            continue;
        };
        if server.is_static_cluster(name) {
            static_clusters.push(json!({"cluster": cluster.config.raw.to_json()}));
        } else {
            let mut entry = json!({"version_info": xds.version(xds_api::type_urls::CLUSTER), "cluster": cluster.config.raw.to_json()});
            if let Some(error) = xds.error(xds_api::type_urls::CLUSTER, name) {
                entry["error_state"] = error;
            }
            dynamic_active_clusters.push(entry);
        }
    }
    let dynamic_warming_clusters: Vec<Value> = xds
        .warming_clusters
        .iter()
        .map(|raw| json!({"cluster": raw.to_json()}))
        .collect();
    let mut static_listeners = Vec::new();
    let mut dynamic_listeners = Vec::new();
    for listener in server.listeners.list() {
        let name = &listener.config.name;
        if server.is_static_listener(name) {
            static_listeners.push(json!({"listener": listener.config.raw.to_json()}));
        } else {
            let mut entry = json!({
                "name": name,
                "active_state": {"version_info": xds.version(xds_api::type_urls::LISTENER), "listener": listener.config.raw.to_json()},
            });
            if let Some(error) = xds.error(xds_api::type_urls::LISTENER, name) {
                entry["error_state"] = error;
            }
            dynamic_listeners.push(entry);
        }
    }
    // Rejected resources that never became active still show their error.
    for (type_url, name, error) in xds.errors() {
        if type_url == xds_api::type_urls::LISTENER
            && !dynamic_listeners.iter().any(|l| l["name"] == name.as_str())
        {
            dynamic_listeners.push(json!({"name": name, "error_state": error}));
        }
    }
    let rejected = |type_url: &str, active: &dyn Fn(&str) -> bool| -> Vec<Value> {
        xds.errors()
            .into_iter()
            .filter(|(t, name, _)| t == type_url && !active(name))
            .map(|(_, name, error)| json!({"name": name, "error_state": error}))
            .collect()
    };
    dynamic_active_clusters.extend(rejected(xds_api::type_urls::CLUSTER, &|name| {
        clusters.contains_key(name)
    }));
    let mut dynamic_route_configs = Vec::new();
    for (name, table) in snapshot.routes.iter() {
        let mut entry = json!({"version_info": xds.version(xds_api::type_urls::ROUTE_CONFIGURATION), "route_config": table.raw.to_json()});
        if let Some(error) = xds.error(xds_api::type_urls::ROUTE_CONFIGURATION, name) {
            entry["error_state"] = error;
        }
        dynamic_route_configs.push(entry);
    }
    dynamic_route_configs.extend(rejected(xds_api::type_urls::ROUTE_CONFIGURATION, &|name| {
        snapshot.routes.contains_key(name)
    }));
    let mut dynamic_endpoint_configs = Vec::new();
    for (name, raw) in &xds.endpoints {
        let mut entry = json!({"version_info": xds.version(xds_api::type_urls::CLUSTER_LOAD_ASSIGNMENT), "endpoint_config": raw.to_json()});
        if let Some(error) = xds.error(xds_api::type_urls::CLUSTER_LOAD_ASSIGNMENT, name) {
            entry["error_state"] = error;
        }
        dynamic_endpoint_configs.push(entry);
    }
    dynamic_endpoint_configs.extend(rejected(
        xds_api::type_urls::CLUSTER_LOAD_ASSIGNMENT,
        &|name| xds.endpoints.contains_key(name),
    ));
    let sections: Vec<Section> = vec![
        (
            "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            vec![("bootstrap", vec![server.bootstrap.raw.to_json()])],
        ),
        (
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            vec![
                ("static_clusters", static_clusters),
                ("dynamic_active_clusters", dynamic_active_clusters),
                ("dynamic_warming_clusters", dynamic_warming_clusters),
            ],
        ),
        (
            "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            vec![
                ("static_listeners", static_listeners),
                ("dynamic_listeners", dynamic_listeners),
            ],
        ),
        (
            "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            vec![("dynamic_route_configs", dynamic_route_configs)],
        ),
        (
            "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
            vec![("dynamic_endpoint_configs", dynamic_endpoint_configs)],
        ),
    ];
    let resource_type = |section: &str, field: &str| -> String {
        let base = section.trim_end_matches("ConfigDump");
        match field {
            "bootstrap" => section.to_string(),
            "static_clusters" => format!("{base}ConfigDump.StaticCluster"),
            "dynamic_active_clusters" | "dynamic_warming_clusters" => {
                format!("{base}ConfigDump.DynamicCluster")
            }
            "static_listeners" => format!("{base}ConfigDump.StaticListener"),
            "dynamic_listeners" => format!("{base}ConfigDump.DynamicListener"),
            "dynamic_route_configs" => format!("{base}ConfigDump.DynamicRouteConfig"),
            _ => format!("{base}ConfigDump.DynamicEndpointConfig"),
        }
    };
    let masks = mask.map(parse_masks).unwrap_or_default();
    let mut configs = Vec::new();
    match resource {
        Some(wanted) => {
            for (section, fields) in &sections {
                for (field, items) in fields {
                    if *field == wanted {
                        for item in items {
                            let mut item = if *field == "bootstrap" {
                                json!({"bootstrap": item})
                            } else {
                                item.clone()
                            };
                            apply_mask(&mut item, &masks);
                            if let Value::Object(map) = &mut item {
                                map.insert(
                                    "@type".into(),
                                    Value::String(resource_type(section, field)),
                                );
                            }
                            configs.push(item);
                        }
                    }
                }
            }
        }
        None => {
            for (section, fields) in sections {
                let mut object = serde_json::Map::new();
                object.insert("@type".into(), Value::String(section.to_string()));
                for (field, items) in fields {
                    if field == "bootstrap" {
                        object.insert(
                            field.into(),
                            items.into_iter().next().unwrap_or(Value::Null),
                        );
                    } else {
                        object.insert(field.into(), Value::Array(items));
                    }
                }
                let mut value = Value::Object(object);
                apply_mask(&mut value, &masks);
                if let Value::Object(map) = &mut value {
                    map.insert("@type".into(), Value::String(section.to_string()));
                }
                configs.push(value);
            }
        }
    }
    json!({"configs": configs})
}

/// A `mask` parameter: comma-separated field paths, each dot-separated.
fn parse_masks(mask: &str) -> Vec<Vec<&str>> {
    mask.split(',')
        .map(|path| path.split('.').collect())
        .collect()
}

/// Keeps only the masked field paths (Envoy's FieldMask semantics, applied through arrays).
fn apply_mask(value: &mut Value, masks: &[Vec<&str>]) {
    if masks.is_empty() {
        return;
    }
    match value {
        Value::Array(items) => items.iter_mut().for_each(|item| apply_mask(item, masks)),
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let matching: Vec<Vec<&str>> = masks
                    .iter()
                    .filter(|m| m.first() == Some(&key.as_str()))
                    .map(|m| m[1..].to_vec())
                    .collect();
                if matching.is_empty() {
                    map.remove(&key);
                } else if matching.iter().all(|rest| !rest.is_empty())
                    && let Some(child) = map.get_mut(&key)
                {
                    apply_mask(child, &matching);
                }
            }
        }
        _ => {}
    }
}

/// The admin's parsing of what a client sends, for the fuzz targets in `proxy/fuzz`.
#[doc(hidden)]
pub mod fuzzing {
    use serde_json::Value;

    /// A `/stats` query parsed and applied to `stats`, as `/stats` does: the names shown, or
    /// the error answered.
    pub fn stats(query: &str, stats: &[crate::stats::StatValue]) -> Result<Vec<String>, String> {
        let query = super::StatsQuery::parse(query, &remora_config::stats::StatsMatcher::All)?;
        let select = query.select();
        Ok(stats
            .iter()
            .filter(|stat| select(stat))
            .map(|stat| stat.name.clone())
            .collect())
    }

    /// A `/config_dump` query's `resource` (decoded) and its `mask` applied to `dump`.
    pub fn config_dump(query: &str, dump: &mut Value) -> Option<String> {
        let resource = super::query_param(query, "resource").map(super::percent_decode);
        if let Some(mask) = super::query_param(query, "mask").map(super::percent_decode) {
            super::apply_mask(dump, &super::parse_masks(&mask));
        }
        resource
    }

    /// The flag parameters `/drain_listeners` reads.
    pub fn drain_flags(query: &str) -> (bool, bool) {
        (
            super::has_param(query, "graceful"),
            super::has_param(query, "inboundonly"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_bad_escapes_and_multi_byte_characters() {
        assert_eq!(percent_decode("%5Ecluster%5C.a+b"), "^cluster\\.a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        // Sliced as a string, `%aé` would split `é` and panic.
        assert_eq!(percent_decode("%aé"), "%aé");
    }

    #[test]
    fn the_fuzzing_entry_points_parse_as_the_admin_does() {
        let stat = |name: &str, kind| StatValue {
            name: name.into(),
            kind,
            value: 1,
            used: true,
        };
        let stats = [stat("a.b", Kind::Counter), stat("a.c", Kind::Gauge)];
        assert_eq!(
            fuzzing::stats("filter=%5Ea%5C.%24|b&type=Counters", &stats),
            Ok(vec!["a.b".to_string()])
        );
        assert_eq!(
            fuzzing::stats("type=Gauges", &stats),
            Ok(vec!["a.c".into()])
        );
        assert!(fuzzing::stats("type=Nope", &stats).is_err());
        let error = fuzzing::stats("filter=(", &stats).unwrap_err();
        assert!(error.starts_with("Invalid re2 regex"), "{error}");
        let mut dump = json!({"cluster": {"name": "a", "type": "STATIC"}, "other": [1]});
        let resource =
            fuzzing::config_dump("resource=static%5Fclusters&mask=cluster.name", &mut dump);
        assert_eq!(resource.as_deref(), Some("static_clusters"));
        assert_eq!(dump, json!({"cluster": {"name": "a"}}));
        assert_eq!(
            fuzzing::drain_flags("graceful&x=inboundonly"),
            (true, false)
        );
    }

    #[test]
    fn flag_parameters_are_found_with_or_without_a_value() {
        assert!(has_param("graceful&inboundonly", "inboundonly"));
        assert!(has_param("usedonly=1", "usedonly"));
        assert!(!has_param("filter=usedonly", "usedonly"));
    }
}
