"""ML host: the HTTP face of the classifier, a Flask app that gunicorn serves.

    gunicorn 'iot_pipeline.ml_server:create_app()'   # IOT_ML_* and GUNICORN_CMD_ARGS set it up

``POST /predict`` takes ``{"image": "<base64>"}`` or ``{"images": [...]}`` (PNG or JPEG) and an
optional ``"top_k"``, or (``Content-Type: application/x-npy``, top_k as a query parameter) the
decoded pixels themselves: one NumPy ``.npy`` array of shape (N, H, W, 3), dtype uint8, which is
what the inference consumer sends (it has decoded the PNGs to check them; no second decode, no
base64). Both answer ``{"model": ..., "version": ..., "predictions": [{"label",
"score", "top_k"}]}``.
``GET /health`` is 200 once the model is loaded (503 before), with the model's name and version
(resnet.model_version); ``GET /metrics`` is Prometheus text (prometheus_client; the sum over
every gunicorn worker with PROMETHEUS_MULTIPROC_DIR, see :class:`Metrics`).
Bad input gets a JSON error: 400 malformed, 413 too large (before the body is read), 422 an
image that does not decode; the model is loaded in the background so the port opens at once.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from werkzeug.exceptions import HTTPException

from iot_pipeline import config
from iot_pipeline.config import Option
from iot_pipeline.messages import (
    MAX_IMAGE_PIXELS,
    PIXELS_CONTENT_TYPE,
    InvalidMessage,
    decode_image,
)
from iot_pipeline.model import DEFAULT_RUNTIME, RUNTIMES
from iot_pipeline.resnet import DEFAULT_CARD
from iot_pipeline.runtime import configure_logging

log = logging.getLogger("iot_pipeline.ml_server")

OPTIONS: tuple[Option, ...] = (
    Option("weights", "IOT_ML_WEIGHTS",
           "a model card (*.card.json, or its weights file beside it), 'imagenet' (Keras "
           "download) or 'random' (tests only)", default=DEFAULT_CARD),
    Option("top_k", "IOT_ML_TOP_K", "labels returned per image", config.positive_int,
           default="5"),
    Option("max_batch", "IOT_ML_MAX_BATCH", "most images in one request", config.positive_int,
           default="64"),
    Option("max_request_bytes", "IOT_ML_MAX_REQUEST_BYTES", "largest request body",
           config.positive_int, default=str(16 * 1024 * 1024)),
    Option("runtime", "IOT_ML_RUNTIME",
           f"what runs the model: {', '.join(RUNTIMES)} (iot_pipeline.model)",
           default=DEFAULT_RUNTIME, check=lambda value: value in RUNTIMES,
           check_message=f"must be one of {', '.join(RUNTIMES)}"),
    Option("model_cache_dir", "IOT_ML_MODEL_CACHE_DIR",
           "directory the LiteRT conversion is kept in across restarts ('': convert at each start)",
           default=""),
    Option("tf_threads", "IOT_ML_TF_THREADS",
           "threads of one model call, TensorFlow or LiteRT (0: the cores the process may use)",
           config.non_negative_int, default="0"),
    Option("input_size", "IOT_ML_INPUT_SIZE",
           "input edge of the 'imagenet'/'random' models (a card sets its own)",
           config.positive_int, default="224"),
    Option("log_level", "IOT_LOG_LEVEL", "logging level", default="INFO"),
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Settings:
    weights: str = DEFAULT_CARD
    top_k: int = 5
    max_batch: int = 64
    max_request_bytes: int = 16 * 1024 * 1024
    runtime: str = DEFAULT_RUNTIME
    model_cache_dir: str = ""
    tf_threads: int = 0
    input_size: int = 224
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ=None) -> Settings:
        return cls(**config.load(OPTIONS, [], environ))


class Metrics:
    """The ML server's Prometheus series.

    Under gunicorn every worker is a process of its own: with PROMETHEUS_MULTIPROC_DIR set (the
    unit's runtime directory, empty at each start) prometheus_client keeps each worker's values
    in files there and /metrics sums the workers' counters and histograms, whichever worker
    answers the scrape; gunicorn_conf.py drops a dead worker's gauges. Without it (tests, a
    single process) the app's own registry is served.
    """

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.registry = CollectorRegistry()
        self.requests = Counter("iot_ml_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.images = Counter("iot_ml_images", "Images classified.", registry=self.registry)
        self.predict_seconds = Histogram("iot_ml_predict_seconds",
                                         "Seconds to classify one request's images.",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        # livemin: 1 only when every live worker has its model (one still loading answers 503).
        self.model_loaded = Gauge("iot_ml_model_loaded", "1 once the model answers, else 0.",
                                  multiprocess_mode="livemin", registry=self.registry)
        self.model_info = Gauge("iot_ml_model_info", "The loaded model's name and version (1).",
                                ["name", "version"], multiprocess_mode="livemax",
                                registry=self.registry)
        self.model_loaded.set(0)

    def observe(self, endpoint: str, status: int, images: int = 0,
                seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if images:
            self.images.inc(images)
        if seconds is not None:
            self.predict_seconds.observe(seconds)

    def loaded(self, name: str, version: str) -> None:
        self.model_info.labels(name, version).set(1)
        self.model_loaded.set(1)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """What a scrape gets and its content type: the format the Accept header asks for, as
        prometheus_client's own HTTP server chooses it for the other services."""
        registry = self.registry
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
        encode, content_type = choose_encoder(accept or "")
        return encode(registry), content_type


class BadRequest(Exception):
    def __init__(self, status: int, error: str, detail: str, index: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.index = status, error, detail, index


def _error(status: int, error: str, detail: str, index: int | None = None) -> tuple[Response, int]:
    body: dict[str, Any] = {"error": error, "detail": detail}
    if index is not None:
        body["index"] = index
    return jsonify(body), status


def _images_from(payload: Any, max_batch: int) -> list[np.ndarray]:
    if not isinstance(payload, dict):
        raise BadRequest(400, "bad_request", "body must be a JSON object")
    if "images" in payload:
        items = payload["images"]
        if not isinstance(items, list) or not items:
            raise BadRequest(400, "bad_request", "images must be a non-empty list")
    elif "image" in payload:
        items = [payload["image"]]
    else:
        raise BadRequest(400, "bad_request", "send 'image' or 'images' (base64 PNG/JPEG)")
    if len(items) > max_batch:
        raise BadRequest(413, "batch_too_large", f"{len(items)} images; at most {max_batch}")
    pixels = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise BadRequest(400, "bad_request", "each image must be a base64 string", index)
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, "bad_base64", "not valid base64", index) from None
        try:
            pixels.append(decode_image(data, max_pixels=MAX_IMAGE_PIXELS))
        except InvalidMessage as exc:
            raise BadRequest(422, exc.reason, exc.detail, index) from None
    return pixels


def _pixels_from(body: bytes, max_batch: int) -> np.ndarray:
    """An ``.npy`` body -> its (N, H, W, 3) uint8 array, or BadRequest."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadRequest(400, "bad_npy", f"not a .npy array: {str(exc)[:200]}") from None
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4 \
            or array.shape[-1] != 3:
        raise BadRequest(422, "bad_pixels", "the array must be (N, H, W, 3) uint8, not "
                         f"{getattr(array, 'shape', '?')} {getattr(array, 'dtype', '?')}")
    if not 1 <= len(array) <= max_batch:
        raise BadRequest(413 if len(array) else 400, "batch_too_large" if len(array)
                         else "bad_request", f"{len(array)} images; 1 to {max_batch}")
    if array.shape[1] * array.shape[2] > MAX_IMAGE_PIXELS or 0 in array.shape:
        raise BadRequest(422, "image_too_large", f"{array.shape[2]}x{array.shape[1]} pixels")
    return array


def _stack(pixels: Sequence[np.ndarray], size: int) -> np.ndarray:
    """One (N, H, W, 3) array; images of different sizes are first resized to the model's."""
    if all(p.shape == pixels[0].shape for p in pixels):
        return np.stack(pixels)
    from PIL import Image

    return np.stack([
        np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR))
        for p in pixels
    ])


def create_app(
    settings: Settings | None = None,
    classifier_factory: Callable[[Settings], Any] | None = None,
) -> Flask:
    """The WSGI app. ``classifier_factory`` builds the model (default: ResNet-50) in a thread."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    app = Flask("iot_pipeline.ml_server")
    # Werkzeug answers 413 from Content-Length alone, before reading the body.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    metrics = Metrics()
    state: dict[str, Any] = {"classifier": None, "error": None}
    predict_lock = threading.Lock()

    def build_model() -> None:
        try:
            if classifier_factory is not None:
                classifier = classifier_factory(settings)
            else:
                from iot_pipeline.model import Classifier

                classifier = Classifier(settings.weights, settings.input_size,
                                        settings.tf_threads, settings.runtime,
                                        settings.model_cache_dir)
        except Exception as exc:
            log.exception("model failed to load")
            state["error"] = str(exc)
            return
        # The gauges first: once /health says ok, a scrape sees the model loaded.
        metrics.loaded(classifier.name, str(getattr(classifier, "version", "") or ""))
        state["classifier"] = classifier

    threading.Thread(target=build_model, name="model-loader", daemon=True).start()

    @app.get("/health")
    def health():
        classifier = state["classifier"]
        if classifier is None:
            status = "failed" if state["error"] else "loading"
            return jsonify({"status": status, "error": state["error"]}), 503
        return jsonify({"status": "ok", "model": classifier.name,
                        "version": getattr(classifier, "version", ""),
                        "runtime": getattr(classifier, "runtime", ""),
                        "labels": len(getattr(classifier, "labels", ()))})

    @app.get("/metrics")
    def prometheus():
        body, content_type = metrics.exposition(request.headers.get("Accept"))
        return Response(body, content_type=content_type)

    @app.post("/predict")
    def predict():
        classifier = state["classifier"]
        if classifier is None:
            metrics.observe("predict", 503)
            return _error(503, "model_not_ready", state["error"] or "the model is loading")
        try:
            if request.mimetype == PIXELS_CONTENT_TYPE:
                batch = _pixels_from(request.get_data(), settings.max_batch)
                top_k = request.args.get("top_k", settings.top_k)
                try:
                    top_k = int(top_k)
                except ValueError:
                    top_k = None
            else:
                payload = request.get_json(silent=True)
                if payload is None:
                    raise BadRequest(400, "bad_json", "the body must be JSON (Content-Type: "
                                     f"application/json) or {PIXELS_CONTENT_TYPE} pixels")
                pixels = _images_from(payload, settings.max_batch)
                batch = _stack(pixels, settings.input_size)
                top_k = payload.get("top_k", settings.top_k)
            if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100:
                raise BadRequest(400, "bad_request", "top_k must be an integer from 1 to 100")
        except BadRequest as exc:
            metrics.observe("predict", exc.status)
            return _error(exc.status, exc.error, exc.detail, exc.index)
        with predict_lock:  # one batch at a time: the model already uses every core it is given
            # Timed inside the lock: a request waiting for the previous batch is not the model's.
            started = time.perf_counter()
            predictions = classifier.classify(batch, top_k)
            elapsed = time.perf_counter() - started
        metrics.observe("predict", 200, images=len(batch), seconds=elapsed)
        return jsonify({
            "model": classifier.name,
            # Per answer, so each result names the model that made it, also across a restart.
            "version": getattr(classifier, "version", ""),
            "predictions": [
                {"label": p.label, "score": p.score,
                 "top_k": [{"label": label, "score": score} for label, score in p.top_k]}
                for p in predictions
            ],
        })

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        metrics.observe(request.endpoint or "unknown", exc.code or 500)
        return _error(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or "")

    return app
