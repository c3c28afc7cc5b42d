import base64
import io
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from iot_pipeline import messages
from iot_pipeline.messages import ImageMessage, InvalidMessage, ResultMessage

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def png(width=32, height=32, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return messages.encode_png(pixels)


def image_payload(**overrides) -> dict:
    payload = json.loads(ImageMessage("id-1", "device-0001", "apple", png(), NOW).to_bytes())
    payload.update(overrides)
    return payload


def encoded(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def test_image_message_round_trip_keeps_every_field_and_the_pixels():
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    original = ImageMessage("u1", "device-0003", "maple_tree", messages.encode_png(pixels), NOW)
    decoded = messages.decode(original.to_bytes(), expected_size=(32, 32))
    assert decoded == original
    assert np.array_equal(messages.decode_image(decoded.image_png), pixels)


def test_result_message_round_trip():
    original = ResultMessage("u1", "tabby", 0.5, "resnet50-random", NOW,
                             (("tabby", 0.5), ("tiger cat", 0.25)))
    assert messages.decode(original.to_bytes()) == original


def test_the_model_version_travels_with_the_result_and_is_optional():
    versioned = ResultMessage("u1", "apple", 0.5, "resnet50-cifar100", NOW, (("apple", 0.5),),
                              model_version="3beb4a58291f")
    assert json.loads(versioned.to_bytes())["model_version"] == "3beb4a58291f"
    assert messages.decode(versioned.to_bytes()) == versioned
    # A result of an inference consumer that predates the field: still valid, no version.
    unversioned = ResultMessage("u1", "apple", 0.5, "resnet50-cifar100", NOW)
    assert "model_version" not in json.loads(unversioned.to_bytes())
    old = encoded({k: v for k, v in result_payload().items() if k != "model_version"})
    assert messages.decode(old).model_version is None
    assert messages.decode(encoded(result_payload(model_version=None))).model_version is None


@pytest.mark.parametrize("version", ["", 3, ["v1"], "v\x00", "v" * 201])
def test_a_bad_model_version_is_rejected(version):
    with pytest.raises(InvalidMessage) as caught:
        messages.decode(encoded(result_payload(model_version=version)))
    assert caught.value.reason in {"missing_field", "bad_field"}


@pytest.mark.parametrize(("value", "reason"), [
    (None, "empty_message"),
    (b"\xff\xfe not utf-8", "bad_json"),
    (b"{not json", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (encoded(image_payload(schema=2)), "unsupported_schema"),
    (encoded(image_payload(type="video")), "unknown_type"),
    (encoded(image_payload(unique_id="")), "missing_field"),
    (encoded({k: v for k, v in image_payload().items() if k != "ground_truth"}), "missing_field"),
    (encoded(image_payload(unique_id="x" * 201)), "bad_field"),
    (encoded(image_payload(produced_at="yesterday")), "bad_field"),
    (encoded(image_payload(produced_at="2026-11-28T12:00:00")), "bad_field"),
    (encoded(image_payload(image="not base64!!")), "bad_base64"),
    (encoded(image_payload(image=base64.b64encode(b"GIF89a....").decode())), "not_an_image"),
    (encoded(image_payload(image=base64.b64encode(png()[:60]).decode())), "corrupt_image"),
    (encoded(image_payload(image=base64.b64encode(png(48, 48)).decode())), "wrong_image_size"),
    (encoded(image_payload(image="A" * 2_000_000)), "image_too_large"),
])
def test_bad_messages_are_rejected_with_their_reason(value, reason):
    with pytest.raises(InvalidMessage) as caught:
        messages.decode(value, expected_size=(32, 32))
    assert caught.value.reason == reason


def result_payload(**overrides) -> dict:
    payload = json.loads(ResultMessage("id-1", "tabby", 0.5, "m", NOW, (("tabby", 0.5),))
                         .to_bytes())
    payload.update(overrides)
    return payload


@pytest.mark.parametrize(("value", "detail"), [
    # What PostgreSQL (or psycopg2) would refuse, caught before any transaction.
    (encoded(image_payload(ground_truth="app\x00le")), "NUL"),
    (encoded(image_payload(device_id="\ud800")), "surrogate"),
    (encoded(image_payload(produced_at="2026-11-28T12:00:00+20:00")), "UTC offset"),
    (encoded(result_payload(score=1e300)), "score must lie in"),
    (encoded(result_payload(score=float("nan"))), "score must lie in"),
    (encoded(result_payload(score=-0.5)), "score must lie in"),
    (encoded(result_payload(score=1e-50)), "4-byte real"),
    (encoded(result_payload(score=True)), "score must be a number"),
    (b'{"schema": 1, "type": "result", "unique_id": "x", "inferred_value": "y", "model": "m", '
     b'"inferred_at": "2026-11-28T12:00:00+00:00", "score": ' + b"9" * 5000 + b"}", "digits"),
    (encoded(result_payload(top_k=[["a", 0.5, 1]])), "pairs"),
    (encoded(result_payload(top_k="ab")), "top_k must be a list"),
    (encoded(result_payload(top_k=[["a\x00", 0.5]])), "NUL"),
    (encoded(result_payload(top_k=[["a", 2]])), "top_k score"),
    (encoded(result_payload(model="m" * 201)), "longer than 200"),
    (b"[" * 100_000 + b"]" * 100_000, ""),
])
def test_what_the_database_would_refuse_is_rejected_at_decode_time(value, detail):
    with pytest.raises(InvalidMessage) as caught:
        messages.decode(value, expected_size=(32, 32))
    assert caught.value.reason in {"bad_field", "bad_json"}
    assert detail in str(caught.value)


def test_any_size_is_accepted_when_no_size_is_expected():
    payload = image_payload(image=base64.b64encode(png(48, 40)).decode())
    assert messages.decode(encoded(payload), expected_size=None).unique_id == "id-1"


def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded():
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")
    with pytest.raises(InvalidMessage) as caught:
        messages.decode_image(buffer.getvalue(), max_pixels=4096 * 4096)
    assert caught.value.reason == "image_too_large"


def test_jpeg_is_accepted_and_other_formats_are_not():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="JPEG")
    assert messages.decode_image(buffer.getvalue()).shape == (32, 32, 3)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="BMP")
    with pytest.raises(InvalidMessage):
        messages.decode_image(buffer.getvalue())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_escape_as_anything_but_invalid_message(value):
    try:
        messages.decode(value, expected_size=(32, 32))
    except InvalidMessage as exc:
        assert exc.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=3),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(image_payload())), json_values, max_size=8),
       st.sampled_from(["image", "result"]))
def test_arbitrary_field_values_never_escape_as_anything_but_invalid_message(fields, kind):
    payload = {**image_payload(), **fields, "type": kind, "schema": 1}
    try:
        messages.decode(encoded(payload), expected_size=(32, 32))
    except InvalidMessage as exc:
        assert exc.reason
