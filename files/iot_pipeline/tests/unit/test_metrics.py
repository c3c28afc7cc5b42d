"""Each service's Prometheus counters move with the work they count; the endpoint's start-up.

Fakes stand in for the Kafka clients, the ML server and PostgreSQL; the counters are read from
the service's own registry, as a scrape would read them.
"""

import socket
import urllib.request

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaConnectionError

from iot_pipeline import (
    config,
    db_consumer,
    inference_consumer,
    kafka_io,
    lag_exporter,
    messages,
    metrics,
    simulator,
    store,
)
from iot_pipeline.config import ConfigError, MetricsSettings
from iot_pipeline.dataset import Dataset
from iot_pipeline.runtime import StopFlag

KAFKA_ENV = {"IOT_KAFKA_BOOTSTRAP_SERVERS": "kafka.invalid:9092"}


def value(registry, name, **labels):
    """A sample's value, 0 for a series that does not exist yet (a counter never moved)."""
    return registry.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- settings and the endpoint -----------------------------------------------------------------
@pytest.mark.parametrize(("module", "port"), [
    (simulator, 9101), (inference_consumer, 9102), (db_consumer, 9103), (lag_exporter, 9104),
])
def test_each_service_has_its_own_default_port_on_loopback(module, port):
    settings = module.load_settings([], {**KAFKA_ENV})
    settings = settings[0] if isinstance(settings, tuple) else settings
    assert settings.metrics == MetricsSettings("127.0.0.1", port)


def test_port_and_address_come_from_the_environment_and_bad_ports_are_refused():
    settings = simulator.load_settings(
        [], {**KAFKA_ENV, "IOT_METRICS_PORT": "19101", "IOT_METRICS_ADDRESS": "10.1.2.3"})
    assert settings.metrics == MetricsSettings("10.1.2.3", 19101)
    for bad in ("65536", "-1", "http"):
        with pytest.raises(ConfigError, match="IOT_METRICS_PORT"):
            simulator.load_settings([], {**KAFKA_ENV, "IOT_METRICS_PORT": bad})


def test_the_endpoint_serves_the_registry_and_port_0_serves_nothing():
    registry = metrics.registry()
    counter = simulator.Metrics(registry).sent
    counter.inc(3)
    assert metrics.serve(registry, MetricsSettings("127.0.0.1", 0)) is None
    port = free_port()
    server = metrics.serve(registry, MetricsSettings("127.0.0.1", port))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "iot_simulator_images_sent_total 3.0" in text
    assert "process_start_time_seconds" in text  # the process's own metrics come along


def test_a_port_in_use_or_a_foreign_address_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(metrics.MetricsError, match=rf"127\.0\.0\.1:{port}.*IOT_METRICS_PORT"):
            metrics.serve(metrics.registry(), MetricsSettings("127.0.0.1", port))
    # TEST-NET-1: an address this host does not have.
    with pytest.raises(metrics.MetricsError, match=r"192\.0\.2\.1"):
        metrics.serve(metrics.registry(), MetricsSettings("192.0.2.1", free_port()))


def test_two_services_in_one_process_keep_their_own_counters():
    first, second = metrics.registry(), metrics.registry()
    simulator.Metrics(first).sent.inc()
    simulator.Metrics(second)
    assert value(first, "iot_simulator_images_sent_total") == 1
    assert value(second, "iot_simulator_images_sent_total") == 0


# --- simulator ---------------------------------------------------------------------------------
class Future:
    """Settles at once, from send(): acked unless the producer says this one fails."""

    def __init__(self, error):
        self.error = error

    def add_callback(self, callback):
        if self.error is None:
            callback(None)
        return self

    def add_errback(self, errback):
        if self.error is not None:
            errback(self.error)
        return self


class SimProducer:
    def __init__(self, fail_every):
        self.fail_every = fail_every
        self.sent = 0

    def send(self, topic, key=None, value=None):
        self.sent += 1
        return Future(KafkaConnectionError("gone") if self.sent % self.fail_every == 0 else None)

    def flush(self):
        pass


def test_simulator_counts_sent_acked_and_failed_from_the_producer_callbacks():
    settings = simulator.load_settings(["--count", "6", "--rate", "0", "--progress-s", "0"],
                                       {**KAFKA_ENV})
    data = Dataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), ("apple", "bee"))
    registry = metrics.registry()
    tally = simulator.Tally(None, simulator.Metrics(registry))
    simulator.Simulator(settings, StopFlag(), data).run(SimProducer(fail_every=3), tally)
    assert value(registry, "iot_simulator_images_sent_total") == 6
    assert value(registry, "iot_simulator_images_acked_total") == 4 == tally.acked
    assert value(registry, "iot_simulator_images_failed_total") == 2 == tally.failed
    assert value(registry, "iot_simulator_send_latency_seconds_count") == 4
    assert value(registry, "iot_simulator_send_latency_seconds_bucket", le="+Inf") == 4


# --- both consumers: fakes for the Kafka clients -------------------------------------------------
class Sent:
    def get(self, timeout=None):
        return None


class FakeProducer:
    def __init__(self, refuse_commit=False):
        self.sent = []
        self.refuse_commit = refuse_commit
        self.transactions = []

    def send(self, topic, key=None, value=None, headers=None):
        self.sent.append(topic)
        return Sent()

    def flush(self, timeout=None):
        pass

    def init_transactions(self):
        pass

    def begin_transaction(self):
        self.transactions.append("begin")

    def send_offsets_to_transaction(self, offsets, metadata):
        pass

    def commit_transaction(self):
        if self.refuse_commit:
            raise KafkaConnectionError("coordinator moved")
        self.transactions.append("commit")

    def abort_transaction(self):
        self.transactions.append("abort")

    def close(self, timeout=None):
        pass


class FakeConsumer:
    def __init__(self, on_assigned=None):
        self.on_assigned = on_assigned
        self.commits = []
        self.refuse_commit = False

    def commit(self, offsets=None):
        if self.refuse_commit:
            raise KafkaConnectionError("no coordinator")
        self.commits.append(offsets)

    def group_metadata(self):
        return None

    def assignment(self):
        return set()

    def pause(self, *partitions):
        pass

    def resume(self, *partitions):
        pass

    def paused(self):
        return set()

    def poll(self, timeout_ms=0, max_records=None):
        return {}

    def seek(self, tp, offset):
        pass

    def close(self, autocommit=False):
        pass


@pytest.fixture
def kafka(monkeypatch):
    """Replaces the Kafka clients of kafka_io; yields what the services were given."""
    made = {}

    def consumer(settings, group_id, topics, client_id, *, on_assigned=None, **_):
        made["consumer"] = FakeConsumer(on_assigned)
        return made["consumer"]

    def producer(settings, client_id, **_):
        made["producer"] = made.get("refusing") or FakeProducer()
        return made["producer"]

    monkeypatch.setattr(kafka_io, "consumer", consumer)
    monkeypatch.setattr(kafka_io, "producer", producer)
    monkeypatch.setattr(kafka_io, "backoff", lambda: iter([0.0] * 100))
    return made


def record(offset, value, topic="iot-images"):
    return ConsumerRecord(topic=topic, partition=0, leader_epoch=-1, offset=offset,
                          timestamp=0, timestamp_type=0, key=b"k", value=value, headers=[],
                          checksum=None, serialized_key_size=1,
                          serialized_value_size=len(value), serialized_header_size=-1)


def image(uid):
    pixels = np.zeros((32, 32, 3), np.uint8)
    return messages.ImageMessage(uid, "device-0001", "apple", messages.encode_png(pixels),
                                 messages.utc_now()).to_bytes()


def result(uid):
    return messages.ResultMessage(uid, "apple", 0.9, "resnet", messages.utc_now()).to_bytes()


# --- inference consumer ------------------------------------------------------------------------
class FakeMl:
    def __init__(self):
        self.calls = 0

    def classify(self, images, pixels=None):
        self.calls += 1
        return inference_consumer.Answer("resnet", "v1", [
            {"label": "apple", "score": 0.9, "top_k": []} for _ in images])


def inference(kafka, delivery):
    settings = inference_consumer.load_settings([], {**KAFKA_ENV, "IOT_INFER_DELIVERY": delivery})
    consumer = inference_consumer.InferenceConsumer(settings, StopFlag(), metrics.registry())
    consumer.ml = FakeMl()
    return consumer


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_inference_counts_records_results_dead_letters_and_ml_calls(kafka, delivery):
    consumer = inference(kafka, delivery)
    registry = consumer.registry
    batch = [record(0, image("a")), record(1, b"{not json"), record(2, image("b"))]
    assert consumer.process(batch) is True
    assert value(registry, "iot_inference_records_consumed_total") == 3
    assert value(registry, "iot_inference_batch_size_count") == 1
    assert value(registry, "iot_inference_batch_size_sum") == 3
    assert value(registry, "iot_inference_ml_request_seconds_count") == 1 == consumer.ml.calls
    assert value(registry, "iot_inference_results_published_total") == 2
    assert value(registry, "iot_dead_letters_total", service="inference", reason="bad_json") == 1
    assert value(registry, "iot_inference_commit_failures_total") == 0


def test_inference_counts_nothing_of_an_aborted_transaction_but_the_refused_commit(kafka):
    kafka["refusing"] = FakeProducer(refuse_commit=True)
    consumer = inference(kafka, "exactly_once")
    registry = consumer.registry
    assert consumer.process([record(0, image("a")), record(1, b"{not json")]) is False
    assert kafka["producer"].transactions == ["begin", "abort"]
    assert value(registry, "iot_inference_commit_failures_total") == 1
    assert value(registry, "iot_inference_results_published_total") == 0
    assert value(registry, "iot_dead_letters_total", service="inference", reason="bad_json") == 0
    # The replay commits: now they count, once.
    kafka["producer"].refuse_commit = False
    assert consumer.process([record(0, image("a")), record(1, b"{not json")]) is True
    assert value(registry, "iot_inference_results_published_total") == 1
    assert value(registry, "iot_dead_letters_total", service="inference", reason="bad_json") == 1
    assert value(registry, "iot_inference_records_consumed_total") == 4  # replays count


def test_inference_counts_a_refused_at_least_once_commit_and_each_assignment(kafka):
    consumer = inference(kafka, "at_least_once")
    kafka["consumer"].refuse_commit = True
    assert consumer.process([record(0, image("a"))]) is True  # replayed later, not fatal
    assert value(consumer.registry, "iot_inference_commit_failures_total") == 1
    assert value(consumer.registry, "iot_inference_results_published_total") == 1  # acked
    kafka["consumer"].on_assigned()
    kafka["consumer"].on_assigned()
    assert value(consumer.registry, "iot_inference_rebalances_total") == 2


# --- DB consumer -------------------------------------------------------------------------------
def db(kafka, monkeypatch, outcomes):
    """A DB consumer whose store answers with ``outcomes`` in turn (an exception is raised)."""
    settings, _ = db_consumer.load_settings([], {**KAFKA_ENV})
    consumer = db_consumer.DbConsumer(settings, StopFlag(), metrics.registry())
    writes = iter(outcomes)

    def write_isolating(conn, decoded):
        outcome = next(writes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(store, "connect", lambda dsn: type("Conn", (), {"closed": False,
                                                                        "close": lambda s: None})())
    monkeypatch.setattr(store, "write_isolating", write_isolating)
    monkeypatch.setattr(db_consumer, "backoff", lambda: iter([0.0] * 100))
    return consumer


def test_db_counts_rows_by_kind_dead_letters_latency_and_batches(kafka, monkeypatch):
    consumer = db(kafka, monkeypatch, [(store.WriteSummary(2, 1, (0.4, 2.0)), [])])
    registry = consumer.registry
    batch = [record(0, image("a")), record(1, image("b")), record(2, result("a"), "iot-results"),
             record(3, b"\xff not utf-8")]
    assert consumer.handle(batch) is True
    assert value(registry, "iot_db_rows_written_total", kind="image") == 2
    assert value(registry, "iot_db_rows_written_total", kind="result") == 1
    assert value(registry, "iot_dead_letters_total", service="db", reason="bad_json") == 1
    assert value(registry, "iot_db_batch_size_sum") == 4
    assert value(registry, "iot_db_transaction_seconds_count") == 1
    assert value(registry, "iot_e2e_latency_seconds_count") == 2
    assert value(registry, "iot_e2e_latency_seconds_sum") == pytest.approx(2.4)
    assert value(registry, "iot_e2e_latency_seconds_bucket", le="0.5") == 1
    assert value(registry, "iot_db_outages_total") == 0


def test_db_counts_one_outage_and_each_retry_and_what_a_refusal_dead_letters(kafka, monkeypatch):
    refused = store.RecordRefused("db_numeric_value_out_of_range", "real out of range")
    consumer = db(kafka, monkeypatch, [
        store.StoreUnavailable("server closed the connection"),
        store.StoreUnavailable("connection refused"),
        (store.WriteSummary(1, 0), [(record(1, image("b")), refused)]),
    ])
    registry = consumer.registry
    assert consumer.handle([record(0, image("a")), record(1, image("b"))]) is True
    assert value(registry, "iot_db_outages_total") == 1
    assert value(registry, "iot_db_retries_total") == 2
    assert value(registry, "iot_db_rows_written_total", kind="image") == 1
    assert value(registry, "iot_dead_letters_total", service="db",
                 reason="db_numeric_value_out_of_range") == 1
    assert value(registry, "iot_e2e_latency_seconds_count") == 0  # no row completed


def test_write_summaries_add_their_completed_rows():
    total = store.WriteSummary(1, 0, (1.0,)) + store.WriteSummary(0, 2, (2.0, 3.0))
    assert total == store.WriteSummary(1, 2, (1.0, 2.0, 3.0))


def test_the_metrics_options_are_one_pair_per_service():
    names = [option.env for option in config.metrics_options(1234)]
    assert names == ["IOT_METRICS_PORT", "IOT_METRICS_ADDRESS"]
