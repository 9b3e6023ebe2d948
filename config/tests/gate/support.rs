//! How a case is built and judged: a base bootstrap (YAML), a patch merged into it at an anchor,
//! and the bootstrap read as `remora-proxy --mode validate` reads it (YAML → proto → wire gate
//! → conversion). A rejection is compared by its full field path and a part of its reason.
//!
//! A patch is YAML merged into the value at the anchor: maps merge key by key, lists element
//! by element (extra elements are appended), anything else replaces. `null` removes a key; a
//! key written `name!` replaces the value at `name` whole instead of merging into it.

use remora_config::bootstrap::Bootstrap;
use serde_json::Value;

/// The anchors cases patch at: where each area sits in [`BASE`].
pub const ROOT: &str = "";
pub const LISTENER: &str = "static_resources.listeners[0]";
pub const CHAIN: &str = "static_resources.listeners[0].filter_chains[0]";
pub const HCM: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
pub const ROUTES: &str =
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config";
pub const VHOST: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0]";
pub const ROUTE: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0]";
pub const CLUSTER: &str = "static_resources.clusters[0]";
pub const ENDPOINTS: &str = "static_resources.clusters[0].load_assignment";
/// The second listener's `tcp_proxy`, to the same cluster.
pub const TCP: &str = "static_resources.listeners[1].filter_chains[0].filters[0].typed_config";

/// One HTTP listener routing everything to one STATIC cluster, and one `tcp_proxy` listener.
pub const BASE: &str = r#"
node: {id: node-1, cluster: mesh}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 9901}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
          route_config:
            name: ingress_routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: echo}
  - name: tcp
    address: {socket_address: {address: 127.0.0.1, port_value: 10001}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: echo
  clusters:
  - name: echo
    connect_timeout: 0.5s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
"#;

/// Why a document was refused: the field path and the reason, from the JSON mapping or from
/// the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub path: String,
    pub reason: String,
}

fn yaml(text: &str) -> Value {
    xds_api::json::parse_yaml(text).unwrap_or_else(|e| panic!("test YAML {text:?}: {e}"))
}

/// `a.b[2].c` as steps.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Step::Key(key));
        }
        while let Some(open) = rest.strip_prefix('[') {
            let close = open.find(']').expect("closing bracket in anchor");
            out.push(Step::Index(open[..close].parse().expect("index in anchor")));
            rest = &open[close + 1..];
        }
    }
    out
}

fn at<'v>(value: &'v mut Value, anchor: &str) -> &'v mut Value {
    steps(anchor)
        .into_iter()
        .fold(value, |value, step| match step {
            Step::Key(key) => value
                .as_object_mut()
                .unwrap_or_else(|| panic!("anchor {anchor}: {key} is not in a map"))
                .entry(key)
                .or_insert(Value::Null),
            Step::Index(index) => value
                .as_array_mut()
                .and_then(|list| list.get_mut(index))
                .unwrap_or_else(|| panic!("anchor {anchor}: no element {index}")),
        })
}

fn merge(into: &mut Value, patch: Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (key, value) in patch {
                if let Some(name) = key.strip_suffix('!') {
                    into.insert(name.to_string(), value);
                } else if value.is_null() {
                    into.remove(&key);
                } else {
                    merge(into.entry(key).or_insert(Value::Null), value);
                }
            }
        }
        (Value::Array(into), Value::Array(patch)) => {
            for (index, value) in patch.into_iter().enumerate() {
                match into.get_mut(index) {
                    Some(slot) => merge(slot, value),
                    None => into.push(value),
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// [`BASE`] with each `(anchor, patch)` merged in, in order.
pub fn patched_all(patches: &[(&str, &str)]) -> Value {
    let mut document = yaml(BASE);
    for (anchor, patch) in patches {
        let patch = yaml(patch);
        if !patch.is_null() {
            merge(at(&mut document, anchor), patch);
        }
    }
    document
}

/// [`BASE`] with `patch` merged in at `anchor`.
pub fn patched(anchor: &str, patch: &str) -> Value {
    patched_all(&[(anchor, patch)])
}

/// Reads a bootstrap document as the proxy does: JSON mapping, then the gate and conversion.
pub fn read(document: &Value) -> Result<Bootstrap, Refusal> {
    let proto = xds_api::json::from_value(document).map_err(|e| Refusal {
        path: e.path,
        reason: e.reason,
    })?;
    remora_config::bootstrap::bootstrap(&proto).map_err(|e| Refusal {
        path: e.path,
        reason: e.reason,
    })
}

/// [`BASE`] patched at `anchor`, which must be accepted.
pub fn accepted(anchor: &str, patch: &str) -> Bootstrap {
    accepted_all(&[(anchor, patch)])
}

/// [`BASE`] with several patches, which must be accepted.
pub fn accepted_all(patches: &[(&str, &str)]) -> Bootstrap {
    read(&patched_all(patches))
        .unwrap_or_else(|refusal| panic!("patches {patches:?}\nrefused: {refusal:?}"))
}

/// `anchor.relative`, as error paths join; a path written `/from.the.root` is taken as is.
pub fn full_path(anchor: &str, relative: &str) -> String {
    if let Some(absolute) = relative.strip_prefix('/') {
        return absolute.to_string();
    }
    match (anchor.is_empty(), relative.is_empty()) {
        (true, _) => relative.to_string(),
        (false, true) => anchor.to_string(),
        (false, false) if relative.starts_with('[') => format!("{anchor}{relative}"),
        (false, false) => format!("{anchor}.{relative}"),
    }
}

/// One refusal case: the patch, the path of the error relative to the anchor (or, starting
/// with `/`, from the root), and a part of the reason.
pub type Rejection<'a> = (&'a str, &'a str, &'a str);

/// Runs every case at `anchor` and fails listing each one that was accepted or refused for
/// another field or reason.
pub fn check_rejections(anchor: &str, cases: &[Rejection]) {
    check_rejections_given(&[], anchor, cases);
}

/// [`check_rejections`] on [`BASE`] with the `given` patches applied first.
pub fn check_rejections_given(given: &[(&str, &str)], anchor: &str, cases: &[Rejection]) {
    let mut failures = Vec::new();
    for (patch, path, reason) in cases {
        let want = full_path(anchor, path);
        let mut patches = given.to_vec();
        patches.push((anchor, patch));
        match read(&patched_all(&patches)) {
            Ok(_) => failures.push(format!("{patch:?}: accepted, want {want}: …{reason}…")),
            Err(refusal) if refusal.path == want && refusal.reason.contains(reason) => {}
            Err(refusal) => failures.push(format!(
                "{patch:?}:\n    got  {}: {}\n    want {want}: …{reason}…",
                refusal.path, refusal.reason
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases at {anchor:?} failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Fails with `PATH: field is not supported`: the [`Rejection`] of an `unsupported!` field.
pub const UNSUPPORTED: &str = "field is not supported";

#[test]
fn patches_merge_maps_and_lists_and_replace_with_a_bang() {
    let document = patched(
        CLUSTER,
        "{lb_policy: MAGLEV, load_assignment: {endpoints: [{priority: 1}]}, type: null}",
    );
    let cluster = &document["static_resources"]["clusters"][0];
    assert_eq!(cluster["lb_policy"], "MAGLEV");
    assert_eq!(cluster["name"], "echo");
    assert_eq!(cluster["load_assignment"]["endpoints"][0]["priority"], 1);
    assert!(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"].is_array());
    assert!(cluster.get("type").is_none());
    let document = patched(HCM, "{http_filters!: []}");
    let filters =
        "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters";
    assert_eq!(document.pointer(filters), Some(&Value::Array(vec![])));
    assert_eq!(
        full_path(CLUSTER, "name"),
        "static_resources.clusters[0].name"
    );
    assert_eq!(full_path(ROOT, "node.id"), "node.id");
    assert_eq!(full_path(CLUSTER, "/node"), "node");
}
