"""Process lifecycle shared by the services: logging, graceful stop on SIGTERM, retry backoff."""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Protocol


def configure_logging(level: str) -> None:
    """Log lines to stderr, which systemd hands to journald."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kafka-python logs every reconnect attempt at WARNING/ERROR; ours say what matters.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))


class StopFlag:
    """Set by SIGTERM/SIGINT: the service finishes its current batch, commits, and exits 0."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> StopFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("%s received: stopping after the current batch",
                                         signal.Signals(signum).name)
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True at once if a stop was requested."""
        return self._event.wait(seconds)


class Service(Protocol):
    """A long-running consumer: run() until its StopFlag is set, close() once after."""

    def run(self) -> None: ...

    def close(self) -> None: ...


def run_until_stopped(make: Callable[[StopFlag], Service]) -> int:
    """Installs the SIGTERM/SIGINT handler, runs the service it makes, always closes it; exit 0."""
    service = make(StopFlag().install())
    try:
        service.run()
    finally:
        service.close()
    return 0


def backoff(initial: float = 0.5, maximum: float = 30.0) -> Iterator[float]:
    """Exponential delays with full jitter, capped: 0.5, 1, 2, ... 30 s."""
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(maximum, delay * 2)
