#!/usr/bin/env bash
# Benchmarks (never part of the tests): berth-vmm against QEMU's microvm,
# measured in the same run. Prints min/median/max, ratios and METRIC lines.
#   ci/bench.sh boot|blk|net|api|shares|snapshot|migrate
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:?usage: ci/bench.sh boot|blk|net|api|shares|snapshot|migrate}"

ci/install-deps.sh
images/build.sh probe >/dev/null
bin="$(ci/build-release.sh)"
exec "$bin/berth-bench" "$what"
