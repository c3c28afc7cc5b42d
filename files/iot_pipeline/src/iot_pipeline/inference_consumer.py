"""ML host: reads image messages in batches, has the ML server classify each batch in one HTTP
request, and publishes one result message per image.

Exactly-once (IOT_INFER_DELIVERY=exactly_once, the default): a batch's results, its dead letters
and its input offsets go in one Kafka transaction, so a read_committed reader (the DB consumer)
sees each batch's results exactly once, whatever the moment the consumer dies; an aborted batch
is rewound and tried again. At-least-once: offsets are committed only after Kafka acknowledged
every result and dead letter of the batch, and a crash in between publishes the batch twice.
While the ML server is down (restarting with a new model, loading it) the batch is retried
with backoff, never dropped; each result names the model version the server answered with.
The next batch is polled and decoded while the ML server still works on the previous one, and
sent the moment that call returns, so the model does not wait for Kafka round trips; batches are
still committed (one transaction at a time) batch by batch, in offset order, and the next
batch's dead letters wait for its own one.

No record can stop the consumer: a batch that fails unexpectedly (a bug, an answer of the ML
server it cannot read) is tried IOT_MAX_ATTEMPTS times, then image by image, and the images that
still fail are dead-lettered with the exception as the reason (kafka_io.with_bounded_attempts).

Prometheus metrics on IOT_METRICS_ADDRESS:IOT_METRICS_PORT (:class:`Metrics`); results and dead
letters count once Kafka has them for good: acknowledged, or committed in their transaction.
"""

from __future__ import annotations

import base64
import enum
import http.client
import io
import json
import logging
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    AuthorizationError,
    FencedInstanceIdError,
    KafkaError,
    ProducerFencedError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Histogram

from iot_pipeline import config, kafka_io, messages, metrics
from iot_pipeline.config import ConfigError, KafkaSettings, MetricsSettings, Option
from iot_pipeline.messages import InvalidMessage
from iot_pipeline.runtime import StopFlag, backoff, configure_logging, run_until_stopped

log = logging.getLogger("iot_pipeline.inference_consumer")

DELIVERY_MODES = ("exactly_once", "at_least_once")
# Longest wait between two attempts at an ML server that is down. The server is on the same host
# and a restart (a model rollout) keeps it away for its model's load time: retrying every few
# seconds costs nothing, and the batch goes through soon after the model is back.
ML_RETRY_MAX_S = 5.0

OPTIONS: tuple[Option, ...] = (
    *config.KAFKA_OPTIONS,
    *config.COMMON_OPTIONS,
    *config.CONSUMER_OPTIONS,
    Option("ml_server_url", "IOT_ML_SERVER_URL", "base URL of the ML server",
           default="http://127.0.0.1:8000"),
    Option("group_id", "IOT_INFER_GROUP_ID", "consumer group of the inference consumers",
           default="iot-inference"),
    # 64 and no linger, as deployed: batches fill only under load (roles/inference_consumer).
    Option("batch_size", "IOT_INFER_BATCH_SIZE", "images per ML request", config.positive_int,
           default="64"),
    Option("batch_timeout_ms", "IOT_INFER_BATCH_TIMEOUT_MS",
           "how long to wait to fill a batch once an image arrived", config.non_negative_int,
           default="0"),
    Option("request_timeout_s", "IOT_INFER_REQUEST_TIMEOUT_S", "ML request timeout in seconds",
           config.non_negative_float, default="60"),
    Option("delivery", "IOT_INFER_DELIVERY",
           "exactly_once: a batch's results, dead letters and offsets in one Kafka transaction; "
           "at_least_once: results first, offsets after (a crash in between repeats a batch)",
           default="exactly_once", check=lambda v: v in DELIVERY_MODES,
           check_message="must be exactly_once or at_least_once"),
    Option("transactional_id", "IOT_INFER_TRANSACTIONAL_ID",
           "transactional.id of the results producer (exactly_once), stable across restarts and "
           "unique per consumer; empty: the group instance id, else <group_id>-<hostname>",
           default=None),
    *config.metrics_options(9102),
)


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings
    ml_server_url: str
    group_id: str
    batch_size: int
    batch_timeout_s: float
    request_timeout_s: float
    expected_image_size: tuple[int, int] | None
    max_image_bytes: int
    log_level: str = "INFO"
    group_instance_id: str | None = None
    session_timeout_ms: int = 10_000
    max_attempts: int = 3
    delivery: str = "exactly_once"
    transactional_id: str | None = None
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


def load_settings(argv: Sequence[str] | None = None, environ=None) -> Settings:
    values = config.load(OPTIONS, argv, environ, prog="inference-consumer",
                         description=__doc__.splitlines()[0])
    return Settings(
        kafka=config.kafka_settings(values),
        ml_server_url=values["ml_server_url"].rstrip("/"),
        group_id=values["group_id"],
        batch_size=values["batch_size"],
        batch_timeout_s=values["batch_timeout_ms"] / 1000,
        request_timeout_s=values["request_timeout_s"],
        expected_image_size=values["expected_image_size"],
        max_image_bytes=values["max_image_bytes"],
        log_level=values["log_level"],
        group_instance_id=values["group_instance_id"],
        session_timeout_ms=values["session_timeout_ms"],
        max_attempts=values["max_attempts"],
        delivery=values["delivery"],
        transactional_id=values["transactional_id"],
        metrics=config.metrics_settings(values),
    )


class MlUnavailable(RuntimeError):
    """The ML server is down, loading, or failed: retry the batch later."""


class MlRejected(RuntimeError):
    """The ML server refused an image (4xx): that image can never be classified."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Answer:
    """What the ML server said about one request's images."""

    model: str
    version: str | None
    predictions: list[dict]


@dataclass
class InFlight:
    """A polled batch: its decoded images at the ML server, or the error that stopped that."""

    batch: Sequence[ConsumerRecord]
    images: list[tuple[ConsumerRecord, messages.ImageMessage]] | None = None
    future: Future | None = None
    error: Exception | None = None
    # Found while the previous batch was still open: sent in this batch's own transaction.
    rejected: list[tuple[ConsumerRecord, InvalidMessage]] = field(default_factory=list)


class Outcome(enum.Enum):
    COMMITTED = "committed"
    STOPPED = "stopped"  # stopping before the batch could be classified: Kafka replays it
    REWOUND = "rewound"  # its transaction was aborted: rewind the consumer to its first offsets


class MlClient:
    """POST /predict. Images whose pixels the consumer decoded go as one .npy array (no second PNG
    decode, no base64, no JSON of the images); an ML server that predates that body (it answers
    400 bad_json) gets base64 PNGs in JSON from then on."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.url = f"{base_url}/predict"
        self.timeout_s = timeout_s
        self.send_pixels = True

    def classify(self, images: Sequence[bytes],
                 pixels: Sequence[np.ndarray | None] | None = None) -> Answer:
        if self.send_pixels and pixels and all(
                p is not None and p.shape == pixels[0].shape for p in pixels):
            buffer = io.BytesIO()
            np.save(buffer, np.stack(pixels), allow_pickle=False)
            try:
                return self._post(buffer.getvalue(), messages.PIXELS_CONTENT_TYPE, len(images))
            except MlRejected as exc:
                if exc.status != 400 or exc.body.get("error") != "bad_json":
                    raise
                log.warning("the ML server does not take .npy pixels; sending PNGs from now on")
                self.send_pixels = False
        body = json.dumps({"images": [base64.b64encode(i).decode("ascii") for i in images]})
        return self._post(body.encode(), "application/json", len(images))

    def _post(self, body: bytes, content_type: str, count: int) -> Answer:
        http_request = urllib.request.Request(  # noqa: S310 - URL from the operator's settings
            self.url, data=body, method="POST", headers={"Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:  # noqa: S310
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                detail = json.load(exc)
            except ValueError:
                detail = {"error": "http_error", "detail": exc.reason}
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise MlRejected(exc.code, detail) from exc
            raise MlUnavailable(f"HTTP {exc.code}: {detail}") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # Refused, reset, timed out, garbled, or cut off mid-answer (a server stopping).
            raise MlUnavailable(str(exc) or type(exc).__name__) from exc
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != count:
            raise MlUnavailable(f"answer has {len(predictions or [])} predictions "
                                f"for {count} images")
        version = answer.get("version")  # absent from servers that predate it
        return Answer(answer["model"], version if isinstance(version, str) and version else None,
                      predictions)


class Metrics:
    """The inference consumer's Prometheus series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records_consumed = Counter("iot_inference_records_consumed",
                                        "Records polled from the images topic (replays included).",
                                        registry=registry)
        self.batch_size = Histogram("iot_inference_batch_size", "Records per polled batch.",
                                    buckets=metrics.BATCH_BUCKETS, registry=registry)
        self.ml_request = Histogram("iot_inference_ml_request_seconds",
                                    "Seconds per /predict call to the ML server, failed ones too.",
                                    buckets=metrics.LATENCY_BUCKETS, registry=registry)
        self.results_published = Counter(
            "iot_inference_results_published",
            "Results Kafka acknowledged (at-least-once) or committed in a transaction.",
            registry=registry)
        self.dead_letters = kafka_io.dead_letters_metric(registry)
        self.commit_failures = Counter(
            "iot_inference_commit_failures",
            "Offset commits (or transactions committing them) that Kafka refused.",
            registry=registry)
        self.rebalances = Counter("iot_inference_rebalances",
                                  "Partition assignments received (the first join included).",
                                  registry=registry)

    def consumed(self, batch: Sequence[ConsumerRecord]) -> None:
        self.records_consumed.inc(len(batch))
        self.batch_size.observe(len(batch))


class InferenceConsumer:
    def __init__(self, settings: Settings, stop: StopFlag,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.stop = stop
        self.registry = registry or metrics.registry()
        self.metrics = Metrics(self.registry)
        # Results sent in the open transaction: published once it commits.
        self._uncommitted_results = 0
        # Assignments received (kafka-python calls back from poll) and the last one acted on.
        self._assignments = 0
        self._assignments_seen = 0
        self.ml = MlClient(settings.ml_server_url, settings.request_timeout_s)
        self.consumer = kafka_io.consumer(
            settings.kafka, settings.group_id, [settings.kafka.images_topic],
            client_id="iot-inference-consumer", max_poll_records=settings.batch_size,
            # A batch may wait on a slow or restarting ML server for minutes.
            max_poll_interval_ms=600_000,
            group_instance_id=settings.group_instance_id,
            session_timeout_ms=settings.session_timeout_ms,
            on_assigned=self._on_assigned,
        )
        self.coverage = kafka_io.Coverage.for_consumer(settings.kafka, self.consumer,
                                                       settings.group_id)
        self.exactly_once = settings.delivery == "exactly_once"
        if self.exactly_once:
            # Stable across restarts: init_transactions() fences the previous incarnation and
            # aborts the transaction it left open.
            self.transactional_id = (settings.transactional_id or settings.group_instance_id
                                     or f"{settings.group_id}-{socket.gethostname()}")
            self.producer = self._transactional_producer()
            log.info("exactly-once delivery, transactional_id %r", self.transactional_id)
        else:
            self.producer = kafka_io.producer(settings.kafka, client_id="iot-inference-consumer")
            log.info("at-least-once delivery")
        self.dead_letters = kafka_io.DeadLetters(
            self.producer, settings.kafka.dlq_topic, settings.group_id,
            count=lambda reason: self.metrics.dead_letters.labels("inference", reason).inc(),
            transactional=self.exactly_once)
        self.classified = 0

    def _on_assigned(self) -> None:
        self._assignments += 1
        self.metrics.rebalances.inc()

    def _reassigned(self) -> bool:
        """Exactly-once, after a new assignment: True once every position is back at the
        group's committed offset. Batches polled before it must not commit: the member may have
        lost its partitions meanwhile (a freeze longer than the session timeout), and the
        positions kafka-python keeps across the rebalance may lie past aborted batches."""
        if not self.exactly_once or self._assignments == self._assignments_seen:
            return False
        seen = self._assignments
        if kafka_io.seek_to_committed(self.consumer):
            self._assignments_seen = seen
        return True

    def run(self) -> None:
        pending: InFlight | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ml-call") as calls:
            while not self.stop.is_set():
                # With a batch at the ML server, fill the next one until that call returns
                # (what arrives meanwhile waits for it anyway), then take only what Kafka
                # already has: waiting longer would delay that batch's results. Under load
                # batches grow to batch_size; at a low rate they stay small and quick.
                in_flight = pending.future if pending is not None else None
                batch = kafka_io.poll_batch(
                    self.consumer, self.settings.batch_size, self.settings.batch_timeout_s,
                    idle_timeout_s=0.0 if pending else 1.0,
                    busy=(lambda f=in_flight: not f.done()) if in_flight is not None else None)
                if self._reassigned():
                    # Polled before the reset, or in flight: replayed from the committed offsets.
                    if pending is not None and pending.future is not None:
                        wait([pending.future])
                    pending = None
                    continue
                self.coverage.check()
                if batch:
                    self.metrics.consumed(batch)
                submitted = self._submit(calls, batch) if batch else None
                outcome = self._finish(pending) if pending is not None else None
                if outcome is Outcome.STOPPED:
                    # Stopping with the ML server down: later batches must not be committed
                    # past this one; Kafka replays both.
                    pending = None
                    break
                if outcome is Outcome.REWOUND:
                    # The next batch, already polled, starts after the aborted one: dropped,
                    # both polled again from the committed offsets (where the aborted batch
                    # began, unless the group moved the partitions meanwhile).
                    if submitted is not None and submitted.future is not None:
                        wait([submitted.future])
                    if not kafka_io.seek_to_committed(self.consumer):
                        kafka_io.rewind(self.consumer, [*pending.batch,
                                                        *(submitted.batch if submitted else ())])
                    submitted = None
                pending = submitted
            if pending is not None:
                self._finish(pending)
        log.info("stopped: %d images classified, dead letters %s",
                 self.classified, self.dead_letters.summary())

    def _submit(self, calls: ThreadPoolExecutor, batch: Sequence[ConsumerRecord]) -> InFlight:
        rejected: list[tuple[ConsumerRecord, InvalidMessage]] = []
        try:
            images = self._decode(batch, rejected)
        except kafka_io.OUTAGES:
            raise
        except Exception as exc:
            return InFlight(batch, error=exc)  # attempted again in _finish, in offset order
        future = calls.submit(self._classify_with_retry, [m for _, m in images]) \
            if images else None
        return InFlight(batch, images, future, rejected=rejected)

    def _finish(self, flight: InFlight) -> Outcome:
        """Publish one batch's results and dead letters, and commit exactly its offsets."""
        if flight.future is not None:
            wait([flight.future])  # the ML call stays outside the transaction (its timeout)
        return self._transact(flight.batch, lambda: self._work(flight))

    def _work(self, flight: InFlight) -> bool:
        for record, reason in flight.rejected:
            self.dead_letters.send(record, reason)
        error = flight.error
        if error is None:
            try:
                done = self._complete(flight.images, flight.future)
            except kafka_io.OUTAGES:
                raise
            except Exception as exc:
                error = exc
        if error is not None:
            done = kafka_io.with_bounded_attempts(
                flight.batch, self._process_once, self.dead_letters, self.stop,
                self.settings.max_attempts, failed=error)
        else:
            self.dead_letters.confirm()
        return done

    def _transact(self, batch: Sequence[ConsumerRecord], work) -> Outcome:
        """Run ``work()`` (publishing the batch's records) and commit the batch's offsets: in one
        transaction when exactly-once, one batch at a time; aborted if anything fails."""
        if self.exactly_once:
            self.producer.begin_transaction()
        try:
            done = work()
            if not done:
                self._abort(batch)
                return Outcome.STOPPED
            committed = self._commit(kafka_io.next_offsets(batch))
        except BaseException:
            if self.exactly_once:
                self._abort(batch, quiet=True)
            raise
        if not committed and self.exactly_once:
            # The abort may fail as well: a TxnOffsetCommit that timed out (a consumer frozen
            # past its session) leaves kafka-python's producer in an error state. The renewed
            # producer's init_transactions() (same transactional_id) aborts the transaction then.
            self._abort(batch, quiet=True)
            self._renew_producer()
            return Outcome.REWOUND  # the caller rewinds the consumer
        self.dead_letters.forget(batch)
        return Outcome.COMMITTED

    def _complete(self, images, future: Future | None) -> bool:
        try:
            results = [] if future is None else future.result()
        except MlRejected:
            results = self._classify(images)  # one by one, to find the refused image
        if results is None:
            return False
        self._publish(results)
        return True

    def process(self, batch: Sequence[ConsumerRecord]) -> bool:
        """Classify, publish and commit one batch, without overlap; False when stopping while
        the ML server is down or the transaction was aborted (the batch is replayed later)."""
        self.metrics.consumed(batch)
        outcome = self._transact(batch, lambda: kafka_io.with_bounded_attempts(
            batch, self._process_once, self.dead_letters, self.stop,
            self.settings.max_attempts))
        if outcome is Outcome.REWOUND:
            kafka_io.rewind(self.consumer, batch)
        return outcome is Outcome.COMMITTED

    def _process_once(self, batch: Sequence[ConsumerRecord]) -> bool:
        results = self._classify(self._decode(batch))
        if results is None:
            return False
        self._publish(results)
        return True

    def _decode(self, batch: Sequence[ConsumerRecord],
                rejected: list[tuple[ConsumerRecord, InvalidMessage]] | None = None):
        images: list[tuple[ConsumerRecord, messages.ImageMessage]] = []
        for record in batch:
            try:
                message = messages.decode(record.value,
                                          expected_size=self.settings.expected_image_size,
                                          max_image_bytes=self.settings.max_image_bytes)
            except messages.InvalidMessage as error:
                if rejected is None:
                    self.dead_letters.send(record, error)
                else:
                    rejected.append((record, error))
                continue
            if isinstance(message, messages.ImageMessage):
                images.append((record, message))
            # Result messages appear here only in the single-topic design: not ours to process.
        return images

    def _publish(self, results: list[messages.ResultMessage]) -> None:
        # Encoded before the first send: an attempt that fails must not have sent half a batch
        # (its transaction would commit that half next to the retry's full one).
        encoded = [(result.unique_id.encode(), result.to_bytes()) for result in results]
        futures = [self.producer.send(self.settings.kafka.results_topic, key=key, value=value)
                   for key, value in encoded]
        kafka_io.confirm_all(self.producer, futures, timeout_s=120)
        self.dead_letters.confirm()
        self.classified += len(results)
        if self.exactly_once:
            self._uncommitted_results += len(results)
        else:
            self.metrics.results_published.inc(len(results))

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> bool:
        """At-least-once: a refused commit is logged and replayed later (True either way).
        Exactly-once: the offsets join the transaction, which commits; False when Kafka refused
        (a rebalance, a coordinator moving) and the transaction must be aborted."""
        if not self.exactly_once:
            if not kafka_io.commit(self.consumer, offsets):
                self.metrics.commit_failures.inc()
            return True
        try:
            # The group metadata lets the broker fence a zombie of an old generation (KIP-447).
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            self.producer.commit_transaction()
        except (ProducerFencedError, FencedInstanceIdError, AuthorizationError):
            log.error("transactional_id %r or its group member is used by another process, or "
                      "not authorized: stopping", self.transactional_id)
            raise
        except KafkaError as exc:
            self.metrics.commit_failures.inc()
            log.warning("transaction committing offsets %s refused (%r): aborted, the batch is "
                        "tried again", {f"{tp.topic}[{tp.partition}]": o.offset
                                        for tp, o in offsets.items()}, exc)
            return False
        self.metrics.results_published.inc(self._uncommitted_results)
        self._uncommitted_results = 0
        self.dead_letters.committed()
        return True

    def _transactional_producer(self) -> KafkaProducer:
        producer = kafka_io.producer(self.settings.kafka, client_id="iot-inference-consumer",
                                     transactional_id=self.transactional_id)
        producer.init_transactions()
        return producer

    def _renew_producer(self) -> None:
        """After an offset commit the group refused, go on with a new transactional producer.

        kafka-python 3.0.x keeps the refused offsets (an UnknownMemberIdError or
        IllegalGenerationError from TxnOffsetCommit) in its transaction manager after the abort,
        and sends them again with the next transaction's offsets: that transaction then commits
        offsets of the aborted batch, whose results were never committed (make chaos,
        freeze-inference: 16 images without a result). A new producer starts clean; its
        init_transactions() (same transactional_id) fences the old one."""
        old = self.producer
        self.producer = self._transactional_producer()
        self.dead_letters.use_producer(self.producer)
        try:
            old.close(timeout=5)
        except KafkaError:
            log.warning("closing the replaced transactional producer failed", exc_info=True)
        log.info("transactional producer renewed after a refused offset commit")

    def _abort(self, batch: Sequence[ConsumerRecord], quiet: bool = False) -> None:
        """Abort the open transaction: its results and dead letters are never read committed,
        and the batch's dead letters are sent again when it is retried."""
        if not self.exactly_once:
            return
        self.dead_letters.forget(batch)
        self.dead_letters.discard()
        self._uncommitted_results = 0
        try:
            self.producer.abort_transaction()
        except KafkaError as exc:
            if not quiet:
                raise
            log.warning("aborting the transaction failed too (%s); the next transactional "
                        "producer's init_transactions() aborts it", exc)

    def _classify(self, images) -> list[messages.ResultMessage] | None:
        if not images:
            return []
        try:
            answered = self._classify_with_retry([m for _, m in images])
        except MlRejected:
            # Some image the consumer's own checks passed is still refused: find it alone.
            answered = []
            for record, message in images:
                try:
                    one = self._classify_with_retry([message])
                except MlRejected as exc:
                    reason = str(exc.body.get("error", f"http_{exc.status}"))
                    self.dead_letters.send(record, messages.InvalidMessage(
                        f"ml_rejected_{reason}", str(exc.body.get("detail", ""))))
                    continue
                if one is None:
                    return None
                answered.extend(one)
        return answered

    def _classify_with_retry(self, images: Sequence[messages.ImageMessage]):
        delays = backoff(maximum=ML_RETRY_MAX_S)
        while True:
            try:
                with self.metrics.ml_request.time():
                    answer = self.ml.classify([m.image_png for m in images],
                                              [m.pixels for m in images])
                break
            except MlUnavailable as exc:
                delay = next(delays)
                log.error("ML server unavailable (%s); retrying %d images in %.1fs",
                          exc, len(images), delay)
                if self.stop.wait(delay):
                    return None
        now = messages.utc_now()
        return [_result(message, answer.model, prediction, now, model_version=answer.version)
                for message, prediction in zip(images, answer.predictions, strict=True)]

    def close(self) -> None:
        self.coverage.close()
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=10)


def _result(message: messages.ImageMessage, model: str, prediction: dict,
            inferred_at: datetime, model_version: str | None = None) -> messages.ResultMessage:
    return messages.ResultMessage(
        unique_id=message.unique_id,
        inferred_value=prediction["label"],
        score=float(prediction["score"]),
        model=model,
        inferred_at=inferred_at,
        top_k=tuple((p["label"], float(p["score"])) for p in prediction.get("top_k", [])),
        model_version=model_version,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"inference-consumer: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    registry = metrics.registry()
    try:
        metrics.serve(registry, settings.metrics)
    except metrics.MetricsError as exc:
        log.error("%s", exc)
        return 2
    return run_until_stopped(lambda stop: InferenceConsumer(settings, stop, registry))


if __name__ == "__main__":
    sys.exit(main())
