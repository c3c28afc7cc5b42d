"""Bounded attempts: an unexpected error costs a batch a few retries, then its record is a dead
letter; Kafka's own errors are never dead-lettered. Fakes stand in for the producer only."""

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaConnectionError

from iot_pipeline import kafka_io
from iot_pipeline.runtime import StopFlag


class Sent:
    def get(self, timeout=None):
        return None


class FakeProducer:
    def __init__(self):
        self.sent = []

    def send(self, topic, key=None, value=None, headers=None):
        self.sent.append((topic, value, dict(headers)))
        return Sent()

    def flush(self, timeout=None):
        pass


def record(offset, value=b"v"):
    return ConsumerRecord(topic="images", partition=0, leader_epoch=-1, offset=offset,
                          timestamp=0, timestamp_type=0, key=b"k", value=value, headers=[],
                          checksum=None, serialized_key_size=1,
                          serialized_value_size=len(value), serialized_header_size=-1)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(kafka_io, "backoff", lambda: iter([0.0] * 100))


def dead_letters():
    producer = FakeProducer()
    return producer, kafka_io.DeadLetters(producer, "dlq", "group")


def test_a_failing_record_is_dead_lettered_after_the_attempts_and_the_rest_processed():
    producer, dlq = dead_letters()
    batch = [record(i, b"bad" if i == 2 else b"ok") for i in range(5)]
    calls, processed = [], []

    def process(records):
        calls.append([r.offset for r in records])
        if any(r.value == b"bad" for r in records):
            raise ZeroDivisionError("a bug")
        processed.extend(r.offset for r in records)
        return True

    assert kafka_io.with_bounded_attempts(batch, process, dlq, StopFlag(), 3) is True
    assert calls[:3] == [[0, 1, 2, 3, 4]] * 3
    assert calls[3:] == [[0], [1], [2], [3], [4]]
    assert processed == [0, 1, 3, 4]
    ((topic, value, headers),) = producer.sent
    assert (topic, value) == ("dlq", b"bad")
    assert headers["dlq.reason"] == b"unexpected_ZeroDivisionError"
    assert headers["dlq.source"] == b"images[0]@2"
    assert dlq.by_reason == {"unexpected_ZeroDivisionError": 1}


def test_a_single_record_is_not_tried_more_than_max_attempts():
    _producer, dlq = dead_letters()
    calls = []

    def process(records):
        calls.append(len(records))
        raise ValueError("always")

    assert kafka_io.with_bounded_attempts([record(7)], process, dlq, StopFlag(), 2,
                                          failed=RuntimeError("first, elsewhere")) is True
    assert calls == [1]  # one attempt elsewhere, one here
    assert dlq.by_reason == {"unexpected_ValueError": 1}


def test_a_success_on_a_retry_dead_letters_nothing():
    _producer, dlq = dead_letters()
    outcomes = iter([OSError("transient"), None])

    def process(records):
        error = next(outcomes)
        if error:
            raise error
        return True

    assert kafka_io.with_bounded_attempts([record(0), record(1)], process, dlq, StopFlag(), 3)
    assert dlq.count == 0


def test_kafka_errors_are_outages_not_dead_letters():
    _producer, dlq = dead_letters()

    def process(records):
        raise KafkaConnectionError("broker gone")

    with pytest.raises(KafkaConnectionError):
        kafka_io.with_bounded_attempts([record(0)], process, dlq, StopFlag(), 3)
    assert dlq.count == 0


def test_stopping_between_attempts_commits_nothing():
    _producer, dlq = dead_letters()
    stop = StopFlag()

    def process(records):
        stop.set()
        raise RuntimeError("bug")

    assert kafka_io.with_bounded_attempts([record(0)], process, dlq, stop, 3) is False
    assert dlq.count == 0


def test_a_record_is_dead_lettered_once_per_batch_however_often_it_is_attempted():
    producer, dlq = dead_letters()
    error = kafka_io.unexpected(RuntimeError("x"), 1)
    dlq.send(record(3), error)
    dlq.send(record(3), error)
    assert len(producer.sent) == 1
    dlq.forget([record(3)])
    dlq.send(record(3), error)  # a replay after the batch was committed
    assert len(producer.sent) == 2
    assert dlq.summary() == "2 (unexpected_RuntimeError 2)"
