#!/usr/bin/env bash
# demo.sh: the main job end to end, as far as it exists today.
#
# Until the snapshotter lands, this demo stops at the indexer: it builds a
# real Debian + python3 layer (cached), indexes it in one streaming pass,
# pushes it to a local registry as a SOCI-indexed image, and reads one
# file through the zTOC straight from the registry with HTTP range
# requests, showing how little it fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$(go env GOPATH)/bin:$PATH"
CACHE=${SPANPULL_CACHE:-/var/cache/spanpull}
layer=$CACHE/debian-python3.tar.gz
work=$(mktemp -d /tmp/spanpull-demo.XXXXXX)
regpid=
cleanup() {
  [ -n "$regpid" ] && kill "$regpid" 2>/dev/null && wait "$regpid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. A real Debian bookworm + python3 layer (mmdebstrap, cached in $CACHE)"
scripts/debian-layer.sh "$layer" python3
ls -l "$layer"

step "2. Index it locally in one streaming pass, and compare with gzip -dc"
/usr/bin/time -f "   gzip -dc: %e s" gzip -dc "$layer" >/dev/null
/usr/bin/time -f "   indexer ztoc build: %e s, peak RSS %M KB" bin/indexer ztoc build -o "$work/layer.ztoc" "$layer"

step "3. A local registry, the image pushed to it, indexed from the registry"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/reg.yml" <<EOC
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port, secret: demo}
EOC
docker-registry serve "$work/reg.yml" >"$work/registry.log" 2>&1 &
regpid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
ref=127.0.0.1:$port/demo/debian-py:bookworm
crane append -f "$layer" -t "$ref-base" --oci-empty-base >/dev/null 2>&1
crane mutate "$ref-base" --set-platform linux/amd64 --cmd /usr/bin/python3 -t "$ref" >/dev/null 2>&1
bin/indexer create --plain-http --cache-dir "$work/cache" "$ref"
bin/indexer convert --plain-http --cache-dir "$work/cache" "$ref" "$ref-soci"
bin/indexer index ls --plain-http "$ref"

step "4. Read /usr/bin/python3.11 through the zTOC, straight from the registry"
ztoc=$(bin/indexer index info --plain-http "$ref" | jq -r '.layers[0].digest')
ldig=$(bin/indexer index info --plain-http "$ref" | jq -r '.layers[0].annotations["com.amazon.soci.image-layer-digest"]')
repo=${ref%:*}
bin/indexer ztoc get-file --plain-http -o "$work/python3.11" "$repo@$ztoc" "$repo@$ldig" usr/bin/python3.11
info=$(bin/indexer ztoc info --plain-http "$repo@$ztoc")
read -r start end < <(echo "$info" | jq -r '.files[] | select(.filename=="./usr/bin/python3.11") | "\(.start_span) \(.end_span)"')
size=$(stat -c %s "$work/python3.11")
echo "   python3.11: $size bytes, in spans $start-$end of $(echo "$info" | jq .num_spans) (layer: $(stat -c %s "$layer") bytes compressed)"
tar -xzOf "$layer" ./usr/bin/python3.11 | cmp - "$work/python3.11" && echo "   identical to GNU tar's extraction"

step "Not yet: the snapshotter (lazy container start) is still being built; see README."
