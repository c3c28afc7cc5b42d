"""The kafka host of the zookeeper scenario: a standalone ZooKeeper and a ZooKeeper-mode Kafka
3.9.1 broker beside it (the pipeline's data checks are in test_end_to_end.py)."""

import re
import uuid

import pytest

testinfra_hosts = ["ansible://kafka"]

BIN = "/opt/kafka/current/bin"
BOOTSTRAP = "127.0.0.1:9092"
TOPICS = ["iot-images", "iot-results", "iot-dead-letter"]
PROBE_TOPIC = "molecule-probe"
# Keep the CLI tools' logs out of the read-only install dir, as the role does.
ENV = "LOG_DIR=/var/log/kafka KAFKA_HEAP_OPTS=-Xmx256m"


def kafka_cli(host, tool, args):
    return host.run(f"{ENV} {BIN}/{tool} --bootstrap-server {BOOTSTRAP} {args}")


def zookeeper_command(host, word):
    return host.run(f"bash -c 'exec 3<>/dev/tcp/127.0.0.1/2181 && echo {word} >&3 && cat <&3'")


@pytest.mark.parametrize("unit", ["zookeeper", "kafka"])
def test_service_enabled_and_running(host, unit):
    service = host.service(unit)
    assert service.is_enabled
    assert service.is_running


def test_zookeeper_serves_standalone(host):
    srvr = zookeeper_command(host, "srvr")
    assert srvr.rc == 0, srvr.stderr
    assert "Mode: standalone" in srvr.stdout
    assert host.file("/var/lib/zookeeper/myid").content_string.strip() == "1"
    assert host.file("/var/lib/zookeeper/version-2").is_directory
    assert host.process.filter(user="zookeeper", comm="java")


def test_broker_in_zookeeper_mode(host):
    assert host.file("/opt/kafka/current").linked_to == "/opt/kafka/kafka_2.13-3.9.1"
    properties = host.file("/etc/kafka/server.properties").content_string
    assert "zookeeper.connect=molecule-zk-kafka:2181" in properties
    assert "broker.id=1" in properties
    assert "process.roles" not in properties
    # Written by the broker itself (no KRaft format): a ZooKeeper-mode meta.properties has a broker.id.
    meta = host.file("/var/lib/kafka/meta.properties").content_string
    assert "broker.id=1" in meta
    # The broker registered itself: its ephemeral znode /brokers/ids/1 keeps a session open.
    mntr = zookeeper_command(host, "mntr").stdout
    assert int(re.search(r"zk_ephemerals_count\s+(\d+)", mntr).group(1)) >= 1
    assert not host.socket("tcp://0.0.0.0:9093").is_listening


@pytest.mark.parametrize("topic", TOPICS)
def test_topic_has_three_partitions(host, topic):
    result = kafka_cli(host, "kafka-topics.sh", f"--describe --topic {topic}")
    assert result.rc == 0, result.stderr
    assert "PartitionCount: 3" in result.stdout
    assert "ReplicationFactor: 1" in result.stdout


def test_produce_consume_round_trip(host):
    """On a topic of its own: a stray record on a pipeline topic would land in the dead-letter topic."""
    created = kafka_cli(host, "kafka-topics.sh", f"--create --if-not-exists --topic {PROBE_TOPIC} --partitions 1")
    assert created.rc == 0, created.stderr
    marker = f"molecule-zk-{uuid.uuid4()}"
    produced = host.run(
        f"echo {marker} | {ENV} {BIN}/kafka-console-producer.sh "
        f"--bootstrap-server {BOOTSTRAP} --topic {PROBE_TOPIC} --producer-property acks=all"
    )
    assert produced.rc == 0, produced.stderr
    consumed = kafka_cli(
        host,
        "kafka-console-consumer.sh",
        f"--topic {PROBE_TOPIC} --from-beginning --max-messages 1000 --timeout-ms 20000",
    )
    assert marker in consumed.stdout.split()
