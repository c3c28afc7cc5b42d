#!/usr/bin/env bash
# Build the base image of the local hosts: Debian 12 (bookworm) or 13 (trixie) with systemd as
# PID 1 and python3, so Ansible treats each container like a small VM (apt, systemd units, users).
#
#   scripts/build-base-image.sh            # no-op when the image already exists
#   DEBIAN=13 scripts/build-base-image.sh  # the Debian 13 image (iot-pipeline/debian13-systemd)
#   FORCE=1 scripts/build-base-image.sh    # rebuild
#
# Environment:
#   DEBIAN          12 (default, bookworm) or 13 (trixie)
#   BASE_IMAGE      image to build / check (default iot-pipeline/debian$DEBIAN-systemd:latest)
#   DEBIAN_MIRROR   Debian mirror (default: the one the host's apt uses, else http://deb.debian.org/debian)
#   SECURITY_MIRROR security mirror (default: the host's, else http://deb.debian.org/debian-security)
#   FORCE=1         rebuild even if BASE_IMAGE exists
#
# Using a registry image instead of building one: any Debian 12 image with systemd at
# /lib/systemd/systemd and python3 + python3-apt + python3-venv + sudo will do (e.g. this image
# pushed to your registry; public "debian12 systemd" images usually lack python3-apt/venv).
#   docker pull registry.example.com/debian12-systemd:latest
#   export BASE_IMAGE=registry.example.com/debian12-systemd:latest
#   scripts/build-base-image.sh                 # sees the image, does nothing
#   ansible-playbook playbooks/local-hosts.yml  # reads BASE_IMAGE too (or -e local_hosts_image=...)
#
# debootstrap's downloaded .debs are kept in .cache/debootstrap/ (gitignored) so a rebuild is offline-ish.
set -euo pipefail

DEBIAN="${DEBIAN:-12}"
case "$DEBIAN" in
    12) SUITE=bookworm ;;
    13) SUITE=trixie ;;
    *) printf '[build-base-image] ERROR: DEBIAN=%s: 12 or 13\n' "$DEBIAN" >&2; exit 1 ;;
esac
BASE_IMAGE="${BASE_IMAGE:-iot-pipeline/debian$DEBIAN-systemd:latest}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEB_CACHE="$REPO_ROOT/.cache/debootstrap"

# Packages Ansible and the roles rely on: python3-apt (apt module), python3-venv (pipeline_app's
# virtualenvs), sudo + acl (become to an unprivileged user), locales (a UTF-8 locale for Ansible).
INCLUDE=systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,ca-certificates,sudo,acl,iproute2,procps,locales

log() { printf '[build-base-image] %s\n' "$*" >&2; }
die() { printf '[build-base-image] ERROR: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker CLI not found; run scripts/install-docker.sh first"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine; run scripts/install-docker.sh first"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE already exists; nothing to do (FORCE=1 to rebuild)"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "debootstrap needs root; rerun with sudo"

# First URI of a deb source (one-line .list or deb822 .sources) whose suite matches $1 exactly.
host_mirror() {
    local suite="$1" f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        # Drop "[arch=... signed-by=...]" options so the fields are: deb URI SUITE COMPONENTS.
        sed -E 's/\[[^]]*\]//' "$f" | awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        # deb822: paragraphs separated by blank lines; want Types: deb and the suite in Suites:.
        awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; deb = 0; hit = 0
              for (n = 1; n <= NF; n++) {
                if ($n ~ /^Types:/ && $n ~ /[[:space:]]deb([[:space:]]|$)/) deb = 1
                if ($n ~ /^URIs:/) { split($n, u, /[[:space:]]+/); uri = u[2] }
                if ($n ~ /^Suites:/) { k = split($n, w, /[[:space:]]+/); for (j = 2; j <= k; j++) if (w[j] == s) hit = 1 }
              }
              if (deb && hit && uri != "") { print uri; exit } }' "$f"
    done | head -n 1
}

# The host's mirror for this suite, else the one it uses for its own release (the same archive
# serves both), else Debian's.
DEBIAN_MIRROR="${DEBIAN_MIRROR:-$(host_mirror "$SUITE")}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-$(host_mirror "$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}")")}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-$(host_mirror "$SUITE-security")}"
SECURITY_MIRROR="${SECURITY_MIRROR:-$(host_mirror "$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}")-security")}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
log "mirror $DEBIAN_MIRROR, security $SECURITY_MIRROR"

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    if [[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -print -quit 2>/dev/null)" ]]; then
        apt-get update -q
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap \
        || die "could not install debootstrap"
fi

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/iot-base-image.XXXXXX")"
ROOTFS="$WORK/rootfs"
cleanup() {
    # A failed debootstrap can leave /proc etc. mounted inside the rootfs; unmount before deleting.
    local m
    awk -v r="$ROOTFS" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

mkdir -p "$DEB_CACHE"
log "debootstrap $SUITE into $ROOTFS (about a minute on a fast mirror)"
start=$(date +%s)
debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$DEB_CACHE" \
    "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    die "debootstrap failed (full log above was $WORK/debootstrap.log)"
}
log "debootstrap done in $(( $(date +%s) - start )) s"

log "configuring the rootfs"
cat >"$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $DEBIAN_MIRROR $SUITE main
deb $DEBIAN_MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES

# Like Debian's slim images: later apt installs skip docs and man pages too (copyright files stay).
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/01-iot-pipeline-nodoc" <<'NODOC'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
NODOC

echo 'en_US.UTF-8 UTF-8' >"$ROOTFS/etc/locale.gen"
chroot "$ROOTFS" locale-gen >/dev/null
echo 'LANG=C.UTF-8' >"$ROOTFS/etc/default/locale"

# Units that make no sense in a container (no consoles, no udev, no kernel modules, no fstab)
# or that would grab the dpkg lock in the middle of an Ansible run (apt-daily).
MASK=(
    getty.target console-getty.service getty@tty1.service serial-getty@.service
    systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket
    systemd-udev-trigger.service systemd-udev-settle.service
    systemd-modules-load.service kmod-static-nodes.service systemd-remount-fs.service
    systemd-firstboot.service systemd-machine-id-commit.service systemd-hwdb-update.service
    sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount
    sys-fs-fuse-connections.mount dev-hugepages.mount dev-mqueue.mount
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer
)
for unit in "${MASK[@]}"; do
    ln -sf /dev/null "$ROOTFS/etc/systemd/system/$unit"
done

# Empty machine-id: systemd generates a fresh one per container at boot.
: >"$ROOTFS/etc/machine-id"
rm -f "$ROOTFS/var/lib/dbus/machine-id"
# Docker bind-mounts these per container; do not ship the build host's copies.
: >"$ROOTFS/etc/resolv.conf"
echo localhost >"$ROOTFS/etc/hostname"

log "trimming caches and docs"
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old "$ROOTFS"/var/log/*.log \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/lintian/* \
    "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete

log "importing as $BASE_IMAGE"
CHANGES=(
    --change 'CMD ["/lib/systemd/systemd"]'
    --change 'ENV container=docker'
    --change 'ENV LANG=C.UTF-8'
    --change "LABEL org.opencontainers.image.description=\"Debian $DEBIAN + systemd base for the iot-pipeline local hosts\""
)
if ! tar -C "$ROOTFS" --numeric-owner -c . | docker import "${CHANGES[@]}" --change 'STOPSIGNAL SIGRTMIN+3' \
        --message "debootstrap $SUITE from $DEBIAN_MIRROR" - "$BASE_IMAGE" >/dev/null 2>"$WORK/import.err"; then
    grep -qi stopsignal "$WORK/import.err" || { cat "$WORK/import.err" >&2; die "docker import failed"; }
    # Older engines (Debian's docker.io 20.10) refuse STOPSIGNAL in `docker import --change`; systemd
    # needs SIGRTMIN+3 to shut down cleanly, so add it with a one-line build on top of the import.
    log "engine refuses STOPSIGNAL on import; adding it with docker build"
    tmp_tag="${BASE_IMAGE%:*}:import-$$"
    tar -C "$ROOTFS" --numeric-owner -c . | docker import "${CHANGES[@]}" \
        --message "debootstrap $SUITE from $DEBIAN_MIRROR" - "$tmp_tag" >/dev/null || die "docker import failed"
    printf 'FROM %s\nSTOPSIGNAL SIGRTMIN+3\n' "$tmp_tag" \
        | DOCKER_BUILDKIT=0 docker build -q -t "$BASE_IMAGE" - >/dev/null 2>"$WORK/build.err" \
        || { cat "$WORK/build.err" >&2; die "docker build (STOPSIGNAL) failed"; }
    docker rmi "$tmp_tag" >/dev/null
fi
log "built $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
