//! Network namespaces for tests that need a real network path (traffic capture): creating
//! them with a veth pair between them, deleting them however the test ends, and running code
//! or commands inside one. Only ever configures addresses inside namespaces the test made.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;

/// Why namespace tests cannot run on this machine, if they cannot.
pub fn missing_prerequisite(tools: &[&str]) -> Option<String> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        return Some("not running as root".into());
    }
    tools
        .iter()
        .find(|tool| {
            !["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .any(|dir| std::path::Path::new(dir).join(tool).exists())
        })
        .map(|tool| format!("{tool} not found (apt-get install iproute2 iptables util-linux)"))
}

/// Runs a command to completion and returns its stdout; panics with its output on failure.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|error| panic!("running {args:?}: {error}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by a veth pair, each with one IPv4 address; deleted on drop.
pub struct NamespacePair {
    pub left: String,
    pub right: String,
}

impl NamespacePair {
    /// Creates `<base>-l` and `<base>-r` with `left_cidr` and `right_cidr` (e.g. "198.18.0.1/24").
    pub fn create(base: &str, left_cidr: &str, right_cidr: &str) -> NamespacePair {
        let pair = NamespacePair {
            left: format!("{base}-l"),
            right: format!("{base}-r"),
        };
        for ns in [&pair.left, &pair.right] {
            // Leftovers of a crashed run with the same name would make `add` fail.
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            run(&["ip", "netns", "add", ns]);
        }
        run(&[
            "ip",
            "-n",
            &pair.left,
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            &pair.right,
        ]);
        for (ns, dev, cidr) in [
            (&pair.left, "veth0", left_cidr),
            (&pair.right, "veth1", right_cidr),
        ] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        pair
    }
}

impl Drop for NamespacePair {
    fn drop(&mut self) {
        for ns in [&self.left, &self.right] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `work` on a thread that has entered namespace `ns`; sockets it creates stay there.
pub fn in_namespace<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|error| panic!("setns {path}: {error}"));
        work()
    })
    .join()
    .unwrap_or_else(|_| panic!("work inside namespace {ns} panicked"))
}

/// A listener bound inside namespace `ns`.
pub fn listen_in(ns: &str, addr: SocketAddr) -> TcpListener {
    in_namespace(ns, move || {
        TcpListener::bind(addr).unwrap_or_else(|error| panic!("bind {addr}: {error}"))
    })
}
