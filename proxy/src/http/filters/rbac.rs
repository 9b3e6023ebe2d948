//! The RBAC HTTP filter (`envoy.filters.http.rbac`), as Envoy runs it on request headers: the
//! shadow rules are evaluated and counted on every request, then the enforced rules decide; a
//! denied request is answered 403 `RBAC: access denied` (no response flag, as Envoy 1.40 logs
//! it). A route's `RBACPerRoute` (most specific wins) replaces both rule sets; one without
//! `rbac` turns the filter off for the route. Stats keep the filter's own names:
//! `http.PREFIX.rbac.RULES_PREFIX.{allowed,denied}` and
//! `http.PREFIX.rbac.SHADOW_PREFIX.{shadow_allowed,shadow_denied}` (no dot after an empty
//! prefix).

use std::sync::Arc;

use http::StatusCode;
use remora_config::filters::PerRouteConfig;
use remora_config::filters::rbac::HttpRbac;
use remora_config::rbac::RequestHead;

use super::most_specific;
use crate::http::filter::{Flow, HttpFilter, Stream};
use crate::http::local_reply::LocalReply;
use crate::network_filters::rbac::{RbacStats, access_request};
use crate::stats::Registry;

const DENIED_BODY: &str = "RBAC: access denied";

/// The filter, under its configured name (its per-route configs' key).
#[derive(Debug)]
pub struct Rbac {
    name: String,
    config: Arc<HttpRbac>,
    stats: RbacStats,
}

impl Rbac {
    pub fn new(name: &str, config: Arc<HttpRbac>, registry: &Registry, stat_prefix: &str) -> Self {
        let stats = RbacStats::new(
            registry,
            &format!("http.{stat_prefix}."),
            &config.rules_stat_prefix,
            &config.shadow_rules_stat_prefix,
        );
        Rbac {
            name: name.to_string(),
            config,
            stats,
        }
    }
}

impl HttpFilter for Rbac {
    fn on_request(&self, stream: &mut Stream<'_>) -> Flow {
        let config: &HttpRbac = most_specific(stream, &self.name, |config| match config {
            PerRouteConfig::Rbac(config) => Some(config.as_ref()),
            _ => None,
        })
        .unwrap_or(&self.config);
        if config.rules.is_none() && config.shadow_rules.is_none() {
            return Flow::Continue;
        }
        let head = RequestHead {
            pseudo: stream.pseudo_headers(),
            headers: &stream.request.headers,
        };
        let facts = access_request(stream.downstream, stream.client, Some(head));
        let decision =
            self.stats
                .decide(config.rules.as_ref(), config.shadow_rules.as_ref(), &facts);
        if decision.allowed {
            return Flow::Continue;
        }
        let mut reply = LocalReply::new(StatusCode::FORBIDDEN).with_body(DENIED_BODY);
        // Envoy's response code details.
        reply.details = format!(
            "rbac_access_denied_matched_policy[{}]",
            decision.policy.unwrap_or("none")
        )
        .into();
        Flow::Reply(reply)
    }
}
