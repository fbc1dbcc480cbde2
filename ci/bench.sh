#!/usr/bin/env bash
# Benchmarks (never part of the tests): berth-vmm against QEMU's microvm,
# measured in the same run. Prints min/median/max, ratios and METRIC lines.
#   ci/bench.sh boot|blk|net|api|shares|snapshot|migrate|hardening
# `hardening` boots jailed+filtered against bare (and QEMU), then runs the
# bounded fuzz run for its execution count.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:?usage: ci/bench.sh boot|blk|net|api|shares|snapshot|migrate|hardening}"

ci/install-deps.sh
images/build.sh probe >/dev/null
bin="$(ci/build-release.sh)"
if [[ "$what" == hardening ]]; then
    "$bin/berth-bench" hardening
    exec ci/fuzz.sh 10
fi
exec "$bin/berth-bench" "$what"
