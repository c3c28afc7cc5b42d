"""The inference consumer's ML client: decoded pixels as .npy, PNGs for servers that predate it."""

import io

import numpy as np
import pytest

from iot_pipeline import messages
from iot_pipeline.inference_consumer import Answer, MlClient, MlRejected


class Recorder(MlClient):
    """Records each body's content type; answers like a server with or without .npy support."""

    def __init__(self, takes_pixels: bool) -> None:
        super().__init__("http://ml.invalid", 1)
        self.takes_pixels = takes_pixels
        self.sent: list[str] = []

    def _post(self, body, content_type, count):
        self.sent.append(content_type)
        if content_type == messages.PIXELS_CONTENT_TYPE:
            if not self.takes_pixels:
                raise MlRejected(400, {"error": "bad_json", "detail": "the body must be JSON"})
            assert np.load(io.BytesIO(body), allow_pickle=False).shape == (count, 32, 32, 3)
        return Answer("m", "v", [{"label": "x", "score": 1.0}] * count)


PIXELS = [np.zeros((32, 32, 3), np.uint8)] * 2
PNGS = [messages.encode_png(p) for p in PIXELS]


def test_decoded_pixels_go_as_one_npy_array():
    client = Recorder(takes_pixels=True)
    assert len(client.classify(PNGS, PIXELS).predictions) == 2
    assert client.sent == [messages.PIXELS_CONTENT_TYPE]


def test_pngs_go_when_pixels_are_missing_or_of_different_sizes():
    client = Recorder(takes_pixels=True)
    client.classify(PNGS, [PIXELS[0], None])
    client.classify(PNGS, [PIXELS[0], np.zeros((40, 40, 3), np.uint8)])
    assert client.sent == ["application/json", "application/json"]


def test_a_server_without_npy_support_gets_pngs_from_then_on():
    client = Recorder(takes_pixels=False)
    assert len(client.classify(PNGS, PIXELS).predictions) == 2
    client.classify(PNGS, PIXELS)
    assert client.sent == [messages.PIXELS_CONTENT_TYPE, "application/json", "application/json"]


def test_other_refusals_of_pixels_are_not_retried_as_pngs():
    client = Recorder(takes_pixels=True)

    def refuse(body, content_type, count):
        raise MlRejected(422, {"error": "bad_pixels"})

    client._post = refuse
    with pytest.raises(MlRejected):
        client.classify(PNGS, PIXELS)
    assert client.send_pixels
