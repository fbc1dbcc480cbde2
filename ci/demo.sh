#!/usr/bin/env bash
# Berth's main job on this machine: build, boot a guest on berth-vmm, show its
# console. Linux on a hardware-KVM host; the probe guest on a software (PVM)
# KVM, where a stock Linux cannot boot (see docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
vmm="$(ci/build-release.sh)/berth-vmm"

if [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]] && [[ ! -d /sys/module/kvm_pvm ]]; then
    echo "== hardware KVM: booting the Linux guest (2 vCPUs, 256 MiB)"
    linux="$(images/build.sh linux | tail -1)"
    exec "$vmm" --kernel "$linux/vmlinux" --initrd "$linux/initramfs.cpio.gz" \
        --vcpus 2 --memory-mib 256 --console-stdout --console-in stdin \
        --cmdline "console=ttyS0 reboot=k panic=-1 ${BERTH_DEMO_CMDLINE:-}"
else
    echo "== software KVM (kvm_pvm) or unknown: booting the probe guest (2 vCPUs, 256 MiB)"
    probe="$(images/build.sh probe | tail -1)"
    exec "$vmm" --kernel "$probe/probe.elf" --vcpus 2 --memory-mib 256 --console-stdout \
        --cmdline "probe.mode=boot ${BERTH_DEMO_CMDLINE:-}"
fi
