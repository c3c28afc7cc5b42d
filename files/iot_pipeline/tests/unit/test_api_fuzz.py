"""Property-based tests of the ML server's HTTP API: whatever arrives, no 5xx and a JSON error."""

import base64
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iot_pipeline import messages, ml_server
from iot_pipeline.model import Prediction


class EchoClassifier:
    name = "echo"

    def classify(self, pixels, top_k=5):
        return [Prediction("x", 1.0, (("x", 1.0),) * top_k) for _ in pixels]


@pytest.fixture(scope="module")
def client():
    app = ml_server.create_app(ml_server.Settings(weights="none", max_batch=8,
                                                  max_request_bytes=64 * 1024),
                               classifier_factory=lambda _s: EchoClassifier())
    test_client = app.test_client()
    for _ in range(200):
        if test_client.get("/health").status_code == 200:
            break
    return test_client


GOOD_PNG = base64.b64encode(messages.encode_png(np.zeros((32, 32, 3), np.uint8))).decode()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
    | st.just(GOOD_PNG),
    lambda inner: st.lists(inner, max_size=10) | st.dictionaries(
        st.sampled_from(["image", "images", "top_k", "other"]) | st.text(max_size=8), inner,
        max_size=4),
    max_leaves=20,
)
FUZZ = settings(max_examples=1500, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def check(response):
    assert response.status_code < 500, response.get_data()
    body = response.json
    assert body is not None
    if response.status_code != 200:
        assert isinstance(body["error"], str)
    else:
        assert len(body["predictions"]) >= 1


@FUZZ
@given(json_values)
def test_any_json_body_gets_a_json_answer_and_never_a_server_error(client, value):
    check(client.post("/predict", data=json.dumps(value), content_type="application/json"))


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(["application/json", "image/png", "text/plain"]))
def test_any_bytes_get_a_json_answer_and_never_a_server_error(client, body, content_type):
    check(client.post("/predict", data=body, content_type=content_type))


@FUZZ
@given(st.binary(min_size=1, max_size=2048))
def test_any_image_bytes_get_a_json_answer_and_never_a_server_error(client, data):
    payload = {"image": base64.b64encode(data).decode()}
    check(client.post("/predict", json=payload))
