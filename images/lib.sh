# Shared helpers for the image recipes. Sourced, not run.
# Each image is cached under $BERTH_CACHE/images/<name>-<hash>/, where <hash>
# covers every file of the recipe (and this file), so editing a recipe rebuilds
# it and nothing else does.
set -euo pipefail

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BERTH_CACHE="${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}"

recipe_hash() {
    local name="$1"
    (cd "$IMAGES_DIR" && find "$name" lib.sh -type f -print0 | sort -z | xargs -0 sha256sum) \
        | sha256sum | cut -c1-16
}

image_dir() {
    echo "$BERTH_CACHE/images/$1-$(recipe_hash "$1")"
}

log() { echo "[images/$IMAGE_NAME] $*" >&2; }
