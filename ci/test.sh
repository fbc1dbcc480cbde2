#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
# dependencies, guest images (cached by recipe hash), format, lints, the
# layering checks, every test binary (a failure does not stop the others;
# the run ends with the list of what failed), that the release binaries
# hold no test-only code, then a bounded fuzz run of every untrusted-input
# parser (docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
images/build.sh all >/dev/null
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The Python beside the Rust (test peers, these checks): formatted, linted, tested.
black --check -q tests/support ci
flake8 tests/support ci
python3 -m unittest discover -s ci -p 'test_*.py'
# Layers (docs/architecture.md): the agent links nothing that speaks KVM;
# no new import circle, oversize file or function (ci/layering-debts.txt
# lists the ones issue 16 has still to remove).
ci/check-deps.sh
python3 ci/check_modules.py --allow ci/layering-debts.txt

log="$(mktemp /tmp/berth-test.XXXXXX.log)"
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if ((status != 0)); then
    echo
    echo "=== cargo test failed (status $status); what failed (full log: $log) ==="
    grep -E '^test .* \.\.\. FAILED$' "$log" | sort -u || true
    # cargo's closing list of the test binaries that failed or crashed.
    sed -n '/^error: [0-9]* targets* failed:/,$p' "$log"
    exit "$status"
fi
rm -f "$log"
ci/check-release.sh
ci/fuzz.sh 10
