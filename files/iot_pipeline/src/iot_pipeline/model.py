"""ML host: the classifier behind the ML server, called as one compiled graph.

Three kinds of model, chosen by ``weights``:

* a **model card** path (``*.card.json``, the default): the repo's CIFAR-100 ResNet-50 (or a
  user's own weights of the same network), built from the card at the card's input size, its
  weights checked against the card's sha256; answers the card's labels (CIFAR-100 names);
* ``imagenet``: Keras' ImageNet ResNet-50 (downloads its weights once; needs internet), at
  ``input_size`` (224), CIFAR images resized to it inside the graph; ImageNet labels;
* ``random``: the same ImageNet-shaped network with random weights, for tests only.

A batch of raw uint8 pixels goes in and class probabilities come out in one call. Three
runtimes run it (``runtime``, the ML server's ``IOT_ML_RUNTIME``):

* ``litert-int8`` (the default): the Keras model converted once at load to a LiteRT (TFLite)
  flatbuffer with dynamic-range int8 weights (``tf.lite.Optimize.DEFAULT``; activations stay
  float, quantized per image), run by the LiteRT interpreter with its XNNPACK CPU kernels.
  On the repo's model, one thread: ~2.5 CPU-ms per image at any batch size, against ~23 / 11
  / 7 for TensorFlow at batch 1 / 8 / 64, and the same test top-1 (62.75 % vs 62.74 %:
  files/models/README.md; ``make bench-model`` measures all three);
* ``litert``: the same with float32 weights (~9 / 7 / 7.5 CPU-ms at batch 1 / 8 / 64);
* ``tensorflow``: one ``tf.function`` (``model.predict`` is avoided because its per-call set-up
  costs more than a small batch).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from iot_pipeline import resnet
from iot_pipeline.resnet import DEFAULT_CARD, ModelError
from iot_pipeline.runtime import usable_cpus

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000
RUNTIMES = ("litert-int8", "litert", "tensorflow")
DEFAULT_RUNTIME = "litert-int8"


def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in the model's output order (shipped with the package)."""
    text = resources.files("iot_pipeline").joinpath("data/imagenet_classes.json").read_text()
    return tuple(name for _wnid, name in json.loads(text))


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    top_k: tuple[tuple[str, float], ...]


class Classifier:
    """A model card's ResNet-50, or the ImageNet-shaped one; thread-safe ``classify``."""

    def __init__(self, weights: str = DEFAULT_CARD, input_size: int = 224,
                 tf_threads: int = 0, runtime: str = DEFAULT_RUNTIME,
                 cache_dir: str = "") -> None:
        if runtime not in RUNTIMES:
            raise ModelError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
        # 0: the cores this process may use (its cpuset, capped by a cgroup CPU quota).
        threads = tf_threads or usable_cpus()
        limited = bool(tf_threads) or threads < (os.cpu_count() or 1)
        if limited:
            os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        if limited:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # TensorFlow already ran in this process: its threads stay
                log.warning("TensorFlow is initialised already; %d threads not applied", threads)
        started = time.monotonic()
        self.card: dict | None = None
        if weights in {"imagenet", "random", "none"}:
            model, preprocess = self._imagenet_shaped(keras, weights, input_size)
        else:
            model, preprocess = self._from_card(weights)
        self.input_size = model.input_shape[1]
        self.runtime = runtime
        self.threads = threads
        self._forward = forward_function(model, preprocess, runtime, threads, cache_dir)
        # Trace and warm up once so the first request does not pay for it.
        self._forward(np.zeros((1, 32, 32, 3), np.uint8))
        self.load_seconds = time.monotonic() - started
        log.info("model %s (version %s, %d labels, %d px, %s, %d threads) ready in %.1fs",
                 self.name, self.version, len(self.labels), self.input_size, runtime, threads,
                 self.load_seconds)

    def _imagenet_shaped(self, keras, weights: str, input_size: int):
        self.labels = imagenet_labels()
        if weights == "imagenet":
            self.name, self.version = "resnet50-imagenet", "keras-imagenet"
        else:
            self.name, self.version = "resnet50-random", "random"
        try:
            model = keras.applications.ResNet50(
                weights="imagenet" if weights == "imagenet" else None,
                input_shape=(input_size, input_size, 3), classes=IMAGENET_CLASSES,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load ResNet-50 weights {weights!r}: {exc}") from exc
        return model, keras.applications.resnet50.preprocess_input

    def _from_card(self, weights: str):
        """``weights``: a model card, or a weights file with its card beside it."""
        path = Path(weights)
        card_path = path if path.name.endswith(".card.json") else resnet.card_path_for(path)
        model, card = resnet.model_from_card(
            card_path, None if path == card_path else path)
        self.card = card
        self.labels = tuple(card["labels"])
        self.name = card.get("name") or card_path.name.removesuffix(".card.json")
        self.version = resnet.model_version(card)
        return model, lambda x: x  # scaling and normalisation are layers of the model

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, classes) float32 probabilities."""
        return self._forward(pixels)

    def classify(self, pixels: np.ndarray, top_k: int = 5) -> list[Prediction]:
        probs = self.probabilities(pixels)
        k = max(1, min(top_k, probs.shape[1]))
        best = np.argsort(-probs, axis=1)[:, :k]
        return [
            Prediction(
                label=self.labels[row[0]],
                score=float(p[row[0]]),
                top_k=tuple((self.labels[i], float(p[i])) for i in row),
            )
            for p, row in zip(probs, best, strict=True)
        ]


def forward_function(model, preprocess=None, runtime: str = DEFAULT_RUNTIME,
                     threads: int = 0, cache_dir: str = "") -> Callable[[np.ndarray], np.ndarray]:
    """``model`` (Keras) as a function (N, H, W, 3) uint8 -> (N, classes) float32 probabilities,
    run by ``runtime``; images of another size are resized to the model's input first.

    ``cache_dir`` (LiteRT): keep the converted model there, under a hash of its weights, the
    runtime and the TensorFlow version, so a restart loads it in a second instead of converting
    again (~15 s on 2 cores); "" converts at every load."""
    import tensorflow as tf

    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    size = (model.input_shape[1], model.input_shape[2])
    preprocess = preprocess or (lambda x: x)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
                 jit_compile=False)
    def to_input(pixels):
        x = tf.cast(pixels, tf.float32)
        x = tf.cond(tf.reduce_all(tf.shape(x)[1:3] == size), lambda: x,
                    lambda: tf.image.resize(x, size, method="bilinear"))
        return preprocess(x)

    if runtime == "tensorflow":
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
                     jit_compile=False)
        def forward(pixels):
            return model(to_input(pixels), training=False)

        return lambda pixels: forward(pixels).numpy()
    return _LiteRT(tf, model, to_input, quantize=runtime == "litert-int8",
                   threads=threads or usable_cpus(), cache_dir=cache_dir)


class _LiteRT:
    """A Keras model converted to LiteRT and run by one interpreter; calls are serialised.

    The interpreter has one input shape at a time: a batch of another size resizes it first,
    which costs well under a millisecond once the arena has grown to the largest batch seen.
    """

    def __init__(self, tf, model, to_input, quantize: bool, threads: int,
                 cache_dir: str = "") -> None:
        import threading

        from ai_edge_litert.interpreter import Interpreter

        cached = _cache_path(tf, model, quantize, cache_dir) if cache_dir else None
        flatbuffer = None
        if cached is not None and cached.is_file():
            flatbuffer = cached.read_bytes()
            try:
                self._interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
                log.info("LiteRT model loaded from the cache %s", cached)
            except (ValueError, RuntimeError) as exc:  # damaged: convert again
                log.warning("ignoring the cached LiteRT model %s: %s", cached, exc)
                flatbuffer = None
        if flatbuffer is None:
            flatbuffer = _convert(tf, model, quantize)
            self._interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
            if cached is not None:
                _write_atomically(cached, flatbuffer)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._to_input = to_input
        self._batch = 0
        self._lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        x = self._to_input(pixels).numpy()
        with self._lock:
            if len(x) != self._batch:
                self._interpreter.resize_tensor_input(self._input, list(x.shape))
                self._interpreter.allocate_tensors()
                self._batch = len(x)
            self._interpreter.set_tensor(self._input, x)
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output).copy()


def _convert(tf, model, quantize: bool) -> bytes:
    started = time.monotonic()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights, float math
    printed = io.StringIO()  # Keras prints the saved signature: kept off stdout (iot-evaluate's)
    try:
        with contextlib.redirect_stdout(printed):
            flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises many kinds; all mean "cannot serve"
        raise ModelError(f"cannot convert the model to LiteRT: {exc}") from exc
    log.debug("converter output: %s", printed.getvalue())
    log.info("converted to LiteRT (%s weights, %.1f MB) in %.1fs",
             "int8" if quantize else "float32", len(flatbuffer) / 1e6, time.monotonic() - started)
    return flatbuffer


def _cache_path(tf, model, quantize: bool, cache_dir: str) -> Path:
    """Where the conversion of exactly these weights, by this TensorFlow, is kept."""
    digest = hashlib.sha256()
    digest.update(f"{tf.__version__} {'int8' if quantize else 'float32'} "
                  f"{model.input_shape}".encode())
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return Path(cache_dir) / f"{model.name}-{digest.hexdigest()[:16]}.tflite"


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.replace(path)
        # One conversion per model name is kept: a rolled-out model's old one goes.
        for old in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.tflite"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:  # a read-only or full disk costs the next start time, nothing else
        log.warning("cannot cache the LiteRT model in %s: %s", path.parent, exc)
