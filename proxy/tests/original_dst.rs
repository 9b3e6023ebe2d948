//! `original_dst` end to end, IPv4 and IPv6: inside a private network namespace, iptables
//! REDIRECTs a client's connections to the proxy, which recovers the original destination
//! (SO_ORIGINAL_DST) and forwards there through an ORIGINAL_DST cluster.
//!
//! Needs root, `ip`, `iptables`, `ip6tables`, `runuser` and `curl`; skipped otherwise.

use std::process::{Command, Output};
use std::time::Duration;

use remora_tests::process::ChildGuard;
use remora_tests::{on_path, wait_for, workspace_binary};

struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("remora-od-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let ns = Netns(name);
        ns.run(&["ip", "link", "set", "lo", "up"])
            .status
            .success()
            .then_some(ns)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0]).args(args);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run in netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    root && ["ip", "iptables", "ip6tables", "runuser", "curl"]
        .iter()
        .all(|p| on_path(p))
}

#[test]
fn original_dst_listener_and_cluster_ipv4_and_ipv6() {
    if !available() {
        remora_tests::skip(
            "original_dst_listener_and_cluster_ipv4_and_ipv6",
            "needs root, ip, iptables, ip6tables, runuser and curl",
        );
        return;
    }
    let Some(ns) = Netns::create() else {
        remora_tests::skip(
            "original_dst_listener_and_cluster_ipv4_and_ipv6",
            "cannot create a network namespace",
        );
        return;
    };
    // Two echo upstreams the client will try to reach directly (the `remora-echo` binary runs
    // inside the namespace; it is built by `cargo build --workspace`).
    let Some(echo) = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()
                .and_then(|deps| deps.parent())
                .map(|dir| dir.join("remora-echo"))
        })
        .filter(|path| path.exists())
    else {
        remora_tests::skip(
            "original_dst_listener_and_cluster_ipv4_and_ipv6",
            "remora-echo is not built (cargo build --workspace)",
        );
        return;
    };
    let echo = echo.to_str().expect("path");
    let _v4 = ChildGuard::spawn(
        "echo-v4",
        ns.command(&[echo, "--listen", "127.0.0.2:8080", "--name", "v4"]),
    );
    let _v6 = ChildGuard::spawn(
        "echo-v6",
        ns.command(&[echo, "--listen", "[::1]:8080", "--name", "v6"]),
    );
    let bootstrap = r#"admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 15000}}
static_resources:
  listeners:
  - name: outbound
    address: {socket_address: {address: "::", port_value: 15001}}
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: outbound
          cluster: passthrough
  # use_original_dst hands a connection for *:9090 to this wildcard listener.
  - name: handover
    address: {socket_address: {address: 0.0.0.0, port_value: 9090}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: handover
          cluster: v6_only
  clusters:
  - name: v6_only
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: v6_only
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: "::1", port_value: 8080}}}
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, bootstrap).expect("write");
    let proxy_bin = workspace_binary("remora-proxy");
    let mut proxy = ChildGuard::spawn(
        "remora-proxy",
        ns.command(&[
            proxy_bin.to_str().expect("path"),
            "-c",
            path.to_str().expect("path"),
            "--concurrency",
            "1",
        ]),
    );
    wait_for(
        "proxy ready in the namespace",
        Duration::from_secs(20),
        || {
            assert!(proxy.try_wait().is_none(), "proxy exited: {}", proxy.log());
            let out = ns.run(&[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:15000/ready",
            ]);
            (String::from_utf8_lossy(&out.stdout) == "200").then_some(())
        },
    );
    // Redirect the unprivileged client's traffic (not the proxy's own) to the proxy.
    for (tool, dst, port) in [
        ("iptables", "127.0.0.2", "8080"),
        ("ip6tables", "::1", "8080"),
        ("iptables", "127.0.0.9", "9090"),
    ] {
        let out = ns.run(&[
            tool,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            dst,
            "--dport",
            port,
            "-m",
            "owner",
            "--uid-owner",
            "65534",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ]);
        if !out.status.success() {
            remora_tests::skip(
                "original_dst_listener_and_cluster_ipv4_and_ipv6",
                &format!(
                    "{tool} nat REDIRECT unavailable: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
            return;
        }
    }
    // The third destination is handed to the wildcard listener (its cluster is the v6 echo).
    // Without the handover the outbound listener would forward it to *:9090 itself, which the
    // stats below tell apart (the outbound listener would count 3 connections, not 2).
    for (url, upstream) in [
        ("http://127.0.0.2:8080/via-v4", "v4"),
        ("http://[::1]:8080/via-v6", "v6"),
        ("http://127.0.0.9:9090/handed-over", "v6"),
    ] {
        let body = wait_for(
            &format!("{url} through the proxy"),
            Duration::from_secs(10),
            || {
                let out = ns.run(&[
                    "runuser",
                    "-u",
                    "nobody",
                    "--",
                    "curl",
                    "-s",
                    "-g",
                    "--max-time",
                    "5",
                    url,
                ]);
                let body = String::from_utf8_lossy(&out.stdout).into_owned();
                body.contains("\"upstream\"").then_some(body)
            },
        );
        let json: serde_json::Value = serde_json::from_str(&body).expect("echo json");
        assert_eq!(json["upstream"], upstream);
    }
    let stats = ns.run(&["curl", "-s", "http://127.0.0.1:15000/stats"]);
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.contains("tcp.outbound.downstream_cx_total: 2"),
        "{stats}"
    );
    assert!(
        stats.contains("cluster.passthrough.upstream_cx_total: 2"),
        "{stats}"
    );
    assert!(
        stats.contains("tcp.handover.downstream_cx_total: 1"),
        "{stats}"
    );
}
