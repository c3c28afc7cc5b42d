#!/usr/bin/env bash
# Install, on the controller, the Debian packages the Makefile's targets need and a fresh
# Debian 12 machine may lack: Java + Maven (build the offline Kafka archive, run the test
# broker), PostgreSQL's server binaries (the Python integration tests start their own cluster),
# debootstrap (base image), python3-venv, prometheus (for promtool: `make lint` checks and tests the
# alert rules), chromium (headless screenshot of the console dashboard, scripts/screenshot-console.sh)
# and nftables (tests/test_firewall.py checks the generated tables with nft -c).
# Docker is scripts/install-docker.sh's job.
# Idempotent: apt runs only when something is missing, and `apt-get update` at most once.
set -euo pipefail

log() { printf '[install-host-packages] %s\n' "$*" >&2; }

missing=()
need() {  # need COMMAND-OR-PATH PACKAGE
    if [[ $1 == /* ]]; then compgen -G "$1" >/dev/null && return 0
    else command -v "$1" >/dev/null && return 0
    fi
    missing+=("$2")
}
need java openjdk-17-jre-headless
need mvn maven
need '/usr/lib/postgresql/*/bin/pg_ctl' postgresql
need debootstrap debootstrap
need unzip unzip
need promtool prometheus
need chromium chromium
need /usr/sbin/nft nftables
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)

if ((${#missing[@]} == 0)); then
    log "host packages present"
    exit 0
fi
command -v apt-get >/dev/null || { log "ERROR: install ${missing[*]} (no apt-get here)"; exit 1; }
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
log "installing ${missing[*]}"
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
# Debian's postgresql package starts a cluster on 5432; the tests start their own, so the
# packaged one is left as Debian configures it.
# Debian's prometheus package starts a server on :9090, the port the local monitoring container
# publishes on loopback; the controller only needs promtool, so its server is stopped and disabled.
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null \
        && [[ -d /run/systemd/system ]]; then
    log "stopping the controller's own Prometheus server (only promtool is used here)"
    "${sudo[@]}" systemctl disable --now prometheus.service
fi
