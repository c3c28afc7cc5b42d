"""Fault injection against the local four-host deployment (`make chaos`), Jepsen-style.

Each scenario runs the simulator (fresh run id, its own ack log: one unique id per image Kafka
acknowledged) at a moderate rate while a fault is injected, waits (bounded) until the backlog
drains, then a checker compares the ack log with iot_image_data:

- lost: acknowledged but no row, or a row without inferred_value or data;
- dup_rows: acknowledged ids with more than one row (the unique constraint forbids it; checked);
- dup_results: image ids with more than one result record on the results topic, read as the DB
  writers read it (read_committed; the same count read_uncommitted shows aborted transactions);
- unexpected: rows created during the run (id above the run's start) whose id is not in the log;
- DLQ records added (end offsets of the dead-letter topic before/after), time to drain (from the
  simulator's last image to the last acknowledged image stored with its prediction), and the
  NRestarts of the pipeline's units (kills show up there; anything else is a crash).

Scenarios: 1 kill -9 the inference consumer every 10 s; 2 the same for the DB consumer; 3 kill -9
the gunicorn worker once, then restart the ML server; 4 restart the Kafka broker; 5 stop
PostgreSQL for 30 s; 6 1 % poison messages (17 kinds, images and results topics, see
POISON_SNIPPET); 7 restart the ML host's container; 8/9 freeze the inference / DB consumer
(SIGSTOP for 60 s, then SIGCONT: its session and its open transaction time out meanwhile);
10 a CPU-starved ML host (its container limited to 0.1 CPU for 60 s: the ML server answers
slowly, calls time out and are retried).

Kill scenarios have drain targets (DRAIN_TARGETS_S); unit restarts beyond the faults' own kills
count as a crash loop (restarts_unexplained). Writes bench/reports/chaos-<stamp>.json (commit the
run the README cites) and prints a table. Run from the repository root with the controller venv
(PATH=.venv/bin:$PATH).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout import layout  # bench/layout.py: the deployed paths
from run import Db, run  # bench/run.py: docker exec helpers

log = logging.getLogger("chaos")
REPO = Path(__file__).resolve().parent.parent
SIM, KAFKA, DB, ML = "iot-simulator", "iot-kafka", "iot-db", "iot-ml"
BOOTSTRAP = "iot-kafka:9092"
UNITS = {ML: ["iot-ml-server", "iot-inference-consumer"], DB: ["postgresql@15-main", "iot-db-consumer"],
         KAFKA: ["kafka"]}

# Runs in the simulator host's venv (the broker is reachable from the hosts only).
DLQ_SNIPPET = """
import json, sys
from kafka import KafkaConsumer, TopicPartition
bootstrap, topic, since = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# read_committed: the inference consumer dead-letters inside its transactions; aborted ones
# (a batch retried after a crash) are not dead letters.
c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                  isolation_level="read_committed")
parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
end = c.end_offsets(parts)
out = {"end": {str(tp.partition): off for tp, off in end.items()}, "records": []}
if since is not None:
    c.assign(parts)
    for tp in parts:
        c.seek(tp, since.get(str(tp.partition), 0))
    todo = {tp for tp in parts if c.position(tp) < end[tp]}
    while todo:
        for tp, recs in c.poll(timeout_ms=2000, max_records=500).items():
            for r in recs:
                h = {k: v.decode("utf-8", "replace") for k, v in (r.headers or [])}
                out["records"].append({"key": (r.key or b"").decode("utf-8", "replace"),
                                       "group": h.get("dlq.group"), "reason": h.get("dlq.reason")})
        todo = {tp for tp in todo if c.position(tp) < end[tp]}
print(json.dumps(out))
"""

# Result records per image id on the results topic since `since` (end offsets), read as the DB
# writers read it (read_committed) and, for comparison, read_uncommitted (aborted batches too).
RESULTS_SNIPPET = """
import collections, json, sys
from kafka import KafkaConsumer, TopicPartition
bootstrap, topic, since = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
for isolation in ("read_committed", "read_uncommitted"):
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation)
    parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
    end = c.end_offsets(parts)
    counts = collections.Counter()
    if since is not None:
        c.assign(parts)
        for tp in parts:
            c.seek(tp, since.get(str(tp.partition), 0))
        todo = {tp for tp in parts if c.position(tp) < end[tp]}
        while todo:
            for tp, recs in c.poll(timeout_ms=2000, max_records=2000).items():
                counts.update(r.key for r in recs if r.key)
            todo = {tp for tp in todo if c.position(tp) < end[tp]}
    c.close()
    out[isolation] = {"end": {str(tp.partition): off for tp, off in end.items()},
                      "records": sum(counts.values()), "keys": len(counts),
                      "dup_keys": sum(1 for n in counts.values() if n > 1),
                      "dup_sample": [k.decode("utf-8", "replace") for k, n in counts.items() if n > 1][:5]}
print(json.dumps(out))
"""

# 1 % poison: every kind the consumers must dead-letter. The roles set IOT_MAX_IMAGE_BYTES to
# 512 KiB (pipeline_max_image_bytes), below the broker's message.max.bytes (~1 MiB), so the
# oversized case (700 kB of random bytes, 933 kB of base64) reaches the consumers and is refused
# there as image_too_large before it is decoded. Image kinds go to the images topic (both groups
# must dead-letter them), result kinds to the results topic (only the DB writers read it); the
# values PostgreSQL would refuse (NUL, surrogates, a score no real holds, a +20:00 offset) are
# refused at decode time. orphan_result is no poison: a valid result for an image that never
# came, which must be stored (a row with only the result) and dead-lettered by no one.
POISON_SNIPPET = """
import base64, io, json, os, sys, time, uuid
from datetime import datetime, timedelta, timezone
from kafka import KafkaProducer
from PIL import Image
bootstrap, topic, results_topic, run_id, count, spacing = (sys.argv[1], sys.argv[2], sys.argv[3],
    sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 * 1024 * 1024)
def png(size):
    buf = io.BytesIO(); Image.new("RGB", size, (120, 30, 200)).save(buf, format="PNG"); return buf.getvalue()
good = png((32, 32))
def msg(**over):
    m = {"schema": 1, "type": "image", "unique_id": "poison-" + uuid.uuid4().hex,
         "device_id": "chaos", "produced_at": datetime.now(timezone.utc).isoformat(),
         "ground_truth": "apple", "image_format": "png", "image": base64.b64encode(good).decode()}
    m.update(over)
    for k in [k for k, v in m.items() if v is None]:
        del m[k]
    return json.dumps(m).encode()
def result(key, **over):
    m = {"schema": 1, "type": "result", "unique_id": key, "inferred_value": "tabby",
         "score": 0.5, "model": "chaos", "inferred_at": datetime.now(timezone.utc).isoformat(),
         "top_k": [["tabby", 0.5]]}
    m.update(over)
    return json.dumps(m).encode()
far_east = timezone(timedelta(hours=20))
kinds = {  # name: (topic, value from the record's key)
    "bad_json": (topic, lambda k: b'{"schema": 1, "type": "image", "unique_id": '),
    "bad_base64": (topic, lambda k: msg(image="not*base64!!")),
    "truncated_png": (topic, lambda k: msg(image=base64.b64encode(good[: len(good) // 2]).decode())),
    "wrong_size": (topic, lambda k: msg(image=base64.b64encode(png((64, 48))).decode())),
    "oversized_700kB": (topic, lambda k: msg(image=base64.b64encode(os.urandom(700_000)).decode())),
    "missing_field": (topic, lambda k: msg(ground_truth=None)),
    "nul_ground_truth": (topic, lambda k: msg(ground_truth="app\\u0000le")),
    "surrogate_device_id": (topic, lambda k: msg(device_id="\\ud800")),
    "overlong_unique_id": (topic, lambda k: msg(unique_id="x" * 5000)),
    "utc_offset_20h": (topic, lambda k: msg(produced_at=datetime.now(far_east).isoformat())),
    "json_int_5000_digits": (topic, lambda k: b'{"schema": 1, "type": "image", "unique_id": '
                             + b"9" * 5000 + b"}"),
    "tombstone": (topic, lambda k: None),
    "result_score_1e300": (results_topic, lambda k: result(k, score=1e300)),
    "result_score_nan": (results_topic, lambda k: result(k, score=float("nan"))),
    "result_nul_label": (results_topic, lambda k: result(k, inferred_value="tab\\u0000by")),
    "result_bad_top_k": (results_topic, lambda k: result(k, top_k=[["tabby", 0.5, "extra"]])),
    "orphan_result": (results_topic, lambda k: result(k)),
}
names = sorted(kinds)
sent = {}
for i in range(count):
    kind = names[i % len(names)]
    key = f"poison-{run_id}-{i}-{kind}"
    where, value = kinds[kind]
    p.send(where, key=key.encode(), value=value(key)).get(timeout=120)
    sent[key] = kind
    time.sleep(spacing)
p.flush()
print(json.dumps(sent))
"""


def sh(host: str, *argv: str, check: bool = True) -> str:
    return run(["docker", "exec", host, *argv], check=check)


def psql(sql: str, stdin_data: str = "") -> list[list[str]]:
    out = run(["docker", "exec", "-i", "-u", "postgres", DB, "psql", "iot", "-X", "-A", "-t", "-q",
               "-F", "|", "-v", "ON_ERROR_STOP=1"], stdin=stdin_data + sql)
    return [line.split("|") for line in out.splitlines() if line]


def restarts() -> dict[str, int]:
    out = {}
    for host, units in UNITS.items():
        for unit in units:
            value = sh(host, "systemctl", "show", "-p", "NRestarts", "--value", unit, check=False)
            out[unit] = int(value.strip() or -1)
    return out


def inactive_units() -> list[str]:
    bad = []
    for host, units in UNITS.items():
        for unit in units:
            state = sh(host, "systemctl", "is-active", unit, check=False).strip()
            if state != "active":
                bad.append(f"{host}:{unit}={state}")
    return bad


def wait_units_active(timeout_s: float = 240) -> float:
    started = time.monotonic()
    while (bad := inactive_units()) and time.monotonic() - started < timeout_s:
        time.sleep(2)
    if bad:
        raise RuntimeError(f"units not active after {timeout_s:.0f}s: {bad}")
    return time.monotonic() - started


def dlq(since: dict | None = None) -> dict:
    out = sh(SIM, layout().python, "-c", DLQ_SNIPPET, BOOTSTRAP, "iot-dead-letter", json.dumps(since))
    return json.loads(out.strip().splitlines()[-1])


def results(since: dict | None = None) -> dict:
    out = sh(SIM, layout().python, "-c", RESULTS_SNIPPET, BOOTSTRAP, "iot-results", json.dumps(since))
    return json.loads(out.strip().splitlines()[-1])


class Simulator:
    """The simulator CLI as a transient unit on its host, in the background, with an ack log."""

    def __init__(self, run_id: str, images: int, rate: float) -> None:
        self.ack_path = f"{layout().state_dir}/chaos-{run_id}.ack"
        self.proc = subprocess.Popen(
            ["docker", "exec", SIM, "systemd-run", "--wait", "--pipe", "--quiet", "--collect",
             "--unit", f"iot-simulator-chaos-{run_id}",
             *layout().run_as("iot-simulator"),
             layout().script("iot-simulator"), "--count", str(images),
             "--rate", f"{rate:g}", "--progress-s", "0", "--ack-log", self.ack_path],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int:
        self.output = self.proc.communicate()[0]
        return self.proc.returncode

    def acked(self) -> list[str]:
        text = sh(SIM, "cat", self.ack_path, check=False)
        return [line for line in text.splitlines() if line.strip()]


def check(acked: list[str], start_id: int, extra: list[str] = ()) -> dict:
    """The checker: ack log vs iot_image_data (temp table, one psql session). ``extra``: ids
    that may create rows besides the acknowledged ones (the poison scenario's orphan results)."""
    ids = "\n".join(acked)
    extra_ids = "\n".join(extra)
    sql = f"""
SELECT
  (SELECT count(*) FROM acked a WHERE NOT EXISTS (SELECT 1 FROM iot_image_data d WHERE d.unique_id = a.u)),
  (SELECT count(*) FROM acked a JOIN iot_image_data d ON d.unique_id = a.u
     WHERE d.inferred_value IS NULL OR d.data IS NULL),
  (SELECT count(*) FROM acked a JOIN iot_image_data d ON d.unique_id = a.u
     WHERE d.inferred_value IS NOT NULL AND d.data IS NOT NULL),
  (SELECT count(*) FROM (SELECT d.unique_id FROM iot_image_data d JOIN acked a ON d.unique_id = a.u
     GROUP BY d.unique_id HAVING count(*) > 1) x),
  (SELECT count(*) FROM iot_image_data d WHERE d.id > {start_id}
     AND NOT EXISTS (SELECT 1 FROM acked a WHERE a.u = d.unique_id)
     AND NOT EXISTS (SELECT 1 FROM extra e WHERE e.u = d.unique_id)),
  (SELECT string_agg(d.unique_id, ',') FROM (SELECT unique_id FROM iot_image_data d WHERE d.id > {start_id}
     AND NOT EXISTS (SELECT 1 FROM acked a WHERE a.u = d.unique_id)
     AND NOT EXISTS (SELECT 1 FROM extra e WHERE e.u = d.unique_id) LIMIT 5) d),
  (SELECT count(*) FROM extra e JOIN iot_image_data d ON d.unique_id = e.u
     WHERE d.inferred_value IS NOT NULL);
"""
    prelude = (f"CREATE TEMP TABLE acked (u text PRIMARY KEY);\nCOPY acked FROM STDIN;\n{ids}\n\\.\n"
               f"CREATE TEMP TABLE extra (u text PRIMARY KEY);\nCOPY extra FROM STDIN;\n{extra_ids}\n\\.\n")
    missing, incomplete, complete, dup, unexpected, sample, extra_stored = psql(sql, prelude)[0]
    return {"acked": len(acked), "stored_complete": int(complete), "lost_no_row": int(missing),
            "lost_incomplete": int(incomplete), "lost": int(missing) + int(incomplete),
            "dup_rows": int(dup), "unexpected": int(unexpected),
            "unexpected_sample": sample.split(",") if sample else [],
            "extra_stored": int(extra_stored)}


def complete_since(start_id: int) -> int:
    return int(psql(f"SELECT count(*) FROM iot_image_data WHERE id > {start_id}"
                    " AND inferred_value IS NOT NULL AND data IS NOT NULL;")[0][0])


# --- faults: each runs while the simulator sends; `at(t)` sleeps until t s after the start ----
Fault = Callable[["Ctx"], None]


class Ctx:
    def __init__(self, sim: Simulator, produce_s: float) -> None:
        self.sim, self.produce_s, self.t0 = sim, produce_s, time.monotonic()
        self.events: list[dict] = []
        # Restarts each unit is expected to make because of the fault itself (kills).
        self.expected_restarts: dict[str, int] = {}

    def at(self, t: float) -> None:
        time.sleep(max(0.0, self.t0 + t - time.monotonic()))

    def event(self, what: str, **extra) -> None:
        self.events.append({"t_s": round(time.monotonic() - self.t0, 1), "what": what, **extra})
        log.info("  t=%5.1fs %s %s", time.monotonic() - self.t0, what, extra or "")


def every_10s_kill(host: str, unit: str) -> Fault:
    def fault(ctx: Ctx) -> None:
        t = 10.0
        while True:
            ctx.at(t)
            if not ctx.sim.running():
                return
            sh(host, "systemctl", "kill", "--kill-whom=main", "-s", "KILL", unit)
            ctx.expected_restarts[unit] = ctx.expected_restarts.get(unit, 0) + 1
            ctx.event(f"kill -9 {unit}")
            t += 10
    return fault


def ml_worker_then_restart(ctx: Ctx) -> None:
    ctx.at(0.25 * ctx.produce_s)
    master = sh(ML, "systemctl", "show", "-p", "MainPID", "--value", "iot-ml-server").strip()
    worker = sh(ML, "pgrep", "-P", master).split()[0]
    sh(ML, "kill", "-9", worker)  # gunicorn's master replaces it: no unit restart
    ctx.event("kill -9 gunicorn worker", master=master, worker=worker)
    ctx.at(0.6 * ctx.produce_s)
    sh(ML, "systemctl", "restart", "iot-ml-server")
    ctx.event("systemctl restart iot-ml-server")


def kafka_restart(ctx: Ctx) -> None:
    ctx.at(0.3 * ctx.produce_s)
    ctx.event("systemctl restart kafka (begin)")
    sh(KAFKA, "systemctl", "restart", "kafka")
    ctx.event("systemctl restart kafka (returned)")


def postgres_outage(ctx: Ctx) -> None:
    ctx.at(0.3 * ctx.produce_s)
    sh(DB, "systemctl", "stop", "postgresql@15-main")
    ctx.event("postgresql stopped")
    ctx.at(0.3 * ctx.produce_s + 30)
    sh(DB, "systemctl", "start", "postgresql@15-main")
    ctx.event("postgresql started")
    ctx.pg_started = time.monotonic()


def ml_container_restart(ctx: Ctx) -> None:
    ctx.at(0.3 * ctx.produce_s)
    ctx.event("docker restart iot-ml (begin)")
    run(["docker", "restart", ML])
    ctx.event("docker restart iot-ml (returned)")
    ctx.event("units active again", after_s=round(wait_units_active(), 1))


def freeze(host: str, unit: str, seconds: float = 60) -> Fault:
    """SIGSTOP the unit's main process, SIGCONT it after `seconds`: longer than its session
    timeout (the group moves on without it) and than the broker's transaction timeout."""
    def fault(ctx: Ctx) -> None:
        ctx.at(0.25 * ctx.produce_s)
        sh(host, "systemctl", "kill", "--kill-whom=main", "-s", "STOP", unit)
        ctx.event(f"SIGSTOP {unit}")
        ctx.at(0.25 * ctx.produce_s + seconds)
        sh(host, "systemctl", "kill", "--kill-whom=main", "-s", "CONT", unit)
        ctx.event(f"SIGCONT {unit}")
    return fault


def starved_ml_host(cpus: float = 0.1, seconds: float = 60) -> Fault:
    """Limit the ML host's container to `cpus` for `seconds` (docker update --cpus): the ML server
    answers slowly, the inference consumer's calls time out and are retried."""
    def fault(ctx: Ctx) -> None:
        ctx.at(0.25 * ctx.produce_s)
        run(["docker", "update", "--cpus", f"{cpus:g}", ML])
        ctx.event(f"ML host limited to {cpus:g} CPU")
        try:
            ctx.at(0.25 * ctx.produce_s + seconds)
        finally:
            ctx.event("ML host CPU limit lifted", nano_cpus=unlimit_ml_host())
    return fault


def unlimit_ml_host() -> int:
    """Gives the ML container every core again. `docker update --cpus 0` does not remove a limit
    (docker 20.10 keeps the old one), so the limit becomes the host's core count, which limits
    nothing; checked, because a limit left behind slows every later run to a crawl."""
    cores = int(run(["nproc"]).strip())
    run(["docker", "update", "--cpus", str(cores), ML])
    nano = int(run(["docker", "inspect", "-f", "{{.HostConfig.NanoCpus}}", ML]).strip() or 0)
    if nano not in (0, cores * 10**9):
        raise RuntimeError(f"{ML} still limited to {nano / 1e9:g} CPU")
    return nano


# Which consumer groups must dead-letter each poison kind (see POISON_SNIPPET), by its prefix.
POISON_GROUPS = {"result_": ("iot-db-writer",), "orphan_": ()}
POISON_KINDS = 17


def poison_groups(kind: str) -> tuple[str, ...]:
    for prefix, groups in POISON_GROUPS.items():
        if kind.startswith(prefix):
            return groups
    return ("iot-inference", "iot-db-writer")


def poison(ctx: Ctx) -> None:
    count = max(POISON_KINDS, round(ctx.n / 100))
    spacing = 0.8 * ctx.produce_s / count
    out = sh(SIM, layout().python, "-c", POISON_SNIPPET, BOOTSTRAP, "iot-images", "iot-results",
             ctx.run_id, str(count), f"{spacing:.3f}")
    ctx.poison_sent = json.loads(out.strip().splitlines()[-1])
    ctx.event("poison sent", count=len(ctx.poison_sent))


SCENARIOS: dict[str, tuple[str, Fault | None]] = {
    "baseline": ("no fault", None),
    "kill-inference": ("kill -9 inference consumer every 10 s",
                       every_10s_kill(ML, "iot-inference-consumer")),
    "kill-db-consumer": ("kill -9 DB consumer every 10 s", every_10s_kill(DB, "iot-db-consumer")),
    "ml-server": ("kill -9 gunicorn worker once, restart ML server once", ml_worker_then_restart),
    "kafka-restart": ("restart the Kafka broker", kafka_restart),
    "postgres-outage": ("stop PostgreSQL for 30 s", postgres_outage),
    "poison": ("1 % poison messages", poison),
    "ml-container": ("docker restart iot-ml", ml_container_restart),
    "freeze-inference": ("SIGSTOP inference consumer 60 s", freeze(ML, "iot-inference-consumer")),
    "freeze-db-consumer": ("SIGSTOP DB consumer 60 s", freeze(DB, "iot-db-consumer")),
    "slow-ml": ("ML host starved to 0.1 CPU for 60 s", starved_ml_host()),
}
# Issue 12's recovery targets: seconds from the simulator's last image to the last image stored.
DRAIN_TARGETS_S = {"kill-inference": 30, "kill-db-consumer": 15}


def scenario(name: str, images: int, rate: float, drain_timeout_s: float, stall_s: float) -> dict:
    what, fault = SCENARIOS[name]
    run_id = f"{datetime.now(UTC):%H%M%S}-{uuid.uuid4().hex[:6]}"
    log.info("scenario %s (%s): %d images at %g/s, run %s", name, what, images, rate, run_id)
    wait_units_active()
    start_id = Db(DB).max_id()
    dlq_before = dlq()["end"]
    results_before = results()["read_committed"]["end"]
    restarts_before = restarts()
    sim = Simulator(run_id, images, rate)
    ctx = Ctx(sim, images / rate)
    ctx.n, ctx.run_id = images, run_id
    errors: list[str] = []
    thread = None
    if fault is not None:
        def guarded() -> None:
            try:
                fault(ctx)
            except Exception as exc:  # noqa: BLE001  report, do not hide: the figures still get checked
                errors.append(repr(exc))
                log.error("fault %s failed: %s", name, exc)
        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
    rc = sim.wait()
    sim_done = time.monotonic()
    ctx.event("simulator exited", rc=rc)
    if thread is not None:
        thread.join(timeout=300)
    acked = sim.acked()
    # Drain: until every acknowledged image is stored complete, or no progress for stall_s,
    # or the bound.
    last, last_change, drained_at = -1, time.monotonic(), None
    while time.monotonic() - sim_done < drain_timeout_s:
        done = complete_since(start_id)
        if done >= len(acked):
            drained_at = time.monotonic()
            break
        if done != last:
            last, last_change = done, time.monotonic()
        elif time.monotonic() - last_change > stall_s and not inactive_units():
            break
        time.sleep(2)
    orphans = [k for k, kind in getattr(ctx, "poison_sent", {}).items() if not poison_groups(kind)]
    figures = check(acked, start_id, orphans)
    after = dlq(dlq_before)
    records = after["records"]
    res = results(results_before)
    restarts_after = restarts()
    restarted = {u: restarts_after[u] - restarts_before.get(u, 0) for u in restarts_after}
    result = {
        "scenario": name, "fault": what, "run_id": run_id, "images": images, "rate": rate,
        "simulator_rc": rc, "simulator_tail": sim.output.strip().splitlines()[-3:],
        **figures,
        "dup_results": res["read_committed"]["dup_keys"],
        "results_committed": {k: res["read_committed"][k] for k in ("records", "keys", "dup_sample")},
        "dup_results_uncommitted": res["read_uncommitted"]["dup_keys"],
        "results_uncommitted_records": res["read_uncommitted"]["records"],
        "dlq_added": sum(after["end"].values()) - sum(dlq_before.values()),
        "dlq_by_group_reason": {},
        "drain_s": round(drained_at - sim_done, 1) if drained_at else None,
        "drained": drained_at is not None,
        "drain_target_s": DRAIN_TARGETS_S.get(name),
        "restarts": restarted,
        "restarts_expected": dict(ctx.expected_restarts),
        # A crash loop: restarts the fault does not explain (a kill -9 explains one each).
        "restarts_unexplained": sum(max(0, n - ctx.expected_restarts.get(u, 0))
                                    for u, n in restarted.items()),
        "events": ctx.events, "fault_errors": errors,
        "inactive_units_after": inactive_units(),
    }
    for r in records:
        key = f"{r['group']}:{r['reason']}"
        result["dlq_by_group_reason"][key] = result["dlq_by_group_reason"].get(key, 0) + 1
    if hasattr(ctx, "pg_started") and drained_at:
        result["drain_after_pg_start_s"] = round(drained_at - ctx.pg_started, 1)
    if hasattr(ctx, "poison_sent"):
        sent = ctx.poison_sent
        groups = sorted({r["group"] for r in records if r["group"]} | {"iot-inference", "iot-db-writer"})
        per_group = {g: {r["key"] for r in records if r["group"] == g and r["key"] in sent}
                     for g in groups}
        due = {g: {k for k, kind in sent.items() if g in poison_groups(kind)} for g in groups}
        result["poison"] = {
            "sent": len(sent), "kinds": sorted(set(sent.values())),
            "dead_lettered_per_group": {g: len(k) for g, k in per_group.items()},
            "due_per_group": {g: len(k) for g, k in due.items()},
            "all_dead_lettered": all(due[g] <= per_group[g] for g in groups),
            "not_dead_lettered": sorted(k for g in groups for k in due[g] - per_group[g])[:20],
            # Every dead letter of a poison record was due (an orphan result is none).
            "wrongly_dead_lettered": sorted(k for g in groups for k in per_group[g] - due[g]),
            "orphan_results": {"sent": len(orphans), "stored": figures["extra_stored"]},
            "reasons": sorted({f"{sent[r['key']]}->{r['reason']}" for r in records
                               if r["key"] in sent}),
            "dlq_not_poison": sum(1 for r in records if r["key"] not in sent),
        }
    target = result["drain_target_s"]
    result["drain_met"] = None if target is None else bool(drained_at and result["drain_s"] <= target)
    log.info("scenario %s: %s", name, {k: result[k] for k in (
        "acked", "stored_complete", "lost", "dup_rows", "dup_results", "unexpected", "dlq_added",
        "drain_s", "restarts_unexplained")})
    return result


def failing(r: dict) -> bool:
    """A scenario fails on any loss or duplicate, an unexplained restart, a missed drain target,
    a poison record not dead-lettered, a fault that could not be injected, or a simulator that
    did not finish cleanly: a run whose fault never happened proves nothing."""
    return bool(r["lost"] or r["dup_rows"] or r["dup_results"] or r["unexpected"]
                or r["restarts_unexplained"] or r["drain_met"] is False
                or ("poison" in r and not r["poison"]["all_dead_lettered"])
                or r["fault_errors"] or r["simulator_rc"] != 0)


def table(results: list[dict]) -> str:
    lines = [("| scenario | acked | stored complete | lost | dup rows | dup results | unexpected "
              "| DLQ added | drain s (target) | unit restarts (unexplained) |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rs = ", ".join(f"{u} {n}" for u, n in r["restarts"].items() if n) or "0"
        drain = f"{r['drain_s']:.1f}" if r["drain_s"] is not None else "not drained"
        if r.get("drain_target_s"):
            drain += f" (<= {r['drain_target_s']}: {'met' if r['drain_met'] else 'MISSED'})"
        lines.append(f"| {r['scenario']}: {r['fault']} | {r['acked']} | {r['stored_complete']} "
                     f"| {r['lost']} | {r['dup_rows']} | {r['dup_results']} | {r['unexpected']} "
                     f"| {r['dlq_added']} | {drain} | {rs} ({r['restarts_unexplained']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--images", type=int, default=1500, help="images per scenario")
    parser.add_argument("--rate", type=float, default=15, help="simulator images/s")
    parser.add_argument("--scenarios", default=",".join(k for k in SCENARIOS if k != "baseline"),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--drain-timeout", type=float, default=600, help="s after the simulator")
    parser.add_argument("--stall", type=float, default=90,
                        help="stop waiting after this many s without progress (units active)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/reports")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"chaos-{stamp}.json"
    report = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{run(['nproc']).strip()} shared cores", "images": args.images,
              "rate": args.rate, "scenarios": []}
    # A run stopped during slow-ml (or by hand) may have left the ML host starved.
    log.info("ML host CPU limit: %g (0 or all %s cores = none)", unlimit_ml_host() / 1e9,
             run(["nproc"]).strip())
    for name in names:
        try:
            report["scenarios"].append(scenario(name, args.images, args.rate,
                                                args.drain_timeout, args.stall))
        except Exception as exc:
            log.exception("scenario %s failed", name)
            report["scenarios"].append({"scenario": name, "error": repr(exc)})
        path.write_text(json.dumps(report, indent=1) + "\n")  # after each: partial runs count
    done = [r for r in report["scenarios"] if "error" not in r]
    print(table(done))
    for r in report["scenarios"]:
        if "error" in r:
            print(f"scenario {r['scenario']} did not complete: {r['error']}")
        if "poison" in r:
            print(f"poison: {json.dumps(r['poison'])}")
    print(f"\nwrote {path}")
    bad = [r["scenario"] for r in done if failing(r)]
    if bad:
        print(f"failing scenarios: {bad}")
    return 1 if bad or len(done) < len(names) else 0


if __name__ == "__main__":
    sys.exit(main())
