#!/usr/bin/env bash
# Builds the probe test guest.
# Usage: images/probe/build.sh <out-dir>   (images/build.sh picks <out-dir>)
# Output: probe.elf (64-bit Linux-boot entry in e_entry, PVH entry in a Xen note)
# Every *.c here and in modes/ is compiled, so a new mode is one new file.
set -euo pipefail
recipe="$(cd "$(dirname "$0")" && pwd)"
IMAGE_NAME=probe
source "$recipe/../lib.sh"
out="${1:?usage: build.sh <out-dir>}"

CC="${CC:-gcc}"
LD="${LD:-ld}"
for t in "$CC" "$LD"; do
    command -v "$t" >/dev/null || { log "missing tool $t: apt-get install gcc binutils"; exit 1; }
done

# The CPL0 emulator of the PVM KVM dies on SSE arithmetic, AVX, popcnt and
# friends: keep gcc to plain x86-64 integer code.
cflags=(
    -O2 -g0 -std=gnu11 -Wall -Wextra
    -ffreestanding -nostdlib -nostdinc -isystem "$("$CC" -print-file-name=include)"
    -mgeneral-regs-only -mno-red-zone -mno-sse -mno-mmx -mno-avx -mno-80387
    -march=x86-64 -mtune=generic -mcmodel=small
    -fno-pic -fno-pie -no-pie -static -fno-stack-protector -fcf-protection=none
    -fno-asynchronous-unwind-tables -fno-unwind-tables -fno-builtin
    -fno-jump-tables -fno-common
    -I "$recipe"
)

tmp="$out.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp/obj"
trap 'rm -rf "$tmp"' EXIT

shopt -s nullglob
objs=()
for src in "$recipe"/*.S "$recipe"/*.c "$recipe"/modes/*.c; do
    rel="${src#"$recipe"/}"
    obj="$tmp/obj/${rel//\//_}.o"
    "$CC" "${cflags[@]}" -c "$src" -o "$obj"
    objs+=("$obj")
done
"$LD" -nostdlib -static -T "$recipe/probe.ld" -z max-page-size=0x1000 -z noexecstack \
    --build-id=none -o "$tmp/probe.elf" "${objs[@]}"
rm -rf "$tmp/obj"

touch "$tmp/.complete"
rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$tmp" "$out"
trap - EXIT
log "done: $out"
