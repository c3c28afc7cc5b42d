"""The simulator's PNG cache (encoded once, kept on disk) and its pacing at a set rate."""

import json
import logging
import time

import numpy as np
import pytest

from iot_pipeline import dataset, messages, simulator
from iot_pipeline.runtime import StopFlag


def small_dataset(count=50, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return dataset.Dataset(images, np.arange(count) % 3, ("a", "b", "c"))


def test_pngs_are_lossless_and_read_back_from_the_cache(tmp_path):
    data = small_dataset()
    first = simulator.PngCache(data, tmp_path)
    assert first.path.exists()
    for index in (0, 17, 49):
        np.testing.assert_array_equal(messages.decode_image(first[index]), data.images[index])
    written = first.path.stat().st_mtime_ns
    second = simulator.PngCache(data, tmp_path)
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == written  # read, not written again
    assert second.blobs == first.blobs


def test_another_dataset_gets_its_own_file(tmp_path):
    a = simulator.PngCache(small_dataset(seed=1), tmp_path)
    b = simulator.PngCache(small_dataset(seed=2), tmp_path)
    assert a.path != b.path
    np.testing.assert_array_equal(messages.decode_image(b[3]), small_dataset(seed=2).images[3])


@pytest.mark.parametrize("damage", [b"not a zip", None])
def test_a_damaged_or_mismatched_cache_is_encoded_again(tmp_path, caplog, damage):
    data = small_dataset()
    path = simulator.PngCache(data, tmp_path).path
    if damage is None:  # a readable file whose offsets do not fit this dataset
        np.savez(path, blob=np.zeros(10, np.uint8), offsets=np.array([0, 10]))
    else:
        path.write_bytes(damage)
    with caplog.at_level(logging.WARNING):
        again = simulator.PngCache(data, tmp_path)
    assert "encoding the PNGs again" in caplog.text
    np.testing.assert_array_equal(messages.decode_image(again[7]), data.images[7])
    assert simulator.PngCache(data, tmp_path).blobs == again.blobs  # rewritten, readable


def test_an_unwritable_directory_still_gives_the_pngs(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the directory should be")
    data = small_dataset()
    with caplog.at_level(logging.WARNING):
        pngs = simulator.PngCache(data, blocked / "png")
    assert "PNGs not cached" in caplog.text
    np.testing.assert_array_equal(messages.decode_image(pngs[0]), data.images[0])


class CountingStop(StopFlag):
    def __init__(self):
        super().__init__()
        self.waits = 0

    def wait(self, seconds):
        self.waits += 1
        return super().wait(seconds)


class Producer:
    def __init__(self):
        self.sent = []

    def send(self, topic, key, value):
        self.sent.append(json.loads(value))
        return Future()

    def flush(self):
        pass


class Future:
    def add_callback(self, fn):
        fn(None)

    def add_errback(self, fn):
        pass


def run(rate, count, data, pngs=None):
    settings = simulator.load_settings(
        ["--count", str(count), "--rate", str(rate), "--seed", "1"],
        {"IOT_KAFKA_BOOTSTRAP_SERVERS": "kafka.invalid:9092", "IOT_SIM_DATASET": "unused"})
    stop, producer = CountingStop(), Producer()
    started = time.monotonic()
    simulator.Simulator(settings, stop, data, pngs).run(producer, simulator.Tally(None))
    return producer.sent, stop.waits, time.monotonic() - started


def test_a_fast_rate_sends_per_tick_and_keeps_the_rate(tmp_path):
    data = small_dataset()
    sent, waits, elapsed = run(1000, 300, data, simulator.PngCache(data, tmp_path))
    assert len(sent) == 300
    # 300 images at 1000/s: never ahead of the rate, in ~30 ticks of 10 ms, not 300 sleeps.
    assert elapsed >= 0.299 * (1 - 1e-3)
    assert waits <= 300 * 0.001 / simulator.TICK_S + 2
    assert {m["ground_truth"] for m in sent} <= {"a", "b", "c"}
    index = {bytes(messages.encode_png(img)): i for i, img in enumerate(data.images)}
    for message in sent[:20]:  # each message carries its image and that image's label
        png = messages.decode(json.dumps(message).encode()).image_png
        assert data.label(index[png]) == message["ground_truth"]


def test_a_slow_rate_still_sends_one_image_per_wake_up():
    data = small_dataset()
    sent, waits, elapsed = run(50, 10, data)
    assert len(sent) == 10
    assert waits >= 9  # one sleep before each image after the first
    assert elapsed >= 9 / 50 * (1 - 1e-3)
