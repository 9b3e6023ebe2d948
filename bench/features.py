#!/usr/bin/env python3
"""The HTTP bench with the features a mesh turns on, for remora and Envoy with the same
bootstrap, in the same rounds: least-request balancing over two endpoints, outlier detection,
a retry policy, an access log to a file and OpenTelemetry tracing at 1% sampling (OTLP/gRPC to
a receiver that counts and drops spans), beside the same bootstrap with none of them. The
figures are remora over Envoy with the features on (issue 18's target: at least 3x the
requests/s at most 0.3x the CPU per request), and what the features cost each proxy.

Driven by bench/features (see bench/README.md, "Features on"). The rounds are bench/tracing's
(every variant running at once, wrk going to each in turn in slices); Python 3.11 stdlib only;
every load step is bounded and targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (the shared helpers)
import tracing  # noqa: E402  (the rounds and the OTLP receiver)

MODES = (("off", False), ("on", True))
MARK_START = "<!-- features on: written by bench/features; bench/run keeps it -->"
MARK_END = "<!-- end of features on -->"

# The features, each where the bootstrap takes it; empty when off.
ACCESS_LOG = """          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${ACCESS_LOG_PATH}
"""
RETRY = """                  retry_policy: {retry_on: "5xx,reset,connect-failure", num_retries: 2}
"""
CLUSTER = """    lb_policy: LEAST_REQUEST
    outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection_time: 30s}
"""


def render(workdir: Path, name: str, ports: dict, on: bool) -> Path:
    """bench/tracing's bootstrap, its upstream cluster given two endpoints (the same nginx
    twice, so both proxies balance over two hosts) and, when `on`, the features."""
    text = tracing.TEMPLATE.replace(
        "        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: "
        "${UPSTREAM_HTTP_PORT}}}}\n",
        "        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: "
        "${UPSTREAM_HTTP_PORT}}}}\n" * 2, 1)
    if on:
        text = text.replace("${TRACING}", tracing.TRACING % 1 + ACCESS_LOG, 1)
        text = text.replace("                route: {cluster: upstream_http}\n",
                            "                route:\n                  cluster: upstream_http\n"
                            + RETRY, 1)
        text = text.replace("  - name: upstream_http\n    type: STATIC\n",
                            "  - name: upstream_http\n    type: STATIC\n" + CLUSTER, 1)
    else:
        text = text.replace("${TRACING}", "", 1)
    path = workdir / f"features-{name}-{'on' if on else 'off'}.yaml"
    path.write_text(string.Template(text).substitute(
        **ports, ACCESS_LOG_PATH=workdir / f"access-{name}.log"))
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/features", description=__doc__)
    b.slice_bench_args(p, "proxy and mode")
    p.add_argument("--pin", action="store_true",
                   help="proxies on CPU 1, wrk, nginx and the OTLP receivers on CPU 0 "
                        "(default: every process free to use every core, as a user runs)")
    p.add_argument("--no-instructions", action="store_true",
                   help="skip remora's instruction count under callgrind (about 40 s)")
    args = p.parse_args(argv)
    started, envoy_bin, info, target = b.start_slice_bench(args, ["remora-proxy",
                                                                "remora-otlp-sink"])
    args.no_pin = not args.pin  # tracing.run_round's switch
    base_id = os.getpid() % 1000 * 10 + 3
    commands = {
        "envoy": [envoy_bin, "-c", "{BOOTSTRAP}", "--concurrency", "1", "--disable-hot-restart",
                  "--base-id", "{BASE_ID}", "--log-level", "warn"],
        "remora": [str(target / "remora-proxy"), "-c", "{BOOTSTRAP}", "--concurrency", "1"],
    }
    results: dict = {name: {mode: [] for mode, _ in MODES} for name in commands}
    with tempfile.TemporaryDirectory(prefix="remora-bench-features-") as tmp:
        workdir = Path(tmp)
        upstream = b.Bench(argparse.Namespace(upstream="nginx", nginx=args.nginx), workdir)
        upstream.start_upstreams(None)
        for round_index in range(args.repeat):
            b.log(f"round {round_index + 1}/{args.repeat}")
            measured = tracing.run_round(commands, upstream.ports["UPSTREAM_HTTP_PORT"],
                                         target / "remora-otlp-sink",
                                         base_id + round_index * 10, args, workdir,
                                         round_index, MODES, render)
            for (name, mode), figures in measured.items():
                results[name][mode].append(figures)
        counts = {} if args.no_instructions else count_instructions(
            commands["remora"], upstream.ports["UPSTREAM_HTTP_PORT"],
            target / "remora-otlp-sink", workdir)
        b.stop_all()
    text = report(results, info, argv, started, args, counts)
    print(text)
    b.write_section(args.out, text, MARK_START, MARK_END)
    return 0


def count_instructions(command: list[str], upstream_port: int, sink_bin: Path,
                       workdir: Path) -> dict:
    """Remora's instructions per request under callgrind, features off and on (see
    bench.count_instructions): the features' cost, free of the host's noise."""
    counts = {}
    for mode, on in MODES:
        b.log(f"remora, features {mode}: instructions per request under callgrind")
        sink_port, sink_stats = b.free_port(), b.free_port()
        sink = b.spawn([str(sink_bin), "--listen", f"127.0.0.1:{sink_port}", "--stats",
                        f"127.0.0.1:{sink_stats}"], cpus=None,
                       logfile=workdir / f"sink-callgrind-{mode}.log")
        ports = {"ADMIN_PORT": b.free_port(), "HTTP_PORT": b.free_port(),
                 "UPSTREAM_HTTP_PORT": upstream_port, "SINK_PORT": sink_port}
        bootstrap = render(workdir, "callgrind", ports, on)
        try:
            counts[mode] = b.count_instructions(
                [part.replace("{BOOTSTRAP}", str(bootstrap)) for part in command], ports,
                workdir / f"remora-callgrind-{mode}")
        finally:
            b.stop(sink)
    return counts


def instruction_line(counts: dict) -> list[str]:
    if not counts:
        return []
    off, on = counts.get("off", {}), counts.get("on", {})
    if "instructions" not in off or "instructions" not in on:
        reasons = "; ".join(f"features {mode}: {c.get('reason', 'not measured')}"
                            for mode, c in counts.items() if "instructions" not in c)
        return ["", f"Remora's instructions per request under callgrind: not measured ({reasons})."]
    return ["", f"Remora's instructions per request under callgrind ({b.INSTRUCTION_REQUESTS:,} "
            f"requests counted after {b.INSTRUCTION_WARMUP:,}, each variant alone): features off "
            f"{off['instructions']:,.0f}, on {on['instructions']:,.0f} "
            f"({on['instructions'] / off['instructions']:.2f}x); L1 instruction-cache misses "
            f"{off['i1_misses']:,.0f} and {on['i1_misses']:,.0f}. callgrind counts user-space "
            "instructions on all of remora's threads; the CPU rows above also hold the "
            "kernel's share of a request."]


def kernel_floor(results: dict) -> list[str]:
    """What the CPU target leaves to user space: with the features on, remora's kernel time
    per request (system calls, loopback TCP, the log's writes and the spans' exports) over
    Envoy's whole CPU per request, round by round, and the user time per request a 0.3x ratio
    would allow beside what remora's user space used with the features off."""
    on, off = results["remora"]["on"], results["remora"]["off"]
    envoy = results["envoy"]["on"]
    if not all("sys_per_100k" in r for r in on + off):
        return []
    floors = [r["sys_per_100k"] / e["cpu_per_100k"] for r, e in zip(on, envoy)]
    budgets = [0.3 * e["cpu_per_100k"] - r["sys_per_100k"] for r, e in zip(on, envoy)]
    user_off = statistics.median(r["cpu_per_100k"] - r["sys_per_100k"] for r in off)
    user_on = statistics.median(r["cpu_per_100k"] - r["sys_per_100k"] for r in on)
    return ["", "The kernel's part, features on: remora's system time alone is "
            f"{statistics.median(floors):.2f}x Envoy's whole CPU per request (rounds "
            + ", ".join(f"{f:.2f}x" for f in floors) + "). A 0.3x ratio would leave remora's "
            f"user space {statistics.median(budgets):.3f} s per 100k requests with the features "
            f"on; it used {user_on:.3f} with them and {user_off:.3f} without."]


def report(results: dict, info: list, argv: list[str], started: float, args,
           counts: dict | None = None) -> str:
    def med(name: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name][mode])

    def per_round(a: tuple, b_: tuple, key: str) -> list[float]:
        # a and b_: (proxy, mode); measured in the same interleaved slices of each round.
        return [x[key] / y[key] for x, y in zip(results[a[0]][a[1]], results[b_[0]][b_[1]])]

    placement = ("each proxy on CPU 1; wrk, nginx and the OTLP receivers on CPU 0" if args.pin
                 else "every process free to use every core, as a user runs them")
    lines = [MARK_START, "## Features on", "",
             f"Produced by `bench/features {' '.join(argv)}`; see bench/README.md. The tracing "
             "bench's bootstrap (request ids on) with its upstream cluster given two endpoints, "
             "once as it is and once with the features on: `lb_policy: LEAST_REQUEST`, "
             "`outlier_detection` (5 consecutive 5xx), a route `retry_policy` (5xx, reset, "
             "connect-failure; 2 retries), a file access log in the default format and the "
             "OpenTelemetry tracer at 1% random sampling. Same bootstrap for both proxies, "
             f"all four variants running through each of {args.repeat} rounds ({placement}; "
             f"`--concurrency 1`), `wrk -t1 -c50` to each in turn in {args.slice:g} s slices "
             f"until each had {args.duration:g} s. Each figure is the median over rounds, each "
             "ratio the median of the per-round ratios.", "",
             *[f"- {k}: {v}" for k, v in info],
             f"- run time: {time.monotonic() - started:.0f}s", "",
             "| figure | envoy | remora | remora/envoy | target | per round |",
             "|---|---:|---:|---:|---|---|"]
    rows = [("on", "rps", "req/s, features on", "{:,.0f}", "≥ 3x", lambda r: r >= 3),
            ("on", "cpu_per_100k", "CPU s per 100k req, features on", "{:.3f}", "≤ 0.3x",
             lambda r: r <= 0.3),
            ("on", "sys_per_100k", "of which the kernel's (system CPU), features on", "{:.3f}",
             "", None),
            ("off", "rps", "req/s, features off", "{:,.0f}", "", None),
            ("off", "cpu_per_100k", "CPU s per 100k req, features off", "{:.3f}", "", None),
            ("off", "sys_per_100k", "of which the kernel's (system CPU), features off", "{:.3f}",
             "", None)]
    for mode, key, label, number, target, check in rows:
        ratios = per_round(("remora", mode), ("envoy", mode), key)
        value = statistics.median(ratios)
        verdict = f"{target} ({'met' if check(value) else 'not met'})" if check else ""
        lines.append(f"| {label} | {number.format(med('envoy', mode, key))} | "
                     f"{number.format(med('remora', mode, key))} | {value:.2f}x | {verdict} | "
                     + ", ".join(f"{r:.2f}" for r in ratios) + " |")
    lines += ["", "What the features cost each proxy (on over off, per round, median): "
              + "; ".join(
                  f"{n} req/s {statistics.median(per_round((n, 'on'), (n, 'off'), 'rps')):.3f}x, "
                  f"CPU per request "
                  f"{statistics.median(per_round((n, 'on'), (n, 'off'), 'cpu_per_100k')):.3f}x"
                  for n in results) + ".",
              *kernel_floor(results),
              "", "Spans received per request at 1%: "
              + ", ".join(f"{n} {med(n, 'on', 'spans') / med(n, 'on', 'requests'):.4f}"
                          for n in results) + ".",
              *instruction_line(counts or {})]
    return b.end_section(lines, results, [m for m, _ in MODES], MARK_END)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
