#!/usr/bin/env bash
# bench-indexer.sh: index a real multi-layer image (the two cached Debian
# layers, ~460 MB of gzip) from a loopback docker-registry with
# `indexer create`, against `gzip -dc` of the same layers back to back in
# the same run. Prints a markdown table; median of RUNS runs.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SPANPULL_CACHE:-/var/cache/spanpull}
RUNS=${RUNS:-3}
export PATH="$(go env GOPATH)/bin:$PATH"
source scripts/lib.sh
bench_layers

tmp=$(mktemp -d)
port=$(free_port)
registry_config "$tmp/data" "$port" bench >"$tmp/reg.yml"
docker-registry serve "$tmp/reg.yml" >"$tmp/reg.log" 2>&1 &
regpid=$!
trap 'kill $regpid 2>/dev/null; wait $regpid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
ref=127.0.0.1:$port/bench/debian:2layers
crane append -f "$small" -f "$large" -t "$ref-base" --oci-empty-base >/dev/null 2>&1
crane mutate "$ref-base" --set-platform linux/amd64 -t "$ref" >/dev/null 2>&1
image_bytes=$(( $(stat -c %s "$small") + $(stat -c %s "$large") ))

: >"$tmp/g"; : >"$tmp/i"
for _ in $(seq "$RUNS"); do
  cat "$small" "$large" >/dev/null
  /usr/bin/time -f %e -o "$tmp/t" sh -c "gzip -dc '$small' >/dev/null; gzip -dc '$large' >/dev/null"; cat "$tmp/t" >>"$tmp/g"
  /usr/bin/time -f "%e %M" -o "$tmp/t" bin/indexer create --plain-http --no-cache --force --json "$ref" >"$tmp/report.json"
  awk '{print $1}' "$tmp/t" >>"$tmp/i"; awk '{print $2}' "$tmp/t" >"$tmp/rss"
done
g=$(median <"$tmp/g"); i=$(median <"$tmp/i")
ztoc_bytes=$(jq '[.platforms[].layers[].ztocSize] | add' "$tmp/report.json")
idx=$(jq -r '.platforms[0].index' "$tmp/report.json")
idx_bytes=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://127.0.0.1:$port/v2/bench/debian/manifests/$idx" | wc -c)
pushed=$((ztoc_bytes + idx_bytes + 2))
echo "| image | layers | gzip bytes | gzip -dc back to back (s) | indexer create (s) | ratio | indexer peak RSS | bytes pushed | pushed / image |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '| %s | 2 | %.1f MB | %s | %s | %.2fx | %.1f MiB | %.2f MB | %.2f%% |\n' "debian python3 + scipy stack" \
  "$(echo "$image_bytes/1000000" | bc -l)" "$g" "$i" "$(echo "$i/$g" | bc -l)" "$(echo "$(cat "$tmp/rss")/1024" | bc -l)" \
  "$(echo "$pushed/1000000" | bc -l)" "$(echo "100*$pushed/$image_bytes" | bc -l)"
