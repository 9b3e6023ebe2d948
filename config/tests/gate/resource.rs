//! xDS resources as they arrive on the wire (`remora_config::resource`): the wire gate on the
//! bytes, decoding, conversion, and the rules that differ from the bootstrap's (EDS takes IP
//! addresses only, names must be set, references are not followed). Paths are from the
//! resource's root, as a NACK names them.

use prost::Message;
use remora_config::resource;
use remora_config::route::Files;
use xds_api::envoy::config::cluster::v3::Cluster;
use xds_api::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_api::envoy::config::listener::v3::Listener;
use xds_api::envoy::config::route::v3::RouteConfiguration;
use xds_api::type_urls;

fn bytes<M: Message + prost::Name + Default>(yaml: &str) -> Vec<u8> {
    xds_api::json::from_yaml_str::<M>(yaml)
        .unwrap_or_else(|e| panic!("test YAML {yaml:?}: {e}"))
        .encode_to_vec()
}

/// `(type URL, resource YAML, error path, part of the reason)`.
type WireRejection<'a> = (&'a str, &'a str, &'a str, &'a str);

fn encoded(type_url: &str, yaml: &str) -> Vec<u8> {
    match type_url {
        type_urls::LISTENER => bytes::<Listener>(yaml),
        type_urls::CLUSTER => bytes::<Cluster>(yaml),
        type_urls::ROUTE_CONFIGURATION => bytes::<RouteConfiguration>(yaml),
        type_urls::CLUSTER_LOAD_ASSIGNMENT => bytes::<ClusterLoadAssignment>(yaml),
        other => panic!("no test encoding for {other}"),
    }
}

#[test]
fn resources_are_refused_by_path_from_their_root() {
    let cases: &[WireRejection] = &[
        (
            type_urls::CLUSTER,
            "name: \"\"\nconnect_timeout: 1s",
            "name",
            "must not be empty",
        ),
        (
            type_urls::CLUSTER,
            "name: c\nlb_policy: CLUSTER_PROVIDED",
            "lb_policy",
            "CLUSTER_PROVIDED is only for ORIGINAL_DST clusters",
        ),
        (
            type_urls::CLUSTER,
            "name: c\ntype: EDS\neds_cluster_config: {eds_config: {ads: {}, resource_api_version: V2}}",
            "eds_cluster_config.eds_config.resource_api_version",
            "V2 is not supported",
        ),
        (
            type_urls::CLUSTER_LOAD_ASSIGNMENT,
            "endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 80}}}}]}]",
            "cluster_name",
            "must not be empty",
        ),
        (
            type_urls::CLUSTER_LOAD_ASSIGNMENT,
            "cluster_name: c\nendpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: svc.example, port_value: 80}}}}]}]",
            "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address",
            "must be an IP address",
        ),
        (
            type_urls::CLUSTER_LOAD_ASSIGNMENT,
            "cluster_name: c\nendpoints: [{priority: 200}]",
            "endpoints[0].priority",
            "must be ≤ 128",
        ),
        (
            type_urls::LISTENER,
            "address: {socket_address: {address: 127.0.0.1, port_value: 1}}\nfilter_chains: [{filters: [{name: t, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c}}]}]",
            "name",
            "must not be empty",
        ),
        (
            type_urls::LISTENER,
            "name: l\naddress: {socket_address: {address: 127.0.0.1, port_value: 1}}\nper_connection_buffer_limit_bytes: 1024\nfilter_chains: [{filters: [{name: t, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c}}]}]",
            "per_connection_buffer_limit_bytes",
            "field is not supported",
        ),
        (
            type_urls::ROUTE_CONFIGURATION,
            "name: r\nvirtual_hosts: [{name: v, domains: [\"*\"], routes: [{match: {prefix: /}, route: {cluster: c, upgrade_configs: [{upgrade_type: CONNECT}]}}]}]",
            "virtual_hosts[0].routes[0].route.upgrade_configs[0].upgrade_type",
            "CONNECT is not supported",
        ),
    ];
    let mut failures = Vec::new();
    for (type_url, yaml, path, reason) in cases {
        match resource::check(type_url, &encoded(type_url, yaml)) {
            Err(error) if error.path == *path && error.reason.contains(reason) => {}
            other => failures.push(format!("{yaml:?}: got {other:?}, want {path}: …{reason}…")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn references_and_files_are_the_proxys_to_follow() {
    // A route to a cluster nobody has sent, and a direct response body in a file that exists
    // only on the proxy's machine: a control plane's check accepts both.
    let route = encoded(
        type_urls::ROUTE_CONFIGURATION,
        "name: r\nvirtual_hosts: [{name: v, domains: [\"*\"], routes: [{match: {prefix: /a}, route: {cluster: elsewhere}}, {match: {prefix: /b}, direct_response: {status: 200, body: {filename: /nonexistent/body}}}]}]",
    );
    resource::check(type_urls::ROUTE_CONFIGURATION, &route).expect("accepted");
    let error = resource::route_table(&route, Files::Read).expect_err("the proxy reads the file");
    assert_eq!(
        error.path,
        "virtual_hosts[0].routes[1].direct_response.body.filename"
    );
    let table = resource::route_table(&route, Files::Skip).expect("accepted");
    assert_eq!(table.clusters, ["elsewhere"]);
    assert_eq!(
        table.validate_clusters, None,
        "RDS does not validate clusters by default"
    );
    let (name, assignment) = resource::load_assignment(&encoded(
        type_urls::CLUSTER_LOAD_ASSIGNMENT,
        "cluster_name: c\nendpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 80}}}}]}]",
    ))
    .expect("accepted");
    assert_eq!((name.as_str(), assignment.endpoints.len()), ("c", 1));
}

#[test]
fn the_wire_gate_names_what_our_protos_do_not_declare() {
    // Field 9999 (varint) appended to a cluster, and inside a listener's typed_config.
    let mut cluster = encoded(type_urls::CLUSTER, "name: c");
    cluster.extend_from_slice(&[0xf8, 0xf0, 0x04, 0x01]);
    let error = resource::check(type_urls::CLUSTER, &cluster).expect_err("unknown field");
    assert_eq!(error.path, "");
    assert!(
        error
            .reason
            .contains("field number 9999 is not known to Remora"),
        "{error}"
    );
    let error =
        resource::check(type_urls::CLUSTER, &cluster[..cluster.len() - 1]).expect_err("truncated");
    assert!(error.reason.contains("cannot decode"), "{error}");

    let mut proto: Listener = xds_api::json::from_yaml_str(
        "name: l\naddress: {socket_address: {address: 127.0.0.1, port_value: 1}}\nfilter_chains: [{filters: [{name: t, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c}}]}]",
    )
    .unwrap();
    let Some(xds_api::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) =
        &mut proto.filter_chains[0].filters[0].config_type
    else {
        panic!("typed_config")
    };
    any.value.extend_from_slice(&[0xf8, 0xf0, 0x04, 0x01]);
    let error = resource::check(type_urls::LISTENER, &proto.encode_to_vec())
        .expect_err("unknown field in the Any");
    assert_eq!(error.path, "filter_chains[0].filters[0].typed_config");
    assert!(error.reason.contains("field number 9999"), "{error}");

    let error = resource::check(type_urls::SECRET, &[]).expect_err("a secret without a name");
    assert_eq!(error.path, "name");
    let error = resource::check("type.googleapis.com/envoy.config.core.v3.Node", &[])
        .expect_err("not a type Remora takes");
    assert!(
        error
            .reason
            .contains("Remora does not take resources of type"),
        "{error}"
    );
    assert_eq!(
        resource::name(type_urls::CLUSTER, &cluster[..cluster.len() - 4]).unwrap(),
        "c"
    );
    assert_eq!(resource::name(type_urls::SECRET, &[]).unwrap(), "");
    assert!(resource::name("type.googleapis.com/envoy.config.core.v3.Node", &[]).is_err());
}
