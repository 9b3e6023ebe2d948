//! Shared helpers for Remora's end-to-end tests: finding the workspace's binaries, running real
//! processes that are killed when the test ends, picking free loopback ports, polling with a
//! deadline (never sleeping as synchronisation), starting a real Envoy, and an echo upstream that
//! reports what reached it, one that follows a script ([`scripted`]), upstreams whose health a
//! test controls ([`health`]); a real Kubernetes control plane ([`kube`]).

pub mod echo;
pub mod envoy;
pub mod health;
pub mod jaeger;
pub mod kube;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod pods;
pub mod process;
pub mod scripted;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Path of a binary built from this workspace (`target/<profile>/<name>`), located from the
/// running test executable so a custom `CARGO_TARGET_DIR` works.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>  →  target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "binary {} not found; build it first (cargo build --workspace, or run tests with --workspace)",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    // Not from the kernel's ephemeral range (32768 and up by default): a port from there can be
    // handed to some process's outgoing connection between this probe and the bind that
    // follows. Below it, only another test could take it; tests are spread out by process id.
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (LOW + (start + step * 7) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
}

/// Calls `probe` until it returns `Some`, or panics with `what` once `timeout` has passed.
pub fn wait_for<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, probe)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Calls `probe` until it returns `Some`, or gives `None` once `timeout` has passed. The one
/// place the test harness waits between synchronous polls (backing off from 5 to 100 ms).
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// [`wait_for`] for probes that are futures (inside a tokio test).
pub async fn wait_for_async<T, F>(what: &str, timeout: Duration, mut probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits until `at`. Only for shaping load in time (a change rate, a slow client), which is
/// the behaviour under test there; never for synchronisation, which polls with [`wait_for`].
pub fn pace_until(at: Instant) {
    if let Some(wait) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// Writes `pieces` one by one, `gap` before each: a slow peer, paced on a fixed schedule.
pub fn write_paced(
    out: &mut impl std::io::Write,
    pieces: &[&[u8]],
    gap: Duration,
) -> std::io::Result<()> {
    let start = Instant::now();
    for (i, piece) in pieces.iter().enumerate() {
        pace_until(start + gap * (i as u32 + 1));
        out.write_all(piece)?;
        out.flush()?;
    }
    Ok(())
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    wait_for(&format!("a listener on {addr}"), timeout, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .ok()
            .map(|_| ())
    });
}

/// A blocking HTTP/1.1 GET over a fresh connection; returns (status, headers, body).
/// Deliberately minimal so tests can talk to admin endpoints without an async runtime.
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String, String)> {
    http_request(addr, "GET", path_and_query, &[], "")
}

/// A blocking HTTP/1.1 request with `Connection: close`; returns (status, raw headers, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!("{method} {path_and_query} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {head:?}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        decode_chunked(rest)
    } else {
        rest.to_string()
    };
    Ok((status, head.to_string(), body))
}

/// The body of a chunked message (trailers dropped); stops at the last chunk or at bad framing.
pub fn decode_chunked(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// One counter or gauge from an Envoy-style admin `/stats` (Envoy's or remora-proxy's), if
/// the admin answers and has it.
pub fn admin_stat(admin: SocketAddr, name: &str) -> Option<u64> {
    // The regex `^name$` with dots escaped, percent-encoded: both admins decode the query.
    let filter = format!("/stats?filter=%5E{}%24", name.replace('.', "%5C."));
    let (_, _, body) = http_get(admin, &filter).ok()?;
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|value| value.trim().parse().ok())
}

/// Whether a program is on PATH (for tests that need a real peer such as `envoy` or `etcd`).
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Ends a test that cannot run on this machine: prints `SKIPPED test: reason`, so a developer
/// without Envoy, etcd or root still gets a green run of the rest. Under CI
/// (`REMORA_REQUIRE_ALL=1`, which `.ci/run` sets after installing every tool) it fails instead:
/// there a skip can only mean a broken install, and must not pass silently.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("REMORA_REQUIRE_ALL").is_ok_and(|value| value == "1") {
        panic!("{test} must run here (REMORA_REQUIRE_ALL=1) but cannot: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}
