#!/usr/bin/env bash
# Control-plane load benchmark: N simulated ADS clients against a release remora-cp with
# 1,000 clusters of 10 endpoints; prints one markdown table per N.
# Usage: bench/control-plane.sh [N ...]   (default: 100 1000 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p remora-control-plane --bin remora-cp --bin remora-cp-bench
# Each client is one TCP connection on both sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(100 1000 10000)
for n in "${sizes[@]}"; do
  changes=20
  [ "$n" -ge 10000 ] && changes=10
  echo "== N=$n"
  "$target/release/remora-cp-bench" --clients "$n" --clusters 1000 --endpoints 10 --changes "$changes"
done
