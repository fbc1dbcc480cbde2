#!/bin/sh
# /init of the inner host in the emulated-AMD-V harness (tests/src/harness.rs).
# Loads Debian's kvm_amd, then runs each /scenarios/NN-<name>.sh in order and
# brackets its output with lines the calling test parses:
#   HARNESS-BEGIN <name>
#   HARNESS-END <name> exit=<status> ms=<elapsed>
# (exit 137 and a HARNESS-TIMEOUT line before it: killed past its budget)
# and ends with HARNESS-DONE and a power-off.
export PATH=/bin:/usr/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

# Each scenario's budget unless its script says otherwise with a line
# "# harness-budget: <seconds>"; the slowest standard one takes about 35 s.
DEFAULT_SECONDS=180

uptime_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }

for m in irqbypass kvm kvm-amd tun; do
    insmod "/lib/modules/$m.ko" || echo "HARNESS-ERROR insmod $m failed"
done
# An inner host for cloud images: a data disk (a full image is too big for
# an initramfs) through virtio-pci, mounted at /data, and bridges.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk \
    llc stp bridge; do
    [ -f "/lib/modules/$m.ko" ] && { insmod "/lib/modules/$m.ko" || echo "HARNESS-ERROR insmod $m failed"; }
done
if [ -f /lib/modules/virtio_blk.ko ]; then
    for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
    mkdir -p /data
    mount -t ext4 /dev/vda /data || echo "HARNESS-ERROR cannot mount the data disk /dev/vda"
fi
if [ -c /dev/kvm ]; then
    echo "HARNESS-KVM kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt) ready_ms=$(uptime_ms)"
else
    echo "HARNESS-ERROR no /dev/kvm after loading kvm-amd (does the CPU model offer svm?)"
fi

for s in /scenarios/*.sh; do
    name="$(basename "$s" .sh)"
    name="${name#*-}"
    echo "HARNESS-BEGIN $name"
    t0="$(uptime_ms)"
    # A scenario that hangs must not take the others with it: past its
    # budget it is killed, what its VMMs logged is shown, and what it left
    # running is ended.
    budget="$(sed -n 's/^# harness-budget: *//p' "$s")"
    budget="${budget:-$DEFAULT_SECONDS}"
    timeout -s KILL "$budget" sh "$s" </dev/null
    rc=$?
    if [ "$rc" = 137 ]; then
        echo "HARNESS-TIMEOUT $name after ${budget}s"
        for f in /tmp/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -c 4000 "$f"; }; done
        killall -9 berth-vmm vmmctl 2>/dev/null
    fi
    echo "HARNESS-END $name exit=$rc ms=$(( $(uptime_ms) - t0 ))"
done
echo "HARNESS-DONE"
poweroff -f
