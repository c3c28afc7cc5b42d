"""ML host: gunicorn's server hooks for the ML server's multiprocess metrics.

    gunicorn --config python:iot_pipeline.gunicorn_conf 'iot_pipeline.ml_server:create_app()'

The other settings come from GUNICORN_CMD_ARGS (roles/ml_server). With PROMETHEUS_MULTIPROC_DIR
set, every worker writes its metric values to files there (ml_server.Metrics): the master
empties the directory at start, so a restart does not add the previous run's counters, and
drops a dead worker's live gauges, so iot_ml_model_loaded reflects the workers now running.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess

log = logging.getLogger("iot_pipeline.gunicorn_conf")


def _directory() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def on_starting(_server: Any) -> None:
    """In the master, before any worker: start from an empty metrics directory."""
    directory = _directory()
    if directory is None:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    stale = list(path.glob("*.db"))
    for file in stale:
        file.unlink()
    if stale:
        log.info("removed %d metric files of a previous run from %s", len(stale), directory)


def child_exit(_server: Any, worker: Any) -> None:
    """In the master, once a worker has exited: its live gauges stop counting."""
    directory = _directory()
    if directory is not None:
        multiprocess.mark_process_dead(worker.pid, directory)
