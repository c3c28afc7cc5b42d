"""The runtimes the ML server can run the committed model with (iot_pipeline.model): LiteRT with
int8 or float32 weights classifies the CIFAR-100 test images as TensorFlow does, an image's
answer does not depend on the batch it came in, and the conversion is cached across loads."""

import logging
from pathlib import Path

import numpy as np
import pytest

from iot_pipeline import evaluate, resnet
from iot_pipeline.config import ConfigError
from iot_pipeline.ml_server import Settings
from iot_pipeline.model import Classifier

from harness import CIFAR_DIR

CARD = Path(__file__).resolve().parents[3] / "models" / "resnet50-cifar100.card.json"


def test_an_unknown_runtime_is_refused_before_anything_loads():
    with pytest.raises(resnet.ModelError, match="unknown runtime 'onnx'"):
        Classifier(str(CARD), runtime="onnx")
    with pytest.raises(ConfigError, match="IOT_ML_RUNTIME='onnx': must be one of litert-int8"):
        Settings.from_env({"IOT_ML_RUNTIME": "onnx"})
    assert Settings.from_env({}).runtime == "litert-int8"


@pytest.fixture(scope="module")
def tensorflow_scores():
    return evaluate.evaluate(CARD, str(CIFAR_DIR), limit=1000, runtime="tensorflow")


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["litert-int8", "litert"])
def test_litert_scores_the_test_images_as_tensorflow_does(runtime, tensorflow_scores):
    scores = evaluate.evaluate(CARD, str(CIFAR_DIR), limit=1000, runtime=runtime)
    assert scores["runtime"] == runtime
    assert scores["images"] == 1000
    assert abs(scores["top1"] - tensorflow_scores["top1"]) <= 0.01
    assert abs(scores["top5"] - tensorflow_scores["top5"]) <= 0.01
    # Not one class moves much: int8 weights do not cost some classes their accuracy.
    moved = [abs(scores["per_class_top1"][name] - top1)
             for name, top1 in tensorflow_scores["per_class_top1"].items()]
    assert max(moved) <= 0.2  # 10 images per class: 0.2 is two images


@pytest.mark.slow
def test_litert_int8_answers_an_image_alike_in_any_batch_and_caches_its_conversion(
        tmp_path, caplog):
    images = np.load(CIFAR_DIR / "test.npz")["images"][::500]  # 20 images, 20 classes
    caplog.set_level(logging.INFO, logger="iot_pipeline.model")
    first = Classifier(str(CARD), tf_threads=2, cache_dir=str(tmp_path))
    assert first.runtime == "litert-int8"
    assert "converted to LiteRT (int8 weights" in caplog.text
    batched = first.probabilities(images)
    alone = np.concatenate([first.probabilities(image[None]) for image in images])
    # Activations are quantized per image, so neighbours in a batch change nothing.
    np.testing.assert_array_equal(batched, alone)
    assert np.allclose(batched.sum(axis=1), 1.0, atol=1e-3)
    cached = list(tmp_path.glob("*.tflite"))
    assert len(cached) == 1
    assert cached[0].stat().st_size < 30_000_000  # int8 weights: a quarter of float32

    caplog.clear()
    second = Classifier(str(CARD), tf_threads=2, cache_dir=str(tmp_path))
    assert "loaded from the cache" in caplog.text
    assert "converted to LiteRT" not in caplog.text
    np.testing.assert_array_equal(second.probabilities(images), batched)

    cached[0].write_bytes(b"not a flatbuffer")
    caplog.clear()
    third = Classifier(str(CARD), tf_threads=2, cache_dir=str(tmp_path))
    assert "ignoring the cached LiteRT model" in caplog.text
    np.testing.assert_array_equal(third.probabilities(images), batched)
    assert cached[0].stat().st_size > 1_000_000  # converted again and cached again
