#!/usr/bin/env bash
# Fetches the offline twin of the Prometheus JMX exporter Java agent from Maven Central:
# .cache/jmx-exporter/jmx_prometheus_javaagent-VERSION.jar, sha256-checked against the pin below
# (the kafka role's kafka_jmx_exporter_sha256). Role kafka copies it to the brokers, which then
# need no access to Maven Central. Rerunning with a good jar present only prints its path.
#
#   scripts/fetch-jmx-exporter.sh            # make jmx-exporter (part of make deps)
set -euo pipefail

readonly VERSION=1.0.1
# sha256 of io.prometheus.jmx:jmx_prometheus_javaagent:1.0.1 (Maven Central publishes sha1 and
# md5 only; this was taken from the jar whose sha1 matched Central's f9c53eb0...0c68c).
readonly SHA256=7d61f737fd661610ccc14aea79764faa1ea94a340cbc8f0029b3d2edea3d80c1
readonly URL=https://repo1.maven.org/maven2/io/prometheus/jmx/jmx_prometheus_javaagent/$VERSION/jmx_prometheus_javaagent-$VERSION.jar

die() { echo "fetch-jmx-exporter: $*" >&2; exit 1; }

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_dir=${JMX_EXPORTER_CACHE_DIR:-$repo_root/.cache/jmx-exporter}
jar=$cache_dir/jmx_prometheus_javaagent-$VERSION.jar

if [[ -s $jar ]] && echo "$SHA256  $jar" | sha256sum --check --status; then
  echo "$jar"
  exit 0
fi
command -v curl >/dev/null || die "'curl' is required"
mkdir -p "$cache_dir"
part=$(mktemp "$cache_dir/.download.XXXXXX")
trap 'rm -f "$part"' EXIT
curl -fsSL --retry 3 -o "$part" "$URL" || die "download failed: $URL"
echo "$SHA256  $part" | sha256sum --check --status \
  || die "sha256 mismatch for $URL (expected $SHA256, got $(sha256sum "$part" | cut -d' ' -f1))"
chmod 0644 "$part"
mv "$part" "$jar"
echo "$jar"
