//! Route configurations: header mutations and domains, virtual hosts, routes and their
//! matchers, route actions (forward, weighted clusters, rewrites, timeouts, upgrades),
//! redirects and direct responses.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use remora_config::common::AppendAction;
use remora_config::hcm::RouteSource;
use remora_config::route::{
    Action, ClusterSpec, Files, Forward, HostRewrite, PathMatch, RouteTable,
};

use crate::hcm::hcm;
use crate::support::*;

pub fn routes(bootstrap: &remora_config::bootstrap::Bootstrap) -> Arc<RouteTable> {
    match hcm(bootstrap).routes {
        RouteSource::Inline(table) => table,
        RouteSource::Rds { .. } => panic!("inline routes"),
    }
}

fn forward(table: &RouteTable) -> &Forward {
    match &table.vhosts[0].routes[0].action {
        Action::Forward(forward) => forward,
        other => panic!("a forward action, not {other:?}"),
    }
}

#[test]
fn route_configuration_fields_are_refused_by_path() {
    check_rejections(
        ROUTES,
        &[
            (
                "internal_only_headers: [x-internal]",
                "internal_only_headers",
                UNSUPPORTED,
            ),
            (
                "max_direct_response_body_size_bytes: 10",
                "max_direct_response_body_size_bytes",
                UNSUPPORTED,
            ),
            (
                "ignore_path_parameters_in_path_matching: true",
                "ignore_path_parameters_in_path_matching",
                UNSUPPORTED,
            ),
            (
                "metadata: {filter_metadata: {a: {}}}",
                "metadata",
                UNSUPPORTED,
            ),
            (
                "request_headers_to_remove: [x-ok, \":path\"]",
                "request_headers_to_remove[1]",
                "pseudo-headers and host cannot be removed",
            ),
            (
                "response_headers_to_remove: [Host]",
                "response_headers_to_remove[0]",
                "pseudo-headers and host cannot be removed",
            ),
            (
                "request_headers_to_remove: [\"bad name\"]",
                "request_headers_to_remove[0]",
                "\"bad name\" is not a valid header name",
            ),
            (
                "response_headers_to_add: [{header: {key: \":status\", value: \"1\"}}]",
                "response_headers_to_add[0].header.key",
                "pseudo-headers and host cannot be added",
            ),
            (
                "request_headers_to_add: [{header: {key: x-client, value: \"%DOWNSTREAM_REMOTE_ADDRESS%\"}}]",
                "request_headers_to_add[0].header.value",
                "header value substitutions (%...%) are not supported",
            ),
            (
                "request_headers_to_add: [{header: {key: x, value: \"a\\nb\"}}]",
                "request_headers_to_add[0].header.value",
                "not a valid header value",
            ),
            (
                "request_headers_to_add: [{header: {key: x, value: v}, append: true, append_action: ADD_IF_ABSENT}]",
                "request_headers_to_add[0].append",
                "set append or append_action, not both (append is deprecated)",
            ),
            (
                "request_headers_to_add: [{header: {key: Host, value: v}}]",
                "request_headers_to_add[0].header.key",
                "pseudo-headers and host cannot be added",
            ),
            (
                "request_headers_to_add: [{header: {key: x, raw_value: YQ==}}]",
                "request_headers_to_add[0].header.raw_value",
                UNSUPPORTED,
            ),
            (
                "response_headers_to_add: [{append_action: ADD_IF_ABSENT}]",
                "response_headers_to_add[0].header",
                "required",
            ),
            (
                "virtual_hosts: [{}, {name: other, domains: [a.example, \"*\"]}]",
                "virtual_hosts[1].domains[1]",
                "domain \"*\" appears in more than one virtual host",
            ),
            (
                "virtual_hosts: [{domains: [A.example]}, {name: other, domains: [a.EXAMPLE]}]",
                "virtual_hosts[1].domains[0]",
                "domain \"a.example\" appears in more than one virtual host",
            ),
            (
                "virtual_hosts: [{domains: [\"a*b.example\"]}]",
                "virtual_hosts[0].domains[0]",
                "a wildcard may only be at the start or the end",
            ),
        ],
    );
}

#[test]
fn virtual_host_fields_are_refused_by_path() {
    check_rejections(
        VHOST,
        &[
            ("require_tls: ALL", "require_tls", UNSUPPORTED),
            (
                "retry_policy: {retry_on: \"5xx,bogus\"}",
                "retry_policy.retry_on",
                "\"bogus\" is not a retry condition; known: 5xx",
            ),
            ("hedge_policy: {}", "hedge_policy", UNSUPPORTED),
            (
                "request_mirror_policies: [{}]",
                "request_mirror_policies[0]",
                "exactly one of cluster and cluster_header is required",
            ),
            (
                "metadata: {filter_metadata: {a: {}}}",
                "metadata",
                UNSUPPORTED,
            ),
            ("name: \"\"", "name", "must not be empty"),
            ("domains!: []", "domains", "at least one domain is required"),
            (
                "request_headers_to_remove: [\"\"]",
                "request_headers_to_remove[0]",
                "is not a valid header name",
            ),
        ],
    );
}

#[test]
fn routes_and_matchers_are_refused_by_path() {
    check_rejections(
        ROUTE,
        &[
            (
                "decorator: {operation: \"\"}",
                "decorator.operation",
                "must not be empty",
            ),
            ("stat_prefix: s", "stat_prefix", UNSUPPORTED),
            (
                "metadata: {filter_metadata: {a: {}}}",
                "metadata",
                UNSUPPORTED,
            ),
            ("match: null", "match", "required"),
            (
                "match!: {}",
                "match",
                "a path specifier (prefix, path, safe_regex, path_separated_prefix) is required",
            ),
            (
                "match!: {connect_matcher: {}}",
                "match.connect_matcher",
                "CONNECT requests are not supported",
            ),
            (
                "match!: {safe_regex: {regex: \"(\"}}",
                "match.safe_regex.regex",
                "invalid regex",
            ),
            (
                "match!: {path_separated_prefix: /api/}",
                "match.path_separated_prefix",
                "must not end with '/' or contain '?' or '#'",
            ),
            (
                "match: {runtime_fraction: {default_value: {numerator: 50}}}",
                "match.runtime_fraction",
                UNSUPPORTED,
            ),
            (
                "match: {headers: [{name: \"bad name\", exact_match: x}]}",
                "match.headers[0].name",
                "is not a valid header name",
            ),
            (
                "match: {headers: [{name: x, string_match: {prefix: \"\"}}]}",
                "match.headers[0].string_match",
                "must not be empty",
            ),
            (
                "match: {headers: [{name: x, string_match: {}}]}",
                "match.headers[0].string_match",
                "a match pattern is required",
            ),
            (
                "match: {headers: [{name: x, safe_regex_match: {regex: \"[\"}}]}",
                "match.headers[0].safe_regex_match.regex",
                "invalid regex",
            ),
            (
                "match: {query_parameters: [{name: \"\"}]}",
                "match.query_parameters[0].name",
                "must not be empty",
            ),
            (
                "match: {query_parameters: [{name: q, present_match: false}]}",
                "match.query_parameters[0].present_match",
                "not supported",
            ),
            (
                "match: {query_parameters: [{name: q, string_match: {safe_regex: {regex: \"*\"}}}]}",
                "match.query_parameters[0].string_match.safe_regex.regex",
                "invalid regex",
            ),
            (
                "route: null",
                "",
                "an action (route, redirect, direct_response) is required",
            ),
            (
                "{route: null, non_forwarding_action: {}}",
                "non_forwarding_action",
                "is not supported",
            ),
            (
                "response_headers_to_add: [{header: {key: \"a b\", value: v}}]",
                "response_headers_to_add[0].header.key",
                "not a valid header name",
            ),
        ],
    );
}

#[test]
fn route_actions_are_refused_by_path() {
    check_rejections(
        ROUTE,
        &[
            (
                "route: {retry_policy: {retry_priority: {name: x}}}",
                "route.retry_policy.retry_priority",
                "\"x\" is not supported; Remora offers envoy.retry_priorities.previous_priorities",
            ),
            (
                "route: {hash_policy: [{}]}",
                "route.hash_policy[0]",
                "one of header, cookie, connection_properties, query_parameter or filter_state is required",
            ),
            (
                "route: {request_mirror_policies: [{cluster: echo, trace_sampled: false}]}",
                "route.request_mirror_policies[0].trace_sampled",
                UNSUPPORTED,
            ),
            (
                "route: {hedge_policy: {initial_requests: 2}}",
                "route.hedge_policy",
                UNSUPPORTED,
            ),
            (
                "route: {append_x_forwarded_host: true}",
                "route.append_x_forwarded_host",
                UNSUPPORTED,
            ),
            (
                "route: {metadata_match: {filter_metadata: {a: {}}}}",
                "route.metadata_match",
                UNSUPPORTED,
            ),
            (
                "route: {grpc_timeout_offset: 1s}",
                "route.grpc_timeout_offset",
                "only applies with max_grpc_timeout",
            ),
            (
                "route: {hedge_policy: {}}",
                "route.hedge_policy",
                UNSUPPORTED,
            ),
            (
                "route: {cluster: \"\"}",
                "route",
                "the cluster name must not be empty",
            ),
            (
                "route: {cluster: null}",
                "route",
                "cluster, cluster_header or weighted_clusters is required",
            ),
            (
                "route: {cluster: null, cluster_header: \"bad name\"}",
                "route.cluster_header",
                "is not a valid header name",
            ),
            (
                "{match!: {safe_regex: {regex: \"/a.*\"}}, route: {prefix_rewrite: /b}}",
                "route.prefix_rewrite",
                "cannot be used with a safe_regex match",
            ),
            (
                "route: {prefix_rewrite: /x, regex_rewrite: {pattern: {regex: a}, substitution: b}}",
                "route.regex_rewrite",
                "cannot be used together with prefix_rewrite",
            ),
            (
                "route: {regex_rewrite: {pattern: {regex: \"(\"}, substitution: b}}",
                "route.regex_rewrite.pattern.regex",
                "invalid regex",
            ),
            (
                "route: {regex_rewrite: {substitution: b}}",
                "route.regex_rewrite.pattern",
                "required",
            ),
            (
                "route: {host_rewrite_literal: \"a\\nb\"}",
                "route.host_rewrite_literal",
                "not a valid host",
            ),
            (
                "route: {host_rewrite_header: x-host}",
                "route.host_rewrite_header",
                "is not supported",
            ),
            (
                "route: {host_rewrite_path_regex: {pattern: {regex: a}, substitution: b}}",
                "route.host_rewrite_path_regex",
                "is not supported",
            ),
            (
                "route: {timeout: -1s}",
                "route.timeout",
                "must not be negative",
            ),
            (
                "route: {idle_timeout: -1s}",
                "route.idle_timeout",
                "must not be negative",
            ),
            (
                "route: {cluster_not_found_response_code: 9}",
                "route.cluster_not_found_response_code",
                "unknown value",
            ),
            (
                "route: {upgrade_configs: [{upgrade_type: connect}]}",
                "route.upgrade_configs[0].upgrade_type",
                "CONNECT is not supported",
            ),
            (
                "route: {upgrade_configs: [{upgrade_type: websocket, connect_config: {}}]}",
                "route.upgrade_configs[0].connect_config",
                UNSUPPORTED,
            ),
        ],
    );
}

#[test]
fn weighted_clusters_are_refused_by_path() {
    let weighted = |clusters: &str, extra: &str| {
        format!("route: {{cluster: null, weighted_clusters: {{clusters: {clusters}{extra}}}}}")
    };
    let w = "route.weighted_clusters";
    check_rejections(
        ROUTE,
        &[
            (
                &weighted("[]", ""),
                &format!("{w}.clusters"),
                "at least one cluster is required",
            ),
            (
                &weighted("[{name: echo, weight: 0}]", ""),
                w,
                "the sum of weights must be greater than 0",
            ),
            (
                &weighted("[{name: echo, weight: 1}]", ", total_weight: 100"),
                &format!("{w}.total_weight"),
                UNSUPPORTED,
            ),
            (
                &weighted("[{name: echo, weight: 1}]", ", runtime_key_prefix: r"),
                &format!("{w}.runtime_key_prefix"),
                UNSUPPORTED,
            ),
            (
                &weighted("[{weight: 1}]", ""),
                &format!("{w}.clusters[0].name"),
                "must not be empty",
            ),
            (
                &weighted(
                    "[{name: echo, weight: 1, request_headers_to_add: [{header: {key: a, value: b}}]}]",
                    "",
                ),
                &format!("{w}.clusters[0].request_headers_to_add"),
                UNSUPPORTED,
            ),
            (
                // A oneof member set is named by its oneof (what `unsupported!` sees).
                &weighted("[{name: echo, weight: 1, host_rewrite_literal: h}]", ""),
                &format!("{w}.clusters[0].host_rewrite_specifier"),
                UNSUPPORTED,
            ),
            (
                &weighted("[{name: echo, weight: 1}, {name: gone, weight: 1}]", ""),
                "/static_resources.listeners[0]",
                "route: unknown cluster \"gone\"",
            ),
        ],
    );
}

#[test]
fn redirects_and_direct_responses_are_refused_by_path() {
    check_rejections(
        ROUTE,
        &[
            (
                "{route: null, redirect: {response_code: 9}}",
                "redirect.response_code",
                "unknown value",
            ),
            (
                "{route: null, redirect: {port_redirect: 70000}}",
                "redirect.port_redirect",
                "must be ≤ 65535",
            ),
            (
                "{match!: {safe_regex: {regex: \"/.*\"}}, route: null, redirect: {prefix_rewrite: /b}}",
                "redirect.prefix_rewrite",
                "cannot be used with a safe_regex match",
            ),
            (
                "{route: null, redirect: {regex_rewrite: {pattern: {regex: \"(\"}}}}",
                "redirect.regex_rewrite.pattern.regex",
                "invalid regex",
            ),
            (
                "{route: null, direct_response: {status: 100}}",
                "direct_response.status",
                "must be in [200, 600)",
            ),
            (
                "{route: null, direct_response: {status: 600}}",
                "direct_response.status",
                "must be in [200, 600)",
            ),
            (
                "{route: null, direct_response: {status: 200, body: {filename: /nonexistent/remora-body}}}",
                "direct_response.body.filename",
                "cannot read /nonexistent/remora-body",
            ),
            (
                "{route: null, direct_response: {status: 200, body: {filename: \"\"}}}",
                "direct_response.body.filename",
                "must not be empty",
            ),
            (
                "{route: null, direct_response: {status: 200, body: {environment_variable: BODY}}}",
                "direct_response.body.environment_variable",
                "is not supported (use filename, inline_bytes or inline_string)",
            ),
            (
                "{route: null, direct_response: {status: 200, body: {}}}",
                "direct_response.body",
                "one of filename, inline_bytes or inline_string is required",
            ),
            (
                "{route: null, direct_response: {status: 200, body: {inline_string: x, watched_directory: {path: /tmp}}}}",
                "direct_response.body.watched_directory",
                UNSUPPORTED,
            ),
        ],
    );
}

#[test]
fn route_table_settings_and_header_mutations_reach_the_model() {
    let table = routes(&accepted(
        ROUTES,
        r#"
ignore_port_in_host_matching: true
most_specific_header_mutations_wins: true
validate_clusters: true
request_headers_to_remove: [X-Drop]
request_headers_to_add:
- header: {key: X-Added, value: "100%% sure"}
- header: {key: x-once, value: a}
  append_action: ADD_IF_ABSENT
- header: {key: x-over, value: b}
  append_action: OVERWRITE_IF_EXISTS_OR_ADD
- header: {key: x-empty, value: ""}
  append_action: OVERWRITE_IF_EXISTS
  keep_empty_value: true
response_headers_to_add: [{header: {key: x-r, value: r}}]
virtual_hosts:
- request_headers_to_add: [{header: {key: x-vhost, value: "1"}}]
  response_headers_to_remove: [server]
  routes:
  - match: {prefix: "/"}
    route: {cluster: echo}
    request_headers_to_add: [{header: {key: x-route, value: "2"}}]
"#,
    ));
    assert_eq!(table.name, "ingress_routes");
    assert!(table.ignore_port_in_host_matching && table.most_specific_header_mutations_wins);
    assert_eq!(table.validate_clusters, Some(true));
    assert_eq!(table.clusters, ["echo"]);
    assert_eq!(table.request_headers.remove, ["x-drop"]);
    let adds: Vec<(&str, &[u8], AppendAction, bool)> = table
        .request_headers
        .add
        .iter()
        .map(|a| (a.name.as_str(), a.value.as_bytes(), a.action, a.keep_empty))
        .collect();
    assert_eq!(
        adds,
        [
            (
                "x-added",
                &b"100% sure"[..],
                AppendAction::AppendIfExistsOrAdd,
                false
            ),
            ("x-once", b"a", AppendAction::AddIfAbsent, false),
            ("x-over", b"b", AppendAction::OverwriteIfExistsOrAdd, false),
            ("x-empty", b"", AppendAction::OverwriteIfExists, true),
        ]
    );
    assert_eq!(table.response_headers.add[0].name, "x-r");
    let vhost = &table.vhosts[0];
    assert_eq!(vhost.request_headers.add[0].name, "x-vhost");
    assert_eq!(vhost.response_headers.remove, ["server"]);
    assert_eq!(vhost.routes[0].request_headers.add[0].value, "2");
    assert!(vhost.routes[0].response_headers.is_empty());
    assert_eq!(routes(&accepted(ROUTES, "")).validate_clusters, None);
}

#[test]
fn forward_actions_reach_the_model() {
    let table = routes(&accepted(ROUTE, ""));
    let forward = forward(&table);
    assert!(matches!(&forward.cluster, ClusterSpec::Name(name) if name == "echo"));
    assert_eq!(
        forward.timeout,
        Some(Duration::from_secs(15)),
        "Envoy's default"
    );
    assert_eq!(forward.timeout_header.as_ref().unwrap(), "15000");
    assert_eq!(forward.idle_timeout, None);
    assert_eq!(forward.cluster_not_found_status, 503);
    assert!(matches!(forward.host_rewrite, HostRewrite::None));
    assert!(forward.prefix_rewrite.is_none() && forward.regex_rewrite.is_none());
    assert!(forward.upgrades.is_empty());

    let table = routes(&accepted(
        ROUTE,
        r#"
name: r1
route:
  prefix_rewrite: /v2/
  host_rewrite_literal: backend.internal
  timeout: 0s
  idle_timeout: 0s
  cluster_not_found_response_code: NOT_FOUND
  upgrade_configs: [{upgrade_type: WebSocket}, {upgrade_type: h2c, enabled: false}]
"#,
    ));
    let route = &table.vhosts[0].routes[0];
    assert_eq!(route.name, "r1");
    let forward = self::forward(&table);
    assert_eq!(forward.prefix_rewrite.as_deref(), Some("/v2/"));
    assert!(matches!(&forward.host_rewrite, HostRewrite::Literal(h) if h == "backend.internal"));
    assert_eq!(
        (forward.timeout, forward.timeout_header.as_ref()),
        (None, None),
        "0s: none"
    );
    assert_eq!(
        forward.idle_timeout,
        Some(None),
        "an explicit 0s turns the HCM's off"
    );
    assert_eq!(forward.cluster_not_found_status, 404);
    assert_eq!(
        forward.upgrades,
        [("websocket".into(), true), ("h2c".into(), false)]
    );
    assert!(forward.allows_upgrade("websocket", &[]));
    assert!(!forward.allows_upgrade("h2c", &["h2c".into()]));
    assert!(forward.allows_upgrade("spdy", &["spdy".into()]));
    assert_eq!(
        forward.rewrite_path(route, "/a/b?q=1").as_deref(),
        Some("/v2/a/b?q=1")
    );

    let table = routes(&accepted(
        ROUTE,
        "route: {cluster: null, cluster_header: X-Cluster, auto_host_rewrite: true, timeout: 2.5s, idle_timeout: 1s, regex_rewrite: {pattern: {regex: \"^/(\\\\w+)/\"}, substitution: \"/x/\\\\1/\"}}",
    ));
    let route = &table.vhosts[0].routes[0];
    let forward = self::forward(&table);
    assert!(matches!(&forward.cluster, ClusterSpec::Header(name) if name == "x-cluster"));
    assert!(matches!(forward.host_rewrite, HostRewrite::Auto));
    assert_eq!(forward.timeout_header.as_ref().unwrap(), "2500");
    assert_eq!(forward.idle_timeout, Some(Some(Duration::from_secs(1))));
    assert_eq!(
        forward.rewrite_path(route, "/api/v1?x").as_deref(),
        Some("/x/api/v1?x")
    );

    let table = routes(&accepted(
        ROUTE,
        "route: {cluster: null, weighted_clusters: {clusters: [{name: echo, weight: 3}, {name: echo, weight: 1}]}}",
    ));
    match &self::forward(&table).cluster {
        ClusterSpec::Weighted { clusters, total } => {
            assert_eq!(
                clusters,
                &[("echo".to_string(), 3), ("echo".to_string(), 1)]
            );
            assert_eq!(*total, 4);
        }
        other => panic!("weighted, not {other:?}"),
    }
    assert_eq!(table.clusters, ["echo"], "deduplicated");
}

#[test]
fn redirects_and_direct_responses_reach_the_model() {
    let table = routes(&accepted(
        ROUTE,
        "{route: null, redirect: {https_redirect: true, host_redirect: new.example, port_redirect: 8443, path_redirect: /moved, strip_query: true, response_code: PERMANENT_REDIRECT}}",
    ));
    let route = &table.vhosts[0].routes[0];
    let Action::Redirect(redirect) = &route.action else {
        panic!("redirect")
    };
    assert_eq!(redirect.scheme.as_deref(), Some("https"));
    assert_eq!(redirect.host.as_deref(), Some("new.example"));
    assert_eq!(redirect.port, Some(8443));
    assert_eq!(redirect.path.as_deref(), Some("/moved"));
    assert!(redirect.strip_query);
    assert_eq!(redirect.status, 308);
    assert_eq!(
        redirect.location(route, "http", "old.example", "/x?q=1"),
        "https://new.example:8443/moved"
    );
    let table = routes(&accepted(
        ROUTE,
        "{route: null, redirect: {scheme_redirect: HTTP, prefix_rewrite: /new/}}",
    ));
    let route = &table.vhosts[0].routes[0];
    let Action::Redirect(redirect) = &route.action else {
        panic!("redirect")
    };
    assert_eq!(
        (redirect.scheme.as_deref(), redirect.status),
        (Some("http"), 301)
    );
    assert_eq!(
        redirect.location(route, "https", "a.example:443", "/old?k"),
        "http://a.example/new/old?k"
    );

    let table = routes(&accepted(
        ROUTE,
        "{route: null, direct_response: {status: 418, body: {inline_string: short and stout}}}",
    ));
    assert!(matches!(
        &table.vhosts[0].routes[0].action,
        Action::Direct { status: 418, body: Some(body) } if body == "short and stout"
    ));
    let table = routes(&accepted(
        ROUTE,
        "{route: null, direct_response: {status: 204}}",
    ));
    assert!(matches!(
        &table.vhosts[0].routes[0].action,
        Action::Direct {
            status: 204,
            body: None
        }
    ));
    // A body file is read when the config is built.
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), "from a file").expect("write");
    let table = routes(&accepted(
        ROUTE,
        &format!(
            "{{route: null, direct_response: {{status: 200, body: {{filename: {}}}}}}}",
            file.path().display()
        ),
    ));
    assert!(matches!(
        &table.vhosts[0].routes[0].action,
        Action::Direct { status: 200, body: Some(body) } if body == "from a file"
    ));
    // A check that must not touch the machine's files (a fuzzer, a control plane) skips it.
    let document = patched(
        ROUTE,
        "{route: null, direct_response: {status: 200, body: {filename: /nonexistent/remora-body}}}",
    );
    let proto = xds_api::json::from_value(&document).expect("maps");
    let bootstrap = remora_config::bootstrap::bootstrap_files(&proto, Files::Skip)
        .expect("the file is not read");
    assert!(matches!(
        &routes(&bootstrap).vhosts[0].routes[0].action,
        Action::Direct {
            status: 200,
            body: None
        }
    ));
}

#[test]
fn matchers_reach_the_model_and_match_as_envoys() {
    let table = routes(&accepted(
        VHOST,
        r#"
routes!:
- match: {path: /exact, case_sensitive: false}
  direct_response: {status: 201}
- match: {path_separated_prefix: /api}
  direct_response: {status: 202}
- match: {safe_regex: {regex: "/re/[0-9]+"}}
  direct_response: {status: 203}
- match: {prefix: /grpc, grpc: {}}
  direct_response: {status: 204}
- match: {prefix: /q, query_parameters: [{name: debug}, {name: v, string_match: {exact: "2"}}]}
  direct_response: {status: 205}
- match: {prefix: /h, headers: [{name: x-env, string_match: {prefix: Prod, ignore_case: true}}, {name: x-gone, present_match: true, invert_match: true}]}
  direct_response: {status: 206}
- match: {prefix: /h, headers: [{name: x-num, range_match: {start: 10, end: 20}}]}
  direct_response: {status: 207}
"#,
    ));
    assert!(matches!(
        table.vhosts[0].routes[0].matcher.path,
        PathMatch::Exact(_)
    ));
    assert!(!table.vhosts[0].routes[0].matcher.case_sensitive);
    assert!(matches!(
        table.vhosts[0].routes[1].matcher.path,
        PathMatch::SeparatedPrefix(_)
    ));
    assert!(matches!(
        table.vhosts[0].routes[2].matcher.path,
        PathMatch::Regex(_)
    ));
    let status = |path: &str, headers: &[(&str, &str)]| {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        table
            .route("any", path, &map)
            .map(|(_, route)| match route.action {
                Action::Direct { status, .. } => status,
                _ => 0,
            })
    };
    assert_eq!(status("/EXACT", &[]), Some(201));
    assert_eq!(status("/exact/more", &[]), None);
    assert_eq!(status("/api", &[]), Some(202));
    assert_eq!(status("/api/v1", &[]), Some(202));
    assert_eq!(status("/apiv1", &[]), None);
    assert_eq!(status("/re/42?x", &[]), Some(203));
    assert_eq!(
        status("/re/4a", &[]),
        None,
        "a regex matches the whole path"
    );
    assert_eq!(
        status("/grpc", &[("content-type", "application/grpc+proto")]),
        Some(204)
    );
    assert_eq!(
        status("/grpc", &[("content-type", "application/grpc-web")]),
        None
    );
    assert_eq!(status("/q?debug&v=2", &[]), Some(205));
    assert_eq!(status("/q?v=2", &[]), None);
    assert_eq!(status("/h", &[("x-env", "production")]), Some(206));
    assert_eq!(
        status("/h", &[("x-env", "production"), ("x-gone", "1")]),
        None
    );
    assert_eq!(status("/h", &[("x-num", "15")]), Some(207));
    assert_eq!(
        status("/h", &[("x-num", "20")]),
        None,
        "a range's end is exclusive"
    );
}

#[test]
fn virtual_hosts_are_chosen_by_domain_as_envoy_chooses() {
    let table = routes(&accepted(
        ROUTES,
        r#"
virtual_hosts!:
- {name: exact, domains: [www.example.com, "www.example.com:8080"], routes: []}
- {name: suffix, domains: ["*.example.com"], routes: []}
- {name: prefix, domains: ["api.*"], routes: []}
- {name: any, domains: ["*"], routes: []}
"#,
    ));
    let name = |host: &str| table.virtual_host(host).map(|v| v.name.as_str());
    assert_eq!(name("www.example.com"), Some("exact"));
    assert_eq!(name("www.example.com:8080"), Some("exact"));
    assert_eq!(name("a.example.com"), Some("suffix"));
    assert_eq!(name("api.other"), Some("prefix"));
    assert_eq!(name("elsewhere"), Some("any"));
    let table = routes(&accepted(
        ROUTES,
        "{ignore_port_in_host_matching: true, virtual_hosts!: [{name: only, domains: [a.example], routes: []}]}",
    ));
    assert_eq!(
        table
            .virtual_host("a.example:9000")
            .map(|v| v.name.as_str()),
        Some("only")
    );
    assert!(table.virtual_host("b.example").is_none());
}
