"""Testinfra checks for the kafka role scenario: service, port, topics and a produce/consume round trip."""

import uuid

import pytest

testinfra_hosts = ["ansible://kafka"]

BIN = "/opt/kafka/current/bin"
BOOTSTRAP = "127.0.0.1:9092"
TOPICS = ["iot-images", "iot-results", "iot-dead-letter"]
# Keep the CLI tools' logs out of the read-only install dir, as the role does.
ENV = "LOG_DIR=/var/log/kafka KAFKA_HEAP_OPTS=-Xmx256m"


def kafka_cli(host, tool, args):
    return host.run(f"{ENV} {BIN}/{tool} --bootstrap-server {BOOTSTRAP} {args}")


def test_service_enabled_and_running(host):
    service = host.service("kafka")
    assert service.is_enabled
    assert service.is_running


def test_runs_as_kafka_user(host):
    assert host.user("kafka").exists
    assert host.file("/var/lib/kafka/meta.properties").user == "kafka"
    assert host.file("/opt/kafka/current").is_symlink
    assert host.file("/opt/kafka/current").linked_to == "/opt/kafka/kafka_2.13-4.1.1"


def test_ports_listening(host):
    assert host.socket("tcp://0.0.0.0:9092").is_listening
    assert host.socket("tcp://0.0.0.0:9093").is_listening


@pytest.mark.parametrize("topic", TOPICS)
def test_topic_has_three_partitions(host, topic):
    result = kafka_cli(host, "kafka-topics.sh", f"--describe --topic {topic}")
    assert result.rc == 0, result.stderr
    assert "PartitionCount: 3" in result.stdout
    assert "ReplicationFactor: 1" in result.stdout


def test_topic_config_applied(host):
    result = kafka_cli(host, "kafka-topics.sh", "--describe --topic iot-dead-letter")
    assert "retention.ms=1209600000" in result.stdout


def test_produce_consume_round_trip(host):
    marker = f"molecule-{uuid.uuid4()}"
    produced = host.run(
        f"echo {marker} | {ENV} {BIN}/kafka-console-producer.sh "
        f"--bootstrap-server {BOOTSTRAP} --topic iot-images"
    )
    assert produced.rc == 0, produced.stderr
    consumed = kafka_cli(
        host,
        "kafka-console-consumer.sh",
        "--topic iot-images --from-beginning --max-messages 1000 --timeout-ms 20000",
    )
    assert marker in consumed.stdout.split()
