"""The model file formats: float16 weights by variable path, and model cards checked on load."""

import json

import numpy as np
import pytest

from iot_pipeline import resnet
from iot_pipeline.resnet import ModelError

LABELS = ["apple", "bee", "cat"]


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


def tiny(keras, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(5, name="hidden")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def card_for(weights_path, digest, **changes):
    card = {"name": "tiny", "architecture": "resnet50", "stem": "cifar", "input_size": 32,
            "labels": LABELS, "weights": weights_path.name, "sha256": digest,
            "test_top1": 0.5, "test_top5": 0.9}
    card.update(changes)
    return card


def test_weights_round_trip_in_float16(keras, tmp_path):
    source, target = tiny(keras, 1), tiny(keras, 2)
    path = tmp_path / "m.weights.npz"
    digest = resnet.save_weights(source, path)
    assert digest == resnet.sha256(path)
    with np.load(path) as stored:
        assert {stored[k].dtype for k in stored.files} == {np.dtype("float16")}
        assert set(stored.files) == {v.path for v in source.weights}  # BN statistics too
    resnet.load_weights(target, path, digest)
    for a, b in zip(source.weights, target.weights, strict=True):
        assert np.allclose(a.numpy(), b.numpy(), atol=2e-3, rtol=1e-3)


def test_load_refuses_wrong_sha256_missing_file_and_other_network(keras, tmp_path):
    model = tiny(keras)
    path = tmp_path / "m.weights.npz"
    resnet.save_weights(model, path)
    with pytest.raises(ModelError, match="sha256 differs"):
        resnet.load_weights(model, path, "0" * 64)
    with pytest.raises(ModelError, match="does not exist"):
        resnet.load_weights(model, tmp_path / "nope.weights.npz")
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(2, name="other")(inputs))
    with pytest.raises(ModelError, match="does not fit the model"):
        resnet.load_weights(other, path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a weights archive"):
        resnet.load_weights(model, tmp_path / "junk.npz")


@pytest.mark.parametrize(("change", "message"), [
    ({"sha256": None}, "lacks sha256"),
    ({"architecture": "vgg16"}, "architecture 'vgg16'"),
    ({"labels": []}, "labels must be a list"),
    ({"input_size": "32"}, "input_size must be a positive integer"),
])
def test_card_checks_name_the_file_and_the_problem(tmp_path, change, message):
    card = card_for(tmp_path / "m.weights.npz", "ab" * 32, **change)
    card = {k: v for k, v in card.items() if v is not None}
    path = tmp_path / "m.card.json"
    path.write_text(json.dumps(card))
    with pytest.raises(ModelError, match=message) as raised:
        resnet.load_card(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("version", ["", "v 2", "-v2", "x" * 65, 2, ["v2"]])
def test_a_card_version_must_be_short_and_plain(tmp_path, version):
    path = tmp_path / "m.card.json"
    path.write_text(json.dumps(card_for(tmp_path / "m.weights.npz", "ab" * 32,
                                        version=version)))
    with pytest.raises(ModelError, match="version must be"):
        resnet.load_card(path)


def test_the_model_version_is_the_cards_own_else_the_weights_sha256(tmp_path):
    card = card_for(tmp_path / "m.weights.npz", "ab" * 32)
    assert resnet.model_version(card) == "ab" * 6
    path = tmp_path / "m.card.json"
    path.write_text(json.dumps({**card, "version": "2026.12-r2+relabel"}))
    assert resnet.model_version(resnet.load_card(path)) == "2026.12-r2+relabel"


def test_card_missing_or_not_json(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resnet.load_card(tmp_path / "absent.card.json")
    (tmp_path / "bad.card.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not JSON"):
        resnet.load_card(tmp_path / "bad.card.json")


def test_card_lives_beside_its_weights(tmp_path):
    assert resnet.card_path_for(tmp_path / "a.weights.npz") == tmp_path / "a.card.json"
    assert resnet.card_path_for("x/resnet50-cifar100.weights.npz").name == \
        "resnet50-cifar100.card.json"


def test_top_k_accuracy():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    assert resnet.top_k_accuracy(probs, [1, 2, 0], 1) == pytest.approx(1 / 3)
    assert resnet.top_k_accuracy(probs, [1, 2, 0], 2) == pytest.approx(2 / 3)


def test_the_network_is_resnet50_with_a_small_image_stem(keras):
    model = resnet.build(100, 32, "cifar")
    blocks = [layer.name for layer in model.layers if layer.name.endswith("_add")]
    assert len(blocks) == 16  # 3 + 4 + 6 + 3 bottleneck blocks
    assert model.get_layer("conv1_conv").kernel_size == (3, 3)
    assert model.get_layer("conv5_block3_out").output.shape[1:] == (2, 2, 2048)
    assert model.output_shape == (None, 100)
    # Keras' ResNet-50 but for the stem: a 3x3 convolution without bias for its 7x7 with one.
    reference = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3), classes=100)
    assert model.count_params() - reference.count_params() == 64 * 3 * 9 - (64 * 3 * 49 + 64)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    probs = resnet.predict(model, pixels)
    assert probs.shape == (2, 100)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
