#!/usr/bin/env bash
# Screenshot of a Prometheus console page in headless Chromium (Debian's chromium; `make
# host-packages` installs it), after its graphs have loaded.
#
#   scripts/screenshot-console.sh [URL] [OUT.png]
#   scripts/screenshot-console.sh    # the local deployment's dashboard -> docs/monitoring-console.png
#
# molecule's default scenario runs it against its monitoring container (tests/test_monitoring.py).
set -euo pipefail

url=${1:-http://127.0.0.1:9090/consoles/pipeline.html}
out=${2:-docs/monitoring-console.png}
# Window size and how long the page's scripts may run (virtual time: the graphs' queries finish).
size=${SCREENSHOT_SIZE:-1400,2000}
budget_ms=${SCREENSHOT_BUDGET_MS:-10000}

die() { printf '[screenshot-console] ERROR: %s\n' "$*" >&2; exit 1; }

browser=$(command -v chromium || command -v chromium-browser || true)
[[ -n $browser ]] || die "chromium not found (apt-get install chromium, or make host-packages)"
mkdir -p "$(dirname "$out")"
profile=$(mktemp -d "${TMPDIR:-/tmp}/screenshot-console.XXXXXX")
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: root on the controller (CI) has no user namespace sandbox to drop into.
timeout 120 "$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$size" --virtual-time-budget="$budget_ms" \
    --screenshot="$out" "$url" >/dev/null 2>"$profile/stderr" \
    || { cat "$profile/stderr" >&2; die "chromium failed on $url"; }
[[ -s $out ]] || die "no screenshot written to $out"
printf '%s\n' "$out"
