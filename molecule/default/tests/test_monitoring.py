"""The monitoring host: Prometheus scrapes every target, each service's metrics move with the
images, the no-rows / lag alert goes pending or firing when the database writer stops, and the
console dashboard renders in headless Chromium (a screenshot in bench/results/).

Runs last (conftest.py): it stops the database writer and sends images beyond test_pipeline's
exact counts. The scenario's inventory shortens the scrape and rule intervals (5 s) and the two
alerts' windows (1 minute, `for: 0s`)."""

import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from helpers import MAX_EXPOSURE, exposure, inventory_dir, unit_state

testinfra_hosts = ["ansible://monitoring"]

PROJECT_DIR = Path(
    os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3])
)
PROMETHEUS = "http://127.0.0.1:9090"
# Every job of the prometheus role's defaults, with the number of targets in this scenario.
JOBS = {
    "prometheus": 1,
    "node": 5,
    "kafka": 1,
    "postgresql": 1,
    "simulator": 1,
    "inference_consumer": 1,
    "db_consumer": 1,
    "ml_server": 1,
    "lag_exporter": 1,
}
TIMEOUT_S = 240
POLL_S = 5

GET = (
    "import sys, urllib.request\n"
    "print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())"
)


def api(host, path, **params):
    """GET a Prometheus API path on the monitoring host; the `data` of its answer."""
    url = f"{PROMETHEUS}{path}" + (f"?{urlencode(params)}" if params else "")
    body = json.loads(host.check_output("python3 -c %s %s", GET, url))
    assert body["status"] == "success", body
    return body["data"]


def value(host, expr):
    """The single value of an instant query (sum it in expr), or None without a sample."""
    result = api(host, "/api/v1/query", query=expr)["result"]
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else None


def tier(host, group):
    return host.get_hosts(
        [f"ansible://{group}"], ansible_inventory=host.backend.ansible_inventory
    )[0]


def simulate(host, images, rate, wait=True):
    """playbooks/simulate.yml against the scenario's inventory (as test_pipeline does)."""
    argv = [
        "ansible-playbook",
        "-i",
        str(inventory_dir(host)),
        str(PROJECT_DIR / "playbooks" / "simulate.yml"),
        "-e",
        f"images={images}",
        "-e",
        f"rate={rate}",
    ]
    proc = subprocess.Popen(
        argv,
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        finish(proc)
    return proc


def finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


def wait_until(what, check, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        print(f"waiting: {what}")
        time.sleep(POLL_S)


def test_units_run_hardened(host):
    for unit in ["prometheus", "prometheus-node-exporter", "iot-lag-exporter"]:
        assert unit_state(host, unit)["ActiveState"] == "active", unit
        assert exposure(host, unit) <= MAX_EXPOSURE, unit
    db = tier(host, "database")
    assert unit_state(db, "prometheus-postgres-exporter")["ActiveState"] == "active"
    assert exposure(db, "prometheus-postgres-exporter") <= MAX_EXPOSURE
    assert exposure(db, "prometheus-node-exporter") <= MAX_EXPOSURE


def test_rules_loaded_with_the_scenario_overrides(host):
    groups = api(host, "/api/v1/rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    for name in [
        "IotNoRowsStored",
        "IotConsumerLagGrowing",
        "IotDeadLetterRateHigh",
        "IotUnitRestarting",
        "IotMlServerDown",
        "IotEndToEndLatencyHigh",
        "KafkaUnderReplicatedPartitions",
        "PostgresqlDown",
        "HostOutOfMemory",
        "iot:consumergroup_lag:sum",
        "iot:e2e_latency_seconds:p99_5m",
    ]:
        assert name in rules, name
    assert rules["IotNoRowsStored"]["duration"] == 0
    assert "[1m]" in rules["IotNoRowsStored"]["query"]
    assert "[10m]" not in rules["IotNoRowsStored"]["query"]
    assert all(rule["health"] == "ok" for rule in rules.values()), [
        (name, rule.get("lastError"))
        for name, rule in rules.items()
        if rule["health"] != "ok"
    ]


def test_every_scrape_target_up(host):
    simulator = tier(host, "simulator")

    def targets_up():
        targets = api(host, "/api/v1/targets", state="active")["activeTargets"]
        by_job = {}
        for target in targets:
            by_job.setdefault(target["labels"]["job"], []).append(target)
        assert {job: len(t) for job, t in by_job.items()} == JOBS
        # The simulator service exits after its count (iot_simulator_count) and takes its
        # endpoint down with it; every other target must answer.
        finished = unit_state(simulator, "iot-simulator")["SubState"] == "exited"
        down = [
            (t["labels"]["job"], t["labels"]["host"], t["lastError"])
            for t in targets
            if t["health"] != "up"
            and not (t["labels"]["job"] == "simulator" and finished)
        ]
        print(f"down: {down}")
        return not down

    wait_until("every scrape target up", targets_up, timeout=90)


# Series of each scraped component that must grow with the images (summed over their labels).
MOVING = {
    "inference_consumer": "iot_inference_records_consumed_total",
    "ml_server": "iot_ml_images_total",
    "db_consumer": 'iot_db_rows_written_total{kind="image"}',
    "db_consumer e2e": "iot_e2e_latency_seconds_count",
    "lag_exporter": 'iot_kafka_topic_end_offset{topic="iot-images"}',
    "kafka": 'kafka_server_brokertopicmetrics_messagesin_total{topic="iot-images"}',
    "postgresql": 'pg_stat_database_xact_commit{datname="iot"}',
}


def test_each_service_metric_moves_with_images(host):
    images = 60
    # Highest value seen over the window: a series that stops (a finished process) still counts.
    expr = {
        name: f"sum(max_over_time({series}[10m]))" for name, series in MOVING.items()
    }
    before = {name: value(host, e) or 0.0 for name, e in expr.items()}
    simulate(host, images, rate=5)  # 12 s: scraped at least twice
    # Each simulator run is a new process with its own counters, served only while it runs:
    # the run just finished is the only one within the last minute.
    acked = value(host, "max(max_over_time(iot_simulator_images_acked_total[1m]))")
    assert acked is not None and acked >= 1, acked
    end_offset = before["lag_exporter"] + images

    def moved():
        now = {name: value(host, e) or 0.0 for name, e in expr.items()}
        still = [name for name in MOVING if now[name] <= before[name]]
        print(f"not moved yet: {still}")
        stored = now["db_consumer"] - before["db_consumer"]
        print(f"rows counted by the DB writer: {stored} of {images}")
        return not still and now["lag_exporter"] >= end_offset and stored >= images and now

    now = wait_until("every service's metric moved", moved)
    assert now["db_consumer"] - before["db_consumer"] >= images
    # Each host's node exporter reports its own CPU time.
    assert (
        value(host, "count(count by (host) (node_cpu_seconds_total))") == JOBS["node"]
    )
    # The accuracy query of the PostgreSQL exporter: the repo's model on its CIFAR-100 labels.
    accuracy = wait_until(
        "iot:accuracy:ratio recorded", lambda: value(host, "max(iot:accuracy:ratio)")
    )
    assert 0.3 < accuracy <= 1.0, accuracy


def firing_or_pending(host, names):
    alerts = api(host, "/api/v1/alerts")["alerts"]
    hits = [
        (a["labels"]["alertname"], a["state"])
        for a in alerts
        if a["labels"]["alertname"] in names
    ]
    print(f"alerts: {hits}")
    return hits


def test_stopped_db_consumer_raises_no_rows_and_lag_alerts(host):
    db = tier(host, "database")
    names = {"IotNoRowsStored", "IotConsumerLagGrowing"}
    assert not firing_or_pending(host, {"IotNoRowsStored"}), "alert before the stop"
    db.run("systemctl stop iot-db-consumer")
    try:
        # 120 images over 2 minutes: the images topic keeps growing past the 1-minute window
        # in which the stopped writer's last rows still count.
        run = simulate(host, 120, rate=1, wait=False)
        seen = wait_until(
            "IotNoRowsStored and IotConsumerLagGrowing pending or firing",
            lambda: (
                {name for name, _ in firing_or_pending(host, names)} == names
                and firing_or_pending(host, names)
            ),
            timeout=180,
        )
        assert {state for _, state in seen} <= {"pending", "firing"}
        finish(run)
    finally:
        db.run("systemctl start iot-db-consumer")
    # The writer resumes where it stopped: its group's lag drains and the new process (counters
    # from 0) stores every image of the run; then the alert clears.
    wait_until(
        "the stopped run's rows stored",
        lambda: (
            value(host, 'sum(iot:consumergroup_lag:sum{group="iot-db-writer"})') == 0
            and (value(host, 'sum(iot_db_rows_written_total{kind="image"})') or 0)
            >= 120
        ),
    )
    wait_until(
        "IotNoRowsStored resolved",
        lambda: not firing_or_pending(host, {"IotNoRowsStored"}),
    )


def test_console_dashboard_renders(host):
    page = host.check_output(
        "python3 -c %s %s", GET, f"{PROMETHEUS}/consoles/pipeline.html"
    )
    for graph in [
        "throughputGraph",
        "lagGraph",
        "dlqGraph",
        "latencyGraph",
        "accuracyGraph",
    ]:
        assert f'id="{graph}"' in page
    assert "error executing template" not in page
    # The right-hand table rendered numbers from the recording rules, not "-".
    assert "Top-1 " in page
    # Headless Chromium on the controller, through the container's address on the Docker network.
    address = host.check_output("hostname -I").split()[0]
    out = PROJECT_DIR / "bench" / "results" / "monitoring-console.png"
    shot = subprocess.run(
        [
            str(PROJECT_DIR / "scripts" / "screenshot-console.sh"),
            f"http://{address}:9090/consoles/pipeline.html",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank or error page compresses to a few KB; five graphs with lines do not.
    assert len(png) > 60_000, len(png)
