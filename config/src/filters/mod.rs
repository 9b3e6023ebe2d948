//! HTTP filters as configured: the HCM's `http_filters` in order, and per-route configs from
//! `typed_per_filter_config`. One file per filter reads its typed config; the catalog below
//! maps type URLs to those readers. The proxy's `http::filters` gives each its behaviour.
//!
//! Adding a filter: its config reader in `filters/NAME.rs` with one line in [`catalog`], and
//! its behaviour in the proxy's `http/filters/NAME.rs` with one line there.

pub mod compressor;
pub mod cors;
pub mod fault;
pub mod health_check;
pub mod local_ratelimit;
pub mod rbac;
pub mod router;

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use xds_api::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;

use crate::error::{ConfigResult, err, field};
use crate::unsupported;

/// One filter of an HCM's chain.
#[derive(Debug, Clone)]
pub struct HttpFilter {
    /// The configured name: what `typed_per_filter_config` keys refer to.
    pub name: String,
    pub config: FilterConfig,
}

/// A filter's own config, by kind.
#[derive(Debug, Clone)]
pub enum FilterConfig {
    Compressor(Arc<compressor::Compressor>),
    Cors(cors::CorsFilter),
    Fault(Arc<fault::Fault>),
    HealthCheck(Arc<health_check::HealthCheck>),
    LocalRateLimit(Arc<local_ratelimit::LocalRateLimit>),
    Rbac(Arc<rbac::HttpRbac>),
    Router(router::Router),
}

/// A per-route config (`typed_per_filter_config`), by kind.
#[derive(Debug, Clone)]
pub enum PerRouteConfig {
    Cors(cors::CorsPolicy),
    Fault(Arc<fault::Fault>),
    LocalRateLimit(Arc<local_ratelimit::LocalRateLimit>),
    Rbac(Arc<rbac::HttpRbac>),
}

/// State the proxy attaches to a config at first use (a per-route token bucket and its
/// stats). It lives as long as the config that holds it, a route table for a per-route config,
/// as Envoy's per-route objects do; clones share it.
#[derive(Clone, Default)]
pub struct Attached(Arc<OnceLock<Box<dyn Any + Send + Sync>>>);

impl Attached {
    /// The attached value, made by `init` on first use; `None` if a value of another type is
    /// attached.
    pub fn get_or_init<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.0.get_or_init(|| Box::new(init())).downcast_ref::<T>()
    }
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Attached(set)"
        } else {
            "Attached(unset)"
        })
    }
}

/// The per-route configs of one level (route, virtual host or route configuration), by filter
/// name. Few per level, so a list.
pub type PerFilterConfigs = Vec<(String, PerRouteConfig)>;

/// The filter configs Remora reads, for error messages.
const FILTER_TYPE_URLS: [&str; 7] = [
    compressor::TYPE_URL,
    cors::TYPE_URL,
    fault::TYPE_URL,
    health_check::TYPE_URL,
    local_ratelimit::TYPE_URL,
    rbac::TYPE_URL,
    router::TYPE_URL,
];

/// The per-route configs Remora reads, for error messages.
const PER_ROUTE_TYPE_URLS: [&str; 4] = [
    cors::POLICY_TYPE_URL,
    fault::TYPE_URL,
    local_ratelimit::TYPE_URL,
    rbac::PER_ROUTE_TYPE_URL,
];

/// The catalog: a filter's config by its type URL; `None` for a type Remora does not know.
fn catalog(any: &prost_types::Any, path: &str) -> Option<ConfigResult<FilterConfig>> {
    Some(match any.type_url.as_str() {
        compressor::TYPE_URL => {
            compressor::filter(any, path).map(|c| FilterConfig::Compressor(Arc::new(c)))
        }
        cors::TYPE_URL => cors::filter(any, path).map(FilterConfig::Cors),
        fault::TYPE_URL => fault::fault(any, path).map(|f| FilterConfig::Fault(Arc::new(f))),
        health_check::TYPE_URL => {
            health_check::filter(any, path).map(|h| FilterConfig::HealthCheck(Arc::new(h)))
        }
        local_ratelimit::TYPE_URL => {
            local_ratelimit::filter(any, path).map(|l| FilterConfig::LocalRateLimit(Arc::new(l)))
        }
        rbac::TYPE_URL => rbac::filter(any, path).map(|r| FilterConfig::Rbac(Arc::new(r))),
        router::TYPE_URL => router::router(any, path).map(FilterConfig::Router),
        _ => return None,
    })
}

/// The per-route catalog: a per-route config by its type URL.
fn per_route_catalog(any: &prost_types::Any, path: &str) -> Option<ConfigResult<PerRouteConfig>> {
    Some(match any.type_url.as_str() {
        cors::POLICY_TYPE_URL => cors::per_route(any, path).map(PerRouteConfig::Cors),
        fault::TYPE_URL => fault::fault(any, path).map(|f| PerRouteConfig::Fault(Arc::new(f))),
        local_ratelimit::TYPE_URL => local_ratelimit::per_route(any, path)
            .map(|l| PerRouteConfig::LocalRateLimit(Arc::new(l))),
        rbac::PER_ROUTE_TYPE_URL => {
            rbac::per_route(any, path).map(|r| PerRouteConfig::Rbac(Arc::new(r)))
        }
        _ => return None,
    })
}

/// The type URL a filter without `typed_config` stands for (Envoy accepts well-known names).
fn implied_type_url(name: &str) -> Option<&'static str> {
    match name {
        "envoy.filters.http.router" => Some(router::TYPE_URL),
        "envoy.filters.http.cors" => Some(cors::TYPE_URL),
        _ => None,
    }
}

/// The HCM's `http_filters`: each known filter in order, the router last.
pub fn http_filters(filters: &[hcm_pb::HttpFilter], path: &str) -> ConfigResult<Vec<HttpFilter>> {
    let mut chain: Vec<HttpFilter> = Vec::new();
    for (index, filter) in filters.iter().enumerate() {
        let fpath = crate::error::item(path, "http_filters", index);
        let hcm_pb::HttpFilter {
            name,
            is_optional,
            disabled,
            config_type,
        } = filter;
        unsupported!(&fpath, disabled);
        if name.is_empty() {
            return err(field(&fpath, "name"), "must not be empty");
        }
        let typed_path = field(&fpath, "typed_config");
        let any = match config_type {
            Some(hcm_pb::http_filter::ConfigType::TypedConfig(any)) => Some(any.clone()),
            None => implied_type_url(name).map(|type_url| prost_types::Any {
                type_url: type_url.to_string(),
                value: Vec::new(),
            }),
        };
        let config = match any.as_ref().and_then(|any| catalog(any, &typed_path)) {
            Some(config) => config?,
            // As Envoy: an optional filter Remora does not have is left out of the chain.
            None if *is_optional => continue,
            None => {
                let type_url = any
                    .as_ref()
                    .map_or("no typed_config", |any| any.type_url.as_str());
                return err(
                    fpath,
                    format!(
                        "http filter {name:?} is not supported ({type_url}; Remora has {})",
                        FILTER_TYPE_URLS
                            .map(xds_api::type_urls::message_name)
                            .join(", ")
                    ),
                );
            }
        };
        if chain.iter().any(|other| other.name == *name) {
            return err(
                field(&fpath, "name"),
                format!("filter name {name:?} appears twice"),
            );
        }
        // The router is terminal, as Envoy requires.
        if matches!(config, FilterConfig::Router(_)) && index + 1 != filters.len() {
            return err(fpath, "the router must be the last http filter");
        }
        chain.push(HttpFilter {
            name: name.clone(),
            config,
        });
    }
    match chain.last() {
        Some(HttpFilter {
            config: FilterConfig::Router(_),
            ..
        }) => Ok(chain),
        _ => err(
            field(path, "http_filters"),
            "the router filter is required, last",
        ),
    }
}

/// A level's `typed_per_filter_config`.
pub fn per_filter_configs(
    configs: &HashMap<String, prost_types::Any>,
    path: &str,
) -> ConfigResult<PerFilterConfigs> {
    let mut out = PerFilterConfigs::new();
    // Sorted, so the first error found does not depend on the map's order.
    let mut keys: Vec<&String> = configs.keys().collect();
    keys.sort();
    for key in keys {
        let any = &configs[key];
        let kpath = crate::error::entry(path, "typed_per_filter_config", key);
        match per_route_catalog(any, &kpath) {
            Some(config) => out.push((key.clone(), config?)),
            None => {
                return err(
                    kpath,
                    format!(
                        "per-route config of type {:?} is not supported (Remora reads: {})",
                        any.type_url,
                        PER_ROUTE_TYPE_URLS
                            .map(xds_api::type_urls::message_name)
                            .join(", ")
                    ),
                );
            }
        }
    }
    Ok(out)
}

/// The per-route config a filter named `name` has at one level.
pub fn find<'a>(configs: &'a PerFilterConfigs, name: &str) -> Option<&'a PerRouteConfig> {
    configs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, config)| config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(yaml: &str) -> ConfigResult<Vec<HttpFilter>> {
        let hcm: hcm_pb::HttpConnectionManager = xds_api::json::from_yaml_str(yaml).expect("yaml");
        http_filters(&hcm.http_filters, "hcm")
    }

    #[test]
    fn fault_and_local_rate_limit_filters_join_the_chain() {
        let filters = chain(
            r#"
http_filters:
- name: envoy.filters.http.fault
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
    abort: {http_status: 503, percentage: {numerator: 1}}
- name: envoy.filters.http.local_ratelimit
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
    stat_prefix: rl
- name: envoy.filters.http.router
  typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#,
        )
        .unwrap();
        assert!(matches!(filters[0].config, FilterConfig::Fault(_)));
        assert!(matches!(filters[1].config, FilterConfig::LocalRateLimit(_)));
        // As Envoy 1.40: the fault filter needs its typed_config.
        let error = chain(
            "http_filters: [{name: envoy.filters.http.fault}, {name: envoy.filters.http.router}]",
        )
        .unwrap_err();
        assert_eq!(error.path, "hcm.http_filters[0]");
    }

    #[test]
    fn per_route_configs_are_read_and_their_errors_named() {
        let any = |yaml: &str| -> prost_types::Any {
            let value: xds_api::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit =
                xds_api::json::from_yaml_str(yaml).expect("yaml");
            xds_api::any::pack(&value)
        };
        let mut configs = HashMap::new();
        configs.insert(
            "rl".to_string(),
            any("stat_prefix: r\ntoken_bucket: {max_tokens: 1, fill_interval: 1s}"),
        );
        let read = per_filter_configs(&configs, "route").unwrap();
        assert!(matches!(
            find(&read, "rl"),
            Some(PerRouteConfig::LocalRateLimit(_))
        ));
        configs.insert("rl".to_string(), any("stat_prefix: r"));
        let error = per_filter_configs(&configs, "route").unwrap_err();
        assert_eq!(
            error.path,
            r#"route.typed_per_filter_config["rl"].token_bucket"#
        );
        configs.insert(
            "rl".to_string(),
            xds_api::any::pack(
                &xds_api::envoy::extensions::filters::http::router::v3::Router::default(),
            ),
        );
        let error = per_filter_configs(&configs, "route").unwrap_err();
        assert!(error.reason.contains("HTTPFault"), "{error}");
    }
}
