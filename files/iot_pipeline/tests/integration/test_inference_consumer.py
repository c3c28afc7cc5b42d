"""The inference consumer against a real broker and a real HTTP server."""

import threading

import numpy as np
import pytest
from werkzeug.serving import make_server

from iot_pipeline import inference_consumer, messages, ml_server
from iot_pipeline.config import KafkaSettings
from iot_pipeline.model import Prediction
from iot_pipeline.runtime import StopFlag

from harness import (
    headers,
    image_message,
    produce,
    read_all,
    result_message,
    running_in_thread,
    wait_for,
)
from servers import free_port

pytestmark = pytest.mark.integration


class MeanClassifier:
    """Labels an image by its mean pixel value, so each answer can be checked."""

    name = "mean-test"

    def __init__(self):
        self.batches = []

    def classify(self, pixels, top_k=5):
        self.batches.append(len(pixels))
        return [Prediction(f"mean-{int(p.mean())}", 0.9, ((f"mean-{int(p.mean())}", 0.9),))
                for p in pixels]


class HttpServer:
    def __init__(self, port, classifier):
        app = ml_server.create_app(ml_server.Settings(weights="none"),
                                   classifier_factory=lambda _s: classifier)
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join(10)


def metric(consumer, name, **labels):
    return consumer.registry.get_sample_value(name, labels) or 0.0


def make_consumer(bootstrap, topics, port, batch_size=8, **extra):
    settings = inference_consumer.Settings(
        kafka=KafkaSettings((bootstrap,), topics.images, topics.results, topics.dlq),
        ml_server_url=f"http://127.0.0.1:{port}", group_id=f"infer-{topics.images}",
        batch_size=batch_size, batch_timeout_s=0.05, request_timeout_s=10,
        expected_image_size=(32, 32), max_image_bytes=1 << 20, **extra,
    )
    return inference_consumer.InferenceConsumer(settings, StopFlag())


def results_by_id(bootstrap, topic):
    decoded = [messages.decode(r.value) for r in read_all(bootstrap, topic)]
    return {m.unique_id: m for m in decoded}


def test_every_image_gets_one_result_in_batches(kafka_bootstrap, kafka_topics):
    port = free_port()
    classifier = MeanClassifier()
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(f"img-{i}", value=i).to_bytes() for i in range(40)])
    with HttpServer(port, classifier), \
            running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, port)) as consumer:
        wait_for(lambda: len(read_all(kafka_bootstrap, kafka_topics.results)) >= 40, 60,
                 "40 results")
    results = results_by_id(kafka_bootstrap, kafka_topics.results)
    assert len(read_all(kafka_bootstrap, kafka_topics.results)) == 40
    # The counters moved with the work: each result counted once, when its transaction committed.
    assert metric(consumer, "iot_inference_results_published_total") == 40
    assert metric(consumer, "iot_inference_records_consumed_total") >= 40
    assert metric(consumer, "iot_inference_ml_request_seconds_count") == len(classifier.batches)
    assert metric(consumer, "iot_inference_rebalances_total") >= 1
    assert {uid: r.inferred_value for uid, r in results.items()} == {
        f"img-{i}": f"mean-{i}" for i in range(40)}
    assert all(r.model == "mean-test" for r in results.values())
    assert max(classifier.batches) > 1, "images were sent one per request"
    assert sum(classifier.batches) == 40


def test_results_name_the_version_of_the_model_that_answered(kafka_bootstrap, kafka_topics):
    """A server restarted with a new model mid-stream (the rollout): the results before carry
    the old version, the ones after the new, and no image is lost or dead-lettered between."""
    port = free_port()
    old, new = MeanClassifier(), MeanClassifier()
    old.version, new.version = "v1", "v2"
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(f"a-{i}", value=i).to_bytes() for i in range(8)])
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, port)) as consumer:
        with HttpServer(port, old):
            wait_for(lambda: consumer.classified == 8, 60, "8 images by v1")
        produce(kafka_bootstrap, kafka_topics.images,
                [image_message(f"b-{i}", value=i).to_bytes() for i in range(8)])
        threading.Event().wait(1)  # meanwhile the consumer meets a closed port and retries
        with HttpServer(port, new):
            wait_for(lambda: consumer.classified == 16, 60, "8 more images by v2")
    results = results_by_id(kafka_bootstrap, kafka_topics.results)
    assert {uid: r.model_version for uid, r in results.items()} == {
        **{f"a-{i}": "v1" for i in range(8)}, **{f"b-{i}": "v2" for i in range(8)}}
    assert read_all(kafka_bootstrap, kafka_topics.dlq) == []


def test_nothing_is_lost_while_the_ml_server_is_down(kafka_bootstrap, kafka_topics):
    port = free_port()
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(f"img-{i}", value=i).to_bytes() for i in range(10)])
    with running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, port)) as consumer:
        # The server is not listening yet: the consumer retries and must not commit or drop.
        wait_for(lambda: consumer.classified == 0 and consumer.dead_letters.count == 0, 5,
                 "the consumer to start")
        threading.Event().wait(3)
        assert read_all(kafka_bootstrap, kafka_topics.results) == []
        with HttpServer(port, MeanClassifier()):
            wait_for(lambda: consumer.classified == 10, 60, "all 10 images after the outage")
    assert set(results_by_id(kafka_bootstrap, kafka_topics.results)) == {
        f"img-{i}" for i in range(10)}
    assert read_all(kafka_bootstrap, kafka_topics.dlq) == []


def test_bad_messages_are_dead_lettered_and_results_on_the_images_topic_skipped(
        kafka_bootstrap, kafka_topics):
    port = free_port()
    good = image_message("truncated")
    truncated = messages.ImageMessage(good.unique_id, good.device_id, good.ground_truth,
                                      good.image_png[:-30], good.produced_at).to_bytes()
    produce(kafka_bootstrap, kafka_topics.images, [
        image_message("good").to_bytes(), b"\x00\x01garbage", truncated,
        result_message("someone-else").to_bytes(),
    ])
    with HttpServer(port, MeanClassifier()), \
            running_in_thread(make_consumer(kafka_bootstrap, kafka_topics, port)) as consumer:
        wait_for(lambda: consumer.classified == 1 and consumer.dead_letters.count == 2, 60,
                 "one result and two dead letters")
    dead = read_all(kafka_bootstrap, kafka_topics.dlq)
    assert sorted(headers(r)["dlq.reason"] for r in dead) == ["bad_json", "corrupt_image"]
    for reason in ("bad_json", "corrupt_image"):
        assert metric(consumer, "iot_dead_letters_total", service="inference", reason=reason) == 1
    assert {headers(r)["dlq.group"] for r in dead} == {f"infer-{kafka_topics.images}"}
    assert set(results_by_id(kafka_bootstrap, kafka_topics.results)) == {"good"}


def test_the_consumer_batches_more_than_one_image_per_request_under_load(
        kafka_bootstrap, kafka_topics):
    port = free_port()
    classifier = MeanClassifier()
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(f"b-{i}").to_bytes() for i in range(64)])
    with HttpServer(port, classifier), running_in_thread(
            make_consumer(kafka_bootstrap, kafka_topics, port, batch_size=32)) as consumer:
        wait_for(lambda: consumer.classified == 64, 60, "64 images")
    assert len(classifier.batches) <= 8
    assert np.mean(classifier.batches) >= 8


def test_an_image_that_fails_unexpectedly_is_dead_lettered_after_bounded_attempts(
        kafka_bootstrap, kafka_topics, monkeypatch):
    real_result = inference_consumer._result
    failures = []

    def buggy_result(message, model, prediction, inferred_at, **kwargs):
        if message.unique_id == "bug":
            failures.append(message.unique_id)
            raise IndexError("only this image breaks the result builder")
        return real_result(message, model, prediction, inferred_at, **kwargs)

    monkeypatch.setattr(inference_consumer, "_result", buggy_result)
    port = free_port()
    produce(kafka_bootstrap, kafka_topics.images,
            [image_message(f"img-{i}", value=i).to_bytes() for i in range(6)]
            + [image_message("bug").to_bytes()]
            + [image_message(f"img-{i}", value=i).to_bytes() for i in range(6, 12)])
    with HttpServer(port, MeanClassifier()), running_in_thread(
            make_consumer(kafka_bootstrap, kafka_topics, port, max_attempts=2)) as consumer:
        wait_for(lambda: consumer.classified == 12 and consumer.dead_letters.count == 1, 60,
                 "12 results and one dead letter")
        produce(kafka_bootstrap, kafka_topics.images, [image_message("after").to_bytes()])
        wait_for(lambda: consumer.classified == 13, 60, "a result after the failing image")
    (dead,) = read_all(kafka_bootstrap, kafka_topics.dlq)
    assert headers(dead)["dlq.reason"] == "unexpected_IndexError"
    assert messages.decode(dead.value).unique_id == "bug"
    assert set(results_by_id(kafka_bootstrap, kafka_topics.results)) == {
        *(f"img-{i}" for i in range(12)), "after"}
    assert 2 <= len(failures) <= 3  # two attempts at its batch, then alone if it had company
