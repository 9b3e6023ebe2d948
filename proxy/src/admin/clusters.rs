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

/// Envoy's `health_flags`: `healthy`, or one `/flag` per reason the host is not, in the order
/// of Envoy's flag bits.
fn health_flags(host: &Host) -> String {
    let runtime = host.state.flags();
    let eds = host.eds_health;
    let flags = [
        (
            runtime & HostState::FAILED_ACTIVE_HC != 0,
            "/failed_active_hc",
        ),
        (
            runtime & HostState::FAILED_OUTLIER_CHECK != 0,
            "/failed_outlier_check",
        ),
        (
            matches!(eds, HealthStatus::Unhealthy | HealthStatus::Timeout),
            "/failed_eds_health",
        ),
        (
            runtime & HostState::DEGRADED_ACTIVE_HC != 0,
            "/degraded_active_hc",
        ),
        (eds == HealthStatus::Degraded, "/degraded_eds_health"),
        (
            runtime & HostState::PENDING_DYNAMIC_REMOVAL != 0,
            "/pending_dynamic_removal",
        ),
        (
            runtime & HostState::PENDING_ACTIVE_HC != 0,
            "/pending_active_hc",
        ),
        (
            runtime & HostState::EXCLUDED_VIA_IMMEDIATE_HC_FAIL != 0,
            "/excluded_via_immediate_hc_fail",
        ),
        (
            runtime & HostState::ACTIVE_HC_TIMEOUT != 0,
            "/active_hc_timeout",
        ),
        (eds == HealthStatus::Draining, "/eds_status_draining"),
    ];
    let text: String = flags
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
    if text.is_empty() {
        "healthy".to_string()
    } else {
        text
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

pub fn clusters_text(server: &Context) -> String {
    let mut out = String::new();
    for (cluster, added_via_api) in sorted_clusters(server) {
        let name = &cluster.config.name;
        let _ = writeln!(out, "{name}::observability_name::{name}");
        if let Some(outlier) = cluster.outlier_stats() {
            let (average, threshold) = outlier.rates(false);
            let (local_average, local_threshold) = outlier.rates(true);
            let _ = writeln!(out, "{name}::outlier::success_rate_average::{average}");
            let _ = writeln!(
                out,
                "{name}::outlier::success_rate_ejection_threshold::{threshold}"
            );
            let _ = writeln!(
                out,
                "{name}::outlier::local_origin_success_rate_average::{local_average}"
            );
            let _ = writeln!(
                out,
                "{name}::outlier::local_origin_success_rate_ejection_threshold::{local_threshold}"
            );
        }
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
            // -1: not computed (no outlier detection, or too few requests last interval).
            let (external, local) = host.state.outlier.success_rates();
            let _ = writeln!(out, "{prefix}::success_rate::{external}");
            let _ = writeln!(out, "{prefix}::local_origin_success_rate::{local}");
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
            if let Some(outlier) = cluster.outlier_stats() {
                let (_, threshold) = outlier.rates(false);
                let (_, local_threshold) = outlier.rates(true);
                if threshold >= 0.0 {
                    status["success_rate_ejection_threshold"] = json!({ "value": threshold });
                }
                if local_threshold >= 0.0 {
                    status["local_origin_success_rate_ejection_threshold"] =
                        json!({ "value": local_threshold });
                }
            }
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
    let (external, local) = host.state.outlier.success_rates();
    if external >= 0.0 {
        status["success_rate"] = json!({ "value": external });
    }
    if local >= 0.0 {
        status["local_origin_success_rate"] = json!({ "value": local });
    }
    status
}

/// `HostHealthStatus` as proto3 JSON: the EDS status, and the runtime failures when set.
fn health_status_json(host: &Host) -> Value {
    let mut status = json!({"eds_health_status": eds_health_status(host.eds_health)});
    let runtime = host.state.flags();
    for (flag, name) in [
        (HostState::FAILED_ACTIVE_HC, "failed_active_health_check"),
        (HostState::FAILED_OUTLIER_CHECK, "failed_outlier_check"),
        (
            HostState::DEGRADED_ACTIVE_HC,
            "failed_active_degraded_check",
        ),
        (
            HostState::PENDING_DYNAMIC_REMOVAL,
            "pending_dynamic_removal",
        ),
        (HostState::PENDING_ACTIVE_HC, "pending_active_hc"),
        (
            HostState::EXCLUDED_VIA_IMMEDIATE_HC_FAIL,
            "excluded_via_immediate_hc_fail",
        ),
        (HostState::ACTIVE_HC_TIMEOUT, "active_hc_timeout"),
    ] {
        if runtime & flag != 0 {
            status[name] = Value::Bool(true);
        }
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
