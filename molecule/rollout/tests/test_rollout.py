"""A model rollout under load: images at a steady rate while playbooks/rollout-model.yml puts a
second model on the two ML hosts one at a time. The second model is the repo's weights under a
card with another version (no training, nothing large written): the restart, the gate and the
version in each row are what is tested, not the model.

Every acknowledged image (the simulator's ack log) must be stored exactly once with a prediction,
nothing may go to the dead-letter topic, the rows must carry both versions, and each host's
/health (polled every ~0.5 s during the stream) must go from the old version to the new one and
never back, the second host only after the first one serves again. Rows classified by the old
model all predate the last switch, rows of the new one all follow the first host's restart.
Prints the figures (acknowledged, stored, per version, each host's outage, the rollout's time)."""

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import ENV_DIR, TABLE, psql_postgres
from test_pipeline import dead_letter_messages, simulator_finished, tier, wait_for_rows

testinfra_hosts = ["ansible://database"]

PROJECT_DIR = Path(
    os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3])
)
MODELS = PROJECT_DIR / "files" / "models"
CARD = json.loads((MODELS / "resnet50-cifar100.card.json").read_text())
# iot_pipeline.resnet.model_version of the repo's card, and the second model's.
OLD_VERSION = CARD.get("version") or CARD["sha256"][:12]
NEW_VERSION = "rollout-2"

SIM = "mol-ro-sim"
ML_HOSTS = ("mol-ro-ml1", "mol-ro-ml2")
DEPLOY_RUN = 20  # iot_simulator_count (inventory/hosts.yml)
RATE = 8  # images/s: what both ML hosts sustain on 2 shared cores with one of them restarting
DEVICES = 20  # keys spread over the images topic's 3 partitions, so both hosts get images
LEAD_S = 20  # of stream before the rollout starts, and after it ends
TIMEOUT_S = 900
POLL_S = 5
SLACK_S = 2.0  # clock reads of the poller vs. the consumer's inferred_at, same kernel clock
DONE_RE = re.compile(
    r"done: (\d+) images sent in [\d.]+s \([\d.]+/s\), (\d+) acknowledged, (\d+) failed"
)
HEALTH = (
    "import json, urllib.request\n"
    "try:\n"
    "    answer = urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)\n"
    "    print(json.load(answer).get('version'))\n"
    "except Exception:\n"
    "    print('-')\n"  # refused (restarting) or 503 (loading the model)
)


def docker(*args, timeout=120):
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def health_version(container):
    """The version the host's ML server reports, or None while it is down or loading."""
    out = docker("exec", container, "python3", "-c", HEALTH, timeout=30).strip()
    return None if out == "-" else out


class HealthLog(threading.Thread):
    """Polls every ML host's /health until stopped: (time.time(), host, version or None)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            for container in ML_HOSTS:
                self.samples.append((time.time(), container, health_version(container)))
            self.done.wait(0.5)

    def of(self, container):
        return [(t, v) for t, c, v in self.samples if c == container]


def sql_rows(db, sql):
    result = psql_postgres(db, sql)
    assert result.rc == 0, result.stderr
    return [line.split("|") for line in result.stdout.splitlines() if line]


def second_model(directory):
    """The repo's weights under the same names, with a card that names another version."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / CARD["weights"]
    shutil.copyfile(MODELS / CARD["weights"], weights)
    (directory / "resnet50-cifar100.card.json").write_text(
        json.dumps({**CARD, "version": NEW_VERSION}, indent=2) + "\n"
    )
    return weights


def test_each_ml_host_calls_its_own_ml_server(host):
    for name in ML_HOSTS:
        ml = host.get_host(f"ansible://{name}", ansible_inventory=host.backend.ansible_inventory)
        env = ml.file(f"{ENV_DIR}/iot-inference-consumer.env").content_string
        assert 'IOT_ML_SERVER_URL="http://127.0.0.1:8000"' in env, env
        assert health_version(name) == OLD_VERSION


def test_images_topic_has_a_partition_per_ml_host_and_at_least_3(host):
    kafka = tier(host, "kafka")
    out = kafka.check_output(
        "LOG_DIR=/tmp KAFKA_HEAP_OPTS=-Xmx128m /opt/kafka/current/bin/kafka-topics.sh "
        "--bootstrap-server 127.0.0.1:9092 --describe --topic iot-images"
    )
    assert re.search(r"PartitionCount: 3\b", out), out


def test_rollout_under_load_loses_nothing_and_switches_each_host(host, tmp_path):
    db = host
    kafka = tier(host, "kafka")
    simulator = tier(host, "simulator")
    # molecule's inventory directory itself: its group_vars link brings the vault (the ML role
    # checks the services' secrets), which the ephemeral directory above it would not.
    inventory = host.backend.ansible_inventory
    wait_for_rows(db, DEPLOY_RUN, ready=lambda: simulator_finished(simulator))
    weights = second_model(tmp_path / "model")
    first_id = int(sql_rows(db, f"SELECT coalesce(max(id), 0) FROM {TABLE}")[0][0])
    dlq_before = dead_letter_messages(kafka)

    unit = f"iot-simulator-rollout-{int(time.time())}"
    ack_log = f"/var/lib/iot-pipeline/{unit}.ack"
    health = HealthLog()
    health.start()
    started = time.time()
    stream = subprocess.Popen(
        ["docker", "exec", SIM, "systemd-run", "--wait", "--pipe", "--quiet", "--collect",
         "--unit", unit, "-p", "EnvironmentFile=/etc/iot-pipeline/iot-simulator.env",
         "-p", "User=iot", "-p", "Group=iot", "-p", "WorkingDirectory=/var/lib/iot-pipeline",
         "/opt/iot-pipeline/venv/bin/iot-simulator", "--count", str(RATE * 3600),
         "--rate", str(RATE), "--devices", str(DEVICES), "--progress-s", "30",
         "--ack-log", ack_log],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        time.sleep(LEAD_S)
        assert stream.poll() is None, stream.communicate()[0][-3000:]
        rollout_start = time.time()
        rollout = subprocess.run(
            ["ansible-playbook", "-i", str(inventory),
             str(PROJECT_DIR / "playbooks" / "rollout-model.yml"),
             "-e", f"ml_server_weights_src={weights}"],
            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
        )
        rollout_end = time.time()
        assert rollout.returncode == 0, rollout.stdout[-4000:] + rollout.stderr[-2000:]
        assert stream.poll() is None, "the simulator stopped during the rollout"
        time.sleep(LEAD_S)
    finally:
        subprocess.run(["docker", "exec", SIM, "systemctl", "stop", unit],
                       capture_output=True, check=False, timeout=120)
        output = stream.communicate(timeout=120)[0]
        health.done.set()
        health.join(30)
    stream_end = time.time()
    done = DONE_RE.findall(output)
    assert done, output[-3000:]
    sent, acked, failed = (int(n) for n in done[-1])
    acked_ids = [line for line in docker("exec", SIM, "cat", ack_log).splitlines() if line]

    # Drain: every acknowledged image stored with its prediction.
    deadline = time.monotonic() + TIMEOUT_S
    complete_sql = (f"SELECT count(*) FROM {TABLE} WHERE id > {first_id} AND data IS NOT NULL "
                    "AND length(data) > 0 AND inferred_value IS NOT NULL")
    while (complete := int(sql_rows(db, complete_sql)[0][0])) < len(acked_ids):
        if time.monotonic() > deadline:
            pytest.fail(f"{complete} of {len(acked_ids)} acknowledged images stored complete "
                        f"within {TIMEOUT_S} s")
        print(f"waiting for {len(acked_ids)} complete rows: {complete}")
        time.sleep(POLL_S)
    time.sleep(POLL_S)  # late duplicates or strays
    rows = sql_rows(
        db,
        "SELECT unique_id, (data IS NOT NULL AND length(data) > 0 AND ground_truth IS NOT NULL "
        "AND inferred_value IS NOT NULL), coalesce(model_version, ''), "
        f"extract(epoch FROM inferred_at) FROM {TABLE} WHERE id > {first_id}",
    )
    dlq = dead_letter_messages(kafka) - dlq_before
    stored_ids = [r[0] for r in rows]
    versions = Counter(r[2] for r in rows)
    inferred = {v: sorted(float(r[3]) for r in rows if r[2] == v) for v in versions}

    # Per host: the last sample with the old version, the first with the new one.
    switch = {}
    for name in ML_HOSTS:
        seen = [v for _, v in health.of(name) if v is not None]
        changes = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
        last_old = max((t for t, v in health.of(name) if v == OLD_VERSION), default=None)
        first_new = min((t for t, v in health.of(name) if v == NEW_VERSION), default=None)
        switch[name] = {"changes": changes, "last_old": last_old, "first_new": first_new}
    order = sorted(ML_HOSTS, key=lambda n: switch[n]["first_new"] or float("inf"))

    t0 = started
    print(
        "\nrollout under load:\n"
        f"  stream {RATE}/s from 0 s to {stream_end - t0:.0f} s; rollout-model.yml "
        f"{rollout_start - t0:.0f}-{rollout_end - t0:.0f} s ({rollout_end - rollout_start:.0f} s)\n"
        + "".join(
            f"  {n}: versions {' -> '.join(switch[n]['changes'])}; old last seen "
            f"{(switch[n]['last_old'] or t0) - t0:.1f} s, new first seen "
            f"{(switch[n]['first_new'] or t0) - t0:.1f} s\n" for n in order)
        + f"  produced: sent {sent}, acknowledged {acked} (ack log {len(acked_ids)}), "
        f"failed {failed}\n"
        f"  stored: {len(rows)} rows, {sum(r[1] == 't' for r in rows)} complete, "
        f"{len(set(stored_ids))} distinct; per version {dict(versions)}\n"
        + "".join(f"  {v or '(none)'}: inferred {inferred[v][0] - t0:.1f} .. "
                  f"{inferred[v][-1] - t0:.1f} s\n" for v in versions)
        + f"  dead letters: {dlq}"
    )

    # Every acknowledged image exactly once, with a prediction; nothing else; no dead letter.
    assert failed == 0 and sent == acked == len(acked_ids) > RATE * 2 * LEAD_S
    assert len(stored_ids) == len(set(stored_ids)), "an image was stored twice"
    assert set(stored_ids) == set(acked_ids)
    assert all(r[1] == "t" for r in rows), "a row without its image or prediction"
    assert dlq == 0
    # Both versions, every row with one.
    assert set(versions) == {OLD_VERSION, NEW_VERSION}, versions
    # Each host went from the old version to the new one, never back.
    for name in ML_HOSTS:
        assert switch[name]["changes"] == [OLD_VERSION, NEW_VERSION], (name, switch[name])
    # One host at a time: the second still served the old model after the first one was back.
    first, second = order
    assert switch[second]["last_old"] >= switch[first]["first_new"], switch
    # The rows switch with the hosts: old ones before the last switch, new ones after the first
    # host left the old model.
    assert inferred[OLD_VERSION][-1] <= switch[second]["first_new"] + SLACK_S
    assert inferred[NEW_VERSION][0] >= switch[first]["last_old"] - SLACK_S
    # Traffic on both sides of the switch, and after it only the new model.
    assert inferred[OLD_VERSION][0] < rollout_start < inferred[NEW_VERSION][-1]
    assert all(t <= rollout_end + SLACK_S for t in inferred[OLD_VERSION])
