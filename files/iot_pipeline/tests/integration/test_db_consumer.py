"""The DB consumer against a real broker and a real PostgreSQL."""

import psycopg2
import pytest

from iot_pipeline import db_consumer, store
from iot_pipeline.config import KafkaSettings
from iot_pipeline.runtime import StopFlag

from harness import (
    count,
    headers,
    image_message,
    produce,
    read_all,
    result_message,
    rows,
    running_in_thread,
    wait_for,
)

pytestmark = pytest.mark.integration


def make_consumer(bootstrap, topics, dsn, batch_size=50):
    settings = db_consumer.Settings(
        kafka=KafkaSettings((bootstrap,), topics.images, topics.results, topics.dlq),
        group_id=f"db-{topics.images}", batch_size=batch_size, batch_linger_s=0.05, dsn=dsn,
        expected_image_size=(32, 32), max_image_bytes=1 << 20,
    )
    return db_consumer.DbConsumer(settings, StopFlag())


def test_image_and_result_in_either_order_make_one_complete_row(kafka_bootstrap, kafka_topics,
                                                                 pg_dsn):
    produce(kafka_bootstrap, kafka_topics.results, [result_message("late-image").to_bytes()])
    produce(kafka_bootstrap, kafka_topics.images, [
        image_message("late-image", 1).to_bytes(),
        image_message("early-image", 2).to_bytes(),
    ])
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)):
        wait_for(lambda: count(pg_dsn) == 2, 60, "two rows")
        produce(kafka_bootstrap, kafka_topics.results, [result_message("early-image").to_bytes()])
        wait_for(lambda: count(pg_dsn, "inferred_value IS NOT NULL") == 2, 60, "two results")
    stored = {r[0]: r for r in rows(pg_dsn)}
    assert set(stored) == {"late-image", "early-image"}
    for _unique_id, ground_truth, inferred_value, data, device_id in stored.values():
        assert (ground_truth, inferred_value, device_id) == ("apple", "tabby", "device-0001")
        assert bytes(data).startswith(b"\x89PNG")
    assert read_all(kafka_bootstrap, kafka_topics.dlq) == []


def test_redelivered_messages_do_not_duplicate_rows(kafka_bootstrap, kafka_topics, pg_dsn):
    image = image_message("twice", 3).to_bytes()
    result = result_message("twice").to_bytes()
    produce(kafka_bootstrap, kafka_topics.images, [image, image, image])
    produce(kafka_bootstrap, kafka_topics.results, [result, result])
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)):
        wait_for(lambda: count(pg_dsn, "inferred_value IS NOT NULL") == 1, 60, "the row")
    assert count(pg_dsn) == 1


def test_bad_records_go_to_the_dead_letter_topic_and_good_ones_are_stored(
        kafka_bootstrap, kafka_topics, pg_dsn):
    produce(kafka_bootstrap, kafka_topics.images, [
        b"{not json", image_message("good-1").to_bytes(), b'{"schema": 1, "type": "image"}',
        image_message("good-2").to_bytes(),
    ])
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)) as consumer:
        wait_for(lambda: count(pg_dsn) == 2, 60, "the two good rows")
        wait_for(lambda: len(read_all(kafka_bootstrap, kafka_topics.dlq)) == 2, 30, "dead letters")
        assert consumer.dead_letters.count == 2
    dead = read_all(kafka_bootstrap, kafka_topics.dlq)
    assert sorted(headers(r)["dlq.reason"] for r in dead) == ["bad_json", "missing_field"]
    assert {r.value for r in dead} == {b"{not json", b'{"schema": 1, "type": "image"}'}
    assert all(headers(r)["dlq.source"].startswith(kafka_topics.images) for r in dead)


def test_offsets_are_committed_so_a_restart_does_not_replay(kafka_bootstrap, kafka_topics, pg_dsn):
    produce(kafka_bootstrap, kafka_topics.images, [image_message(f"img-{i}").to_bytes()
                                                   for i in range(20)])
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)):
        wait_for(lambda: count(pg_dsn) == 20, 60, "20 rows")
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)) as second:
        produce(kafka_bootstrap, kafka_topics.images, [image_message("img-new").to_bytes()])
        wait_for(lambda: count(pg_dsn) == 21, 60, "the new row")
        wait_for(lambda: second.stored_images >= 1, 10, "the second consumer's write")
    assert second.stored_images == 1


def test_migrations_run_once_and_a_role_without_create_rights_can_still_start(pg_dsn):
    conn = store.connect(pg_dsn)
    assert store.migrate(conn) == store.SCHEMA_VERSION
    assert store.migrate(conn) == 0
    with conn, conn.cursor() as cur:
        cur.execute("CREATE ROLE limited LOGIN PASSWORD 'pw'")
        cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        cur.execute("GRANT SELECT, INSERT, UPDATE ON iot_image_data TO limited")
        cur.execute("GRANT USAGE ON SEQUENCE iot_image_data_id_seq TO limited")
        cur.execute("GRANT SELECT ON iot_schema_version TO limited")
    limited_dsn = f"{pg_dsn} user=limited password=pw"
    limited = store.connect(limited_dsn)
    try:
        store.ensure_schema(limited)  # may not migrate, need not: the table is there
        with limited, limited.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("CREATE TABLE intruder (x int)")
        store.write_batch(limited, [image_message("via-limited")], [])
    finally:
        limited.close()
        with conn, conn.cursor() as cur:
            cur.execute("DROP OWNED BY limited")
            cur.execute("DROP ROLE limited")
        conn.close()
    assert count(pg_dsn) == 1
