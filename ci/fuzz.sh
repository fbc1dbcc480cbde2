#!/usr/bin/env bash
# Runs every fuzz target for SECONDS_PER_TARGET seconds (default 20) on a copy
# of its seed corpus and regression inputs, with stable Rust alone: the
# targets are built with the sanitizer-coverage flags cargo-fuzz passes (no
# nightly, no cargo-fuzz, no AddressSanitizer; panics, overflow checks and
# debug assertions are what catch bugs). Fails if any target crashes, hangs
# or runs out of memory, saving the input under fuzz/artifacts/<target>/.
# Prints `fuzz <target>: <execs> execs, <cov> coverage, ok` per target and
# `METRIC hardening.fuzz_execs <total>` last. See docs/fuzzing.md.
#
#   ci/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-20}"
shift || true
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "usage: ci/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2; }
all_targets=(virtio_blk virtio_net_tx virtio_net_rx virtio_mmio snapshot_state migration_frames agent_api)
if (($#)); then targets=("$@"); else targets=("${all_targets[@]}"); fi

host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$PWD/fuzz/target"
# What `cargo fuzz build --sanitizer none` passes, minus nightly-only flags.
# With --target given, build scripts and proc macros stay uninstrumented.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
unset CARGO_BUILD_RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

start=$SECONDS
echo "[fuzz] building ${#targets[@]} targets (release, instrumented) in fuzz/target" >&2
bin_args=()
for t in "${targets[@]}"; do bin_args+=(--bin "$t"); done
cargo build --manifest-path fuzz/Cargo.toml --release --target "$host" "${bin_args[@]}" >&2
echo "[fuzz] built in $((SECONDS - start)) s; ${seconds} s per target" >&2
bin_dir="$CARGO_TARGET_DIR/$host/release"

work="$(mktemp -d "${TMPDIR:-/tmp}/berth-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

total=0
failed=0
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t"
    mkdir -p "$corpus" "$work/tmp/$t" "fuzz/artifacts/$t"
    # The fuzzer adds what it finds to this copy, never to the committed corpus.
    cp fuzz/corpus/"$t"/* "$corpus"/ 2>/dev/null || true
    find "fuzz/regressions/$t" -maxdepth 1 -type f ! -name '.*' ! -name '*.md' \
        -exec cp {} "$corpus"/ \; 2>/dev/null || true
    log="$work/$t.log"
    status=0
    TMPDIR="$work/tmp/$t" "$bin_dir/$t" \
        -max_total_time="$seconds" -print_final_stats=1 \
        -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="$PWD/fuzz/artifacts/$t/" \
        "$corpus" >"$log" 2>&1 || status=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
    cov="$(grep -Eo 'cov: [0-9]+' "$log" | tail -n1 | cut -d' ' -f2)"
    execs="${execs:-0}"
    total=$((total + execs))
    if ((status == 0)); then
        echo "fuzz $t: $execs execs, ${cov:-0} coverage, ok"
    else
        failed=1
        echo "fuzz $t: $execs execs, ${cov:-0} coverage, FAILED (exit $status)"
        grep -E "panicked at|^==[0-9]+== ERROR|ERROR: libFuzzer|SUMMARY|deadly signal|timeout after|out-of-memory" "$log" | head -n 8 | sed 's/^/    /'
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)"
        if [[ -n "$artifact" ]]; then
            echo "    input saved to ${artifact#"$PWD/"}"
            echo "    reproduce: $bin_dir/$t ${artifact#"$PWD/"}"
            echo "    keep it as a regression test: cp ${artifact#"$PWD/"} fuzz/regressions/$t/"
        fi
        cp "$log" "fuzz/artifacts/$t/last-run.log"
        echo "    full log: fuzz/artifacts/$t/last-run.log"
    fi
done
echo "[fuzz] done in $((SECONDS - start)) s" >&2
echo "METRIC hardening.fuzz_execs $total"
exit "$failed"
