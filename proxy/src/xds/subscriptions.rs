//! Which named resources the proxy needs: the EDS service names of its EDS clusters (active
//! and warming), the RDS route configurations of its listeners (active and warming), and the
//! SDS secrets over ADS that either names or a static listener or cluster names.

use std::collections::BTreeSet;

use super::apply::{Applier, route_names};
use crate::config::{DiscoveryType, SecretSource};

/// The names wanted now, per named type.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub endpoints: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    pub secrets: BTreeSet<String>,
}

pub fn wanted(applier: &Applier) -> Wanted {
    let snapshot = applier.context.store.load();
    let clusters = || snapshot.clusters.values().chain(applier.warming.clusters());
    let mut secrets: BTreeSet<String> = clusters()
        .flat_map(|cluster| cluster.config.connect.sds_secrets())
        .filter(|sds| sds.source == SecretSource::Ads)
        .map(|sds| sds.name.clone())
        .chain(applier.context.static_secrets.iter().cloned())
        .collect();
    let endpoints = clusters()
        .filter_map(|cluster| match &cluster.config.discovery {
            DiscoveryType::Eds { service_name, .. } => Some(service_name.clone()),
            _ => None,
        })
        .collect();
    let mut routes = BTreeSet::new();
    let active = applier.context.listeners.list();
    let listeners = active
        .iter()
        .map(|l| &*l.config)
        .chain(applier.warming.listeners().map(|l| &**l));
    for listener in listeners {
        routes.extend(route_names(listener));
        secrets.extend(
            listener
                .sds_secrets()
                .filter(|sds| sds.source == SecretSource::Ads)
                .map(|sds| sds.name.clone()),
        );
    }
    // A secret made here by certificate request is not asked of SDS.
    if let Some(made_here) = &applier.context.identity.csr_secret {
        secrets.remove(made_here);
    }
    Wanted {
        endpoints,
        routes,
        secrets,
    }
}

/// The stat prefix of the first connection manager (of an active listener, else a warming one)
/// that asks for route table `name`: its RDS stats go under `http.PREFIX.rds.NAME`, as the
/// first one's do in Envoy, which shares one subscription among them.
pub fn route_stat_prefix(applier: &Applier, name: &str) -> Option<String> {
    let active = applier.context.listeners.list();
    active
        .iter()
        .map(|l| &*l.config)
        .chain(applier.warming.listeners().map(|l| &**l))
        .flat_map(|listener| listener.connection_managers())
        .find(|hcm| hcm.rds_name() == Some(name))
        .map(|hcm| hcm.stat_prefix.clone())
}
