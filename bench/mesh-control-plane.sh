#!/usr/bin/env bash
# The control plane's Kubernetes path at scale: builds remora-cp, remora-injector and
# remora-mesh-bench in release mode and runs the bench (1,000 services, 10,000 endpoints,
# 1,000 simulated sidecars fed from a real API server; 100 EndpointSlice changes). Extra
# arguments go to remora-mesh-bench (--services, --endpoints, --sidecars, --changes).
# Needs root and the Kubernetes binaries (tests/kube/build.sh). Results: bench/CONTROL_PLANE.md.
set -euo pipefail
# Each simulated sidecar is one TCP connection on both sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
cargo build --release -p remora-control-plane --bin remora-cp -p remora-injector \
    --bin remora-injector -p remora-tests --bin remora-mesh-bench
target="${CARGO_TARGET_DIR:-target}/release"
echo "commit $(git rev-parse --short HEAD), $(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$target/remora-mesh-bench" "$@"
