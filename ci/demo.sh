#!/usr/bin/env bash
# Berth's main job on this machine: build, start an agent, define and boot a
# VM from the built guest image through it, and show the VM's console.
# Linux on a hardware-KVM host; the probe guest on a software (PVM) KVM,
# where a stock Linux cannot boot (see docs/testing.md). Everything lives
# under a temporary state root and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
bin="$(ci/build-release.sh)"
demo="$(mktemp -d /tmp/berth-demo.XXXXXX)"
socket="$demo/agent.sock"
nodectl=("$bin/nodectl" --socket "$socket")

if [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]] && [[ ! -d /sys/module/kvm_pvm ]]; then
    echo "== hardware KVM: the Linux guest (2 vCPUs, 256 MiB)"
    image="$(images/build.sh linux | tail -1)"
    kernel="$image/vmlinux"
    spec_kernel="path = \"$kernel\"
initrd = \"$image/initramfs.cpio.gz\"
discovery = \"legacy\"
cmdline = \"console=ttyS0 reboot=k panic=-1 berth.run=\\\"uname -a; grep -c ^processor /proc/cpuinfo; free -m\\\"\""
else
    echo "== software KVM (kvm_pvm) or unknown: the probe guest (2 vCPUs, 256 MiB)"
    image="$(images/build.sh probe | tail -1)"
    kernel="$image/probe.elf"
    spec_kernel="path = \"$kernel\"
cmdline = \"probe.mode=tick\""
fi

cat > "$demo/agent.toml" <<EOF
state_root = "$demo/state"
socket = "$socket"
kernel_roots = ["$image"]
disk_roots = ["$demo"]
cgroup_parent = "berth-demo"
EOF
cat > "$demo/vm.toml" <<EOF
id = "demo"
name = "demo"
vcpus = 2
memory_mib = 256
labels = { purpose = "demo" }
[kernel]
$spec_kernel
EOF

"$bin/berth-agent" --config "$demo/agent.toml" 2> "$demo/agent.log" &
agent=$!
cleanup() {
    "${nodectl[@]}" stop demo --force >/dev/null 2>&1 || true
    kill "$agent" 2>/dev/null || true
    wait "$agent" 2>/dev/null || true
    echo "== agent log: $demo/agent.log"
}
trap cleanup EXIT
for _ in $(seq 100); do [[ -S "$socket" ]] && break; sleep 0.05; done

echo "== nodectl node"
"${nodectl[@]}" node
echo "== nodectl create -f vm.toml && nodectl start demo"
"${nodectl[@]}" create -f "$demo/vm.toml" >/dev/null
"${nodectl[@]}" start demo >/dev/null
"${nodectl[@]}" list
echo "== the VM's console (5 s)"
timeout 5 "${nodectl[@]}" console demo --follow || true
echo
echo "== nodectl top --once"
"${nodectl[@]}" top --once
