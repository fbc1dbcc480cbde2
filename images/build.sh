#!/usr/bin/env bash
# Builds the guest images, each cached outside the repo by its recipe's hash.
#   images/build.sh [probe|linux|amdhost|debian|all]   build (default: all) and print the output dirs
#   images/build.sh path <name>         print where <name> is (or would be) cached
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
IMAGE_NAME=build
source "$here/lib.sh"

if [[ "${1:-}" == path ]]; then
    image_dir "${2:?usage: images/build.sh path <name>}"
    exit 0
fi

targets=("${@:-all}")
[[ "${targets[0]}" == all ]] && targets=(probe linux amdhost debian)
for name in "${targets[@]}"; do
    [[ -x "$here/$name/build.sh" ]] || { echo "unknown image '$name' (have: probe linux amdhost debian)" >&2; exit 2; }
    out="$(image_dir "$name")"
    if [[ -f "$out/.complete" ]]; then
        echo "[images/$name] cached: $out" >&2
    else
        "$here/$name/build.sh" "$out"
    fi
    echo "$out"
done
