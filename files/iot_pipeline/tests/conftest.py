"""Integration-test fixtures: one real Kafka broker and one real PostgreSQL per session."""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

# The helper module sits beside this file; make it importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs the real Kafka broker and PostgreSQL that the fixtures start "
        "(deselect with -m 'not integration')",
    )


@contextlib.contextmanager
def _running(server: Any, start: Callable[[], T]) -> Iterator[T]:
    """Starts a server for a fixture, stops it after; a server that cannot start fails the run."""
    try:
        started = start()
    except servers.ServerError as exc:
        server.stop()
        pytest.fail(str(exc), pytrace=False)
    except BaseException:
        server.stop()
        raise
    try:
        yield started
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap "127.0.0.1:PORT" of a single-node KRaft Kafka; new topics get 3 partitions."""
    server = servers.KafkaServer(tmp_path_factory.mktemp("kafka"))
    with _running(server, server.start) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[servers.PostgresServer]:
    """PostgreSQL on 127.0.0.1, trust auth, superuser `postgres`; fails (never skips) if absent."""
    try:
        server = servers.PostgresServer()
    except servers.ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    with _running(server, server.start):
        yield server


@pytest.fixture
def pg_dsn(postgres_server: servers.PostgresServer) -> Iterator[str]:
    """libpq DSN (superuser) of a database created empty for this test and dropped after it."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    try:
        yield dsn
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def kafka_topics(kafka_bootstrap: str) -> Iterator[servers.Topics]:
    """Images/results/dead-letter topics unique to this test, created with 3 partitions."""
    topics = servers.unique_topics()
    servers.create_topics(kafka_bootstrap, topics.names, partitions=3)
    try:
        yield topics
    finally:
        servers.delete_topics(kafka_bootstrap, topics.names)
