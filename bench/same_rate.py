"""Latency at one set rate for several inference batch sizes (`make bench-rate`).

`make bench` measures latency at half of each configuration's own full speed, so a faster
configuration is timed at a higher rate. This holds the rate fixed instead: for each
``--batches`` value the ML host is redeployed with that ``inference_consumer_batch_size``, the
simulator sends ``--rate`` images/s for ``--seconds``, and the produce-to-row latency (with its
stages) and the CPU each container spent per image are recorded, as bench/run.py measures them.
The inventory's own settings are deployed again at the end.

Writes bench/results/same-rate-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import Meter
from run import REPO, Db, containers, pipeline_run, run, wait_idle

log = logging.getLogger("bench")


def deploy_ml(extra: dict) -> None:
    argv = ["ansible-playbook", "playbooks/ml.yml"]
    for key, value in extra.items():
        argv += ["-e", f"{key}={value}"]
    log.info("%s", " ".join(argv))
    run(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=45.5, help="images/s")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--db-host", default="iot-db")
    parser.add_argument("--sim-host", default="iot-simulator")
    parser.add_argument("--url", default="http://127.0.0.1:8000/predict")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    db = Db(args.db_host)
    meter = Meter(containers())
    images = max(200, int(args.rate * args.seconds))
    r: dict = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "rate": args.rate,
               "images": images, "runs": {}}
    try:
        for batch in args.batches:
            deploy_ml({"inference_consumer_batch_size": batch})
            wait_idle(db)
            result = pipeline_run(db, args.sim_host, images, args.rate,
                                  60 + 3 * args.seconds, args.url, meter)
            result.pop("latencies")
            r["runs"][str(batch)] = result
    finally:
        deploy_ml({})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / datetime.now(UTC).strftime("same-rate-%Y%m%dT%H%M%SZ.json")
    path.write_text(json.dumps(r, indent=1) + "\n")
    print(f"| batch size | images/s | latency p50 / p95 / p99 (ms) | produced -> classified p99 "
          f"| ML server busy | CPU-ms per image, all |  (at {args.rate:g} images/s)")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch, m in r["runs"].items():
        lat = m["latency_s"]
        print(f"| {batch} | {m['images_per_s']:.1f} | {1000 * lat['p50']:.0f} / "
              f"{1000 * lat['p95']:.0f} / {1000 * lat['p99']:.0f} | "
              f"{m['stages_ms']['produced_to_inferred']['p99']:.0f} | "
              f"{100 * m['model_busy_fraction']:.0f} % | {m['cpu_ms_per_image']['all']:.1f} |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
