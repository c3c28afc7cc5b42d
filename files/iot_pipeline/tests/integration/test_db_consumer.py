"""The DB consumer against a real broker and a real PostgreSQL."""

import time
from dataclasses import replace
from datetime import timedelta, timezone

import psycopg2
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from iot_pipeline import db_consumer, messages, store
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


def metric(consumer, name, **labels):
    return consumer.registry.get_sample_value(name, labels) or 0.0


def make_consumer(bootstrap, topics, dsn, batch_size=50, **extra):
    settings = db_consumer.Settings(
        kafka=KafkaSettings((bootstrap,), topics.images, topics.results, topics.dlq),
        group_id=f"db-{topics.images}", batch_size=batch_size, batch_linger_s=0.05, dsn=dsn,
        expected_image_size=(32, 32), max_image_bytes=1 << 20, **extra,
    )
    return db_consumer.DbConsumer(settings, StopFlag())


def test_image_and_result_in_either_order_make_one_complete_row(kafka_bootstrap, kafka_topics,
                                                                 pg_dsn):
    produce(kafka_bootstrap, kafka_topics.results, [result_message("late-image").to_bytes()])
    produce(kafka_bootstrap, kafka_topics.images, [
        image_message("late-image", 1).to_bytes(),
        image_message("early-image", 2).to_bytes(),
    ])
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)) as consumer:
        wait_for(lambda: count(pg_dsn) == 2, 60, "two rows")
        produce(kafka_bootstrap, kafka_topics.results, [result_message("early-image").to_bytes()])
        wait_for(lambda: count(pg_dsn, "inferred_value IS NOT NULL") == 2, 60, "two results")
    # The counters moved with the rows: each row completed once, from either side.
    assert metric(consumer, "iot_db_rows_written_total", kind="image") == 2
    assert metric(consumer, "iot_db_rows_written_total", kind="result") == 2
    assert metric(consumer, "iot_e2e_latency_seconds_count") == 2
    assert 0 < metric(consumer, "iot_e2e_latency_seconds_sum") < 120
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
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)) as consumer:
        wait_for(lambda: count(pg_dsn, "inferred_value IS NOT NULL") == 1, 60, "the row")
        wait_for(lambda: metric(consumer, "iot_db_batch_size_sum") == 5, 30, "all five records")
    assert count(pg_dsn) == 1
    assert metric(consumer, "iot_e2e_latency_seconds_count") == 1  # replays complete nothing


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
    for reason in ("bad_json", "missing_field"):
        assert metric(consumer, "iot_dead_letters_total", service="db", reason=reason) == 1
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


def committed_total(bootstrap, group, topic):
    """The sum of the group's committed offsets on the topic (its records stored for good)."""
    reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(reader.committed(TopicPartition(topic, p)) or 0
                   for p in reader.partitions_for_topic(topic) or ())
    finally:
        reader.close(autocommit=False)


def test_offsets_are_committed_once_per_interval_while_records_keep_coming_then_when_idle(
        kafka_bootstrap, kafka_topics, pg_dsn):
    consumer = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn, commit_interval_s=60)
    group = consumer.settings.group_id
    with running_in_thread(consumer):
        # Waves closer than the idle wait (1 s): the records keep coming, so no commit is due.
        for wave in range(8):
            produce(kafka_bootstrap, kafka_topics.images,
                    [image_message(f"w{wave}-{i}").to_bytes() for i in range(5)])
            time.sleep(0.2)
        wait_for(lambda: count(pg_dsn) == 40, 60, "40 rows")
        stored_batches = metric(consumer, "iot_db_batch_size_count")
        assert stored_batches >= 3  # several batches, and at most the first one committed
        assert consumer.commits <= 1
        # Nothing within the idle wait: everything stored is committed, the lag reads 0.
        wait_for(lambda: committed_total(kafka_bootstrap, group, kafka_topics.images) == 40, 10,
                 "offsets of all 40 records committed once the traffic stopped")
        assert consumer.commits <= 2


def test_the_committed_offsets_pass_the_results_transaction_markers(
        kafka_bootstrap, kafka_topics, pg_dsn):
    # The inference consumer's results come in transactions: a commit marker follows each
    # one's last record, so "one past the last record" would leave a lag of 1 for ever.
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap,
                             transactional_id=f"tx-{kafka_topics.results}")
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(5):
        producer.send(kafka_topics.results, key=b"k", value=result_message(f"tx-{i}").to_bytes())
    producer.commit_transaction()
    producer.close()
    reader = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    tps = [TopicPartition(kafka_topics.results, p)
           for p in reader.partitions_for_topic(kafka_topics.results)]
    end = sum(reader.end_offsets(tps).values())
    reader.close()
    assert end == 6  # 5 results and the marker
    consumer = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)
    with running_in_thread(consumer):
        wait_for(lambda: consumer.stored_results == 5, 60, "5 results")
        wait_for(lambda: committed_total(kafka_bootstrap, consumer.settings.group_id,
                                         kafka_topics.results) == end, 10, "lag 0 on results")


def test_a_crash_between_commits_replays_only_what_is_stored_and_changes_no_row(
        kafka_bootstrap, kafka_topics, pg_dsn):
    produce(kafka_bootstrap, kafka_topics.images, [image_message(f"c-{i}").to_bytes()
                                                   for i in range(10)])
    first = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn, commit_interval_s=60)
    # Driven batch by batch, then closed as a kill would leave it: no commit, no leave.
    first.conn = store.connect(pg_dsn)
    store.ensure_schema(first.conn)
    batch = []
    while len(batch) < 10:
        batch += [r for records in first.consumer.poll(timeout_ms=1000).values() for r in records]
    assert first.handle(batch)  # stored; the first commit is due at once
    produce(kafka_bootstrap, kafka_topics.images, [image_message("c-late").to_bytes()])
    late = []
    while not late:
        late = [r for records in first.consumer.poll(timeout_ms=1000).values() for r in records]
    assert first.handle(late)  # stored, its offset not committed: the interval has not passed
    before = rows(pg_dsn, "SELECT unique_id, image_stored_at FROM iot_image_data ORDER BY 1")
    first.consumer.close(autocommit=False)
    first.producer.close()
    first.conn.close()
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)) as second:
        wait_for(lambda: second.stored_images >= 1, 30, "the replay")
        time.sleep(1)
    assert second.stored_images == 1  # only the uncommitted record came again
    after = rows(pg_dsn, "SELECT unique_id, image_stored_at FROM iot_image_data ORDER BY 1")
    assert len(after) == 11
    assert after == before


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


def test_values_postgresql_refuses_are_isolated_and_the_rest_is_stored(pg_dsn):
    """Messages built in code skip decode's checks: the database's own refusal is the last line."""
    conn = store.connect(pg_dsn)
    store.migrate(conn)
    far_east = timezone(timedelta(hours=20))
    good = [image_message(f"ok-{i}", i) for i in range(9)]
    bad = {
        "nul": replace(image_message("nul"), ground_truth="app\x00le"),
        "tz": replace(image_message("tz"), produced_at=messages.utc_now().astimezone(far_east)),
        "real": replace(result_message("ok-3"), score=1e300),
    }
    tagged = [(m.unique_id, m) for m in good[:4]] + [("nul", bad["nul"])] + \
        [(m.unique_id, m) for m in good[4:7]] + [("tz", bad["tz"]), ("real", bad["real"])] + \
        [(m.unique_id, m) for m in good[7:]]
    try:
        summary, refused = store.write_isolating(conn, tagged)
    finally:
        conn.close()
    reasons = {tag: error.reason for tag, error in refused}
    assert reasons == {"nul": "db_unquotable_value",
                       "tz": "db_invalid_time_zone_displacement_value",
                       "real": "db_numeric_value_out_of_range"}
    assert all(error.detail for _, error in refused)
    assert summary == store.WriteSummary(images=9, results=0)
    assert {r[0] for r in rows(pg_dsn)} == {f"ok-{i}" for i in range(9)}


def test_a_record_the_database_refuses_is_dead_lettered_with_its_error_and_storage_goes_on(
        kafka_bootstrap, kafka_topics, pg_dsn):
    conn = store.connect(pg_dsn)
    store.migrate(conn)
    with conn, conn.cursor() as cur:  # a constraint decode cannot know about
        cur.execute("ALTER TABLE iot_image_data ADD CONSTRAINT no_durian "
                    "CHECK (ground_truth <> 'durian')")
    conn.close()
    values = [image_message(f"img-{i}", i, label="durian" if i in (3, 11) else "apple").to_bytes()
              for i in range(20)]
    produce(kafka_bootstrap, kafka_topics.images, values)
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)) as consumer:
        wait_for(lambda: count(pg_dsn) == 18, 60, "the 18 rows PostgreSQL accepts")
        wait_for(lambda: consumer.dead_letters.count == 2, 30, "two dead letters")
        produce(kafka_bootstrap, kafka_topics.images, [image_message("after").to_bytes()])
        wait_for(lambda: count(pg_dsn) == 19, 60, "a row after the refused ones")
    dead = read_all(kafka_bootstrap, kafka_topics.dlq)
    assert {headers(r)["dlq.reason"] for r in dead} == {"db_check_violation"}
    assert all("no_durian" in headers(r)["dlq.detail"] for r in dead)
    assert {messages.decode(r.value).unique_id for r in dead} == {"img-3", "img-11"}
    assert consumer.dead_letters.by_reason == {"db_check_violation": 2}


def test_an_unexpected_error_is_tried_a_bounded_number_of_times_then_dead_lettered(
        kafka_bootstrap, kafka_topics, pg_dsn, monkeypatch):
    real_write = store.write_isolating
    calls_with_bug = []

    def buggy_write(conn, tagged):
        if any(m.unique_id == "bug" for _, m in tagged):
            calls_with_bug.append(len(tagged))
            raise KeyError("a bug that only this record triggers")
        return real_write(conn, tagged)

    monkeypatch.setattr(store, "write_isolating", buggy_write)
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(f"img-{i}").to_bytes() for i in range(5)]
            + [image_message("bug").to_bytes()]
            + [image_message(f"img-{i}").to_bytes() for i in range(5, 10)])
    consumer = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn, max_attempts=2)
    with running_in_thread(consumer):
        wait_for(lambda: count(pg_dsn) == 10, 60, "the ten good rows")
        wait_for(lambda: consumer.dead_letters.count == 1, 30, "the dead letter")
        produce(kafka_bootstrap, kafka_topics.images, [image_message("after").to_bytes()])
        wait_for(lambda: count(pg_dsn) == 11, 60, "a row after the failing record")
    (dead,) = read_all(kafka_bootstrap, kafka_topics.dlq)
    assert headers(dead)["dlq.reason"] == "unexpected_KeyError"
    assert "only this record" in headers(dead)["dlq.detail"]
    assert messages.decode(dead.value).unique_id == "bug"
    # Two attempts at the batch holding it, then one alone (if it had company); never more.
    assert len(calls_with_bug) == 2 + (calls_with_bug[0] > 1)
    assert calls_with_bug[-1] == 1
    assert consumer.dead_letters.by_reason == {"unexpected_KeyError": 1}


def test_a_write_reports_the_rows_it_completed_once_with_their_latency(pg_dsn):
    """The UPSERTs return the rows they made complete: the DB consumer's end-to-end histogram."""
    conn = store.connect(pg_dsn)
    store.migrate(conn)
    early = replace(image_message("e2e-a"), produced_at=messages.utc_now() - timedelta(seconds=30))
    try:
        assert store.write_batch(conn, [early], []).completed == ()  # no result yet
        first = store.write_batch(conn, [], [result_message("e2e-a")])
        assert len(first.completed) == 1
        assert 30 <= first.completed[0] < 90
        assert store.write_batch(conn, [early], [result_message("e2e-a")]).completed == ()
        both = store.write_batch(conn, [image_message("e2e-b")], [result_message("e2e-b")])
        assert len(both.completed) == 1
        assert 0 <= both.completed[0] < 60
        result_first = store.write_batch(conn, [], [result_message("e2e-c")])
        assert result_first.completed == ()
        assert len(store.write_batch(conn, [image_message("e2e-c")], []).completed) == 1
    finally:
        conn.close()
