"""The kafka hosts of the cluster scenario: three KRaft brokers, one quorum, replicated topics
(the pipeline's data checks are in test_end_to_end.py and test_faults.py)."""

import re
import uuid

import pytest

testinfra_hosts = ["ansible://kafka"]

BIN = "/opt/kafka/current/bin"
BOOTSTRAP = "127.0.0.1:9092"
TOPICS = ["iot-images", "iot-results", "iot-dead-letter"]
# Round trips go here: a stray record on a pipeline topic would land in the dead-letter topic.
PROBE_TOPIC = "molecule-probe"
BROKERS = ["molecule-cl-1", "molecule-cl-2", "molecule-cl-3"]
# Keep the CLI tools' logs out of the read-only install dir, as the role does.
ENV = "LOG_DIR=/var/log/kafka KAFKA_HEAP_OPTS=-Xmx256m"


def kafka_cli(host, tool, args):
    result = host.run(f"{ENV} {BIN}/{tool} --bootstrap-server {BOOTSTRAP} {args}")
    assert result.rc == 0, result.stderr
    return result.stdout


def test_service_enabled_and_running(host):
    service = host.service("kafka")
    assert service.is_enabled
    assert service.is_running


def test_quorum_has_three_voters(host):
    status = kafka_cli(host, "kafka-metadata-quorum.sh", "describe --status")
    voters_line = next(line for line in status.splitlines() if line.startswith("CurrentVoters:"))
    # 4.x prints [{"id": 1, ...}, ...]; 3.x printed [1,2,3].
    voters = sorted(int(i) for i in re.findall(r'"id":\s*(\d+)', voters_line) or re.findall(r"\d+", voters_line))
    assert voters == [1, 2, 3], status
    for broker in BROKERS:
        assert f"{broker}:9093" in voters_line
    assert re.search(r"^LeaderId:\s+[123]$", status, re.MULTILINE), status


def test_node_id_matches_inventory_position(host):
    properties = host.file("/etc/kafka/server.properties").content_string
    node_id = BROKERS.index(host.backend.get_hostname()) + 1
    assert f"node.id={node_id}\n" in properties
    assert "min.insync.replicas=2\n" in properties
    assert "default.replication.factor=3\n" in properties
    assert "group.initial.rebalance.delay.ms" not in properties


@pytest.mark.parametrize("topic", TOPICS)
def test_topic_replicated_three_times(host, topic):
    describe = kafka_cli(host, "kafka-topics.sh", f"--describe --topic {topic}")
    header = describe.splitlines()[0]
    assert "PartitionCount: 3" in header
    assert "ReplicationFactor: 3" in header
    assert "min.insync.replicas=2" in header, header
    partitions = [line for line in describe.splitlines() if "Partition:" in line and "Leader:" in line]
    assert len(partitions) == 3
    for line in partitions:
        replicas = re.search(r"Replicas: ([\d,]+)", line).group(1).split(",")
        isr = re.search(r"Isr: ([\d,]+)", line).group(1).split(",")
        assert sorted(replicas) == ["1", "2", "3"], line
        assert sorted(isr) == ["1", "2", "3"], line


def test_no_under_replicated_partitions(host):
    assert kafka_cli(host, "kafka-topics.sh", "--describe --under-replicated-partitions").strip() == ""
    assert kafka_cli(host, "kafka-topics.sh", "--describe --under-min-isr-partitions").strip() == ""


def test_produce_here_consume_from_the_next_broker(host):
    """acks=all needs min.insync.replicas=2 in-sync copies; another broker then serves the record."""
    here = host.backend.get_hostname()
    kafka_cli(host, "kafka-topics.sh", f"--create --if-not-exists --topic {PROBE_TOPIC} --partitions 1")
    marker = f"molecule-{here}-{uuid.uuid4()}"
    produced = host.run(
        f"echo {marker} | {ENV} {BIN}/kafka-console-producer.sh --bootstrap-server {BOOTSTRAP} "
        f"--topic {PROBE_TOPIC} --producer-property acks=all --producer-property enable.idempotence=true"
    )
    assert produced.rc == 0, produced.stderr
    other = BROKERS[(BROKERS.index(here) + 1) % len(BROKERS)]
    consumed = host.run(
        f"{ENV} {BIN}/kafka-console-consumer.sh --bootstrap-server {other}:9092 "
        f"--topic {PROBE_TOPIC} --from-beginning --max-messages 1000 --timeout-ms 10000"
    )
    assert marker in consumed.stdout.split(), (other, consumed.stderr)
