//! `/clusters` and `/listeners`, in Envoy's text and `?format=json` shapes: tools written
//! for Envoy (istioctl, dashboards, scripts) read them line by line or as
//! `envoy.admin.v3.Clusters` / `envoy.admin.v3.Listeners` JSON.

use std::fmt::Write;
use std::net::SocketAddr;

use serde_json::{Map, Value, json};

use crate::cluster::ClusterRuntime;
use crate::config::{HealthStatus, Thresholds};
use crate::lb::Host;
use crate::server::Server;
use crate::stats::Kind;

/// The clusters sorted by name, each with whether it came over xDS.
fn sorted_clusters(server: &Server) -> Vec<(std::sync::Arc<ClusterRuntime>, bool)> {
    let clusters = server.clusters.all();
    let mut sorted: Vec<_> = clusters
        .iter()
        .map(|(name, cluster)| (cluster.clone(), !server.is_static_cluster(name)))
        .collect();
    sorted.sort_by(|a, b| a.0.config.name.cmp(&b.0.config.name));
    sorted
}

/// Envoy's `health_flags`: `healthy`, or one `/flag` per reason the host is not.
fn health_flags(health: HealthStatus) -> &'static str {
    match health {
        HealthStatus::Unknown | HealthStatus::Healthy => "healthy",
        HealthStatus::Unhealthy | HealthStatus::Timeout => "/failed_eds_health",
        HealthStatus::Draining => "/eds_status_draining",
        HealthStatus::Degraded => "/degraded_eds_health",
    }
}

/// Envoy reports an endpoint without an EDS health status as HEALTHY, and TIMEOUT as the
/// UNHEALTHY it is treated as.
fn eds_health_status(health: HealthStatus) -> &'static str {
    match health {
        HealthStatus::Unknown => HealthStatus::Healthy.name(),
        HealthStatus::Timeout => HealthStatus::Unhealthy.name(),
        other => other.name(),
    }
}

pub fn clusters_text(server: &Server) -> String {
    let mut out = String::new();
    for (cluster, added_via_api) in sorted_clusters(server) {
        let name = &cluster.config.name;
        let _ = writeln!(out, "{name}::observability_name::{name}");
        for (priority, t) in [
            ("default_priority", &cluster.config.thresholds),
            ("high_priority", &cluster.config.thresholds_high),
        ] {
            let _ = writeln!(
                out,
                "{name}::{priority}::max_connections::{}",
                t.max_connections
            );
            let _ = writeln!(
                out,
                "{name}::{priority}::max_pending_requests::{}",
                t.max_pending_requests
            );
            let _ = writeln!(out, "{name}::{priority}::max_requests::{}", t.max_requests);
            let _ = writeln!(out, "{name}::{priority}::max_retries::{}", t.max_retries);
        }
        let _ = writeln!(out, "{name}::added_via_api::{added_via_api}");
        for host in cluster.endpoints.load().all_hosts() {
            let prefix = format!("{name}::{}", host.addr);
            for (stat, _, value) in host.stats.list() {
                let _ = writeln!(out, "{prefix}::{stat}::{value}");
            }
            let _ = writeln!(out, "{prefix}::hostname::{}", host.hostname);
            let _ = writeln!(out, "{prefix}::health_flags::{}", health_flags(host.health));
            let _ = writeln!(out, "{prefix}::weight::{}", host.weight);
            // No localities yet: Envoy prints them empty for endpoints without one.
            for field in ["region", "zone", "sub_zone"] {
                let _ = writeln!(out, "{prefix}::{field}::");
            }
            let _ = writeln!(out, "{prefix}::canary::false");
            let _ = writeln!(out, "{prefix}::priority::{}", host.priority);
            // No outlier detection yet: Envoy's "not computed" value.
            let _ = writeln!(out, "{prefix}::success_rate::-1");
            let _ = writeln!(out, "{prefix}::local_origin_success_rate::-1");
        }
    }
    out
}

pub fn clusters_json(server: &Server) -> Value {
    let statuses: Vec<Value> = sorted_clusters(server)
        .into_iter()
        .map(|(cluster, added_via_api)| {
            let name = &cluster.config.name;
            let hosts: Vec<Value> = cluster
                .endpoints
                .load()
                .all_hosts()
                .map(|host| host_json(host))
                .collect();
            let mut status = json!({
                "name": name,
                "observability_name": name,
                "host_statuses": hosts,
                "circuit_breakers": {"thresholds": [
                    thresholds_json(&cluster.config.thresholds, None),
                    thresholds_json(&cluster.config.thresholds_high, Some("HIGH")),
                ]},
            });
            // proto3 JSON leaves out false.
            if added_via_api {
                status["added_via_api"] = Value::Bool(true);
            }
            status
        })
        .collect();
    json!({ "cluster_statuses": statuses })
}

fn thresholds_json(t: &Thresholds, priority: Option<&str>) -> Value {
    let mut value = json!({
        "max_connections": t.max_connections,
        "max_pending_requests": t.max_pending_requests,
        "max_requests": t.max_requests,
        "max_retries": t.max_retries,
    });
    if let Some(priority) = priority {
        value["priority"] = Value::from(priority);
    }
    value
}

/// One `HostStatus`: its stats are counters first, then gauges (typed), a zero value left
/// out as proto3 JSON does.
fn host_json(host: &Host) -> Value {
    let listed = host.stats.list();
    let stats: Vec<Value> = [Kind::Counter, Kind::Gauge]
        .iter()
        .flat_map(|wanted| listed.iter().filter(move |(_, kind, _)| kind == wanted))
        .map(|(name, kind, value)| {
            let mut stat = Map::new();
            if *kind == Kind::Gauge {
                stat.insert("type".into(), Value::from("GAUGE"));
            }
            stat.insert("name".into(), Value::from(*name));
            // uint64 in proto3 JSON is a string.
            if *value != 0 {
                stat.insert("value".into(), Value::from(value.to_string()));
            }
            Value::Object(stat)
        })
        .collect();
    let mut status = json!({
        "address": socket_address_json(host.addr),
        "stats": stats,
        "health_status": {"eds_health_status": eds_health_status(host.health)},
        "weight": host.weight,
        "locality": {},
    });
    if !host.hostname.is_empty() {
        status["hostname"] = Value::from(host.hostname.as_str());
    }
    if host.priority != 0 {
        status["priority"] = Value::from(host.priority);
    }
    status
}

fn socket_address_json(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

pub fn listeners_text(server: &Server) -> String {
    server
        .listeners
        .list()
        .iter()
        .map(|l| format!("{}::{}\n", l.config.name, l.local_addr))
        .collect()
}

pub fn listeners_json(server: &Server) -> Value {
    let statuses: Vec<Value> = server
        .listeners
        .list()
        .iter()
        .map(|l| json!({"name": l.config.name, "local_address": socket_address_json(l.local_addr)}))
        .collect();
    json!({ "listener_statuses": statuses })
}
