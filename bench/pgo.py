#!/usr/bin/env python3
"""bench/pgo: the release build we benchmark and ship, optimised with a profile of its own
request path (profile-guided optimisation, PGO).

Why: a request crosses a few large async state machines (the router's `forward` alone is some
85 KB of code) in which the lines every request runs sit among error, retry and upgrade paths.
Callgrind's cache model counted 2.3 times the L1 instruction-cache misses per request of the
bare hyper forwarder, for 8% more instructions. Built with a profile, the compiler inlines by
measured heat and lays hot blocks together, cold ones apart. See bench/README.md, "Release
build: profile-guided".

    bench/pgo               # instrumented build, training, optimised build (target/release)
    bench/pgo --retrain     # train again even if the instrumented binary has not changed

Steps, all into $CARGO_TARGET_DIR (default target/):
  1. `cargo build --release --workspace` with `-Cprofile-generate`, into `pgo-instrumented/`.
     The whole workspace, exactly as the final build: symbol names, which the profile is keyed
     by, depend on the packages built together (and on `--bin` filters).
  2. Training, natively, one worker, remora-echo as upstream: the bench's default bootstrap
     (HTTP/1.1 kept alive and a connection per request, h2c, tcp_proxy), the features
     bootstrap (least request, outlier detection, retries, access log, 1% tracing), a mTLS
     sidecar pair (HTTP and L4), the admin pages; and remora-bare-fwd, the bench's reference,
     so that it is built the same way as the proxy it is compared with.
  3. `llvm-profdata merge` into `pgo/<hash of the instrumented binaries>.profdata`. An unchanged
     instrumented build reuses its profile, so the next step is then a no-op too.
  4. `cargo build --release --workspace` with `-Cprofile-use`.

Needs the rustup component llvm-tools (installed here if missing), wrk, h2load and openssl.
Every load step is bounded and targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402 - the benchmark's process helpers
import features  # noqa: E402
import mtls  # noqa: E402

TRAINED = ("remora-proxy", "remora-bare-fwd")  # the others' profiles are discarded
LOAD_SECONDS = 2.0


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR") or b.REPO / "target")


def llvm_profdata() -> Path:
    """llvm-profdata from rustup's llvm-tools: its profile format matches rustc's LLVM."""
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True,
                             check=True).stdout.strip()
    host = next(line.split()[1] for line in subprocess.run(
        ["rustc", "-vV"], capture_output=True, text=True, check=True).stdout.splitlines()
        if line.startswith("host:"))
    tool = Path(sysroot) / "lib" / "rustlib" / host / "bin" / "llvm-profdata"
    if not tool.exists():
        b.log("rustup component add llvm-tools")
        subprocess.run(["rustup", "component", "add", "llvm-tools"], check=True, timeout=600)
    return tool


def cargo_release(target: Path, rustflags: str, selection: list[str]) -> None:
    flags = " ".join(filter(None, [os.environ.get("RUSTFLAGS", ""), rustflags]))
    env = dict(os.environ, CARGO_TARGET_DIR=str(target), RUSTFLAGS=flags)
    b.log(f"RUSTFLAGS={rustflags!r} cargo build --release {' '.join(selection)} (target {target})")
    subprocess.run(["cargo", "build", "--release", *selection], cwd=b.REPO, env=env, check=True,
                   timeout=3600)


def spawn(binary: Path, args: list[str], work: Path, label: str, raw: Path):
    """Starts an instrumented binary; only TRAINED binaries write where the profile is read."""
    keep = binary.name in TRAINED
    profile = (raw if keep else work / "discarded") / f"{label}-%p-%m.profraw"
    return b.spawn([str(binary), *args], cpus=None, logfile=work / f"{label}.log",
                   env=dict(os.environ, LLVM_PROFILE_FILE=str(profile)))


def finish(proc) -> None:
    """SIGINT: a prompt clean exit, which is when the profile is written."""
    proc.send_signal(2)
    proc.wait(timeout=60)
    if proc in b._children:  # noqa: SLF001 - the helper's list of processes to stop at exit
        b._children.remove(proc)  # noqa: SLF001


def load(port: int, *, close: bool = False, h2: bool = False) -> None:
    if h2:
        b.run(["h2load", "-c", "10", "-m", "10", "-n", "20000", f"http://127.0.0.1:{port}/"],
              cpus=None, timeout=120)
    else:
        extra = ["-H", "Connection: close"] if close else []
        b.run(["wrk", "-t1", "-c50", *extra, f"-d{LOAD_SECONDS:g}s", f"http://127.0.0.1:{port}/"],
              cpus=None, timeout=LOAD_SECONDS + 30)


def admin_pages(port: int) -> None:
    for page in ["ready", "stats", "stats?format=json", "stats/prometheus", "clusters",
                 "listeners", "server_info", "config_dump"]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{page}", timeout=30) as response:
            response.read()


def proxy(binary: Path, bootstrap: Path, admin: int, work: Path, label: str, raw: Path):
    proc = spawn(binary, ["-c", str(bootstrap), "--concurrency", "1", "--log-level", "warn"],
                 work, label, raw)
    if reason := b.wait_ready(proc, admin, 60):
        raise RuntimeError(f"{label}: {reason}; see {work / (label + '.log')}")
    return proc


def train(release: Path, work: Path, raw: Path) -> None:
    echo = b.free_port()
    spawn(release / "remora-echo", ["--listen", f"127.0.0.1:{echo}"], work, "echo", raw)
    sink, sink_stats = b.free_port(), b.free_port()
    spawn(release / "remora-otlp-sink", ["--listen", f"127.0.0.1:{sink}", "--stats",
                                         f"127.0.0.1:{sink_stats}"], work, "sink", raw)
    for port in (echo, sink):
        if not b.wait_tcp(port, 30):
            raise RuntimeError(f"training upstream on {port} did not start; see {work}")
    remora = release / "remora-proxy"

    b.log("training: the bench's default bootstrap")
    shapes = b.Bench(argparse.Namespace(upstream="echo"), work)
    shapes.ports.update(UPSTREAM_HTTP_PORT=echo, UPSTREAM_TCP_PORT=echo)
    ports = {name: b.free_port() for name in ("ADMIN_PORT", "HTTP_PORT", "TCP_PORT")}
    proc = proxy(remora, shapes.render_bootstrap("default.yaml", 0, ports, tuned=False),
                 ports["ADMIN_PORT"], work, "default", raw)
    load(ports["HTTP_PORT"])
    load(ports["HTTP_PORT"], close=True)
    load(ports["HTTP_PORT"], h2=True)
    load(ports["TCP_PORT"])
    admin_pages(ports["ADMIN_PORT"])
    finish(proc)

    b.log("training: the features bootstrap")
    ports = {"ADMIN_PORT": b.free_port(), "HTTP_PORT": b.free_port(),
             "UPSTREAM_HTTP_PORT": echo, "SINK_PORT": sink}
    proc = proxy(remora, features.render(work, "remora", ports, True), ports["ADMIN_PORT"],
                 work, "features", raw)
    load(ports["HTTP_PORT"])
    finish(proc)

    b.log("training: a mTLS sidecar pair")
    mtls.make_pki(work)
    ports = {key: b.free_port() for key in
             ("C_ADMIN", "S_ADMIN", "HTTP_PORT", "TCP_PORT", "MTLS_PORT")}
    ports["UPSTREAM_HTTP_PORT"] = echo
    client, server = mtls.render(work, "remora", ports)
    server_proc = proxy(remora, server, ports["S_ADMIN"], work, "mtls-server", raw)
    client_proc = proxy(remora, client, ports["C_ADMIN"], work, "mtls-client", raw)
    load(ports["HTTP_PORT"])
    load(ports["TCP_PORT"], close=True)
    finish(client_proc)
    finish(server_proc)

    b.log("training: remora-bare-fwd")
    http, admin = b.free_port(), b.free_port()
    proc = spawn(release / "remora-bare-fwd",
                 ["--listen", f"127.0.0.1:{http}", "--upstream", f"127.0.0.1:{echo}",
                  "--admin", f"127.0.0.1:{admin}"], work, "bare", raw)
    if not b.wait_tcp(http, 30):
        raise RuntimeError(f"remora-bare-fwd did not listen; see {work / 'bare.log'}")
    load(http)
    finish(proc)


def profile(target: Path, retrain: bool) -> Path:
    """Steps 1 to 3: the merged profile of the current code."""
    instrumented = target / "pgo-instrumented"
    raw_dir = target / "pgo" / "raw"
    # The whole workspace, not just the binaries trained: `--bin` filters change how features
    # unify, and with them every symbol hash, and a profile keyed by other names matches nothing.
    cargo_release(instrumented, f"-Cprofile-generate={raw_dir}", ["--workspace"])
    release = instrumented / "release"
    digest = hashlib.sha256()
    for name in TRAINED:
        digest.update((release / name).read_bytes())
    merged = target / "pgo" / f"{digest.hexdigest()[:16]}.profdata"
    if merged.exists() and not retrain:
        b.log(f"the instrumented build is unchanged: reusing {merged}")
        return merged
    shutil.rmtree(raw_dir, ignore_errors=True)
    raw_dir.mkdir(parents=True)
    atexit.register(b.stop_all)
    with tempfile.TemporaryDirectory(prefix="remora-pgo-") as tmp:
        train(release, Path(tmp), raw_dir)
        b.stop_all()
    raws = sorted(raw_dir.glob("*.profraw"))
    for name, label in (("remora-proxy", "default"), ("remora-bare-fwd", "bare")):
        if not any(raw.name.startswith(label + "-") for raw in raws):
            raise RuntimeError(f"{name} wrote no profile (did it exit cleanly?)")
    for stale in merged.parent.glob("*.profdata"):
        stale.unlink()
    subprocess.run([str(llvm_profdata()), "merge", "-o", str(merged), *map(str, raws)],
                   check=True, timeout=600)
    shutil.rmtree(raw_dir)
    b.log(f"profile: {merged} ({merged.stat().st_size // 1024} KiB from {len(raws)} runs)")
    return merged


def proxy_symbols(binary: Path) -> set[str]:
    out = subprocess.run(["nm", "--defined-only", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    return {name for name in (line.split()[-1] for line in out.splitlines() if line.strip())
            if "remora_proxy" in name}


def build(target: Path, retrain: bool = False) -> Path:
    """All four steps into the cargo target dir `target`; returns its release directory."""
    merged = profile(target, retrain)
    # The profile's file name changes with its content, so cargo rebuilds when it does.
    cargo_release(target, f"-Cprofile-use={merged}", ["--workspace"])
    # rustc is silent when a profile names other functions than the build has; check that the
    # two builds named the proxy's functions alike (inlining differs, so not all are in both).
    if shutil.which("nm"):
        trained = proxy_symbols(target / "pgo-instrumented" / "release" / "remora-proxy")
        built = proxy_symbols(target / "release" / "remora-proxy")
        shared = len(built & trained) / max(len(built), 1)
        if shared < 0.5:
            raise RuntimeError(f"the profile does not fit the build: {shared:.0%} of the proxy's "
                               "functions have the names it was trained with")
        b.log(f"{shared:.0%} of the proxy's functions carry their trained names")
    return target / "release"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/pgo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrain", action="store_true",
                        help="train again even if the instrumented binaries are unchanged")
    args = parser.parse_args(argv)
    for tool in ("wrk", "h2load", "openssl"):
        if not shutil.which(tool):
            print(f"bench/pgo: {tool} not found (bench/run --install)", file=sys.stderr)
            return 1
    release = build(target_dir(), args.retrain)
    b.log(f"optimised binaries in {release}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
