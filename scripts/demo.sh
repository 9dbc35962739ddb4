#!/usr/bin/env bash
# demo.sh: spanpull's main job end to end, on this machine, as root.
#
#   1. a local registry (Debian's docker-registry) with a real Debian
#      bookworm + python3 image (built with mmdebstrap, cached);
#   2. `indexer convert`: index it and push a SOCI-enabled copy;
#   3. containerd (Debian's 1.6) with the spanpull snapshotter as a proxy
#      plugin; `snapshotter pull` + `ctr run` of the indexed image: lazy;
#   4. the same image pulled fully with containerd's overlayfs snapshotter;
#   5. a summary: time to the first output line, bytes fetched.
#
# Everything runs under one directory ($DEMO_DIR, default
# /tmp/spanpull-demo) and is stopped by PID on exit, even after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$(go env GOPATH)/bin:$PATH"
CACHE=${SPANPULL_CACHE:-/var/cache/spanpull}
DEMO_DIR=${DEMO_DIR:-/tmp/spanpull-demo}
layer=$CACHE/debian-python3.tar.gz
source scripts/lib.sh

[ "$(id -u)" = 0 ] || { echo "demo: run as root (containerd, FUSE and overlayfs need it)" >&2; exit 1; }

pids=()
cleanup() {
  set +e
  local c=$DEMO_DIR/ctr
  if [ -x "$c" ]; then
    for t in $("$c" tasks ls -q 2>/dev/null); do "$c" tasks kill -s KILL "$t" >/dev/null 2>&1; done
    for t in $("$c" containers ls -q 2>/dev/null); do "$c" tasks rm -f "$t" >/dev/null 2>&1; "$c" containers rm "$t" >/dev/null 2>&1; done
  fi
  # containerd first, then the snapshotter it uses, then the registry.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[$i]}" 2>/dev/null
    for _ in $(seq 50); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.1; done
    kill -9 "${pids[$i]}" 2>/dev/null
  done
  grep -o " $DEMO_DIR[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$DEMO_DIR"
}
trap cleanup EXIT
cleanup
mkdir -p "$DEMO_DIR"

bg() { local name=$1; shift; "$@" >"$DEMO_DIR/$name.log" 2>&1 & pids+=($!); }
wait_for() { local t=$1; shift; for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "timeout: $*" >&2; return 1; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
metric() { curl -sf "http://$metrics/metrics" | awk -v m="$1" '$1==m {s+=$2} END {printf "%d", s}'; }
now() { date +%s.%N; }

step "1. Registry and a real Debian bookworm + python3 image"
scripts/debian-layer.sh "$layer" python3
port=$(free_port)
registry_config "$DEMO_DIR/registry" "$port" demo >"$DEMO_DIR/registry.yml"
bg registry docker-registry serve "$DEMO_DIR/registry.yml"
wait_for 10 curl -sf "http://127.0.0.1:$port/v2/"
ref=127.0.0.1:$port/demo/debian-python
crane append -f "$layer" -t "$ref:base" --oci-empty-base >/dev/null 2>&1
crane mutate "$ref:base" --set-platform linux/amd64 --cmd /usr/bin/python3 \
  -e PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin -t "$ref:bookworm" >/dev/null 2>&1
image_bytes=$(stat -c %s "$layer")
echo "   $ref:bookworm: one $(numfmt --to=iec "$image_bytes") gzip layer"

step "2. Index it: indexer convert (SOCI index v2, layers mounted, never copied)"
bin/indexer convert --plain-http --cache-dir "$DEMO_DIR/ztoc-cache" "$ref:bookworm" "$ref:bookworm-soci"

step "3. containerd 1.6 + the spanpull snapshotter (started first)"
metrics=127.0.0.1:$(free_port)
printf '[remote]\nfill_delay_seconds = 30\n' >"$DEMO_DIR/snapshotter.toml"
bg snapshotter bin/snapshotter serve --config "$DEMO_DIR/snapshotter.toml" --address "$DEMO_DIR/snapshotter.sock" \
  --root "$DEMO_DIR/snapshotter" --metrics-address "$metrics"
wait_for 10 test -S "$DEMO_DIR/snapshotter.sock"
cat >"$DEMO_DIR/containerd.toml" <<EOF
version = 2
root = "$DEMO_DIR/containerd/root"
state = "$DEMO_DIR/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$DEMO_DIR/containerd.sock"
[ttrpc]
  address = "$DEMO_DIR/containerd.sock.ttrpc"
[proxy_plugins.spanpull]
  type = "snapshot"
  address = "$DEMO_DIR/snapshotter.sock"
EOF
bg containerd env PATH=/usr/sbin:/usr/bin:/sbin:/bin /usr/bin/containerd --config "$DEMO_DIR/containerd.toml"
printf '#!/bin/sh\nexec /usr/bin/ctr -a %s "$@"\n' "$DEMO_DIR/containerd.sock" >"$DEMO_DIR/ctr"
chmod +x "$DEMO_DIR/ctr"
ctr=$DEMO_DIR/ctr
wait_for 20 "$ctr" version
echo "   containerd $("$ctr" version | awk '/Server/{s=1} s&&/Version/{print $2; exit}')"

# first_line CMD...: seconds from $t0 until CMD prints its first line.
first_line() {
  local line
  line=$("$@" | head -n 1)
  echo "   container said: $line" >&2
  echo "$(now) - $t0" | bc
}

step "4. Lazy: snapshotter pull + ctr run --snapshotter spanpull"
prog='import json, platform; print(json.dumps({"hello from python": platform.python_version()}))'
t0=$(now)
bin/snapshotter pull -a "$DEMO_DIR/containerd.sock" "$ref:bookworm-soci"
lazy_s=$(first_line "$ctr" run --rm --snapshotter spanpull "$ref:bookworm-soci" lazy1 python3 -c "$prog")
span_bytes=$(metric 'spanpull_resolver_fetched_bytes_total{kind="span"}')
ztoc_bytes=$(metric 'spanpull_resolver_fetched_bytes_total{kind="ztoc"}')
spans=$(metric spanpull_resolver_spans_fetched_total)
layer_digest=$(crane manifest "$ref:bookworm" | jq -r '.layers[0].digest')
if "$ctr" content ls -q | grep -q "$layer_digest"; then in_store="yes (not lazy!)"; else in_store="no"; fi
echo "   layer blob in containerd's content store: $in_store"

step "5. Full pull with containerd's overlayfs snapshotter, for comparison"
t0=$(now)
"$ctr" image pull --plain-http "$ref:bookworm" >/dev/null
full_s=$(first_line "$ctr" run --rm "$ref:bookworm" full1 python3 -c "$prog")

step "Summary"
ztoc_digest=$(bin/indexer index info --plain-http "$ref:bookworm-soci" | jq -r '.layers[0].digest')
total=$(bin/indexer ztoc info --plain-http "$ref@$ztoc_digest" | jq .num_spans)
lazy_bytes=$((span_bytes + ztoc_bytes))
printf '   %-24s %20s   %s\n' "" "time to first line" "bytes fetched from the registry"
printf '   %-24s %18.2f s   %s (%.1f%% of the image: %d of %d spans + the zTOC)\n' "lazy (spanpull)" "$lazy_s" \
  "$(numfmt --to=iec "$lazy_bytes")" "$(echo "100*$lazy_bytes/$image_bytes" | bc -l)" "$spans" "$total"
printf '   %-24s %18.2f s   %s (100%%)\n' "full pull (overlayfs)" "$full_s" "$(numfmt --to=iec "$image_bytes")"
printf '   lazy / full: %.2fx the time, %.2fx the bytes\n' "$(echo "$lazy_s/$full_s" | bc -l)" "$(echo "$lazy_bytes/$image_bytes" | bc -l)"
echo "   (unshaped loopback registry: make bench measures shaped links too)"
