#!/usr/bin/env bash
# debian-layer.sh OUT.tar.gz [PACKAGES...]
# Builds a real Debian bookworm root filesystem layer with mmdebstrap (no
# chroot step, no Docker) and gzips it (-6, no name, as `docker push` does).
# Default packages: python3. The result is cached: an existing OUT is kept.
set -euo pipefail
out=$1; shift
pkgs=${*:-python3}
[ -s "$out" ] && exit 0
mkdir -p "$(dirname "$out")"
mirror=$(grep -hoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 | awk '{print $2}' || true)
[ -n "$mirror" ] || mirror=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}' || true)
mirror=${mirror:-http://deb.debian.org/debian}
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
mmdebstrap --quiet --variant=essential --include="${pkgs// /,}" bookworm - "$mirror" | gzip -n -6 >"$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "built $out ($(stat -c %s "$out") bytes)"
