#!/usr/bin/env bash
# Make sure a Docker engine is installed and answering, so the local hosts (systemd containers)
# can be created. Idempotent: with dockerd installed and `docker info` working it only checks.
#
#   scripts/install-docker.sh
#
# Environment:
#   DOCKER_WAIT_SECONDS  how long to wait for the engine to answer (default 60)
#   DOCKERD_LOG          log of a dockerd started here without an init system (default /var/log/dockerd.log)
#
# Debian/Ubuntu only (docker.io from the distribution). Elsewhere install Docker yourself; the
# rest of the repo only needs `docker info` to work for the user running Ansible.
set -euo pipefail

WAIT_SECONDS="${DOCKER_WAIT_SECONDS:-60}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"

log() { printf '[install-docker] %s\n' "$*" >&2; }
die() { printf '[install-docker] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root for: $*; rerun as root or install sudo"
    fi
}

install_engine() {
    command -v apt-get >/dev/null || die "dockerd not found and this is not a Debian-like system; install Docker by hand"
    log "dockerd not found; installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists when apt has none or does not know docker.io yet.
    if ! apt-cache show docker.io >/dev/null 2>&1; then
        as_root apt-get update -q || die "apt-get update failed; check network access to the Debian mirror"
    fi
    as_root apt-get install -y -q docker.io \
        || die "apt-get install docker.io failed (see the apt output above)"
}

start_engine() {
    if [[ "$(ps -p 1 -o comm= 2>/dev/null)" == systemd ]]; then
        log "starting docker with systemctl"
        as_root systemctl enable --now docker.service || die "systemctl start docker failed; see: journalctl -u docker"
    elif pgrep -x dockerd >/dev/null; then
        # Started by someone else and still coming up (or stuck): wait, never start a second one.
        log "dockerd is running but not answering yet; waiting"
    else
        log "no systemd as PID 1; starting dockerd in the background (log: $DOCKERD_LOG)"
        # shellcheck disable=SC2016  # $1 is expanded by the inner bash, which runs as root.
        # setsid: own session, so a Ctrl-C in the calling terminal does not reach dockerd.
        as_root bash -c 'setsid nohup dockerd >>"$1" 2>&1 </dev/null &' _ "$DOCKERD_LOG"
    fi
}

wait_for_engine() {
    local waited=0
    until docker info >/dev/null 2>&1; do
        if (( waited >= WAIT_SECONDS )); then
            log "docker info still fails after ${WAIT_SECONDS} s:"
            docker info 2>&1 >/dev/null | tail -n 5 >&2 || true
            [[ -r "$DOCKERD_LOG" ]] && { log "last lines of $DOCKERD_LOG:"; tail -n 20 "$DOCKERD_LOG" >&2; }
            die "the Docker engine did not come up"
        fi
        sleep 2
        waited=$(( waited + 2 ))
    done
}

if ! command -v dockerd >/dev/null; then
    install_engine
fi
command -v docker >/dev/null || die "dockerd is installed but the docker CLI is missing (package docker-cli / docker.io)"

if docker info >/dev/null 2>&1; then
    log "docker engine already running ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
    exit 0
fi

# A permission problem is not solved by starting another daemon.
if docker info 2>&1 | grep -qi 'permission denied'; then
    die "cannot talk to the Docker socket as $(id -un); add the user to the docker group or run as root"
fi

start_engine
wait_for_engine
log "docker engine is up ($(docker version -f '{{.Server.Version}}'))"
