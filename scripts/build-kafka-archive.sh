#!/usr/bin/env bash
# Builds the offline twin of the official Apache Kafka binary archive from Maven Central:
# .cache/kafka/kafka_2.13-VERSION.tgz (top dir kafka_2.13-VERSION/ with bin/ config/ libs/) plus its .sha512.
# The kafka role installs it when the official download cannot be reached (kafka_archive_src).
set -euo pipefail

readonly SCALA_VERSION=2.13
readonly DEFAULT_VERSION=4.1.1

usage() {
  local version=${1:-$DEFAULT_VERSION}
  cat <<EOF
Usage: $(basename "$0") [-h|--help] [VERSION]

Builds .cache/kafka/kafka_${SCALA_VERSION}-VERSION.tgz (default VERSION ${DEFAULT_VERSION}) from Maven Central
artifacts (org.apache.kafka:kafka_${SCALA_VERSION}, kafka-tools, kafka-storage and their runtime
dependencies, plus a logging backend), laid out like the official binary release:
  kafka_${SCALA_VERSION}-VERSION/{bin,config,libs}
and writes kafka_${SCALA_VERSION}-VERSION.tgz.sha512 (sha512sum format) beside it.
Rerunning with a complete archive present only prints its path.

The official archive of this version (verify it against Apache's .sha512/.asc):
  https://archive.apache.org/dist/kafka/${version}/kafka_${SCALA_VERSION}-${version}.tgz

Environment:
  MVN             Maven command (default: mvn)
  KAFKA_CACHE_DIR output directory (default: <repo>/.cache/kafka)
  LOG4J2_VERSION  log4j2 backend for Kafka 4.x (default: 2.24.3, the one Kafka 4.0/4.1 ship)
  SOURCE_DATE_EPOCH  timestamp of the archive entries (default: 0, so rebuilds are byte-identical)
EOF
}

die() {
  echo "build-kafka-archive: $*" >&2
  exit 1
}

case ${1:-} in
  -h | --help)
    usage "${2:-$DEFAULT_VERSION}"
    exit 0
    ;;
  -*) usage >&2; exit 2 ;;
esac

version=${1:-$DEFAULT_VERSION}
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "VERSION must look like 4.1.1, got '$version'"
major=${version%%.*}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_dir=${KAFKA_CACHE_DIR:-$repo_root/.cache/kafka}
dist_name=kafka_${SCALA_VERSION}-${version}
archive=$cache_dir/$dist_name.tgz
checksum_file=$archive.sha512

# Entries whose presence tells a finished archive from an interrupted or foreign one.
required_entries=(
  "$dist_name/libs/kafka_${SCALA_VERSION}-${version}.jar"
  "$dist_name/bin/kafka-run-class.sh"
  "$dist_name/bin/kafka-server-start.sh"
  "$dist_name/bin/kafka-server-stop.sh"
  "$dist_name/bin/kafka-storage.sh"
  "$dist_name/bin/kafka-topics.sh"
  "$dist_name/bin/kafka-consumer-groups.sh"
  "$dist_name/bin/kafka-get-offsets.sh"
  "$dist_name/bin/kafka-console-consumer.sh"
  "$dist_name/bin/kafka-console-producer.sh"
  "$dist_name/bin/kafka-metadata-quorum.sh"
  "$dist_name/bin/kafka-configs.sh"
  "$dist_name/config/server.properties"
)

archive_is_complete() {
  [[ -s $archive && -s $checksum_file ]] || return 1
  (cd "$cache_dir" && sha512sum --check --status "$(basename "$checksum_file")") || return 1
  local listing entry
  listing=$(tar -tzf "$archive") || return 1
  for entry in "${required_entries[@]}"; do
    grep -qxF "$entry" <<<"$listing" || return 1
  done
}

if archive_is_complete; then
  echo "$archive"
  exit 0
fi

mvn_cmd=${MVN:-mvn}
for tool in "$mvn_cmd" java unzip tar gzip sha512sum; do
  command -v "$tool" >/dev/null || die "'$tool' is required (apt-get install maven default-jre-headless unzip)"
done

mkdir -p "$cache_dir"
work=$(mktemp -d "$cache_dir/.build-$version.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/$dist_name
mkdir -p "$stage/bin" "$stage/config" "$stage/libs"

# ---------------------------------------------------------------- libs/
if ((major >= 4)); then
  # Kafka 4 logs through slf4j 1.7 -> log4j2; log4j-1.2-api keeps third-party log4j 1 callers working,
  # as in the official libs/.
  log4j2=${LOG4J2_VERSION:-2.24.3}
  logging_deps="
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>$log4j2</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$log4j2</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$log4j2</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-1.2-api</artifactId><version>$log4j2</version></dependency>"
else
  # Kafka 3.x ships reload4j (the maintained log4j 1.2) behind slf4j 1.7.
  logging_deps="
    <dependency><groupId>ch.qos.reload4j</groupId><artifactId>reload4j</artifactId><version>1.2.25</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId><version>1.7.36</version></dependency>"
fi

cat >"$work/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Throwaway pom: only used to resolve the runtime classpath of the Kafka distribution. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.iot-pipeline</groupId>
  <artifactId>kafka-dist</artifactId>
  <version>${version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_${SCALA_VERSION}</artifactId><version>${version}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>${version}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-storage</artifactId><version>${version}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-metadata</artifactId><version>${version}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-raft</artifactId><version>${version}</version></dependency>${logging_deps}
  </dependencies>
</project>
EOF

echo "build-kafka-archive: resolving Kafka $version from Maven Central" >&2
"$mvn_cmd" -B -q -Dstyle.color=never -f "$work/pom.xml" \
  org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$stage/libs" >&2 ||
  die "Maven could not resolve Kafka $version (is it on Maven Central? see --help)"

shopt -s nullglob
slf4j_apis=("$stage"/libs/slf4j-api-*.jar)
((${#slf4j_apis[@]} == 1)) || die "expected one slf4j-api jar, found: ${slf4j_apis[*]##*/}"
[[ ${slf4j_apis[0]##*/} == slf4j-api-1.* ]] ||
  die "${slf4j_apis[0]##*/} needs an slf4j 2 binding; this script pins the 1.7 binding Kafka $version is expected to use"

# One index of every class in libs/, so main classes are looked up rather than assumed per version.
for jar in "$stage"/libs/*.jar; do
  unzip -Z1 "$jar" '*.class' 2>/dev/null || true
done | sed -n 's/\.class$//p' | tr / . | sort -u >"$work/classes.txt"

find_class() {
  local cls
  for cls in "$@"; do
    if grep -qxF "$cls" "$work/classes.txt"; then
      echo "$cls"
      return 0
    fi
  done
  die "none of these classes is in libs/ of Kafka $version: $*"
}

broker_class=$(find_class kafka.Kafka)
storage_class=$(find_class kafka.tools.StorageTool org.apache.kafka.tools.StorageTool)
topics_class=$(find_class org.apache.kafka.tools.TopicCommand kafka.admin.TopicCommand)
groups_class=$(find_class org.apache.kafka.tools.consumer.group.ConsumerGroupCommand kafka.admin.ConsumerGroupCommand)
offsets_class=$(find_class org.apache.kafka.tools.GetOffsetShell kafka.tools.GetOffsetShell)
consumer_class=$(find_class org.apache.kafka.tools.consumer.ConsoleConsumer kafka.tools.ConsoleConsumer)
producer_class=$(find_class org.apache.kafka.tools.ConsoleProducer kafka.tools.ConsoleProducer)
quorum_class=$(find_class org.apache.kafka.tools.MetadataQuorumCommand)
configs_class=$(find_class kafka.admin.ConfigCommand org.apache.kafka.tools.ConfigCommand)
zookeeper_class=
if grep -qxF org.apache.zookeeper.server.quorum.QuorumPeerMain "$work/classes.txt"; then
  zookeeper_class=org.apache.zookeeper.server.quorum.QuorumPeerMain
fi

# ---------------------------------------------------------------- bin/
# These are written literally into the generated scripts, where $base_dir is defined.
# shellcheck disable=SC2016
if ((major >= 4)); then
  server_log4j_opts='-Dlog4j2.configurationFile=$base_dir/../config/log4j2.yaml'
  tools_log4j_opts='-Dlog4j2.configurationFile=$base_dir/config/tools-log4j2.yaml'
else
  server_log4j_opts='-Dlog4j.configuration=file:$base_dir/../config/log4j.properties'
  tools_log4j_opts='-Dlog4j.configuration=file:$base_dir/config/tools-log4j.properties'
fi

# Placeholders keep the generated scripts readable as plain shell; @TOKEN@ values come from above.
render() {
  sed -e "s|@TOOLS_LOG4J_OPTS@|$tools_log4j_opts|g" \
    -e "s|@SERVER_LOG4J_OPTS@|$server_log4j_opts|g" \
    -e "s|@VERSION@|$version|g"
}

render >"$stage/bin/kafka-run-class.sh" <<'EOF'
#!/usr/bin/env bash
# Runs a class of this Kafka distribution with the official script's options and environment:
# KAFKA_HEAP_OPTS KAFKA_JVM_PERFORMANCE_OPTS KAFKA_GC_LOG_OPTS KAFKA_JMX_OPTS JMX_PORT KAFKA_LOG4J_OPTS
# KAFKA_OPTS LOG_DIR JAVA_HOME CLASSPATH. Assembled from Maven Central (Kafka @VERSION@).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "USAGE: $0 [-daemon] [-name servicename] [-loggc] classname [opts]"
  exit 1
fi

# Physical path: the stop scripts find a broker by this installation's libs/ in its command line.
base_dir=$(cd "$(dirname "$0")/.." && pwd -P)

CLASSPATH=${CLASSPATH:-}
for jar in "$base_dir"/libs/*.jar; do
  CLASSPATH="${CLASSPATH:+$CLASSPATH:}$jar"
done

LOG_DIR=${LOG_DIR:-$base_dir/logs}
mkdir -p "$LOG_DIR"

KAFKA_JMX_OPTS=${KAFKA_JMX_OPTS:--Dcom.sun.management.jmxremote -Dcom.sun.management.jmxremote.authenticate=false -Dcom.sun.management.jmxremote.ssl=false}
if [ -n "${JMX_PORT:-}" ]; then
  KAFKA_JMX_OPTS="$KAFKA_JMX_OPTS -Dcom.sun.management.jmxremote.port=$JMX_PORT"
  if ! [[ $KAFKA_JMX_OPTS == *"-Dcom.sun.management.jmxremote.rmi.port="* ]]; then
    KAFKA_JMX_OPTS="$KAFKA_JMX_OPTS -Dcom.sun.management.jmxremote.rmi.port=$JMX_PORT"
  fi
fi

KAFKA_LOG4J_OPTS=${KAFKA_LOG4J_OPTS:-@TOOLS_LOG4J_OPTS@}
KAFKA_LOG4J_OPTS="-Dkafka.logs.dir=$LOG_DIR $KAFKA_LOG4J_OPTS"
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx256M}
KAFKA_JVM_PERFORMANCE_OPTS=${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true}

daemon_mode=false
daemon_name=
gc_log_enabled=false
while [ $# -gt 0 ]; do
  case $1 in
    -name) daemon_name=$2; shift 2 ;;
    -loggc) gc_log_enabled=true; shift ;;
    -daemon) daemon_mode=true; shift ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "USAGE: $0 [-daemon] [-name servicename] [-loggc] classname [opts]"; exit 1; }

gc_opts=
if $gc_log_enabled && [ -n "$daemon_name" ]; then
  gc_opts=${KAFKA_GC_LOG_OPTS:--Xlog:gc*:file=$LOG_DIR/$daemon_name-gc.log:time,tags:filecount=10,filesize=100M}
fi

if [ -n "${JAVA_HOME:-}" ]; then
  java_bin=$JAVA_HOME/bin/java
else
  java_bin=java
fi

# Word splitting of the *_OPTS variables is the documented interface of the official script.
read -r -a jvm_opts <<<"$KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS $gc_opts $KAFKA_JMX_OPTS $KAFKA_LOG4J_OPTS ${KAFKA_OPTS:-}"

if $daemon_mode; then
  out=$LOG_DIR/${daemon_name:-kafka}.out
  nohup "$java_bin" "${jvm_opts[@]}" -cp "$CLASSPATH" "$@" >"$out" 2>&1 </dev/null &
else
  exec "$java_bin" "${jvm_opts[@]}" -cp "$CLASSPATH" "$@"
fi
EOF

render >"$stage/bin/kafka-server-start.sh" <<'EOF'
#!/usr/bin/env bash
# Starts a Kafka broker/controller: kafka-server-start.sh [-daemon] server.properties [--override property=value]*
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "USAGE: $0 [-daemon] server.properties [--override property=value]*"
  exit 1
fi
base_dir=$(cd "$(dirname "$0")" && pwd -P)

if [ -z "${KAFKA_LOG4J_OPTS:-}" ]; then
  export KAFKA_LOG4J_OPTS="@SERVER_LOG4J_OPTS@"
fi
if [ -z "${KAFKA_HEAP_OPTS:-}" ]; then
  export KAFKA_HEAP_OPTS="-Xmx1G -Xms1G"
fi

read -r -a extra_args <<<"${EXTRA_ARGS--name kafkaServer -loggc}"
if [ "$1" = "-daemon" ]; then
  extra_args=(-daemon "${extra_args[@]}")
  shift
fi

exec "$base_dir/kafka-run-class.sh" "${extra_args[@]}" @BROKER_CLASS@ "$@"
EOF

write_stop_script() { # name main-class what
  cat >"$stage/bin/$1" <<EOF
#!/usr/bin/env bash
# Stops the $3 of this installation: sends SIGNAL (default TERM) to every $2 process whose
# classpath is this directory's libs/, then returns without waiting, like the official script.
# Unlike the official one, it never touches a broker of another installation on the same machine.
set -euo pipefail

base_dir=\$(cd "\$(dirname "\$0")/.." && pwd -P)
signal=\${SIGNAL:-TERM}

pids=()
for cmdline in /proc/[0-9]*/cmdline; do
  { args=\$(tr '\\0' ' ' <"\$cmdline"); } 2>/dev/null || continue
  case \$args in
    *"\$base_dir/libs/"*" $2 "*)
      pid=\${cmdline#/proc/}
      pids+=("\${pid%/cmdline}")
      ;;
  esac
done

if [ \${#pids[@]} -eq 0 ]; then
  echo "No $3 to stop"
  exit 1
fi
kill -s "\$signal" "\${pids[@]}"
EOF
}

write_stop_script kafka-server-stop.sh "$broker_class" "kafka server"

write_tool() { # name main-class [default-heap]
  {
    echo '#!/usr/bin/env bash'
    echo "# Kafka $version: runs $2 (as the official $1)."
    echo 'set -euo pipefail'
    if [[ -n ${3:-} ]]; then
      # shellcheck disable=SC2016 # literal line of the generated script
      echo 'if [ -z "${KAFKA_HEAP_OPTS:-}" ]; then'
      echo "  export KAFKA_HEAP_OPTS=\"$3\""
      echo 'fi'
    fi
    echo "exec \"\$(dirname \"\$0\")/kafka-run-class.sh\" $2 \"\$@\""
  } >"$stage/bin/$1"
}

write_tool kafka-storage.sh "$storage_class"
write_tool kafka-topics.sh "$topics_class"
write_tool kafka-consumer-groups.sh "$groups_class"
write_tool kafka-get-offsets.sh "$offsets_class"
write_tool kafka-console-consumer.sh "$consumer_class" -Xmx512M
write_tool kafka-console-producer.sh "$producer_class" -Xmx512M
write_tool kafka-metadata-quorum.sh "$quorum_class"
write_tool kafka-configs.sh "$configs_class"

sed -i "s|@BROKER_CLASS@|$broker_class|" "$stage/bin/kafka-server-start.sh"

if [[ -n $zookeeper_class ]]; then
  render >"$stage/bin/zookeeper-server-start.sh" <<'EOF'
#!/usr/bin/env bash
# Starts the ZooKeeper bundled with Kafka 3.x: zookeeper-server-start.sh [-daemon] zookeeper.properties
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "USAGE: $0 [-daemon] zookeeper.properties"
  exit 1
fi
base_dir=$(cd "$(dirname "$0")" && pwd -P)

if [ -z "${KAFKA_LOG4J_OPTS:-}" ]; then
  export KAFKA_LOG4J_OPTS="@SERVER_LOG4J_OPTS@"
fi
if [ -z "${KAFKA_HEAP_OPTS:-}" ]; then
  export KAFKA_HEAP_OPTS="-Xmx512M -Xms512M"
fi

read -r -a extra_args <<<"${EXTRA_ARGS--name zookeeper -loggc}"
if [ "$1" = "-daemon" ]; then
  extra_args=(-daemon "${extra_args[@]}")
  shift
fi

exec "$base_dir/kafka-run-class.sh" "${extra_args[@]}" org.apache.zookeeper.server.quorum.QuorumPeerMain "$@"
EOF
  write_stop_script zookeeper-server-stop.sh "$zookeeper_class" "zookeeper server"
fi

chmod 0755 "$stage"/bin/*.sh

# ---------------------------------------------------------------- config/
kraft_properties() { # quorum-line
  local standalone=
  if [[ $1 == controller.quorum.bootstrap.servers=* ]]; then
    standalone=' --standalone'
  fi
  cat <<EOF
# KRaft combined mode: one process is both broker and controller (a single-node cluster).
# Format the storage once before the first start:
#   bin/kafka-storage.sh format -t "\$(bin/kafka-storage.sh random-uuid)" -c <this file>${standalone}
process.roles=broker,controller
node.id=1
$1

listeners=PLAINTEXT://:9092,CONTROLLER://:9093
inter.broker.listener.name=PLAINTEXT
advertised.listeners=PLAINTEXT://localhost:9092,CONTROLLER://localhost:9093
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL

num.network.threads=3
num.io.threads=8
socket.send.buffer.bytes=102400
socket.receive.buffer.bytes=102400
socket.request.max.bytes=104857600

log.dirs=/tmp/kraft-combined-logs
num.partitions=1
num.recovery.threads.per.data.dir=1

# Internal topics: replication 1 suits one node; raise to 3 on a real cluster.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
EOF
  if ((major >= 4)); then
    cat <<'EOF'
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
EOF
  fi
  cat <<'EOF'

log.retention.hours=168
log.segment.bytes=1073741824
log.retention.check.interval.ms=300000
EOF
}

if ((major >= 4)); then
  kraft_properties "controller.quorum.bootstrap.servers=localhost:9093" >"$stage/config/server.properties"

  cat >"$stage/config/log4j2.yaml" <<'EOF'
# Broker logging: stdout (journald under systemd) and a size-capped server.log in kafka.logs.dir.
Configuration:
  Properties:
    Property:
      - name: "logPattern"
        value: "[%d] %p %m (%c)%n"
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "${logPattern}"
    RollingFile:
      - name: KafkaAppender
        fileName: "${sys:kafka.logs.dir}/server.log"
        filePattern: "${sys:kafka.logs.dir}/server.log.%i"
        PatternLayout:
          pattern: "${logPattern}"
        SizeBasedTriggeringPolicy:
          size: "100MB"
        DefaultRolloverStrategy:
          max: 10
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
        - ref: KafkaAppender
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: org.apache.kafka.controller
        level: INFO
      - name: state.change.logger
        level: INFO
EOF

  cat >"$stage/config/tools-log4j2.yaml" <<'EOF'
# Command-line tools: warnings and errors only, on stderr, so stdout stays the tool's output.
Configuration:
  Appenders:
    Console:
      name: STDERR
      target: SYSTEM_ERR
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDERR
EOF
else
  mkdir -p "$stage/config/kraft"
  kraft_properties "controller.quorum.voters=1@localhost:9093" >"$stage/config/kraft/server.properties"

  # Kafka 3.x keeps the ZooKeeper-mode broker config at config/server.properties.
  cat >"$stage/config/server.properties" <<'EOF'
# ZooKeeper mode (Kafka 3.x only). The KRaft equivalent is config/kraft/server.properties.
broker.id=0
listeners=PLAINTEXT://:9092
advertised.listeners=PLAINTEXT://localhost:9092
num.network.threads=3
num.io.threads=8
socket.send.buffer.bytes=102400
socket.receive.buffer.bytes=102400
socket.request.max.bytes=104857600
log.dirs=/tmp/kafka-logs
num.partitions=1
num.recovery.threads.per.data.dir=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
log.retention.hours=168
log.retention.check.interval.ms=300000
zookeeper.connect=localhost:2181
zookeeper.connection.timeout.ms=18000
group.initial.rebalance.delay.ms=0
EOF

  cat >"$stage/config/zookeeper.properties" <<'EOF'
dataDir=/tmp/zookeeper
clientPort=2181
maxClientCnxns=0
admin.enableServer=false
EOF

  cat >"$stage/config/log4j.properties" <<'EOF'
# Broker logging: stdout (journald under systemd) and a size-capped server.log in kafka.logs.dir.
log4j.rootLogger=INFO, stdout, kafkaAppender

log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n

log4j.appender.kafkaAppender=org.apache.log4j.RollingFileAppender
log4j.appender.kafkaAppender.File=${kafka.logs.dir}/server.log
log4j.appender.kafkaAppender.MaxFileSize=100MB
log4j.appender.kafkaAppender.MaxBackupIndex=10
log4j.appender.kafkaAppender.layout=org.apache.log4j.PatternLayout
log4j.appender.kafkaAppender.layout.ConversionPattern=[%d] %p %m (%c)%n

log4j.logger.kafka.request.logger=WARN
log4j.logger.org.apache.zookeeper=INFO
EOF

  cat >"$stage/config/tools-log4j.properties" <<'EOF'
# Command-line tools: warnings and errors only, on stderr, so stdout stays the tool's output.
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.appender.stderr.Target=System.err
EOF
fi

{
  echo "Apache Kafka $version (Scala $SCALA_VERSION), assembled by scripts/build-kafka-archive.sh from"
  echo "Maven Central artifacts; not the signed Apache release. Official archive:"
  echo "  https://archive.apache.org/dist/kafka/$version/$dist_name.tgz"
  echo
  echo "Main classes:"
  printf '  %-28s %s\n' \
    kafka-server-start.sh "$broker_class" \
    kafka-storage.sh "$storage_class" \
    kafka-topics.sh "$topics_class" \
    kafka-consumer-groups.sh "$groups_class" \
    kafka-get-offsets.sh "$offsets_class" \
    kafka-console-consumer.sh "$consumer_class" \
    kafka-console-producer.sh "$producer_class" \
    kafka-metadata-quorum.sh "$quorum_class" \
    kafka-configs.sh "$configs_class"
  if [[ -n $zookeeper_class ]]; then
    printf '  %-28s %s\n' zookeeper-server-start.sh "$zookeeper_class"
  fi
  echo
  echo "libs/:"
  for jar in "$stage"/libs/*.jar; do
    echo "  ${jar##*/}"
  done
} >"$stage/BUILD-INFO.txt"

# ---------------------------------------------------------------- archive
# Fixed order, owner and time: a rebuild gives the same bytes, so the .sha512 stays valid.
find "$stage" -type d -exec chmod 0755 {} +
find "$stage" -type f ! -name '*.sh' -exec chmod 0644 {} +
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@${SOURCE_DATE_EPOCH:-0}" \
  -C "$work" -cf - "$dist_name" | gzip -9n >"$work/$dist_name.tgz"
(cd "$work" && sha512sum "$dist_name.tgz" >"$dist_name.tgz.sha512")

mv -f "$work/$dist_name.tgz" "$archive"
mv -f "$work/$dist_name.tgz.sha512" "$checksum_file"
archive_is_complete || die "built $archive but it fails its own completeness check"
echo "$archive"
