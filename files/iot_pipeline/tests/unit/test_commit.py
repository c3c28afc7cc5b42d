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
