"""Kafka clients as the services use them: safe producers, manual-commit consumers, dead letters.

Delivery is at-least-once end to end: producers wait for all in-sync replicas (``acks=all``,
idempotent), consumers never auto-commit and commit only after what they produced is
acknowledged and what they stored is committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from iot_pipeline.config import KafkaSettings
from iot_pipeline.messages import InvalidMessage

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 2 * 1024 * 1024


class DeliveryError(RuntimeError):
    """Kafka did not acknowledge a record we must not lose; the batch is not committed."""


def producer(settings: KafkaSettings, client_id: str, **overrides: Any) -> KafkaProducer:
    config: dict[str, Any] = {
        **settings.client_config(),
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": MAX_MESSAGE_BYTES,
        "retries": 2**31 - 1,
        "delivery_timeout_ms": 120_000,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def consumer(
    settings: KafkaSettings,
    group_id: str,
    topics: Iterable[str],
    client_id: str,
    **overrides: Any,
) -> KafkaConsumer:
    config: dict[str, Any] = {
        **settings.client_config(),
        "client_id": client_id,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES * 2,
        "fetch_max_wait_ms": 100,
    }
    config.update(overrides)
    subscribed = sorted(set(topics))
    kafka_consumer = KafkaConsumer(**config)
    kafka_consumer.subscribe(subscribed)
    log.info("group %s subscribed to %s", group_id, ", ".join(subscribed))
    return kafka_consumer


def commit(kafka_consumer: KafkaConsumer, offsets: dict | None = None) -> bool:
    """Commit offsets (all consumed ones by default); False, logged, if Kafka refused.

    A failed commit is not an error worth dying for: the next batch's commit covers these
    offsets, and if the process dies first Kafka replays the batch, which the UPSERTs and the
    idempotent results absorb. It happens on a rebalance (CommitFailedError) and while a broker
    restarts or the group coordinator moves (connection errors).
    """
    try:
        kafka_consumer.commit(offsets)
    except KafkaError as exc:
        log.warning("offset commit failed (%s): the next commit covers it, or Kafka replays "
                    "the batch", exc)
        return False
    return True


def where(record: ConsumerRecord) -> str:
    """``topic[partition]@offset``, the way every log line names a record."""
    return f"{record.topic}[{record.partition}]@{record.offset}"


def poll_batch(
    kafka_consumer: KafkaConsumer,
    max_records: int,
    linger_s: float,
    idle_timeout_s: float = 1.0,
    gap_s: float = 0.005,
) -> list[ConsumerRecord]:
    """Wait up to ``idle_timeout_s`` for a first record, then up to ``linger_s`` more to fill
    the batch to ``max_records``; records keep their partition order.

    The linger ends early once no record arrived for ``gap_s``: the topic is drained, and
    waiting longer would only add latency (under load records keep coming and batches fill).
    """
    batch: list[ConsumerRecord] = []
    deadline: float | None = None
    timeout_s = idle_timeout_s
    while len(batch) < max_records:
        polled = kafka_consumer.poll(timeout_ms=int(timeout_s * 1000),
                                     max_records=max_records - len(batch))
        got = sum(len(records) for records in polled.values())
        for records in polled.values():
            batch.extend(records)
        now = time.monotonic()
        if batch and deadline is None:
            deadline = now + linger_s
        elif deadline is not None and got == 0:
            break  # a gap of gap_s with nothing new: send what we have
        if deadline is None:
            break  # idle: nothing arrived within idle_timeout_s
        timeout_s = min(deadline - now, gap_s)
        if timeout_s <= 0:
            break
    return batch


class DeadLetters:
    """Publishes records that can never be processed, with the reason, to the dead-letter topic.

    The value is the original bytes, untouched; the reason and origin travel as headers
    (``dlq.reason``, ``dlq.detail``, ``dlq.source``, ``dlq.group``), as Kafka Connect does.
    """

    def __init__(self, kafka_producer: KafkaProducer, topic: str, group: str) -> None:
        self._producer = kafka_producer
        self._topic = topic
        self._group = group
        self._pending: list[Any] = []
        self.count = 0

    def send(self, record: ConsumerRecord, error: InvalidMessage) -> None:
        log.warning("dead-lettering %s: %s", where(record), error)
        headers = [
            ("dlq.reason", error.reason.encode()),
            ("dlq.detail", error.detail.encode("utf-8", "replace")[:1000]),
            ("dlq.source", where(record).encode()),
            ("dlq.group", self._group.encode()),
        ]
        self._pending.append(self._producer.send(
            self._topic, key=record.key, value=record.value, headers=headers,
        ))
        self.count += 1

    def confirm(self, timeout_s: float = 60.0) -> None:
        """Block until every dead letter sent so far is acknowledged."""
        confirm_all(self._producer, self._pending, timeout_s)
        self._pending.clear()


def confirm_all(kafka_producer: KafkaProducer, futures: Sequence[Any], timeout_s: float) -> None:
    """Flush and check every send: any failure means the batch must not be committed."""
    if not futures:
        return
    kafka_producer.flush(timeout=timeout_s)
    for future in futures:
        try:
            future.get(timeout=timeout_s)
        except KafkaError as exc:
            raise DeliveryError(f"Kafka did not acknowledge a record: {exc}") from exc
