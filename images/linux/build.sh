#!/usr/bin/env bash
# Builds the Linux guest: a small 6.1 kernel (tinyconfig + config.fragment) from
# Debian's linux-source-6.1, a busybox initramfs and an ext4 root disk.
# Usage: images/linux/build.sh <out-dir>   (images/build.sh picks <out-dir>)
# Output: vmlinux (ELF), bzImage, initramfs.cpio.gz, rootfs.ext4, config
set -euo pipefail
recipe="$(cd "$(dirname "$0")" && pwd)"
IMAGE_NAME=linux
source "$recipe/../lib.sh"
out="${1:?usage: build.sh <out-dir>}"

src_tar=/usr/src/linux-source-6.1.tar.xz
for f in "$src_tar" /bin/busybox; do
    [[ -e "$f" ]] || { log "missing $f: apt-get install linux-source-6.1 busybox-static"; exit 1; }
done
for t in make gcc bc bison flex mke2fs cpio gzip lz4; do
    command -v "$t" >/dev/null || { log "missing tool $t (see ci/install-deps.sh)"; exit 1; }
done

# The kernel tree is keyed by the config fragment alone, so editing /init
# or the root disk repacks in seconds instead of rebuilding the kernel.
work="$BERTH_CACHE/build/linux-kernel-$(sha256sum "$recipe/config.fragment" | cut -c1-16)"
mkdir -p "$work"
if [[ ! -f "$work/src/Makefile" ]]; then
    log "unpacking $src_tar"
    rm -rf "$work/src" && mkdir -p "$work/src"
    tar -xf "$src_tar" -C "$work/src" --strip-components=1
fi
cd "$work/src"

log "configuring (tinyconfig + config.fragment)"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m -O . .config "$recipe/config.fragment" >/dev/null
make -s olddefconfig
# An option that did not stick (a missing dependency) must fail here, not at boot.
bad=0
while read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qx "$line" .config || { log "option did not stick: $line"; bad=1; } ;;
        "# CONFIG_"*" is not set") opt="${line#\# }"; opt="${opt%% *}"
            grep -q "^$opt=" .config && { log "option still set: $opt"; bad=1; } ;;
    esac
done < "$recipe/config.fragment"
[[ $bad == 0 ]] || exit 1

log "building kernel with $(nproc) jobs (10-15 min on 2 cores)"
make -s -j"$(nproc)" bzImage KBUILD_BUILD_HOST=berth KBUILD_BUILD_USER=berth

log "building initramfs and root disk"
gcc -O2 -o "$work/gen_init_cpio" usr/gen_init_cpio.c
tmp="$out.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp"
cat > "$work/initramfs.list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /bin 0755 0 0
dir /sbin 0755 0 0
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
dir /mnt 0755 0 0
dir /root 0700 0 0
file /bin/busybox /bin/busybox 0755 0 0
slink /bin/sh busybox 0777 0 0
file /init $recipe/init 0755 0 0
LIST
"$work/gen_init_cpio" "$work/initramfs.list" | gzip -9 > "$tmp/initramfs.cpio.gz"

root="$work/rootfs"
rm -rf "$root" && mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,root,etc}
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$recipe/init" "$root/sbin/init"
echo berth-guest > "$root/etc/hostname"
mke2fs -q -t ext4 -L berth-root -d "$root" -F "$tmp/rootfs.ext4" 64M

cp vmlinux "$tmp/vmlinux"
cp arch/x86/boot/bzImage "$tmp/bzImage"
cp .config "$tmp/config"
touch "$tmp/.complete"
rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$tmp" "$out"
# Kernel trees of older fragments are 1.5 GB each: keep only this one.
for old in "$BERTH_CACHE"/build/linux-kernel-*; do
    [[ "$old" == "$work" ]] || rm -rf "$old"
done
log "done: $out"
