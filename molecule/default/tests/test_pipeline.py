"""End to end: the images the simulator sent on deploy are all in the database with a prediction,
nothing went to the dead-letter topic, and playbooks/simulate.yml sends more that arrive as well."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TABLE, TOPICS, inventory_dir, kafka_cli, psql_postgres, unit_state

testinfra_hosts = ["ansible://database"]

FIRST_RUN = 200  # iot_simulator_count (inventory.yml)
MORE = 50  # sent by playbooks/simulate.yml
TIMEOUT_S = 600
POLL_S = 5
PROJECT_DIR = Path(
    os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3])
)

# total rows, rows with image + label + prediction, distinct unique_ids
COUNTS_SQL = (
    f"SELECT count(*), "
    f"count(*) FILTER (WHERE data IS NOT NULL AND length(data) > 0 AND ground_truth IS NOT NULL "
    f"AND inferred_value IS NOT NULL), "
    f"count(DISTINCT unique_id) FROM {TABLE}"
)


def tier(host, group):
    """The first host of an inventory group (get_hosts expands the group; get_host would not)."""
    return host.get_hosts(
        [f"ansible://{group}"], ansible_inventory=host.backend.ansible_inventory
    )[0]


def row_counts(db):
    result = psql_postgres(db, COUNTS_SQL)
    assert result.rc == 0, result.stderr
    total, complete, distinct = (int(n) for n in result.stdout.strip().split("|"))
    return {"total": total, "complete": complete, "distinct": distinct}


def wait_for_rows(db, expected, ready=lambda: True):
    """Polls until `expected` complete rows exist and ready() holds; returns the last counts."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        counts = row_counts(db)
        if counts["complete"] >= expected and ready():
            return counts
        if time.monotonic() > deadline:
            pytest.fail(
                f"{expected} complete rows not reached within {TIMEOUT_S} s: {counts}"
            )
        print(f"waiting for {expected} complete rows: {counts}")
        time.sleep(POLL_S)


def dead_letter_messages(kafka):
    result = kafka_cli(
        kafka, "kafka-get-offsets.sh", f"--topic {TOPICS['dlq']} --time -1"
    )
    assert result.rc == 0, result.stderr
    # topic:partition:offset, one line per partition
    offsets = [line.rsplit(":", 2) for line in result.stdout.split()]
    assert len(offsets) == 3, result.stdout
    return sum(int(offset) for _, _, offset in offsets)


def simulator_finished(simulator):
    state = unit_state(simulator, "iot-simulator")
    return state["ActiveState"] == "active" and state["SubState"] == "exited"


def test_first_run_arrives_complete(host):
    simulator = tier(host, "simulator")
    counts = wait_for_rows(host, FIRST_RUN, ready=lambda: simulator_finished(simulator))
    # Give late duplicates or strays a moment to show up before asserting the exact count.
    time.sleep(POLL_S)
    counts = row_counts(host)
    assert counts == {"total": FIRST_RUN, "complete": FIRST_RUN, "distinct": FIRST_RUN}
    state = unit_state(simulator, "iot-simulator")
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0")


def test_dead_letter_topic_empty(host):
    assert dead_letter_messages(tier(host, "kafka")) == 0


def test_simulate_more_images(host):
    # 200 on a fresh deployment (the test above); counting from here keeps a rerun of verify valid.
    before = row_counts(host)["total"]
    inventory = inventory_dir(host)
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            str(inventory),
            str(PROJECT_DIR / "playbooks" / "simulate.yml"),
            "-e",
            f"images={MORE}",
        ],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    total = before + MORE
    wait_for_rows(host, total)
    time.sleep(POLL_S)
    assert row_counts(host) == {"total": total, "complete": total, "distinct": total}
    assert dead_letter_messages(tier(host, "kafka")) == 0


# The model the ml role deploys by default: the repo's CIFAR-100 ResNet-50 and its card.
CARD = json.loads((PROJECT_DIR / "files/models/resnet50-cifar100.card.json").read_text())

PREDICTIONS_SQL = (
    f"SELECT model_name, count(*), count(*) FILTER (WHERE inferred_value = ground_truth), "
    f"string_agg(DISTINCT inferred_value, '|') FROM {TABLE} "
    f"WHERE inferred_value IS NOT NULL AND ground_truth IS NOT NULL GROUP BY model_name"
)


def test_rows_carry_cifar100_labels_and_mostly_right_ones(host):
    wait_for_rows(host, FIRST_RUN)
    result = psql_postgres(host, PREDICTIONS_SQL)
    assert result.rc == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()  # one model classified every row
    model, rows, agreeing, labels = line.split("|", 3)
    assert model == CARD["name"]
    assert set(labels.split("|")) <= set(CARD["labels"])
    # Random weights agree on 1 % of 100 classes (P(>= 30 % of 200) is astronomically small);
    # the card's model on ~test_top1; 200 images leave it +-7 points at 2 sigma.
    top1 = int(agreeing) / int(rows)
    assert int(rows) >= FIRST_RUN
    assert top1 >= CARD["test_top1"] - 0.12, f"top-1 {top1:.3f} vs card {CARD['test_top1']}"
