#!/usr/bin/env bash
# The agent drives each VMM as a process through the contract in
# proto/src/vmm_process, so nothing that speaks KVM may be linked into
# berth-agent or nodectl (docs/architecture.md). Fails naming what came back.
set -euo pipefail
cd "$(dirname "$0")/.."

forbidden=(berth-vmm kvm-ioctls kvm-bindings seccompiler linux-loader vm-memory)
tree="$(cargo tree -p berth-agent -e normal,build,dev --prefix none --offline 2>/dev/null ||
    cargo tree -p berth-agent -e normal,build,dev --prefix none)"
found=()
for crate in "${forbidden[@]}"; do
    if grep -q "^$crate v" <<<"$tree"; then
        found+=("$crate")
    fi
done
if ((${#found[@]})); then
    echo "ci/check-deps.sh: berth-agent depends on ${found[*]}; the agent may use the VMM only through berth_proto::vmm_process" >&2
    exit 1
fi
echo "ci/check-deps.sh: berth-agent links none of ${forbidden[*]}"
