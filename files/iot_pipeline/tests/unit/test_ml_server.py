"""The HTTP API against a stand-in classifier (fast), and once against the real ResNet-50."""

import base64
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from iot_pipeline import messages, ml_server
from iot_pipeline.model import Classifier, Prediction, imagenet_labels


class CountingClassifier:
    """Answers 'label-<mean pixel>' so tests can tell images apart; records batch sizes."""

    name = "counting"

    def __init__(self, _settings=None):
        self.batches = []

    def classify(self, pixels, top_k=5):
        self.batches.append(len(pixels))
        return [Prediction(f"label-{int(p.mean())}", 1.0, (("x", 1.0),) * top_k) for p in pixels]


def b64_png(value: int, size=32) -> str:
    pixels = np.full((size, size, 3), value, np.uint8)
    return base64.b64encode(messages.encode_png(pixels)).decode()


def wait_ready(client, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.status_code == 200:
            return response
        assert response.json["status"] == "loading", response.json
        time.sleep(0.05)
    raise AssertionError("model never became ready")


@pytest.fixture
def classifier():
    return CountingClassifier()


@pytest.fixture
def client(classifier):
    settings = ml_server.Settings(weights="none", max_batch=8, max_request_bytes=200_000)
    app = ml_server.create_app(settings, classifier_factory=lambda _s: classifier)
    test_client = app.test_client()
    wait_ready(test_client)
    return test_client


def test_a_batch_is_classified_in_one_call_in_order(client, classifier):
    response = client.post("/predict", json={"images": [b64_png(10), b64_png(200), b64_png(7)]})
    assert response.status_code == 200
    assert [p["label"] for p in response.json["predictions"]] == [
        "label-10", "label-200", "label-7"]
    assert classifier.batches == [3]
    assert response.json["model"] == "counting"


def test_each_answer_and_health_name_the_model_version():
    classifier = CountingClassifier()
    classifier.version = "r2"
    app = ml_server.create_app(ml_server.Settings(weights="none"),
                               classifier_factory=lambda _s: classifier)
    test_client = app.test_client()
    health = wait_ready(test_client).json
    assert (health["model"], health["version"]) == ("counting", "r2")
    answer = test_client.post("/predict", json={"images": [b64_png(1)]})
    assert answer.status_code == 200
    assert (answer.json["model"], answer.json["version"]) == ("counting", "r2")


def test_one_image_and_top_k(client):
    response = client.post("/predict", json={"image": b64_png(3), "top_k": 2})
    assert response.status_code == 200
    assert len(response.json["predictions"][0]["top_k"]) == 2


def test_images_of_different_sizes_are_resized_together(client, classifier):
    response = client.post("/predict", json={"images": [b64_png(1, 32), b64_png(2, 40)]})
    assert response.status_code == 200
    assert classifier.batches == [2]


@pytest.mark.parametrize(("kwargs", "status", "error"), [
    ({"data": "{not json", "content_type": "application/json"}, 400, "bad_json"),
    ({"json": ["a list"]}, 400, "bad_request"),
    ({"json": {"images": []}}, 400, "bad_request"),
    ({"json": {"picture": "x"}}, 400, "bad_request"),
    ({"json": {"images": [42]}}, 400, "bad_request"),
    ({"json": {"image": "%%%"}}, 400, "bad_base64"),
    ({"json": {"image": b64_png(1), "top_k": 0}}, 400, "bad_request"),
    ({"json": {"image": base64.b64encode(b"no image here").decode()}}, 422, "not_an_image"),
    ({"json": {"images": [b64_png(1)] * 9}}, 413, "batch_too_large"),
    ({"data": b"x" * 300_000, "content_type": "application/json"}, 413, "request_entity_too_large"),
])
def test_bad_requests_get_a_json_error_and_the_right_status(client, kwargs, status, error):
    response = client.post("/predict", **kwargs)
    assert response.status_code == status
    assert response.json["error"] == error


def npy(array, allow_pickle=False) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_decoded_pixels_get_the_same_answer_as_their_pngs(client, classifier):
    values = [10, 200, 7]
    pixels = np.stack([np.full((32, 32, 3), v, np.uint8) for v in values])
    as_npy = client.post("/predict?top_k=2", data=npy(pixels),
                         content_type=messages.PIXELS_CONTENT_TYPE)
    as_png = client.post("/predict", json={"images": [b64_png(v) for v in values], "top_k": 2})
    assert as_npy.status_code == 200, as_npy.json
    assert as_npy.json == as_png.json
    assert [p["label"] for p in as_npy.json["predictions"]] == ["label-10", "label-200", "label-7"]
    assert len(as_npy.json["predictions"][0]["top_k"]) == 2
    assert classifier.batches == [3, 3]


@pytest.mark.parametrize(("body", "status", "error"), [
    (b"not an npy file", 400, "bad_npy"),
    (npy(np.zeros((2, 32, 32, 3), np.float32)), 422, "bad_pixels"),
    (npy(np.zeros((32, 32, 3), np.uint8)), 422, "bad_pixels"),
    (npy(np.zeros((2, 32, 32, 4), np.uint8)), 422, "bad_pixels"),
    (npy(np.array(["a", "b"], dtype=object), allow_pickle=True), 400, "bad_npy"),
    (npy(np.zeros((0, 32, 32, 3), np.uint8)), 400, "bad_request"),
    (npy(np.zeros((9, 32, 32, 3), np.uint8)), 413, "batch_too_large"),
])
def test_bad_pixel_bodies_get_a_json_error(client, classifier, body, status, error):
    response = client.post("/predict", data=body, content_type=messages.PIXELS_CONTENT_TYPE)
    assert (response.status_code, response.json["error"]) == (status, error)
    assert classifier.batches == []


def test_pixel_bodies_obey_the_pixel_limit(client, monkeypatch):
    monkeypatch.setattr(ml_server, "MAX_IMAGE_PIXELS", 32 * 32 - 1)
    response = client.post("/predict", data=npy(np.zeros((1, 32, 32, 3), np.uint8)),
                           content_type=messages.PIXELS_CONTENT_TYPE)
    assert (response.status_code, response.json["error"]) == (422, "image_too_large")


def test_the_index_of_a_bad_image_is_reported(client):
    response = client.post("/predict", json={"images": [b64_png(1), "AAAA"]})
    assert response.status_code == 422
    assert response.json["index"] == 1


def test_health_is_503_until_the_model_is_loaded():
    import threading

    release = threading.Event()

    def slow_factory(_settings):
        release.wait(10)
        return CountingClassifier()

    app = ml_server.create_app(ml_server.Settings(weights="none"), classifier_factory=slow_factory)
    test_client = app.test_client()
    assert test_client.get("/health").status_code == 503
    assert test_client.post("/predict", json={"image": b64_png(1)}).status_code == 503
    release.set()
    assert wait_ready(test_client).json["model"] == "counting"


def test_a_model_that_fails_to_load_reports_failed():
    def broken(_settings):
        raise RuntimeError("no weights here")

    app = ml_server.create_app(ml_server.Settings(weights="none"), classifier_factory=broken)
    test_client = app.test_client()
    for _ in range(100):
        body = test_client.get("/health").json
        if body["status"] == "failed":
            break
        time.sleep(0.02)
    assert body == {"status": "failed", "error": "no weights here"}


def test_metrics_count_requests_and_images(client):
    client.post("/predict", json={"images": [b64_png(1), b64_png(2)]})
    client.post("/predict", json={"image": "%%%"})
    response = client.get("/metrics")
    assert response.content_type.startswith("text/plain; version=")
    text = response.get_data(as_text=True)
    assert 'iot_ml_requests_total{endpoint="predict",status="200"} 1.0' in text
    assert 'iot_ml_requests_total{endpoint="predict",status="400"} 1.0' in text
    assert "iot_ml_images_total 2.0" in text
    assert "iot_ml_predict_seconds_count 1.0" in text
    assert "iot_ml_model_loaded 1.0" in text
    assert 'iot_ml_model_info{name="counting",version=""} 1.0' in text


def test_predict_seconds_count_the_model_not_the_wait_for_it():
    # Two requests at once: the second waits for the first batch. The histogram is the model's
    # busy time (make bench reads it as such), so it must hold 2 x the call, not 3 x.
    class Slow(CountingClassifier):
        def classify(self, pixels, top_k=5):
            time.sleep(0.3)
            return super().classify(pixels, top_k)

    app = ml_server.create_app(ml_server.Settings(weights="none"),
                               classifier_factory=lambda _s: Slow())
    wait_ready(app.test_client())
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(
            lambda v: app.test_client().post("/predict", json={"images": [b64_png(v)]}), (1, 2)))
    assert [a.status_code for a in answers] == [200, 200]
    text = app.test_client().get("/metrics").get_data(as_text=True)
    total = float(re.search(r"^iot_ml_predict_seconds_sum (\S+)$", text, re.M).group(1))
    assert 0.6 <= total < 0.75


def test_imagenet_labels_ship_with_the_package():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench"
    assert labels[281] == "tabby"


@pytest.mark.slow
def test_the_real_resnet50_classifies_a_batch_into_imagenet_labels():
    model = Classifier(weights="none", tf_threads=2, runtime="tensorflow")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    probs = model.probabilities(pixels)
    assert probs.shape == (3, 1000)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    predictions = model.classify(pixels, top_k=3)
    assert all(p.label in model.labels and len(p.top_k) == 3 for p in predictions)
    # The batch answer equals the per-image answers: the graph does not mix images.
    single = model.probabilities(pixels[1:2])
    assert np.allclose(single[0], probs[1], atol=1e-4)
    assert model.name == "resnet50-random"
