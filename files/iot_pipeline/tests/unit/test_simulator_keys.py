"""The simulator's record keys spread the images evenly over the images topic's partitions."""

import json
from collections import Counter

import numpy as np
from kafka.partitioner.default import murmur2

from iot_pipeline import dataset, simulator
from iot_pipeline.runtime import StopFlag


class FakeFuture:
    def add_callback(self, fn):
        fn(None)

    def add_errback(self, fn):
        pass


class RecordingProducer:
    def __init__(self):
        self.sent = []

    def send(self, topic, key, value):
        self.sent.append((key, json.loads(value)))
        return FakeFuture()

    def flush(self):
        pass


def test_keys_are_the_unique_ids_and_fill_the_partitions_evenly():
    settings = simulator.load_settings(
        ["--count", "3000", "--rate", "0", "--devices", "10", "--seed", "1"],
        {"IOT_KAFKA_BOOTSTRAP_SERVERS": "kafka.invalid:9092", "IOT_SIM_DATASET": "unused"})
    data = dataset.Dataset(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4), ("a", "b", "c", "d"))
    producer = RecordingProducer()
    sent = simulator.Simulator(settings, StopFlag(), data).run(producer,
                                                              simulator.Tally(None))
    assert sent == 3000
    assert all(key == message["unique_id"].encode() for key, message in producer.sent)
    assert len({message["device_id"] for _, message in producer.sent}) == 10
    for partitions in (2, 3, 6):  # as kafka-python's default partitioner places keyed records
        counts = Counter((murmur2(key) & 0x7FFFFFFF) % partitions for key, _ in producer.sent)
        share = max(counts.values()) / len(producer.sent)
        assert share < 1.15 / partitions, (partitions, counts)
