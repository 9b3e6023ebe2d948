//! Route configurations, compiled once at config time into a [`RouteTable`]: virtual hosts
//! indexed by domain (exact, `*.suffix`, `prefix*`, `*`), their routes (first match wins),
//! each route's action, header mutations and per-filter configs. Matching a request allocates
//! nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::route::v3 as route_pb;

use crate::common::{
    DataSource, HeaderMutations, data_source, header_mutations, header_name, opt_duration,
    runtime_fraction,
};
use crate::error::{ConfigError, ConfigResult, err, field, item};
use crate::filters::{PerFilterConfigs, cors, per_filter_configs};
use crate::hash_policy::{HashPolicy, hash_policies};
pub use crate::matcher::{HeaderMatch, PseudoHeaders, header_matcher};
use crate::matcher::{RegexRewrite, StringMatch, regex_matcher, regex_rewrite, string_matcher};
use crate::raw::RawConfig;
use crate::retry::{self, RetryPolicy};
use crate::unsupported;

/// A level's request and response header mutations (`*_headers_to_add`, `*_to_remove`).
fn levels(
    request: (&[core_pb::HeaderValueOption], &[String]),
    response: (&[core_pb::HeaderValueOption], &[String]),
    path: &str,
) -> ConfigResult<(HeaderMutations, HeaderMutations)> {
    Ok((
        header_mutations(
            request.0,
            request.1,
            path,
            "request_headers_to_add",
            "request_headers_to_remove",
        )?,
        header_mutations(
            response.0,
            response.1,
            path,
            "response_headers_to_add",
            "response_headers_to_remove",
        )?,
    ))
}

/// Whether compiling reads files a config names (a direct response's body): the proxy does,
/// a control plane checking what a proxy would accept does not (the files are the proxy's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    Read,
    Skip,
}

/// A compiled RouteConfiguration.
#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub vhosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `*.suffix` domains as (suffix, vhost), longest suffix first.
    suffix: Vec<(String, usize)>,
    /// `prefix*` domains as (prefix, vhost), longest prefix first.
    prefix: Vec<(String, usize)>,
    any: Option<usize>,
    pub ignore_port_in_host_matching: bool,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub most_specific_header_mutations_wins: bool,
    pub per_filter: PerFilterConfigs,
    /// Cluster names the table refers to (for `validate_clusters` and warming).
    pub clusters: Vec<String>,
    /// Whether unknown cluster names make the config invalid (`None`: Envoy's default, true
    /// for route configs inline in a listener, false for RDS).
    pub validate_clusters: Option<bool>,
    pub raw: RawConfig,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub per_filter: PerFilterConfigs,
    /// The deprecated `cors` field.
    pub cors: Option<cors::CorsPolicy>,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatcher,
    pub action: Action,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub per_filter: PerFilterConfigs,
    /// The route action's deprecated `cors` field.
    pub cors: Option<cors::CorsPolicy>,
    /// `decorator`: the span's operation name.
    pub decorator: Option<crate::tracing::Decorator>,
    /// `tracing`: overrides of the connection manager's sampling, and more tags.
    pub tracing: Option<crate::tracing::RouteTracing>,
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(regex::Regex),
    SeparatedPrefix(String),
}

#[derive(Debug)]
pub struct RouteMatcher {
    pub path: PathMatch,
    pub case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    /// `grpc: {}`: only gRPC requests (by content type) match.
    grpc: bool,
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    check: Option<StringMatch>,
}

// Most routes forward: boxing the large variant would cost every request a pointer chase.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct { status: u16, body: Option<Bytes> },
}

#[derive(Debug)]
pub enum ClusterSpec {
    Name(String),
    Header(HeaderName),
    Weighted {
        clusters: Vec<(String, u32)>,
        total: u64,
    },
}

#[derive(Debug)]
pub enum HostRewrite {
    None,
    Literal(HeaderValue),
    Auto,
}

#[derive(Debug)]
pub struct Forward {
    pub cluster: ClusterSpec,
    pub cluster_not_found_status: u16,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<RegexRewrite>,
    pub host_rewrite: HostRewrite,
    /// `None` = no timeout.
    pub timeout: Option<Duration>,
    /// `x-envoy-expected-rq-timeout-ms`, rendered once.
    pub timeout_header: Option<HeaderValue>,
    /// `None`: the HCM's `stream_idle_timeout` applies; `Some(None)`: an explicit `0s`, which
    /// disables the stream idle timeout for this route (HCM's included), as in Envoy.
    pub idle_timeout: Option<Option<Duration>>,
    /// Per-route `upgrade_configs`: (lowercase upgrade type, enabled). For a type listed here
    /// they override the HCM's.
    pub upgrades: Vec<(String, bool)>,
    /// The route's `retry_policy`, else its virtual host's.
    pub retry: Option<Arc<RetryPolicy>>,
    /// How much of a request body is kept for retries and mirrors
    /// (`per_request_buffer_limit_bytes` of the route, else the virtual host, else 1 MiB).
    pub buffer_limit: usize,
    /// `x-envoy-attempt-count` on upstream requests / downstream responses (virtual host).
    pub attempt_count_upstream: bool,
    pub attempt_count_response: bool,
    /// `x-envoy-is-timeout-retry` on retried requests (virtual host).
    pub timeout_retry_header: bool,
    /// `priority: HIGH`: the cluster's HIGH circuit breakers apply.
    pub high_priority: bool,
    /// The stream's duration bound and how a `grpc-timeout` header sets it.
    pub stream_duration: StreamDuration,
    /// Deprecated `max_grpc_timeout` / `grpc_timeout_offset`: how `grpc-timeout` sets the
    /// route timeout.
    pub grpc_route_timeout: Option<GrpcTimeout>,
    /// `request_mirror_policies` of the route, else of its virtual host.
    pub mirrors: Arc<[Mirror]>,
    /// `hash_policy`: the request's hash key for consistent-hashing clusters.
    pub hash_policies: Vec<HashPolicy>,
}

/// How a request's `grpc-timeout` header turns into a timeout: capped at `max` (zero: no
/// cap), less `offset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrpcTimeout {
    pub max: Duration,
    pub offset: Duration,
}

impl GrpcTimeout {
    /// The timeout for a request that asked for `requested`.
    pub fn apply(&self, requested: Duration) -> Duration {
        let capped = if !self.max.is_zero() && requested > self.max {
            self.max
        } else {
            requested
        };
        if !self.offset.is_zero() && capped > self.offset {
            capped - self.offset
        } else {
            capped
        }
    }
}

/// A route's `max_stream_duration`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamDuration {
    /// `None`: the connection manager's; `Some(ZERO)`: no bound for this route.
    pub max: Option<Duration>,
    /// Set: a request's `grpc-timeout` sets the bound instead.
    pub grpc: Option<GrpcTimeout>,
}

/// Where a mirror sends its copy.
#[derive(Debug)]
pub enum MirrorCluster {
    Name(String),
    /// The cluster named by this request header.
    Header(HeaderName),
}

/// One `request_mirror_policies` entry: a copy of each request (a share of them) sent to
/// another cluster, its answer dropped.
#[derive(Debug)]
pub struct Mirror {
    pub cluster: MirrorCluster,
    /// The share of requests mirrored, per million.
    pub per_million: u32,
    /// Whether `-shadow` is added to the copy's host.
    pub shadow_suffix: bool,
    pub host_rewrite: Option<HeaderValue>,
}

/// What a virtual host gives its routes unless they say otherwise.
#[derive(Debug, Default, Clone)]
struct VhostDefaults {
    retry: Option<Arc<RetryPolicy>>,
    buffer_limit: Option<u32>,
    attempt_count_upstream: bool,
    attempt_count_response: bool,
    timeout_retry_header: bool,
    mirrors: Arc<[Mirror]>,
}

/// Envoy's default `per_connection_buffer_limit_bytes`, which bounds a request's buffer when
/// no `per_request_buffer_limit_bytes` is set.
const DEFAULT_BUFFER_LIMIT: usize = 1024 * 1024;

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<RegexRewrite>,
    pub status: u16,
    pub strip_query: bool,
}

// === compile ===

/// Compiles a RouteConfiguration; `path` prefixes error paths.
pub fn route_table(
    proto: &route_pb::RouteConfiguration,
    path: &str,
    files: Files,
) -> ConfigResult<RouteTable> {
    let route_pb::RouteConfiguration {
        name,
        virtual_hosts,
        internal_only_headers,
        response_headers_to_add,
        response_headers_to_remove,
        request_headers_to_add,
        request_headers_to_remove,
        most_specific_header_mutations_wins,
        validate_clusters,
        max_direct_response_body_size_bytes,
        ignore_port_in_host_matching,
        ignore_path_parameters_in_path_matching,
        typed_per_filter_config,
        metadata,
    } = proto;
    unsupported!(
        path,
        internal_only_headers,
        max_direct_response_body_size_bytes,
        ignore_path_parameters_in_path_matching,
        metadata,
    );
    let (request_headers, response_headers) = levels(
        (request_headers_to_add, request_headers_to_remove),
        (response_headers_to_add, response_headers_to_remove),
        path,
    )?;
    let mut table = RouteTable {
        name: name.clone(),
        vhosts: Vec::new(),
        exact: HashMap::new(),
        suffix: Vec::new(),
        prefix: Vec::new(),
        any: None,
        ignore_port_in_host_matching: *ignore_port_in_host_matching,
        request_headers,
        response_headers,
        most_specific_header_mutations_wins: *most_specific_header_mutations_wins,
        per_filter: per_filter_configs(typed_per_filter_config, path)?,
        clusters: Vec::new(),
        validate_clusters: *validate_clusters,
        raw: RawConfig::of(proto),
    };
    for (vi, vh) in virtual_hosts.iter().enumerate() {
        let vpath = item(path, "virtual_hosts", vi);
        let vhost = virtual_host(vh, &vpath, files)?;
        let index = table.vhosts.len();
        for (di, domain) in vh.domains.iter().enumerate() {
            let dpath = item(&vpath, "domains", di);
            let domain = domain.to_ascii_lowercase();
            let duplicate = if domain == "*" {
                table.any.replace(index).is_some()
            } else if let Some(suffix) = domain.strip_prefix('*') {
                let dup = table.suffix.iter().any(|(s, _)| s == suffix);
                table.suffix.push((suffix.to_string(), index));
                dup
            } else if let Some(prefix) = domain.strip_suffix('*') {
                let dup = table.prefix.iter().any(|(s, _)| s == prefix);
                table.prefix.push((prefix.to_string(), index));
                dup
            } else {
                if domain.contains('*') {
                    return err(dpath, "a wildcard may only be at the start or the end");
                }
                table.exact.insert(domain.clone(), index).is_some()
            };
            if duplicate {
                return err(
                    dpath,
                    format!("domain {domain:?} appears in more than one virtual host"),
                );
            }
        }
        for route in &vhost.routes {
            if let Action::Forward(forward) = &route.action {
                match &forward.cluster {
                    ClusterSpec::Name(name) => table.clusters.push(name.clone()),
                    ClusterSpec::Weighted { clusters, .. } => table
                        .clusters
                        .extend(clusters.iter().map(|(n, _)| n.clone())),
                    ClusterSpec::Header(_) => {}
                }
            }
        }
        table.vhosts.push(vhost);
    }
    table.suffix.sort_by_key(|b| std::cmp::Reverse(b.0.len()));
    table.prefix.sort_by_key(|b| std::cmp::Reverse(b.0.len()));
    table.clusters.sort();
    table.clusters.dedup();
    Ok(table)
}

fn virtual_host(
    proto: &route_pb::VirtualHost,
    path: &str,
    files: Files,
) -> ConfigResult<VirtualHost> {
    let route_pb::VirtualHost {
        name,
        domains,
        routes,
        require_tls,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        typed_per_filter_config,
        cors,
        include_request_attempt_count,
        include_attempt_count_in_response,
        retry_policy,
        hedge_policy,
        include_is_timeout_retry_header,
        per_request_buffer_limit_bytes,
        request_mirror_policies,
        metadata,
    } = proto;
    unsupported!(path, require_tls, hedge_policy, metadata);
    let defaults = VhostDefaults {
        retry: retry_policy
            .as_ref()
            .map(|policy| retry::retry_policy(policy, &field(path, "retry_policy")).map(Arc::new))
            .transpose()?,
        buffer_limit: *per_request_buffer_limit_bytes,
        attempt_count_upstream: *include_request_attempt_count,
        attempt_count_response: *include_attempt_count_in_response,
        timeout_retry_header: *include_is_timeout_retry_header,
        mirrors: mirror_policies(
            request_mirror_policies,
            &field(path, "request_mirror_policies"),
        )?,
    };
    if name.is_empty() {
        return err(field(path, "name"), "must not be empty");
    }
    if domains.is_empty() {
        return err(field(path, "domains"), "at least one domain is required");
    }
    let routes = routes
        .iter()
        .enumerate()
        .map(|(ri, route)| compile_route(route, &item(path, "routes", ri), files, &defaults))
        .collect::<ConfigResult<Vec<_>>>()?;
    let (request_headers, response_headers) = levels(
        (request_headers_to_add, request_headers_to_remove),
        (response_headers_to_add, response_headers_to_remove),
        path,
    )?;
    Ok(VirtualHost {
        name: name.clone(),
        routes,
        request_headers,
        response_headers,
        per_filter: per_filter_configs(typed_per_filter_config, path)?,
        cors: cors::legacy(cors, &field(path, "cors"))?,
    })
}

fn compile_route(
    route: &route_pb::Route,
    path: &str,
    files: Files,
    defaults: &VhostDefaults,
) -> ConfigResult<Route> {
    let route_pb::Route {
        name,
        metadata,
        decorator,
        tracing,
        typed_per_filter_config,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        per_request_buffer_limit_bytes,
        stat_prefix,
        r#match,
        action,
    } = route;
    unsupported!(path, metadata, stat_prefix);
    let decorator = crate::tracing::decorator(decorator, &field(path, "decorator"))?;
    let tracing = crate::tracing::route_tracing(tracing, &field(path, "tracing"))?;
    let Some(m) = r#match else {
        return err(field(path, "match"), "required");
    };
    let matcher = route_matcher(m, &field(path, "match"))?;
    use route_pb::route::Action as A;
    let mut legacy_cors = None;
    let action = match action {
        Some(A::Route(action)) => {
            let rpath = field(path, "route");
            legacy_cors = cors::legacy(&action.cors, &field(&rpath, "cors"))?;
            let defaults = VhostDefaults {
                buffer_limit: per_request_buffer_limit_bytes.or(defaults.buffer_limit),
                ..defaults.clone()
            };
            Action::Forward(compile_forward(action, &rpath, &matcher, &defaults)?)
        }
        Some(A::Redirect(redirect)) => Action::Redirect(compile_redirect(
            redirect,
            &field(path, "redirect"),
            &matcher,
        )?),
        Some(A::DirectResponse(direct)) => {
            let dpath = field(path, "direct_response");
            let route_pb::DirectResponseAction { status, body } = direct;
            if !(200..600).contains(status) {
                return err(field(&dpath, "status"), "must be in [200, 600)");
            }
            let body = match body {
                Some(source) => {
                    let bpath = field(&dpath, "body");
                    match (data_source(source, &bpath)?, files) {
                        (DataSource::Inline(bytes), _) => Some(Bytes::from(bytes)),
                        (DataSource::File(file), Files::Read) => {
                            Some(Bytes::from(std::fs::read(&file).map_err(|e| {
                                ConfigError::new(
                                    field(&bpath, "filename"),
                                    format!("cannot read {}: {e}", file.display()),
                                )
                            })?))
                        }
                        (DataSource::File(_), Files::Skip) => None,
                    }
                }
                None => None,
            };
            Action::Direct {
                status: *status as u16,
                body,
            }
        }
        Some(A::NonForwardingAction(_)) => {
            return err(field(path, "non_forwarding_action"), "is not supported");
        }
        None => {
            return err(
                path,
                "an action (route, redirect, direct_response) is required",
            );
        }
    };
    let (request_headers, response_headers) = levels(
        (request_headers_to_add, request_headers_to_remove),
        (response_headers_to_add, response_headers_to_remove),
        path,
    )?;
    Ok(Route {
        name: name.clone(),
        matcher,
        action,
        request_headers,
        response_headers,
        per_filter: per_filter_configs(typed_per_filter_config, path)?,
        cors: legacy_cors,
        decorator,
        tracing,
    })
}

fn route_matcher(m: &route_pb::RouteMatch, mpath: &str) -> ConfigResult<RouteMatcher> {
    let route_pb::RouteMatch {
        case_sensitive,
        runtime_fraction,
        headers,
        query_parameters,
        grpc,
        path_specifier,
    } = m;
    unsupported!(mpath, runtime_fraction);
    use route_pb::route_match::PathSpecifier;
    let path = match path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(r)) => {
            PathMatch::Regex(regex_matcher(r, &field(mpath, "safe_regex"))?)
        }
        Some(PathSpecifier::PathSeparatedPrefix(p)) => {
            if p.ends_with('/') || p.contains('?') || p.contains('#') {
                return err(
                    field(mpath, "path_separated_prefix"),
                    "must not end with '/' or contain '?' or '#'",
                );
            }
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(PathSpecifier::ConnectMatcher(_)) => {
            return err(
                field(mpath, "connect_matcher"),
                "CONNECT requests are not supported",
            );
        }
        None => {
            return err(
                mpath,
                "a path specifier (prefix, path, safe_regex, path_separated_prefix) is required",
            );
        }
    };
    let header_matches = headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(h, &item(mpath, "headers", i)))
        .collect::<ConfigResult<Vec<_>>>()?;
    let mut query = Vec::new();
    for (i, q) in query_parameters.iter().enumerate() {
        let qpath = item(mpath, "query_parameters", i);
        let route_pb::QueryParameterMatcher {
            name,
            query_parameter_match_specifier,
        } = q;
        if name.is_empty() {
            return err(field(&qpath, "name"), "must not be empty");
        }
        use route_pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let check = match query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => Some(string_matcher(s, &field(&qpath, "string_match"))?),
            Some(Q::PresentMatch(true)) | None => None,
            Some(Q::PresentMatch(false)) => {
                return err(
                    field(&qpath, "present_match"),
                    "present_match: false is not supported",
                );
            }
        };
        query.push(QueryMatch {
            name: name.clone(),
            check,
        });
    }
    let grpc = match grpc {
        Some(route_pb::route_match::GrpcRouteMatchOptions {}) => true,
        None => false,
    };
    Ok(RouteMatcher {
        path,
        case_sensitive: case_sensitive.unwrap_or(true),
        headers: header_matches,
        query,
        grpc,
    })
}

fn compile_forward(
    action: &route_pb::RouteAction,
    path: &str,
    matcher: &RouteMatcher,
    defaults: &VhostDefaults,
) -> ConfigResult<Forward> {
    let route_pb::RouteAction {
        cluster_not_found_response_code,
        metadata_match,
        prefix_rewrite,
        regex_rewrite: regex,
        append_x_forwarded_host,
        timeout,
        idle_timeout,
        retry_policy,
        request_mirror_policies,
        priority,
        hash_policy,
        max_grpc_timeout,
        grpc_timeout_offset,
        upgrade_configs,
        hedge_policy,
        max_stream_duration,
        cors: _,
        cluster_specifier,
        host_rewrite_specifier,
    } = action;
    unsupported!(path, metadata_match, append_x_forwarded_host, hedge_policy,);
    let retry = match retry_policy {
        Some(policy) => Some(Arc::new(retry::retry_policy(
            policy,
            &field(path, "retry_policy"),
        )?)),
        None => defaults.retry.clone(),
    };
    let mirrors = if request_mirror_policies.is_empty() {
        defaults.mirrors.clone()
    } else {
        mirror_policies(
            request_mirror_policies,
            &field(path, "request_mirror_policies"),
        )?
    };
    let high_priority = match core_pb::RoutingPriority::try_from(*priority) {
        Ok(core_pb::RoutingPriority::Default) => false,
        Ok(core_pb::RoutingPriority::High) => true,
        Err(_) => return err(field(path, "priority"), "unknown value"),
    };
    let stream_duration = match max_stream_duration {
        None => StreamDuration::default(),
        Some(route_pb::route_action::MaxStreamDuration {
            max_stream_duration,
            grpc_timeout_header_max,
            grpc_timeout_header_offset,
        }) => {
            let mpath = field(path, "max_stream_duration");
            let max = opt_duration(max_stream_duration, &field(&mpath, "max_stream_duration"))?;
            let grpc_max = opt_duration(
                grpc_timeout_header_max,
                &field(&mpath, "grpc_timeout_header_max"),
            )?;
            let grpc_offset = opt_duration(
                grpc_timeout_header_offset,
                &field(&mpath, "grpc_timeout_header_offset"),
            )?;
            StreamDuration {
                max,
                grpc: grpc_max.map(|max| GrpcTimeout {
                    max,
                    offset: grpc_offset.unwrap_or_default(),
                }),
            }
        }
    };
    let grpc_route_timeout = opt_duration(max_grpc_timeout, &field(path, "max_grpc_timeout"))?
        .map(|max| -> ConfigResult<GrpcTimeout> {
            Ok(GrpcTimeout {
                max,
                offset: opt_duration(grpc_timeout_offset, &field(path, "grpc_timeout_offset"))?
                    .unwrap_or_default(),
            })
        })
        .transpose()?;
    if grpc_route_timeout.is_none() && grpc_timeout_offset.is_some() {
        return err(
            field(path, "grpc_timeout_offset"),
            "only applies with max_grpc_timeout",
        );
    }
    use route_pb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let cluster = match cluster_specifier {
        Some(C::Cluster(name)) if !name.is_empty() => ClusterSpec::Name(name.clone()),
        Some(C::ClusterHeader(name)) if !name.is_empty() => {
            ClusterSpec::Header(header_name(name, &field(path, "cluster_header"))?)
        }
        Some(C::WeightedClusters(w)) => weighted_clusters(w, &field(path, "weighted_clusters"))?,
        Some(_) => return err(path, "the cluster name must not be empty"),
        None => {
            return err(
                path,
                "cluster, cluster_header or weighted_clusters is required",
            );
        }
    };
    let prefix_rewrite = (!prefix_rewrite.is_empty()).then(|| prefix_rewrite.clone());
    if prefix_rewrite.is_some() && matches!(matcher.path, PathMatch::Regex(_)) {
        return err(
            field(path, "prefix_rewrite"),
            "cannot be used with a safe_regex match",
        );
    }
    let regex_rewrite = regex
        .as_ref()
        .map(|r| regex_rewrite(r, &field(path, "regex_rewrite")))
        .transpose()?;
    if prefix_rewrite.is_some() && regex_rewrite.is_some() {
        return err(
            field(path, "regex_rewrite"),
            "cannot be used together with prefix_rewrite",
        );
    }
    let host_rewrite = match host_rewrite_specifier {
        Some(H::HostRewriteLiteral(host)) => {
            HostRewrite::Literal(HeaderValue::from_str(host).map_err(|_| {
                ConfigError::new(field(path, "host_rewrite_literal"), "not a valid host")
            })?)
        }
        Some(H::AutoHostRewrite(true)) => HostRewrite::Auto,
        Some(H::AutoHostRewrite(false)) | None => HostRewrite::None,
        Some(H::HostRewriteHeader(_)) => {
            return err(field(path, "host_rewrite_header"), "is not supported");
        }
        Some(H::HostRewritePathRegex(_)) => {
            return err(field(path, "host_rewrite_path_regex"), "is not supported");
        }
    };
    let timeout = match opt_duration(timeout, &field(path, "timeout"))? {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(Duration::from_secs(15)),
    };
    let idle_timeout = opt_duration(idle_timeout, &field(path, "idle_timeout"))?
        .map(|d| (!d.is_zero()).then_some(d));
    use route_pb::route_action::ClusterNotFoundResponseCode as N;
    let cluster_not_found_status = match N::try_from(*cluster_not_found_response_code) {
        Ok(N::ServiceUnavailable) => 503,
        Ok(N::NotFound) => 404,
        Ok(N::InternalServerError) => 500,
        Err(_) => {
            return err(
                field(path, "cluster_not_found_response_code"),
                "unknown value",
            );
        }
    };
    let mut upgrades = Vec::new();
    for (index, upgrade) in upgrade_configs.iter().enumerate() {
        let upath = item(path, "upgrade_configs", index);
        let route_pb::route_action::UpgradeConfig {
            upgrade_type,
            enabled,
            connect_config,
        } = upgrade;
        unsupported!(&upath, connect_config);
        upgrades.push((
            upgrade_kind(upgrade_type, &field(&upath, "upgrade_type"))?,
            enabled.unwrap_or(true),
        ));
    }
    // The upstream is told the time it has: the per-try timeout when it is the shorter.
    let expected = match (timeout, retry.as_ref().and_then(|r| r.per_try_timeout)) {
        (Some(route), Some(per_try)) => Some(route.min(per_try)),
        (None, Some(per_try)) => Some(per_try),
        (route, None) => route,
    };
    Ok(Forward {
        hash_policies: hash_policies(hash_policy, &field(path, "hash_policy"))?,
        upgrades,
        retry,
        buffer_limit: defaults
            .buffer_limit
            .map_or(DEFAULT_BUFFER_LIMIT, |limit| limit as usize),
        attempt_count_upstream: defaults.attempt_count_upstream,
        attempt_count_response: defaults.attempt_count_response,
        timeout_retry_header: defaults.timeout_retry_header,
        high_priority,
        stream_duration,
        grpc_route_timeout,
        mirrors,
        timeout_header: expected.map(|t| HeaderValue::from(t.as_millis() as u64)),
        cluster,
        cluster_not_found_status,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        timeout,
        idle_timeout,
    })
}

fn mirror_policies(
    list: &[route_pb::route_action::RequestMirrorPolicy],
    path: &str,
) -> ConfigResult<Arc<[Mirror]>> {
    let mut mirrors = Vec::with_capacity(list.len());
    for (index, policy) in list.iter().enumerate() {
        let mpath = format!("{path}[{index}]");
        let route_pb::route_action::RequestMirrorPolicy {
            cluster,
            cluster_header,
            runtime_fraction: fraction,
            trace_sampled,
            disable_shadow_host_suffix_append,
            host_rewrite_literal,
        } = policy;
        unsupported!(&mpath, trace_sampled);
        let cluster = match (cluster.is_empty(), cluster_header.is_empty()) {
            (false, true) => MirrorCluster::Name(cluster.clone()),
            (true, false) => MirrorCluster::Header(header_name(
                cluster_header,
                &field(&mpath, "cluster_header"),
            )?),
            _ => {
                return err(
                    mpath,
                    "exactly one of cluster and cluster_header is required",
                );
            }
        };
        let host_rewrite = (!host_rewrite_literal.is_empty())
            .then(|| {
                HeaderValue::from_str(host_rewrite_literal).map_err(|_| {
                    ConfigError::new(field(&mpath, "host_rewrite_literal"), "not a valid host")
                })
            })
            .transpose()?;
        mirrors.push(Mirror {
            cluster,
            per_million: runtime_fraction(
                fraction.as_ref(),
                &field(&mpath, "runtime_fraction"),
                1_000_000,
            )?,
            shadow_suffix: !*disable_shadow_host_suffix_append,
            host_rewrite,
        });
    }
    Ok(mirrors.into())
}

/// An `upgrade_type`, lower-cased. CONNECT is a method rather than an upgrade and Remora does
/// not proxy it, so it is refused rather than accepted and never acted on.
pub fn upgrade_kind(upgrade_type: &str, path: &str) -> ConfigResult<String> {
    if upgrade_type.is_empty() {
        return err(path, "must not be empty");
    }
    if upgrade_type.eq_ignore_ascii_case("CONNECT") {
        return err(
            path,
            "CONNECT is not supported: Remora does not proxy CONNECT requests",
        );
    }
    Ok(upgrade_type.to_ascii_lowercase())
}

fn weighted_clusters(w: &route_pb::WeightedCluster, path: &str) -> ConfigResult<ClusterSpec> {
    let route_pb::WeightedCluster {
        clusters,
        total_weight,
        runtime_key_prefix,
        random_value_specifier,
    } = w;
    unsupported!(
        path,
        total_weight,
        runtime_key_prefix,
        random_value_specifier
    );
    if clusters.is_empty() {
        return err(field(path, "clusters"), "at least one cluster is required");
    }
    let mut list = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        let cpath = item(path, "clusters", i);
        let route_pb::weighted_cluster::ClusterWeight {
            name,
            cluster_header,
            weight,
            metadata_match,
            request_headers_to_add,
            request_headers_to_remove,
            response_headers_to_add,
            response_headers_to_remove,
            typed_per_filter_config,
            host_rewrite_specifier,
        } = c;
        unsupported!(
            &cpath,
            cluster_header,
            metadata_match,
            request_headers_to_add,
            request_headers_to_remove,
            response_headers_to_add,
            response_headers_to_remove,
            typed_per_filter_config,
            host_rewrite_specifier,
        );
        if name.is_empty() {
            return err(field(&cpath, "name"), "must not be empty");
        }
        list.push((name.clone(), weight.unwrap_or(0)));
    }
    let total: u64 = list.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return err(path, "the sum of weights must be greater than 0");
    }
    Ok(ClusterSpec::Weighted {
        clusters: list,
        total,
    })
}

fn compile_redirect(
    r: &route_pb::RedirectAction,
    path: &str,
    matcher: &RouteMatcher,
) -> ConfigResult<Redirect> {
    use route_pb::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
    };
    let route_pb::RedirectAction {
        host_redirect,
        port_redirect,
        response_code,
        strip_query,
        scheme_rewrite_specifier,
        path_rewrite_specifier,
    } = r;
    let scheme = match scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::SchemeRedirect(s)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
        _ => None,
    };
    let (path_redirect, prefix_rewrite, regex) = match path_rewrite_specifier {
        Some(P::PathRedirect(p)) => (Some(p.clone()), None, None),
        Some(P::PrefixRewrite(p)) => {
            if matches!(matcher.path, PathMatch::Regex(_)) {
                return err(
                    field(path, "prefix_rewrite"),
                    "cannot be used with a safe_regex match",
                );
            }
            (None, Some(p.clone()), None)
        }
        Some(P::RegexRewrite(rw)) => (
            None,
            None,
            Some(regex_rewrite(rw, &field(path, "regex_rewrite"))?),
        ),
        None => (None, None, None),
    };
    let status = match C::try_from(*response_code) {
        Ok(C::MovedPermanently) => 301,
        Ok(C::Found) => 302,
        Ok(C::SeeOther) => 303,
        Ok(C::TemporaryRedirect) => 307,
        Ok(C::PermanentRedirect) => 308,
        Err(_) => return err(field(path, "response_code"), "unknown value"),
    };
    let port = match port_redirect {
        0 => None,
        p => Some(
            u16::try_from(*p)
                .map_err(|_| ConfigError::new(field(path, "port_redirect"), "must be ≤ 65535"))?,
        ),
    };
    Ok(Redirect {
        scheme,
        host: (!host_redirect.is_empty()).then(|| host_redirect.clone()),
        port,
        path: path_redirect,
        prefix_rewrite,
        regex_rewrite: regex,
        status,
        strip_query: *strip_query,
    })
}

// === match ===

impl RouteTable {
    /// Envoy's virtual-host selection: exact, then longest `*suffix`, then longest `prefix*`,
    /// then `*`. `host` must already be lower case.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        self.virtual_host_index(host)
            .map(|index| &self.vhosts[index])
    }

    fn virtual_host_index(&self, host: &str) -> Option<usize> {
        let host = if self.ignore_port_in_host_matching {
            strip_port(host)
        } else {
            host
        };
        if let Some(&index) = self.exact.get(host) {
            return Some(index);
        }
        for (suffix, index) in &self.suffix {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(*index);
            }
        }
        for (prefix, index) in &self.prefix {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                return Some(*index);
            }
        }
        self.any
    }

    /// The first route of the virtual host that matches.
    pub fn route<'a>(
        &'a self,
        host: &str,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Option<(&'a VirtualHost, &'a Route)> {
        let (vhost, route) = self.find(host, path_and_query, headers)?;
        let vhost = &self.vhosts[vhost];
        Some((vhost, &vhost.routes[route]))
    }

    /// [`RouteTable::route`] as indexes: the virtual host's in `vhosts`, the route's in it.
    pub fn find(
        &self,
        host: &str,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Option<(usize, usize)> {
        let pseudo = PseudoHeaders {
            path: path_and_query,
            authority: host,
            ..PseudoHeaders::default()
        };
        self.find_request(host, path_and_query, &pseudo, headers)
    }

    /// [`RouteTable::find`] with the request's pseudo-headers, for `:method` and `:scheme`
    /// matchers.
    pub fn find_request(
        &self,
        host: &str,
        path_and_query: &str,
        pseudo: &PseudoHeaders<'_>,
        headers: &HeaderMap,
    ) -> Option<(usize, usize)> {
        let vhost = self.virtual_host_index(host)?;
        let route = self.vhosts[vhost]
            .routes
            .iter()
            .position(|route| route.matcher.matches(path_and_query, pseudo, headers))?;
        Some((vhost, route))
    }
}

/// `host:port` → `host` (IPv6 literals in brackets keep their brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(colon) if host[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..colon],
        _ => host,
    }
}

/// `path?query` → (`path`, `query`).
pub fn split_query(path_and_query: &str) -> (&str, &str) {
    match path_and_query.find('?') {
        Some(q) => (&path_and_query[..q], &path_and_query[q + 1..]),
        None => (path_and_query, ""),
    }
}

fn starts_with(value: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        value.starts_with(prefix)
    } else {
        value.len() >= prefix.len()
            && value.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    }
}

impl RouteMatcher {
    pub fn matches(
        &self,
        path_and_query: &str,
        pseudo: &PseudoHeaders<'_>,
        headers: &HeaderMap,
    ) -> bool {
        let (path, query) = split_query(path_and_query);
        let path_ok = match &self.path {
            PathMatch::Prefix(prefix) => starts_with(path, prefix, self.case_sensitive),
            PathMatch::Exact(exact) => {
                path.len() == exact.len() && starts_with(path, exact, self.case_sensitive)
            }
            PathMatch::Regex(re) => re.is_match(path),
            PathMatch::SeparatedPrefix(prefix) => {
                starts_with(path, prefix, self.case_sensitive)
                    && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/')
            }
        };
        path_ok
            && (!self.grpc || is_grpc(headers))
            && self
                .headers
                .iter()
                .all(|h| h.matches_request(pseudo, headers))
            && self.query.iter().all(|q| q.matches(query))
    }

    /// How many leading bytes of the path the match consumed (for `prefix_rewrite`); `None`
    /// for a regex match.
    fn matched_len(&self) -> Option<usize> {
        match &self.path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) | PathMatch::SeparatedPrefix(p) => {
                Some(p.len())
            }
            PathMatch::Regex(_) => None,
        }
    }
}

/// A gRPC request as Envoy tells one: content type `application/grpc`, alone or followed by
/// `+format` or `;parameters` (so not `application/grpc-web`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let value = content_type.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

impl QueryMatch {
    fn matches(&self, query: &str) -> bool {
        let value = query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == self.name).then_some(value)
        });
        match (&self.check, value) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(m), Some(v)) => m.matches(v),
        }
    }
}

// === rewrite ===

impl Forward {
    /// Whether an upgrade to `kind` (lowercase) may go through this route: the route's own
    /// `upgrade_configs` decide for the types they list, the HCM's (`hcm_upgrades`) for others.
    pub fn allows_upgrade(&self, kind: &str, hcm_upgrades: &[String]) -> bool {
        match self.upgrades.iter().find(|(listed, _)| listed == kind) {
            Some((_, enabled)) => *enabled,
            None => hcm_upgrades.iter().any(|allowed| allowed == kind),
        }
    }

    /// The upstream path after prefix or regex rewrite; `None` when unchanged.
    pub fn rewrite_path(&self, route: &Route, path_and_query: &str) -> Option<String> {
        rewrite(
            &route.matcher,
            self.prefix_rewrite.as_deref(),
            self.regex_rewrite.as_ref(),
            path_and_query,
        )
    }
}

fn rewrite(
    matcher: &RouteMatcher,
    prefix_rewrite: Option<&str>,
    regex_rewrite: Option<&RegexRewrite>,
    path_and_query: &str,
) -> Option<String> {
    if let Some(new_prefix) = prefix_rewrite {
        let matched_len = matcher.matched_len()?;
        let rest = path_and_query.get(matched_len..).unwrap_or("");
        return Some(format!("{new_prefix}{rest}"));
    }
    if let Some(RegexRewrite {
        pattern,
        substitution,
    }) = regex_rewrite
    {
        let (path, query) = split_query(path_and_query);
        let new_path = pattern.replace_all(path, substitution.as_str());
        return Some(if path_and_query.len() > path.len() {
            format!("{new_path}?{query}")
        } else {
            new_path.into_owned()
        });
    }
    None
}

impl Redirect {
    /// The `Location` for a request with `scheme`, `host` and `path_and_query`.
    pub fn location(
        &self,
        route: &Route,
        scheme: &str,
        host: &str,
        path_and_query: &str,
    ) -> String {
        let new_scheme = self.scheme.as_deref().unwrap_or(scheme);
        let (host_only, port) = match self.host.as_deref() {
            Some(h) => (strip_port(h).to_string(), split_port(h)),
            None => (strip_port(host).to_string(), split_port(host)),
        };
        let mut port = match self.port {
            Some(p) => Some(p.to_string()),
            None => port.map(str::to_string),
        };
        // Changing the scheme drops a port that was the old scheme's default.
        if self.port.is_none() && new_scheme != scheme {
            let old_default = if scheme == "https" { "443" } else { "80" };
            if port.as_deref() == Some(old_default) {
                port = None;
            }
        }
        let new_default = if new_scheme == "https" { "443" } else { "80" };
        if self.port.is_none() && port.as_deref() == Some(new_default) {
            port = None;
        }
        let mut path = match &self.path {
            Some(p) => {
                if p.contains('?') {
                    p.clone()
                } else {
                    let (_, query) = split_query(path_and_query);
                    if path_and_query.contains('?') {
                        format!("{p}?{query}")
                    } else {
                        p.clone()
                    }
                }
            }
            None => rewrite(
                &route.matcher,
                self.prefix_rewrite.as_deref(),
                self.regex_rewrite.as_ref(),
                path_and_query,
            )
            .unwrap_or_else(|| path_and_query.to_string()),
        };
        if self.strip_query
            && let Some(q) = path.find('?')
        {
            path.truncate(q);
        }
        match port {
            Some(port) => format!("{new_scheme}://{host_only}:{port}{path}"),
            None => format!("{new_scheme}://{host_only}{path}"),
        }
    }
}

fn split_port(host: &str) -> Option<&str> {
    let stripped = strip_port(host);
    (stripped.len() < host.len()).then(|| &host[stripped.len() + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> RouteTable {
        let proto: route_pb::RouteConfiguration =
            xds_api::json::from_yaml_str(yaml).expect("route yaml");
        route_table(&proto, "", Files::Read).expect("compiles")
    }

    #[test]
    fn vhost_precedence_exact_suffix_prefix_any() {
        let t = table(
            r#"
virtual_hosts:
- {name: any, domains: ["*"], routes: [{match: {prefix: "/"}, direct_response: {status: 200}}]}
- {name: suffix, domains: ["*.example.com"], routes: []}
- {name: longer, domains: ["*.api.example.com"], routes: []}
- {name: prefix, domains: ["api.*"], routes: []}
- {name: exact, domains: ["www.example.com"], routes: []}
"#,
        );
        let name = |h: &str| t.virtual_host(h).map(|v| v.name.as_str());
        assert_eq!(name("www.example.com"), Some("exact"));
        assert_eq!(name("a.example.com"), Some("suffix"));
        assert_eq!(name("v1.api.example.com"), Some("longer"));
        assert_eq!(name("api.other"), Some("prefix"));
        assert_eq!(name("nothing"), Some("any"));
        assert_eq!(
            name(".example.com"),
            Some("any"),
            "a wildcard must match at least one character"
        );
    }

    #[test]
    fn header_matchers_follow_envoy_rules() {
        let t = table(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {prefix: "/", headers: [{name: x-absent, present_match: false}, {name: x-v, range_match: {start: 1, end: 10}}]}
    direct_response: {status: 201}
  - match: {prefix: "/", headers: [{name: x-v, exact_match: "a", invert_match: true}]}
    direct_response: {status: 202}
"#,
        );
        let mut h = HeaderMap::new();
        h.insert("x-v", HeaderValue::from_static("5"));
        assert!(matches!(
            t.route("h", "/", &h).map(|(_, r)| &r.action),
            Some(Action::Direct { status: 201, .. })
        ));
        h.insert("x-v", HeaderValue::from_static("10"));
        assert!(matches!(
            t.route("h", "/", &h).map(|(_, r)| &r.action),
            Some(Action::Direct { status: 202, .. })
        ));
        h.remove("x-v");
        assert!(
            t.route("h", "/", &h).is_none(),
            "an inverted exact match on a missing header does not match"
        );
    }

    #[test]
    fn connect_upgrades_and_matchers_are_refused_with_their_path() {
        let proto: route_pb::RouteConfiguration = xds_api::json::from_yaml_str(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {prefix: "/"}
    route: {cluster: c, upgrade_configs: [{upgrade_type: CONNECT}]}
"#,
        )
        .unwrap();
        let error = route_table(&proto, "r", Files::Read).unwrap_err();
        assert_eq!(
            error.path,
            "r.virtual_hosts[0].routes[0].route.upgrade_configs[0].upgrade_type"
        );
        assert!(error.reason.contains("CONNECT"), "{error}");
    }
}
