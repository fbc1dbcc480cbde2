#!/usr/bin/env bash
# Builds (or takes from the cache) the guest images and registers them in a
# running berth-agent's image store, where VM specs can name them:
#   images/register.sh [--socket PATH] [probe|linux|all]
# Names: probe-<hash> (kernel) for the probe; linux-<hash>-vmlinux (kernel),
# -initramfs (initrd) and -rootfs (disk) for Linux, where <hash> is the
# recipe's hash, so a rebuilt recipe registers beside the old one instead of
# clashing with it. Each import is checked against the digest computed here.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
socket_args=()
if [[ "${1:-}" == --socket ]]; then
    socket_args=(--socket "${2:?--socket needs a path}")
    shift 2
fi
nodectl="${NODECTL:-nodectl}"
command -v "$nodectl" >/dev/null || nodectl="$here/../target/debug/nodectl"

register() { # <file> <name> <kind> <recipe>
    local digest
    digest="sha256:$(sha256sum "$1" | cut -d' ' -f1)"
    "$nodectl" "${socket_args[@]}" image import "$1" --name "$2" --kind "$3" \
        --digest "$digest" -l "recipe=$4" -l built-by=images/register.sh >/dev/null
    echo "[images/register] $2 ($3) $digest"
}

targets=("${@:-all}")
[[ "${targets[0]}" == all ]] && targets=(probe linux)
for name in "${targets[@]}"; do
    out="$("$here/build.sh" "$name" | tail -1)"
    tag="$(basename "$out")"
    case "$name" in
        probe) register "$out/probe.elf" "$tag" kernel probe ;;
        linux)
            register "$out/vmlinux" "$tag-vmlinux" kernel linux
            register "$out/initramfs.cpio.gz" "$tag-initramfs" initrd linux
            register "$out/rootfs.ext4" "$tag-rootfs" disk linux
            ;;
        *) echo "images/register.sh: cannot register '$name' (have: probe linux)" >&2; exit 2 ;;
    esac
done
