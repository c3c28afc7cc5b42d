"""ML host: the Keras ResNet-50 classifier behind the ML server, called as one compiled graph.

CIFAR images (32x32) are resized to the model's input inside the graph, so a batch of raw
uint8 pixels goes in and class probabilities come out in one call; ``model.predict`` is
avoided because its per-call set-up costs more than a whole small batch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000


class ModelError(RuntimeError):
    """The model cannot be built or its weights cannot be loaded."""


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
    """ResNet-50 with ImageNet, file or random weights; thread-safe ``classify``."""

    def __init__(self, weights: str = "none", input_size: int = 224, tf_threads: int = 0) -> None:
        if tf_threads:
            os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(tf_threads))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        if tf_threads:
            tf.config.threading.set_intra_op_parallelism_threads(tf_threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        started = time.monotonic()
        self.input_size = input_size
        self.labels = imagenet_labels()
        if weights == "imagenet":
            keras_weights, self.name = "imagenet", "resnet50-imagenet"
        elif weights == "none":
            keras_weights, self.name = None, "resnet50-random"
        else:
            path = Path(weights)
            if not path.is_file():
                raise ModelError(f"weights file {weights!r} does not exist")
            keras_weights, self.name = str(path), f"resnet50-{path.name.split('.')[0]}"
        try:
            model = keras.applications.ResNet50(
                weights=keras_weights, input_shape=(input_size, input_size, 3),
                classes=IMAGENET_CLASSES,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load ResNet-50 weights {weights!r}: {exc}") from exc
        preprocess = keras.applications.resnet50.preprocess_input
        size = (input_size, input_size)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
                     jit_compile=False)
        def forward(pixels):
            x = tf.image.resize(tf.cast(pixels, tf.float32), size, method="bilinear")
            return model(preprocess(x), training=False)

        self._forward = forward
        # Trace and warm up once so the first request does not pay for it.
        self._forward(np.zeros((1, 32, 32, 3), np.uint8))
        self.load_seconds = time.monotonic() - started
        log.info("model %s ready in %.1fs", self.name, self.load_seconds)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 1000) float32 probabilities."""
        return self._forward(pixels).numpy()

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
