"""Test harness: run the services against the fixtures' broker and database, read what they made."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import psycopg2
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from iot_pipeline import messages

ROOT = Path(__file__).resolve().parents[4]
CIFAR_DIR = Path(os.environ.get("IOT_TEST_CIFAR_DIR", ROOT / "shared/datasets/cifar-100"))
BIN = Path(sys.executable).parent
# The model the repo ships and the ml role deploys by default (files/models/).
MODEL_CARD = Path(__file__).resolve().parents[2] / "models" / "resnet50-cifar100.card.json"


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval=0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def service_env(bootstrap: str, topics, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOT_", "PG"))}
    # No metrics endpoint unless a test asks for one: two services of a test must not race for
    # a default port.
    env.update(IOT_KAFKA_BOOTSTRAP_SERVERS=bootstrap, IOT_LOG_LEVEL="INFO", IOT_METRICS_PORT="0",
               **topics.as_env())
    env.update(extra)
    return env


class Process:
    """A service as a real process, its output kept in a log file for failure messages."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode}:\n{self.log()}"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            message = f"{self.name} still running after {timeout}s:\n{self.log()}"
            raise AssertionError(message) from None

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_ml_server(port: int, log_dir: Path, env: dict[str, str]) -> Process:
    env = {**env, "IOT_ML_WEIGHTS": str(MODEL_CARD), "IOT_ML_TF_THREADS": "2",
           "GUNICORN_CMD_ARGS": f"--bind=127.0.0.1:{port} --workers=1 --threads=4 --timeout=120"}
    server = Process("ml-server", [str(BIN / "gunicorn"), "iot_pipeline.ml_server:create_app()"],
                     env, log_dir)

    def healthy() -> bool:
        server.assert_running()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(healthy, 180, "the ML server's /health")
    return server


@contextmanager
def running_in_thread(service):
    """Run a service object's ``run()`` in a thread; stop it gracefully on exit."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            service.run()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.stop.set()
        thread.join(60)
        service.close()
    assert not thread.is_alive(), "the service did not stop within 60 s"
    assert not errors, f"the service crashed: {errors[0]!r}"


def produce(bootstrap: str, topic: str, values: list[bytes | None], key: bytes = b"k") -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for value in values:
            producer.send(topic, key=key, value=value)
        producer.flush(30)
    finally:
        producer.close()


def read_all(bootstrap: str, topic: str, timeout: float = 10) -> list:
    """Every record in the topic now (from the beginning to the current end offsets)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def headers(record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def rows(dsn: str, sql: str = "SELECT unique_id, ground_truth, inferred_value, data, device_id "
         "FROM iot_image_data ORDER BY id") -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        try:
            cur.execute(sql)
        except psycopg2.errors.UndefinedTable:
            return []
        return cur.fetchall()


def count(dsn: str, where: str = "TRUE") -> int:
    found = rows(dsn, f"SELECT count(*) FROM iot_image_data WHERE {where}")
    return found[0][0] if found else 0


def image_message(unique_id: str, value: int = 0, label: str = "apple") -> messages.ImageMessage:
    import numpy as np

    pixels = np.full((32, 32, 3), value % 256, np.uint8)
    return messages.ImageMessage(unique_id, "device-0001", label, messages.encode_png(pixels),
                                 messages.utc_now())


def result_message(unique_id: str, label: str = "tabby") -> messages.ResultMessage:
    return messages.ResultMessage(unique_id, label, 0.5, "test-model", messages.utc_now(),
                                  ((label, 0.5),))
