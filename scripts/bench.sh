#!/usr/bin/env bash
# bench.sh: every benchmark of the project, each printing a markdown
# section; the whole report also goes to $OUT/report.md (default
# docs/bench), next to the PNG charts. BENCHMARKS.md is curated from it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-docs/bench}
mkdir -p "$OUT"
{
  echo "## zTOC build (scripts/bench-ztoc.sh)"
  scripts/bench-ztoc.sh
  echo
  echo "## Indexing an image from a registry (scripts/bench-indexer.sh)"
  scripts/bench-indexer.sh
  echo
  scripts/bench-lazy.sh
} | tee "$OUT/report.md"
