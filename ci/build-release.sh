#!/usr/bin/env bash
# Release build of Berth's binaries, statically linked (glibc with
# crt-static): one berth-vmm runs per guest, and a static binary keeps the
# resident memory each VM costs the host lower (no dynamic loader, no
# relocated copies of libc's pages). --target keeps the flag away from
# build scripts and proc macros, which must stay dynamic.
# Prints the directory the binaries are in.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release -q --target "$target" -p berth-vmm -p berth-agent -p berth-tests --bins
echo "$PWD/target/$target/release"
