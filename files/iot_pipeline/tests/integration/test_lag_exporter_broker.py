"""The lag exporter and the consumers' rebalance count against a real broker."""

import pytest
from kafka.structs import OffsetAndMetadata, TopicPartition

from iot_pipeline import kafka_io, lag_exporter, metrics
from iot_pipeline.config import KafkaSettings

from harness import produce, wait_for

pytestmark = pytest.mark.integration


def test_lag_is_what_a_group_has_not_committed_and_a_silent_group_lags_by_everything(
        kafka_bootstrap, kafka_topics):
    kafka = KafkaSettings((kafka_bootstrap,), kafka_topics.images, kafka_topics.results,
                          kafka_topics.dlq)
    produce(kafka_bootstrap, kafka_topics.images, [b"x%d" % i for i in range(7)])  # one key
    assigned = []
    consumer = kafka_io.consumer(kafka, f"lag-{kafka_topics.images}", [kafka_topics.images],
                                 "test-lag", on_assigned=lambda: assigned.append(1))
    records = []
    try:
        def polled_all():
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            return len(records) == 7

        wait_for(polled_all, 60, "the seven records")
        tp = TopicPartition(records[0].topic, records[0].partition)
        consumer.commit({tp: OffsetAndMetadata(records[0].offset + 2, "", -1)})
    finally:
        consumer.close(autocommit=False)
    assert assigned  # the group's assignment reached the listener

    settings = lag_exporter.Settings(kafka=kafka, groups={
        f"lag-{kafka_topics.images}": (kafka_topics.images,),
        f"never-{kafka_topics.images}": (kafka_topics.images,),
    })
    exporter = lag_exporter.LagExporter(settings, registry=metrics.registry())
    try:
        snapshot = exporter.read()
    finally:
        exporter.close()
    assert snapshot.up
    lag = {(group.split("-")[0], partition): value
           for (group, _topic, partition), value in snapshot.lag.items()}
    assert lag == {("lag", p): 5 if p == tp.partition else 0 for p in range(3)} | {
        ("never", p): 7 if p == tp.partition else 0 for p in range(3)}
    assert snapshot.end[tp] == records[-1].offset + 1
    assert exporter.registry.get_sample_value("iot_kafka_topic_end_offset", {
        "topic": kafka_topics.images, "partition": str(tp.partition)}) == records[-1].offset + 1
