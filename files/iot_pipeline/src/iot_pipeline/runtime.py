"""Process lifecycle shared by the services: logging, graceful stop on SIGTERM, retry backoff,
and how many cores the process may use."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
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


def usable_cpus(proc: Path = Path("/proc/self"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process can keep busy: its CPU affinity (a cpuset), capped by the tightest
    CPU quota of its cgroup and the cgroups above it (``docker --cpus``, systemd's
    ``CPUQuota=``), rounded up; at least 1.

    ``os.cpu_count()`` counts the host's cores whatever the limits, and a thread pool sized by
    it on a host limited to a fraction of a core spends its time waiting for its own threads.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(proc, cgroup_fs)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


def _cgroup_quota(proc: Path, cgroup_fs: Path) -> float | None:
    """The tightest CPU quota, in cores, of the process's cgroup and its ancestors; None if
    unlimited or unreadable. cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us``)."""
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            bases = [cgroup_fs]
        elif "cpu" in controllers.split(","):
            bases = [cgroup_fs / controllers, cgroup_fs / "cpu", cgroup_fs / "cpu,cpuacct"]
        else:
            continue
        for base in bases:
            if base.is_dir():
                limits += _quotas_along(base, path, v2=controllers == "")
                break
    return min(limits) if limits else None


def _quotas_along(base: Path, path: str, *, v2: bool) -> list[float]:
    limits = []
    directory = base / path.strip("/")
    while True:
        try:
            if v2:
                quota, period = (directory / "cpu.max").read_text().split()
            else:
                quota = (directory / "cpu.cfs_quota_us").read_text().strip()
                period = (directory / "cpu.cfs_period_us").read_text().strip()
            if quota not in {"max", "-1"} and int(period) > 0:
                limits.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
        if directory == base or base not in directory.parents:
            return limits
        directory = directory.parent
