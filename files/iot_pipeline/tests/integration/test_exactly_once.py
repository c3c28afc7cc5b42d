"""Exactly-once results against a real broker: a batch's results, dead letters and offsets are one
Kafka transaction, so a read_committed reader sees each image's result once, whenever the
inference consumer dies; the at-least-once switch still publishes without transactions."""

import signal
import threading
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata
from test_db_consumer import make_consumer as make_db_consumer
from test_inference_consumer import HttpServer, MeanClassifier, make_consumer

from iot_pipeline import messages

from harness import (
    BIN,
    Process,
    count,
    image_message,
    produce,
    result_message,
    rows,
    running_in_thread,
    service_env,
    wait_for,
)
from servers import free_port

pytestmark = pytest.mark.integration


def read(bootstrap: str, topic: str, isolation: str, quiet_s: float = 1.5,
         timeout: float = 20) -> list:
    """Every record a reader with this isolation level gets now (until quiet_s without one)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level=isolation)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        records: list = []
        last = start = time.monotonic()
        while time.monotonic() - last < quiet_s and time.monotonic() - start < timeout:
            polled = consumer.poll(timeout_ms=200)
            for batch in polled.values():
                records.extend(batch)
            if polled:
                last = time.monotonic()
        return records
    finally:
        consumer.close()


def result_ids(records: list) -> list[str]:
    return [messages.decode(r.value).unique_id for r in records]


def freeze_commit(consumer):
    """Make the consumer hang in commit_transaction(), its batch's results already sent, as a
    process stopped (or killed) at the worst moment; returns (frozen, release) events."""
    frozen, release = threading.Event(), threading.Event()
    real = consumer.producer.commit_transaction

    def commit_transaction():
        frozen.set()
        release.wait(60)
        return real()

    consumer.producer.commit_transaction = commit_transaction
    return frozen, release


def test_results_become_visible_to_read_committed_only_on_commit(kafka_bootstrap, kafka_topics):
    port = free_port()
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(f"img-{i}", value=i).to_bytes() for i in range(8)])
    consumer = make_consumer(kafka_bootstrap, kafka_topics, port, batch_size=8)
    assert consumer.producer.config["transactional_id"], "exactly-once is not the default"
    frozen, release = freeze_commit(consumer)
    with HttpServer(port, MeanClassifier()), running_in_thread(consumer):
        assert frozen.wait(60), "no batch reached its commit"
        sent = read(kafka_bootstrap, kafka_topics.results, "read_uncommitted")
        assert sent, "the batch's results were not sent before the commit"
        assert read(kafka_bootstrap, kafka_topics.results, "read_committed") == []
        release.set()
        wait_for(lambda: len(read(kafka_bootstrap, kafka_topics.results, "read_committed",
                                  quiet_s=0.5)) == 8, 30, "8 committed results")
    committed = read(kafka_bootstrap, kafka_topics.results, "read_committed")
    assert sorted(result_ids(committed)) == sorted(f"img-{i}" for i in range(8))


def test_a_consumer_dying_before_its_commit_leaves_no_duplicate(kafka_bootstrap, kafka_topics):
    """The first consumer hangs after publishing a batch; its replacement (same static member
    id and transactional_id, as after a restart) fences it, aborts its transaction and
    classifies the whole stream again: committed, each image has one result."""
    port = free_port()
    ids = [f"img-{i}" for i in range(16)]
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(uid, value=i).to_bytes() for i, uid in enumerate(ids)])
    same = {"group_instance_id": "ml-1-iot-inference-consumer",
            "transactional_id": "ml-1-iot-inference-consumer", "session_timeout_ms": 30_000}
    zombie = make_consumer(kafka_bootstrap, kafka_topics, port, **same)
    frozen, release = freeze_commit(zombie)
    errors: list[BaseException] = []

    def run_zombie():
        try:
            zombie.run()
        except BaseException as exc:  # fenced once released: expected
            errors.append(exc)

    thread = threading.Thread(target=run_zombie, daemon=True)
    with HttpServer(port, MeanClassifier()):
        thread.start()
        assert frozen.wait(60), "no batch reached its commit"
        aborted = read(kafka_bootstrap, kafka_topics.results, "read_uncommitted")
        assert aborted, "the zombie's results were not sent"
        with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, port, **same)):
            wait_for(lambda: len(read(kafka_bootstrap, kafka_topics.results, "read_committed",
                                      quiet_s=0.5)) >= 16, 60, "16 committed results")
            # The zombie wakes up after its replacement took over: its commit must fail.
            zombie.stop.set()
            release.set()
            thread.join(60)
    assert not thread.is_alive()
    assert errors, "the fenced zombie committed"
    committed = result_ids(read(kafka_bootstrap, kafka_topics.results, "read_committed"))
    assert sorted(committed) == sorted(ids)  # every image, once
    everything = read(kafka_bootstrap, kafka_topics.results, "read_uncommitted")
    assert len(everything) >= 16 + len(aborted)  # the zombie's batch is there, aborted


def test_a_refused_commit_aborts_and_the_batch_is_tried_again(kafka_bootstrap, kafka_topics):
    """Kafka refuses the offsets (as on a rebalance): the transaction is aborted, the consumer
    rewound; the retry publishes every result and the dead letter once, committed."""
    port = free_port()
    ids = [f"img-{i}" for i in range(12)]
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(uid, value=i).to_bytes() for i, uid in enumerate(ids)]
            + [b"\x00\x01garbage"])
    consumer = make_consumer(kafka_bootstrap, kafka_topics, port, batch_size=4)
    refused: list = []
    producers = [consumer.producer]

    def refusing(producer):
        real = producer.send_offsets_to_transaction

        def send_offsets_to_transaction(offsets, group_metadata):
            if len(refused) < 2:
                refused.append(offsets)
                raise CommitFailedError("simulated rebalance")
            return real(offsets, group_metadata)

        producer.send_offsets_to_transaction = send_offsets_to_transaction
        return producer

    # A refused commit renews the transactional producer: each new one refuses too, twice in all.
    new_producer = consumer._transactional_producer

    def renewed():
        producers.append(refusing(new_producer()))
        return producers[-1]

    consumer._transactional_producer = renewed
    refusing(consumer.producer)
    with HttpServer(port, MeanClassifier()), running_in_thread(consumer):
        wait_for(lambda: len(read(kafka_bootstrap, kafka_topics.results, "read_committed",
                                  quiet_s=0.5)) >= 12, 60, "12 committed results")
        wait_for(lambda: read(kafka_bootstrap, kafka_topics.dlq, "read_committed",
                              quiet_s=0.5), 30, "the dead letter")
    assert len(refused) == 2
    assert len(producers) == 3  # renewed after each refusal
    committed = result_ids(read(kafka_bootstrap, kafka_topics.results, "read_committed"))
    assert sorted(committed) == sorted(ids)
    assert len(read(kafka_bootstrap, kafka_topics.results, "read_uncommitted")) > 12  # aborted
    assert len(read(kafka_bootstrap, kafka_topics.dlq, "read_committed")) == 1


def test_a_producer_left_in_an_error_state_is_renewed_not_fatal(kafka_bootstrap, kafka_topics):
    """As after a freeze (make chaos freeze-inference): the refused TxnOffsetCommit timed out,
    kafka-python put the producer in an error state and abort_transaction() raises too. The
    consumer goes on with a new producer, whose init_transactions() aborts the open transaction:
    every result is committed once and nothing crashes."""
    port = free_port()
    ids = [f"img-{i}" for i in range(8)]
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(uid, value=i).to_bytes() for i, uid in enumerate(ids)])
    consumer = make_consumer(kafka_bootstrap, kafka_topics, port, batch_size=4)
    broken = consumer.producer
    calls = {"offsets": 0, "abort": 0}

    def send_offsets_to_transaction(offsets, group_metadata):
        calls["offsets"] += 1
        raise KafkaError("Could not execute transactional request for unknown reasons: "
                         "[Error 7] RequestTimedOutError")

    def abort_transaction(timeout_ms=None):
        calls["abort"] += 1
        raise KafkaError("Cannot execute transactional method because we are in an error state")

    broken.send_offsets_to_transaction = send_offsets_to_transaction
    broken.abort_transaction = abort_transaction
    with HttpServer(port, MeanClassifier()), running_in_thread(consumer):  # fails on a crash
        wait_for(lambda: len(read(kafka_bootstrap, kafka_topics.results, "read_committed",
                                  quiet_s=0.5)) >= 8, 60, "8 committed results")
    assert calls == {"offsets": 1, "abort": 1}
    assert consumer.producer is not broken
    committed = result_ids(read(kafka_bootstrap, kafka_topics.results, "read_committed"))
    assert sorted(committed) == sorted(ids)


def test_sigkill_mid_stream_and_restart_gives_one_result_per_image(
        kafka_bootstrap, kafka_topics, tmp_path):
    port = free_port()
    ids = [f"img-{i}" for i in range(120)]
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(uid, value=i % 200).to_bytes() for i, uid in enumerate(ids)])
    env = service_env(kafka_bootstrap, kafka_topics,
                      IOT_ML_SERVER_URL=f"http://127.0.0.1:{port}",
                      IOT_INFER_GROUP_ID=f"infer-{kafka_topics.images}",
                      IOT_INFER_BATCH_SIZE="4", IOT_INFER_BATCH_TIMEOUT_MS="0",
                      IOT_KAFKA_GROUP_INSTANCE_ID="ml-1-iot-inference-consumer",
                      IOT_KAFKA_SESSION_TIMEOUT_MS="30000")

    class SlowClassifier(MeanClassifier):
        def classify(self, pixels, top_k=5):
            time.sleep(0.05)  # keeps the stream flowing for a few seconds
            return super().classify(pixels, top_k)

    with HttpServer(port, SlowClassifier()):
        for attempt in range(3):
            proc = Process(f"infer-{attempt}", [str(BIN / "inference-consumer")], env, tmp_path)
            wait_for(lambda n=attempt: len(read(kafka_bootstrap, kafka_topics.results,
                                                "read_uncommitted", quiet_s=0.3)) > 8 * (n + 1),
                     60, "results to flow")
            proc.assert_running()
            proc.proc.send_signal(signal.SIGKILL)
            proc.stop()
        last = Process("infer-last", [str(BIN / "inference-consumer")], env, tmp_path)
        try:
            wait_for(lambda: len(read(kafka_bootstrap, kafka_topics.results, "read_committed",
                                      quiet_s=0.5)) >= len(ids), 60, "every committed result")
        finally:
            last.stop()
    committed = result_ids(read(kafka_bootstrap, kafka_topics.results, "read_committed"))
    assert sorted(committed) == sorted(ids), f"{len(committed)} committed results"


def test_at_least_once_publishes_without_a_transaction(kafka_bootstrap, kafka_topics):
    port = free_port()
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(f"img-{i}", value=i).to_bytes() for i in range(16)])
    consumer = make_consumer(kafka_bootstrap, kafka_topics, port, delivery="at_least_once")
    assert consumer.producer.config["transactional_id"] is None
    with HttpServer(port, MeanClassifier()), running_in_thread(consumer):
        wait_for(lambda: consumer.classified == 16, 60, "16 results")
    group = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False,
                          group_id=f"infer-{kafka_topics.images}")
    try:
        committed = sum(group.committed(TopicPartition(kafka_topics.images, p)) or 0
                        for p in range(3))
    finally:
        group.close()
    assert committed == 16  # offsets committed by the consumer itself, not in a transaction
    results = result_ids(read(kafka_bootstrap, kafka_topics.results, "read_committed"))
    assert sorted(results) == sorted(f"img-{i}" for i in range(16))


def test_the_db_consumer_never_stores_an_aborted_result(kafka_bootstrap, kafka_topics, pg_dsn):
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message("aborted").to_bytes(), image_message("kept").to_bytes()])
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id="test-db-rc")
    try:
        producer.init_transactions()
        # One key, so one partition: the aborted result comes before the committed one.
        for uid, label, commit in (("aborted", "ghost", False), ("kept", "tabby", True)):
            producer.begin_transaction()
            producer.send(kafka_topics.results, key=b"k",
                          value=result_message(uid, label).to_bytes())
            producer.flush(30)
            producer.commit_transaction() if commit else producer.abort_transaction()
    finally:
        producer.close()
    consumer = make_db_consumer(kafka_bootstrap, kafka_topics, pg_dsn)
    assert consumer.consumer.config["isolation_level"] == "read_committed"
    with running_in_thread(consumer):
        wait_for(lambda: count(pg_dsn, "inferred_value IS NOT NULL") == 1 and count(pg_dsn) == 2,
                 60, "the committed result stored")
    stored = {r[0]: r[2] for r in rows(pg_dsn)}
    assert stored == {"aborted": None, "kept": "tabby"}


# Longer than the session timeout below (`make chaos`'s freeze scenarios also outlast the
# producer's 60 s transaction timeout).
FREEZE_S = 15


def test_a_frozen_consumer_past_its_session_loses_and_duplicates_nothing(
        kafka_bootstrap, kafka_topics, tmp_path):
    """SIGSTOP longer than the session timeout, images arriving meanwhile, then SIGCONT: the
    group dropped the member, its open batch cannot commit, and kafka-python keeps the fetch
    positions across the rejoin; every image still gets exactly one committed result."""
    port = free_port()
    first = [f"img-a{i}" for i in range(40)]
    later = [f"img-b{i}" for i in range(40)]
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(uid, value=i).to_bytes() for i, uid in enumerate(first)])
    env = service_env(kafka_bootstrap, kafka_topics,
                      IOT_ML_SERVER_URL=f"http://127.0.0.1:{port}",
                      IOT_INFER_GROUP_ID=f"infer-{kafka_topics.images}",
                      IOT_INFER_BATCH_SIZE="4", IOT_INFER_BATCH_TIMEOUT_MS="0",
                      IOT_KAFKA_GROUP_INSTANCE_ID="ml-1-iot-inference-consumer",
                      IOT_KAFKA_SESSION_TIMEOUT_MS="6000")

    class SlowClassifier(MeanClassifier):
        def classify(self, pixels, top_k=5):
            time.sleep(0.1)  # a batch is always at the ML server or being committed
            return super().classify(pixels, top_k)

    with HttpServer(port, SlowClassifier()):
        proc = Process("infer-frozen", [str(BIN / "inference-consumer")], env, tmp_path)
        try:
            wait_for(lambda: len(read(kafka_bootstrap, kafka_topics.results,
                                      "read_uncommitted", quiet_s=0.2)) >= 8, 60,
                     "results to flow")
            proc.proc.send_signal(signal.SIGSTOP)
            produce(kafka_bootstrap, kafka_topics.images,
                    [image_message(uid, value=i).to_bytes() for i, uid in enumerate(later)])
            time.sleep(FREEZE_S)  # > session timeout: the coordinator drops the member
            proc.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: len(read(kafka_bootstrap, kafka_topics.results, "read_committed",
                                      quiet_s=0.5)) >= len(first + later), 90,
                     "every committed result")
            time.sleep(3)  # a late duplicate would show now
            proc.assert_running()
        finally:
            proc.proc.send_signal(signal.SIGCONT)
            proc.stop()
    committed = result_ids(read(kafka_bootstrap, kafka_topics.results, "read_committed"))
    assert sorted(committed) == sorted(first + later), proc.log()


def _txn_producer(bootstrap: str, transactional_id: str) -> KafkaProducer:
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    producer.init_transactions()
    return producer


def _refused_then_committed(bootstrap, topic, group, producer_for_second):
    """Transaction 1 sends offsets for partition 0 with a member the group does not know
    (refused: CommitFailedError) and is aborted; transaction 2 commits offsets for partition 1.
    Returns the group's committed offsets afterwards."""
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    first = _txn_producer(bootstrap, f"{group}-txn")
    first.begin_transaction()
    stale = ConsumerGroupMetadata(group, generation_id=7, member_id="ghost-member")

    def refused():
        first.send_offsets_to_transaction({tp0: OffsetAndMetadata(5, "", -1)}, stale)
        first.commit_transaction()

    with pytest.raises(CommitFailedError):
        refused()
    first.abort_transaction()
    second = producer_for_second(first)
    second.begin_transaction()
    second.send_offsets_to_transaction({tp1: OffsetAndMetadata(3, "", -1)},
                                       ConsumerGroupMetadata(group))
    second.commit_transaction()
    for producer in {id(first): first, id(second): second}.values():
        producer.close(timeout=5)
    reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {tp.partition: reader.committed(tp) for tp in (tp0, tp1)}
    finally:
        reader.close()


def test_kafka_python_commits_refused_offsets_with_the_next_transaction(
    kafka_bootstrap, kafka_topics
):
    """The library bug behind the freeze-inference loss: reusing the producer after a refused
    TxnOffsetCommit commits the refused offset with the next transaction. When this starts to
    fail, kafka-python has fixed it and InferenceConsumer._renew_producer may go."""
    committed = _refused_then_committed(kafka_bootstrap, kafka_topics.images, "txn-leak-reused",
                                        lambda first: first)
    assert committed == {0: 5, 1: 3}


def test_a_renewed_producer_commits_only_its_own_offsets(kafka_bootstrap, kafka_topics):
    """What the inference consumer does after a refused commit (_renew_producer)."""
    committed = _refused_then_committed(
        kafka_bootstrap, kafka_topics.images, "txn-leak-renewed",
        lambda first: _txn_producer(kafka_bootstrap, "txn-leak-renewed-txn"))
    assert committed == {0: None, 1: 3}
