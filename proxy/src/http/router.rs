//! The router's tables: a RouteConfiguration compiled once at config time into virtual hosts
//! (exact, `*.suffix`, `prefix*`, `*`), routes (first match wins) and actions. Matching a request
//! allocates nothing.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::route::v3 as route_pb;
use xds_api::envoy::r#type::matcher::v3 as matcher_pb;

use crate::config::{ConfigError, ConfigResult};
use crate::http::cors::{self, CorsConfig};

type R<T> = ConfigResult<T>;

fn err<T>(path: impl Into<String>, reason: impl Into<String>) -> R<T> {
    Err(ConfigError::new(path, reason))
}

/// A compiled RouteConfiguration.
#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    vhosts: Vec<VirtualHost>,
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
    /// The route configuration's CORS policy (`typed_per_filter_config`).
    pub cors: CorsConfig,
    /// Cluster names the table refers to (for `validate_clusters` and warming).
    pub clusters: Vec<String>,
    /// Whether unknown cluster names make the config invalid (`None`: Envoy's default, true
    /// for inline route configs).
    pub validate_clusters: Option<bool>,
    pub raw: crate::config::RawConfig,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub cors: CorsConfig,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    matcher: RouteMatcher,
    pub action: Action,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub cors: CorsConfig,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
    SeparatedPrefix(String),
}

#[derive(Debug)]
struct RouteMatcher {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    /// `grpc: {}`: only gRPC requests (by content type) match.
    grpc: bool,
}

#[derive(Debug)]
pub enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        fn lower_eq(a: &str, b: &str) -> bool {
            a.eq_ignore_ascii_case(b)
        }
        match self {
            StringMatch::Exact(want, false) => value == want,
            StringMatch::Exact(want, true) => lower_eq(value, want),
            StringMatch::Prefix(want, false) => value.starts_with(want.as_str()),
            StringMatch::Prefix(want, true) => {
                value.len() >= want.len()
                    && value.is_char_boundary(want.len())
                    && lower_eq(&value[..want.len()], want)
            }
            StringMatch::Suffix(want, false) => value.ends_with(want.as_str()),
            StringMatch::Suffix(want, true) => {
                value.len() >= want.len()
                    && value.is_char_boundary(value.len() - want.len())
                    && lower_eq(&value[value.len() - want.len()..], want)
            }
            StringMatch::Contains(want, false) => value.contains(want.as_str()),
            StringMatch::Contains(want, true) => value
                .to_ascii_lowercase()
                .contains(&want.to_ascii_lowercase()),
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

#[derive(Debug)]
enum HeaderCheck {
    String(StringMatch),
    Present(bool),
    Range(i64, i64),
}

#[derive(Debug)]
struct HeaderMatch {
    name: HeaderName,
    check: HeaderCheck,
    invert: bool,
    treat_missing_as_empty: bool,
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    check: Option<StringMatch>,
}

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
    pub regex_rewrite: Option<(Regex, String)>,
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
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub status: u16,
    pub strip_query: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// Headers to remove, then to add, at one level (route config, virtual host, route).
#[derive(Debug, Default)]
pub struct HeaderMutations {
    pub remove: Vec<HeaderName>,
    pub add: Vec<(HeaderName, HeaderValue, AppendAction, bool)>,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value, action, keep_empty) in &self.add {
            if value.is_empty() && !keep_empty {
                continue;
            }
            match action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(name.clone(), value.clone());
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(name) {
                        headers.insert(name.clone(), value.clone());
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(name.clone(), value.clone());
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(name) {
                        headers.insert(name.clone(), value.clone());
                    }
                }
            }
        }
    }
}

// === compile ===

fn regex(pattern: &str, path: &str) -> R<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| ConfigError::new(path, format!("invalid regex: {e}")))
}

/// RE2 substitutions use `\1`; the regex crate uses `${1}` and treats `$` as special.
fn substitution(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            other => out.push(other),
        }
    }
    out
}

fn regex_rewrite(
    m: &Option<matcher_pb::RegexMatchAndSubstitute>,
    path: &str,
) -> R<Option<(Regex, String)>> {
    let Some(m) = m else { return Ok(None) };
    let pattern = match &m.pattern {
        Some(p) => Regex::new(&p.regex).map_err(|e| {
            ConfigError::new(
                format!("{path}.pattern.regex"),
                format!("invalid regex: {e}"),
            )
        })?,
        None => return err(format!("{path}.pattern"), "required"),
    };
    Ok(Some((pattern, substitution(&m.substitution))))
}

pub fn string_matcher(m: &matcher_pb::StringMatcher, path: &str) -> R<StringMatch> {
    use matcher_pb::string_matcher::MatchPattern;
    let ic = m.ignore_case;
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatch::Exact(s.clone(), ic),
        Some(MatchPattern::Prefix(s)) if !s.is_empty() => StringMatch::Prefix(s.clone(), ic),
        Some(MatchPattern::Suffix(s)) if !s.is_empty() => StringMatch::Suffix(s.clone(), ic),
        Some(MatchPattern::Contains(s)) if !s.is_empty() => StringMatch::Contains(s.clone(), ic),
        Some(MatchPattern::SafeRegex(r)) => {
            StringMatch::Regex(regex(&r.regex, &format!("{path}.safe_regex.regex"))?)
        }
        Some(_) => return err(path, "the match string must not be empty"),
        None => return err(path, "a match pattern is required"),
    })
}

fn header_name(name: &str, path: &str) -> R<HeaderName> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| ConfigError::new(path, format!("{name:?} is not a valid header name")))
}

fn mutations(
    add: &[core_pb::HeaderValueOption],
    remove: &[String],
    path: &str,
    add_field: &str,
    remove_field: &str,
) -> R<HeaderMutations> {
    let mut out = HeaderMutations::default();
    for (i, name) in remove.iter().enumerate() {
        let p = format!("{path}{remove_field}[{i}]");
        if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
            return err(p, "pseudo-headers and host cannot be removed");
        }
        out.remove.push(header_name(name, &p)?);
    }
    for (i, option) in add.iter().enumerate() {
        let p = format!("{path}{add_field}[{i}]");
        let Some(header) = &option.header else {
            return err(format!("{p}.header"), "required");
        };
        if header.key.starts_with(':') {
            return err(format!("{p}.header.key"), "pseudo-headers cannot be added");
        }
        let name = header_name(&header.key, &format!("{p}.header.key"))?;
        let literal = header.value.replace("%%", "");
        if literal.contains('%') {
            return err(
                format!("{p}.header.value"),
                "header value substitutions (%...%) are not supported",
            );
        }
        let value = HeaderValue::from_str(&header.value.replace("%%", "%")).map_err(|_| {
            ConfigError::new(format!("{p}.header.value"), "not a valid header value")
        })?;
        use core_pb::header_value_option::HeaderAppendAction as A;
        let action = match A::try_from(option.append_action) {
            Ok(A::AppendIfExistsOrAdd) => AppendAction::AppendIfExistsOrAdd,
            Ok(A::AddIfAbsent) => AppendAction::AddIfAbsent,
            Ok(A::OverwriteIfExistsOrAdd) => AppendAction::OverwriteIfExistsOrAdd,
            Ok(A::OverwriteIfExists) => AppendAction::OverwriteIfExists,
            Err(_) => return err(format!("{p}.append_action"), "unknown value"),
        };
        out.add.push((name, value, action, option.keep_empty_value));
    }
    Ok(out)
}

fn data_source(source: &Option<core_pb::DataSource>, path: &str) -> R<Option<Bytes>> {
    use core_pb::data_source::Specifier;
    let Some(source) = source else {
        return Ok(None);
    };
    Ok(match &source.specifier {
        Some(Specifier::InlineString(s)) => Some(Bytes::from(s.clone())),
        Some(Specifier::InlineBytes(b)) => Some(Bytes::from(b.clone())),
        Some(Specifier::Filename(f)) => Some(Bytes::from(std::fs::read(f).map_err(|e| {
            ConfigError::new(
                format!("{path}.filename"),
                format!("cannot read {f:?}: {e}"),
            )
        })?)),
        _ => {
            return err(
                path,
                "only filename, inline_bytes and inline_string are supported",
            );
        }
    })
}

fn duration(value: &Option<prost_types::Duration>, path: &str) -> R<Option<Duration>> {
    match value {
        Some(d) if d.seconds < 0 || d.nanos < 0 => err(path, "must not be negative"),
        Some(d) => Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32))),
        None => Ok(None),
    }
}

impl RouteTable {
    /// Compiles a RouteConfiguration; `path` prefixes error paths.
    pub fn compile(proto: &route_pb::RouteConfiguration, path: &str) -> R<RouteTable> {
        let pre = if path.is_empty() {
            String::new()
        } else {
            format!("{path}.")
        };
        let mut table = RouteTable {
            name: proto.name.clone(),
            vhosts: Vec::new(),
            exact: HashMap::new(),
            suffix: Vec::new(),
            prefix: Vec::new(),
            any: None,
            ignore_port_in_host_matching: proto.ignore_port_in_host_matching,
            request_headers: mutations(
                &proto.request_headers_to_add,
                &proto.request_headers_to_remove,
                &pre,
                "request_headers_to_add",
                "request_headers_to_remove",
            )?,
            response_headers: mutations(
                &proto.response_headers_to_add,
                &proto.response_headers_to_remove,
                &pre,
                "response_headers_to_add",
                "response_headers_to_remove",
            )?,
            most_specific_header_mutations_wins: proto.most_specific_header_mutations_wins,
            cors: CorsConfig {
                per_filter: cors::per_filter(&proto.typed_per_filter_config, path)?,
                legacy: None,
            },
            clusters: Vec::new(),
            validate_clusters: proto.validate_clusters,
            raw: crate::config::RawConfig::of(proto),
        };
        for (vi, vh) in proto.virtual_hosts.iter().enumerate() {
            let vpath = format!("{pre}virtual_hosts[{vi}]");
            if vh.name.is_empty() {
                return err(format!("{vpath}.name"), "must not be empty");
            }
            if vh.domains.is_empty() {
                return err(
                    format!("{vpath}.domains"),
                    "at least one domain is required",
                );
            }
            let index = table.vhosts.len();
            for (di, domain) in vh.domains.iter().enumerate() {
                let dpath = format!("{vpath}.domains[{di}]");
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
            let mut routes = Vec::new();
            for (ri, route) in vh.routes.iter().enumerate() {
                let rpath = format!("{vpath}.routes[{ri}]");
                let compiled = compile_route(route, &rpath)?;
                if let Action::Forward(forward) = &compiled.action {
                    match &forward.cluster {
                        ClusterSpec::Name(name) => table.clusters.push(name.clone()),
                        ClusterSpec::Weighted { clusters, .. } => table
                            .clusters
                            .extend(clusters.iter().map(|(n, _)| n.clone())),
                        ClusterSpec::Header(_) => {}
                    }
                }
                routes.push(compiled);
            }
            table.vhosts.push(VirtualHost {
                name: vh.name.clone(),
                routes,
                request_headers: mutations(
                    &vh.request_headers_to_add,
                    &vh.request_headers_to_remove,
                    &format!("{vpath}."),
                    "request_headers_to_add",
                    "request_headers_to_remove",
                )?,
                response_headers: mutations(
                    &vh.response_headers_to_add,
                    &vh.response_headers_to_remove,
                    &format!("{vpath}."),
                    "response_headers_to_add",
                    "response_headers_to_remove",
                )?,
                cors: CorsConfig {
                    per_filter: cors::per_filter(&vh.typed_per_filter_config, &vpath)?,
                    legacy: cors::legacy(&vh.cors, &format!("{vpath}.cors"))?,
                },
            });
        }
        table.suffix.sort_by_key(|b| std::cmp::Reverse(b.0.len()));
        table.prefix.sort_by_key(|b| std::cmp::Reverse(b.0.len()));
        table.clusters.sort();
        table.clusters.dedup();
        Ok(table)
    }

    /// Envoy's virtual-host selection: exact, then longest `*suffix`, then longest `prefix*`,
    /// then `*`. `host` must already be lower case.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let host = if self.ignore_port_in_host_matching {
            strip_port(host)
        } else {
            host
        };
        if let Some(&index) = self.exact.get(host) {
            return self.vhosts.get(index);
        }
        for (suffix, index) in &self.suffix {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return self.vhosts.get(*index);
            }
        }
        for (prefix, index) in &self.prefix {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                return self.vhosts.get(*index);
            }
        }
        self.any.and_then(|index| self.vhosts.get(index))
    }

    /// The first route of the virtual host that matches.
    pub fn route<'a>(
        &'a self,
        host: &str,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Option<(&'a VirtualHost, &'a Route)> {
        let vhost = self.virtual_host(host)?;
        let route = vhost
            .routes
            .iter()
            .find(|route| route.matcher.matches(path_and_query, headers))?;
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

fn compile_route(route: &route_pb::Route, path: &str) -> R<Route> {
    let Some(m) = &route.r#match else {
        return err(format!("{path}.match"), "required");
    };
    let mpath = format!("{path}.match");
    use route_pb::route_match::PathSpecifier;
    let path_match = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(r)) => {
            PathMatch::Regex(regex(&r.regex, &format!("{mpath}.safe_regex.regex"))?)
        }
        Some(PathSpecifier::PathSeparatedPrefix(p)) => {
            if p.ends_with('/') || p.contains('?') || p.contains('#') {
                return err(
                    format!("{mpath}.path_separated_prefix"),
                    "must not end with '/' or contain '?' or '#'",
                );
            }
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(_) => return err(&mpath, "this path specifier is not supported"),
        None => {
            return err(
                &mpath,
                "a path specifier (prefix, path, safe_regex, path_separated_prefix) is required",
            );
        }
    };
    let case_sensitive = m.case_sensitive.unwrap_or(true);
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let hpath = format!("{mpath}.headers[{i}]");
        use route_pb::header_matcher::HeaderMatchSpecifier as S;
        let check = match &h.header_match_specifier {
            Some(S::ExactMatch(s)) => HeaderCheck::String(StringMatch::Exact(s.clone(), false)),
            Some(S::PrefixMatch(s)) => HeaderCheck::String(StringMatch::Prefix(s.clone(), false)),
            Some(S::SuffixMatch(s)) => HeaderCheck::String(StringMatch::Suffix(s.clone(), false)),
            Some(S::ContainsMatch(s)) => {
                HeaderCheck::String(StringMatch::Contains(s.clone(), false))
            }
            Some(S::SafeRegexMatch(r)) => HeaderCheck::String(StringMatch::Regex(regex(
                &r.regex,
                &format!("{hpath}.safe_regex_match.regex"),
            )?)),
            Some(S::StringMatch(s)) => {
                HeaderCheck::String(string_matcher(s, &format!("{hpath}.string_match"))?)
            }
            Some(S::PresentMatch(p)) => HeaderCheck::Present(*p),
            Some(S::RangeMatch(r)) => HeaderCheck::Range(r.start, r.end),
            None => HeaderCheck::Present(true),
        };
        headers.push(HeaderMatch {
            name: header_name(&h.name, &format!("{hpath}.name"))?,
            check,
            invert: h.invert_match,
            treat_missing_as_empty: h.treat_missing_header_as_empty,
        });
    }
    let mut query = Vec::new();
    for (i, q) in m.query_parameters.iter().enumerate() {
        let qpath = format!("{mpath}.query_parameters[{i}]");
        if q.name.is_empty() {
            return err(format!("{qpath}.name"), "must not be empty");
        }
        use route_pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let check = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => Some(string_matcher(s, &format!("{qpath}.string_match"))?),
            Some(Q::PresentMatch(true)) | None => None,
            Some(Q::PresentMatch(false)) => {
                return err(
                    format!("{qpath}.present_match"),
                    "present_match: false is not supported",
                );
            }
        };
        query.push(QueryMatch {
            name: q.name.clone(),
            check,
        });
    }
    let matcher = RouteMatcher {
        path: path_match,
        case_sensitive,
        headers,
        query,
        grpc: m.grpc.is_some(),
    };
    use route_pb::route::Action as A;
    let action = match &route.action {
        Some(A::Route(action)) => {
            Action::Forward(compile_forward(action, &format!("{path}.route"), &matcher)?)
        }
        Some(A::Redirect(redirect)) => Action::Redirect(compile_redirect(
            redirect,
            &format!("{path}.redirect"),
            &matcher,
        )?),
        Some(A::DirectResponse(direct)) => {
            if !(200..600).contains(&direct.status) {
                return err(
                    format!("{path}.direct_response.status"),
                    "must be in [200, 600)",
                );
            }
            Action::Direct {
                status: direct.status as u16,
                body: data_source(&direct.body, &format!("{path}.direct_response.body"))?,
            }
        }
        Some(_) => return err(path, "this route action is not supported"),
        None => {
            return err(
                path,
                "an action (route, redirect, direct_response) is required",
            );
        }
    };
    Ok(Route {
        name: route.name.clone(),
        matcher,
        action,
        request_headers: mutations(
            &route.request_headers_to_add,
            &route.request_headers_to_remove,
            &format!("{path}."),
            "request_headers_to_add",
            "request_headers_to_remove",
        )?,
        response_headers: mutations(
            &route.response_headers_to_add,
            &route.response_headers_to_remove,
            &format!("{path}."),
            "response_headers_to_add",
            "response_headers_to_remove",
        )?,
        cors: CorsConfig {
            per_filter: cors::per_filter(&route.typed_per_filter_config, path)?,
            legacy: match &route.action {
                Some(A::Route(action)) => {
                    cors::legacy(&action.cors, &format!("{path}.route.cors"))?
                }
                _ => None,
            },
        },
    })
}

fn compile_forward(
    action: &route_pb::RouteAction,
    path: &str,
    matcher: &RouteMatcher,
) -> R<Forward> {
    use route_pb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let cluster = match &action.cluster_specifier {
        Some(C::Cluster(name)) if !name.is_empty() => ClusterSpec::Name(name.clone()),
        Some(C::ClusterHeader(name)) if !name.is_empty() => {
            ClusterSpec::Header(header_name(name, &format!("{path}.cluster_header"))?)
        }
        Some(C::WeightedClusters(w)) => {
            if w.clusters.is_empty() {
                return err(
                    format!("{path}.weighted_clusters.clusters"),
                    "at least one cluster is required",
                );
            }
            let mut clusters = Vec::new();
            for (i, c) in w.clusters.iter().enumerate() {
                if c.name.is_empty() {
                    return err(
                        format!("{path}.weighted_clusters.clusters[{i}].name"),
                        "must not be empty",
                    );
                }
                clusters.push((c.name.clone(), c.weight.unwrap_or(0)));
            }
            let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
            if total == 0 {
                return err(
                    format!("{path}.weighted_clusters"),
                    "the sum of weights must be greater than 0",
                );
            }
            ClusterSpec::Weighted { clusters, total }
        }
        Some(_) => return err(path, "the cluster name must not be empty"),
        None => {
            return err(
                path,
                "cluster, cluster_header or weighted_clusters is required",
            );
        }
    };
    let prefix_rewrite = (!action.prefix_rewrite.is_empty()).then(|| action.prefix_rewrite.clone());
    if prefix_rewrite.is_some() && matches!(matcher.path, PathMatch::Regex(_)) {
        return err(
            format!("{path}.prefix_rewrite"),
            "cannot be used with a safe_regex match",
        );
    }
    let regex_rewrite = regex_rewrite(&action.regex_rewrite, &format!("{path}.regex_rewrite"))?;
    if prefix_rewrite.is_some() && regex_rewrite.is_some() {
        return err(
            format!("{path}.regex_rewrite"),
            "cannot be used together with prefix_rewrite",
        );
    }
    let host_rewrite = match &action.host_rewrite_specifier {
        Some(H::HostRewriteLiteral(host)) => {
            HostRewrite::Literal(HeaderValue::from_str(host).map_err(|_| {
                ConfigError::new(format!("{path}.host_rewrite_literal"), "not a valid host")
            })?)
        }
        Some(H::AutoHostRewrite(true)) => HostRewrite::Auto,
        Some(H::AutoHostRewrite(false)) | None => HostRewrite::None,
        Some(_) => return err(path, "this host rewrite is not supported"),
    };
    let timeout = match duration(&action.timeout, &format!("{path}.timeout"))? {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(Duration::from_secs(15)),
    };
    let idle_timeout = duration(&action.idle_timeout, &format!("{path}.idle_timeout"))?
        .map(|d| (!d.is_zero()).then_some(d));
    use route_pb::route_action::ClusterNotFoundResponseCode as N;
    let cluster_not_found_status = match N::try_from(action.cluster_not_found_response_code) {
        Ok(N::ServiceUnavailable) => 503,
        Ok(N::NotFound) => 404,
        Ok(N::InternalServerError) => 500,
        Err(_) => {
            return err(
                format!("{path}.cluster_not_found_response_code"),
                "unknown value",
            );
        }
    };
    let upgrades = action
        .upgrade_configs
        .iter()
        .map(|upgrade| {
            (
                upgrade.upgrade_type.to_ascii_lowercase(),
                upgrade.enabled.unwrap_or(true),
            )
        })
        .collect();
    Ok(Forward {
        upgrades,
        timeout_header: timeout.map(|t| HeaderValue::from(t.as_millis() as u64)),
        cluster,
        cluster_not_found_status,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        timeout,
        idle_timeout,
    })
}

fn compile_redirect(
    r: &route_pb::RedirectAction,
    path: &str,
    matcher: &RouteMatcher,
) -> R<Redirect> {
    use route_pb::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
    };
    let scheme = match &r.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::SchemeRedirect(s)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
        _ => None,
    };
    let (path_redirect, prefix_rewrite, regex_rw) = match &r.path_rewrite_specifier {
        Some(P::PathRedirect(p)) => (Some(p.clone()), None, None),
        Some(P::PrefixRewrite(p)) => {
            if matches!(matcher.path, PathMatch::Regex(_)) {
                return err(
                    format!("{path}.prefix_rewrite"),
                    "cannot be used with a safe_regex match",
                );
            }
            (None, Some(p.clone()), None)
        }
        Some(P::RegexRewrite(rw)) => (
            None,
            None,
            regex_rewrite(&Some(rw.clone()), &format!("{path}.regex_rewrite"))?,
        ),
        #[allow(unreachable_patterns)]
        Some(_) => return err(path, "this path rewrite is not supported"),
        None => (None, None, None),
    };
    let status = match C::try_from(r.response_code) {
        Ok(C::MovedPermanently) => 301,
        Ok(C::Found) => 302,
        Ok(C::SeeOther) => 303,
        Ok(C::TemporaryRedirect) => 307,
        Ok(C::PermanentRedirect) => 308,
        Err(_) => return err(format!("{path}.response_code"), "unknown value"),
    };
    let port =
        match r.port_redirect {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| {
                ConfigError::new(format!("{path}.port_redirect"), "must be ≤ 65535")
            })?),
        };
    Ok(Redirect {
        scheme,
        host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port,
        path: path_redirect,
        prefix_rewrite,
        regex_rewrite: regex_rw,
        status,
        strip_query: r.strip_query,
    })
}

// === match ===

fn split_query(path_and_query: &str) -> (&str, &str) {
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
    fn matches(&self, path_and_query: &str, headers: &HeaderMap) -> bool {
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
            && self.headers.iter().all(|h| h.matches(headers))
            && self.query.iter().all(|q| q.matches(query))
    }
}

/// A gRPC request as Envoy tells one: content type `application/grpc`, alone or followed by
/// `+format` or `;parameters` (so not `application/grpc-web`).
fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let value = content_type.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

impl HeaderMatch {
    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let joined;
        let value: &str = match values.next() {
            None if self.treat_missing_as_empty => "",
            None => {
                return matches!(self.check, HeaderCheck::Present(present) if present == self.invert);
            }
            Some(first) => match values.next() {
                None => match first.to_str() {
                    Ok(v) => v,
                    Err(_) => return self.invert,
                },
                Some(_) => {
                    joined = headers
                        .get_all(&self.name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect::<Vec<_>>()
                        .join(",");
                    &joined
                }
            },
        };
        let matched = match &self.check {
            HeaderCheck::String(m) => m.matches(value),
            HeaderCheck::Present(present) => *present,
            HeaderCheck::Range(start, end) => {
                value.parse::<i64>().is_ok_and(|v| v >= *start && v < *end)
            }
        };
        matched != self.invert
    }
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
    regex_rewrite: Option<&(Regex, String)>,
    path_and_query: &str,
) -> Option<String> {
    if let Some(new_prefix) = prefix_rewrite {
        let matched_len = match &matcher.path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) | PathMatch::SeparatedPrefix(p) => p.len(),
            PathMatch::Regex(_) => return None,
        };
        let rest = path_and_query.get(matched_len..).unwrap_or("");
        return Some(format!("{new_prefix}{rest}"));
    }
    if let Some((re, substitution)) = regex_rewrite {
        let (path, query) = split_query(path_and_query);
        let new_path = re.replace_all(path, substitution.as_str());
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
        RouteTable::compile(&proto, "").expect("compiles")
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
    fn substitution_converts_re2_syntax() {
        assert_eq!(substitution(r"\1/x$"), "${1}/x$$");
    }
}
