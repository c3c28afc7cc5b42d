#!/usr/bin/env bash
# Build the image of the `vms` molecule scenario: a container that behaves like a fresh Debian 12
# cloud VM reached over SSH. From the base image (scripts/build-base-image.sh), it keeps only what
# a minimal cloud image has (python3, sudo, openssh-server) and adds what cloud-init would:
#   - a `deploy` user with passwordless sudo and no password (key-only: its authorized key is
#     written when the scenario creates the host, as cloud-init does at first boot);
#   - sshd refusing root and password logins;
#   - host keys generated at first boot, so each host has its own (none are baked into the image).
# Removed on purpose: acl, python3-apt, python3-venv (the roles must install what they need).
#
#   scripts/build-vm-image.sh             # no-op when the image already exists
#   DEBIAN=13 scripts/build-vm-image.sh   # a Debian 13 one (iot-pipeline/debian13-vm)
#   FORCE=1 scripts/build-vm-image.sh     # rebuild
#
# Environment: DEBIAN (12 or 13), VM_IMAGE (default iot-pipeline/debian$DEBIAN-vm:latest),
# BASE_IMAGE (its parent, scripts/build-base-image.sh with the same DEBIAN).
set -euo pipefail

DEBIAN="${DEBIAN:-12}"
VM_IMAGE="${VM_IMAGE:-iot-pipeline/debian$DEBIAN-vm:latest}"
BASE_IMAGE="${BASE_IMAGE:-iot-pipeline/debian$DEBIAN-systemd:latest}"

log() { printf '[build-vm-image] %s\n' "$*" >&2; }
die() { printf '[build-vm-image] ERROR: %s\n' "$*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "cannot reach the Docker engine; run scripts/install-docker.sh first"
if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$VM_IMAGE" >/dev/null 2>&1; then
    log "$VM_IMAGE already exists; nothing to do (FORCE=1 to rebuild)"
    exit 0
fi
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    || die "$BASE_IMAGE not found; build it first with DEBIAN=$DEBIAN scripts/build-base-image.sh"

log "building $VM_IMAGE from $BASE_IMAGE"
# The legacy builder: Debian's docker.io 20.10 ships no buildx, and the build needs no BuildKit feature.
DOCKER_BUILDKIT=0 docker build -q -t "$VM_IMAGE" - >/dev/null <<DOCKERFILE
FROM $BASE_IMAGE
RUN set -eux; \
    apt-get update -q; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server; \
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -q acl python3-apt python3-venv; \
    DEBIAN_FRONTEND=noninteractive apt-get autoremove -y -q --purge; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \
    rm -f /etc/ssh/ssh_host_*; \
    useradd --create-home --shell /bin/bash --comment "cloud image default user" deploy; \
    passwd --lock deploy; \
    printf 'deploy ALL=(ALL) NOPASSWD:ALL\n' >/etc/sudoers.d/90-cloud-init-users; \
    chmod 0440 /etc/sudoers.d/90-cloud-init-users; \
    install -d -m 0700 -o deploy -g deploy /home/deploy/.ssh; \
    printf 'PermitRootLogin no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n' \
        >/etc/ssh/sshd_config.d/50-cloud-image.conf; \
    printf '%s\n' '[Unit]' 'Description=SSH host keys of this host (first boot)' \
        'ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key' 'Before=ssh.service' \
        '[Service]' 'Type=oneshot' 'ExecStart=/usr/bin/ssh-keygen -A' \
        '[Install]' 'WantedBy=ssh.service' >/etc/systemd/system/ssh-host-keys.service; \
    systemctl enable ssh-host-keys.service ssh.service
LABEL org.opencontainers.image.description="Debian $DEBIAN + systemd + sshd: a fresh cloud VM for the vms scenario"
DOCKERFILE
log "built $VM_IMAGE"
