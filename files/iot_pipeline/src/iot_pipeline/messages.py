"""The wire format, in one place: image and result messages as JSON on Kafka, and their checks.

An image message (simulator -> images topic)::

    {"schema": 1, "type": "image", "unique_id": "...", "device_id": "device-0007",
     "produced_at": "2026-11-28T15:00:00.123456+00:00", "ground_truth": "apple",
     "image_format": "png", "image": "<base64 PNG>"}

A result message (inference consumer -> results topic)::

    {"schema": 1, "type": "result", "unique_id": "...", "inferred_value": "apple",
     "score": 0.41, "model": "resnet50-cifar100", "model_version": "3beb4a58291f",
     "inferred_at": "...", "top_k": [["apple", 0.41], ["pear", 0.2]]}

``model_version`` (the ML server's model version, resnet.model_version) is optional: a result
from an inference consumer older than it has none, and readers that predate it ignore it.

Anything that does not decode into one of these raises :class:`InvalidMessage` with a short
machine-readable ``reason`` (the dead-letter header) and a human ``detail``. The checks cover
what PostgreSQL would refuse later (NUL characters, unpaired surrogates, numbers a ``real`` cannot
hold, time zone offsets beyond its +-15:59), so a bad record is dead-lettered here, before any
transaction, and the DB consumer's bisection (store.py) is only the last line of defence.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from iot_pipeline.config import MAX_IMAGE_BYTES

SCHEMA_VERSION = 1
IMAGE_FORMATS = frozenset({"PNG", "JPEG"})
_FORMATS = sorted(IMAGE_FORMATS)
MAX_IMAGE_PIXELS = 4096 * 4096
# Every text field (ids, labels, model names); the table's text columns take any length, this
# bound keeps rows and log lines small.
MAX_ID_LENGTH = 200
# PostgreSQL's timestamptz input accepts UTC offsets up to 15:59:59.
MAX_UTC_OFFSET = timedelta(hours=16)
MAX_TOP_K = 100


class InvalidMessage(ValueError):
    """A message that can never be processed: it belongs in the dead-letter topic."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Content type of the ML server's pixel body: one .npy (N, H, W, 3) uint8 array.
PIXELS_CONTENT_TYPE = "application/x-npy"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ImageMessage:
    unique_id: str
    device_id: str
    ground_truth: str
    image_png: bytes = field(repr=False)
    produced_at: datetime
    # The decoded (H, W, 3) uint8 pixels when decode() checked them: the inference consumer sends
    # these to the ML server, which then does not decode the PNG a second time. Not on the wire.
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_bytes(self) -> bytes:
        return _dump({
            "schema": SCHEMA_VERSION,
            "type": "image",
            "unique_id": self.unique_id,
            "device_id": self.device_id,
            "produced_at": self.produced_at.isoformat(),
            "ground_truth": self.ground_truth,
            "image_format": "png",
            "image": base64.b64encode(self.image_png).decode("ascii"),
        })


@dataclass(frozen=True)
class ResultMessage:
    unique_id: str
    inferred_value: str
    score: float
    model: str
    inferred_at: datetime
    top_k: tuple[tuple[str, float], ...] = ()
    model_version: str | None = None

    def to_bytes(self) -> bytes:
        payload = {
            "schema": SCHEMA_VERSION,
            "type": "result",
            "unique_id": self.unique_id,
            "inferred_value": self.inferred_value,
            "score": self.score,
            "model": self.model,
            "inferred_at": self.inferred_at.isoformat(),
            "top_k": [[label, score] for label, score in self.top_k],
        }
        if self.model_version is not None:
            payload["model_version"] = self.model_version
        return _dump(payload)


Message = ImageMessage | ResultMessage


def _dump(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_png(pixels: np.ndarray) -> bytes:
    """HWC uint8 RGB pixels -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_image(
    data: bytes,
    *,
    expected_size: tuple[int, int] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    keep: bool = True,
) -> np.ndarray | None:
    """Encoded image bytes -> HWC uint8 RGB array, or InvalidMessage.

    Only PNG and JPEG are opened, and the pixel count is checked before the pixels are
    decoded, so a decompression bomb costs a header read, not memory. With ``keep=False`` the
    image is decoded and converted all the same (so what is refused does not depend on it),
    but no array is made and None is returned.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidMessage("image_too_large", f"{width}x{height} pixels")
            if expected_size is not None and (width, height) != expected_size:
                raise InvalidMessage(
                    "wrong_image_size",
                    f"{width}x{height}, expected {expected_size[0]}x{expected_size[1]}",
                )
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
    except InvalidMessage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InvalidMessage("not_an_image", str(exc)[:200]) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise InvalidMessage("corrupt_image", str(exc)[:200]) from None
    if not keep:
        return None
    # tobytes + frombuffer: a third of the cost of np.asarray(image) at 32x32.
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(height, width, 3)


def decode(
    value: bytes | None,
    *,
    expected_size: tuple[int, int] | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    check_pixels: bool = True,
    keep_pixels: bool = True,
) -> Message:
    """Kafka record value -> ImageMessage or ResultMessage; InvalidMessage if it is neither.

    With ``check_pixels`` the image is decoded too, so a consumer rejects exactly what the
    ML server would reject, before it stores or forwards anything; ``keep_pixels=False`` (the
    DB writer) checks them the same way without keeping them on the message.
    """
    if value is None:
        raise InvalidMessage("empty_message", "the record has no value")
    try:
        payload = json.loads(value)
    except (ValueError, RecursionError) as exc:
        # ValueError: not UTF-8, not JSON, or an integer beyond Python's 4300-digit limit;
        # RecursionError: nesting deeper than the parser's stack.
        raise InvalidMessage("bad_json", str(exc)[:200]) from None
    if not isinstance(payload, dict):
        raise InvalidMessage("bad_json", "top level is not an object")
    if payload.get("schema") != SCHEMA_VERSION:
        raise InvalidMessage("unsupported_schema", repr(payload.get("schema"))[:50])
    kind = payload.get("type")
    if kind == "image":
        return _decode_image_message(payload, expected_size, max_image_bytes, check_pixels,
                                     keep_pixels)
    if kind == "result":
        return _decode_result_message(payload)
    raise InvalidMessage("unknown_type", repr(kind)[:50])


def _text(payload: dict[str, Any], name: str, *, limit: int = MAX_ID_LENGTH) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidMessage("missing_field", f"{name} must be a non-empty string")
    if len(value) > limit:
        raise InvalidMessage("bad_field", f"{name} is longer than {limit} characters")
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; psycopg2 refuses to even send it.
        raise InvalidMessage("bad_field", f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage("bad_field", f"{name} holds an unpaired surrogate") from None
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    """A JSON number in [low, high] that a PostgreSQL ``real`` stores without overflow or
    underflow to zero."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidMessage("bad_field", f"{name} must be a number")
    # Compared before float(): a huge JSON integer would overflow the conversion.
    if not low <= value <= high:  # also rejects NaN
        raise InvalidMessage("bad_field", f"{name} must lie in [{low:g}, {high:g}]")
    number = float(value)
    if number != 0 and struct.unpack("f", struct.pack("f", number))[0] == 0:
        raise InvalidMessage("bad_field", f"{name} is too small for a 4-byte real")
    return number


def _timestamp(payload: dict[str, Any], name: str) -> datetime:
    text = _text(payload, name, limit=64)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidMessage("bad_field", f"{name} is not an ISO 8601 timestamp") from None
    offset = moment.utcoffset()
    if offset is None:
        raise InvalidMessage("bad_field", f"{name} has no time zone")
    if abs(offset) >= MAX_UTC_OFFSET:
        raise InvalidMessage("bad_field", f"{name} has a UTC offset beyond 15:59")
    return moment


def _decode_image_message(
    payload: dict[str, Any],
    expected_size: tuple[int, int] | None,
    max_image_bytes: int,
    check_pixels: bool,
    keep_pixels: bool = True,
) -> ImageMessage:
    unique_id = _text(payload, "unique_id")
    device_id = _text(payload, "device_id")
    ground_truth = _text(payload, "ground_truth")
    produced_at = _timestamp(payload, "produced_at")
    encoded = payload.get("image")
    if not isinstance(encoded, str) or not encoded:
        raise InvalidMessage("missing_field", "image must be a non-empty base64 string")
    if len(encoded) > (max_image_bytes * 4) // 3 + 4:
        raise InvalidMessage("image_too_large", f"more than {max_image_bytes} bytes")
    try:
        image_bytes = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidMessage("bad_base64", str(exc)[:200]) from None
    pixels = (decode_image(image_bytes, expected_size=expected_size, keep=keep_pixels)
              if check_pixels else None)
    return ImageMessage(unique_id, device_id, ground_truth, image_bytes, produced_at, pixels)


def _decode_result_message(payload: dict[str, Any]) -> ResultMessage:
    unique_id = _text(payload, "unique_id")
    inferred_value = _text(payload, "inferred_value")
    model = _text(payload, "model")
    model_version = (None if payload.get("model_version") is None
                     else _text(payload, "model_version"))
    inferred_at = _timestamp(payload, "inferred_at")
    score = _number(payload.get("score"), "score", 0.0, 1.0)
    top_k = payload.get("top_k", [])
    if not isinstance(top_k, list) or len(top_k) > MAX_TOP_K:
        raise InvalidMessage("bad_field", f"top_k must be a list of at most {MAX_TOP_K} pairs")
    pairs = []
    for pair in top_k:
        if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str):
            raise InvalidMessage("bad_field", "top_k must hold [label, score] pairs")
        label = _text({"label": pair[0]}, "label")
        pairs.append((label, _number(pair[1], "top_k score", 0.0, 1.0)))
    return ResultMessage(unique_id, inferred_value, score, model, inferred_at, tuple(pairs),
                         model_version)
