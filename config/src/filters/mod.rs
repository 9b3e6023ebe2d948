//! HTTP filters as configured: the HCM's `http_filters` in order, and per-route configs from
//! `typed_per_filter_config`. One file per filter reads its typed config; the catalog below
//! maps type URLs to those readers. The proxy's `http::filters` gives each its behaviour.
//!
//! Adding a filter: its config reader in `filters/NAME.rs` with one line in [`catalog`], and
//! its behaviour in the proxy's `http/filters/NAME.rs` with one line there.

pub mod cors;
pub mod router;

use std::collections::HashMap;

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
    Cors(cors::CorsFilter),
    Router(router::Router),
}

/// A per-route config (`typed_per_filter_config`), by kind.
#[derive(Debug, Clone)]
pub enum PerRouteConfig {
    Cors(cors::CorsPolicy),
}

/// The per-route configs of one level (route, virtual host or route configuration), by filter
/// name. Few per level, so a list.
pub type PerFilterConfigs = Vec<(String, PerRouteConfig)>;

/// The catalog: a filter's config by its type URL; `None` for a type Remora does not know.
fn catalog(any: &prost_types::Any, path: &str) -> Option<ConfigResult<FilterConfig>> {
    Some(match any.type_url.as_str() {
        cors::TYPE_URL => cors::filter(any, path).map(FilterConfig::Cors),
        router::TYPE_URL => router::router(any, path).map(FilterConfig::Router),
        _ => return None,
    })
}

/// The per-route catalog: a per-route config by its type URL.
fn per_route_catalog(any: &prost_types::Any, path: &str) -> Option<ConfigResult<PerRouteConfig>> {
    Some(match any.type_url.as_str() {
        cors::POLICY_TYPE_URL => cors::per_route(any, path).map(PerRouteConfig::Cors),
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
                        [cors::TYPE_URL, router::TYPE_URL]
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
                        xds_api::type_urls::message_name(cors::POLICY_TYPE_URL)
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
