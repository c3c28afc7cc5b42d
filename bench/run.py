"""Benchmark of the local four-host deployment, in one run (`make bench`).

1. Host limit: fp32 matmul FLOP/s on the ML host, and ResNet-50's FLOPs per image at the served
   input size (Conv2D + Dense multiply-adds counted from the Keras model's layer shapes).
2. Model alone: the ML server's images/s at batch 1, 8, 32 over HTTP from the controller, and
   its batch-of-one latency.
3. Pipeline: end-to-end images/s with the simulator at full speed (produced -> row stored with
   its prediction, from the DB timestamps), then the latency distribution at half that rate.
4. Seed-style: the same hosts redeployed with one image per request/transaction and one commit
   per message (inference_consumer_batch_size=1, db_consumer_batch_size=1), then the defaults
   redeployed.
5. Delivery modes: the full-speed pipeline run again with the inference consumer redeployed
   at-least-once (no Kafka transactions), beside the default exactly-once run of step 3: the
   throughput cost of exactly-once results (--only-delivery runs steps 3 and 5 alone).

Writes bench/results/<stamp>.json, <stamp>-throughput.png, <stamp>-latency.png and prints a
table. Run from the repository root with the controller venv (PATH=.venv/bin:$PATH).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout import layout  # bench/layout.py: the deployed paths

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
        """(produced, stored) epoch seconds of the complete rows after ``after_id``."""
        rows = self.query(
            "SELECT extract(epoch FROM produced_at),"
            " extract(epoch FROM greatest(image_stored_at, result_stored_at))"
            f" FROM iot_image_data WHERE id > {after_id}"
            " AND inferred_value IS NOT NULL AND data IS NOT NULL")
        return np.array([[float(a), float(b)] for a, b in rows]).reshape(-1, 2)


def wait_idle(db: Db, timeout_s: float = 600) -> None:
    """Until no row waits for its image or prediction and the count stops growing."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        now = db.max_id()
        if db.pending() == 0 and now == last:
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
def cifar_pngs(dataset: Path, count: int) -> list[str]:
    images = np.load(dataset / "test.npz")["images"][:count]
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


def model_alone(url: str, pngs: list[str], batches: list[int], seconds: float) -> dict:
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
        log.info("model alone, batch %d: %.1f images/s, request p50 %.0f ms", batch,
                 results[str(batch)]["images_per_s"], 1000 * results[str(batch)]["latency_p50_s"])
    return results


# --- 3. pipeline ------------------------------------------------------------------------------
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


def pipeline_run(db: Db, sim_host: str, images: int, rate: float, timeout_s: float,
                 url: str) -> dict:
    wait_idle(db)
    start_id = db.max_id()
    busy_before = predict_seconds(url)
    log.info("pipeline: %d images at %s (rows after id %d)", images,
             f"{rate:g} images/s" if rate else "full speed", start_id)
    simulate(sim_host, images, rate)
    deadline = time.monotonic() + timeout_s
    while (done := db.complete(start_id)) < images:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {images} rows complete after {timeout_s:.0f}s")
        time.sleep(1)
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
        "latencies": [round(float(x), 4) for x in latency],
    }
    log.info("pipeline: %.1f images/s over %.1fs (model busy %.0f%%); latency p50 %.3fs p99 %.3fs",
             result["images_per_s"], span, 100 * result["model_busy_fraction"],
             result["latency_s"]["p50"], result["latency_s"]["p99"])
    return result


# --- 4. seed-style ----------------------------------------------------------------------------
SEED_VARS = {"inference_consumer_batch_size": 1, "db_consumer_batch_size": 1}


def redeploy(extra: dict) -> None:
    argv = ["ansible-playbook", "playbooks/database.yml", "playbooks/ml.yml"]
    for key, value in extra.items():
        argv += ["-e", f"{key}={value}"]
    log.info("redeploy: %s", " ".join(argv[1:]) or "defaults")
    run(argv)


# --- 5. delivery modes ------------------------------------------------------------------------
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
def table(r: dict) -> str:
    flops_img = r["host"]["model"]["flops"]
    host = r["host"]["matmul"]["flops"]
    best_b, _ = max(r["model"].items(), key=lambda kv: kv[1]["images_per_s"])
    b1 = r["model"]["1"]["latency_p50_s"]
    pipe = r["pipeline"]["full"]["images_per_s"]
    half = r["pipeline"]["half"]["latency_s"]
    lines = [
        "| measure | value |", "| --- | --- |",
        f"| host fp32 matmul (numpy 4096^2, ml host) | {host / 1e9:.0f} GFLOP/s |",
        (f"| ResNet-50 FLOPs/image at {r['host']['model']['input_size']}px (Conv2D+Dense) "
        f"| {flops_img / 1e9:.2f} GFLOP |"),
        *(f"| model alone, batch {b} | {m['images_per_s']:.1f} images/s "
          f"({m['images_per_s'] * flops_img / 1e9:.0f} GFLOP/s) |" for b, m in r["model"].items()),
        f"| batch-of-one latency (HTTP, p50) | {1000 * b1:.0f} ms |",
        f"| pipeline, simulator full speed | {pipe:.1f} images/s |",
        (f"| e2e latency at {r['pipeline']['half']['rate']:g} images/s (half) p50 / p95 / p99 "
        f"| {1000 * half['p50']:.0f} / {1000 * half['p95']:.0f} / {1000 * half['p99']:.0f} ms |"),
    ]
    if "seed" in r:
        lines.append(f"| seed-style (batch 1, commit per message) "
                     f"| {r['seed']['images_per_s']:.1f} images/s |")
    t = r["targets"]
    lines += ["", "| target | ratio | holds |", "| --- | --- | --- |",
              (f"| P1 pipeline >= 0.90 x model-alone best (batch {best_b}) "
              f"| {t['P1']['ratio']:.2f} | {t['P1']['holds']} |")]
    if "P2" in t:
        lines.append(f"| P2 pipeline >= 2 x seed-style | {t['P2']['ratio']:.2f} "
                     f"| {t['P2']['holds']} |")
    lines += [f"| P3 model FLOP/s >= 0.70 x matmul | {t['P3']['ratio']:.2f} | {t['P3']['holds']} |",
              (f"| P4 p99 e2e at half rate <= 2 x batch-of-one | {t['P4']['ratio']:.2f} "
              f"| {t['P4']['holds']} |")]
    return "\n".join(lines)


def targets(r: dict) -> dict:
    best = max(m["images_per_s"] for m in r["model"].values())
    pipe = r["pipeline"]["full"]["images_per_s"]
    out = {
        "P1": {"ratio": pipe / best, "holds": pipe >= 0.90 * best},
        "P3": {"ratio": best * r["host"]["model"]["flops"] / r["host"]["matmul"]["flops"]},
        "P4": {"ratio": r["pipeline"]["half"]["latency_s"]["p99"]
               / r["model"]["1"]["latency_p50_s"]},
    }
    out["P3"]["holds"] = out["P3"]["ratio"] >= 0.70
    out["P4"]["holds"] = out["P4"]["ratio"] <= 2.0
    if "seed" in r:
        ratio = pipe / r["seed"]["images_per_s"]
        out["P2"] = {"ratio": ratio, "holds": ratio >= 2.0}
    return out


def plots(r: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"model alone\nbatch {b}" for b in r["model"]] + ["pipeline\n(full speed)"]
    values = [m["images_per_s"] for m in r["model"].values()]
    values.append(r["pipeline"]["full"]["images_per_s"])
    if "seed" in r:
        names.append("pipeline\nseed-style")
        values.append(r["seed"]["images_per_s"])
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, values, color=["#4c72b0"] * len(r["model"]) + ["#55a868", "#c44e52"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("images/s")
    ax.set_title(f"Throughput per configuration ({r['machine']})")
    fig.tight_layout()
    throughput = stem.with_name(stem.name + "-throughput.png")
    fig.savefig(throughput, dpi=110)
    plt.close(fig)

    half = r["pipeline"]["half"]
    ms = 1000 * np.array(half["latencies"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(ms, bins=50, color="#4c72b0")
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ax.axvline(1000 * half["latency_s"][q], color="k", linestyle=style,
                   label=f"{q} {1000 * half['latency_s'][q]:.0f} ms")
    bound = 2000 * r["model"]["1"]["latency_p50_s"]
    ax.axvline(bound, color="#c44e52", label=f"2 x batch-of-one {bound:.0f} ms")
    ax.set_xlabel("end-to-end latency, produced -> stored with prediction (ms)")
    ax.set_ylabel("images")
    ax.set_title(f"{half['images']} images at {half['rate']:g} images/s (half of full speed)")
    ax.legend()
    fig.tight_layout()
    latency = stem.with_name(stem.name + "-latency.png")
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    return [throughput, latency]


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
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=20, help="per model-alone batch size")
    parser.add_argument("--pipeline-seconds", type=float, default=40,
                        help="about how long each pipeline run produces")
    parser.add_argument("--skip-seed", action="store_true", help="no seed-style redeploy")
    parser.add_argument("--skip-delivery", action="store_true",
                        help="no at-least-once redeploy (step 5)")
    parser.add_argument("--only-delivery", action="store_true",
                        help="only the full-speed run in each delivery mode (steps 3 and 5)")
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
    r["host"] = host_limit(args.ml_host, args.input_size, args.stem)
    pngs = cifar_pngs(args.dataset, 512)
    wait_idle(db)
    r["model"] = model_alone(args.url, pngs, [int(b) for b in args.batches.split(",")],
                             args.seconds)
    # The machine is shared: matmul again after the model runs, and the better of the two is
    # the host limit (the stricter bound for P3).
    again = py_on(args.ml_host, MATMUL)
    r["host"]["matmul_runs"] = [r["host"]["matmul"]["flops"], again["flops"]]
    r["host"]["matmul"]["flops"] = max(r["host"]["matmul_runs"])
    best = max(m["images_per_s"] for m in r["model"].values())
    full_n = max(200, int(best * args.pipeline_seconds))
    r["pipeline"] = {"full": pipeline_run(db, args.sim_host, full_n, 0, 30 + 10 * full_n / best,
                                         args.url)}
    half_rate = round(r["pipeline"]["full"]["images_per_s"] / 2, 1)
    half_n = max(100, int(half_rate * args.pipeline_seconds))
    r["pipeline"]["half"] = pipeline_run(db, args.sim_host, half_n, half_rate,
                                         60 + 3 * args.pipeline_seconds, args.url)
    if not args.skip_seed:
        try:
            redeploy(SEED_VARS)
            seed_n = max(100, int(full_n / 2))
            r["seed"] = pipeline_run(db, args.sim_host, seed_n, 0, 60 + 20 * seed_n / best,
                                     args.url)
            r["seed"]["vars"] = SEED_VARS
        finally:
            redeploy({})
    if not args.skip_delivery:
        r["delivery"] = delivery_modes(db, args, full_n, exactly_once=r["pipeline"]["full"])
    r["targets"] = targets(r)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    stem.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    written = plots(r, stem)
    print(table(r))
    print(f"\nwrote {stem.with_suffix('.json')}, " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
