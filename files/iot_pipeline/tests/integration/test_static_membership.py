"""Static group membership (KIP-345) against a real broker: a restarted consumer with the same
group_instance_id takes its partitions back at once, without a rebalance, and partitions added
while it was away are assigned once it is back."""

import time

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from test_db_consumer import make_consumer

from harness import count, image_message, produce, running_in_thread, wait_for

pytestmark = pytest.mark.integration


def members(bootstrap: str, group: str) -> list:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        described = admin.describe_groups([group])[group]
    finally:
        admin.close()
    return described["members"]


def test_a_restarted_static_member_reclaims_its_partitions_without_a_rebalance(
        kafka_bootstrap, kafka_topics, pg_dsn):
    group = f"db-{kafka_topics.images}"
    static = {"group_instance_id": "db-host-iot-db-consumer", "session_timeout_ms": 30_000}
    produce(kafka_bootstrap, kafka_topics.images, [image_message(f"a-{i}").to_bytes()
                                                   for i in range(5)])
    first = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn, **static)
    with running_in_thread(first):
        wait_for(lambda: count(pg_dsn) == 5, 60, "the first five rows")
        generation = first.consumer._coordinator._generation.generation_id
    # close() sent no LeaveGroup (a static member never does): the broker keeps the member and
    # its partitions for the session timeout, waiting for this instance to come back.
    (kept,) = members(kafka_bootstrap, group)
    assert kept["group_instance_id"] == static["group_instance_id"], kept

    restarted_at = time.monotonic()
    second = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn, **static)
    with running_in_thread(second):
        produce(kafka_bootstrap, kafka_topics.images, [image_message(f"b-{i}").to_bytes()
                                                       for i in range(5)])
        wait_for(lambda: count(pg_dsn) == 10, 60, "the next five rows")
        back_after_s = time.monotonic() - restarted_at
        rejoined = second.consumer._coordinator._generation.generation_id
    # Far below the 30 s session timeout a dynamic member would have been waited for.
    assert back_after_s < 10, f"took {back_after_s:.1f}s"
    assert second.stored_images == 5  # committed offsets were kept: nothing replayed
    assert rejoined == generation, "the restart rebalanced the group"


def test_partitions_added_while_a_static_member_was_away_are_read_once_it_is_back(
        kafka_bootstrap, kafka_topics, pg_dsn):
    """The broker hands a static member that rejoins a stable group its old assignment, and
    kafka-python does not tell it that it leads: without kafka_io.Coverage nobody would assign
    a partition added meanwhile."""
    group = f"db-{kafka_topics.images}"
    static = {"group_instance_id": "db-host-iot-db-consumer", "session_timeout_ms": 30_000}
    produce(kafka_bootstrap, kafka_topics.images, [image_message(f"a-{i}").to_bytes()
                                                   for i in range(3)])
    first = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn, **static)
    with running_in_thread(first):
        wait_for(lambda: count(pg_dsn) == 3, 60, "the first three rows")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_partitions({kafka_topics.images: 4})
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for i in range(4):
            producer.send(kafka_topics.images, image_message(f"new-{i}").to_bytes(), partition=3)
        producer.flush(30)
    finally:
        producer.close()

    second = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn, **static)
    with running_in_thread(second):
        wait_for(lambda: count(pg_dsn) == 7, 60, "the rows of the added partition")
        assigned = {(tp.topic, tp.partition) for tp in second.consumer.assignment()}
    assert (kafka_topics.images, 3) in assigned, assigned
    assert second.coverage.rejoins >= 1  # the rebalance came from the check, not from Kafka
    (member,) = members(kafka_bootstrap, group)
    assert member["group_instance_id"] == static["group_instance_id"], member
