"""DB host: consumes images and inference results from Kafka and UPSERTs them into PostgreSQL.

Per batch: decode (bad records go to the dead-letter topic), write every row in one
transaction and confirm the dead letters. The Kafka offsets of what is stored are committed at
most every IOT_DB_COMMIT_INTERVAL_MS, when no record is waiting, and on a graceful stop: a
commit per small batch cost more than the batch itself at a steady rate. A crash replays what
was stored since the last commit; the UPSERTs make the replay harmless. While PostgreSQL is
down the consumer pauses its partitions and retries, so nothing is lost or dead-lettered.

No record can stop the consumer: one PostgreSQL refuses (a data error, a constraint) is found by
bisecting the batch and dead-lettered with the database's error, the rest is stored; a batch that
fails unexpectedly is tried IOT_MAX_ATTEMPTS times, then record by record, and the records that
still fail are dead-lettered with the exception (kafka_io.with_bounded_attempts).

Prometheus metrics on IOT_METRICS_ADDRESS:IOT_METRICS_PORT (:class:`Metrics`): rows written by
kind, batch sizes, transaction time, dead letters by reason, outages and retries, and the
pipeline's end-to-end latency, produced_at to the row holding its result, once per row.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Histogram

from iot_pipeline import config, kafka_io, messages, metrics, store
from iot_pipeline.config import ConfigError, KafkaSettings, MetricsSettings, Option
from iot_pipeline.runtime import StopFlag, backoff, configure_logging, run_until_stopped

log = logging.getLogger("iot_pipeline.db_consumer")

OPTIONS: tuple[Option, ...] = (
    *config.KAFKA_OPTIONS,
    *config.COMMON_OPTIONS,
    *config.CONSUMER_OPTIONS,
    Option("group_id", "IOT_DB_GROUP_ID", "consumer group of the database writers",
           default="iot-db-writer"),
    Option("batch_size", "IOT_DB_BATCH_SIZE", "records per database transaction",
           config.positive_int, default="500"),
    Option("batch_linger_ms", "IOT_DB_BATCH_LINGER_MS",
           "how long to wait to fill a batch once a record arrived", config.non_negative_int,
           default="200"),
    Option("commit_interval_ms", "IOT_DB_COMMIT_INTERVAL_MS",
           "most milliseconds between two Kafka offset commits while records keep coming "
           "(0: after every batch); what a crash replays, harmlessly", config.non_negative_int,
           default="1000"),
    Option("dsn", "IOT_DB_DSN",
           "libpq connection string; empty uses PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD",
           default=""),
    *config.metrics_options(9103),
)


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings
    group_id: str
    batch_size: int
    batch_linger_s: float
    dsn: str
    expected_image_size: tuple[int, int] | None
    max_image_bytes: int
    log_level: str = "INFO"
    group_instance_id: str | None = None
    session_timeout_ms: int = 10_000
    max_attempts: int = 3
    commit_interval_s: float = 1.0
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


def load_settings(argv: Sequence[str] | None = None, environ=None) -> tuple[Settings, bool]:
    options = OPTIONS
    if "--migrate-only" in (sys.argv[1:] if argv is None else argv):
        # Migrating touches only PostgreSQL: Kafka settings may be absent.
        options = tuple(replace(o, required=False, default="unused:9092")
                        if o.env == "IOT_KAFKA_BOOTSTRAP_SERVERS" else o for o in OPTIONS)
    values = config.load(
        options, argv, environ, prog="db-consumer", description=__doc__.splitlines()[0],
        extra_flags=lambda p: p.add_argument(
            "--migrate-only", action="store_true",
            help="create or migrate the schema, then exit (run as the database owner)"),
    )
    settings = Settings(
        kafka=config.kafka_settings(values),
        group_id=values["group_id"],
        batch_size=values["batch_size"],
        batch_linger_s=values["batch_linger_ms"] / 1000,
        dsn=values["dsn"],
        expected_image_size=values["expected_image_size"],
        max_image_bytes=values["max_image_bytes"],
        log_level=values["log_level"],
        group_instance_id=values["group_instance_id"],
        session_timeout_ms=values["session_timeout_ms"],
        max_attempts=values["max_attempts"],
        commit_interval_s=values["commit_interval_ms"] / 1000,
        metrics=config.metrics_settings(values),
    )
    return settings, values["migrate_only"]


def sort_batch(
    records: Sequence[ConsumerRecord],
    settings: Settings,
) -> tuple[list[tuple[ConsumerRecord, messages.Message]],
           list[tuple[ConsumerRecord, messages.InvalidMessage]]]:
    """Split a batch into (record, message) pairs to store and records to dead-letter."""
    decoded, rejected = [], []
    for record in records:
        try:
            message = messages.decode(
                record.value, expected_size=settings.expected_image_size,
                max_image_bytes=settings.max_image_bytes, keep_pixels=False,
            )
        except messages.InvalidMessage as error:
            rejected.append((record, error))
            continue
        decoded.append((record, message))
    return decoded, rejected


# Seconds from the simulator producing an image to its row holding the result: the pipeline's
# latency, from well under a second to minutes behind a backlog.
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The DB consumer's Prometheus series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows_written = Counter(
            "iot_db_rows_written", "Messages UPSERTed in committed transactions, by kind.",
            ["kind"], registry=registry)
        for kind in ("image", "result"):
            self.rows_written.labels(kind=kind)
        self.batch_size = Histogram("iot_db_batch_size", "Records per polled batch.",
                                    buckets=metrics.BATCH_BUCKETS, registry=registry)
        self.transaction_seconds = Histogram(
            "iot_db_transaction_seconds",
            "Seconds to store one batch (its transactions, bisection included).",
            buckets=metrics.LATENCY_BUCKETS, registry=registry)
        self.dead_letters = kafka_io.dead_letters_metric(registry)
        self.outages = Counter("iot_db_outages",
                               "Times PostgreSQL became unavailable (connect or write failed).",
                               registry=registry)
        self.retries = Counter("iot_db_retries",
                               "Attempts to reach PostgreSQL again after a failure.",
                               registry=registry)
        self.e2e_latency = Histogram(
            "iot_e2e_latency_seconds",
            "Seconds from an image's produced_at to its row holding both image and result "
            "(observed once per row, when the row becomes complete).",
            buckets=E2E_BUCKETS, registry=registry)


class DbConsumer:
    def __init__(self, settings: Settings, stop: StopFlag,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.stop = stop
        self.registry = registry or metrics.registry()
        self.metrics = Metrics(self.registry)
        self.consumer = kafka_io.consumer(
            settings.kafka, settings.group_id,
            [settings.kafka.images_topic, settings.kafka.results_topic],
            client_id="iot-db-consumer", max_poll_records=settings.batch_size,
            group_instance_id=settings.group_instance_id,
            session_timeout_ms=settings.session_timeout_ms,
            # Results of an aborted inference transaction are never stored (exactly-once).
            isolation_level="read_committed",
        )
        self.coverage = kafka_io.Coverage.for_consumer(settings.kafka, self.consumer,
                                                       settings.group_id)
        self.producer = kafka_io.producer(settings.kafka, client_id="iot-db-consumer-dlq")
        self.dead_letters = kafka_io.DeadLetters(
            self.producer, settings.kafka.dlq_topic, settings.group_id,
            count=lambda reason: self.metrics.dead_letters.labels("db", reason).inc())
        self.conn = None
        self.stored_images = 0
        self.stored_results = 0
        # Something was stored since the last offset commit, and when the next commit is due.
        self._stored_since_commit = False
        self._commit_due_s = 0.0
        self.commits = 0

    def run(self) -> None:
        self.conn = self._connect_until_up()
        if self.conn is None:
            return
        store.ensure_schema(self.conn)
        while not self.stop.is_set():
            batch = kafka_io.poll_batch(self.consumer, self.settings.batch_size,
                                        self.settings.batch_linger_s)
            if batch and not self.handle(batch):
                break  # stopping with the batch not stored: nothing more is committed
            # Commit once the interval has passed, or at once when nothing came within the
            # idle wait: the traffic stopped, and the group's lag should read 0.
            self.commit_stored(force=not batch)
            self.coverage.check()
        else:
            self.commit_stored(force=True)
        log.info("stopped: %d images and %d results stored, dead letters %s",
                 self.stored_images, self.stored_results, self.dead_letters.summary())

    def handle(self, batch: Sequence[ConsumerRecord]) -> bool:
        """Store or dead-letter every record of the batch, and commit its offsets when a commit
        is due; False when stopping first (its offsets are never committed: Kafka replays it)."""
        self.metrics.batch_size.observe(len(batch))
        if not kafka_io.with_bounded_attempts(batch, self.process, self.dead_letters,
                                              self.stop, self.settings.max_attempts):
            return False
        self.dead_letters.forget(batch)
        self._stored_since_commit = True
        self.commit_stored()
        return True

    def commit_stored(self, force: bool = False) -> None:
        """Commit the consumer's positions if something was stored and the interval has passed
        (or ``force``). Call it only with every polled record stored: between batches.

        The positions, not one past each stored record: on the results topic a transaction's
        commit marker follows its last record, and a position is past it (the lag reads 0).
        A refused commit (a rebalance) is tried again at the next call.
        """
        now = time.monotonic()
        if not self._stored_since_commit or (not force and now < self._commit_due_s):
            return
        if not kafka_io.commit(self.consumer):
            return
        self._stored_since_commit = False
        self._commit_due_s = now + self.settings.commit_interval_s
        self.commits += 1

    def process(self, batch: Sequence[ConsumerRecord]) -> bool:
        """Store the batch's messages and dead-letter the rest, without committing; False when
        stopping while PostgreSQL is down."""
        decoded, rejected = sort_batch(batch, self.settings)
        for record, error in rejected:
            self.dead_letters.send(record, error)
        written = self._write_until_stored(decoded)
        if written is None:
            return False
        summary, refused = written
        # Committed in PostgreSQL by now, whatever happens to the dead letters and the offsets.
        self.metrics.rows_written.labels("image").inc(summary.images)
        self.metrics.rows_written.labels("result").inc(summary.results)
        for seconds in summary.completed:
            self.metrics.e2e_latency.observe(max(0.0, seconds))
        for record, error in refused:
            self.dead_letters.send(record, error)
        self.dead_letters.confirm()
        self.stored_images += summary.images
        self.stored_results += summary.results
        log.debug("stored %d images, %d results (%s .. %s)", summary.images, summary.results,
                  kafka_io.where(batch[0]), kafka_io.where(batch[-1]))
        return True

    def _write_until_stored(self, decoded):
        """store.write_isolating, retried while PostgreSQL is unavailable; None if stopping."""
        delays = backoff()
        paused = False
        try:
            while True:
                try:
                    if self.conn is None or self.conn.closed:
                        self.conn = store.connect(self.settings.dsn)
                    started = time.perf_counter()
                    written = store.write_isolating(self.conn, decoded)
                    if decoded:
                        self.metrics.transaction_seconds.observe(time.perf_counter() - started)
                    return written
                except store.StoreUnavailable as exc:
                    self._close_connection()
                    if not paused:
                        self.metrics.outages.inc()
                    self.metrics.retries.inc()
                    delay = next(delays)
                    log.error("PostgreSQL unavailable (%s); retrying in %.1fs", exc, delay)
                    if not paused:
                        self.consumer.pause(*self.consumer.assignment())
                        paused = True
                    # Polling while paused keeps this member in its group. It fetches nothing,
                    # unless a rebalance just assigned a new partition: rewind those records so
                    # that the next commit cannot skip them.
                    for tp, records in self.consumer.poll(timeout_ms=0).items():
                        self.consumer.seek(tp, records[0].offset)
                    if self.stop.wait(delay):
                        return None
        finally:
            if paused:
                self.consumer.resume(*self.consumer.paused())
                log.info("PostgreSQL is back")

    def _connect_until_up(self):
        for attempt, delay in enumerate(backoff()):
            try:
                return store.connect(self.settings.dsn)
            except store.StoreUnavailable as exc:
                if attempt == 0:
                    self.metrics.outages.inc()
                self.metrics.retries.inc()
                log.error("cannot connect to PostgreSQL (%s); retrying in %.1fs", exc, delay)
                if self.stop.wait(delay):
                    return None
        return None

    def _close_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                log.debug("closing a broken connection failed", exc_info=True)
        self.conn = None

    def close(self) -> None:
        self.coverage.close()
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=10)
        self._close_connection()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, migrate_only = load_settings(argv)
    except ConfigError as exc:
        print(f"db-consumer: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if migrate_only:
        conn = store.connect(settings.dsn)
        try:
            ran = store.migrate(conn)
        finally:
            conn.close()
        # Ansible reads this line to report changed / ok.
        print("schema migrated" if ran else "schema up to date")
        return 0
    registry = metrics.registry()
    try:
        metrics.serve(registry, settings.metrics)
    except metrics.MetricsError as exc:
        log.error("%s", exc)
        return 2
    return run_until_stopped(lambda stop: DbConsumer(settings, stop, registry))


if __name__ == "__main__":
    sys.exit(main())
