"""Smoke test of the integration fixtures: the broker and the database really keep data."""

from __future__ import annotations

import time
import uuid

import psycopg2
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

pytestmark = pytest.mark.integration


def test_topics_are_created_with_three_partitions(kafka_bootstrap, kafka_topics):
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        partitions = {name: consumer.partitions_for_topic(name) for name in kafka_topics.names}
    finally:
        consumer.close()
    assert partitions == {name: {0, 1, 2} for name in kafka_topics.names}
    assert len(set(kafka_topics.names)) == 3


def test_message_round_trip(kafka_bootstrap, kafka_topics):
    payload = uuid.uuid4().bytes
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        metadata = producer.send(kafka_topics.images, key=b"device-1", value=payload).get(
            timeout=30
        )
    finally:
        producer.close()
    assert metadata.topic == kafka_topics.images

    consumer = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=f"smoke-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        consumer.subscribe([kafka_topics.images])
        received = []
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                received.extend(records)
    finally:
        consumer.close()

    assert [(r.key, r.value) for r in received] == [(b"device-1", payload)]
    assert TopicPartition(received[0].topic, received[0].partition) == TopicPartition(
        metadata.topic, metadata.partition
    )


def test_database_stores_and_returns_rows(pg_dsn):
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE readings (id serial PRIMARY KEY, device_id text NOT NULL, data bytea)"
        )
        cur.execute(
            "INSERT INTO readings (device_id, data) VALUES (%s, %s), (%s, %s)",
            ("device-1", psycopg2.Binary(b"\x00\x01"), "device-2", psycopg2.Binary(b"\xff")),
        )
        cur.execute("SELECT device_id, data FROM readings ORDER BY id")
        rows = [(device, bytes(data)) for device, data in cur.fetchall()]
    conn.close()
    assert rows == [("device-1", b"\x00\x01"), ("device-2", b"\xff")]


def test_each_test_gets_its_own_empty_database(pg_dsn, postgres_server):
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database(), current_setting('is_superuser')")
        database, is_superuser = cur.fetchone()
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        (tables,) = cur.fetchone()
    conn.close()
    assert database.startswith("test_")
    assert f"dbname={database}" in pg_dsn
    assert is_superuser == "on"
    assert tables == 0
