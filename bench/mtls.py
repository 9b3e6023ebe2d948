#!/usr/bin/env python3
"""Sidecar to sidecar over mTLS: a client sidecar originates mutual TLS with a SPIFFE
certificate to a server sidecar, which terminates it (client certificate required, its URI SAN
matched) and forwards to nginx. One pair of Remora proxies and one pair of Envoys, same
bootstraps, same run:

- kept-alive: wrk -c50 through the client sidecar's HTTP listener (its upstream mTLS
  connections are pooled): requests/s and CPU per request of both sidecars together;
- new handshakes: wrk -c50 with `Connection: close` through the client sidecar's tcp_proxy
  listener, so every request is a new mTLS handshake between the two sidecars: handshakes/s
  and CPU per handshake.

Driven by bench/mtls (see bench/README.md, "Sidecar to sidecar over mTLS"). Reuses bench.py's
helpers; Python 3.11 stdlib plus the `openssl` command for the certificates; every load step is
bounded and targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (the shared helpers)

MARK_START = "<!-- mtls sidecars: written by bench/mtls; bench/run keeps it -->"
MARK_END = "<!-- end of mtls sidecars -->"
TRUST_DOMAIN = "spiffe://bench.local"

TLS_CONTEXT = """common_tls_context:
            tls_certificates: [{certificate_chain: {filename: "${DIR}/${WHO}.pem"}, private_key: {filename: "${DIR}/${WHO}.key"}}]
            validation_context:
              trusted_ca: {filename: "${DIR}/ca.pem"}
              match_typed_subject_alt_names: [{san_type: URI, matcher: {${MATCH}}}]"""

SERVER = """admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN_PORT}}}
static_resources:
  listeners:
  - name: inbound
    address: {socket_address: {address: 127.0.0.1, port_value: ${MTLS_PORT}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          ${SERVER_TLS}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          route_config:
            virtual_hosts: [{name: app, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: app}}]}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${UPSTREAM_HTTP_PORT}}}}}]}]
"""

CLIENT = """admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN_PORT}}}
static_resources:
  listeners:
  - name: outbound_http
    address: {socket_address: {address: 127.0.0.1, port_value: ${HTTP_PORT}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts: [{name: server, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: server_sidecar}}]}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: outbound_tcp
    address: {socket_address: {address: 127.0.0.1, port_value: ${TCP_PORT}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: outbound_tcp
          cluster: server_sidecar_l4
  clusters:
${CLUSTERS}"""

CLIENT_CLUSTER = """  - name: ${NAME}
    type: STATIC
    connect_timeout: 1s
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: server.bench.local
        ${CLIENT_TLS}
    load_assignment:
      cluster_name: ${NAME}
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${MTLS_PORT}}}}}]}]
"""

MODES = ("keepalive", "handshake")


def make_pki(directory: Path) -> None:
    """A CA and two workload certificates (EC P-256, a SPIFFE URI SAN only), by openssl."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True,
                       timeout=60)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/O=bench/CN=bench CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext",
            "keyUsage=critical,keyCertSign,cRLSign")
    for who, namespace in (("client", "client"), ("server", "server")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", "/O=bench")
        (directory / f"{who}.ext").write_text(
            f"subjectAltName=URI:{TRUST_DOMAIN}/ns/{namespace}/sa/{who}\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{who}.pem", "-days", "1", "-extfile", f"{who}.ext")


def render(workdir: Path, name: str, ports: dict) -> tuple[Path, Path]:
    tls = string.Template(TLS_CONTEXT)
    server_tls = tls.substitute(DIR=workdir, WHO="server",
                                MATCH=f'prefix: "{TRUST_DOMAIN}/ns/client/"')
    client_tls = tls.substitute(DIR=workdir, WHO="client",
                                MATCH=f'exact: "{TRUST_DOMAIN}/ns/server/sa/server"')
    server = workdir / f"mtls-{name}-server.yaml"
    server.write_text(string.Template(SERVER).substitute(
        ADMIN_PORT=ports["S_ADMIN"], MTLS_PORT=ports["MTLS_PORT"],
        UPSTREAM_HTTP_PORT=ports["UPSTREAM_HTTP_PORT"], SERVER_TLS=server_tls))
    # The client's context sits two columns further left (under a cluster's transport socket).
    client_tls = "\n".join(line[2:] if line.startswith("  ") else line
                           for line in client_tls.splitlines())
    clusters = "".join(string.Template(CLIENT_CLUSTER).substitute(
        NAME=cluster, MTLS_PORT=ports["MTLS_PORT"], CLIENT_TLS=client_tls)
        for cluster in ("server_sidecar", "server_sidecar_l4"))
    client = workdir / f"mtls-{name}-client.yaml"
    client.write_text(string.Template(CLIENT).substitute(
        ADMIN_PORT=ports["C_ADMIN"], HTTP_PORT=ports["HTTP_PORT"], TCP_PORT=ports["TCP_PORT"],
        CLUSTERS=clusters))
    return client, server


def stat(admin_port: int, name: str) -> int:
    url = f"http://127.0.0.1:{admin_port}/stats?filter=%5E{name.replace('.', '%5C.')}%24"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/mtls", description=__doc__)
    b.slice_bench_args(p, "pair and mode")
    p.add_argument("--pin", action="store_true",
                   help="pin the sidecars to CPU 1 and nginx and wrk to CPU 0 (default: any core)")
    args = p.parse_args(argv)
    started, envoy_bin, info, target = b.start_slice_bench(args, ["remora-proxy"])
    base_id = os.getpid() % 1000 * 10 + 7
    commands = {
        "envoy": [envoy_bin, "-c", "{BOOTSTRAP}", "--concurrency", "1", "--disable-hot-restart",
                  "--base-id", "{BASE_ID}", "--log-level", "warn"],
        "remora": [str(target / "remora-proxy"), "-c", "{BOOTSTRAP}", "--concurrency", "1",
                   "--log-level", "warn"],
    }
    results: dict = {name: {mode: [] for mode in MODES} for name in commands}
    with tempfile.TemporaryDirectory(prefix="remora-bench-mtls-") as tmp:
        workdir = Path(tmp)
        make_pki(workdir)
        upstream = b.Bench(argparse.Namespace(upstream="nginx", nginx=args.nginx), workdir)
        upstream.start_upstreams(None)
        for round_index in range(args.repeat):
            b.log(f"round {round_index + 1}/{args.repeat}")
            measured = run_round(commands, upstream.ports["UPSTREAM_HTTP_PORT"],
                                 base_id + round_index * 10, args, workdir)
            for (name, mode), figures in measured.items():
                results[name][mode].append(figures)
        b.stop_all()
    text = report(results, info, argv, started, args)
    print(text)
    b.write_section(args.out, text, MARK_START, MARK_END)
    return 0


def run_round(commands: dict, upstream_port: int, base_id: int, args, workdir: Path) -> dict:
    """Starts both pairs, then runs wrk at each pair and mode in turn, a slice at a time,
    until each had its duration: a busy machine's drifts fall on every variant alike."""
    proxy_cpus = b.PROXY_CPUS if args.pin else None
    load_cpus = b.LOAD_CPUS if args.pin else None
    pairs = {}
    try:
        for index, (name, command) in enumerate(commands.items()):
            ports = {key: b.free_port() for key in
                     ("C_ADMIN", "S_ADMIN", "HTTP_PORT", "TCP_PORT", "MTLS_PORT")}
            ports["UPSTREAM_HTTP_PORT"] = upstream_port
            client_yaml, server_yaml = render(workdir, name, ports)
            procs = {}
            for role, yaml, admin, offset in (("server", server_yaml, ports["S_ADMIN"], 0),
                                              ("client", client_yaml, ports["C_ADMIN"], 1)):
                cmd = [part.replace("{BOOTSTRAP}", str(yaml))
                       .replace("{BASE_ID}", str(base_id + index * 2 + offset))
                       for part in command]
                proc = b.spawn(cmd, cpus=proxy_cpus, logfile=workdir / f"{name}-{role}.log")
                failure = b.wait_ready(proc, admin, 60)
                if failure:
                    log = (workdir / f"{name}-{role}.log").read_text(errors="replace")[-400:]
                    raise RuntimeError(f"{name} {role} sidecar: {failure}: {log}")
                procs[role] = proc
            pairs[name] = {"procs": procs, "ports": ports}
            # Warm-up (pools, caches, page faults); not measured.
            b.wrk(ports["HTTP_PORT"], 1, 50, cpus=load_cpus)
            b.wrk(ports["TCP_PORT"], 1, 50, close=True, cpus=load_cpus)
        variants = {(name, mode): {"requests": 0, "failed": 0, "cpu": 0.0, "wall": 0.0,
                                   "handshakes": 0}
                    for name in pairs for mode in MODES}
        for key in b.slice_order(list(variants), args.duration, args.slice):
            name, mode = key
            pair, v = pairs[name], variants[key]
            pids = [proc.pid for proc in pair["procs"].values()]
            admin = pair["ports"]["S_ADMIN"]
            listener = f"listener.127.0.0.1_{pair['ports']['MTLS_PORT']}.ssl.handshake"
            handshakes0 = stat(admin, listener)
            cpu0, t0 = sum(b.cpu_seconds(pid) for pid in pids), time.monotonic()
            port = pair["ports"]["HTTP_PORT" if mode == "keepalive" else "TCP_PORT"]
            result = b.wrk(port, args.slice, 50, close=mode == "handshake", cpus=load_cpus)
            v["cpu"] += sum(b.cpu_seconds(pid) for pid in pids) - cpu0
            v["wall"] += time.monotonic() - t0
            v["requests"] += result["requests"]
            v["failed"] += result["failed"]
            v["handshakes"] += stat(admin, listener) - handshakes0
        return {key: {"rps": v["requests"] / v["wall"],
                      "cpu_per_1k": v["cpu"] / max(v["requests"], 1) * 1000,
                      "handshakes_per_request": v["handshakes"] / max(v["requests"], 1),
                      "requests": v["requests"], "failed": v["failed"]}
                for key, v in variants.items()}
    finally:
        for pair in pairs.values():
            for proc in pair["procs"].values():
                b.stop(proc)


def report(results: dict, info: list, argv: list[str], started: float, args) -> str:
    def med(name: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name][mode])

    def ratio(mode: str, key: str) -> float:
        # Per round: remora over Envoy, measured in interleaved slices; the median.
        return statistics.median(r[key] / e[key] for r, e in
                                 zip(results["remora"][mode], results["envoy"][mode]))

    def rounds(mode: str, key: str) -> str:
        return ", ".join(f"{r[key] / e[key]:.2f}" for r, e in
                         zip(results["remora"][mode], results["envoy"][mode]))

    placement = ("sidecars pinned to CPU 1, nginx and wrk to CPU 0" if args.pin
                 else "every process free to use every core, as in a pod")
    rows = [
        ("keepalive", "rps", "req/s, kept-alive connections (wrk -t1 -c50)", "{:,.0f}", "≥ 2x",
         lambda r: r >= 2),
        ("keepalive", "cpu_per_1k", "CPU s per 1k req, both sidecars, kept-alive", "{:.4f}",
         "≤ 0.5x", lambda r: r <= 0.5),
        ("handshake", "rps", "new mTLS handshakes/s (a new connection per request)", "{:,.0f}",
         "≥ 2x", lambda r: r >= 2),
        ("handshake", "cpu_per_1k", "CPU s per 1k handshakes, both sidecars", "{:.4f}", "", None),
    ]
    lines = [MARK_START, "## Sidecar to sidecar over mTLS", "",
             f"Produced by `bench/mtls {' '.join(argv)}`; see bench/README.md. wrk → client "
             "sidecar (originates mTLS with a SPIFFE certificate, checks the server's URI SAN) → "
             "server sidecar (requires a client certificate, matches its URI SAN) → nginx; a "
             "Remora pair and an Envoy pair with the same bootstraps, both running through the "
             f"round ({placement}; `--concurrency 1` each). wrk goes to each pair and mode in "
             f"turn in {args.slice:g} s slices until each had {args.duration:g} s, over "
             f"{args.repeat} rounds. Kept-alive: through the client's HTTP listener (pooled "
             "upstream mTLS connections). Handshakes: `Connection: close` through the client's "
             "tcp_proxy listener, so each request is a new mTLS handshake between the sidecars "
             "(counted on the server sidecar's `ssl.handshake`). Defaults otherwise: both clients "
             "negotiate TLS 1.2 (Envoy's client default, which Remora follows) and resume "
             "sessions. CPU is both sidecars' together. Each "
             "figure is the median over rounds, each ratio the median of per-round ratios.", "",
             *[f"- {k}: {v}" for k, v in info],
             f"- run time: {time.monotonic() - started:.0f}s", "",
             "| figure | envoy | remora | remora/envoy | target | per round |",
             "|---|---:|---:|---:|---|---|"]
    for mode, key, label, number, target, check in rows:
        value = ratio(mode, key)
        verdict = f"{target} ({'met' if check(value) else 'not met'})" if check else ""
        lines.append(f"| {label} | {number.format(med('envoy', mode, key))} | "
                     f"{number.format(med('remora', mode, key))} | {value:.2f}x | {verdict} | "
                     f"{rounds(mode, key)} |")
    lines.append("")
    lines.append("Handshakes per request seen by the server sidecar, handshake mode: "
                 + ", ".join(f"{n} {med(n, 'handshake', 'handshakes_per_request'):.2f}"
                             for n in results) + ".")
    return b.end_section(lines, results, MODES, MARK_END)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
