"""Monitoring host: how far the pipeline's consumer groups are behind, for Prometheus.

Every IOT_LAG_INTERVAL_S it reads the committed offsets of each group of IOT_LAG_GROUPS and the
end offsets of their topics and of the pipeline's three topics, and serves

    iot_kafka_consumergroup_lag{group, topic, partition}   end offset - committed offset
    iot_kafka_topic_end_offset{topic, partition}           its rate is the topic's throughput
    iot_lag_exporter_up                                    1 if the last read worked, else 0

End offsets are read read_committed (the last stable offset): what the pipeline's
read_committed readers can reach, so an open transaction is not lag. A partition of a group's
topics without a committed offset counts from its first retained record (the consumers start at
the earliest one): a group that never committed still shows its backlog. While the brokers
cannot be reached the endpoint keeps serving iot_lag_exporter_up 0 and no lag series, rather
than numbers that are no longer true; the next read reconnects.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from kafka.errors import KafkaError
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from iot_pipeline import config, kafka_io, metrics
from iot_pipeline.config import ConfigError, KafkaSettings, MetricsSettings, Option
from iot_pipeline.runtime import StopFlag, configure_logging

log = logging.getLogger("iot_pipeline.lag_exporter")

DEFAULT_GROUPS = "iot-inference:iot-images,iot-db-writer:iot-images:iot-results"


def group_topics(text: str) -> dict[str, tuple[str, ...]]:
    """``group:topic[:topic...],...`` -> {group: topics}; a group alone lists no topics (its lag
    is then reported only for the partitions it committed)."""
    groups: dict[str, tuple[str, ...]] = {}
    for item in config.comma_list(text):
        group, *topics = (part.strip() for part in item.split(":"))
        if not group or not all(topics):
            raise ValueError(f"{item!r} must look like group:topic[:topic...]")
        groups[group] = tuple(topics)
    return groups


OPTIONS: tuple[Option, ...] = (
    *config.KAFKA_OPTIONS,
    Option("log_level", "IOT_LOG_LEVEL", "logging level", default="INFO"),
    Option("groups", "IOT_LAG_GROUPS",
           "consumer groups and the topics each reads: group:topic[:topic...],...", group_topics,
           default=DEFAULT_GROUPS),
    Option("interval_s", "IOT_LAG_INTERVAL_S", "seconds between two reads of the offsets",
           config.non_negative_float, default="15", check=lambda v: v > 0,
           check_message="must be a positive number"),
    *config.metrics_options(9104),
)


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings
    groups: Mapping[str, tuple[str, ...]]
    interval_s: float = 15.0
    log_level: str = "INFO"
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


def load_settings(argv: Sequence[str] | None = None, environ=None) -> Settings:
    values = config.load(OPTIONS, argv, environ, prog="iot-lag-exporter",
                         description=__doc__.splitlines()[0])
    return Settings(kafka=config.kafka_settings(values), groups=values["groups"],
                    interval_s=values["interval_s"], log_level=values["log_level"],
                    metrics=config.metrics_settings(values))


def consumer_lag(
    groups: Mapping[str, Iterable[str]],
    committed: Mapping[str, Mapping[TopicPartition, int]],
    end: Mapping[TopicPartition, int],
    beginning: Mapping[TopicPartition, int],
) -> dict[tuple[str, str, int], int]:
    """{(group, topic, partition): lag} over each group's topics and the partitions it committed.

    A partition without a commit (or a negative one, Kafka's "none") counts from ``beginning``;
    a commit past the end (the end was read first) is no lag, never a negative one.
    """
    lag: dict[tuple[str, str, int], int] = {}
    for group, topics in groups.items():
        offsets = committed.get(group, {})
        wanted = set(topics)
        partitions = {tp for tp in end if tp.topic in wanted} | {tp for tp in offsets if tp in end}
        for tp in partitions:
            position = offsets.get(tp)
            if position is None or position < 0:
                position = beginning.get(tp, 0)
            lag[(group, tp.topic, tp.partition)] = max(0, end[tp] - position)
    return lag


class OffsetsReader:
    """Committed and end offsets from Kafka; clients made on first use and again after close()."""

    def __init__(self, settings: KafkaSettings, timeout_ms: int = 10_000) -> None:
        self.settings = settings
        self.timeout_ms = timeout_ms
        self._admin = None
        self._consumer = None

    def committed(self, group: str) -> dict[TopicPartition, int]:
        if self._admin is None:
            self._admin = kafka_io.admin(self.settings, "iot-lag-exporter",
                                         request_timeout_ms=self.timeout_ms,
                                         bootstrap_timeout_ms=self.timeout_ms)
        offsets = self._admin.list_group_offsets({group: None}).get(group, {})
        return {tp: meta.offset for tp, meta in offsets.items()}

    def _reader(self):
        if self._consumer is None:
            self._consumer = kafka_io.offsets_reader(self.settings, "iot-lag-exporter",
                                                     request_timeout_ms=self.timeout_ms + 1000)
        return self._consumer

    def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        reader = self._reader()
        return [TopicPartition(topic, p) for topic in sorted(set(topics))
                for p in sorted(reader.partitions_for_topic(topic))]

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return self._reader().end_offsets(list(partitions), timeout_ms=self.timeout_ms)

    def beginning_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return self._reader().beginning_offsets(list(partitions), timeout_ms=self.timeout_ms)

    def close(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                try:
                    client.close()
                except Exception:
                    log.debug("closing a Kafka client failed", exc_info=True)
        self._admin = self._consumer = None


@dataclass(frozen=True)
class Snapshot:
    """One read of the offsets; served as is until the next one replaces it."""

    up: bool
    lag: Mapping[tuple[str, str, int], int] = field(default_factory=dict)
    end: Mapping[TopicPartition, int] = field(default_factory=dict)
    last_success: float = 0.0


class LagExporter:
    """Reads the offsets on demand (:meth:`read`) and serves the last read (:meth:`collect`)."""

    def __init__(self, settings: Settings, reader: OffsetsReader | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.reader = reader or OffsetsReader(settings.kafka)
        self.snapshot = Snapshot(up=False)
        self._down_logged = False
        self.registry = registry or metrics.registry()
        self.registry.register(self)

    def topics(self) -> set[str]:
        kafka = self.settings.kafka
        topics = {kafka.images_topic, kafka.results_topic, kafka.dlq_topic}
        for group_topic_names in self.settings.groups.values():
            topics.update(group_topic_names)
        return topics

    def read(self) -> Snapshot:
        """One read of every offset; on a Kafka error the snapshot says down (and the clients
        are dropped, to reconnect next time)."""
        try:
            committed = {group: self.reader.committed(group) for group in self.settings.groups}
            topics = self.topics() | {tp.topic for offsets in committed.values() for tp in offsets}
            partitions = self.reader.partitions(topics)
            end = self.reader.end_offsets(partitions)
            beginning = self.reader.beginning_offsets(partitions)
        except (KafkaError, OSError) as exc:
            if not self._down_logged:  # once per outage, not every interval
                log.warning("cannot read offsets from Kafka (%r): serving iot_lag_exporter_up 0 "
                            "until it answers", exc)
                self._down_logged = True
            self.reader.close()
            self.snapshot = Snapshot(up=False, last_success=self.snapshot.last_success)
            return self.snapshot
        self._down_logged = False
        if not self.snapshot.up:
            log.info("reading offsets of %d partitions for groups %s", len(partitions),
                     ", ".join(self.settings.groups))
        self.snapshot = Snapshot(up=True, lag=consumer_lag(self.settings.groups, committed, end,
                                                           beginning),
                                 end=end, last_success=time.time())
        return self.snapshot

    def run(self, stop: StopFlag) -> None:
        while not stop.is_set():
            started = time.monotonic()
            self.read()
            if stop.wait(max(0.0, self.settings.interval_s - (time.monotonic() - started))):
                break

    def describe(self) -> list[Metric]:
        return []  # the series change with the partitions: registered without a description

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot  # one read, replaced whole: a scrape never sees half of one
        up = GaugeMetricFamily("iot_lag_exporter_up",
                               "1 if the last read of the offsets from Kafka worked, else 0.")
        up.add_metric([], 1.0 if snapshot.up else 0.0)
        yield up
        success = GaugeMetricFamily("iot_lag_exporter_last_success_timestamp_seconds",
                                    "Unix time of the last successful read of the offsets.")
        success.add_metric([], snapshot.last_success)
        yield success
        lag = GaugeMetricFamily("iot_kafka_consumergroup_lag",
                                "Records of the partition the group has not committed yet.",
                                labels=["group", "topic", "partition"])
        for (group, topic, partition), value in sorted(snapshot.lag.items()):
            lag.add_metric([group, topic, str(partition)], float(value))
        yield lag
        end = GaugeMetricFamily("iot_kafka_topic_end_offset",
                                "Last stable offset of the partition (read_committed end).",
                                labels=["topic", "partition"])
        for tp, value in sorted(snapshot.end.items()):
            end.add_metric([tp.topic, str(tp.partition)], float(value))
        yield end

    def close(self) -> None:
        self.reader.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"iot-lag-exporter: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    stop = StopFlag().install()
    exporter = LagExporter(settings)
    try:
        metrics.serve(exporter.registry, settings.metrics)
    except metrics.MetricsError as exc:
        log.error("%s", exc)
        return 2
    try:
        exporter.run(stop)
    finally:
        exporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
