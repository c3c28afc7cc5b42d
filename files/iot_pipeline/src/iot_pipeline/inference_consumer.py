"""ML host: reads image messages in batches, has the ML server classify each batch in one HTTP
request, and publishes one result message per image.

Offsets are committed only after Kafka acknowledged every result and dead letter of the batch
(at-least-once). While the ML server is down the batch is retried with backoff, never dropped.
The next batch is polled and sent while the ML server still works on the previous one, so the
model does not wait for Kafka round trips; offsets are still committed batch by batch, in order.

No record can stop the consumer: a batch that fails unexpectedly (a bug, an answer of the ML
server it cannot read) is tried IOT_MAX_ATTEMPTS times, then image by image, and the images that
still fail are dead-lettered with the exception as the reason (kafka_io.with_bounded_attempts).
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata, TopicPartition

from iot_pipeline import config, kafka_io, messages
from iot_pipeline.config import ConfigError, KafkaSettings, Option
from iot_pipeline.runtime import StopFlag, backoff, configure_logging, run_until_stopped

log = logging.getLogger("iot_pipeline.inference_consumer")

OPTIONS: tuple[Option, ...] = (
    *config.KAFKA_OPTIONS,
    *config.COMMON_OPTIONS,
    *config.CONSUMER_OPTIONS,
    Option("ml_server_url", "IOT_ML_SERVER_URL", "base URL of the ML server",
           default="http://127.0.0.1:8000"),
    Option("group_id", "IOT_INFER_GROUP_ID", "consumer group of the inference consumers",
           default="iot-inference"),
    Option("batch_size", "IOT_INFER_BATCH_SIZE", "images per ML request", config.positive_int,
           default="32"),
    Option("batch_timeout_ms", "IOT_INFER_BATCH_TIMEOUT_MS",
           "how long to wait to fill a batch once an image arrived", config.non_negative_int,
           default="100"),
    Option("request_timeout_s", "IOT_INFER_REQUEST_TIMEOUT_S", "ML request timeout in seconds",
           config.non_negative_float, default="120"),
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
    )


class MlUnavailable(RuntimeError):
    """The ML server is down, loading, or failed: retry the batch later."""


class MlRejected(RuntimeError):
    """The ML server refused an image (4xx): that image can never be classified."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


@dataclass
class InFlight:
    """A polled batch: its decoded images at the ML server, or the error that stopped that."""

    batch: Sequence[ConsumerRecord]
    images: list[tuple[ConsumerRecord, messages.ImageMessage]] | None = None
    future: Future | None = None
    error: Exception | None = None


class MlClient:
    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.url = f"{base_url}/predict"
        self.timeout_s = timeout_s

    def classify(self, images: Sequence[bytes]) -> tuple[str, list[dict]]:
        body = json.dumps({"images": [base64.b64encode(i).decode("ascii") for i in images]})
        http_request = urllib.request.Request(  # noqa: S310 - URL from the operator's settings
            self.url, data=body.encode(), method="POST",
            headers={"Content-Type": "application/json"},
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
        except (OSError, ValueError) as exc:  # refused, reset, timed out, garbled
            raise MlUnavailable(str(exc)) from exc
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(images):
            raise MlUnavailable(f"answer has {len(predictions or [])} predictions "
                                f"for {len(images)} images")
        return answer["model"], predictions


class InferenceConsumer:
    def __init__(self, settings: Settings, stop: StopFlag) -> None:
        self.settings = settings
        self.stop = stop
        self.ml = MlClient(settings.ml_server_url, settings.request_timeout_s)
        self.consumer = kafka_io.consumer(
            settings.kafka, settings.group_id, [settings.kafka.images_topic],
            client_id="iot-inference-consumer", max_poll_records=settings.batch_size,
            # A batch may wait on a slow or restarting ML server for minutes.
            max_poll_interval_ms=600_000,
            group_instance_id=settings.group_instance_id,
            session_timeout_ms=settings.session_timeout_ms,
        )
        self.producer = kafka_io.producer(settings.kafka, client_id="iot-inference-consumer")
        self.dead_letters = kafka_io.DeadLetters(self.producer, settings.kafka.dlq_topic,
                                                 settings.group_id)
        self.classified = 0

    def run(self) -> None:
        pending: InFlight | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ml-call") as calls:
            while not self.stop.is_set():
                # With a batch at the ML server, take only what Kafka already has: waiting
                # here would delay that batch's results.
                batch = kafka_io.poll_batch(self.consumer, self.settings.batch_size,
                                            self.settings.batch_timeout_s,
                                            idle_timeout_s=0.0 if pending else 1.0)
                submitted = self._submit(calls, batch) if batch else None
                if pending is not None and not self._finish(pending):
                    # Stopping with the ML server down: later batches must not be committed
                    # past this one; Kafka replays both.
                    pending = None
                    break
                pending = submitted
            if pending is not None:
                self._finish(pending)
        log.info("stopped: %d images classified, dead letters %s",
                 self.classified, self.dead_letters.summary())

    def _submit(self, calls: ThreadPoolExecutor, batch: Sequence[ConsumerRecord]) -> InFlight:
        try:
            images = self._decode(batch)
        except kafka_io.OUTAGES:
            raise
        except Exception as exc:
            return InFlight(batch, error=exc)  # attempted again in _finish, in offset order
        future = calls.submit(self._classify_with_retry, [m for _, m in images]) \
            if images else None
        return InFlight(batch, images, future)

    def _finish(self, flight: InFlight) -> bool:
        """Publish one batch's results, then commit exactly its offsets; False when stopping
        before it could be classified."""
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
        if not done:
            return False
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for record in flight.batch:
            tp = TopicPartition(record.topic, record.partition)
            if tp not in offsets or offsets[tp].offset <= record.offset:
                offsets[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
        self._commit(offsets)
        self.dead_letters.forget(flight.batch)
        return True

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
        the ML server is down (the batch is replayed later)."""
        if not kafka_io.with_bounded_attempts(batch, self._process_once, self.dead_letters,
                                              self.stop, self.settings.max_attempts):
            return False
        self._commit(None)
        self.dead_letters.forget(batch)
        return True

    def _process_once(self, batch: Sequence[ConsumerRecord]) -> bool:
        results = self._classify(self._decode(batch))
        if results is None:
            return False
        self._publish(results)
        return True

    def _decode(self, batch: Sequence[ConsumerRecord]):
        images: list[tuple[ConsumerRecord, messages.ImageMessage]] = []
        for record in batch:
            try:
                message = messages.decode(record.value,
                                          expected_size=self.settings.expected_image_size,
                                          max_image_bytes=self.settings.max_image_bytes)
            except messages.InvalidMessage as error:
                self.dead_letters.send(record, error)
                continue
            if isinstance(message, messages.ImageMessage):
                images.append((record, message))
            # Result messages appear here only in the single-topic design: not ours to process.
        return images

    def _publish(self, results: list[messages.ResultMessage]) -> None:
        futures = [
            self.producer.send(self.settings.kafka.results_topic,
                               key=result.unique_id.encode(), value=result.to_bytes())
            for result in results
        ]
        kafka_io.confirm_all(self.producer, futures, timeout_s=120)
        self.dead_letters.confirm()
        self.classified += len(results)

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata] | None) -> None:
        kafka_io.commit(self.consumer, offsets)

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
        delays = backoff()
        while True:
            try:
                model, predictions = self.ml.classify([m.image_png for m in images])
                break
            except MlUnavailable as exc:
                delay = next(delays)
                log.error("ML server unavailable (%s); retrying %d images in %.1fs",
                          exc, len(images), delay)
                if self.stop.wait(delay):
                    return None
        now = messages.utc_now()
        return [_result(message, model, prediction, now)
                for message, prediction in zip(images, predictions, strict=True)]

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=10)


def _result(message: messages.ImageMessage, model: str, prediction: dict,
            inferred_at: datetime) -> messages.ResultMessage:
    return messages.ResultMessage(
        unique_id=message.unique_id,
        inferred_value=prediction["label"],
        score=float(prediction["score"]),
        model=model,
        inferred_at=inferred_at,
        top_k=tuple((p["label"], float(p["score"])) for p in prediction.get("top_k", [])),
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"inference-consumer: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return run_until_stopped(lambda stop: InferenceConsumer(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
