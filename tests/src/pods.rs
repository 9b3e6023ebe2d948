//! Pods in network namespaces, as a node runs them, for mesh tests: a "node" namespace with a
//! bridge, one namespace per pod joined to it by a veth pair, processes started inside a pod
//! the way the kubelet would (a command as a given user), and a relay that lets sidecars reach
//! the control plane on the host's loopback.
//!
//! Network safety: every address lives in 198.18.0.0/15 inside namespaces this module (or the
//! Kubernetes fixture) creates. Pods get 198.18.x.y/16 and one more route: service addresses
//! (198.19.0.0/16) via a "sink" namespace on the bridge whose routing table blackholes them, so
//! a connection that escapes capture dies there. No namespace has a route to the machine's own
//! interfaces or a default route. Namespaces created here are deleted on drop.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::netns::{in_namespace, listen_in, run};
use crate::process::ChildGuard;

/// The node's address on the pod bridge.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The sink's address on the pod bridge: pods route service addresses to it.
pub const SINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Where service virtual IPs come from (blackholed by the sink).
pub const SERVICE_RANGE: &str = "198.19.0.0/16";

/// One pod's network namespace.
#[derive(Clone, Debug)]
pub struct PodNet {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// The node namespace and its pods.
pub struct Node {
    pub netns: String,
    prefix: String,
    /// Whether this module created the node namespace (and deletes it).
    owns_node: bool,
    /// Namespaces to delete on drop: the sink and the pods.
    owned: Mutex<Vec<String>>,
    next_link: AtomicU32,
}

impl Node {
    /// Creates the node namespace `<prefix>-node` with its bridge.
    pub fn create(prefix: &str) -> Node {
        let netns = format!("{prefix}-node");
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        run(&["ip", "netns", "add", &netns]);
        run(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        Node::with_bridge(netns, prefix, true)
    }

    /// Puts the pod bridge into an existing node namespace (the Kubernetes fixture's), which
    /// is left in place on drop.
    pub fn attach(netns: &str, prefix: &str) -> Node {
        Node::with_bridge(netns.to_string(), prefix, false)
    }

    fn with_bridge(netns: String, prefix: &str, owns_node: bool) -> Node {
        let node = Node {
            netns,
            prefix: prefix.to_string(),
            owns_node,
            owned: Mutex::new(Vec::new()),
            next_link: AtomicU32::new(1),
        };
        let ns = node.netns.as_str();
        run(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{NODE_IP}/16"),
            "dev",
            "br0",
        ]);
        run(&["ip", "-n", ns, "link", "set", "br0", "up"]);
        // The sink: where service addresses that escape capture end, in a blackhole.
        let sink = node.add_netns("sink", SINK_IP);
        run(&[
            "ip",
            "-n",
            &sink,
            "route",
            "add",
            "blackhole",
            SERVICE_RANGE,
        ]);
        node
    }

    /// Adds a pod namespace `<prefix>-<name>` with `ip`/16 on its `eth0`.
    pub fn add_pod(&self, name: &str, ip: Ipv4Addr) -> PodNet {
        let netns = self.add_netns(name, ip);
        run(&[
            "ip",
            "-n",
            &netns,
            "route",
            "add",
            SERVICE_RANGE,
            "via",
            &SINK_IP.to_string(),
        ]);
        PodNet {
            name: name.to_string(),
            netns,
            ip,
        }
    }

    /// A namespace on the bridge with `ip`/16 on its `eth0`.
    fn add_netns(&self, name: &str, ip: Ipv4Addr) -> String {
        let netns = format!("{}-{name}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        run(&["ip", "netns", "add", &netns]);
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(netns.clone());
        let link = format!("p{}", self.next_link.fetch_add(1, Ordering::Relaxed));
        run(&[
            "ip",
            "-n",
            &self.netns,
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        run(&[
            "ip",
            "-n",
            &self.netns,
            "link",
            "set",
            &link,
            "master",
            "br0",
        ]);
        run(&["ip", "-n", &self.netns, "link", "set", &link, "up"]);
        run(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        run(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/16"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        netns
    }

    /// Deletes a pod's namespace (its processes must be gone).
    pub fn remove_pod(&self, pod: &PodNet) {
        let _ = Command::new("ip")
            .args(["netns", "del", &pod.netns])
            .output();
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|netns| *netns != pod.netns);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let owned = std::mem::take(&mut *self.owned.lock().unwrap_or_else(|p| p.into_inner()));
        for netns in &owned {
            let _ = Command::new("ip").args(["netns", "del", netns]).output();
        }
        if self.owns_node {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .output();
        } else {
            let _ = Command::new("ip")
                .args(["-n", &self.netns, "link", "del", "br0"])
                .output();
        }
    }
}

/// Forwards TCP connections accepted on an address inside a namespace to a loopback address
/// of the host: the one way out of the pod network, for the control plane's xDS port only.
/// Stops accepting on drop.
pub struct Relay {
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(netns: &str, listen: SocketAddr, target: SocketAddr) -> Relay {
        assert!(target.ip().is_loopback(), "the relay only reaches loopback");
        let listener = listen_in(netns, listen);
        listener.set_nonblocking(true).expect("nonblocking relay");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Accepting runs on a thread of the host's namespace, so connections to the target
        // are made there; the listening socket stays in the pod network.
        std::thread::spawn(move || accept_loop(listener, target, stopped));
        Relay { stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((inbound, _)) => {
                let _ = inbound.set_nonblocking(false);
                if let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    pipe(inbound, outbound);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return,
        }
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        copy(a, b2);
        copy(b, a2);
    }
}

/// Runs `command` (program resolved among this workspace's binaries when it is one) inside
/// `pod` as `uid`/`gid` with exactly `env` plus PATH, as a container would run.
pub fn spawn_in_pod(
    name: &str,
    pod: &PodNet,
    command: &[String],
    env: &[(String, String)],
    uid: u32,
    gid: u32,
) -> ChildGuard {
    let program = resolve(&command[0]);
    let mut process = Command::new("ip");
    process
        .args(["netns", "exec", &pod.netns, "setpriv"])
        .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
        .arg("--clear-groups")
        .arg(program)
        .args(&command[1..])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    ChildGuard::spawn(name, process)
}

/// Whether a connection from `pod` to `target` as the proxy's uid (1337, which capture never
/// redirects) is answered within 4 s. It leaves from a fixed port below the ephemeral range:
/// the unanswered attempt's conntrack entry outlives it (two minutes), and a later connection
/// of the pod that drew the same source port would match that entry and miss capture too. The
/// probe is the system's Python (one the uid can run); a probe that does not run panics rather
/// than passing for a connection that failed.
pub fn escapes_capture(pod: &PodNet, target: SocketAddr) -> bool {
    const NOT_ANSWERED: i32 = 3;
    let script = format!(
        "import socket, sys\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', 31337))\n\
         s.settimeout(4)\n\
         try:\n    s.connect((sys.argv[1], int(sys.argv[2])))\n\
         except OSError:\n    sys.exit({NOT_ANSWERED})\n"
    );
    let mut probe = spawn_in_pod(
        "escape",
        pod,
        &[
            "/usr/bin/python3".into(),
            "-c".into(),
            script,
            target.ip().to_string(),
            target.port().to_string(),
        ],
        &[],
        1337,
        1337,
    );
    match probe.wait_timeout(Duration::from_secs(20)) {
        Some(status) if status.success() => true,
        Some(status) if status.code() == Some(NOT_ANSWERED) => false,
        other => panic!("the capture escape probe did not run as it should: {other:?}"),
    }
}

/// Runs a command to completion inside `pod` as root (an init container); panics with its
/// output if it fails.
pub fn run_in_pod(pod: &PodNet, command: &[String]) -> String {
    let program = resolve(&command[0]);
    let mut args: Vec<String> = vec![
        "ip".into(),
        "netns".into(),
        "exec".into(),
        pod.netns.clone(),
        program,
    ];
    args.extend(command[1..].iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&args)
}

/// A workspace binary's path for its bare name, else the name (found on PATH).
fn resolve(program: &str) -> String {
    if program.contains('/') {
        return program.to_string();
    }
    let exe = std::env::current_exe().expect("test executable");
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(program));
    match candidate {
        Some(path) if path.exists() => path.display().to_string(),
        _ => program.to_string(),
    }
}

/// An HTTP/1.1 request made from inside `pod` (by the test process, uid 0: captured like any
/// app that is not the proxy).
pub fn request_from(
    pod: &PodNet,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String, String)> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let method = method.to_string();
    let path = path.to_string();
    in_namespace(&pod.netns, move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        crate::http_request(addr, &method, &path, &headers, "")
    })
}

/// A counter or gauge from the admin endpoint of the sidecar in `pod` (127.0.0.1:15000).
pub fn sidecar_stat(pod: &PodNet, name: &str) -> Option<u64> {
    let name = name.to_string();
    in_namespace(&pod.netns, move || {
        crate::admin_stat(SocketAddr::from(([127, 0, 0, 1], 15000)), &name)
    })
}

/// GET on the sidecar's admin endpoint in `pod`; the body.
pub fn sidecar_admin(pod: &PodNet, path: &str) -> Option<String> {
    let path = path.to_string();
    in_namespace(&pod.netns, move || {
        crate::http_get(SocketAddr::from(([127, 0, 0, 1], 15000)), &path)
            .ok()
            .map(|(_, _, body)| body)
    })
}

/// GET `path` on `vip:80` through the caller's sidecar (with `host` as Host if given); the
/// status and the echo upstream that answered.
pub fn call(from: &PodNet, vip: Ipv4Addr, path: &str, host: Option<&str>) -> (u16, String) {
    let host = host.map(|host| ("Host", host));
    let (status, _, body) = request_from(
        from,
        SocketAddr::from((vip, 80)),
        "GET",
        path,
        host.as_slice(),
    )
    .unwrap_or_else(|error| panic!("GET {vip}{path}: {error}"));
    let upstream = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["upstream"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, upstream)
}
