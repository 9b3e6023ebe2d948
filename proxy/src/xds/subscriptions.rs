//! Which named resources the proxy needs: the EDS service names of its EDS clusters (active
//! and warming) and the RDS route configurations of its listeners (active and warming).

use std::collections::BTreeSet;

use super::apply::{Applier, route_names};
use crate::config::DiscoveryType;

/// The names wanted now, per named type.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub endpoints: BTreeSet<String>,
    pub routes: BTreeSet<String>,
}

pub fn wanted(applier: &Applier) -> Wanted {
    let snapshot = applier.context.store.load();
    let endpoints = snapshot
        .clusters
        .values()
        .chain(applier.warming.clusters())
        .filter_map(|cluster| match &cluster.config.discovery {
            DiscoveryType::Eds { service_name, .. } => Some(service_name.clone()),
            _ => None,
        })
        .collect();
    let mut routes = BTreeSet::new();
    for listener in applier.context.listeners.list() {
        routes.extend(route_names(&listener.config));
    }
    for listener in applier.warming.listeners() {
        routes.extend(route_names(listener));
    }
    Wanted { endpoints, routes }
}
