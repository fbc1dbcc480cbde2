#!/usr/bin/env bash
# A Debian 12 "genericcloud" disk, built from Debian's package archive with
# mmdebstrap: GPT, one ext4 root partition found by PARTUUID, no boot loader
# (Berth boots the kernel the image carries). Built without loop mounts or
# root-only mounts: mkfs.ext4 -d writes the tree into the partition's place
# in a plain file, sfdisk writes the partition table around it. Nothing of
# Berth goes into it.
# Usage: images/debian/build.sh <out-dir>   (images/build.sh picks <out-dir>)
# Output: debian-12-genericcloud-amd64.{raw,qcow2}, partuuid, packages (the
#         installed package list), version
set -euo pipefail
recipe="$(cd "$(dirname "$0")" && pwd)"
IMAGE_NAME=debian
source "$recipe/../lib.sh"
out="${1:?usage: build.sh <out-dir>}"

for cmd in mmdebstrap mkfs.ext4 sfdisk qemu-img; do
    command -v "$cmd" >/dev/null || { log "missing $cmd: run ci/install-deps.sh"; exit 1; }
done
mirror="${BERTH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
disk_mib=2048          # Debian's own genericcloud raw image is 2 GiB
part_start=2048        # sectors: the partition begins at 1 MiB
# The last 33 sectors hold the backup GPT.
part_sectors=$(( disk_mib * 2048 - part_start - 34 ))
part_sectors=$(( part_sectors / 8 * 8 ))   # whole 4 KiB ext4 blocks

tmp="$out.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
partuuid="$(cat /proc/sys/kernel/random/uuid)"
fsuuid="$(cat /proc/sys/kernel/random/uuid)"
name=debian-12-genericcloud-amd64
include="$(grep -v '^#' "$recipe/genericcloud.packages" | grep -v '^$' | paste -sd,)"

log "mmdebstrap bookworm from $mirror (about 90 s and 600 MB)"
t0=$SECONDS
# The root's first boot is cloud-init's: no host keys, no machine id, no
# hostname of the builder's. en_US.UTF-8 is generated, as cloud-init's
# locale module sets it and Debian's locale-gen only builds what
# /etc/locale.gen lists. The fstab names the root by the partition's
# PARTUUID, as the kernel command line will.
mmdebstrap --quiet --variant=important --components=main \
    --include="$include" \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook=': > "$1"/etc/machine-id; rm -f "$1"/var/lib/dbus/machine-id' \
    --customize-hook='echo localhost > "$1"/etc/hostname' \
    --customize-hook='sed -i "s/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/" "$1"/etc/locale.gen && chroot "$1" locale-gen >/dev/null' \
    --customize-hook="printf 'PARTUUID=%s / ext4 rw,discard,errors=remount-ro 0 1\n' $partuuid > \"\$1\"/etc/fstab" \
    --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" > "$1"/../packages' \
    bookworm "$tmp/root" "$mirror"
log "root tree ready in $((SECONDS - t0)) s ($(du -sh "$tmp/root" | cut -f1))"

raw="$tmp/$name.raw"
truncate -s "${disk_mib}M" "$raw"
printf 'label: gpt\nstart=%d, size=%d, type=linux, uuid=%s, name=root\n' \
    "$part_start" "$part_sectors" "$partuuid" | sfdisk -q "$raw"
mkfs.ext4 -F -q -L root -U "$fsuuid" -E "offset=$((part_start * 512))" -d "$tmp/root" \
    "$raw" "$((part_sectors / 2))k"
sfdisk --verify "$raw" >/dev/null || { log "sfdisk --verify failed on $raw"; exit 1; }
rm -rf "$tmp/root"
qemu-img convert -f raw -O qcow2 "$raw" "$tmp/$name.qcow2"
echo "$partuuid" > "$tmp/partuuid"
kernel="$(awk '$1 ~ /^linux-image-[0-9]/ {print $1 " " $2}' "$tmp/packages")"
echo "debian 12 genericcloud, $kernel, built $(date -u +%F)" > "$tmp/version"

touch "$tmp/.complete"
rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$tmp" "$out"
trap - EXIT
log "done in $((SECONDS - t0)) s: $out ($(cat "$out/version"))"
