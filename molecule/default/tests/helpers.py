"""Shared by the default scenario's testinfra modules: the roles' names and small readers."""

import json
import os
import subprocess
from pathlib import Path

PROJECT_DIR = Path(
    os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3])
)

APP_USER = "iot"
ENV_DIR = "/etc/iot-pipeline"
KAFKA_BIN = "/opt/kafka/current/bin"
KAFKA_BOOTSTRAP = "127.0.0.1:9092"
# Keep the CLI tools' logs out of the read-only install dir and their heap small, as the role does.
KAFKA_ENV = "LOG_DIR=/tmp KAFKA_HEAP_OPTS=-Xmx128m"
TOPICS = {"images": "iot-images", "results": "iot-results", "dlq": "iot-dead-letter"}
DB_NAME = "iot"
TABLE = "iot_image_data"


def unit_state(host, unit):
    """Properties of a unit from systemctl show (ActiveState, SubState, User, MainPID, ...)."""
    out = host.check_output(
        "systemctl show -p ActiveState -p SubState -p Result -p User -p MainPID "
        "-p ExecMainStatus -p UnitFileState %s",
        unit,
    )
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def kafka_cli(host, tool, args):
    return host.run(
        f"{KAFKA_ENV} {KAFKA_BIN}/{tool} --bootstrap-server {KAFKA_BOOTSTRAP} {args}"
    )


def psql_postgres(host, sql):
    """Runs SQL as the superuser over the local socket (-A -t: bare values)."""
    return host.run(
        "runuser -u postgres -- psql -X -A -t -q -v ON_ERROR_STOP=1 -d %s -c %s",
        DB_NAME,
        sql,
    )


def psql_app(host, sql, database=""):
    """Runs SQL as the application role, over TCP, with the db consumer's own environment file;
    `database` asks for another one than the file's PGDATABASE."""
    return host.run(
        "sh -c %s psql-as-app %s %s",
        f"set -a; . {ENV_DIR}/iot-db-consumer.env; "
        '[ -z "$2" ] || PGDATABASE="$2"; exec psql -X -A -t -q -v ON_ERROR_STOP=1 -c "$1"',
        sql,
        database,
    )


# The goal for every unit this repo writes (systemd-analyze rates 0 = locked down .. 10 = exposed).
MAX_EXPOSURE = 5.0


def exposure(host, unit):
    """The overall exposure level systemd-analyze security gives the unit."""
    last = host.check_output(
        "systemd-analyze security --no-pager %s", unit
    ).splitlines()[-1]
    # "→ Overall exposure level for iot-db-consumer.service: 1.2 OK :-)"
    return float(last.split(":")[1].split()[0])


def inventory_dir(host):
    """The scenario's inventory directory, for ansible-playbook -i: molecule hands testinfra the
    directory itself (ansible_inventory.yml plus the linked hosts and group_vars). Its parent, the
    ephemeral directory, would parse the hosts yet drop the group_vars (the vault among them)."""
    path = Path(host.backend.ansible_inventory)
    return path if path.is_dir() else path.parent


def offending_tasks(report):
    """'host: task (changed|failed)' for every task result that is not clean."""
    found = []
    for play in report["plays"]:
        for task in play["tasks"]:
            for host, result in task["hosts"].items():
                state = ("failed" if result.get("failed") or result.get("unreachable")
                         else "changed" if result.get("changed") else "")
                if state:
                    detail = result.get("msg", "") if state == "failed" else result.get("diff", "")
                    found.append(f"{host}: {task['task']['name']} ({state}) {str(detail)[:300]}")
    return found


def check_site_changes_nothing(host, expected_hosts):
    """Runs site.yml --check --diff on the scenario's inventory; asserts no change, failure or
    unreachable host on at least `expected_hosts` hosts."""
    run = subprocess.run(
        ["ansible-playbook", "-i", str(inventory_dir(host)),
         str(PROJECT_DIR / "playbooks" / "site.yml"), "--check", "--diff"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "ANSIBLE_ROLES_PATH": str(PROJECT_DIR / "roles"),
             "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json", "ANSIBLE_FORCE_COLOR": "0"},
    )
    # molecule's profile_tasks callback prints its timings around the JSON report.
    start = run.stdout.find("{")
    assert start >= 0, run.stdout[-3000:] + run.stderr[-3000:]
    report, _ = json.JSONDecoder().raw_decode(run.stdout[start:])
    stats = report["stats"]
    # The tiers' hosts (and localhost, when a play uses it).
    assert len(stats) >= expected_hosts, stats
    totals = {key: sum(host_stats[key] for host_stats in stats.values())
              for key in ("changed", "failures", "unreachable")}
    assert totals == {"changed": 0, "failures": 0, "unreachable": 0}, (
        f"{totals}:\n" + "\n".join(offending_tasks(report)))
    assert run.returncode == 0, run.stderr[-3000:]
