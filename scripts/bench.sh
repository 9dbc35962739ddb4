#!/usr/bin/env bash
# bench.sh: every benchmark of the project, each printing a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "## zTOC build (scripts/bench-ztoc.sh)"
scripts/bench-ztoc.sh
echo
echo "## Indexing an image from a registry (scripts/bench-indexer.sh)"
scripts/bench-indexer.sh
echo
echo "## Lazy pull against full pull (scripts/bench-lazy.sh)"
scripts/bench-lazy.sh
