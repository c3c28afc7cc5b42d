"""Property: whatever arrives on the topics, the DB consumer stores it or dead-letters it with a
reason, and nothing escapes its processing function (real PostgreSQL, real Kafka for the DLQ)."""

import base64
import json
import math
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from itertools import count

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord
from test_db_consumer import make_consumer

from iot_pipeline import messages, store

from harness import rows

pytestmark = pytest.mark.integration

PNG = messages.encode_png(np.full((32, 32, 3), 7, np.uint8))
OTHER_SIZE_PNG = messages.encode_png(np.zeros((40, 32, 3), np.uint8))
OFFSETS = count()

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)
# Any code point, surrogates and NUL included, and lengths either side of the 200 limit.
any_text = st.text(st.characters(blacklist_categories=()), max_size=30)
texts = (st.sampled_from(["apple", "device-0001", "tabby", "m"]) | any_text
         | st.sampled_from(["\x00", "a\x00b", "\ud800", "x" * 200, "x" * 201, "é" * 5000])
         | json_values)
ids = st.sampled_from(["id-a", "id-b", "id-c"]) | texts  # repeats: last message per id wins
moments = st.builds(
    lambda day, minutes: datetime(2026, 1, 1, tzinfo=UTC).replace(
        year=day.year, month=day.month, day=day.day).astimezone(
        timezone(timedelta(minutes=minutes))).isoformat(),
    st.dates(), st.integers(-(24 * 60 - 1), 24 * 60 - 1))
timestamps = moments | texts | st.just("2026-11-28T12:00:00")
numbers = (st.floats(0, 1) | st.floats() | st.integers() | st.integers(10**300, 10**310)
           | st.sampled_from([1e-50, 1e-45, 3.5e38, -0.0, math.inf]) | json_values)
images = (st.sampled_from([base64.b64encode(PNG).decode(), base64.b64encode(OTHER_SIZE_PNG)
                           .decode(), "not*base64", "", "QUJD"])
          | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | json_values)


valid_ids = st.sampled_from(["id-a", "id-b", "id-c"]) | st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FFF, blacklist_categories=("Cs",)),
    min_size=1, max_size=200)
valid_texts = st.sampled_from(["apple", "device-0001", "tabby", "maple_tree"]) | valid_ids
valid_moments = st.builds(
    lambda day, minutes: datetime(day.year, day.month, day.day, 12, tzinfo=timezone(
        timedelta(minutes=minutes))).isoformat(),
    st.dates(), st.integers(-(16 * 60 - 1), 16 * 60 - 1))
VALID = {
    "image": {"unique_id": valid_ids, "device_id": valid_texts, "ground_truth": valid_texts,
              "produced_at": valid_moments, "image_format": st.just("png"),
              "image": st.just(base64.b64encode(PNG).decode())},
    "result": {"unique_id": valid_ids, "inferred_value": valid_texts, "model": valid_texts,
               "inferred_at": valid_moments, "score": st.floats(0, 1),
               "top_k": st.lists(st.tuples(valid_texts, st.floats(0, 1)).map(list), max_size=3)},
}
INVALID = {"unique_id": ids, "device_id": texts, "ground_truth": texts, "produced_at": timestamps,
           "image": images, "inferred_value": texts, "model": texts, "inferred_at": timestamps,
           "score": numbers, "schema": json_values, "type": json_values,
           "top_k": st.lists(st.tuples(texts, numbers).map(list), max_size=3) | json_values}


@st.composite
def message(draw, kind: str) -> dict:
    """A valid message of ``kind``; half the time one field replaced by anything, or dropped."""
    payload = {"schema": 1, "type": kind, **{k: draw(v) for k, v in VALID[kind].items()}}
    if draw(st.booleans()):
        field = draw(st.sampled_from(sorted(INVALID)))
        if draw(st.integers(0, 4)) == 0:
            payload.pop(field, None)
        else:
            payload[field] = draw(INVALID[field])
    return payload


record_values = st.one_of(
    (message("image") | message("result")).map(lambda d: json.dumps(d).encode()),
    (message("image") | message("result")).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.none(),
)


def record(value: bytes | None) -> ConsumerRecord:
    size = -1 if value is None else len(value)
    return ConsumerRecord(topic="prop-images", partition=0, leader_epoch=-1,
                          offset=next(OFFSETS), timestamp=0, timestamp_type=0, key=None,
                          value=value, headers=[], checksum=None, serialized_key_size=-1,
                          serialized_value_size=size, serialized_header_size=-1)


def test_every_record_is_stored_or_dead_lettered_with_a_reason(kafka_bootstrap, kafka_topics,
                                                                pg_dsn):
    consumer = make_consumer(kafka_bootstrap, kafka_topics, pg_dsn)
    consumer.conn = store.connect(pg_dsn)
    store.ensure_schema(consumer.conn)
    dead: dict[int, str] = {}
    send = consumer.dead_letters.send

    def recording_send(rec, error):
        dead[rec.offset] = error.reason
        send(rec, error)

    consumer.dead_letters.send = recording_send

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(record_values, min_size=1, max_size=6))
    def check(values):
        with consumer.conn, consumer.conn.cursor() as cur:
            cur.execute("TRUNCATE iot_image_data")
        dead.clear()
        batch = [record(v) for v in values]
        assert consumer.handle(batch) is True  # an exception here fails the property
        expected = {}
        for rec in batch:
            if rec.offset in dead:
                assert dead[rec.offset], "a dead letter without a reason"
                assert not dead[rec.offset].startswith("unexpected_"), dead[rec.offset]
                continue
            decoded = messages.decode(rec.value, expected_size=(32, 32))
            expected[(type(decoded), decoded.unique_id)] = decoded
        stored = {r[0]: r for r in rows(pg_dsn, "SELECT unique_id, device_id, ground_truth, data,"
                                        " inferred_value, inference_score, model_name"
                                        " FROM iot_image_data")}
        assert set(stored) == {unique_id for _, unique_id in expected}
        for (kind, unique_id), m in expected.items():
            row = stored[unique_id]
            if kind is messages.ImageMessage:
                assert (row[1], row[2], bytes(row[3])) == (m.device_id, m.ground_truth,
                                                           m.image_png)
            else:
                assert (row[4], row[6]) == (m.inferred_value, m.model)
                assert math.isclose(row[5], m.score, rel_tol=1e-6, abs_tol=1e-44)

    try:
        check()
    finally:
        consumer.close()
    assert consumer.dead_letters.count > 0, "the strategies generated no bad record at all"
    assert consumer.stored_images > 0
    assert consumer.stored_results > 0


raw_texts = st.text(st.characters(blacklist_categories=()), min_size=1, max_size=20)
raw_moments = st.builds(lambda moment, minutes: moment.replace(
    tzinfo=timezone(timedelta(minutes=minutes))), st.datetimes(), st.integers(-1439, 1439))
raw_messages = st.one_of(
    st.builds(messages.ImageMessage, unique_id=raw_texts | valid_ids, device_id=raw_texts,
              ground_truth=raw_texts, image_png=st.binary(max_size=50), produced_at=raw_moments),
    st.builds(messages.ResultMessage, unique_id=raw_texts | valid_ids, inferred_value=raw_texts,
              score=st.floats(), model=raw_texts, inferred_at=raw_moments),
)


def test_what_postgresql_refuses_is_isolated_and_everything_else_stored(pg_dsn):
    """Below decode's checks: messages built in code, any text, float and offset, go straight to
    store.write_isolating; each one is stored or comes back with the database's reason."""
    conn = store.connect(pg_dsn)
    store.ensure_schema(conn)
    reasons = Counter()

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(raw_messages, min_size=1, max_size=12))
    def check(batch):
        with conn, conn.cursor() as cur:
            cur.execute("TRUNCATE iot_image_data")
        summary, refused = store.write_isolating(conn, list(enumerate(batch)))
        assert all(error.reason.startswith("db_") and error.detail for _, error in refused)
        reasons.update(error.reason for _, error in refused)
        refused_at = {i for i, _ in refused}
        accepted = {(type(m), m.unique_id): m for i, m in enumerate(batch) if i not in refused_at}
        stored = {r[0]: r for r in rows(pg_dsn, "SELECT unique_id, ground_truth, inferred_value,"
                                        " inference_score FROM iot_image_data")}
        assert set(stored) == {unique_id for _, unique_id in accepted}
        assert summary.images + summary.results >= len(accepted)
        for (kind, unique_id), m in accepted.items():
            if kind is messages.ImageMessage:
                assert stored[unique_id][1] == m.ground_truth
            else:
                assert stored[unique_id][2] == m.inferred_value
                score = stored[unique_id][3]
                assert (math.isnan(score) and math.isnan(m.score)) or math.isclose(
                    score, m.score, rel_tol=1e-6, abs_tol=1e-44)
        # Each refused one is refused alone too: the bisection blamed the right records.
        for i, _ in refused:
            with pytest.raises(store.RecordRefused):
                store.write_batch(conn, *(([batch[i]], []) if isinstance(
                    batch[i], messages.ImageMessage) else ([], [batch[i]])))

    try:
        check()
    finally:
        conn.close()
    # The generator reached the database's refusals, not only its happy path.
    assert {"db_unquotable_value", "db_invalid_time_zone_displacement_value"} <= set(reasons)
