"""Simulator host: many simulated IoT devices sending CIFAR-100 images to the images topic.

Devices take turns at a fixed overall rate (or as fast as Kafka acknowledges): message i comes
from device ``i mod devices``. Every message carries a fresh unique id (its record key) and the
image's true label. Above 1 / ``TICK_S`` images/s the images due within one tick go out
together, as devices sending on their own clocks would: one wake-up and one produce request per
tick instead of one per image, at the same average rate.

The split's PNGs are encoded once and kept in the cache directory (:class:`PngCache`), so a run
spends no time encoding: a run of a few thousand images touches each image about once.

Its Prometheus metrics (images sent, acknowledged from the producer's callback, failed, and the
send-to-ack latency) are served on IOT_METRICS_ADDRESS:IOT_METRICS_PORT while it runs; a finite
IOT_SIM_COUNT takes the endpoint down with the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from iot_pipeline import config, dataset, kafka_io, messages, metrics
from iot_pipeline.config import ConfigError, KafkaSettings, MetricsSettings, Option
from iot_pipeline.runtime import StopFlag, configure_logging

log = logging.getLogger("iot_pipeline.simulator")

# Shortest sleep between sends at a set rate: images due meanwhile are sent together.
TICK_S = 0.01

OPTIONS: tuple[Option, ...] = (
    *config.KAFKA_OPTIONS,
    Option("log_level", "IOT_LOG_LEVEL", "logging level", default="INFO"),
    Option("devices", "IOT_SIM_DEVICES", "number of simulated devices", config.positive_int,
           default="10"),
    Option("rate", "IOT_SIM_RATE", "images per second over all devices (0: as fast as possible)",
           config.non_negative_float, default="20"),
    Option("count", "IOT_SIM_COUNT", "images to send, then exit (0: forever)",
           config.non_negative_int, default="0"),
    Option("dataset", "IOT_SIM_DATASET",
           "directory with test.npz + meta.json, the official archive or its directory, "
           "or 'download'", default="download"),
    Option("split", "IOT_SIM_SPLIT", "train or test", default="test",
           check=lambda v: v in dataset.SPLITS, check_message="must be train or test"),
    Option("cache_dir", "IOT_SIM_CACHE_DIR",
           "where a downloaded archive and the split's encoded PNGs are kept",
           default="~/.cache/iot-pipeline"),
    Option("seed", "IOT_SIM_SEED", "seed of the image order (default: random)", int,
           default=None),
    Option("ack_log", "IOT_SIM_ACK_LOG",
           "file to append the unique id of every acknowledged image to (for checkers)",
           default=None),
    Option("progress_s", "IOT_SIM_PROGRESS_S", "seconds between progress lines",
           config.non_negative_float, default="5"),
    Option("linger_ms", "IOT_SIM_LINGER_MS",
           "milliseconds the producer waits to fill a request (kafka-python linger_ms)",
           config.non_negative_int, default="5"),
    *config.metrics_options(9101),
)


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings
    devices: int
    rate: float
    count: int
    dataset: str
    split: str
    cache_dir: str
    seed: int | None
    ack_log: str | None
    progress_s: float
    linger_ms: int = 5
    log_level: str = "INFO"
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


def load_settings(argv: Sequence[str] | None = None, environ=None) -> Settings:
    values = config.load(OPTIONS, argv, environ, prog="iot-simulator",
                         description=__doc__.splitlines()[0])
    fields = {k: values[k] for k in Settings.__dataclass_fields__ if k not in ("kafka", "metrics")}
    return Settings(kafka=config.kafka_settings(values), metrics=config.metrics_settings(values),
                    **fields)


class Metrics:
    """The simulator's Prometheus series (served while it runs)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter("iot_simulator_images_sent", "Images handed to the Kafka producer.",
                            registry=registry)
        self.acked = Counter("iot_simulator_images_acked",
                             "Images Kafka acknowledged (acks=all).", registry=registry)
        self.failed = Counter("iot_simulator_images_failed",
                              "Images Kafka did not acknowledge (delivery timed out or refused).",
                              registry=registry)
        self.send_latency = Histogram(
            "iot_simulator_send_latency_seconds",
            "Seconds from handing an image to the producer to Kafka's acknowledgement.",
            buckets=metrics.LATENCY_BUCKETS, registry=registry)


class Tally:
    """Acknowledgements and failures, updated from the producer's I/O thread."""

    def __init__(self, ack_log: TextIO | None, counters: Metrics | None = None) -> None:
        self._lock = threading.Lock()
        self.acked = 0
        self.failed = 0
        self._ack_log = ack_log
        self.metrics = counters or Metrics(CollectorRegistry())

    def acknowledge(self, unique_id: str, sent_at: float | None = None) -> None:
        with self._lock:
            self.acked += 1
            if self._ack_log is not None:
                self._ack_log.write(unique_id + "\n")
        self.metrics.acked.inc()
        if sent_at is not None:
            self.metrics.send_latency.observe(time.monotonic() - sent_at)

    def fail(self, unique_id: str, error: Exception) -> None:
        with self._lock:
            self.failed += 1
        self.metrics.failed.inc()
        log.error("image %s was not acknowledged: %s", unique_id, error)


class PngCache:
    """Every image of a split as PNG bytes, encoded once and kept in ``directory``.

    The file (``pngs-<digest>.npz``: the PNGs back to back and their offsets) is named after a
    digest of the pixels, so another dataset or split never reads it; a file that cannot be read
    or does not match is encoded again. Encoding the 10,000 test images takes about a second.
    A directory that cannot be written only costs that second at each start.
    """

    def __init__(self, data: dataset.Dataset, directory: str | Path) -> None:
        digest = hashlib.blake2b(np.ascontiguousarray(data.images).data, digest_size=12)
        self.path = Path(directory).expanduser() / f"pngs-{digest.hexdigest()}.npz"
        self.blobs = self._read(len(data))
        if self.blobs is None:
            self.blobs = [messages.encode_png(image) for image in data.images]
            self._write()

    def __getitem__(self, index: int) -> bytes:
        return self.blobs[index]

    def _read(self, count: int) -> list[bytes] | None:
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                blob, offsets = stored["blob"], stored["offsets"]
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, KeyError) as exc:
            log.warning("encoding the PNGs again: %s is unreadable (%s)", self.path, exc)
            return None
        if (offsets.ndim != 1 or len(offsets) != count + 1 or offsets[0] != 0
                or offsets[-1] != len(blob) or np.any(np.diff(offsets) <= 0)):
            log.warning("encoding the PNGs again: %s does not match the dataset", self.path)
            return None
        data = blob.tobytes()
        return [data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(),
                                          strict=True)]

    def _write(self) -> None:
        offsets = np.cumsum([0, *(len(b) for b in self.blobs)], dtype=np.int64)
        blob = np.frombuffer(b"".join(self.blobs), dtype=np.uint8)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as out:
                np.savez(out, blob=blob, offsets=offsets)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("PNGs not cached (%s): they are encoded again at each start", exc)


class Simulator:
    def __init__(self, settings: Settings, stop: StopFlag, data: dataset.Dataset,
                 pngs: PngCache | None = None) -> None:
        self.settings = settings
        self.stop = stop
        self.data = data
        self.device_ids = [f"device-{n:04d}" for n in range(1, settings.devices + 1)]
        self._pngs = pngs
        self._png_cache: dict[int, bytes] = {}

    def png(self, index: int) -> bytes:
        if self._pngs is not None:
            return self._pngs[index]
        cached = self._png_cache.get(index)
        if cached is None:
            cached = self._png_cache[index] = messages.encode_png(self.data.images[index])
        return cached

    def run(self, producer, tally: Tally) -> int:
        settings = self.settings
        rng = np.random.default_rng(settings.seed)
        order = rng.permutation(len(self.data))
        interval = 1.0 / settings.rate if settings.rate > 0 else 0.0
        started = last_report = time.monotonic()
        sent = 0
        while not self.stop.is_set() and (settings.count == 0 or sent < settings.count):
            if interval:
                delay = started + sent * interval - time.monotonic()
                if delay > 0 and self.stop.wait(max(delay, TICK_S)):
                    break
            index = int(order[sent % len(order)])
            device = self.device_ids[sent % len(self.device_ids)]
            message = messages.ImageMessage(
                unique_id=uuid.uuid4().hex,
                device_id=device,
                ground_truth=self.data.label(index),
                image_png=self.png(index),
                produced_at=messages.utc_now(),
            )
            sent_at = time.monotonic()
            # Keyed by the image's unique id, not the device: images are independent, and a few
            # device ids hash unevenly (10 devices put 6 of 10 images on one of 3 partitions,
            # so one inference consumer of three would do 60 % of the work).
            future = producer.send(settings.kafka.images_topic, key=message.unique_id.encode(),
                                   value=message.to_bytes())
            tally.metrics.sent.inc()
            uid = message.unique_id
            future.add_callback(lambda _meta, uid=uid, t=sent_at: tally.acknowledge(uid, t))
            future.add_errback(lambda exc, uid=uid: tally.fail(uid, exc))
            sent += 1
            now = time.monotonic()
            if settings.progress_s and now - last_report >= settings.progress_s:
                log.info("sent %d images (%.1f/s), %d acknowledged", sent,
                         sent / (now - started), tally.acked)
                last_report = now
        producer.flush()
        elapsed = time.monotonic() - started
        log.info("done: %d images sent in %.1fs (%.1f/s), %d acknowledged, %d failed",
                 sent, elapsed, sent / elapsed if elapsed else 0.0, tally.acked, tally.failed)
        return sent


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"iot-simulator: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    registry = metrics.registry()
    counters = Metrics(registry)
    try:
        # Served while the simulator runs: a finite count ends the endpoint with the process.
        server = metrics.serve(registry, settings.metrics)
    except metrics.MetricsError as exc:
        # An extra run (playbooks/simulate.yml, the benchmark) reads the service's environment
        # file while the service may hold the port: it still sends, unscraped.
        log.warning("%s: sending without a metrics endpoint", exc)
        server = None
    try:
        data = dataset.load(settings.dataset, settings.split, settings.cache_dir)
    except dataset.DatasetError as exc:
        log.error("%s", exc)
        return 2
    pngs = PngCache(data, Path(settings.cache_dir) / "png")
    log.info("%d %s images, %d classes (PNGs in %s); %d devices at %s", len(data),
             settings.split, len(data.label_names), pngs.path, settings.devices,
             f"{settings.rate:g} images/s" if settings.rate else "full speed")
    stop = StopFlag().install()
    # 256 KiB batches (kafka-python's default is 16 KiB, about five image records): at full
    # speed fewer, larger produce requests; measured in one bench session, the simulator's
    # CPU per image 0.17 -> 0.13 ms (bench/reports/bench-20261204T055423Z.json against T041109Z).
    producer = kafka_io.producer(settings.kafka, client_id="iot-simulator",
                                 linger_ms=settings.linger_ms, batch_size=256 * 1024)
    with contextlib.ExitStack() as cleanup:
        if server is not None:
            cleanup.callback(server.shutdown)
        cleanup.callback(producer.close, timeout=30)
        ack_file = (cleanup.enter_context(Path(settings.ack_log).open("a", buffering=1))
                    if settings.ack_log else None)
        tally = Tally(ack_file, counters)
        Simulator(settings, stop, data, pngs).run(producer, tally)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
