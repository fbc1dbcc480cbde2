#!/usr/bin/env bash
# Installs what building and testing Berth needs on a fresh Debian 12 machine.
# Quick when everything is there already: apt runs only for what is missing.
set -euo pipefail

packages=(
    build-essential bc bison flex libelf-dev libssl-dev cpio e2fsprogs lz4 kmod xz-utils
    binutils linux-source-6.1 busybox-static qemu-system-x86 qemu-utils iproute2 systemd python3
    flake8 black strace acpica-tools mtools fdisk mmdebstrap openssh-client
)
missing_packages() {
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

sudo=""
[[ $(id -u) == 0 ]] || sudo=sudo
updated=""
# Two passes: installing one package can make apt remove another that we
# need. A machine image with a backported qemu-utils 10 loses it when
# qemu-system-x86 7.2 comes in, and qemu-img is then gone; the second pass
# installs the version that fits.
for pass in 1 2; do
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]})) || break
    echo "[install-deps] installing: ${missing[*]}" >&2
    [[ -n "$updated" ]] || { $sudo apt-get update -qq; updated=1; }
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
mapfile -t missing < <(missing_packages)
if ((${#missing[@]})); then
    echo "[install-deps] still not installed after two passes: ${missing[*]}" >&2
    exit 1
fi
for cmd in qemu-img qemu-system-x86_64 black flake8 strace iasl mdir mtype blkid sfdisk mmdebstrap ssh ssh-keygen; do
    command -v "$cmd" >/dev/null || { echo "[install-deps] $cmd is missing although its package is installed" >&2; exit 1; }
done

if command -v rustup >/dev/null; then
    installed="$(rustup component list --installed 2>/dev/null || true)"
    for c in clippy rustfmt; do
        grep -q "^$c" <<<"$installed" || rustup component add "$c"
    done
fi
command -v cargo >/dev/null || { echo "[install-deps] cargo is missing: install Rust with rustup" >&2; exit 1; }
