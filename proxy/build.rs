//! Release builds of `remora-proxy` on x86_64 Linux (glibc) are linked for a small footprint:
//!
//! - `--symbol-ordering-file=link-order.txt`: functions a proxy runs, request path first, are
//!   laid out together (see `bench/orderfile`, which generates the file). The kernel maps the
//!   cached pages around every fault, so scattered code costs resident memory: about 3 MB here.
//!   A function missing from the file (a stale file) is simply placed after the listed ones.
//! - `-z pack-relative-relocs`: relocations as a compact bitmap (DT_RELR), about 0.5 MB less
//!   to read at every start. The binary then needs glibc 2.36 or newer where it runs.
//!
//! Both need LLD, Rust's default linker on this target since 1.90 (older toolchains link
//! plainly), or a linker with the same options; `REMORA_PLAIN_LINK=1` turns them off.

use std::env;
use std::process::Command;

/// Whether rustc links with its bundled LLD by default here (1.90 and newer).
fn rustc_links_with_lld() -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let Ok(output) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&output.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|number| number.split('.').nth(1))
        .and_then(|minor| minor.parse::<u32>().ok());
    minor.is_some_and(|minor| minor >= 90)
}

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=REMORA_PLAIN_LINK");
    let target = |key: &str| env::var(key).unwrap_or_default();
    let linux_gnu_x86_64 = target("CARGO_CFG_TARGET_OS") == "linux"
        && target("CARGO_CFG_TARGET_ENV") == "gnu"
        && target("CARGO_CFG_TARGET_ARCH") == "x86_64";
    let release = target("PROFILE") == "release";
    if !linux_gnu_x86_64
        || !release
        || env::var_os("REMORA_PLAIN_LINK").is_some()
        || !rustc_links_with_lld()
    {
        return;
    }
    let order = std::path::Path::new(&target("CARGO_MANIFEST_DIR")).join("link-order.txt");
    for arg in [
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        "-Wl,--no-warn-symbol-ordering".to_string(),
        "-Wl,-z,pack-relative-relocs".to_string(),
    ] {
        println!("cargo:rustc-link-arg-bin=remora-proxy={arg}");
    }
}
