//! Network namespaces for tests that need a real network path (traffic capture): creating
//! them with a veth pair between them, deleting them however the test ends, running code or
//! commands inside one, and forwarding a loopback port into one. Only ever configures
//! addresses inside namespaces the test made.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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

/// A loopback port of the test's own namespace whose connections are relayed, byte for byte,
/// to `target` inside namespace `ns`: how the test process reaches a server living in a
/// namespace that has no route out (TLS passes through untouched). Stops on drop, closing the
/// connections it relays.
pub struct PortForward {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<HashMap<u64, [TcpStream; 2]>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl PortForward {
    pub fn start(ns: &str, target: SocketAddr) -> PortForward {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port to forward");
        let local = listener.local_addr().expect("forward's local address");
        let path = format!("/run/netns/{ns}");
        let netns =
            Arc::new(std::fs::File::open(&path).unwrap_or_else(|error| panic!("{path}: {error}")));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(HashMap::new()));
        let acceptor = {
            let (stop, open) = (stop.clone(), open.clone());
            std::thread::spawn(move || {
                let ids = AtomicU64::new(0);
                for inbound in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(inbound) = inbound else { continue };
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    let (netns, open) = (netns.clone(), open.clone());
                    std::thread::spawn(move || relay(id, inbound, &netns, target, &open));
                }
            })
        };
        PortForward {
            local,
            stop,
            open,
            acceptor: Some(acceptor),
        }
    }

    /// The loopback address to connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Connects to `target` from inside `netns` and copies both ways until both sides are done.
fn relay(
    id: u64,
    inbound: TcpStream,
    netns: &std::fs::File,
    target: SocketAddr,
    open: &Mutex<HashMap<u64, [TcpStream; 2]>>,
) {
    // This thread is ours alone: entering the namespace affects only the sockets it creates.
    if nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
        return;
    }
    let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(10)) else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (Ok(inbound_copy), Ok(outbound_copy)) = (inbound.try_clone(), outbound.try_clone()) else {
        return;
    };
    if let (Ok(a), Ok(b)) = (inbound.try_clone(), outbound.try_clone()) {
        open.lock().expect("forward registry").insert(id, [a, b]);
    }
    let upstream = std::thread::spawn(move || pipe(inbound_copy, outbound_copy));
    pipe(outbound, inbound);
    let _ = upstream.join();
    open.lock().expect("forward registry").remove(&id);
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s sending side.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees `stop`.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for streams in self.open.lock().expect("forward registry").values() {
            for stream in streams {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}
