"""Simulator host: many simulated IoT devices sending CIFAR-100 images to the images topic.

Devices take turns at a fixed overall rate (or as fast as Kafka acknowledges): message i comes
from device ``i mod devices`` and is keyed by it, so each device's images stay in order on one
partition. Every message carries a fresh unique id and the image's true label.

Its Prometheus metrics (images sent, acknowledged from the producer's callback, failed, and the
send-to-ack latency) are served on IOT_METRICS_ADDRESS:IOT_METRICS_PORT while it runs; a finite
IOT_SIM_COUNT takes the endpoint down with the process.
"""

from __future__ import annotations

import contextlib
import logging
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
    Option("cache_dir", "IOT_SIM_CACHE_DIR", "where a downloaded archive is kept",
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


class Simulator:
    def __init__(self, settings: Settings, stop: StopFlag, data: dataset.Dataset) -> None:
        self.settings = settings
        self.stop = stop
        self.data = data
        self.device_ids = [f"device-{n:04d}" for n in range(1, settings.devices + 1)]
        self._png_cache: dict[int, bytes] = {}

    def png(self, index: int) -> bytes:
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
                if delay > 0 and self.stop.wait(delay):
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
    log.info("%d %s images, %d classes; %d devices at %s", len(data), settings.split,
             len(data.label_names), settings.devices,
             f"{settings.rate:g} images/s" if settings.rate else "full speed")
    stop = StopFlag().install()
    producer = kafka_io.producer(settings.kafka, client_id="iot-simulator",
                                 linger_ms=settings.linger_ms)
    with contextlib.ExitStack() as cleanup:
        if server is not None:
            cleanup.callback(server.shutdown)
        cleanup.callback(producer.close, timeout=30)
        ack_file = (cleanup.enter_context(Path(settings.ack_log).open("a", buffering=1))
                    if settings.ack_log else None)
        tally = Tally(ack_file, counters)
        Simulator(settings, stop, data).run(producer, tally)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
