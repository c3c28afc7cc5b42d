"""The kafka host: the KRaft broker as its own user, both listeners, the pipeline topics."""

import pytest
from helpers import MAX_EXPOSURE, TOPICS, exposure, kafka_cli, unit_state

testinfra_hosts = ["ansible://kafka"]


def test_kafka_service_enabled_and_active(host):
    service = host.service("kafka")
    assert service.is_enabled
    assert service.is_running


def test_kafka_runs_as_kafka_user(host):
    state = unit_state(host, "kafka")
    assert state["User"] == "kafka"
    assert host.process.get(pid=int(state["MainPID"])).user == "kafka"


@pytest.mark.parametrize("port", [9092, 9093])
def test_kafka_port_listening(host, port):
    assert host.socket(f"tcp://0.0.0.0:{port}").is_listening


@pytest.mark.parametrize("topic", sorted(TOPICS.values()))
def test_topic_has_three_partitions(host, topic):
    result = kafka_cli(host, "kafka-topics.sh", f"--describe --topic {topic}")
    assert result.rc == 0, result.stderr
    assert "PartitionCount: 3" in result.stdout
    assert sum(1 for line in result.stdout.splitlines() if "Partition: " in line) == 3


def test_kafka_unit_sandboxed(host):
    assert exposure(host, "kafka") <= MAX_EXPOSURE
