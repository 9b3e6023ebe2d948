//! The bootstrap: node identity, admin, static listeners and clusters, the ADS config source
//! and the `layered_runtime` keys Remora acts on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use xds_api::envoy::config::bootstrap::v3 as bootstrap_pb;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::listener::v3 as listener_pb;

use crate::access_log::{
    AccessLogConfig, DEFAULT_FORMAT, LogFormat, Target, access_log, parse_format,
};
use crate::cluster::{Cluster, cluster};
use crate::common::{ConfigSource, api_version, config_source, duration, socket_address};
use crate::error::{ConfigError, ConfigResult, err, field, item};
use crate::hcm::RouteSource;
use crate::listener::{Listener, listener};
use crate::raw::RawConfig;
use crate::route::Files;
use crate::tls::Secret;
use crate::unsupported;

/// Why a cluster whose endpoint is a unix socket serves nothing but xDS streams.
const PIPE_ONLY_ADS: &str = "Remora reaches a pipe only for the ADS and SDS streams";

/// Envoy's `stats_flush_interval` when none is set.
pub const DEFAULT_STATS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// The whole bootstrap, validated.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub node: Node,
    pub admin: Option<Admin>,
    pub listeners: Vec<Arc<Listener>>,
    pub clusters: Vec<Arc<Cluster>>,
    /// `static_resources.secrets`: what SDS references without `sds_config` name.
    pub secrets: Vec<Secret>,
    pub dynamic: Option<DynamicResources>,
    pub runtime: Runtime,
    /// `stats_config`: the tags Prometheus shows and the stats that exist.
    pub stats: Arc<crate::stats::StatsConfig>,
    /// `stats_sinks`: the collectors stats are pushed to.
    pub stats_sinks: Vec<crate::stats::StatsSink>,
    /// `stats_flush_interval`: how often the sinks get the stats (5 s unless set); `None` with
    /// `stats_flush_on_admin`, when reading admin's stats flushes instead.
    pub stats_flush_interval: Option<Duration>,
    /// The bootstrap's (deprecated) `tracing.http`: the tracer of connection managers whose
    /// `tracing` names no provider, as in Envoy.
    pub tracing_provider: Option<crate::tracing::Provider>,
    /// `application_log_config`: the proxy's own log lines, if not in its default shape.
    pub app_log: Option<crate::app_log::AppLogFormat>,
    /// `cluster_manager.outlier_detection.event_log_path`: where ejections and their ends are
    /// written, one JSON line each.
    pub outlier_event_log: Option<std::path::PathBuf>,
    /// The bootstrap as loaded, for `/config_dump`.
    pub raw: RawConfig,
}

/// The admin endpoint.
#[derive(Debug, Clone)]
pub struct Admin {
    pub address: SocketAddr,
    /// `ignore_global_conn_limit`: admin connections neither count towards nor are refused by
    /// `global_downstream_max_connections` (by default they do and are, as in Envoy).
    pub ignores_global_limit: bool,
    /// Lines for admin requests (`access_log_path` and `access_log`).
    pub access_logs: Vec<AccessLogConfig>,
}

#[derive(Debug, Clone, Default)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    /// The node as given (metadata, locality), sent to the control plane.
    pub proto: core_pb::Node,
}

/// The `layered_runtime` keys Remora acts on, after the layers are merged (later wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runtime {
    /// `envoy.resource_limits.listener.NAME.connection_limit`, by listener name.
    pub listener_connection_limits: HashMap<String, u64>,
    /// `overload.global_downstream_max_connections`, or the overload manager's
    /// downstream-connections monitor (which wins): across all listeners.
    pub global_max_connections: Option<u64>,
    /// The limit is the monitor's, which Envoy applies to listeners only: admin connections
    /// neither count nor are refused (under the runtime key they are).
    pub global_limit_skips_admin: bool,
    /// `envoy.reloadable_features.http_reject_path_with_fragment: false`: a request target's
    /// `#fragment` is cut off instead of the request refused with 400.
    pub strip_path_fragment: bool,
    /// `remora.tracing.propagate_w3c_and_b3` (Remora's own key, which Envoy ignores): every
    /// tracer reads W3C `traceparent` or B3 and writes both.
    pub propagate_w3c_and_b3: bool,
    /// Every layer's name and its keys with their values as text, in order, for `/runtime`
    /// (an admin layer has none).
    pub layers: Vec<(String, Vec<(String, String)>)>,
}

/// Which protocol variant the ADS stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsFlavor {
    StateOfTheWorld,
    Delta,
}

#[derive(Debug, Clone)]
pub struct DynamicResources {
    /// The static cluster the ADS stream goes to (its TLS settings apply to the stream).
    pub ads_cluster: String,
    /// `initial_metadata`: headers on the stream (a bootstrap token, say).
    pub initial_metadata: Vec<(http::HeaderName, http::HeaderValue)>,
    pub flavor: AdsFlavor,
    /// Send the node only in a stream's first request.
    pub node_on_first_message_only: bool,
    /// `GrpcService.timeout`: how long establishing a stream may take (unset: the cluster's
    /// connect timeout, then no limit for the response headers).
    pub stream_timeout: Option<Duration>,
    pub lds: Option<ConfigSource>,
    pub cds: Option<ConfigSource>,
}

/// The bootstrap, reading the files it names (a direct response's body) as the proxy does.
pub fn bootstrap(proto: &bootstrap_pb::Bootstrap) -> ConfigResult<Bootstrap> {
    bootstrap_files(proto, Files::Read)
}

/// [`bootstrap`], reading the files it names or not: a check that must not touch the files
/// of the machine it runs on (a fuzzer, a control plane) passes [`Files::Skip`].
pub fn bootstrap_files(proto: &bootstrap_pb::Bootstrap, files: Files) -> ConfigResult<Bootstrap> {
    crate::gate::check(proto, "")?;
    let bootstrap_pb::Bootstrap {
        node,
        static_resources,
        dynamic_resources,
        cluster_manager,
        stats_sinks,
        stats_flush_interval,
        stats_flush,
        stats_eviction_interval,
        tracing,
        stats_config,
        // Envoy creating some stats on first use saves it memory; the stats are the same.
        deferred_stat_options: _,
        application_log_config,
        bootstrap_extensions,
        layered_runtime,
        overload_manager,
        admin,
        enable_dispatcher_stats,
        header_prefix,
    } = proto;
    unsupported!("", enable_dispatcher_stats, header_prefix);
    let stats_sinks = stats_sinks
        .iter()
        .enumerate()
        .map(|(index, sink)| crate::stats::stats_sink(sink, &item("", "stats_sinks", index)))
        .collect::<ConfigResult<Vec<_>>>()?;
    let flush_on_admin = matches!(
        stats_flush,
        Some(bootstrap_pb::bootstrap::StatsFlush::StatsFlushOnAdmin(true))
    );
    if flush_on_admin && stats_flush_interval.is_some() {
        return err(
            "stats_flush_on_admin",
            "only one of stats_flush_interval and stats_flush_on_admin may be set",
        );
    }
    let stats_flush_interval = match stats_flush_interval {
        None => DEFAULT_STATS_FLUSH_INTERVAL,
        Some(given) => {
            let interval = duration(given, "stats_flush_interval")?;
            // Envoy's bounds.
            if interval < Duration::from_millis(1) || interval >= Duration::from_secs(300) {
                return err(
                    "stats_flush_interval",
                    format!("{interval:?} is out of range: at least 1ms and under 300s"),
                );
            }
            interval
        }
    };
    // Envoy evicts only stats its extensions create as evictable (Wasm custom metrics, scopes
    // with `enable_eviction`); Remora has none, so the interval is checked as Envoy checks it
    // and evicts nothing, as Envoy evicts none of the stats Remora keeps.
    if let Some(given) = stats_eviction_interval {
        let eviction = duration(given, "stats_eviction_interval")?;
        if eviction < Duration::from_millis(1) {
            return err("stats_eviction_interval", "must be at least 1ms");
        }
        if !flush_on_admin && eviction.as_nanos() % stats_flush_interval.as_nanos() != 0 {
            return err(
                "stats_eviction_interval",
                format!(
                    "{eviction:?} must be a multiple of stats_flush_interval ({stats_flush_interval:?})"
                ),
            );
        }
    }
    let mut outlier_event_log = None;
    if let Some(manager) = cluster_manager {
        let bootstrap_pb::ClusterManager {
            local_cluster_name,
            outlier_detection,
            upstream_bind_config,
            load_stats_config,
            // When Envoy builds a cluster's per-worker state (at first use): memory, not
            // behaviour.
            enable_deferred_cluster_creation: _,
        } = manager;
        unsupported!("cluster_manager", local_cluster_name, upstream_bind_config);
        if let Some(source) = load_stats_config {
            // Envoy's validate mode takes a source without a service; its server then stops
            // at start, for this reason.
            let reason = if source.grpc_services.is_empty() && source.cluster_names.is_empty() {
                "names no gRPC service: API configs must have either a gRPC service or a \
                 cluster name defined (Envoy validates this, then stops at start)"
            } else {
                "load reporting to a management server (LRS) is not supported"
            };
            return err("cluster_manager.load_stats_config", reason);
        }
        if let Some(bootstrap_pb::cluster_manager::OutlierDetection { event_log_path }) =
            outlier_detection
            && !event_log_path.is_empty()
        {
            outlier_event_log = Some(std::path::PathBuf::from(event_log_path));
        }
    }
    let node = node
        .as_ref()
        .map(|n| read_node(n, "node"))
        .transpose()?
        .unwrap_or_default();
    let admin = admin.as_ref().map(|a| read_admin(a, "admin")).transpose()?;
    let mut listeners: Vec<Arc<Listener>> = Vec::new();
    let mut clusters: Vec<Arc<Cluster>> = Vec::new();
    let mut secrets: Vec<Secret> = Vec::new();
    if let Some(bootstrap_pb::bootstrap::StaticResources {
        listeners: listener_protos,
        clusters: cluster_protos,
        secrets: secret_protos,
    }) = static_resources
    {
        let spath = "static_resources";
        for (index, proto) in secret_protos.iter().enumerate() {
            let path = item(spath, "secrets", index);
            let secret = crate::tls::secret(proto, &path)?;
            if secrets
                .iter()
                .any(|other: &Secret| other.name == secret.name)
            {
                return err(
                    field(&path, "name"),
                    format!("duplicate secret name {:?}", secret.name),
                );
            }
            secrets.push(secret);
        }
        for (index, listener_proto) in listener_protos.iter().enumerate() {
            let path = item(spath, "listeners", index);
            let named;
            let listener_proto = if listener_proto.name.is_empty() {
                // As Envoy does: a static listener without a name gets a random UUID.
                named = listener_pb::Listener {
                    name: crate::uuid_v4(),
                    ..listener_proto.clone()
                };
                &named
            } else {
                listener_proto
            };
            let model = listener(listener_proto, &path, files)?;
            if listeners.iter().any(|other| other.name == model.name) {
                return err(
                    field(&path, "name"),
                    format!("duplicate listener name {:?}", model.name),
                );
            }
            if let Some(other) = listeners.iter().find(|other| model.collides_with(other)) {
                return err(
                    field(&path, "address"),
                    format!(
                        "duplicate address {} as listener {:?}",
                        model.address, other.name
                    ),
                );
            }
            listeners.push(Arc::new(model));
        }
        for (index, cluster_proto) in cluster_protos.iter().enumerate() {
            let path = item(spath, "clusters", index);
            let model = cluster(cluster_proto, &path)?;
            if clusters.iter().any(|other| other.name == model.name) {
                return err(
                    field(&path, "name"),
                    format!("duplicate cluster name {:?}", model.name),
                );
            }
            clusters.push(Arc::new(model));
        }
    }
    // A secret named without `sds_config` must be among the static ones, as Envoy checks.
    let named = listeners
        .iter()
        .flat_map(|l| l.sds_secrets())
        .chain(clusters.iter().flat_map(|c| c.connect.sds_secrets()));
    for sds in named {
        if let crate::tls::SecretSource::Grpc(grpc) = &sds.source
            && !clusters.iter().any(|c| c.name == grpc.cluster)
        {
            return err(
                format!(
                    "{}.sds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name",
                    sds.path
                ),
                format!("unknown static cluster {:?}", grpc.cluster),
            );
        }
        if sds.source == crate::tls::SecretSource::Static
            && !secrets.iter().any(|s| s.name == sds.name)
        {
            return err(
                field(&sds.path, "name"),
                format!(
                    "unknown static secret {:?}: add it to static_resources.secrets or set sds_config",
                    sds.name
                ),
            );
        }
    }
    // A metrics service's cluster must be a static one, as Envoy checks.
    for (index, sink) in stats_sinks.iter().enumerate() {
        if let crate::stats::StatsSink::MetricsService(service) = sink
            && !clusters.iter().any(|c| c.name == service.cluster)
        {
            return err(
                format!("stats_sinks[{index}].typed_config.grpc_service.envoy_grpc.cluster_name"),
                format!("unknown static cluster {:?}", service.cluster),
            );
        }
    }
    read_bootstrap_extensions(bootstrap_extensions)?;
    let mut runtime = runtime(layered_runtime)?;
    if let Some(manager) = overload_manager {
        read_overload_manager(manager, &mut runtime)?;
    }
    let stats = match stats_config {
        Some(proto) => crate::stats::stats_config(proto, "stats_config")?,
        None => crate::stats::StatsConfig::default(),
    };
    let dynamic = dynamic_resources
        .as_ref()
        .map(|d| read_dynamic(d, &clusters))
        .transpose()?;
    // Every cluster a static listener names must exist, unless clusters come from CDS.
    if dynamic.as_ref().is_none_or(|d| d.cds.is_none()) {
        let known = |name: &str| clusters.iter().any(|c| c.name == name);
        let pipe = |name: &str| clusters.iter().any(|c| c.name == name && c.pipe.is_some());
        for (index, listener) in listeners.iter().enumerate() {
            let path = item("static_resources", "listeners", index);
            for hcm in listener.connection_managers() {
                let RouteSource::Inline(table) = &hcm.routes else {
                    continue;
                };
                if table.validate_clusters == Some(false) {
                    continue;
                }
                if let Some(name) = table.clusters.iter().find(|name| !known(name)) {
                    return err(path, format!("route: unknown cluster {name:?}"));
                }
                if let Some(name) = table.clusters.iter().find(|name| pipe(name)) {
                    return err(
                        path,
                        format!("route: cluster {name:?} is a pipe: {PIPE_ONLY_ADS}"),
                    );
                }
            }
            if let Some(name) = listener
                .tcp_clusters()
                .into_iter()
                .find(|name| !known(name))
            {
                return err(path, format!("tcp_proxy names unknown cluster {name:?}"));
            }
            if let Some(name) = listener.tcp_clusters().into_iter().find(|name| pipe(name)) {
                return err(
                    path,
                    format!("tcp_proxy: cluster {name:?} is a pipe: {PIPE_ONLY_ADS}"),
                );
            }
        }
    }
    Ok(Bootstrap {
        node,
        admin,
        listeners,
        clusters,
        secrets,
        dynamic,
        runtime,
        stats: Arc::new(stats),
        stats_sinks,
        stats_flush_interval: (!flush_on_admin).then_some(stats_flush_interval),
        outlier_event_log,
        tracing_provider: match tracing
            .as_ref()
            .and_then(|t: &xds_api::envoy::config::trace::v3::Tracing| t.http.as_ref())
        {
            Some(http) => Some(crate::tracing::read_provider(http, "tracing.http")?),
            None => None,
        },
        app_log: match application_log_config {
            Some(proto) => crate::app_log::app_log_config(proto, "application_log_config")?,
            None => None,
        },
        raw: RawConfig::of(proto),
    })
}

fn read_node(proto: &core_pb::Node, path: &str) -> ConfigResult<Node> {
    let core_pb::Node {
        id,
        cluster,
        metadata: _,
        locality: _,
        user_agent_name: _,
        extensions,
        client_features,
        listening_addresses,
        user_agent_version_type,
    } = proto;
    unsupported!(
        path,
        extensions,
        client_features,
        listening_addresses,
        user_agent_version_type
    );
    Ok(Node {
        id: id.clone(),
        cluster: cluster.clone(),
        proto: proto.clone(),
    })
}

fn read_admin(proto: &bootstrap_pb::Admin, path: &str) -> ConfigResult<Admin> {
    let bootstrap_pb::Admin {
        access_log,
        access_log_path,
        // Where Envoy's `/cpuprofiler` writes; Remora has no such page.
        profile_path: _,
        address,
        ignore_global_conn_limit,
    } = proto;
    let mut access_logs = access_log
        .iter()
        .enumerate()
        .map(|(i, log)| self::access_log(log, &item(path, "access_log", i)))
        .collect::<ConfigResult<Vec<_>>>()?;
    // The deprecated path: a file logger in Envoy's default format. `/dev/null` is what
    // Envoy's own examples write for "no admin log".
    if !access_log_path.is_empty() && access_log_path != "/dev/null" {
        access_logs.push(AccessLogConfig {
            target: Target::File(access_log_path.into()),
            format: LogFormat::Text {
                tokens: parse_format(DEFAULT_FORMAT)
                    .map_err(|e| ConfigError::new(field(path, "access_log_path"), e))?,
                omit_empty: false,
            },
            filter: None,
        });
    }
    Ok(Admin {
        address: socket_address(address, &field(path, "address"))?,
        ignores_global_limit: *ignore_global_conn_limit,
        access_logs,
    })
}

/// `bootstrap_extensions`: Envoy's internal listener extension (Istio's bootstrap names it) is
/// taken, since it only lets listeners and endpoints use internal addresses, which Remora
/// refuses where they appear; any other extension is refused by name.
fn read_bootstrap_extensions(extensions: &[core_pb::TypedExtensionConfig]) -> ConfigResult<()> {
    use xds_api::envoy::extensions::bootstrap::internal_listener::v3::InternalListener;
    for (index, extension) in extensions.iter().enumerate() {
        let path = item("", "bootstrap_extensions", index);
        let type_url = extension
            .typed_config
            .as_ref()
            .map(|any| any.type_url.as_str())
            .unwrap_or_default();
        let internal = format!(
            "{}{}",
            xds_api::type_urls::PREFIX,
            <InternalListener as prost::Name>::full_name()
        );
        if type_url != internal {
            return err(
                field(&path, "typed_config"),
                format!(
                    "bootstrap extension {:?} ({type_url}) is not supported: Remora takes only \
                     envoy.bootstrap.internal_listener",
                    extension.name
                ),
            );
        }
    }
    Ok(())
}

/// `overload_manager`: of Envoy's monitors, the one of downstream connections across all
/// listeners, which sets the limit `overload.global_downstream_max_connections` sets (and wins
/// over that runtime key, as in Envoy). Remora takes no overload actions, so any action, and
/// any monitor an action could read, is refused.
fn read_overload_manager(
    proto: &xds_api::envoy::config::overload::v3::OverloadManager,
    runtime: &mut Runtime,
) -> ConfigResult<()> {
    use xds_api::envoy::config::overload::v3 as overload_pb;
    use xds_api::envoy::extensions::resource_monitors::downstream_connections::v3::DownstreamConnectionsConfig;
    let path = "overload_manager";
    let overload_pb::OverloadManager {
        // How often monitors are read; Remora counts connections as they open and close.
        refresh_interval: _,
        resource_monitors,
        actions,
    } = proto;
    if let Some((index, action)) = actions.iter().enumerate().next() {
        return err(
            item(path, "actions", index),
            format!(
                "overload action {:?} is not supported: Remora takes no overload actions (it \
                 reads only the envoy.resource_monitors.global_downstream_max_connections \
                 monitor)",
                action.name
            ),
        );
    }
    for (index, monitor) in resource_monitors.iter().enumerate() {
        let mpath = item(path, "resource_monitors", index);
        let overload_pb::ResourceMonitor { name, config_type } = monitor;
        let Some(overload_pb::resource_monitor::ConfigType::TypedConfig(any)) = config_type else {
            return err(field(&mpath, "typed_config"), "required");
        };
        let expected = format!(
            "{}{}",
            xds_api::type_urls::PREFIX,
            <DownstreamConnectionsConfig as prost::Name>::full_name()
        );
        if any.type_url != expected {
            return err(
                field(&mpath, "typed_config"),
                format!(
                    "resource monitor {name:?} ({}) is not supported: Remora reads only the \
                     envoy.resource_monitors.global_downstream_max_connections monitor",
                    any.type_url
                ),
            );
        }
        let config: DownstreamConnectionsConfig =
            crate::common::unpack(any, &field(&mpath, "typed_config"))?;
        let max = u64::try_from(config.max_active_downstream_connections)
            .ok()
            .filter(|max| *max > 0);
        let Some(max) = max else {
            return err(
                field(&mpath, "typed_config.max_active_downstream_connections"),
                "must be greater than 0",
            );
        };
        runtime.global_max_connections = Some(max);
        runtime.global_limit_skips_admin = true;
    }
    Ok(())
}

fn read_dynamic(
    proto: &bootstrap_pb::bootstrap::DynamicResources,
    clusters: &[Arc<Cluster>],
) -> ConfigResult<DynamicResources> {
    let path = "dynamic_resources";
    let bootstrap_pb::bootstrap::DynamicResources {
        lds_config,
        cds_config,
        ads_config,
    } = proto;
    // A file or non-aggregated source is named where it is written, before ADS is asked for.
    for (name, source) in [("lds_config", lds_config), ("cds_config", cds_config)] {
        if source.is_some() {
            config_source(source, &field(path, name))?;
        }
    }
    let Some(core_pb::ApiConfigSource {
        api_type,
        transport_api_version,
        cluster_names,
        grpc_services,
        refresh_delay,
        request_timeout,
        rate_limit_settings,
        set_node_on_first_message_only,
        config_validators,
    }) = ads_config
    else {
        return err(field(path, "ads_config"), "required: only ADS is supported");
    };
    let apath = field(path, "ads_config");
    unsupported!(
        &apath,
        cluster_names,
        refresh_delay,
        request_timeout,
        rate_limit_settings,
        config_validators
    );
    use core_pb::api_config_source::ApiType;
    let flavor = match ApiType::try_from(*api_type) {
        Ok(ApiType::Grpc) => AdsFlavor::StateOfTheWorld,
        Ok(ApiType::DeltaGrpc) => AdsFlavor::Delta,
        _ => {
            return err(
                field(&apath, "api_type"),
                "only GRPC and DELTA_GRPC are supported",
            );
        }
    };
    api_version(
        *transport_api_version,
        &field(&apath, "transport_api_version"),
    )?;
    let [service] = grpc_services.as_slice() else {
        return err(
            field(&apath, "grpc_services"),
            "exactly one grpc service is required",
        );
    };
    let gpath = item(&apath, "grpc_services", 0);
    let core_pb::GrpcService {
        timeout,
        initial_metadata,
        target_specifier,
    } = service;
    let cluster_name = crate::common::envoy_grpc_target(target_specifier, &gpath)?;
    if !clusters.iter().any(|c| c.name == cluster_name) {
        return err(
            format!("{gpath}.envoy_grpc.cluster_name"),
            format!("unknown static cluster {cluster_name:?}"),
        );
    }
    let stream_timeout = match timeout {
        Some(value) => Some(duration(value, &field(&gpath, "timeout"))?).filter(|t| !t.is_zero()),
        None => None,
    };
    let lds = lds_config
        .as_ref()
        .map(|_| config_source(lds_config, &field(path, "lds_config")))
        .transpose()?;
    let cds = cds_config
        .as_ref()
        .map(|_| config_source(cds_config, &field(path, "cds_config")))
        .transpose()?;
    Ok(DynamicResources {
        initial_metadata: crate::common::initial_metadata(initial_metadata, &gpath)?,
        ads_cluster: cluster_name,
        flavor,
        node_on_first_message_only: *set_node_on_first_message_only,
        stream_timeout,
        lds,
        cds,
    })
}

/// The bootstrap's `layered_runtime`: static layers merged in order; an admin layer is
/// accepted and stays empty (Remora has no `/runtime_modify`). A key Remora does not act on is
/// an error, not a setting that silently does nothing.
fn runtime(proto: &Option<bootstrap_pb::LayeredRuntime>) -> ConfigResult<Runtime> {
    use bootstrap_pb::runtime_layer::LayerSpecifier;
    let mut runtime = Runtime::default();
    let Some(bootstrap_pb::LayeredRuntime { layers }) = proto else {
        return Ok(runtime);
    };
    for (index, layer) in layers.iter().enumerate() {
        let path = item("layered_runtime", "layers", index);
        let bootstrap_pb::RuntimeLayer {
            name,
            layer_specifier,
        } = layer;
        let mut shown = Vec::new();
        match layer_specifier {
            Some(LayerSpecifier::StaticLayer(values)) => {
                let mut flat = Vec::new();
                flatten_struct(values, "", &mut flat);
                for (key, value) in flat {
                    set_runtime_key(&mut runtime, &key, value, &field(&path, "static_layer"))?;
                    shown.push((key, runtime_text(value)));
                }
            }
            Some(LayerSpecifier::AdminLayer(bootstrap_pb::runtime_layer::AdminLayer {})) => {}
            None => return err(path, "a static_layer or an admin_layer is required"),
        }
        runtime.layers.push((name.clone(), shown));
    }
    Ok(runtime)
}

/// A runtime value as Envoy's `/runtime` shows it: `true`, `200` (a whole number without its
/// fraction), `1.5`, or the string.
fn runtime_text(value: &prost_types::Value) -> String {
    use prost_types::value::Kind;
    match &value.kind {
        Some(Kind::BoolValue(on)) => on.to_string(),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 1e15 => {
            format!("{}", *n as i64)
        }
        Some(Kind::NumberValue(n)) => n.to_string(),
        Some(Kind::StringValue(text)) => text.clone(),
        _ => String::new(),
    }
}

/// A Struct as Envoy's runtime sees it: dotted keys to leaf values.
fn flatten_struct<'a>(
    values: &'a prost_types::Struct,
    prefix: &str,
    out: &mut Vec<(String, &'a prost_types::Value)>,
) {
    for (name, value) in &values.fields {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match &value.kind {
            Some(prost_types::value::Kind::StructValue(inner)) => flatten_struct(inner, &key, out),
            _ => out.push((key, value)),
        }
    }
}

fn set_runtime_key(
    runtime: &mut Runtime,
    key: &str,
    value: &prost_types::Value,
    path: &str,
) -> ConfigResult<()> {
    let flag = || -> ConfigResult<bool> {
        match &value.kind {
            Some(prost_types::value::Kind::BoolValue(on)) => Ok(*on),
            Some(prost_types::value::Kind::StringValue(s)) if s == "true" || s == "false" => {
                Ok(s == "true")
            }
            _ => err(field(path, key), "must be true or false"),
        }
    };
    let count = || -> ConfigResult<u64> {
        match &value.kind {
            Some(prost_types::value::Kind::NumberValue(n)) if *n >= 0.0 && n.fract() == 0.0 => {
                Ok(*n as u64)
            }
            Some(prost_types::value::Kind::StringValue(s)) => s
                .parse::<u64>()
                .or_else(|_| err(field(path, key), "must be a non-negative integer")),
            _ => err(field(path, key), "must be a non-negative integer"),
        }
    };
    if key == "overload.global_downstream_max_connections" {
        runtime.global_max_connections = Some(count()?);
    } else if key == crate::tracing::PROPAGATE_BOTH_RUNTIME_KEY {
        runtime.propagate_w3c_and_b3 = flag()?;
    } else if key == "envoy.reloadable_features.http_reject_path_with_fragment" {
        runtime.strip_path_fragment = !flag()?;
    } else if key == "envoy.restart_features.use_eds_cache_for_ads" {
        // An updated EDS cluster whose endpoints are not sent again takes the ones last
        // received, as Envoy does with the flag on (its default): Remora always does.
        if !flag()? {
            return err(
                field(path, key),
                "Remora always reuses the endpoints last received for an updated EDS cluster; \
                 it cannot wait for them again",
            );
        }
    } else if key == "envoy.reloadable_features.explicit_internal_address_config" {
        // Envoy 1.40 counts only `internal_address_config`'s ranges as internal with the flag
        // either way (run here: a loopback client stays external under `false`), as Remora
        // always does.
        flag()?;
    } else if key == "envoy.reloadable_features.google_grpc_disable_tls_13" {
        // The TLS versions of Envoy's Google gRPC client. Remora has none (a `google_grpc`
        // service is refused by name), so the flag has nothing to act on.
        flag()?;
    } else if key.starts_with("envoy.deprecated_features:")
        || key == "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update"
        || key == "envoy.reloadable_features.fixed_heap_use_allocated"
        || key == "re2.max_program_size.warn_level"
    {
        // Taken, doing nothing here: permission for a deprecated field (Remora refuses the
        // field itself if it does not read it), how Envoy batches its balancers' rebuilds, the
        // measure of its `fixed_heap` monitor (refused), a regex size that only warns.
    } else if key == "re2.max_program_size.error_level" {
        // Envoy refuses regexes whose RE2 program is larger. Remora's engine has no such
        // measure and takes any regex it compiles, which only a bound at or above RE2's
        // default (100) allows as well.
        if count()? < 100 {
            return err(
                field(path, key),
                "Remora cannot hold regexes to a bound below RE2's default of 100",
            );
        }
    } else if let Some(listener) = key
        .strip_prefix("envoy.resource_limits.listener.")
        .and_then(|rest| rest.strip_suffix(".connection_limit"))
    {
        runtime
            .listener_connection_limits
            .insert(listener.to_string(), count()?);
    } else {
        return err(
            field(path, key),
            "runtime key not supported (Remora acts on overload.global_downstream_max_connections, \
             envoy.resource_limits.listener.NAME.connection_limit, \
             envoy.reloadable_features.http_reject_path_with_fragment and \
             remora.tracing.propagate_w3c_and_b3, and takes envoy.deprecated_features:* and \
             re2.max_program_size.* and a few flags with no effect here)",
        );
    }
    Ok(())
}
