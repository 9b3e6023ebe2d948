#!/usr/bin/env python3
"""What tracing costs: requests/s and CPU per request of remora and Envoy with the same
bootstrap untraced, at 1% and at 100% sampling (OpenTelemetry tracer, OTLP/gRPC to a
receiver that counts and drops spans), in the same rounds. Each proxy is compared with itself:
the figure is its traced req/s over its untraced req/s.

Driven by bench/tracing (see bench/README.md, "Tracing overhead"). Reuses bench.py's process,
pinning and load-tool helpers; Python 3.11 stdlib only; every load step is bounded and targets
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import string
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (the shared helpers)

MODES = (("untraced", None), ("1%", 1), ("100%", 100))
MARK_START = "<!-- tracing overhead: written by bench/tracing; bench/run keeps it -->"
MARK_END = "<!-- end of tracing overhead -->"

TEMPLATE = """admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN_PORT}}}
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: ${HTTP_PORT}}}
    traffic_direction: INBOUND
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench_http
          codec_type: AUTO
          generate_request_id: true
${TRACING}          route_config:
            name: bench_route
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: upstream_http}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              dynamic_stats: false
  clusters:
  - name: upstream_http
    type: STATIC
    connect_timeout: 1s
    circuit_breakers:
      thresholds:
      - {max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000, max_retries: 1000000}
    load_assignment:
      cluster_name: upstream_http
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${UPSTREAM_HTTP_PORT}}}}
  - name: otlp_sink
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: otlp_sink
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${SINK_PORT}}}}
"""

TRACING = """          tracing:
            random_sampling: {value: %s}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {envoy_grpc: {cluster_name: otlp_sink}, timeout: 5s}
                service_name: bench
"""


def spans_received(stats_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/", timeout=5) as response:
        return int(response.read().decode().strip() or 0)


def render(workdir: Path, name: str, ports: dict, percent: int | None) -> Path:
    tracing = TRACING % percent if percent is not None else ""
    path = workdir / f"tracing-{name}-{percent}.yaml"
    path.write_text(string.Template(TEMPLATE).substitute(**ports, TRACING=tracing))
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/tracing", description=__doc__)
    b.slice_bench_args(p, "proxy and mode")
    p.add_argument("--also", action="append", default=[], metavar="NAME=BINARY",
                   help="another remora-proxy build to measure in the same rounds")
    p.add_argument("--no-pin", action="store_true")
    args = p.parse_args(argv)
    started, envoy_bin, info, target = b.start_slice_bench(args, ["remora-proxy", "remora-otlp-sink"])
    sink_bin = target / "remora-otlp-sink"
    base_id = os.getpid() % 1000 * 10 + 5
    commands = {
        "envoy": [envoy_bin, "-c", "{BOOTSTRAP}", "--concurrency", "1", "--disable-hot-restart",
                  "--base-id", "{BASE_ID}", "--log-level", "warn"],
        "remora": [str(target / "remora-proxy"), "-c", "{BOOTSTRAP}", "--concurrency", "1"],
    }
    for also in args.also:
        name, _, binary = also.partition("=")
        commands[name] = [binary, "-c", "{BOOTSTRAP}", "--concurrency", "1"]
    results: dict = {name: {mode: [] for mode, _ in MODES} for name in commands}
    with tempfile.TemporaryDirectory(prefix="remora-bench-tracing-") as tmp:
        workdir = Path(tmp)
        upstream = b.Bench(argparse.Namespace(upstream="nginx", nginx=args.nginx), workdir)
        upstream.start_upstreams(None)
        for round_index in range(args.repeat):
            b.log(f"round {round_index + 1}/{args.repeat}")
            measured = run_round(commands, upstream.ports["UPSTREAM_HTTP_PORT"], sink_bin,
                                 base_id + round_index * 10, args, workdir, round_index)
            for (name, mode), figures in measured.items():
                results[name][mode].append(figures)
        b.stop_all()
    text = report(results, info, argv, started, args)
    print(text)
    b.write_section(args.out, text, MARK_START, MARK_END)
    return 0


def run_round(commands: dict, upstream_port: int, sink_bin: Path, base_id: int, args,
              workdir: Path, round_index: int, modes=MODES, render_mode=None) -> dict:
    """Starts every proxy in every mode at once (each with its own OTLP sink), then runs wrk
    on them in turn, one slice each, until each has had its duration: slow drifts of a busy
    machine fall on every variant alike. `modes` are (name, value) pairs; `render_mode`
    (workdir, name, ports, value) writes a mode's bootstrap (default: this bench's)."""
    render_mode = render_mode or render
    variants = {}
    procs = []
    for index, name in enumerate(commands):
        for mode, percent in modes:
            sink_port, sink_stats = b.free_port(), b.free_port()
            procs.append(b.spawn([str(sink_bin), "--listen", f"127.0.0.1:{sink_port}",
                                  "--stats", f"127.0.0.1:{sink_stats}"], cpus=b.LOAD_CPUS,
                                 logfile=workdir / f"sink-{name}-{mode}.log"))
            ports = {"ADMIN_PORT": b.free_port(), "HTTP_PORT": b.free_port(),
                     "UPSTREAM_HTTP_PORT": upstream_port, "SINK_PORT": sink_port}
            bootstrap = render_mode(workdir, f"{name}-{round_index}", ports, percent)
            cmd = [part.replace("{BOOTSTRAP}", str(bootstrap))
                   .replace("{BASE_ID}", str(base_id + index * 3 + len(variants) % 3))
                   for part in commands[name]]
            proc = b.spawn(cmd, cpus=None if args.no_pin else b.PROXY_CPUS,
                           logfile=workdir / f"{name}-{mode}-{round_index}.log")
            procs.append(proc)
            variants[(name, mode)] = {"proc": proc, "ports": ports, "sink_stats": sink_stats}
    try:
        for (name, mode), v in variants.items():
            if not b.wait_tcp(v["sink_stats"], 10):
                raise SystemExit("remora-otlp-sink did not start")
            failure = b.wait_ready(v["proc"], v["ports"]["ADMIN_PORT"], 60)
            if failure:
                raise RuntimeError(f"{name} {mode}: {failure}")
            b.wrk(v["ports"]["HTTP_PORT"], 1, 50)  # warm-up: connections, pools, exports
            v["spans0"] = spans_received(v["sink_stats"])
        measured = b.sliced_wrk({key: (v["ports"]["HTTP_PORT"], v["proc"].pid)
                                 for key, v in variants.items()}, args.duration, args.slice)
        for key, totals in measured.items():
            variants[key].update(totals)
        # Spans still queued arrive within a flush interval (5 s) after the load.
        time.sleep(6)
        out = {}
        for key, v in variants.items():
            out[key] = {"rps": v["requests"] / v["wall"],
                        "cpu_per_100k": v["cpu"] / v["requests"] * 100_000,
                        "sys_per_100k": v["sys"] / v["requests"] * 100_000,
                        "requests": v["requests"], "failed": v["failed"],
                        "spans": spans_received(v["sink_stats"]) - v["spans0"]}
        return out
    finally:
        for proc in procs:
            b.stop(proc)


def report(results: dict, info: list, argv: list[str], started: float, args) -> str:
    names = list(results)

    def med(name: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name][mode])

    def ratio(name: str, mode: str, key: str = "rps") -> float:
        # Per round: traced over untraced, measured in interleaved slices; the median.
        return statistics.median(t[key] / u[key] for t, u in
                                 zip(results[name][mode], results[name]["untraced"]))

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(n) for n in names) + " |"

    lines = [MARK_START, "## Tracing overhead", "",
             f"Produced by `bench/tracing {' '.join(argv)}`; see bench/README.md. In each of "
             f"{args.repeat} rounds every proxy runs untraced, at 1% and at 100% sampling (all "
             "at once, each on CPU 1; wrk, nginx and one OTLP receiver per variant, "
             "`remora-otlp-sink`, which counts and drops, on CPU 0), and `wrk -t1 -c50` goes "
             f"to each in turn in {args.slice:g} s slices until each had {args.duration:g} s, "
             "so that a busy machine's drifts fall on every variant alike. Same bootstrap for "
             "every proxy (request ids on in every mode; the OpenTelemetry tracer over "
             "OTLP/gRPC). Each figure is the median over rounds, each ratio the median of the "
             "per-round ratios of a proxy to itself untraced.", "",
             *[f"- {k}: {v}" for k, v in info],
             f"- run time: {time.monotonic() - started:.0f}s", "",
             "| figure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for mode, _ in MODES:
        lines.append(row(f"req/s, {mode}", lambda n, m=mode: f"{med(n, m, 'rps'):,.0f}"))
    for mode, _ in MODES:
        lines.append(row(f"CPU s per 100k req, {mode}",
                         lambda n, m=mode: f"{med(n, m, 'cpu_per_100k'):.3f}"))
    for mode, _ in MODES[1:]:
        lines.append(row(f"req/s {mode} / untraced (↑)",
                         lambda n, m=mode: f"{ratio(n, m):.3f}x"))
    for mode, _ in MODES[1:]:
        lines.append(row(f"CPU per request {mode} / untraced (↓)",
                         lambda n, m=mode: f"{ratio(n, m, 'cpu_per_100k'):.3f}x"))
    for mode, _ in MODES[1:]:
        lines.append(row(f"spans received per request, {mode}",
                         lambda n, m=mode: f"{med(n, m, 'spans') / med(n, m, 'requests'):.3f}"))
    one, full = ratio("remora", "1%"), ratio("remora", "100%")
    e_one, e_full = ratio("envoy", "1%"), ratio("envoy", "100%")
    lines += ["", "Targets: at 1% remora keeps at least 0.97x of its untraced req/s "
              f"({one:.3f}x: {'met' if one >= 0.97 else 'not met'}), at 100% at least 0.85x "
              f"({full:.3f}x: {'met' if full >= 0.85 else 'not met'}), and its ratio stays ahead "
              f"of Envoy's (1%: {one:.3f}x vs {e_one:.3f}x, 100%: {full:.3f}x vs {e_full:.3f}x: "
              f"{'met' if one >= e_one and full >= e_full else 'not met'}).",
              "", "Per round, traced/untraced req/s: "
              + "; ".join(f"{n} {m}: " + ", ".join(f"{t['rps'] / u['rps']:.3f}" for t, u in
                                                    zip(results[n][m], results[n]['untraced']))
                          for n in names for m, _ in MODES[1:]) + "."]
    return b.end_section(lines, results, [m for m, _ in MODES], MARK_END)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
