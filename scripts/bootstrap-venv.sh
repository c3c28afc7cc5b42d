#!/usr/bin/env bash
# Create / update the controller virtualenv: the pinned tools of requirements.txt, the pipeline
# package (editable, with its db/ml/test/train extras) and the collections of requirements.yml.
# Idempotent and fast on a rerun: pip runs only when requirements.txt or the package's
# pyproject.toml changed (hash stamp in the venv), Galaxy only when a collection is missing.
#
#   scripts/bootstrap-venv.sh
#   . .venv/bin/activate        # or PATH=$PWD/.venv/bin:$PATH
#
# Environment: PYTHON (interpreter creating the venv, default python3; ansible 12 needs >= 3.11),
#              VENV (default .venv in the repo), FORCE=1 (reinstall even when the stamp matches).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$REPO_ROOT/.venv}"
REQUIREMENTS="$REPO_ROOT/requirements.txt"
COLLECTIONS="$REPO_ROOT/requirements.yml"
PACKAGE="$REPO_ROOT/files/iot_pipeline"
STAMP="$VENV/.bootstrap-stamp"

log() { printf '[bootstrap-venv] %s\n' "$*" >&2; }
die() { printf '[bootstrap-venv] ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11+ (Debian: apt-get install python3)"

create_venv() {
    "$PYTHON" -m venv "$VENV" 2>/dev/null && return 0
    # Debian ships venv/ensurepip separately; a failed attempt leaves a venv without pip behind.
    rm -rf "$VENV"
    command -v apt-get >/dev/null || die "'$PYTHON -m venv' failed; install the venv module for $PYTHON"
    log "'$PYTHON -m venv' failed; installing python3-venv"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q python3-venv \
        || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q python3-venv; } \
        || die "could not install python3-venv"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed even with python3-venv installed"
}

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    create_venv
fi

# --- Python packages --------------------------------------------------------------------------
pip_args=(-r "$REQUIREMENTS")
hash_inputs=("$REQUIREMENTS")
if [[ -f "$PACKAGE/pyproject.toml" ]]; then
    pip_args+=(-e "${PACKAGE}[db,ml,test,train]")
    hash_inputs+=("$PACKAGE/pyproject.toml")
fi
want="$( { "$VENV/bin/python" --version; cat "${hash_inputs[@]}"; } | sha256sum | cut -d' ' -f1)"

if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "python packages up to date"
else
    log "installing python packages (first run downloads TensorFlow, a few minutes)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${pip_args[@]}" \
        || die "pip install failed (see above); check network access to PyPI"
    echo "$want" >"$STAMP"
fi

# --- Collections ------------------------------------------------------------------------------
# Prints the collections of requirements.yml missing (or older than pinned) in the venv's ansible.
missing_collections() {
    "$VENV/bin/ansible-galaxy" collection list --format json 2>/dev/null \
        | "$VENV/bin/python" -c '
import json, sys, yaml
from ansible.module_utils.compat.version import LooseVersion
installed = {}
for found in json.load(sys.stdin).values():
    for name, info in found.items():
        installed.setdefault(name, info["version"])   # first path wins, like ansible itself
for req in yaml.safe_load(open(sys.argv[1]))["collections"]:
    have = installed.get(req["name"])
    if have is None or ("version" in req and LooseVersion(have) < LooseVersion(str(req["version"]))):
        print(req["name"], have or "missing", "<", req.get("version", "any"))
' "$COLLECTIONS"
}

missing="$(missing_collections)" || die "could not list the installed collections"
if [[ -z "$missing" ]]; then
    log "collections satisfied (bundled with the ansible package)"
else
    log "collections to install:"$'\n'"$missing"
    if ! "$VENV/bin/ansible-galaxy" collection install -r "$COLLECTIONS"; then
        missing="$(missing_collections)"
        [[ -z "$missing" ]] || die "ansible-galaxy failed and these are still missing:"$'\n'"$missing"
        log "ansible-galaxy failed, but the installed collections satisfy requirements.yml"
    fi
fi
log "ready: PATH=$VENV/bin:\$PATH"
