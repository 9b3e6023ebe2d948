//! DNS clusters against a DNS server the test controls: each proxy runs in a network namespace
//! of its own whose `/etc/resolv.conf` (bind-mounted by `ip netns exec`) names a small DNS
//! server inside it, so the answers and their TTLs are the test's. Compared with Envoy 1.40.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remora_tests::netns::{in_namespace, missing_prerequisite, run};
use remora_tests::process::ChildGuard;
use remora_tests::{envoy, http_get, wait_for, workspace_binary};

/// The name the clusters resolve.
const NAME: &str = "svc.test";

/// A namespace with only loopback up, and its `resolv.conf` pointing at 127.0.0.1; both gone
/// on drop.
struct Namespace {
    name: String,
}

impl Namespace {
    fn create(name: String) -> Namespace {
        // Leftovers of a crashed run with the same name would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc).expect("the namespace's /etc");
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.1\n")
            .expect("its resolv.conf");
        Namespace { name }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// A DNS server on 127.0.0.1:53 of a namespace: `svc.test` has one A record, which the test
/// changes; other questions get an empty answer. Counts the A questions.
struct DnsServer {
    address: Arc<Mutex<Ipv4Addr>>,
    questions: Arc<AtomicU64>,
}

impl DnsServer {
    fn start(namespace: &str, ttl: u32) -> DnsServer {
        let socket = in_namespace(namespace, || {
            UdpSocket::bind("127.0.0.1:53").expect("bind the namespace's port 53")
        });
        let address = Arc::new(Mutex::new(Ipv4Addr::new(127, 0, 0, 2)));
        let questions = Arc::new(AtomicU64::new(0));
        let (answer_with, counted) = (address.clone(), questions.clone());
        // Ends with the test process (the namespace's deletion closes nothing it holds).
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let ip = *answer_with.lock().unwrap();
                if let Some((reply, asked_a)) = answer(&buf[..n], ip, ttl) {
                    if asked_a {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        DnsServer { address, questions }
    }

    fn answer_with(&self, ip: Ipv4Addr) {
        *self.address.lock().unwrap() = ip;
    }
}

/// The reply to one query: an A record for [`NAME`] when asked for one (whether it was), else
/// no records.
fn answer(query: &[u8], ip: Ipv4Addr, ttl: u32) -> Option<(Vec<u8>, bool)> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let qtype = u16::from_be_bytes([query[at], query[at + 1]]);
    let asked_a = labels.join(".") == NAME && qtype == 1;
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[0..2]);
    // A response, recursion desired and available, no error; one question.
    reply.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(asked_a), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if asked_a {
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        reply.extend_from_slice(&ttl.to_be_bytes());
        reply.extend_from_slice(&[0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some((reply, asked_a))
}

/// Two STRICT_DNS clusters on [`NAME`], both refreshed every minute: `ttl` with
/// `respect_dns_ttl`, `fixed` without.
fn dns_bootstrap(admin_port: u16) -> String {
    let cluster = |name: &str, port: u16, respect: bool| {
        format!(
            r#"  - name: {name}
    type: STRICT_DNS
    connect_timeout: 1s
    dns_refresh_rate: 60s
    respect_dns_ttl: {respect}
    dns_lookup_family: V4_ONLY
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {NAME}, port_value: {port}}}}}}}}}]}}]
"#
        )
    };
    format!(
        "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}\nstatic_resources:\n  clusters:\n{}{}",
        cluster("ttl", 8080, true),
        cluster("fixed", 8081, false)
    )
}

/// A cluster whose answers carry a one-second TTL resolves again when they expire, under
/// `respect_dns_ttl`, and follows a changed answer; a cluster without it keeps its minute-long
/// refresh rate, so still has the first answer. Under Remora and Envoy alike.
#[test]
fn respect_dns_ttl_resolves_again_when_the_answer_expires() {
    if let Some(reason) = missing_prerequisite(&["ip"]) {
        remora_tests::skip(
            "respect_dns_ttl_resolves_again_when_the_answer_expires",
            &reason,
        );
        return;
    }
    let mut proxies = vec!["remora"];
    if envoy::available_or_skip("the Envoy half of the respect_dns_ttl test") {
        proxies.push("envoy");
    }
    for proxy in proxies {
        let namespace = Namespace::create(format!("rdns-{}-{proxy}", std::process::id()));
        let dns = DnsServer::start(&namespace.name, 1);
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("bootstrap.yaml");
        // The namespace is the test's own: any port is free in it.
        let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
        std::fs::write(&file, dns_bootstrap(admin.port())).expect("write the bootstrap");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &namespace.name]);
        if proxy == "remora" {
            command.arg(workspace_binary("remora-proxy"));
        } else {
            command.arg("envoy").args([
                "--disable-hot-restart",
                "--base-id",
                &(std::process::id() % 10_000 + 20_000).to_string(),
            ]);
        }
        command.arg("-c").arg(&file);
        let mut process = ChildGuard::spawn(proxy, command);
        let ns = namespace.name.clone();
        let hosts = move || -> Vec<String> {
            let ns = ns.clone();
            in_namespace(&ns, move || http_get(admin, "/clusters"))
                .map(|(_, _, body)| {
                    body.lines()
                        .filter(|line| line.ends_with("::health_flags::healthy"))
                        .map(|line| line.trim_end_matches("::health_flags::healthy").to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        let first = ["fixed::127.0.0.2:8081", "ttl::127.0.0.2:8080"];
        wait_for(
            &format!("{proxy}: both clusters resolved"),
            Duration::from_secs(20),
            || {
                if let Some(status) = process.try_wait() {
                    panic!("{proxy} exited with {status}:\n{}", process.log());
                }
                let mut seen = hosts();
                seen.sort();
                (seen == first).then_some(())
            },
        );
        let asked = dns.questions.load(Ordering::SeqCst);
        dns.answer_with(Ipv4Addr::new(127, 0, 0, 3));
        wait_for(
            &format!("{proxy}: the ttl cluster follows the new answer"),
            Duration::from_secs(20),
            || {
                let seen = hosts();
                (seen.contains(&"ttl::127.0.0.3:8080".to_string())
                    && !seen.contains(&"ttl::127.0.0.2:8080".to_string()))
                .then_some(seen)
            },
        );
        // The other cluster asks again only after its minute: it has the first answer still.
        let seen = hosts();
        assert!(
            seen.contains(&"fixed::127.0.0.2:8081".to_string())
                && !seen.iter().any(|h| h.starts_with("fixed::127.0.0.3")),
            "{proxy}: {seen:?}"
        );
        assert!(
            dns.questions.load(Ordering::SeqCst) > asked,
            "{proxy}: asked again"
        );
    }
}
