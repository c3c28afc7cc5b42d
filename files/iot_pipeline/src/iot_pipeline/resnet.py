"""ResNet-50 for CIFAR-100: the network, its weights file and its model card.

The network is Keras' ResNet-50 (``keras.applications.ResNet50``: bottleneck blocks 3-4-6-3,
64-128-256-512 filters, x4 expansion, post-activation, layer names as Keras names them) with
a stem for small images: the 7x7/2 convolution + 3x3/2 max-pool that takes ImageNet's 224 px
to 56 px becomes a 3x3/1 convolution + 3x3/2 max-pool, so a 32x32 image reaches the first
stage at 16x16 (ImageNet's stem would leave 8x8, and 1x1 at the last stage).  ``stem="imagenet"``
builds the unchanged Keras stem for comparison.  Pixels go in as uint8 (or floats 0..255):
scaling and the CIFAR-100 channel normalisation are layers of the model.

Weights travel as a ``.npz`` of float16 arrays keyed by the Keras variable path (45 MiB), with
a model card (JSON) beside it that names the architecture, input size, labels and the file's
sha256.  :func:`load_card` and :func:`load_weights` check both and raise :class:`ModelError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ARCHITECTURE = "resnet50"
STEMS = ("cifar", "imagenet")
BLOCKS = (3, 4, 6, 3)
FILTERS = (64, 128, 256, 512)
# Per-channel mean and std of the CIFAR-100 train split, in 0..255 pixel units.
CIFAR100_MEAN = (129.30, 124.07, 112.43)
CIFAR100_STD = (68.17, 65.39, 70.42)
# Where the ml_server role puts the repo's model (its card; the weights lie beside it).
DEFAULT_CARD = "/var/lib/iot-pipeline/models/resnet50-cifar100.card.json"
CARD_KEYS = ("architecture", "stem", "input_size", "labels", "weights", "sha256",
             "test_top1", "test_top5")
# A card's optional ``version``: it travels in every result message and row, so it is short and
# plain (messages.py would dead-letter a result whose text fields it refuses).
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


class ModelError(RuntimeError):
    """The model cannot be built, or its weights or card are missing or do not match."""


def build(
    num_classes: int = 100,
    input_size: int | None = 32,
    stem: str = "cifar",
    name: str = "resnet50_cifar",
):
    """The Keras model: uint8 pixels (N, H, W, 3) in, class probabilities (N, classes) out.

    ``input_size=None`` accepts any image size (the head is global average pooling).
    """
    import keras
    from keras import layers

    if stem not in STEMS:
        raise ModelError(f"stem must be one of {STEMS}, not {stem!r}")
    bn_axis = 3
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = layers.Rescaling(1.0, name="to_float")(inputs)
    x = layers.Normalization(
        mean=list(CIFAR100_MEAN), variance=[s * s for s in CIFAR100_STD], name="normalize"
    )(x)
    if stem == "cifar":
        x = layers.Conv2D(64, 3, padding="same", use_bias=False, name="conv1_conv")(x)
    else:
        x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
        x = layers.Conv2D(64, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = layers.BatchNormalization(axis=bn_axis, epsilon=1.001e-5, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    for stage, (blocks, filters) in enumerate(zip(BLOCKS, FILTERS, strict=True), start=2):
        for block in range(1, blocks + 1):
            stride = 2 if block == 1 and stage > 2 else 1
            x = _bottleneck(x, filters, stride, block == 1, f"conv{stage}_block{block}")

    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32",
                           name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _bottleneck(x, filters: int, stride: int, project: bool, name: str):
    """Keras' ``residual_block_v1``: 1x1 (stride) -> 3x3 -> 1x1 x4, projection shortcut."""
    from keras import layers

    if project:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, name=name + "_0_conv")(x)
        shortcut = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=name + "_0_bn")(
            shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(filters, 1, strides=stride, name=name + "_1_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=name + "_1_bn")(x)
    x = layers.Activation("relu", name=name + "_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="same", name=name + "_2_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=name + "_2_bn")(x)
    x = layers.Activation("relu", name=name + "_2_relu")(x)
    x = layers.Conv2D(4 * filters, 1, name=name + "_3_conv")(x)
    # Zero-initialised last BatchNorm scale: each block starts as the identity, which keeps a
    # short, high-learning-rate schedule stable (Goyal et al., 2017); the network is unchanged.
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, gamma_initializer="zeros",
                                  name=name + "_3_bn")(x)
    x = layers.Add(name=name + "_add")([shortcut, x])
    return layers.Activation("relu", name=name + "_out")(x)


# --- weights file ------------------------------------------------------------------------------

def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(model, path: str | Path, dtype: str = "float16") -> str:
    """Every variable of ``model`` (BatchNorm statistics included) as ``dtype``; returns sha256.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    arrays = {variable.path: np.asarray(variable.numpy(), dtype=dtype) for variable in
              model.weights}
    if len(arrays) != len(model.weights):
        raise ModelError("two variables of the model share a path; cannot save by name")
    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)
    partial.replace(path)
    return sha256(path)


def load_weights(model, path: str | Path, expected_sha256: str | None = None) -> None:
    """Set every variable of ``model`` from a file written by :func:`save_weights`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    if expected_sha256 and sha256(path) != expected_sha256:
        raise ModelError(f"weights file {str(path)!r}: sha256 differs from its model card")
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"weights file {str(path)!r} is not a weights archive: {exc}") from exc
    missing = [v.path for v in model.weights if v.path not in arrays]
    if missing:
        raise ModelError(
            f"weights file {str(path)!r} does not fit the model: {len(missing)} variables "
            f"missing, e.g. {missing[0]!r}")
    for variable in model.weights:
        value = arrays[variable.path]
        if tuple(value.shape) != tuple(variable.shape):
            raise ModelError(
                f"weights file {str(path)!r}: {variable.path} has shape {value.shape}, "
                f"the model needs {tuple(variable.shape)}")
        variable.assign(value.astype(variable.dtype))


# --- model card --------------------------------------------------------------------------------

def card_path_for(weights: str | Path) -> Path:
    """``x/model.weights.npz`` -> ``x/model.card.json`` (the card lives beside its weights)."""
    weights = Path(weights)
    stem = weights.name.split(".")[0]
    return weights.with_name(stem + ".card.json")


def write_card(path: str | Path, card: Mapping[str, Any]) -> None:
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ModelError(f"model card lacks {missing}")
    Path(path).write_text(json.dumps(card, indent=2) + "\n")


def load_card(path: str | Path) -> dict[str, Any]:
    """Read and check a model card; the message names the file and the problem."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"model card {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"model card {str(path)!r} is not JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelError(f"model card {str(path)!r} must be a JSON object")
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ModelError(f"model card {str(path)!r} lacks {', '.join(missing)}")
    if card["architecture"] != ARCHITECTURE or card["stem"] not in STEMS:
        raise ModelError(
            f"model card {str(path)!r}: architecture {card['architecture']!r} / stem "
            f"{card['stem']!r} unknown (this package builds {ARCHITECTURE} with {STEMS})")
    labels = card["labels"]
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        raise ModelError(f"model card {str(path)!r}: labels must be a list of names")
    if not (isinstance(card["input_size"], int) and card["input_size"] > 0):
        raise ModelError(f"model card {str(path)!r}: input_size must be a positive integer")
    version = card.get("version")
    if version is not None and not (isinstance(version, str)
                                    and VERSION_PATTERN.fullmatch(version)):
        raise ModelError(
            f"model card {str(path)!r}: version must be 1-64 letters, digits or ._+- "
            f"(starting with a letter or digit), not {version!r}")
    return card


def model_version(card: Mapping[str, Any]) -> str:
    """The version a card's model is served and recorded under: the card's own ``version``
    when it sets one, else the first 12 hex digits of its weights' sha256.

    A retrained model gets a new version by itself (new weights, new sha256); ``version`` is
    for a change the weights do not show (new labels or input size on the same weights), or a
    name of the operator's choosing.
    """
    return card.get("version") or card["sha256"][:12]


def model_from_card(card_path: str | Path, weights: str | Path | None = None):
    """(model, card) from a card and the weights it names (or ``weights``), sha256 checked."""
    card_path = Path(card_path)
    card = load_card(card_path)
    weights_path = Path(weights) if weights else card_path.parent / card["weights"]
    model = build(len(card["labels"]), card["input_size"], card["stem"])
    load_weights(model, weights_path, card["sha256"])
    return model, card


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if size == images.shape[1]:
        return images
    import tensorflow as tf
    return tf.cast(tf.image.resize(tf.cast(images, tf.float32), (size, size)), tf.uint8).numpy()


def predict(model, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Class probabilities of ``images`` (N, H, W, 3) uint8, in fixed-size batches."""
    import tensorflow as tf

    size = model.input_shape[1]
    forward = getattr(model, "_iot_forward", None)
    if forward is None:  # one traced graph per model, reused by every call
        forward = tf.function(lambda batch: model(batch, training=False),
                              reduce_retracing=True)
        model._iot_forward = forward

    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if size and batch.shape[1] != size:
            batch = _resize(batch, size)
        out.append(np.asarray(forward(tf.constant(batch)), dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def top_k_accuracy(probabilities: np.ndarray, labels: Sequence[int], k: int) -> float:
    labels = np.asarray(labels)
    best = np.argsort(-probabilities, axis=1)[:, :k]
    return float(np.mean(np.any(best == labels[:, None], axis=1)))
