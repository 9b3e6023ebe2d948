//! The RBAC HTTP filter's config (`envoy.filters.http.rbac`, `RBAC`): enforced rules and shadow
//! rules (evaluated and counted, never enforced), each optional, and the prefixes their stats
//! take. A route's `RBACPerRoute` replaces both rule sets for that route; one without `rbac`
//! turns the filter off there, as Envoy documents. The rules themselves are read by
//! [`crate::rbac`].

use xds_api::envoy::extensions::filters::http::rbac::v3 as rbac_pb;

use crate::common::unpack;
use crate::error::{ConfigResult, field};
use crate::rbac::{Layer, Rbac, rbac};
use crate::unsupported;

pub const TYPE_URL: &str = xds_api::type_urls::HTTP_RBAC;
pub const PER_ROUTE_TYPE_URL: &str = xds_api::type_urls::HTTP_RBAC_PER_ROUTE;

/// The filter's config, or a route's replacement for it.
#[derive(Debug, Clone, Default)]
pub struct HttpRbac {
    /// `None`: every request is let through, uncounted.
    pub rules: Option<Rbac>,
    pub shadow_rules: Option<Rbac>,
    /// Placed between `rbac.` and `allowed`/`denied`.
    pub rules_stat_prefix: String,
    /// Placed between `rbac.` and `shadow_allowed`/`shadow_denied`.
    pub shadow_rules_stat_prefix: String,
}

fn read(proto: &rbac_pb::Rbac, path: &str) -> ConfigResult<HttpRbac> {
    let rbac_pb::Rbac {
        rules,
        rules_stat_prefix,
        matcher,
        shadow_rules,
        shadow_matcher,
        shadow_rules_stat_prefix,
        track_per_rule_stats,
    } = proto;
    unsupported!(path, matcher, shadow_matcher, track_per_rule_stats);
    Ok(HttpRbac {
        rules: rules
            .as_ref()
            .map(|r| rbac(r, &field(path, "rules"), Layer::Http))
            .transpose()?,
        shadow_rules: shadow_rules
            .as_ref()
            .map(|r| rbac(r, &field(path, "shadow_rules"), Layer::Http))
            .transpose()?,
        rules_stat_prefix: rules_stat_prefix.clone(),
        shadow_rules_stat_prefix: shadow_rules_stat_prefix.clone(),
    })
}

pub fn filter(any: &prost_types::Any, path: &str) -> ConfigResult<HttpRbac> {
    read(&unpack(any, path)?, path)
}

/// A route's `RBACPerRoute`. Its stat prefixes are read but, as in Envoy, stats keep the
/// filter's own.
pub fn per_route(any: &prost_types::Any, path: &str) -> ConfigResult<HttpRbac> {
    let rbac_pb::RbacPerRoute { rbac } = unpack(any, path)?;
    match &rbac {
        Some(config) => read(config, &field(path, "rbac")),
        None => Ok(HttpRbac::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter_of(yaml: &str) -> ConfigResult<HttpRbac> {
        let proto: rbac_pb::Rbac = xds_api::json::from_yaml_str(yaml).expect("yaml");
        filter(&xds_api::any::pack(&proto), "f")
    }

    #[test]
    fn rules_and_prefixes_are_read() {
        let config = filter_of(
            r#"
rules_stat_prefix: enforced_
shadow_rules_stat_prefix: shadow_
rules: {action: DENY, policies: {p: {permissions: [{url_path: {path: {prefix: /x}}}], principals: [{any: true}]}}}
shadow_rules: {action: ALLOW}
"#,
        )
        .unwrap();
        assert_eq!(config.rules_stat_prefix, "enforced_");
        assert_eq!(config.shadow_rules_stat_prefix, "shadow_");
        assert_eq!(config.rules.unwrap().policies.len(), 1);
        assert!(config.shadow_rules.is_some());
        // No rules at all is valid: the filter lets everything through.
        let empty = filter_of("{}").unwrap();
        assert!(empty.rules.is_none() && empty.shadow_rules.is_none());
    }

    #[test]
    fn matcher_api_and_per_rule_stats_are_refused_by_name() {
        assert_eq!(filter_of("matcher: {}").unwrap_err().path, "f.matcher");
        assert_eq!(
            filter_of("shadow_matcher: {}").unwrap_err().path,
            "f.shadow_matcher"
        );
        assert_eq!(
            filter_of("track_per_rule_stats: true").unwrap_err().path,
            "f.track_per_rule_stats"
        );
        // CEL conditions are not in our proto: the reader names the field.
        let error = xds_api::json::from_yaml_str::<rbac_pb::Rbac>(
            "rules: {policies: {p: {permissions: [{any: true}], principals: [{any: true}], condition: {}}}}",
        )
        .unwrap_err();
        assert!(error.to_string().contains("condition"), "{error}");
    }

    #[test]
    fn a_route_without_rbac_turns_the_filter_off() {
        let off = per_route(
            &xds_api::any::pack(&rbac_pb::RbacPerRoute { rbac: None }),
            "r",
        )
        .unwrap();
        assert!(off.rules.is_none() && off.shadow_rules.is_none());
        let proto: rbac_pb::RbacPerRoute =
            xds_api::json::from_yaml_str("rbac: {rules: {audit_logging_options: {}}}").unwrap();
        let error = per_route(&xds_api::any::pack(&proto), "r").unwrap_err();
        assert_eq!(error.path, "r.rbac.rules.audit_logging_options");
    }
}
