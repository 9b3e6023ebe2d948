#!/usr/bin/env bash
# Control-plane load benchmark: N simulated ADS clients against a release remora-cp with
# 1,000 clusters of 10 endpoints; prints one markdown table per N and protocol.
# Usage: bench/control-plane.sh [N ...]   (default: 100 1000 10000)
# PROTOCOLS="sotw delta" (the default) picks state-of-the-world and/or delta clients.
# FLAGS adds remora-cp-bench flags, e.g. FLAGS=--node-every-request (Envoy's default ADS config).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p remora-control-plane --bin remora-cp --bin remora-cp-bench
# Each client is one TCP connection on both sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(100 1000 10000)
# 100 writes of each kind, so that the p99 (nearest rank) is not simply the slowest write.
changes="${CHANGES:-100}"
for n in "${sizes[@]}"; do
  for protocol in ${PROTOCOLS:-sotw delta}; do
    flags=()
    [ "$protocol" = delta ] && flags=(--delta)
    echo "== N=$n $protocol"
    "$target/release/remora-cp-bench" --clients "$n" --clusters 1000 --endpoints 10 \
      --changes "$changes" "${flags[@]}" ${FLAGS:-}
  done
done
