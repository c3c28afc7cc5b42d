"""Offset commits that Kafka refuses are logged, never fatal (the next commit covers them)."""

import pytest
from kafka.errors import (
    CommitFailedError,
    FencedInstanceIdError,
    KafkaConnectionError,
    RebalanceInProgressError,
)

from iot_pipeline import kafka_io


class RefusingConsumer:
    """Stands in for KafkaConsumer.commit only: the error paths a live broker gives rarely."""

    def __init__(self, error):
        self.error = error
        self.calls = []

    def commit(self, offsets=None):
        self.calls.append(offsets)
        if self.error:
            raise self.error


def test_a_refused_commit_is_reported_not_raised(caplog):
    for error in (KafkaConnectionError("111 ECONNREFUSED"), CommitFailedError("rebalanced"),
                  RebalanceInProgressError("rejoining")):
        consumer = RefusingConsumer(error)
        assert kafka_io.commit(consumer, {"tp": 1}) is False
        assert consumer.calls == [{"tp": 1}]
    assert "offset commit failed" in caplog.text


def test_a_successful_commit_returns_true():
    consumer = RefusingConsumer(None)
    assert kafka_io.commit(consumer) is True
    assert consumer.calls == [None]


def test_a_fenced_static_member_stops():
    """Another process took this group_instance_id: carrying on would fight over partitions."""
    with pytest.raises(FencedInstanceIdError):
        kafka_io.commit(RefusingConsumer(FencedInstanceIdError()))


class RestartingBroker:
    """Stands in for KafkaConsumer.poll: one record, then the broker goes away for one poll
    (kafka-python 3.x raises from the coordinator lookup), then another record."""

    def __init__(self, error):
        self.answers = [{"tp": ["r1"]}, error, {"tp": ["r2"]}]

    def poll(self, timeout_ms, max_records):
        answer = self.answers.pop(0) if self.answers else {}
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_poll_during_a_broker_restart_keeps_what_it_had_and_polls_again(caplog, monkeypatch):
    """A broker restart crashed the DB writer (make chaos, kafka-restart): poll() raised
    KafkaConnectionError out of the consumer. Retriable errors end the batch instead."""
    monkeypatch.setattr(kafka_io, "POLL_RETRY_S", 0)
    consumer = RestartingBroker(KafkaConnectionError("111 ECONNREFUSED"))
    assert kafka_io.poll_batch(consumer, max_records=8, linger_s=1.0) == ["r1"]
    assert "poll failed" in caplog.text
    assert kafka_io.poll_batch(consumer, max_records=8, linger_s=0.0) == ["r2"]


def test_a_poll_error_that_is_not_retriable_still_raises(monkeypatch):
    """Bad credentials or configuration must stop the service (a visible failure), not spin."""
    monkeypatch.setattr(kafka_io, "POLL_RETRY_S", 0)
    consumer = RestartingBroker(FencedInstanceIdError())
    consumer.answers.pop(0)
    with pytest.raises(FencedInstanceIdError):
        kafka_io.poll_batch(consumer, max_records=8, linger_s=0.0)


class TrickleBroker:
    """A consumer whose every poll returns the next answer (a list of records), then nothing."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.polls = 0

    def poll(self, timeout_ms=0, max_records=None):
        self.polls += 1
        if self.answers:
            return {"tp": self.answers.pop(0)[:max_records]}
        return {}


def test_a_batch_keeps_filling_while_the_previous_call_is_busy():
    """Records arriving one by one while the ML call runs all go into the next batch; without
    ``busy`` the gap after the first record would end the batch at one record."""
    consumer = TrickleBroker([["r1"], [], ["r2"], [], [], ["r3"], [], []])
    busy_polls = iter([True] * 7 + [False] * 10)
    batch = kafka_io.poll_batch(consumer, max_records=8, linger_s=0.0, idle_timeout_s=0.0,
                                busy=lambda: next(busy_polls))
    assert batch == ["r1", "r2", "r3"]

    alone = TrickleBroker([["r1"], [], ["r2"]])
    assert kafka_io.poll_batch(alone, max_records=8, linger_s=0.0, idle_timeout_s=0.0) == ["r1"]


def test_a_busy_fill_stops_at_the_batch_size_and_when_the_call_returns():
    full = TrickleBroker([["r1", "r2"], ["r3", "r4", "r5"]])
    assert kafka_io.poll_batch(full, max_records=4, linger_s=0.0, idle_timeout_s=0.0,
                               busy=lambda: True) == ["r1", "r2", "r3", "r4"]

    done = iter([True, True, False])  # the first look is before the first poll
    returned = TrickleBroker([[], ["r1"], ["r2"]])
    # Not busy after the second poll: what it got (r1) is sent at once, no linger for r2.
    assert kafka_io.poll_batch(returned, max_records=8, linger_s=1.0, idle_timeout_s=0.0,
                               busy=lambda: next(done)) == ["r1"]

    idle = TrickleBroker([])
    assert kafka_io.poll_batch(idle, max_records=8, linger_s=1.0, idle_timeout_s=0.0,
                               busy=lambda: False) == []
