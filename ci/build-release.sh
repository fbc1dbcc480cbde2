#!/usr/bin/env bash
# Release build of Berth's binaries, statically linked (glibc with
# crt-static): one berth-vmm runs per guest, and a static binary keeps the
# resident memory each VM costs the host lower (no dynamic loader, no
# relocated copies of libc's pages). --target keeps the flag away from
# build scripts and proc macros, which must stay dynamic.
# Prints the directory the binaries are in. --shipped: only the binaries
# a node installs (berth-vmm, berth-agent, nodectl), not the bench driver.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"
# The shipped binaries first, on their own: built together with berth-tests,
# berth-vmm would get its test hooks (features unify across one build).
cargo build --release -q --target "$target" -p berth-vmm -p berth-agent --bins
# The benchmark driver (not with --shipped); this builds berth-vmm's
# library, not its binary.
if [[ "${1:-}" != --shipped ]]; then
    cargo build --release -q --target "$target" -p berth-tests --bins
fi
echo "$PWD/target/$target/release"
