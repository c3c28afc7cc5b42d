"""Every service: its Prometheus registry and the HTTP endpoint that serves it at /metrics.

The counters themselves live beside the work they count, in each service's module; this one
only gives them a registry (with the process's CPU, memory, start time and GC metrics) and
starts prometheus_client's HTTP server on the address and port of the settings. The ML server
serves its metrics through Flask instead (ml_server.py, multiprocess mode under gunicorn).
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)

from iot_pipeline.config import MetricsSettings

log = logging.getLogger(__name__)

# Seconds: from a few milliseconds (a Kafka ack, a small transaction) to a minute (a stalled call).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Records per batch: 1 up to the DB consumer's 500 (and beyond, in the +Inf bucket).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class MetricsError(RuntimeError):
    """The metrics endpoint could not be opened (address not on this host, port taken)."""


def registry() -> CollectorRegistry:
    """A fresh registry with this process's own metrics: one per service object, so that a test
    may build several services in one process without their counters colliding."""
    fresh = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        fresh.register(collector)
    return fresh


def serve(metrics_registry: CollectorRegistry, settings: MetricsSettings) -> WSGIServer | None:
    """Serve the registry at http://address:port/metrics from a daemon thread; None if port 0.

    Raises MetricsError naming the settings when the address or port cannot be bound.
    """
    if settings.port == 0:
        log.info("metrics endpoint disabled (IOT_METRICS_PORT=0)")
        return None
    try:
        server, _thread = start_http_server(settings.port, settings.address, metrics_registry)
    except OSError as exc:  # also socket.gaierror: an address that does not resolve
        raise MetricsError(
            f"cannot serve metrics on {settings.address}:{settings.port}: "
            f"{exc.strerror or exc} (IOT_METRICS_ADDRESS / IOT_METRICS_PORT)"
        ) from exc
    log.info("metrics at http://%s:%d/metrics", settings.address, settings.port)
    return server
