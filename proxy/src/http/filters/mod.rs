//! The HTTP filters Remora runs, built from their configs (`remora_config::filters`): one file
//! per filter and one line per filter in [`build`]. The router is not here: it is the chain's
//! terminal stage, in `http::router`.

mod cors;

use std::sync::Arc;

use remora_config::filters::{FilterConfig, HttpFilter as FilterSpec};

use crate::http::filter::{FilterChain, HttpFilter};

/// The runtime filters of an HCM's `http_filters`, in order, without the router.
pub fn build(specs: &[FilterSpec]) -> FilterChain {
    let mut filters: Vec<Arc<dyn HttpFilter>> = Vec::new();
    for spec in specs {
        match &spec.config {
            FilterConfig::Cors(_) => filters.push(Arc::new(cors::Cors::new(&spec.name))),
            FilterConfig::Router(_) => {}
        }
    }
    FilterChain::new(filters)
}
