#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
# dependencies, guest images (cached by recipe hash), format, lints, tests,
# then a bounded fuzz run of every untrusted-input parser (docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
images/build.sh all >/dev/null
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
ci/fuzz.sh 10
