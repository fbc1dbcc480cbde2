#!/usr/bin/env bash
# Installs what building and testing Berth needs on a fresh Debian 12 machine.
# Quick when everything is there already: apt runs only for what is missing.
set -euo pipefail

packages=(
    build-essential bc bison flex libelf-dev libssl-dev cpio e2fsprogs lz4 kmod xz-utils
    binutils linux-source-6.1 busybox-static qemu-system-x86 qemu-utils iproute2 systemd python3
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "[install-deps] installing: ${missing[*]}" >&2
    sudo=""
    [[ $(id -u) == 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if command -v rustup >/dev/null; then
    installed="$(rustup component list --installed 2>/dev/null || true)"
    for c in clippy rustfmt; do
        grep -q "^$c" <<<"$installed" || rustup component add "$c"
    done
fi
command -v cargo >/dev/null || { echo "[install-deps] cargo is missing: install Rust with rustup" >&2; exit 1; }
