"""The ML server's /metrics under several gunicorn workers: prometheus_client's multiprocess mode.

Each simulated worker is a process of its own (as gunicorn forks them) sharing one
PROMETHEUS_MULTIPROC_DIR; whichever answers the scrape reports the sum of all of them, and the
gunicorn hooks (gunicorn_conf.py) empty the directory at start and retire a dead worker's gauges.
"""

import os
import subprocess
import sys
import types

from prometheus_client.parser import text_string_to_metric_families

from iot_pipeline import gunicorn_conf

WORKER = r"""
import base64, os, sys, time
import numpy as np
from iot_pipeline import messages, ml_server
from iot_pipeline.model import Prediction

mode, requests = sys.argv[1], int(sys.argv[2])
print("pid", os.getpid(), file=sys.stderr, flush=True)

class Stub:
    name, version = "stub", "v7"
    def classify(self, pixels, top_k=5):
        return [Prediction("x", 1.0, (("x", 1.0),)) for _ in pixels]

def factory(_settings):
    if mode == "broken":
        raise RuntimeError("no model here")
    return Stub()

client = ml_server.create_app(ml_server.Settings(weights="none"),
                              classifier_factory=factory).test_client()
deadline = time.monotonic() + 60
while client.get("/health").json["status"] == "loading" and time.monotonic() < deadline:
    time.sleep(0.01)
png = base64.b64encode(messages.encode_png(np.zeros((32, 32, 3), np.uint8))).decode()
for _ in range(requests):
    client.post("/predict", json={"images": [png] * 3})
client.post("/predict", json={"image": "%%%"})
if mode == "scrape":
    sys.stdout.write(client.get("/metrics").get_data(as_text=True))
"""


def worker(directory, mode, requests):
    """Runs one worker process to the end; returns it (its pid in the first line of stderr)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    process = subprocess.run([sys.executable, "-c", WORKER, mode, str(requests)], env=env,
                             capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 0, process.stderr
    return process


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def pid(process):
    return int(process.stderr.split("\n", 1)[0].removeprefix("pid "))


def test_a_scrape_sums_every_worker_and_a_dead_worker_stops_counting(tmp_path, monkeypatch):
    (tmp_path / "counter_999.db").write_bytes(b"left over from the previous start")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    gunicorn_conf.on_starting(None)
    assert list(tmp_path.iterdir()) == []

    broken = worker(tmp_path, "broken", 2)  # its model failed: 503s, model_loaded 0
    worker(tmp_path, "ok", 3)
    first = samples(worker(tmp_path, "scrape", 1).stdout)
    assert first[("iot_ml_requests_total", (("endpoint", "predict"), ("status", "503")))] == 3
    assert first[("iot_ml_requests_total", (("endpoint", "predict"), ("status", "200")))] == 4
    assert first[("iot_ml_requests_total", (("endpoint", "predict"), ("status", "400")))] == 2
    assert first[("iot_ml_images_total", ())] == 12
    assert first[("iot_ml_predict_seconds_count", ())] == 4
    assert first[("iot_ml_model_info", (("name", "stub"), ("version", "v7")))] == 1
    # livemin: a worker without its model counts until gunicorn reports it dead.
    assert first[("iot_ml_model_loaded", ())] == 0

    gunicorn_conf.child_exit(None, types.SimpleNamespace(pid=pid(broken)))
    second = samples(worker(tmp_path, "scrape", 0).stdout)
    assert second[("iot_ml_model_loaded", ())] == 1
    # Counters of exited workers stay in the sum: a scrape never sees them go backwards.
    assert second[("iot_ml_images_total", ())] == 12
    assert second[("iot_ml_requests_total", (("endpoint", "predict"), ("status", "400")))] == 3

