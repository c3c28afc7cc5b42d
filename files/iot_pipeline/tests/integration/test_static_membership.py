"""Static group membership (KIP-345) against a real broker: a restarted consumer with the same
group_instance_id takes its partitions back at once, without a rebalance."""

import time

import pytest
from kafka import KafkaAdminClient
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
