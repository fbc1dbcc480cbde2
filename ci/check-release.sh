#!/usr/bin/env bash
# Test-only code stays out of what ships: the release binaries (built as
# ci/build-release.sh builds them) hold no BERTH_TEST_ fault hook and no
# fuzz entry point. Fails naming the binary and what it found.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(ci/build-release.sh --shipped)"
status=0
for name in berth-vmm berth-agent nodectl; do
    for needle in BERTH_TEST_ fuzzing::; do
        if grep -qa "$needle" "$bin/$name"; then
            echo "ci/check-release.sh: release $name contains \"$needle\": test-only code is compiled in" >&2
            status=1
        fi
    done
done
((status == 0)) && echo "ci/check-release.sh: release berth-vmm, berth-agent and nodectl hold no test-only code"

# The shipped berth-vmm is static: what its seccomp filters allow must be
# all it needs there too. The entropy device once fell back to opening
# /dev/urandom in a static binary (no libc getrandom for the getrandom
# crate to find), and its filter stopped the VM at the first request.
if [[ -c /dev/kvm ]]; then
    probe="$(images/build.sh probe | tail -1)/probe.elf"
    out="$(timeout 120 "$bin/berth-vmm" --kernel "$probe" --vcpus 1 --memory-mib 64 --rng \
        --console-stdout --cmdline "probe.mode=rng probe.rng_bytes=4096" 2>&1)" || true
    if grep -q "PROBE rng differ=1" <<<"$out"; then
        echo "ci/check-release.sh: the release berth-vmm serves entropy under its filters"
    else
        echo "ci/check-release.sh: the release berth-vmm did not serve the probe its entropy:" >&2
        tail -5 <<<"$out" >&2
        status=1
    fi
else
    echo "ci/check-release.sh: no /dev/kvm here, so the release berth-vmm was not booted" >&2
fi
exit "$status"
