"""Scale-out by inventory (`make bench-scale`): pipeline images/s with 1, 2 and 3 ML hosts, each
held to the same CPU quota.

1. Adds the ML hosts of bench/scale-inventory.yml (iot-ml-2, iot-ml-3) to the local deployment:
   their containers (playbooks/local-hosts.yml), the images topic at --partitions partitions
   (playbooks/kafka.yml; 6 splits equally over 1, 2 and 3 consumers) and the ML roles
   (playbooks/ml.yml on the new hosts only).
2. Limits every ML container to --cpus CPUs (`docker update`), so the ML hosts, not the shared
   cores, set the pace.
3. For 1, 2, 3 hosts (the others' ML server and inference consumer stopped, and dropped from
   their group after its session timeout; every partition owned before a run starts), the
   simulator at full speed: images/s from the database timestamps, as bench/run.py measures
   it, and the CPU each container spent per image. An unrecorded one-host run first sizes the
   runs, so that each lasts about --seconds.
4. Lifts the limits and removes the added hosts (--keep-hosts keeps them, stopped).

Writes bench/results/scale-<stamp>.json (top-level scale_2 and scale_3: images/s with 2 and 3
hosts over 1) and scale-<stamp>.png. The other hosts still share the machine's cores: where they
become the limit, the ratio says so with the CPU figures beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import Meter
from layout import layout
from run import HEALTH, REPO, Db, containers, pipeline_run, py_on, run, wait_idle

log = logging.getLogger("bench")
INVENTORY = ["-i", str(REPO / "inventory" / "local"),
             "-i", str(REPO / "bench" / "scale-inventory.yml")]
HOSTS = ["iot-ml", "iot-ml-2", "iot-ml-3"]
SERVICES = ["iot-ml-server", "iot-inference-consumer"]


def playbook(*args: str) -> None:
    log.info("ansible-playbook %s", " ".join(args))
    run(["ansible-playbook", *INVENTORY, *args])


def set_cpus(host: str, cpus: float) -> None:
    run(["docker", "update", "--cpus", f"{cpus:g}", host])
    nano = int(run(["docker", "inspect", "-f", "{{.HostConfig.NanoCpus}}", host]).strip() or 0)
    if nano != round(cpus * 1e9):
        raise RuntimeError(f"{host}: CPU limit {nano / 1e9:g}, not {cpus:g}")


def ml_healthy(host: str) -> bool:
    probe = ["docker", "exec", host, "python3", "-c", HEALTH, "http://127.0.0.1:8000/health"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


# The consumers' session timeout (db_consumer_session_timeout_ms and
# inference_consumer_session_timeout_ms, 10 s by default) and a margin.
SESSION_S = 12

# Run on a host with the service's settings: every partition of the group's topics with the
# members that own it (DescribeGroups), as JSON.
OWNERS = """
import json, sys
from importlib import import_module
from iot_pipeline import kafka_io
module, env_file = sys.argv[1], sys.argv[2]
env = {}
for line in open(env_file).read().splitlines():
    if "=" in line and not line.startswith("#"):
        key, value = line.split("=", 1)
        env[key] = value.strip('"')
settings = import_module("iot_pipeline." + module).load_settings([], env)
settings = settings[0] if isinstance(settings, tuple) else settings
topics = [settings.kafka.images_topic]
if module == "db_consumer":
    topics.append(settings.kafka.results_topic)
reader = kafka_io.offsets_reader(settings.kafka, "bench-scale-owners")
admin = kafka_io.admin(settings.kafka, "bench-scale-owners")
try:
    group = admin.describe_groups([settings.group_id])[settings.group_id]
    partitions = {f"{t}[{p}]" for t in topics for p in reader.partitions_for_topic(t) or ()}
finally:
    admin.close()
    reader.close()
owned = {f"{tp.topic}[{tp.partition}]" for tp in kafka_io.owned_partitions(group)}
print(json.dumps({"group": settings.group_id, "state": group.get("group_state"),
                  "members": len(group.get("members", [])),
                  "unowned": sorted(partitions - owned), "partitions": len(partitions)}))
"""


def unowned(host: str, module: str, service: str) -> dict:
    return py_on(host, OWNERS, module, layout().env_file(service))


def use_hosts(active: list[str], db_host: str = "iot-db", timeout_s: float = 300) -> None:
    """Exactly ``active`` run their ML server and inference consumer; waits for their health and
    for both groups to own every partition.

    The stopped hosts' consumers are static members: the broker drops them once their session
    timeout has passed, and the group rebalances. Nothing else is restarted: members already
    running see the partitions added in step 1 through kafka_io.Coverage (a static member that
    rejoined a stable group keeps its old assignment, see the README), and this checks it: a
    run starts only when the DB writer's and the inference consumers' groups own every
    partition of their topics (within about a minute: metadata age and Coverage's interval)."""
    for host in HOSTS:
        if host not in active:
            run(["docker", "exec", host, "systemctl", "stop", *SERVICES])
    for host in active:
        run(["docker", "exec", host, "systemctl", "start", *SERVICES])
    time.sleep(SESSION_S)
    deadline = time.monotonic() + timeout_s
    while not all(ml_healthy(h) for h in active):
        if time.monotonic() > deadline:
            raise RuntimeError(f"ML servers of {active} not healthy after {timeout_s:.0f}s")
        time.sleep(2)
    checks = ((db_host, "db_consumer", "iot-db-consumer", 1),
              (active[0], "inference_consumer", "iot-inference-consumer", len(active)))
    deadline = time.monotonic() + 120
    while True:
        groups = [(unowned(host, module, service), members)
                  for host, module, service, members in checks]
        if all(g["state"] == "Stable" and not g["unowned"] and g["members"] == members
               for g, members in groups):
            for g, _ in groups:
                log.info("group %s: %d members own all %d partitions", g["group"],
                         g["members"], g["partitions"])
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"groups not settled with every partition owned: {groups}")
        time.sleep(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=float, default=0.3, help="CPU quota of each ML host")
    parser.add_argument("--partitions", type=int, default=6, help="images topic partitions")
    parser.add_argument("--seconds", type=float, default=30,
                        help="about how long each run produces")
    parser.add_argument("--db-host", default="iot-db")
    parser.add_argument("--sim-host", default="iot-simulator")
    parser.add_argument("--skip-deploy", action="store_true", help="the added hosts are deployed")
    parser.add_argument("--keep-hosts", action="store_true", help="keep iot-ml-2/3 (stopped)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    cores = int(run(["nproc"]).strip())
    r: dict = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": f"{cores} shared cores", "cpus_per_ml_host": args.cpus,
               "partitions": args.partitions, "runs": {}}
    db = Db(args.db_host)
    try:
        if not args.skip_deploy:
            playbook("playbooks/local-hosts.yml")
            playbook("playbooks/kafka.yml", "-e", f"pipeline_images_partitions={args.partitions}")
            playbook("playbooks/ml.yml", "--limit", ",".join(HOSTS[1:]))
        for host in HOSTS:
            set_cpus(host, args.cpus)
        meter = Meter(containers())
        url = "http://127.0.0.1:8000/predict"  # iot-ml's /metrics: its busy share
        # A first, unrecorded run with one host sizes the others: each measured run then lasts
        # about --seconds (a shorter one would weigh its start, small batches, more).
        use_hosts(HOSTS[:1], args.db_host)
        wait_idle(db)
        calibration = pipeline_run(db, args.sim_host, 300, 0, 120 + 20 * args.seconds, url, meter)
        rate_1 = calibration["images_per_s"]
        r["calibration_images_per_s"] = rate_1
        for n in (1, 2, 3):
            use_hosts(HOSTS[:n], args.db_host)
            wait_idle(db)
            images = max(300, int(rate_1 * n * args.seconds))
            result = pipeline_run(db, args.sim_host, images, 0, 120 + 20 * args.seconds, url,
                                  meter)
            result.pop("latencies")
            result["hosts"] = HOSTS[:n]
            r["runs"][str(n)] = result
            log.info("%d ML host(s): %.1f images/s", n, result["images_per_s"])
    finally:
        for host in HOSTS:
            run(["docker", "update", "--cpus", str(cores), host], check=False)
        try:
            use_hosts(HOSTS[:1], args.db_host)  # the added consumers leave the group
        except RuntimeError as exc:
            log.warning("could not put the added hosts back to stopped: %s", exc)
        if not args.keep_hosts:
            run(["docker", "rm", "-f", *HOSTS[1:]], check=False)
    one = r["runs"]["1"]["images_per_s"]
    for n, bound in ((2, 1.8), (3, 2.5)):
        ratio = r["runs"][str(n)]["images_per_s"] / one
        r[f"scale_{n}"] = {"value": round(ratio, 3), "target": f">= {bound:g}",
                           "holds": ratio >= bound,
                           "what": f"{n} ML hosts / 1, {args.cpus:g} CPU each"}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / datetime.now(UTC).strftime("scale-%Y%m%dT%H%M%SZ")
    stem.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    plot(r, stem.with_suffix(".png"))
    print("| ML hosts | images/s | ratio to 1 | CPU-ms/image, all containers |")
    print("| --- | --- | --- | --- |")
    for n, result in r["runs"].items():
        print(f"| {n} | {result['images_per_s']:.1f} | {result['images_per_s'] / one:.2f} "
              f"| {result['cpu_ms_per_image']['all']:.2f} |")
    print(f"\nwrote {stem.with_suffix('.json')}, {stem.with_suffix('.png')}")
    return 0


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in r["runs"]]
    rates = [r["runs"][str(n)]["images_per_s"] for n in ns]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, rates, "o-", label="measured")
    ax.plot(ns, [rates[0] * n for n in ns], "k:", label="linear")
    ax.set_xticks(ns)
    ax.set_xlabel(f"ML hosts ({r['cpus_per_ml_host']:g} CPU each)")
    ax.set_ylabel("pipeline images/s")
    ax.set_title(f"Scale-out, images topic with {r['partitions']} partitions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
