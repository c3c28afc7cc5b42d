#!/usr/bin/env bash
# Build the package's wheel on the controller: build-wheel.sh PYTHON SRC_DIR WHEEL_DIR
# Prints the wheel's file name on the last line.
#
# Builds from a scratch copy of SRC_DIR so setuptools' build/ and *.egg-info never land in the
# source tree (and stale files in an old build/ never land in the wheel). SOURCE_DATE_EPOCH makes
# the zip timestamps fixed: the same source gives the same bytes, so the copy to the hosts stays
# unchanged (and the package is not reinstalled) until the code really changes.
set -euo pipefail
python=$1 src=$2 out=$3

source_tar() {
    tar -C "$src" --exclude=build --exclude=dist --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude=.ruff_cache --sort=name -cf - .
}

# A playbook includes the role once per service: the first include builds, the others find the
# wheel of the same source (content, names and mtimes) already there and skip pip (~2.5 s each).
mkdir -p "$out"
stamp="$out/.source-$(source_tar | sha1sum | cut -c1-40)"
if [[ -s "$stamp" && -f "$out/$(cat "$stamp")" ]]; then
    cat "$stamp"
    exit 0
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/pipeline-app-wheel.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src" "$scratch/out"
source_tar | tar -C "$scratch/src" -xf -

SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --no-deps --disable-pip-version-check --quiet \
    --wheel-dir "$scratch/out" "$scratch/src" >&2

wheel=$(cd "$scratch/out" && ls -- *.whl)
[[ $(wc -l <<<"$wheel") -eq 1 ]] || { echo "expected one wheel, got: $wheel" >&2; exit 1; }
# Copy under a temporary name, then rename: a concurrent run never reads a half-written wheel.
cp -- "$scratch/out/$wheel" "$out/.$wheel.$$"
mv -f -- "$out/.$wheel.$$" "$out/$wheel"
echo "$wheel" >"$stamp.$$" && mv -f -- "$stamp.$$" "$stamp"
echo "$wheel"
