"""CIFAR-100 for the simulator: the official archive (downloaded or local) or the .npz layout.

Sources :func:`load` understands:

* ``download``: the official ``cifar-100-python.tar.gz`` from the University of Toronto, kept in
  a cache directory and checked against its published MD5 before use;
* a path to that archive, or to the directory it extracts to (``cifar-100-python/``);
* a directory holding ``train.npz`` / ``test.npz`` and ``meta.json`` (``images`` uint8 NHWC,
  ``fine_labels``; ``fine_label_names``), the layout used for offline runs and tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
OFFICIAL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
SPLITS = ("train", "test")


class DatasetError(RuntimeError):
    """The dataset cannot be found, downloaded or read."""


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray  # (N,) fine label indices
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> str:
        return self.label_names[int(self.labels[index])]


def load(
    source: str, split: str = "test", cache_dir: str | Path = "~/.cache/iot-pipeline"
) -> Dataset:
    """Read one split of CIFAR-100 from ``source`` (see the module docstring)."""
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, not {split!r}")
    if source == "download":
        return _from_official_archive(download(cache_dir), split)
    path = Path(source).expanduser()
    if path.is_file():
        return _from_official_archive(path, split)
    if (path / f"{split}.npz").is_file():
        return _from_npz(path, split)
    for candidate in (path, path / "cifar-100-python"):
        if (candidate / split).is_file() and (candidate / "meta").is_file():
            return _from_pickles(candidate, split)
    if (path / ARCHIVE_NAME).is_file():
        return _from_official_archive(path / ARCHIVE_NAME, split)
    raise DatasetError(
        f"no CIFAR-100 found at {source!r}: expected {split}.npz + meta.json, "
        f"{ARCHIVE_NAME}, or the cifar-100-python/ directory (or use 'download')"
    )


def download(cache_dir: str | Path, url: str = OFFICIAL_URL, md5: str = OFFICIAL_MD5) -> Path:
    """Fetch the official archive once into ``cache_dir``; verify its MD5 every time."""
    target = Path(cache_dir).expanduser() / ARCHIVE_NAME
    if not target.is_file() or _md5(target) != md5:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        log.info("downloading %s to %s", url, target)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:  # noqa: S310 - fixed https URL
                shutil.copyfileobj(response, out, length=1 << 20)
        except OSError as exc:
            raise DatasetError(f"cannot download {url}: {exc}") from exc
        got = _md5(partial)
        if got != md5:
            partial.unlink(missing_ok=True)
            raise DatasetError(f"{url}: MD5 {got} does not match the published {md5}")
        partial.replace(target)
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - the checksum the dataset's authors publish
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _from_npz(directory: Path, split: str) -> Dataset:
    with np.load(directory / f"{split}.npz", allow_pickle=False) as arrays:
        images = np.ascontiguousarray(arrays["images"], dtype=np.uint8)
        labels = np.asarray(arrays["fine_labels"], dtype=np.int64)
    meta = json.loads((directory / "meta.json").read_text())
    return _checked(images, labels, tuple(meta["fine_label_names"]), str(directory))


def _from_pickles(directory: Path, split: str) -> Dataset:
    with (directory / split).open("rb") as handle:
        batch = pickle.load(handle, encoding="bytes")  # noqa: S301
    with (directory / "meta").open("rb") as handle:
        meta = pickle.load(handle, encoding="bytes")  # noqa: S301
    return _from_official_dicts(batch, meta, str(directory))


def _from_official_archive(archive: Path, split: str) -> Dataset:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            batch = pickle.load(tar.extractfile(f"cifar-100-python/{split}"), encoding="bytes")  # noqa: S301
            meta = pickle.load(tar.extractfile("cifar-100-python/meta"), encoding="bytes")  # noqa: S301
    except (OSError, KeyError, tarfile.TarError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"{archive}: not a readable CIFAR-100 archive ({exc})") from exc
    return _from_official_dicts(batch, meta, str(archive))


def _from_official_dicts(batch: dict, meta: dict, where: str) -> Dataset:
    # The official rows are 3072 bytes: the red plane, then green, then blue, each 32x32.
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
    names = tuple(name.decode("utf-8") for name in meta[b"fine_label_names"])
    return _checked(images, labels, names, where)


def _checked(images: np.ndarray, labels: np.ndarray, names: tuple[str, ...], where: str) -> Dataset:
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DatasetError(f"{where}: images have shape {images.shape}, expected (N, 32, 32, 3)")
    if len(images) != len(labels) or len(images) == 0:
        raise DatasetError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= len(names):
        raise DatasetError(f"{where}: labels outside the {len(names)} label names")
    return Dataset(images, labels, names)
