#!/usr/bin/env bash
# The inner host of the emulated-AMD-V test harness (docs/testing.md): Debian's
# stock cloud kernel and the modules that give it a real /dev/kvm on kvm_amd
# under QEMU's software emulation of AMD-V, plus busybox for its /init.
# Usage: images/amdhost/build.sh <out-dir>   (images/build.sh picks <out-dir>)
# Output: vmlinuz, modules/*.ko (KVM, tun, virtio-pci disk, bridge), busybox, version
set -euo pipefail
recipe="$(cd "$(dirname "$0")" && pwd)"
IMAGE_NAME=amdhost
source "$recipe/../lib.sh"
out="${1:?usage: build.sh <out-dir>}"

[[ -x /bin/busybox ]] || { log "missing /bin/busybox: apt-get install busybox-static"; exit 1; }
tmp="$out.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp/deb" "$tmp/modules"
trap 'rm -rf "$tmp"' EXIT

# The versioned package the cloud meta-package points at today.
pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
if [[ -z "$pkg" ]]; then
    log "apt knows no linux-image-cloud-amd64: running apt-get update"
    apt-get update -qq
    pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')"
fi
[[ -n "$pkg" ]] || { log "cannot find Debian's cloud kernel package"; exit 1; }
log "fetching $pkg"
(cd "$tmp/deb" && apt-get download -qq "$pkg" 2>/dev/null) || {
    apt-get update -qq && (cd "$tmp/deb" && apt-get download -qq "$pkg")
}
dpkg-deb -x "$tmp/deb"/*.deb "$tmp/deb/x"
kver="${pkg#linux-image-}"
cp "$tmp/deb/x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
moddir="$tmp/deb/x/lib/modules/$kver/kernel"
# KVM and taps; and for an inner host that runs cloud images: virtio-pci
# disks (the image comes on a data disk, too big for an initramfs) and
# bridges (VMs of two agents on one network).
for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd drivers/net/tun \
    drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci_legacy_dev \
    drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
    net/llc/llc net/802/stp net/bridge/bridge; do
    cp "$moddir/$m.ko" "$tmp/modules/"
done
cp /bin/busybox "$tmp/busybox"
echo "$pkg $(dpkg-deb -f "$tmp/deb"/*.deb Version)" > "$tmp/version"
rm -rf "$tmp/deb"

touch "$tmp/.complete"
rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$tmp" "$out"
trap - EXIT
log "done: $out ($(cat "$out/version"))"
