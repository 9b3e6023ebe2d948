//! The HTTP filters Remora runs, built from their configs (`remora_config::filters`): one file
//! per filter and one line per filter in [`build`]. The router is not here: it is the chain's
//! terminal stage, in `http::router`.

mod compressor;
mod cors;
mod fault;
mod health_check;
mod local_ratelimit;
mod rbac;

use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, StatusCode};
use remora_config::filters::{FilterConfig, HttpFilter as FilterSpec, PerRouteConfig};

use crate::error::ResponseFlag;
use crate::http::filter::{FilterChain, HttpFilter, Stream};
use crate::http::local_reply::LocalReply;
use crate::lifecycle::Lifecycle;
use crate::stats::Registry;
use crate::store::Store;

/// What filters are built with: where they register stats (under the HCM's `stat_prefix`), and
/// what they may read of the server.
pub struct Server<'a> {
    pub registry: &'a Arc<Registry>,
    pub stat_prefix: &'a str,
    /// Whether health checks are failed (`/healthcheck/fail`).
    pub lifecycle: &'a Arc<Lifecycle>,
    /// The node's cluster, which health check answers name.
    pub local_cluster: &'a str,
    /// The clusters in use, for their share of healthy hosts.
    pub store: &'a Arc<Store>,
}

/// The runtime filters of an HCM's `http_filters`, in order, without the router.
pub fn build(specs: &[FilterSpec], server: &Server<'_>) -> FilterChain {
    let (registry, stat_prefix) = (server.registry, server.stat_prefix);
    let mut filters: Vec<Arc<dyn HttpFilter>> = Vec::new();
    // The chain's compressors, for each one's share of the Accept-Encoding negotiation.
    let compressors: Arc<[compressor::ChainEntry]> = specs
        .iter()
        .filter_map(|spec| match &spec.config {
            FilterConfig::Compressor(c) if !c.disabled => {
                Some((c.library.encoding(), c.choose_first))
            }
            _ => None,
        })
        .collect();
    let mut compressor_position = 0;
    for spec in specs {
        match &spec.config {
            FilterConfig::Compressor(config) => {
                if !config.disabled {
                    filters.push(Arc::new(compressor::Compressor::new(
                        config.clone(),
                        compressors.clone(),
                        compressor_position,
                        registry,
                        stat_prefix,
                    )));
                    compressor_position += 1;
                }
            }
            FilterConfig::Cors(_) => {
                filters.push(Arc::new(cors::Cors::new(&spec.name, registry, stat_prefix)))
            }
            FilterConfig::Fault(config) => filters.push(Arc::new(fault::Fault::new(
                &spec.name,
                config.clone(),
                registry.clone(),
                stat_prefix,
            ))),
            FilterConfig::LocalRateLimit(config) => filters.push(Arc::new(
                local_ratelimit::LocalRateLimit::new(&spec.name, config.clone(), registry.clone()),
            )),
            FilterConfig::HealthCheck(config) => filters.push(Arc::new(
                health_check::HealthCheck::new(config.clone(), server),
            )),
            FilterConfig::Rbac(config) => filters.push(Arc::new(rbac::Rbac::new(
                &spec.name,
                config.clone(),
                registry,
                stat_prefix,
            ))),
            FilterConfig::Router(_) => {}
        }
    }
    FilterChain::new(filters)
}

/// The most specific per-route config of filter `name` (route, virtual host, route
/// configuration) that `pick` accepts, as Envoy resolves a filter's per-route config.
fn most_specific<'a, T>(
    stream: &Stream<'a>,
    name: &str,
    pick: impl Fn(&'a PerRouteConfig) -> Option<&'a T>,
) -> Option<&'a T> {
    stream.per_route(name).into_iter().flatten().find_map(pick)
}

/// The first value of a request header as an unsigned number, read as Envoy reads its
/// numeric control headers (spaces around it and a leading `+` allowed); `None` when absent or
/// not a number.
fn header_number(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let value = headers.get(name)?.to_str().ok()?.trim_matches([' ', '\t']);
    let digits = value.strip_prefix('+').unwrap_or(value);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether a share in millionths takes this request.
fn sampled(per_million: u32) -> bool {
    match per_million {
        0 => false,
        n if n >= 1_000_000 => true,
        n => rand::random_range(0..1_000_000) < n,
    }
}

/// A filter's local reply as Envoy sends it: `body` as text, and Envoy's response code
/// `details`. A gRPC request gets it the gRPC way (see [`crate::http::local_reply`]), with
/// `grpc_status` if given.
fn filter_reply(
    status: StatusCode,
    (body, details): (&'static str, &'static str),
    flag: ResponseFlag,
    grpc_status: Option<u64>,
) -> LocalReply {
    let mut reply = LocalReply::new(status).with_body(Bytes::from_static(body.as_bytes()));
    reply.grpc_status = grpc_status.and_then(|code| u32::try_from(code).ok());
    reply.flag = Some(flag);
    reply.details = details.into();
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_header_numbers_are_read_as_envoy_reads_them() {
        let name = HeaderName::from_static("x-n");
        let read = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(&name, http::HeaderValue::from_str(value).unwrap());
            header_number(&headers, &name)
        };
        assert_eq!(read("250"), Some(250));
        assert_eq!(read(" +7 "), Some(7));
        assert_eq!(read("-1"), None);
        assert_eq!(read("1.5"), None);
        assert_eq!(read(""), None);
        assert_eq!(read("99999999999999999999999"), None);
        assert_eq!(header_number(&HeaderMap::new(), &name), None);
    }
}
