"""The stream under faults: 2,000 images at 15/s (what 2 shared cores sustain end to end) while
(b) the broker leading partition 0 of the images topic is killed with SIGKILL (systemd restarts
it) and, once it is back in sync, (a) playbooks/kafka-rolling-restart.yml restarts the three
brokers one at a time. Every acknowledged image must be stored once, with a prediction, and
nothing may go to the dead-letter topic. Prints produced (acknowledged), stored, duplicates and
the longest stall of result_stored_at."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TABLE, TOPICS, kafka_cli, psql_postgres
from test_pipeline import dead_letter_messages, tier

testinfra_hosts = ["ansible://database"]

IMAGES = 2000
RATE = 15  # images/s; the pipeline's full speed here is ~15-18 with one broker and nothing else
KILL_AFTER_S = 20  # into the stream, so the kill and the roll both fall inside it
BROKERS = [
    "molecule-cl-1",
    "molecule-cl-2",
    "molecule-cl-3",
]  # node ids 1, 2, 3 (test_cluster)
TIMEOUT_S = 900
POLL_S = 5
PROJECT_DIR = Path(
    os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3])
)
# The simulator's last line, shown by playbooks/simulate.yml.
DONE_RE = re.compile(
    r"done: (\d+) images sent in [\d.]+s \([\d.]+/s\), (\d+) acknowledged, (\d+) failed"
)


def sql_values(db, sql):
    result = psql_postgres(db, sql)
    assert result.rc == 0, result.stderr
    return result.stdout.strip().split("|")


def run_counts(db, first_id):
    """Rows of this run (ids above first_id): total, complete, distinct unique ids, longest gap
    between consecutive result_stored_at (s), first produced -> last stored (s)."""
    total, complete, distinct, stall, span = sql_values(
        db,
        f"SELECT count(*), "
        f"count(*) FILTER (WHERE data IS NOT NULL AND length(data) > 0 AND ground_truth IS NOT NULL "
        f"AND inferred_value IS NOT NULL), count(DISTINCT unique_id), "
        f"round(coalesce(extract(epoch FROM max(gap)), 0)::numeric, 2), "
        f"round(coalesce(extract(epoch FROM max(done) - min(produced_at)), 0)::numeric, 1) "
        f"FROM (SELECT unique_id, data, ground_truth, inferred_value, produced_at, "
        f"greatest(image_stored_at, result_stored_at) AS done, "
        f"result_stored_at - lag(result_stored_at) OVER (ORDER BY result_stored_at) AS gap "
        f"FROM {TABLE} WHERE id > {first_id}) AS run",
    )
    return {
        "total": int(total),
        "complete": int(complete),
        "distinct": int(distinct),
        "max_stall_s": float(stall),
        "span_s": float(span),
    }


def topic_end(kafka, topic):
    """Sum of the partitions' end offsets: records ever appended to the topic."""
    result = kafka_cli(kafka, "kafka-get-offsets.sh", f"--topic {topic} --time -1")
    assert result.rc == 0, result.stderr
    return sum(int(line.rsplit(":", 1)[1]) for line in result.stdout.split())


def leader_of_partition_0(kafka):
    result = kafka_cli(
        kafka, "kafka-topics.sh", f"--describe --topic {TOPICS['images']}"
    )
    assert result.rc == 0, result.stderr
    match = re.search(r"Partition: 0\s+Leader: (\d+)", result.stdout)
    assert match, result.stdout
    return BROKERS[int(match.group(1)) - 1]


def wait_until_in_sync(broker, since):
    """The killed broker's kafka unit is running again and no partition is under-replicated."""
    while True:
        service = broker.service("kafka")
        if service.is_running:
            urp = kafka_cli(
                broker, "kafka-topics.sh", "--describe --under-replicated-partitions"
            )
            if urp.rc == 0 and not urp.stdout.strip():
                return
        if time.monotonic() - since > TIMEOUT_S:
            pytest.fail(
                f"{broker.backend.get_hostname()} not back in sync within {TIMEOUT_S} s"
            )
        time.sleep(POLL_S)


def ansible_playbook(inventory_dir, playbook, *extra):
    return [
        "ansible-playbook",
        "-i",
        str(inventory_dir),
        str(PROJECT_DIR / "playbooks" / playbook),
        *extra,
    ]


def test_stream_survives_leader_kill_and_rolling_restart(host):
    db = host
    kafka = tier(host, "kafka")
    inventory = host.backend.ansible_inventory
    inventory_dir = Path(inventory).parent
    first_id = int(sql_values(db, f"SELECT coalesce(max(id), 0) FROM {TABLE}")[0])
    images_before = topic_end(kafka, TOPICS["images"])
    results_before = topic_end(kafka, TOPICS["results"])
    dlq_before = dead_letter_messages(kafka)
    events = []

    started = time.monotonic()
    simulator = subprocess.Popen(
        ansible_playbook(
            inventory_dir,
            "simulate.yml",
            "-e",
            f"images={IMAGES}",
            "-e",
            f"rate={RATE}",
        ),
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(KILL_AFTER_S)

        # (b) SIGKILL the leader of images partition 0; Restart=on-failure brings it back.
        victim_name = leader_of_partition_0(kafka)
        victim = host.get_host(f"ansible://{victim_name}", ansible_inventory=inventory)
        t = time.monotonic() - started
        killed = victim.run("systemctl kill -s KILL kafka")
        assert killed.rc == 0, killed.stderr
        events.append(
            f"kill -9 {victim_name} at {t:.0f} s (simulator running: {simulator.poll() is None})"
        )
        assert simulator.poll() is None, "the simulator finished before the kill"
        time.sleep(2 * POLL_S)  # past RestartSec=5, so "running" is the new process
        wait_until_in_sync(victim, started)
        events.append(
            f"{victim_name} back in sync at {time.monotonic() - started:.0f} s"
        )

        # (a) The rolling restart, serial, each broker waiting for no under-replicated partition.
        t = time.monotonic() - started
        running = simulator.poll() is None
        roll = subprocess.run(
            ansible_playbook(inventory_dir, "kafka-rolling-restart.yml"),
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        events.append(
            f"rolling restart {t:.0f}-{time.monotonic() - started:.0f} s "
            f"(simulator running at its start: {running})"
        )
        assert roll.returncode == 0, roll.stdout[-3000:] + roll.stderr[-3000:]
        assert running, "the simulator finished before the rolling restart"

        output, _ = simulator.communicate(timeout=TIMEOUT_S)
    finally:
        if simulator.poll() is None:
            simulator.kill()
    events.append(f"simulator done at {time.monotonic() - started:.0f} s")
    assert simulator.returncode == 0, output[-3000:]
    done = DONE_RE.findall(output)
    assert done, output[-3000:]
    sent, acked, failed = (int(n) for n in done[-1])

    deadline = time.monotonic() + TIMEOUT_S
    while (counts := run_counts(db, first_id))["complete"] < IMAGES:
        if time.monotonic() > deadline:
            pytest.fail(
                f"{IMAGES} complete rows not reached within {TIMEOUT_S} s: {counts}"
            )
        print(f"waiting for {IMAGES} complete rows: {counts}")
        time.sleep(POLL_S)
    time.sleep(POLL_S)  # late duplicates or strays
    counts = run_counts(db, first_id)
    images_appended = topic_end(kafka, TOPICS["images"]) - images_before
    results_appended = topic_end(kafka, TOPICS["results"]) - results_before
    dlq = dead_letter_messages(kafka) - dlq_before

    print(
        "\nfaults under load:\n  " + "\n  ".join(events) + "\n"
        f"  produced: sent {sent}, acknowledged {acked}, failed {failed}\n"
        f"  stored: {counts['total']} rows, {counts['complete']} with a prediction, "
        f"{counts['distinct']} distinct unique ids\n"
        f"  duplicates: rows {counts['total'] - counts['distinct']}, "
        f"images topic +{images_appended} for {acked} acknowledged, "
        f"results topic +{results_appended} (re-inferred after a redelivery: "
        f"{results_appended - counts['total']})\n"
        f"  dead letters: {dlq}\n"
        f"  max stall (gap in result_stored_at): {counts['max_stall_s']} s; "
        f"first produced -> last stored {counts['span_s']} s"
    )
    assert (sent, acked, failed) == (IMAGES, IMAGES, 0)
    assert counts["total"] == counts["complete"] == counts["distinct"] == IMAGES
    assert dlq == 0
