#!/usr/bin/env bash
# bench-ztoc.sh: zTOC build time and memory against `gzip -dc` of the same
# layer in the same run, zTOC size, and random 4 KiB extraction latency.
# Prints a markdown table. Layers: the cached Debian layers that
# scripts/debian-layer.sh builds (about 64 MB and >= 200 MB of gzip).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SPANPULL_CACHE:-/var/cache/spanpull}
RUNS=${RUNS:-5}
source scripts/lib.sh
bench_layers
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

echo "| layer | gzip size | uncompressed | gzip -dc (s) | indexer ztoc build (s) | ratio | build peak RSS | spans | zTOC size | zTOC / layer |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for L in "$small" "$large"; do
  cat "$L" >/dev/null   # page cache warm for both tools
  : >"$tmp/g"; : >"$tmp/b"; : >"$tmp/m"
  for _ in $(seq "$RUNS"); do
    /usr/bin/time -f "%e" -o "$tmp/t" gzip -dc "$L" >/dev/null; cat "$tmp/t" >>"$tmp/g"
    /usr/bin/time -f "%e %M" -o "$tmp/t" bin/indexer ztoc build -o "$tmp/z" "$L" >"$tmp/out"
    awk '{print $1}' "$tmp/t" >>"$tmp/b"; awk '{print $2}' "$tmp/t" >>"$tmp/m"
  done
  g=$(median <"$tmp/g"); b=$(median <"$tmp/b"); m=$(sort -n "$tmp/m" | tail -1)
  usize=$(gzip -dc "$L" | wc -c)
  zs=$(stat -c %s "$tmp/z"); ls=$(stat -c %s "$L")
  spans=$(awk '/^spans:/{print $2}' "$tmp/out")
  printf '| %s | %.1f MB | %.1f MB | %s | %s | %.2fx | %.1f MiB | %s | %.2f MB | %.2f%% |\n' \
    "$(basename "$L")" "$(echo "$ls/1000000" | bc -l)" "$(echo "$usize/1000000" | bc -l)" "$g" "$b" \
    "$(echo "$b/$g" | bc -l)" "$(echo "$m/1024" | bc -l)" "$spans" "$(echo "$zs/1000000" | bc -l)" "$(echo "100*$zs/$ls" | bc -l)"
done
echo
echo "Random 4 KiB reads from the local layer file (median, Go benchmark):"
SPANPULL_BENCH_LAYER=$small go test -run '^$' -bench 'Decompress' -benchtime 20x ./ztoc | grep -E '^Benchmark'
go test -run '^$' -bench 'ReadRandom4K' -benchtime 20x ./span | grep -E '^Benchmark'
