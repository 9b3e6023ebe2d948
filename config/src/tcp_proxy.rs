//! The `tcp_proxy` network filter: which cluster (or weighted clusters) takes a connection,
//! how often to try connecting, and when an idle connection closes.

use std::time::Duration;

use xds_api::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_pb;

use crate::common::timeout_or;
use crate::error::{ConfigResult, err, field, item};
use crate::unsupported;

#[derive(Debug, Clone)]
pub struct WeightedName {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub enum TcpClusters {
    One(String),
    Weighted(Vec<WeightedName>),
}

impl TcpClusters {
    pub fn names(&self) -> Vec<&str> {
        match self {
            TcpClusters::One(name) => vec![name.as_str()],
            TcpClusters::Weighted(list) => list.iter().map(|w| w.name.as_str()).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TcpProxy {
    pub stat_prefix: String,
    pub clusters: TcpClusters,
    /// `None`: disabled (Envoy's 0s); default 1 h.
    pub idle_timeout: Option<Duration>,
    pub max_connect_attempts: u32,
    /// One line per connection, written when it closes.
    pub access_logs: Vec<crate::access_log::AccessLogConfig>,
}

pub fn tcp_proxy(proto: &tcp_pb::TcpProxy, path: &str) -> ConfigResult<TcpProxy> {
    let tcp_pb::TcpProxy {
        stat_prefix,
        metadata_match,
        idle_timeout,
        downstream_idle_timeout,
        upstream_idle_timeout,
        access_log,
        max_connect_attempts,
        hash_policy,
        max_downstream_connection_duration,
        max_downstream_connection_duration_jitter_percentage,
        cluster_specifier,
    } = proto;
    unsupported!(
        path,
        metadata_match,
        downstream_idle_timeout,
        upstream_idle_timeout,
        hash_policy,
        max_downstream_connection_duration,
        max_downstream_connection_duration_jitter_percentage,
    );
    if stat_prefix.is_empty() {
        return err(field(path, "stat_prefix"), "must not be empty");
    }
    let clusters = match cluster_specifier {
        Some(tcp_pb::tcp_proxy::ClusterSpecifier::Cluster(name)) if !name.is_empty() => {
            TcpClusters::One(name.clone())
        }
        Some(tcp_pb::tcp_proxy::ClusterSpecifier::Cluster(_)) => {
            return err(field(path, "cluster"), "must not be empty");
        }
        Some(tcp_pb::tcp_proxy::ClusterSpecifier::WeightedClusters(
            tcp_pb::tcp_proxy::WeightedCluster { clusters },
        )) => {
            let wpath = field(path, "weighted_clusters");
            if clusters.is_empty() {
                return err(
                    field(&wpath, "clusters"),
                    "at least one cluster is required",
                );
            }
            let mut list = Vec::new();
            for (i, c) in clusters.iter().enumerate() {
                let cpath = item(&wpath, "clusters", i);
                let tcp_pb::tcp_proxy::weighted_cluster::ClusterWeight {
                    name,
                    weight,
                    metadata_match,
                } = c;
                unsupported!(&cpath, metadata_match);
                if *weight == 0 {
                    return err(field(&cpath, "weight"), "must be ≥ 1");
                }
                list.push(WeightedName {
                    name: name.clone(),
                    weight: *weight,
                });
            }
            TcpClusters::Weighted(list)
        }
        None => return err(path, "cluster or weighted_clusters is required"),
    };
    Ok(TcpProxy {
        stat_prefix: stat_prefix.clone(),
        clusters,
        idle_timeout: timeout_or(
            idle_timeout,
            &field(path, "idle_timeout"),
            Some(Duration::from_secs(3600)),
        )?,
        max_connect_attempts: max_connect_attempts.unwrap_or(1).max(1),
        access_logs: access_log
            .iter()
            .enumerate()
            .map(|(i, log)| {
                crate::access_log::access_log(log, &crate::error::item(path, "access_log", i))
            })
            .collect::<ConfigResult<_>>()?,
    })
}
