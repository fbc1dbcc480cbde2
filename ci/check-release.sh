#!/usr/bin/env bash
# Test-only code stays out of what ships: the release binaries (built as
# ci/build-release.sh builds them) hold no BERTH_TEST_ fault hook and no
# fuzz entry point. Fails naming the binary and what it found.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(ci/build-release.sh --shipped)"
status=0
for name in berth-vmm berth-agent nodectl; do
    for needle in BERTH_TEST_ fuzzing::; do
        if grep -qa "$needle" "$bin/$name"; then
            echo "ci/check-release.sh: release $name contains \"$needle\": test-only code is compiled in" >&2
            status=1
        fi
    done
done
((status == 0)) && echo "ci/check-release.sh: release berth-vmm, berth-agent and nodectl hold no test-only code"
exit "$status"
