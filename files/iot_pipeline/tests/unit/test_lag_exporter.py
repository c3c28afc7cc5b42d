"""The lag exporter: lag computed from fake offsets, and an endpoint that outlives the brokers."""

import socket
import urllib.request

import pytest
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from iot_pipeline import lag_exporter, metrics
from iot_pipeline.config import ConfigError, MetricsSettings

KAFKA_ENV = {"IOT_KAFKA_BOOTSTRAP_SERVERS": "kafka.invalid:9092"}

IMAGES0, IMAGES1 = TopicPartition("iot-images", 0), TopicPartition("iot-images", 1)
RESULTS0 = TopicPartition("iot-results", 0)


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_lag_is_end_minus_committed_and_an_uncommitted_partition_counts_from_its_start():
    lag = lag_exporter.consumer_lag(
        {"infer": ["iot-images"], "db": ["iot-images", "iot-results"], "other": []},
        committed={"infer": {IMAGES0: 40, IMAGES1: -1},  # -1: Kafka's "no offset"
                   "db": {IMAGES0: 50, IMAGES1: 12, RESULTS0: 30},
                   "other": {RESULTS0: 7}},
        end={IMAGES0: 50, IMAGES1: 10, RESULTS0: 35},
        beginning={IMAGES0: 0, IMAGES1: 4, RESULTS0: 0},
    )
    assert lag == {
        ("infer", "iot-images", 0): 10,
        ("infer", "iot-images", 1): 6,   # no commit: from the first retained record (4)
        ("db", "iot-images", 0): 0,
        ("db", "iot-images", 1): 0,      # committed past the end read just before: no lag
        ("db", "iot-results", 0): 5,
        ("other", "iot-results", 0): 28,  # no topics listed: the partitions it committed
    }


def test_a_group_that_never_committed_shows_its_whole_backlog():
    lag = lag_exporter.consumer_lag({"db": ["iot-results"]}, {}, {RESULTS0: 9}, {RESULTS0: 2})
    assert lag == {("db", "iot-results", 0): 7}


class FakeReader:
    def __init__(self):
        self.committed_offsets = {"iot-inference": {IMAGES0: 3},
                                  "iot-db-writer": {IMAGES0: 5, RESULTS0: 1}}
        self.end = {IMAGES0: 5, IMAGES1: 0, RESULTS0: 4, TopicPartition("iot-dead-letter", 0): 2}
        self.down = False
        self.closed = 0

    def committed(self, group):
        if self.down:
            raise KafkaTimeoutError("Unable to bootstrap")
        return dict(self.committed_offsets.get(group, {}))

    def partitions(self, topics):
        return sorted(tp for tp in self.end if tp.topic in set(topics))

    def end_offsets(self, partitions):
        return {tp: self.end[tp] for tp in partitions}

    def beginning_offsets(self, partitions):
        return dict.fromkeys(partitions, 0)

    def close(self):
        self.closed += 1


def exporter(reader, **env):
    settings = lag_exporter.load_settings([], {**KAFKA_ENV, **env})
    return lag_exporter.LagExporter(settings, reader, metrics.registry())


def test_the_exporter_serves_lag_and_end_offsets_then_up_0_while_kafka_is_down():
    reader = FakeReader()
    lags = exporter(reader)
    registry = lags.registry
    assert value(registry, "iot_lag_exporter_up") == 0  # nothing read yet
    lags.read()
    assert value(registry, "iot_lag_exporter_up") == 1
    lag = "iot_kafka_consumergroup_lag"
    assert value(registry, lag, group="iot-inference", topic="iot-images", partition="0") == 2
    assert value(registry, lag, group="iot-db-writer", topic="iot-results", partition="0") == 3
    assert registry.get_sample_value(
        lag, {"group": "iot-inference", "topic": "iot-images", "partition": "1"}) == 0
    assert value(registry, "iot_kafka_topic_end_offset", topic="iot-dead-letter",
                 partition="0") == 2
    read_at = value(registry, "iot_lag_exporter_last_success_timestamp_seconds")
    assert read_at > 0

    reader.down = True
    lags.read()
    assert value(registry, "iot_lag_exporter_up") == 0
    assert reader.closed == 1  # reconnects next time
    assert registry.get_sample_value(
        lag, {"group": "iot-inference", "topic": "iot-images", "partition": "0"}) is None
    assert value(registry, "iot_lag_exporter_last_success_timestamp_seconds") == read_at

    port = free_port()
    server = metrics.serve(registry, MetricsSettings("127.0.0.1", port))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert "iot_lag_exporter_up 0.0" in answer.read().decode()
    finally:
        server.shutdown()
        server.server_close()

    reader.down = False
    reader.end[IMAGES0] = 9
    lags.read()
    assert value(registry, lag, group="iot-inference", topic="iot-images", partition="0") == 6


def test_groups_and_their_topics_come_from_the_environment():
    settings = lag_exporter.load_settings(
        [], {**KAFKA_ENV, "IOT_LAG_GROUPS": "a:t1:t2, b", "IOT_LAG_INTERVAL_S": "5"})
    assert settings.groups == {"a": ("t1", "t2"), "b": ()}
    assert settings.interval_s == 5
    assert lag_exporter.load_settings([], {**KAFKA_ENV}).groups == {
        "iot-inference": ("iot-images",), "iot-db-writer": ("iot-images", "iot-results")}
    for bad in ({"IOT_LAG_GROUPS": ":t1"}, {"IOT_LAG_GROUPS": "a::t"},
                {"IOT_LAG_INTERVAL_S": "0"}):
        with pytest.raises(ConfigError):
            lag_exporter.load_settings([], {**KAFKA_ENV, **bad})
