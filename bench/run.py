"""Benchmark of the local deployment, in one run (`make bench`): the targets as ratios within it.

1. Host limit: fp32 matmul FLOP/s on the ML host, and ResNet-50's FLOPs per image at the served
   input size (Conv2D + Dense multiply-adds counted from the Keras model's layer shapes).
2. Model alone, on the ML host: the served model card through the ML server's own code path
   (``Classifier.probabilities`` over uint8 pixels, in one process, no HTTP/PNG/Kafka) at batch 1,
   8, 64 and the inference consumer's batch size (read from its environment file on the ML
   host), with its CPU-seconds per image; and the ML server's batch-of-one latency over HTTP.
3. Pipeline: end-to-end images/s with the simulator at full speed (produced -> row stored with
   its prediction, from the DB timestamps) and the CPU time every container and service spent
   over it (bench/cpu.py, cgroup counters); then the latency distribution at half that rate.
4. Baseline: the original design (bench/baseline.py: one HTTP request and one ``model.predict``
   per image on the 224 px ImageNet-shaped ResNet-50, one acknowledged produce and one DB
   commit per message), on the same hosts.
5. Batch size 1: our services redeployed with one image per request/transaction and one commit
   per message (inference_consumer_batch_size=1, db_consumer_batch_size=1,
   db_consumer_commit_interval_ms=0), then the defaults.
6. Delivery modes: the full-speed run again with the inference consumer redeployed
   at-least-once (no Kafka transactions), beside step 3's exactly-once run.

Targets (top-level keys of the JSON): P1 = pipeline / model alone at the pipeline's batch size;
P1_cpu_share = the model's CPU time per image alone x images / all containers' CPU time over the
full-speed run; P2 = pipeline / baseline; P4_p99_ms = p99 produce-to-row latency at half rate.
scale_2 / scale_3 come from `make bench-scale` (bench/scale.py).

Writes bench/results/<stamp>.json, -throughput.png, -latency.png and -cpu.png, and prints a
table. Run from the repository root with the controller venv (PATH=.venv/bin:$PATH).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import Meter  # bench/cpu.py: cgroup CPU counters
from layout import layout, setting  # bench/layout.py: the deployed paths and settings

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parent.parent

MATMUL = """
import json, time, numpy as np
n = 4096
a = np.random.default_rng(0).random((n, n), dtype=np.float32)
b = np.random.default_rng(1).random((n, n), dtype=np.float32)
a @ b
runs = []
for _ in range(5):
    t = time.perf_counter(); a @ b; runs.append(time.perf_counter() - t)
print(json.dumps({"n": n, "seconds": runs, "flops": 2 * n ** 3 / min(runs)}))
"""

# Multiply-adds of every Conv2D and Dense layer from its shapes (BN, ReLU, add and pooling are
# <1% of the work and not counted); FLOPs = 2 x MACs.
MODEL_FLOPS = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
size, stem = int(sys.argv[1]), sys.argv[2]
if stem == "imagenet":
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
else:  # the served CIFAR-100 network (iot_pipeline.resnet): a 3x3/1 stem, 100 classes
    from iot_pipeline import resnet
    model = resnet.build(100, size, stem)
macs = {"conv2d": 0, "dense": 0}
for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
        _, h, w, c_out = layer.output.shape
        kh, kw = layer.kernel_size
        macs["conv2d"] += h * w * c_out * kh * kw * layer.input.shape[-1]
    elif isinstance(layer, keras.layers.Dense):
        macs["dense"] += layer.input.shape[-1] * layer.units
print(json.dumps({"input_size": size, "macs": macs, "flops": 2 * sum(macs.values()),
                  "params": model.count_params()}))
"""


def run(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def py_on(host: str, script: str, *args: str) -> dict:
    out = run(["docker", "exec", "-i", host, layout().python, "-", *args], stdin=script)
    return json.loads(out.strip().splitlines()[-1])


class Db:
    def __init__(self, host: str) -> None:
        self.host = host

    def query(self, sql: str) -> list[list[str]]:
        out = run(["docker", "exec", "-u", "postgres", self.host, "psql", "iot", "-X", "-A",
                   "-t", "-q", "-F", "|", "-c", sql])
        return [line.split("|") for line in out.splitlines() if line]

    def max_id(self) -> int:
        return int(self.query("SELECT coalesce(max(id), 0) FROM iot_image_data")[0][0])

    def complete(self, after_id: int) -> int:
        return int(self.query(
            f"SELECT count(*) FROM iot_image_data WHERE id > {after_id}"
            " AND inferred_value IS NOT NULL AND data IS NOT NULL")[0][0])

    def pending(self) -> int:
        return int(self.query("SELECT count(*) FROM iot_image_data WHERE inferred_value IS NULL"
                              " OR data IS NULL")[0][0])

    def timings(self, after_id: int) -> np.ndarray:
        """(produced, stored, inferred, image stored, result stored) epoch seconds of the
        complete rows after ``after_id``; stored is the later of the two writes."""
        rows = self.query(
            "SELECT extract(epoch FROM produced_at),"
            " extract(epoch FROM greatest(image_stored_at, result_stored_at)),"
            " extract(epoch FROM inferred_at), extract(epoch FROM image_stored_at),"
            " extract(epoch FROM result_stored_at)"
            f" FROM iot_image_data WHERE id > {after_id}"
            " AND inferred_value IS NOT NULL AND data IS NOT NULL")
        return np.array([[float(x) for x in row] for row in rows]).reshape(-1, 5)


def wait_idle(db: Db, timeout_s: float = 600) -> None:
    """Until nothing moves: no new row and no row completed between two looks 3 s apart. Rows
    that never complete (a result whose image was dead-lettered, as make chaos's poison sends)
    do not keep it waiting."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        now = (db.max_id(), db.pending())
        if now == last:
            return
        last = now
        time.sleep(3)
    raise RuntimeError("the pipeline did not become idle")


# --- 1. host limit ----------------------------------------------------------------------------
def host_limit(ml_host: str, input_size: int, stem: str) -> dict:
    log.info("host limit: numpy 4096x4096 fp32 matmul on %s", ml_host)
    matmul = py_on(ml_host, MATMUL)
    log.info("host limit: ResNet-50 FLOPs at %dx%d from the Keras layers", input_size, input_size)
    model = py_on(ml_host, MODEL_FLOPS, str(input_size), stem)
    return {"matmul": matmul, "model": model}


# --- 2. model alone ---------------------------------------------------------------------------
# Runs on the ML host with its venv: the ML server's model card and code path, images from stdin.
MODEL_IN_HOST = """
import io, json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
env_file, seconds, batches = sys.argv[1], float(sys.argv[2]), [int(b) for b in sys.argv[3:]]
env = {}
for line in open(env_file).read().splitlines():
    if "=" in line and not line.startswith("#"):
        key, value = line.split("=", 1)
        env[key] = value.strip('"')
images = np.load(io.BytesIO(sys.stdin.buffer.read()))["images"]
from iot_pipeline.model import Classifier
from iot_pipeline.ml_server import Settings
settings = Settings.from_env(env)
classifier = Classifier(settings.weights, settings.input_size, settings.tf_threads,
                        settings.runtime, settings.model_cache_dir)
out = {"model": classifier.name, "version": classifier.version, "runtime": classifier.runtime,
       "input_size": classifier.input_size, "batches": {}}
rng = np.random.default_rng(0)
for batch in batches:
    for _ in range(3):
        classifier.probabilities(images[rng.integers(0, len(images), batch)])
    calls, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds or calls < 5:
        classifier.probabilities(images[rng.integers(0, len(images), batch)])
        calls += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    out["batches"][str(batch)] = {"calls": calls, "images_per_s": batch * calls / wall,
                                  "cpu_ms_per_image": 1000 * cpu / (batch * calls)}
print(json.dumps(out))
"""


def test_images(dataset: Path, count: int) -> np.ndarray:
    return np.load(dataset / "test.npz")["images"][:count]


def model_in_host(ml_host: str, images: np.ndarray, batches: list[int], seconds: float) -> dict:
    buffer = io.BytesIO()
    np.savez(buffer, images=images)
    done = subprocess.run(
        ["docker", "exec", "-i", ml_host, layout().python, "-c", MODEL_IN_HOST,
         layout().env_file("iot-ml-server"), str(seconds), *map(str, batches)],
        input=buffer.getvalue(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"model alone on {ml_host} failed:\n{done.stderr.decode()[-2000:]}")
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    for batch, m in out["batches"].items():
        log.info("model alone on %s, batch %s: %.1f images/s, %.2f CPU-ms/image", ml_host, batch,
                 m["images_per_s"], m["cpu_ms_per_image"])
    return out


def pngs_b64(images: np.ndarray) -> list[str]:
    out = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def predict(url: str, images: list[str]) -> float:
    body = json.dumps({"images": images}).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.load(response)
    elapsed = time.perf_counter() - started
    if len(answer["predictions"]) != len(images):
        raise RuntimeError("wrong number of predictions")
    return elapsed


def model_http(url: str, pngs: list[str], batches: list[int], seconds: float) -> dict:
    """The ML server over HTTP from the controller, one request at a time."""
    results = {}
    offset = 0
    for batch in batches:
        def take(n: int) -> list[str]:
            nonlocal offset
            chunk = [pngs[(offset + i) % len(pngs)] for i in range(n)]
            offset += n
            return chunk

        predict(url, take(batch))  # warm-up: first call at a new batch shape
        times: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(times) < 5:
            times.append(predict(url, take(batch)))
        elapsed = time.perf_counter() - started
        results[str(batch)] = {
            "requests": len(times), "images_per_s": batch * len(times) / elapsed,
            "latency_p50_s": float(np.percentile(times, 50)),
            "latency_p99_s": float(np.percentile(times, 99)),
        }
        log.info("ML server over HTTP, batch %d: %.1f images/s, request p50 %.0f ms", batch,
                 results[str(batch)]["images_per_s"], 1000 * results[str(batch)]["latency_p50_s"])
    return results


# --- 3. pipeline ------------------------------------------------------------------------------
def containers() -> list[str]:
    """The local hosts: the containers on the pipeline's Docker network."""
    out = run(["docker", "ps", "--filter", "network=iot-pipeline", "--format", "{{.Names}}"])
    return sorted(out.split())


def simulate(sim_host: str, images: int, rate: float) -> None:
    run(["docker", "exec", sim_host, "systemd-run", "--wait", "--pipe", "--quiet", "--collect",
         "--unit", f"iot-simulator-bench-{int(time.time())}",
         *layout().run_as("iot-simulator"),
         layout().script("iot-simulator"), "--count", str(images),
         "--rate", f"{rate:g}", "--progress-s", "0"])


def predict_seconds(url: str) -> float:
    """Seconds the ML server (its one worker) spent classifying so far, from /metrics."""
    with urllib.request.urlopen(url.replace("/predict", "/metrics"), timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("iot_ml_predict_seconds_sum "):
                return float(line.split()[1])
    return float("nan")


def cpu_per_image(spent: dict, images: int) -> dict:
    """CPU-ms per image of each container and service, and the totals."""
    out = {host: {part: round(1000 * s / images, 3) for part, s in parts.items()}
           for host, parts in spent.items()}
    out["all"] = round(sum(1000 * parts["total"] / images for parts in spent.values()), 3)
    return out


def pipeline_run(db: Db, sim_host: str, images: int, rate: float, timeout_s: float,
                 url: str, meter: Meter | None = None) -> dict:
    wait_idle(db)
    start_id = db.max_id()
    busy_before = predict_seconds(url)
    log.info("pipeline: %d images at %s (rows after id %d)", images,
             f"{rate:g} images/s" if rate else "full speed", start_id)
    before = meter.snapshot() if meter else None
    simulate(sim_host, images, rate)
    deadline = time.monotonic() + timeout_s
    while (done := db.complete(start_id)) < images:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {images} rows complete after {timeout_s:.0f}s")
        # Each look is a `docker exec psql` on the database host, counted in its CPU: seldom.
        time.sleep(2)
    after = meter.snapshot() if meter else None
    busy = predict_seconds(url) - busy_before
    t = db.timings(start_id)
    latency = t[:, 1] - t[:, 0]
    span = t[:, 1].max() - t[:, 0].min()
    result = {
        "images": len(t), "rate": rate, "span_s": float(span),
        "images_per_s": float(len(t) / span),
        "produce_s": float(t[:, 0].max() - t[:, 0].min()),
        # Share of the run the model was classifying (the rest: waiting for the consumer).
        "model_busy_fraction": float(busy / span),
        "latency_s": {f"p{q}": float(np.percentile(latency, q)) for q in (50, 95, 99)},
        "latency_max_s": float(latency.max()),
        # Where the time goes, per row: produced -> classified (Kafka, the inference consumer's
        # queue, the ML call), classified -> result stored (the results transaction, the DB
        # writer's batch), and produced -> image stored (the image's own path to the table).
        "stages_ms": {
            name: {f"p{q}": round(1000 * float(np.percentile(d, q)), 1) for q in (50, 95, 99)}
            for name, d in (("produced_to_inferred", t[:, 2] - t[:, 0]),
                            ("inferred_to_result_stored", t[:, 4] - t[:, 2]),
                            ("produced_to_image_stored", t[:, 3] - t[:, 0]))},
        "latencies": [round(float(x), 4) for x in latency],
    }
    if meter:
        result["cpu_s"] = Meter.delta(before, after)
        result["cpu_ms_per_image"] = cpu_per_image(result["cpu_s"], len(t))
    log.info("pipeline: %.1f images/s over %.1fs (model busy %.0f%%); latency p50 %.3fs p99 %.3fs"
             "%s", result["images_per_s"], span, 100 * result["model_busy_fraction"],
             result["latency_s"]["p50"], result["latency_s"]["p99"],
             f"; {result['cpu_ms_per_image']['all']:.1f} CPU-ms/image" if meter else "")
    return result


# Exit status 0 when the URL answers 200 (the hosts have python3, not always curl).
HEALTH = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)"


# POSTs stdin as JSON to argv[1] (the baseline server's warm-up request).
POST = ("import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], "
        "data=sys.stdin.buffer.read(), headers={'Content-Type': 'application/json'}), "
        "timeout=300).read()")


# --- 4. baseline ------------------------------------------------------------------------------
BASELINE_DIR = "/var/tmp/iot-bench"


class Baseline:
    """bench/baseline.py on the hosts: server + classify on the ML host, produce on the
    simulator, store on the database host."""

    def __init__(self, db: Db, sim_host: str, ml_host: str) -> None:
        self.db, self.sim_host, self.ml_host = db, sim_host, ml_host
        self.id = datetime.now(UTC).strftime("%Y%m%dt%H%M%S")
        self.server_unit = f"iot-bench-baseline-server-{self.id}"

    def _copy(self, host: str) -> None:
        run(["docker", "exec", host, "install", "-d", "-m", "0755", BASELINE_DIR])
        run(["docker", "cp", str(REPO / "bench" / "baseline.py"), f"{host}:{BASELINE_DIR}/"])
        run(["docker", "exec", host, "chmod", "0644", f"{BASELINE_DIR}/baseline.py"])

    def _part(self, host: str, service: str, part: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["docker", "exec", host, "systemd-run", "--wait", "--pipe", "--quiet", "--collect",
             "--unit", f"iot-bench-baseline-{part}-{self.id}", *layout().run_as(service),
             "-p", f"WorkingDirectory={BASELINE_DIR}", layout().python,
             f"{BASELINE_DIR}/baseline.py", part, "--run", self.id, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def _result(proc: subprocess.Popen, timeout_s: float) -> dict:
        out, err = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"baseline part failed ({proc.returncode}): {err[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def prepare(self) -> None:
        for host in {self.sim_host, self.ml_host, self.db.host}:
            self._copy(host)
        from baseline import SCHEMA, TABLE

        # Created by the superuser; the roles that write iot_image_data write it too.
        writers = [row[0] for row in self.db.query(
            "SELECT DISTINCT grantee FROM information_schema.role_table_grants"
            " WHERE table_name = 'iot_image_data' AND privilege_type = 'INSERT'")]
        self.db.query(f"DROP TABLE IF EXISTS {TABLE}; {SCHEMA}; "
                      + "".join(f'GRANT SELECT, INSERT, UPDATE ON {TABLE} TO "{w}";'
                                for w in writers))
        run(["docker", "exec", self.ml_host, "systemd-run", "--unit", self.server_unit,
             *layout().run_as("iot-ml-server"), "-p", f"WorkingDirectory={BASELINE_DIR}",
             "-p", "Environment=TF_CPP_MIN_LOG_LEVEL=3", layout().script("gunicorn"),
             "--bind", "127.0.0.1:8100", "--workers", "1", "--timeout", "300",
             "--chdir", BASELINE_DIR, "baseline:server()"])
        deadline = time.monotonic() + 300
        while True:
            probe = subprocess.run(["docker", "exec", self.ml_host, "python3", "-c", HEALTH,
                                    "http://127.0.0.1:8100/health"], capture_output=True,
                                   check=False)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the baseline server did not answer /health in 300 s")
            time.sleep(2)
        # One request first, outside the timed run: Keras builds model.predict's function on
        # its first call, as a long-running server of the original design has long since done.
        image = pngs_b64(np.zeros((1, 32, 32, 3), np.uint8))[0]
        run(["docker", "exec", "-i", self.ml_host, "python3", "-c", POST,
             "http://127.0.0.1:8100/predict"], stdin=json.dumps({"image": image}))

    def run(self, images: int) -> dict:
        log.info("baseline (original design): %d images", images)
        parts = [self._part(self.ml_host, "iot-inference-consumer", "classify",
                            "--count", str(images)),
                 self._part(self.db.host, "iot-db-consumer", "store", "--count", str(images))]
        produced = self._result(self._part(self.sim_host, "iot-simulator", "produce",
                                           "--count", str(images)), 600)
        done = [self._result(p, 60 + 5 * images) for p in parts]
        from baseline import TABLE

        rows = self.db.query(
            "SELECT count(*), extract(epoch FROM max(greatest(image_stored_at, result_stored_at))"
            f" - min(produced_at)) FROM {TABLE}"
            " WHERE inferred_value IS NOT NULL AND data IS NOT NULL")
        complete, span = int(rows[0][0]), float(rows[0][1])
        if complete != images:
            raise RuntimeError(f"baseline: {complete} of {images} rows complete")
        result = {"images": complete, "span_s": span, "images_per_s": complete / span,
                  "parts": [produced, *done]}
        log.info("baseline: %.2f images/s over %.1fs", result["images_per_s"], span)
        return result

    def close(self) -> None:
        subprocess.run(["docker", "exec", self.ml_host, "systemctl", "stop", self.server_unit],
                       capture_output=True, check=False)
        try:
            self._result(self._part(self.sim_host, "iot-simulator", "cleanup"), 120)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log.warning("baseline topics of run %s not deleted: %s", self.id, exc)
        from baseline import TABLE

        self.db.query(f"DROP TABLE IF EXISTS {TABLE}")


# --- 5. batch size 1 --------------------------------------------------------------------------
SEED_VARS = {"inference_consumer_batch_size": 1, "db_consumer_batch_size": 1,
             "db_consumer_commit_interval_ms": 0}


def redeploy(extra: dict) -> None:
    argv = ["ansible-playbook", "playbooks/database.yml", "playbooks/ml.yml"]
    for key, value in extra.items():
        argv += ["-e", f"{key}={value}"]
    log.info("redeploy: %s", " ".join(argv[1:]) or "defaults")
    run(argv)


# --- 6. delivery modes ------------------------------------------------------------------------
def delivery_modes(db: Db, args: argparse.Namespace, full_n: int,
                   exactly_once: dict | None = None) -> dict:
    """Full-speed images/s with exactly-once results (the default) and at-least-once."""
    runs = {}
    if exactly_once is None:
        exactly_once = pipeline_run(db, args.sim_host, full_n, 0, 600, args.url)
    runs["exactly_once"] = exactly_once
    try:
        redeploy({"inference_consumer_delivery": "at_least_once"})
        runs["at_least_once"] = pipeline_run(db, args.sim_host, full_n, 0, 600, args.url)
    finally:
        redeploy({})
    summary = {mode: {"images": run_["images"], "images_per_s": round(run_["images_per_s"], 1),
                      "latency_p50_s": round(run_["latency_s"]["p50"], 3),
                      "latency_p99_s": round(run_["latency_s"]["p99"], 3)}
               for mode, run_ in runs.items()}
    ratio = runs["exactly_once"]["images_per_s"] / runs["at_least_once"]["images_per_s"]
    log.info("delivery: exactly-once %.1f images/s, at-least-once %.1f (ratio %.2f)",
             runs["exactly_once"]["images_per_s"], runs["at_least_once"]["images_per_s"], ratio)
    return {**summary, "exactly_once_over_at_least_once": round(ratio, 3),
            "runs": {mode: {k: v for k, v in run_.items() if k != "latencies"}
                     for mode, run_ in runs.items()}}


# --- report -----------------------------------------------------------------------------------
TARGETS = {  # key: (what, bound, holds when)
    "P1": ("pipeline images/s / model alone at the pipeline's batch size", 0.75, "min"),
    "P1_cpu_share": ("model CPU time / all containers' CPU time, full-speed run", 0.6, "min"),
    "P2": ("pipeline images/s / original-design baseline", 20.0, "min"),
    "P4_p99_ms": ("p99 produce-to-row latency at half rate, ms", 100.0, "max"),
    "scale_2": ("2 ML hosts / 1, same CPU quota each (make bench-scale)", 1.8, "min"),
    "scale_3": ("3 ML hosts / 1, same CPU quota each (make bench-scale)", 2.5, "min"),
}


def targets(r: dict) -> dict:
    batch = str(r["pipeline_batch"])
    alone = r["model_alone"]["batches"][batch]
    full = r["pipeline"]["full"]
    figures = {
        "P1": full["images_per_s"] / alone["images_per_s"],
        "P1_cpu_share": alone["cpu_ms_per_image"] / full["cpu_ms_per_image"]["all"],
        "P4_p99_ms": 1000 * r["pipeline"]["half"]["latency_s"]["p99"],
    }
    if "baseline" in r:
        figures["P2"] = full["images_per_s"] / r["baseline"]["images_per_s"]
    out = {}
    for key, value in figures.items():
        what, bound, sense = TARGETS[key]
        holds = value >= bound if sense == "min" else value <= bound
        out[key] = {"value": round(value, 3), "target": f"{'>=' if sense == 'min' else '<='} "
                    f"{bound:g}", "holds": holds, "what": what}
    return out


def table(r: dict) -> str:
    batch = str(r["pipeline_batch"])
    full, half = r["pipeline"]["full"], r["pipeline"]["half"]
    lines = ["| measure | value |", "| --- | --- |",
             (f"| host fp32 matmul (numpy 4096^2, ml host) | {r['host']['matmul']['flops'] / 1e9:.0f}"
             " GFLOP/s |")]
    for b, m in r["model_alone"]["batches"].items():
        lines.append(f"| model alone on the ML host, batch {b} | {m['images_per_s']:.1f} images/s,"
                     f" {m['cpu_ms_per_image']:.2f} CPU-ms/image |")
    lines += [
        (f"| ML server over HTTP, batch 1 (p50 latency) | {1000 * r['http']['1']['latency_p50_s']:.0f}"
        " ms |"),
        (f"| pipeline, simulator full speed | {full['images_per_s']:.1f} images/s,"
        f" {full['cpu_ms_per_image']['all']:.2f} CPU-ms/image (all containers) |"),
        f"| latency at {half['rate']:g} images/s (half) p50 / p95 / p99 | "
        + " / ".join(f"{1000 * half['latency_s'][q]:.0f}" for q in ("p50", "p95", "p99")) + " ms |",
    ]
    for stage, q in half.get("stages_ms", {}).items():
        lines.append(f"| half rate, {stage.replace('_', ' ')} p50 / p95 / p99 | "
                     f"{q['p50']:.0f} / {q['p95']:.0f} / {q['p99']:.0f} ms |")
    if "baseline" in r:
        lines.append(f"| original-design baseline (bench/baseline.py) "
                     f"| {r['baseline']['images_per_s']:.2f} images/s |")
    if "seed" in r:
        lines.append(f"| our services at batch size 1 | {r['seed']['images_per_s']:.1f} images/s |")
    if "delivery" in r:
        d = r["delivery"]
        lines.append(f"| at-least-once / exactly-once results | {d['at_least_once']['images_per_s']}"
                     f" / {d['exactly_once']['images_per_s']} images/s |")
    lines += ["", "| CPU-ms per image (full-speed run) | total | services |", "| --- | --- | --- |"]
    for host, parts in full["cpu_ms_per_image"].items():
        if host == "all":
            continue
        services = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if k != "total")
        lines.append(f"| {host} | {parts['total']:.2f} | {services} |")
    lines += ["", f"| target (pipeline batch {batch}) | value | bound | holds |",
              "| --- | --- | --- | --- |"]
    for key in TARGETS:
        t = r.get(key)
        if isinstance(t, dict):
            lines.append(f"| {key}: {t['what']} | {t['value']} | {t['target']} | {t['holds']} |")
        else:
            lines.append(f"| {key}: {TARGETS[key][0]} | not measured here | | |")
    return "\n".join(lines)


def plots(r: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = str(r["pipeline_batch"])
    names = [f"model alone\nbatch {b}" for b in r["model_alone"]["batches"]]
    values = [m["images_per_s"] for m in r["model_alone"]["batches"].values()]
    colors = ["#4c72b0"] * len(values)
    for label, key, color in (("pipeline\n(full speed)", "pipeline", "#55a868"),
                              ("batch size 1", "seed", "#dd8452"),
                              ("original design\n(baseline)", "baseline", "#c44e52")):
        if key in r:
            names.append(label)
            values.append((r[key]["full"] if key == "pipeline" else r[key])["images_per_s"])
            colors.append(color)
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("images/s")
    ax.set_title(f"Throughput, pipeline batch {batch} ({r['machine']})")
    fig.tight_layout()
    throughput = stem.with_name(stem.name + "-throughput.png")
    fig.savefig(throughput, dpi=110)
    plt.close(fig)

    half = r["pipeline"]["half"]
    ms = 1000 * np.array(half["latencies"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(ms, bins=60, color="#4c72b0")
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ax.axvline(1000 * half["latency_s"][q], color="k", linestyle=style,
                   label=f"{q} {1000 * half['latency_s'][q]:.0f} ms")
    ax.axvline(TARGETS["P4_p99_ms"][1], color="#c44e52", label="P4 bound 100 ms")
    ax.set_xlabel("latency, produced -> stored with its prediction (ms)")
    ax.set_ylabel("images")
    ax.set_title(f"{half['images']} images at {half['rate']:g} images/s (half of full speed)")
    ax.legend()
    fig.tight_layout()
    latency = stem.with_name(stem.name + "-latency.png")
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    per = r["pipeline"]["full"]["cpu_ms_per_image"]
    fig, ax = plt.subplots(figsize=(9, 4))
    left = 0.0
    model = r["model_alone"]["batches"][batch]["cpu_ms_per_image"]
    ax.barh(["model alone"], [model], color="#4c72b0")
    for host, parts in per.items():
        if host == "all":
            continue
        for part, value in parts.items():
            if part == "total" or value < 0.05:
                continue
            ax.barh(["pipeline"], [value], left=left, label=f"{host}: {part}")
            left += value
    ax.set_xlabel("CPU-ms per image")
    ax.set_title("Where the CPU goes, full-speed run")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    cpu = stem.with_name(stem.name + "-cpu.png")
    fig.savefig(cpu, dpi=110)
    plt.close(fig)
    return [throughput, latency, cpu]


def deployed_batch(ml_host: str) -> int:
    """The inference consumer's batch size as deployed on ``ml_host`` (its environment file:
    what a run with ``-e inference_consumer_batch_size=N`` set), else as the inventory sets it."""
    done = subprocess.run(["docker", "exec", ml_host, "cat",
                           layout().env_file("iot-inference-consumer")],
                          capture_output=True, text=True, check=False)
    found = re.search(r'^IOT_INFER_BATCH_SIZE="?(\d+)"?$', done.stdout, re.MULTILINE)
    if found:
        return int(found.group(1))
    log.warning("no IOT_INFER_BATCH_SIZE on %s: the inventory's value", ml_host)
    return int(setting("inference_consumer", "inference_consumer_batch_size", ml_host))


def measure_all(args: argparse.Namespace, db: Db, r: dict) -> None:
    """Steps 1-6 into ``r`` (filled as they go: a failure keeps what was measured)."""
    batch = deployed_batch(args.ml_host)
    r["pipeline_batch"] = batch
    r["host"] = host_limit(args.ml_host, args.input_size, args.stem)
    images = test_images(args.dataset, 512)
    wait_idle(db)
    r["model_alone"] = model_in_host(args.ml_host, images, sorted({1, 8, batch, 64}), args.seconds)
    r["http"] = model_http(args.url, pngs_b64(images[:64]), [1], args.seconds)
    best = max(m["images_per_s"] for m in r["model_alone"]["batches"].values())
    full_n = max(300, int(best * args.pipeline_seconds / 2))
    meter = Meter(containers())
    r["pipeline"] = {"full": pipeline_run(db, args.sim_host, full_n, 0, 60 + 10 * full_n / best,
                                         args.url, meter)}
    half_rate = round(r["pipeline"]["full"]["images_per_s"] / 2, 1)
    half_n = max(200, int(half_rate * args.pipeline_seconds))
    r["pipeline"]["half"] = pipeline_run(db, args.sim_host, half_n, half_rate,
                                         60 + 3 * args.pipeline_seconds, args.url, meter)
    if not args.skip_baseline:
        baseline = Baseline(db, args.sim_host, args.ml_host)
        try:
            baseline.prepare()
            before = meter.snapshot()
            r["baseline"] = baseline.run(args.baseline_images)
            r["baseline"]["cpu_ms_per_image"] = cpu_per_image(
                Meter.delta(before, meter.snapshot()), args.baseline_images)
        finally:
            baseline.close()
    if not args.skip_seed:
        try:
            redeploy(SEED_VARS)
            seed_n = max(100, int(full_n / 3))
            r["seed"] = pipeline_run(db, args.sim_host, seed_n, 0, 60 + 20 * seed_n / best,
                                     args.url, meter)
            r["seed"]["vars"] = SEED_VARS
        finally:
            redeploy({})
    if not args.skip_delivery:
        r["delivery"] = delivery_modes(db, args, full_n, exactly_once=r["pipeline"]["full"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared/datasets/cifar-100")
    parser.add_argument("--url", default="http://127.0.0.1:8000/predict")
    parser.add_argument("--ml-host", default="iot-ml")
    parser.add_argument("--db-host", default="iot-db")
    parser.add_argument("--sim-host", default="iot-simulator")
    parser.add_argument("--input-size", type=int, default=32, help="served model input edge")
    parser.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"),
                        help="served network's stem: cifar (the repo's model) or imagenet")
    parser.add_argument("--seconds", type=float, default=10, help="per model-alone batch size")
    parser.add_argument("--pipeline-seconds", type=float, default=30,
                        help="about how long each pipeline run produces")
    parser.add_argument("--baseline-images", type=int, default=120)
    parser.add_argument("--skip-baseline", action="store_true", help="no original-design run")
    parser.add_argument("--skip-seed", action="store_true", help="no batch-size-1 redeploy")
    parser.add_argument("--skip-delivery", action="store_true",
                        help="no at-least-once redeploy (step 6)")
    parser.add_argument("--only-delivery", action="store_true",
                        help="only the full-speed run in each delivery mode (steps 3 and 6)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    db = Db(args.db_host)
    r: dict = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": f"{run(['nproc']).strip()} shared cores"}
    if args.only_delivery:
        r["delivery"] = delivery_modes(db, args, full_n=max(200, int(60 * args.pipeline_seconds)))
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / datetime.now(UTC).strftime("delivery-%Y%m%dT%H%M%SZ.json")
        path.write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps({k: v for k, v in r["delivery"].items() if k != "runs"}, indent=1))
        print(f"wrote {path}")
        return 0
    try:
        measure_all(args, db, r)
    except BaseException:
        args.out.mkdir(parents=True, exist_ok=True)
        partial = args.out / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-partial.json")
        partial.write_text(json.dumps(r, indent=1) + "\n")
        log.error("failed; what was measured is in %s", partial)
        raise
    r.update(targets(r))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    stem.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    written = plots(r, stem)
    print(table(r))
    print(f"\nwrote {stem.with_suffix('.json')}, " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
