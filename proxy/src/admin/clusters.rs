//! `/clusters` and `/listeners`, in Envoy's text and `?format=json` shapes: tools written
//! for Envoy (istioctl, dashboards, scripts) read them line by line or as
//! `envoy.admin.v3.Clusters` / `envoy.admin.v3.Listeners` JSON.

use std::fmt::Write;
use std::net::SocketAddr;

use serde_json::{Map, Value, json};

use super::Context;
use crate::config::{HealthStatus, Thresholds};
use crate::stats::Kind;
use crate::upstream::{Cluster, Host, HostState};

/// The clusters sorted by name, each with whether it came over xDS.
fn sorted_clusters(server: &Context) -> Vec<(std::sync::Arc<Cluster>, bool)> {
    let snapshot = server.store.load();
    let clusters = &snapshot.clusters;
    let mut sorted: Vec<_> = clusters
        .iter()
        .map(|(name, cluster)| (cluster.clone(), !server.is_static_cluster(name)))
        .collect();
    sorted.sort_by(|a, b| a.0.config.name.cmp(&b.0.config.name));
    sorted
}

/// Envoy's `health_flags`: `healthy`, or one `/flag` per reason the host is not, in Envoy's
/// order.
fn health_flags(host: &Host) -> String {
    let mut flags = String::new();
    let runtime = host.state.flags();
    if runtime & HostState::FAILED_ACTIVE_HC != 0 {
        flags.push_str("/failed_active_hc");
    }
    if runtime & HostState::FAILED_OUTLIER_CHECK != 0 {
        flags.push_str("/failed_outlier_check");
    }
    flags.push_str(match host.eds_health {
        HealthStatus::Unknown | HealthStatus::Healthy => "",
        HealthStatus::Unhealthy | HealthStatus::Timeout => "/failed_eds_health",
        HealthStatus::Draining => "/eds_status_draining",
        HealthStatus::Degraded => "/degraded_eds_health",
    });
    if flags.is_empty() {
        flags.push_str("healthy");
    }
    flags
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

pub fn clusters_text(server: &Context) -> String {
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
        for host in &cluster.members.set().hosts {
            let prefix = format!("{name}::{}", host.addr);
            for (stat, _, value) in host.stats().list() {
                let _ = writeln!(out, "{prefix}::{stat}::{value}");
            }
            let _ = writeln!(out, "{prefix}::hostname::{}", host.hostname);
            let _ = writeln!(out, "{prefix}::health_flags::{}", health_flags(host));
            let _ = writeln!(out, "{prefix}::weight::{}", host.weight);
            let locality = &host.locality;
            let _ = writeln!(out, "{prefix}::region::{}", locality.region);
            let _ = writeln!(out, "{prefix}::zone::{}", locality.zone);
            let _ = writeln!(out, "{prefix}::sub_zone::{}", locality.sub_zone);
            let _ = writeln!(out, "{prefix}::canary::false");
            let _ = writeln!(out, "{prefix}::priority::{}", host.priority);
            // No outlier detection yet: Envoy's "not computed" value.
            let _ = writeln!(out, "{prefix}::success_rate::-1");
            let _ = writeln!(out, "{prefix}::local_origin_success_rate::-1");
        }
    }
    out
}

pub fn clusters_json(server: &Context) -> Value {
    let statuses: Vec<Value> = sorted_clusters(server)
        .into_iter()
        .map(|(cluster, added_via_api)| {
            let name = &cluster.config.name;
            let hosts: Vec<Value> = cluster
                .members
                .set()
                .hosts
                .iter()
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
    let listed = host.stats().list();
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
        "health_status": health_status_json(host),
        "weight": host.weight,
        "locality": locality_json(&host.locality),
    });
    if !host.hostname.is_empty() {
        status["hostname"] = Value::from(host.hostname.as_str());
    }
    if host.priority != 0 {
        status["priority"] = Value::from(host.priority);
    }
    status
}

/// `HostHealthStatus` as proto3 JSON: the EDS status, and the runtime failures when set.
fn health_status_json(host: &Host) -> Value {
    let mut status = json!({"eds_health_status": eds_health_status(host.eds_health)});
    let runtime = host.state.flags();
    if runtime & HostState::FAILED_ACTIVE_HC != 0 {
        status["failed_active_health_check"] = Value::Bool(true);
    }
    if runtime & HostState::FAILED_OUTLIER_CHECK != 0 {
        status["failed_outlier_check"] = Value::Bool(true);
    }
    status
}

/// A `Locality` as proto3 JSON (empty fields left out).
fn locality_json(locality: &crate::config::Locality) -> Value {
    let mut value = Map::new();
    for (key, field) in [
        ("region", &locality.region),
        ("zone", &locality.zone),
        ("sub_zone", &locality.sub_zone),
    ] {
        if !field.is_empty() {
            value.insert(key.into(), Value::from(field.as_str()));
        }
    }
    Value::Object(value)
}

fn socket_address_json(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

pub fn listeners_text(server: &Context) -> String {
    server
        .listeners
        .list()
        .iter()
        .map(|l| format!("{}::{}\n", l.config.name, l.local_addr))
        .collect()
}

pub fn listeners_json(server: &Context) -> Value {
    let statuses: Vec<Value> = server
        .listeners
        .list()
        .iter()
        .map(|l| json!({"name": l.config.name, "local_address": socket_address_json(l.local_addr)}))
        .collect();
    json!({ "listener_statuses": statuses })
}
