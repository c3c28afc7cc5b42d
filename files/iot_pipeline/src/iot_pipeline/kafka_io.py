"""Kafka clients as the services use them: safe producers, manual-commit consumers, dead letters.

Delivery is at-least-once by default: producers wait for all in-sync replicas (``acks=all``,
idempotent), consumers never auto-commit and commit only after what they produced is
acknowledged and what they stored is committed. A producer given a ``transactional_id`` makes
a consume-transform-produce step exactly-once (the inference consumer's default).

Consumers may be static group members (``group_instance_id``, KIP-345): a restarted instance
rejoins under its old identity and gets its partitions back at once, without a rebalance of the
group; only a member gone for longer than its session timeout is replaced.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    FencedInstanceIdError,
    KafkaError,
    RebalanceInProgressError,
    RetriableError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, Counter

from iot_pipeline.config import KafkaSettings
from iot_pipeline.messages import InvalidMessage
from iot_pipeline.runtime import StopFlag, backoff

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 2 * 1024 * 1024


class DeliveryError(RuntimeError):
    """Kafka did not acknowledge a record we must not lose; the batch is not committed."""


# Kafka itself failing: never a record's fault, so never dead-lettered (the dead letter could
# not be delivered either). They end the process; systemd restarts it and Kafka replays.
OUTAGES: tuple[type[BaseException], ...] = (KafkaError, DeliveryError)


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
    *,
    group_instance_id: str | None = None,
    session_timeout_ms: int = 10_000,
    on_assigned: Callable[[], None] | None = None,
    **overrides: Any,
) -> KafkaConsumer:
    """A manual-commit group member; static when ``group_instance_id`` is set.

    ``session_timeout_ms`` bounds how long the partitions of a member that died without a
    restart wait before the group moves them (kafka-python's default is 45 s); heartbeats go
    every third of it, which is kafka-python's default ratio. ``on_assigned`` is called each
    time the group hands this member its partitions (the first join, then every rebalance).
    """
    config: dict[str, Any] = {
        **settings.client_config(),
        "client_id": client_id,
        "group_id": group_id,
        "group_instance_id": group_instance_id or None,
        "session_timeout_ms": session_timeout_ms,
        "heartbeat_interval_ms": max(1, session_timeout_ms // 3),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES * 2,
        "fetch_max_wait_ms": 100,
        # Partitions added to a topic are seen within this (kafka-python's default: 5 min).
        "metadata_max_age_ms": 30_000,
    }
    config.update(overrides)
    subscribed = sorted(set(topics))
    kafka_consumer = KafkaConsumer(**config)
    kafka_consumer.subscribe(subscribed, listener=_Assigned(on_assigned) if on_assigned else None)
    log.info("group %s subscribed to %s (%s member, session timeout %d ms)", group_id,
             ", ".join(subscribed),
             f"static {group_instance_id!r}" if group_instance_id else "dynamic",
             session_timeout_ms)
    return kafka_consumer


class _Assigned(ConsumerRebalanceListener):
    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def on_partitions_revoked(self, revoked) -> None:
        pass

    def on_partitions_assigned(self, assigned) -> None:
        self._callback()


# How often a member checks that its group leaves no partition of its topics unread.
COVERAGE_CHECK_S = 30.0


class Coverage:
    """Sees to it that every partition of the subscribed topics has an owner in the group.

    kafka-python re-reads partition counts only in the member that computed the group's
    assignment. A static member (``group_instance_id``) that restarts into a stable group gets
    its old assignment back without a rebalance, and is not told that it leads (kafka-python
    sends JoinGroup v7, before KIP-814), so after such a restart no member watches the
    partition counts: partitions added meanwhile (the images topic grown for more ML hosts)
    stay unread until the group forms afresh.

    Every member calls :meth:`check` from its poll loop: after each new assignment, and every
    ``interval_s``. When the topics' partitions or this member's assignment changed since the
    last check that found everything owned, it asks the
    group coordinator who owns what (DescribeGroups); if the group is stable and a partition
    has no owner, this member rejoins. A JoinGroup from the member the broker knows as the
    leader forces a rebalance, in which that member computes a new assignment from current
    metadata; from any other member it is answered with its current assignment. Every member
    checks, so the leader's check is the one that moves the group.
    """

    def __init__(self, kafka_consumer: KafkaConsumer, group_id: str,
                 describe: Callable[[str], dict], interval_s: float = COVERAGE_CHECK_S,
                 close: Callable[[], None] = lambda: None) -> None:
        self._consumer = kafka_consumer
        self._group = group_id
        self._describe = describe
        self._interval_s = interval_s
        self.close = close
        self._next_s = 0.0
        self._assignment: frozenset[TopicPartition] | None = None
        self._verified: tuple[frozenset, frozenset] | None = None
        self.rejoins = 0

    @classmethod
    def for_consumer(cls, settings: KafkaSettings, kafka_consumer: KafkaConsumer,
                     group_id: str, **kwargs: Any) -> Coverage:
        """Describes the group through an admin client of its own, opened at the first check."""
        clients: list[KafkaAdminClient] = []

        def describe(group: str) -> dict:
            if not clients:
                clients.append(admin(settings, client_id=f"{group}-coverage"))
            return clients[0].describe_groups([group])[group]

        def close() -> None:
            while clients:
                clients.pop().close()

        return cls(kafka_consumer, group_id, describe, close=close, **kwargs)

    def check(self) -> bool:
        """True when this member asked the group to rebalance (at most every ``interval_s``)."""
        now = time.monotonic()
        assignment = frozenset(self._consumer.assignment())
        if now < self._next_s and assignment == self._assignment:
            return False  # a new assignment is checked at once, the rest every interval_s
        self._assignment = assignment
        self._next_s = now + self._interval_s
        partitions = frozenset(
            TopicPartition(topic, p)
            for topic in self._consumer.subscription() or ()
            for p in self._consumer.partitions_for_topic(topic) or ())
        state = (partitions, assignment)
        if not partitions or state == self._verified:
            return False
        try:
            group = self._describe(self._group)
        except KafkaError as exc:
            log.warning("group %s: who owns which partition is unknown (%r): checked again "
                        "in %.0f s", self._group, exc, self._interval_s)
            return False
        if group.get("error") or group.get("group_state") != "Stable":
            return False  # forming or rebalancing: its assignment is not final yet
        missing = partitions - owned_partitions(group)
        if not missing:
            self._verified = state
            return False
        log.warning("group %s: %s have no owner (added after the group's assignment was made); "
                    "rejoining so that the group assigns them", self._group,
                    ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(missing)))
        # kafka-python has no public call for it: the next poll() sends JoinGroup.
        self._consumer._coordinator.request_rejoin()
        self.rejoins += 1
        return True


def owned_partitions(group: dict) -> set[TopicPartition]:
    """The partitions assigned to the members of a DescribeGroups answer (kafka-python 3.x)."""
    owned: set[TopicPartition] = set()
    for member in group.get("members", ()):
        assignment = member.get("member_assignment")
        if not assignment:
            continue
        if isinstance(assignment, dict):
            pairs = [(a["topic"], a["partitions"])
                     for a in assignment.get("assigned_partitions", ())]
        else:
            pairs = assignment.assigned_partitions
        owned.update(TopicPartition(topic, p) for topic, ps in pairs for p in ps)
    return owned


def admin(settings: KafkaSettings, client_id: str, **overrides: Any) -> KafkaAdminClient:
    """An admin client with the services' TLS/SASL settings (offsets of groups and topics)."""
    return KafkaAdminClient(**{**settings.client_config(), "client_id": client_id, **overrides})


def offsets_reader(settings: KafkaSettings, client_id: str, **overrides: Any) -> KafkaConsumer:
    """A consumer outside any group, for partitions' end offsets. read_committed: the end is the
    last stable offset, what a read_committed member can reach (not an open transaction's)."""
    config: dict[str, Any] = {
        **settings.client_config(),
        "client_id": client_id,
        "group_id": None,
        "enable_auto_commit": False,
        "isolation_level": "read_committed",
    }
    config.update(overrides)
    return KafkaConsumer(**config)


def commit(kafka_consumer: KafkaConsumer, offsets: dict | None = None) -> bool:
    """Commit offsets (all consumed ones by default); False, logged, if Kafka refused.

    A failed commit is not an error worth dying for: the next batch's commit covers these
    offsets, and if the process dies first Kafka replays the batch, which the UPSERTs and the
    idempotent results absorb. It happens while a broker restarts or the group coordinator moves
    (connection errors) and on a rebalance: kafka-python 3.x raises RebalanceInProgressError
    while the group is rejoining and CommitFailedError once this member's generation is stale.
    In both cases the next poll() rejoins the group; kafka-python keeps the positions of the
    partitions this member gets back (the batch was stored, a later commit covers it), and a
    partition another member gets starts there from its last committed offset (replayed).

    FencedInstanceIdError is raised, not logged: another process runs with this member's
    group_instance_id, a configuration error that must stop one of the two.
    """
    try:
        kafka_consumer.commit(offsets)
    except FencedInstanceIdError:
        log.error("another consumer uses this group_instance_id: stopping")
        raise
    except (RebalanceInProgressError, CommitFailedError) as exc:
        log.warning("offset commit refused by a rebalance (%s): the next poll rejoins the "
                    "group, a later commit covers the batch", exc)
        return False
    except KafkaError as exc:
        log.warning("offset commit failed (%s): the next commit covers it, or Kafka replays "
                    "the batch", exc)
        return False
    return True


def next_offsets(records: Iterable[ConsumerRecord]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit once these records are done: one past the last per partition."""
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        if tp not in offsets or offsets[tp].offset <= record.offset:
            offsets[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
    return offsets


def rewind(kafka_consumer: KafkaConsumer, records: Iterable[ConsumerRecord]) -> None:
    """Seek back to the first of these records on each partition still assigned, so the next
    poll returns them again (a partition the group moved restarts from its committed offset)."""
    first: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        first[tp] = min(first.get(tp, record.offset), record.offset)
    assigned = kafka_consumer.assignment()
    for tp, offset in first.items():
        if tp in assigned:
            kafka_consumer.seek(tp, offset)
            log.info("rewound %s[%d] to %d", tp.topic, tp.partition, offset)


def seek_to_committed(kafka_consumer: KafkaConsumer) -> bool:
    """Move every assigned partition back to the group's committed offset (the beginning where
    none is committed); False, logged, when the coordinator could not say (try again later).

    kafka-python 3.x keeps a partition's fetch position across a rebalance that gives it back,
    so after an aborted transaction or a new assignment the position may lie past records whose
    results were never committed: only the committed offset is the truth then."""
    assigned = sorted(kafka_consumer.assignment())
    try:
        committed = {tp: kafka_consumer.committed(tp) for tp in assigned}
    except KafkaError as exc:
        log.warning("committed offsets unavailable (%r): positions reset on the next poll", exc)
        return False
    for tp, offset in committed.items():
        if offset is None:
            kafka_consumer.seek_to_beginning(tp)
        else:
            kafka_consumer.seek(tp, offset)
    if assigned:
        log.info("positions reset to the committed offsets %s",
                 {f"{tp.topic}[{tp.partition}]": o for tp, o in committed.items()})
    return True


def where(record: ConsumerRecord) -> str:
    """``topic[partition]@offset``, the way every log line names a record."""
    return f"{record.topic}[{record.partition}]@{record.offset}"


# Pause after a poll refused by an unreachable broker, before the caller polls again.
POLL_RETRY_S = 0.5


def poll_batch(
    kafka_consumer: KafkaConsumer,
    max_records: int,
    linger_s: float,
    idle_timeout_s: float = 1.0,
    gap_s: float = 0.005,
    busy: Callable[[], bool] | None = None,
) -> list[ConsumerRecord]:
    """Wait up to ``idle_timeout_s`` for a first record, then up to ``linger_s`` more to fill
    the batch to ``max_records``; records keep their partition order.

    The linger ends early once no record arrived for ``gap_s``: the topic is drained, and
    waiting longer would only add latency (under load records keep coming and batches fill).

    ``busy`` (the previous batch's work is still running) keeps the batch filling, in polls of
    ``gap_s``, for as long as it returns True: what arrives meanwhile would wait for that work
    anyway, so the batch grows with the load instead of being cut at the first record. Once it
    returns False a batch that has records is returned at once.
    """
    batch: list[ConsumerRecord] = []
    deadline: float | None = None
    timeout_s = gap_s if busy is not None and busy() else idle_timeout_s
    while len(batch) < max_records:
        try:
            polled = kafka_consumer.poll(timeout_ms=int(timeout_s * 1000),
                                         max_records=max_records - len(batch))
        except RetriableError as exc:
            # kafka-python 3.x raises from poll() while the broker restarts (the coordinator
            # lookup gets ECONNREFUSED); the next poll reconnects. What was polled is kept.
            log.warning("poll failed (%r): Kafka is unreachable, polling again", exc)
            time.sleep(POLL_RETRY_S)
            break
        got = sum(len(records) for records in polled.values())
        for records in polled.values():
            batch.extend(records)
        if busy is not None:
            if busy():
                timeout_s = gap_s
                continue
            busy = None  # the work is done: send what arrived meanwhile without a linger
            if batch:
                break
            timeout_s = idle_timeout_s
            continue
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
    A record is dead-lettered once per batch even when the batch is attempted again
    (:meth:`forget` ends the batch); ``by_reason`` counts what was sent, per reason.

    ``count(reason)`` is called once per dead letter that really landed: when Kafka acknowledged
    it (:meth:`confirm`), or, with a ``transactional`` producer, when its transaction committed
    (:meth:`committed`); the dead letters of an aborted transaction are never counted.
    """

    def __init__(self, kafka_producer: KafkaProducer, topic: str, group: str, *,
                 count: Callable[[str], None] | None = None,
                 transactional: bool = False) -> None:
        self._producer = kafka_producer
        self._topic = topic
        self._group = group
        self._pending: list[Any] = []
        self._sent: set[tuple[str, int, int]] = set()
        self._count = count
        self._transactional = transactional
        self._uncounted: list[str] = []
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.count = 0


    def use_producer(self, kafka_producer: KafkaProducer) -> None:
        """Send through a new producer from now on (the owner replaced its transactional one)."""
        self._producer = kafka_producer
    def send(self, record: ConsumerRecord, error: InvalidMessage) -> None:
        position = (record.topic, record.partition, record.offset)
        if position in self._sent:
            return
        self._sent.add(position)
        self.by_reason[error.reason] += 1
        log.warning("dead-lettering %s: %s (%d with this reason so far)", where(record), error,
                    self.by_reason[error.reason])
        headers = [
            ("dlq.reason", error.reason.encode()),
            ("dlq.detail", error.detail.encode("utf-8", "replace")[:1000]),
            ("dlq.source", where(record).encode()),
            ("dlq.group", self._group.encode()),
        ]
        # Kafka takes no record without both key and value: a keyless tombstone gets an empty key.
        key = b"" if record.key is None and record.value is None else record.key
        self._pending.append(self._producer.send(
            self._topic, key=key, value=record.value, headers=headers,
        ))
        self._uncounted.append(error.reason)
        self.count += 1

    def confirm(self, timeout_s: float = 60.0) -> None:
        """Block until every dead letter sent so far is acknowledged."""
        confirm_all(self._producer, self._pending, timeout_s)
        self._pending.clear()
        if not self._transactional:
            self._settle()

    def committed(self) -> None:
        """The transaction these dead letters were sent in committed: count them."""
        self._settle()

    def discard(self) -> None:
        """The transaction these dead letters were sent in was aborted: stop waiting for them."""
        self._pending.clear()
        self._uncounted.clear()

    def _settle(self) -> None:
        if self._count is not None:
            for reason in self._uncounted:
                self._count(reason)
        self._uncounted.clear()

    def forget(self, records: Iterable[ConsumerRecord]) -> None:
        """The batch of these records is done (committed): a replay may dead-letter them again."""
        for record in records:
            self._sent.discard((record.topic, record.partition, record.offset))

    def summary(self) -> str:
        """``3 (bad_json 2, bad_field 1)``: the stop line of each consumer."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.by_reason.most_common())
        return f"{self.count} ({reasons})" if reasons else "0"


def dead_letters_metric(registry: CollectorRegistry) -> Counter:
    """``iot_dead_letters_total{service, reason}``, one name for both consumers."""
    return Counter("iot_dead_letters", "Records sent to the dead-letter topic, by service and "
                   "reason (acknowledged, or committed in a transaction).",
                   ["service", "reason"], registry=registry)


def unexpected(exc: BaseException, attempts: int) -> InvalidMessage:
    """The dead-letter reason of a record that failed for no reason the code knows."""
    return InvalidMessage(f"unexpected_{type(exc).__name__}",
                          f"{exc} (failed {attempts} times)"[:1000])


def with_bounded_attempts(
    records: Sequence[ConsumerRecord],
    process: Callable[[Sequence[ConsumerRecord]], bool],
    dead_letters: DeadLetters,
    stop: StopFlag,
    max_attempts: int,
    *,
    failed: Exception | None = None,
) -> bool:
    """Run ``process(records)`` so that an unexpected exception cannot crash-loop the service.

    ``process`` returns False when it stopped early (the service is stopping: nothing is
    committed, Kafka replays). Anything it raises other than :data:`OUTAGES` counts as one failed
    attempt at these offsets; after ``max_attempts`` (``failed`` is a first attempt made
    elsewhere) each record is processed alone once more, and the ones that fail again are
    dead-lettered with the exception as the reason, so one bad record costs its batch a few
    retries and no more. Returns True once every record is processed or dead-lettered.
    """
    attempt, error = (0, None) if failed is None else (1, failed)
    if error is not None:
        _log_failure(records, error, attempt, max_attempts)
    delays = backoff()
    while attempt < max_attempts:
        if attempt and stop.wait(next(delays)):
            return False
        attempt += 1
        try:
            return process(records)
        except OUTAGES:
            raise
        except Exception as exc:
            error = exc
            _log_failure(records, exc, attempt, max_attempts)
    if len(records) == 1:
        dead_letters.send(records[0], unexpected(error, attempt))
    else:
        log.error("processing %s .. %s one record at a time to isolate the failing ones",
                  where(records[0]), where(records[-1]))
        for record in records:
            try:
                if not process([record]):
                    return False
            except OUTAGES:
                raise
            except Exception as exc:
                log.exception("%s failed alone too", where(record))
                dead_letters.send(record, unexpected(exc, attempt + 1))
    dead_letters.confirm()
    return True


def _log_failure(records: Sequence[ConsumerRecord], exc: BaseException, attempt: int,
                 max_attempts: int) -> None:
    log.error("processing %d records from %s failed (attempt %d of %d): %r", len(records),
              where(records[0]), attempt, max_attempts, exc, exc_info=exc)


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
