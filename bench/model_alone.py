"""The served model alone: images/s and latency of ``Classifier.probabilities`` at batch 1 / 8 / 64.

    python bench/model_alone.py [--card files/models/resnet50-cifar100.card.json] [--seconds 15]
                                [--runtimes litert-int8,litert,tensorflow]
    make bench-model

Runs the ML server's own code path (model card -> ``Classifier.probabilities`` over uint8
pixels, no HTTP, no PNG) in this process, on real CIFAR-100 test images, for each runtime and
batch size for ``--seconds`` after a warm-up, and also the original design's shape for
comparison (``--imagenet-shaped``: the 224 px ImageNet ResNet-50 with random weights, run by
TensorFlow; same FLOPs as with ImageNet's). CPU-ms per image (this process's CPU time) is
steadier than images/s on a shared machine. Writes bench/reports/model-alone-<stamp>.json and prints a table. Measure with
nothing else running: the figures are the machine's, shared by whatever runs beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def measure(classifier, images: np.ndarray, batch: int, seconds: float) -> dict:
    rng = np.random.default_rng(batch)
    for _ in range(3):  # warm-up: traces, allocator, caches
        classifier.probabilities(images[rng.integers(0, len(images), batch)])
    latencies = []
    started, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds or len(latencies) < 5:
        pick = images[rng.integers(0, len(images), batch)]
        t = time.perf_counter()
        classifier.probabilities(pick)
        latencies.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    total = sum(latencies)
    ms = np.asarray(latencies) * 1000
    return {"batch": batch, "calls": len(latencies), "images_per_second": round(
        batch * len(latencies) / total, 1),
        "cpu_ms_per_image": round(1000 * cpu / (batch * len(latencies)), 2),
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(ms, 99)), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--card", default=str(REPO / "files/models/resnet50-cifar100.card.json"))
    p.add_argument("--dataset", default=str(REPO.parent / "shared/datasets/cifar-100"))
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--runtimes", default="litert-int8,litert,tensorflow",
                   help="runtimes the card's model is measured with (iot_pipeline.model)")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--imagenet-shaped", action="store_true",
                   help="also the 224 px ImageNet-shaped ResNet-50 (the original design)")
    p.add_argument("--out", type=Path, default=REPO / "bench/reports")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(REPO / "files/iot_pipeline/src"))
    from iot_pipeline import dataset
    from iot_pipeline.model import Classifier

    images = dataset.load(args.dataset, "test").images[:2000]
    batches = [int(b) for b in args.batches.split(",")]
    models = [("card", args.card, runtime) for runtime in args.runtimes.split(",")]
    if args.imagenet_shaped:
        models.append(("imagenet-shaped", "random", "tensorflow"))
    report = {"generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "seconds_per_batch_size": args.seconds, "models": []}
    for kind, weights, runtime in models:
        classifier = Classifier(weights, runtime=runtime)
        entry = {"kind": kind, "model": classifier.name, "version": classifier.version,
                 "runtime": runtime,
                 "input_size": classifier.input_size, "load_seconds": round(
                     classifier.load_seconds, 1), "batches": []}
        for batch in batches:
            entry["batches"].append(measure(classifier, images, batch, args.seconds))
            m = entry["batches"][-1]
            print(f"{classifier.name:<22} {runtime:<12} {classifier.input_size:>4} px  batch "
                  f"{batch:>3}: {m['images_per_second']:>7.1f} images/s, "
                  f"{m['cpu_ms_per_image']:.2f} CPU-ms/image, p50 {m['latency_ms_p50']:.1f} ms",
                  flush=True)
        report["models"].append(entry)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"model-alone-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
