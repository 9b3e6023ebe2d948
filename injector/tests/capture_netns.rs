//! `remora-init` against real netfilter, in network namespaces this test creates: a "pod"
//! namespace where the rules are installed and a "peer" namespace on the other end of a
//! veth pair. Test listeners on the proxy's ports read SO_ORIGINAL_DST to prove which
//! connections were redirected and that the original destination survived.
//!
//! Needs root, `ip`, `iptables-restore`/`iptables-save` (and the ip6tables pair), `setpriv`
//! and `bash`; without them the test prints why it is skipped, and fails instead when
//! `REMORA_REQUIRE_ALL=1` (as CI sets it). Also holds the `--dry-run` golden test, which
//! needs none of that.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use nix::sched::CloneFlags;

const INIT: &str = env!("CARGO_BIN_EXE_remora-init");

#[test]
fn dry_run_matches_golden() {
    let out = Command::new(INIT)
        .args([
            "--dry-run",
            "--exclude-inbound-ports",
            "8081,22",
            "--exclude-outbound-ports",
            "5432",
            "--include-outbound-cidrs",
            "10.96.0.0/12,fd00:10:96::/112",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,fd00::1/128",
        ])
        .env_remove("REMORA_CAPTURE_NO_IPV6")
        .output()
        .unwrap_or_else(|e| panic!("running remora-init: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    common::check_golden(&common::golden_dir().join("capture/dry-run.rules"), &text);

    // Settings also come from the environment, as documented.
    let from_env = Command::new(INIT)
        .args(["--dry-run", "--no-ipv6"])
        .env("REMORA_CAPTURE_EXCLUDE_OUTBOUND_PORTS", "6379")
        .output()
        .unwrap_or_else(|e| panic!("running remora-init: {e}"));
    let text = String::from_utf8_lossy(&from_env.stdout);
    assert!(
        text.contains("--dport 6379 -j RETURN") && !text.contains("IPv6"),
        "{text}"
    );

    let bad = Command::new(INIT)
        .args(["--dry-run", "--exclude-inbound-ports", "ssh"])
        .output()
        .unwrap_or_else(|e| panic!("running remora-init: {e}"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ssh"));
}

/// Why the netns test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".to_string());
    }
    for tool in [
        "ip",
        "iptables-restore",
        "iptables-save",
        "ip6tables-restore",
        "ip6tables-save",
        "setpriv",
        "bash",
    ] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|dir| std::path::Path::new(dir).join(tool).exists());
        if !found {
            return Some(format!(
                "{tool} not found (apt-get install iproute2 iptables util-linux)"
            ));
        }
    }
    None
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes the namespaces (and with them the veth pair and all rules) however the test ends.
struct Namespaces {
    pod: String,
    peer: String,
}

impl Namespaces {
    fn create() -> Self {
        let base = format!("remora-inj-test-{}", std::process::id());
        let this = Self {
            pod: base.clone(),
            peer: format!("{base}-peer"),
        };
        // Leftovers from a crashed run with the same pid would make `add` fail.
        for ns in [&this.pod, &this.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            run(&["ip", "netns", "add", ns]);
        }
        this
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Binds listeners inside a namespace: the socket keeps the namespace it was made in, so
/// a short-lived thread enters the namespace, binds, and hands the sockets back.
fn listen_in(ns: &str, addrs: &[&str]) -> Vec<TcpListener> {
    let path = format!("/run/netns/{ns}");
    let addrs: Vec<SocketAddr> = addrs
        .iter()
        .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
        .collect();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns: {e}"));
        addrs
            .iter()
            .map(|addr| {
                let domain = socket2::Domain::for_address(*addr);
                let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)
                    .unwrap_or_else(|e| panic!("{e}"));
                if addr.is_ipv6() {
                    socket.set_only_v6(true).unwrap_or_else(|e| panic!("{e}"));
                }
                socket
                    .set_reuse_address(true)
                    .unwrap_or_else(|e| panic!("{e}"));
                socket
                    .bind(&(*addr).into())
                    .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                socket.listen(16).unwrap_or_else(|e| panic!("{e}"));
                let listener: TcpListener = socket.into();
                listener
                    .set_nonblocking(true)
                    .unwrap_or_else(|e| panic!("{e}"));
                listener
            })
            .collect()
    })
    .join()
    .unwrap_or_else(|_| panic!("binding in {ns} failed"))
}

/// Connects from inside `ns` as `uid`, sends `payload`, and exits.
fn connect_as(ns: &str, uid: u32, to: SocketAddr, payload: &str) {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf {payload} >&3",
        to.ip(),
        to.port()
    );
    let uid = uid.to_string();
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "setpriv",
        "--reuid",
        &uid,
        "--regid",
        &uid,
        "--clear-groups",
        "bash",
        "-c",
        &script,
    ]);
}

/// What one listener got: the payload and the connection's SO_ORIGINAL_DST (`None` when
/// the connection was not NATed: the kernel then has no original destination to report).
fn accept_one(listener: &TcpListener, what: &str) -> (String, Option<SocketAddr>) {
    let (mut stream, _) = remora_tests::wait_for(
        &format!("{what}: a connection"),
        Duration::from_secs(10),
        || match listener.accept() {
            Ok(conn) => Some(conn),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => panic!("{what}: accept failed: {e}"),
        },
    );
    stream
        .set_nonblocking(false)
        .unwrap_or_else(|e| panic!("{e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    let original = original_dst(&stream);
    let mut payload = String::new();
    stream
        .read_to_string(&mut payload)
        .unwrap_or_else(|e| panic!("{what}: reading: {e}"));
    (payload, original)
}

fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let original = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    original.ok().and_then(|a| a.as_socket())
}

fn assert_nothing_pending(listener: &TcpListener, what: &str) {
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, from)) => panic!("{what}: unexpected connection from {from}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

fn nat_rules(ns: &str, save: &str) -> String {
    run(&["ip", "netns", "exec", ns, save, "-t", "nat"])
}

/// Addresses for one family: (pod address with prefix, peer address with prefix,
/// pod address, peer address, wildcard).
struct Family {
    pod_cidr: &'static str,
    peer_cidr: &'static str,
    pod: &'static str,
    peer: &'static str,
    any: &'static str,
}

// Benchmarking (198.18.0.0/15) and documentation (2001:db8::/32) ranges, only ever
// configured inside the test's own namespaces.
const V4: Family = Family {
    pod_cidr: "198.18.0.1/24",
    peer_cidr: "198.18.0.2/24",
    pod: "198.18.0.1",
    peer: "198.18.0.2",
    any: "0.0.0.0",
};
const V6: Family = Family {
    pod_cidr: "2001:db8:7::1/64",
    peer_cidr: "2001:db8:7::2/64",
    pod: "[2001:db8:7::1]",
    peer: "[2001:db8:7::2]",
    any: "[::]",
};

#[test]
fn capture_redirects_app_traffic_but_not_the_proxy() {
    if let Some(reason) = missing_prerequisite() {
        remora_tests::skip("capture_redirects_app_traffic_but_not_the_proxy", &reason);
        return;
    }
    let ns = Namespaces::create();
    let (pod, peer) = (ns.pod.as_str(), ns.peer.as_str());
    run(&[
        "ip", "-n", pod, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns",
        peer,
    ]);
    for (name, dev, family_cidrs) in [
        (pod, "veth0", [V4.pod_cidr, V6.pod_cidr]),
        (peer, "veth1", [V4.peer_cidr, V6.peer_cidr]),
    ] {
        run(&["ip", "-n", name, "link", "set", "lo", "up"]);
        for cidr in family_cidrs {
            run(&["ip", "-n", name, "addr", "add", cidr, "dev", dev, "nodad"]);
        }
        run(&["ip", "-n", name, "link", "set", dev, "up"]);
    }

    // Installed twice: the second run must replace, not duplicate.
    for _ in 0..2 {
        run(&[
            "ip",
            "netns",
            "exec",
            pod,
            INIT,
            "--exclude-inbound-ports",
            "8081",
        ]);
    }
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = nat_rules(pod, save);
        assert_eq!(
            rules.matches("-A OUTPUT -p tcp -j REMORA_OUTPUT").count(),
            1,
            "{save}:\n{rules}"
        );
        assert_eq!(
            rules
                .matches("-A PREROUTING -p tcp -j REMORA_INBOUND")
                .count(),
            1,
            "{save}:\n{rules}"
        );
        assert_eq!(
            rules.matches("--dport 8081 -j RETURN").count(),
            1,
            "{save}:\n{rules}"
        );
    }

    for family in [V4, V6] {
        let addr = |host: &str, port: u16| -> SocketAddr {
            format!("{host}:{port}")
                .parse()
                .unwrap_or_else(|e| panic!("{host}: {e}"))
        };
        let listeners = listen_in(
            pod,
            &[
                &format!("{}:15001", family.any),
                &format!("{}:15006", family.any),
                &format!("{}:8081", family.any),
            ],
        );
        let (outbound, inbound, excluded) = (&listeners[0], &listeners[1], &listeners[2]);
        let upstream = &listen_in(peer, &[&format!("{}:8080", family.peer)])[0];
        let upstream_addr = addr(family.peer, 8080);

        // The proxy's own connection goes straight to the peer.
        connect_as(pod, 1337, upstream_addr, "proxy");
        let (payload, original) = accept_one(upstream, "peer listener (proxy uid)");
        assert_eq!(payload, "proxy");
        assert!(
            original.is_none_or(|o| o == upstream_addr),
            "rewritten to {original:?}"
        );
        assert_nothing_pending(outbound, "outbound capture after the proxy's connection");

        // An app's connection lands on 15001 with its real destination preserved.
        connect_as(pod, 1000, upstream_addr, "app");
        let (payload, original) = accept_one(outbound, "outbound capture (app uid)");
        assert_eq!((payload.as_str(), original), ("app", Some(upstream_addr)));
        assert_nothing_pending(upstream, "peer listener after the app's connection");

        // Inbound from the peer lands on 15006, original destination preserved ...
        let app_port = addr(family.pod, 9000);
        connect_as(peer, 1000, app_port, "inbound");
        let (payload, original) = accept_one(inbound, "inbound capture");
        assert_eq!((payload.as_str(), original), ("inbound", Some(app_port)));

        // ... except on an excluded port (a probe port), which reaches the app directly.
        let probe_port = addr(family.pod, 8081);
        connect_as(peer, 1000, probe_port, "probe");
        let (payload, original) = accept_one(excluded, "excluded inbound port");
        assert_eq!(payload, "probe");
        // Conntrack may know the connection, but with its destination unchanged.
        assert!(
            original.is_none_or(|o| o == probe_port),
            "rewritten to {original:?}"
        );
        assert_nothing_pending(inbound, "inbound capture after the excluded port");
    }

    // Cleanup removes everything, and the app's traffic is no longer redirected.
    run(&["ip", "netns", "exec", pod, INIT, "--cleanup"]);
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = nat_rules(pod, save);
        assert!(!rules.contains("REMORA"), "{save} after cleanup:\n{rules}");
    }
    let outbound = &listen_in(pod, &["0.0.0.0:15001"])[0];
    let upstream = &listen_in(peer, &["198.18.0.2:8081"])[0];
    connect_as(
        pod,
        1000,
        "198.18.0.2:8081".parse().unwrap_or_else(|e| panic!("{e}")),
        "direct",
    );
    assert_eq!(accept_one(upstream, "peer after cleanup").0, "direct");
    assert_nothing_pending(outbound, "outbound capture after cleanup");
}
