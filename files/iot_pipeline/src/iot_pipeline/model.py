"""ML host: the classifier behind the ML server, called as one compiled graph.

Three kinds of model, chosen by ``weights``:

* a **model card** path (``*.card.json``, the default): the repo's CIFAR-100 ResNet-50 (or a
  user's own weights of the same network), built from the card at the card's input size, its
  weights checked against the card's sha256; answers the card's labels (CIFAR-100 names);
* ``imagenet``: Keras' ImageNet ResNet-50 (downloads its weights once; needs internet), at
  ``input_size`` (224), CIFAR images resized to it inside the graph; ImageNet labels;
* ``random``: the same ImageNet-shaped network with random weights, for tests only.

A batch of raw uint8 pixels goes in and class probabilities come out in one ``tf.function``
call; ``model.predict`` is avoided because its per-call set-up costs more than a small batch.
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

from iot_pipeline import resnet
from iot_pipeline.resnet import DEFAULT_CARD, ModelError

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000


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
                 tf_threads: int = 0) -> None:
        if tf_threads:
            os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(tf_threads))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        if tf_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(tf_threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # TensorFlow already ran in this process: its threads stay
                log.warning("TensorFlow is initialised already; tf_threads=%d not applied",
                            tf_threads)
        started = time.monotonic()
        self.card: dict | None = None
        if weights in {"imagenet", "random", "none"}:
            model, preprocess = self._imagenet_shaped(keras, weights, input_size)
        else:
            model, preprocess = self._from_card(weights)
        self.input_size = model.input_shape[1]
        size = (self.input_size, self.input_size)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
                     jit_compile=False)
        def forward(pixels):
            x = tf.cast(pixels, tf.float32)
            x = tf.cond(tf.reduce_all(tf.shape(x)[1:3] == size), lambda: x,
                        lambda: tf.image.resize(x, size, method="bilinear"))
            return model(preprocess(x), training=False)

        self._forward = forward
        # Trace and warm up once so the first request does not pay for it.
        self._forward(np.zeros((1, 32, 32, 3), np.uint8))
        self.load_seconds = time.monotonic() - started
        log.info("model %s (version %s, %d labels, %d px) ready in %.1fs", self.name,
                 self.version, len(self.labels), self.input_size, self.load_seconds)

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
