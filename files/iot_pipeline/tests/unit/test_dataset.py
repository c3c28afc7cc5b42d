import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from iot_pipeline import dataset

SHARED = Path(os.environ.get(
    "IOT_TEST_CIFAR_DIR", Path(__file__).resolve().parents[5] / "shared/datasets/cifar-100"))


def test_the_official_archive_layout_is_read_with_pixels_in_rgb_order(tmp_path):
    # Two images in the official row format: R plane, G plane, B plane.
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(2, 3072)
    batch = {b"data": rows, b"fine_labels": [1, 0], b"coarse_labels": [0, 0]}
    meta = {b"fine_label_names": [b"apple", b"aquarium_fish"], b"coarse_label_names": [b"x"]}
    archive = tmp_path / dataset.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        for name, obj in (("test", batch), ("meta", meta)):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loaded = dataset.load(str(archive), "test")
    assert np.array_equal(loaded.images, images)
    assert [loaded.label(0), loaded.label(1)] == ["aquarium_fish", "apple"]
    # The same archive found through its directory.
    assert len(dataset.load(str(tmp_path), "test")) == 2


def test_the_npz_layout_is_read(tmp_path):
    images = np.zeros((3, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "test.npz", images=images, fine_labels=np.array([2, 1, 0], np.uint8))
    (tmp_path / "meta.json").write_text(json.dumps({"fine_label_names": ["a", "b", "c"]}))
    loaded = dataset.load(str(tmp_path), "test")
    assert [loaded.label(i) for i in range(3)] == ["c", "b", "a"]


def test_a_missing_dataset_says_what_was_expected(tmp_path):
    with pytest.raises(dataset.DatasetError, match=r"test\.npz"):
        dataset.load(str(tmp_path), "test")


def test_download_refuses_a_file_whose_md5_does_not_match(tmp_path):
    source = tmp_path / "fake.tar.gz"
    source.write_bytes(b"not the archive")
    with pytest.raises(dataset.DatasetError, match="MD5"):
        dataset.download(tmp_path / "cache", url=source.as_uri())
    assert not (tmp_path / "cache" / dataset.ARCHIVE_NAME).exists()


def test_the_real_cifar100_test_split_has_100_images_per_class():
    assert SHARED.is_dir(), f"real CIFAR-100 expected at {SHARED} (set IOT_TEST_CIFAR_DIR)"
    loaded = dataset.load(str(SHARED), "test")
    assert loaded.images.shape == (10000, 32, 32, 3)
    assert np.bincount(loaded.labels).tolist() == [100] * 100
    assert loaded.label_names[0] == "apple"
