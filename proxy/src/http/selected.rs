//! The route a request was matched to, as the filters, the router and the tracer read it.

use std::sync::Arc;

use http::HeaderMap;
use remora_config::filters::{PerRouteConfig, find};
use remora_config::route::{PseudoHeaders, Route, VirtualHost};

use crate::config::RouteTable;

/// The route a request was matched to: indexes into a table the stream holds.
#[derive(Debug, Clone)]
pub struct Selected {
    pub table: Arc<RouteTable>,
    vhost: usize,
    route: usize,
}

impl Selected {
    /// The first route matching the request, if any.
    pub fn find(
        table: Arc<RouteTable>,
        host: &str,
        path_and_query: &str,
        pseudo: &PseudoHeaders<'_>,
        headers: &HeaderMap,
    ) -> Option<Selected> {
        let (vhost, route) = table.find_request(host, path_and_query, pseudo, headers)?;
        Some(Selected {
            table,
            vhost,
            route,
        })
    }

    pub fn vhost(&self) -> &VirtualHost {
        &self.table.vhosts[self.vhost]
    }

    pub fn route(&self) -> &Route {
        &self.vhost().routes[self.route]
    }

    /// The per-route configs of filter `name`: route, virtual host, route configuration.
    pub fn per_route(&self, name: &str) -> [Option<&PerRouteConfig>; 3] {
        [
            find(&self.route().per_filter, name),
            find(&self.vhost().per_filter, name),
            find(&self.table.per_filter, name),
        ]
    }
}
