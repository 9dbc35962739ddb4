#!/usr/bin/env bash
# bench-lazy.sh: lazy pull (spanpull) against full pull (containerd into
# overlayfs), time to a container's first output line and bytes fetched,
# on unshaped, 1gbit, 100mbit and 20mbit links with 20 ms RTT, median of
# RUNS cold runs (SLOW_RUNS for the 400 MB image at 20mbit, where one full
# pull takes minutes). Needs root (network namespace, containerd, mounts)
# and the cached Debian layers (scripts/debian-layer.sh builds missing ones).
#
# Writes $OUT/results.json, $OUT/bench-lazy.md (the section for
# BENCHMARKS.md, also printed) and $OUT/*.png. Extra arguments go to the
# harness, a Go module of its own in integration/bench (cd integration/bench
# && go run . -h lists them), e.g.
#   scripts/bench-lazy.sh -workloads python -links unshaped,100mbit
# The full matrix takes about an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench}
RUNS=${RUNS:-3}
SLOW_RUNS=${SLOW_RUNS:-$RUNS}
export PATH="$(go env GOPATH)/bin:$PATH"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd) # the harness runs in its own module's directory
(cd integration/bench && go run . -out "$OUT" -runs "$RUNS" -slow-runs "$SLOW_RUNS" "$@")
echo >&2
echo "wrote $OUT/bench-lazy.md, $OUT/results.json and $(cd "$OUT" && ls *.png | tr '\n' ' ')" >&2
