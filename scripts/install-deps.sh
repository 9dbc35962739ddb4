#!/usr/bin/env bash
# install-deps.sh: install what building, testing and the demo need on a
# Debian machine, skipping whatever is already there. Run as root.
#   apt: zlib (cgo inflater), a registry, containerd + runc, FUSE, mmdebstrap
#        (test image), iproute2 (shaped links), pigz (multi-member gzip tests),
#        containernetworking-plugins (pod networks of the CRI tests)
#   go tools: staticcheck, crane (image pushes in tests), crictl (CRI tests),
#        helm (lints and renders the chart in deploy/)
set -euo pipefail

need_apt=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for p in zlib1g-dev time bc python3 docker-registry containerd runc fuse3 mmdebstrap iproute2 pigz curl jq ca-certificates tar gzip containernetworking-plugins; do
  have_pkg "$p" || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

GOBIN=${GOBIN:-$(go env GOPATH)/bin}
export PATH="$GOBIN:$PATH"
have_cmd staticcheck || go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
have_cmd crane || go install github.com/google/go-containerregistry/cmd/crane@v0.22.1
have_cmd crictl || go install sigs.k8s.io/cri-tools/cmd/crictl@v1.37.0
have_cmd helm || go install helm.sh/helm/v3/cmd/helm@v3.22.0
echo "install-deps: ok"
