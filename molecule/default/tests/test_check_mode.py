"""`ansible-playbook playbooks/site.yml --check --diff` on the converged hosts changes nothing and
fails nowhere: a dry run tells the truth about a deployment that is up to date. It runs first
(after molecule's idempotence step), before the other modules send more images."""

import json
import os
import subprocess
from pathlib import Path

from helpers import inventory_dir

testinfra_hosts = ["ansible://kafka"]

PROJECT_DIR = Path(
    os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3])
)


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


def test_check_mode_on_the_converged_deployment_changes_nothing(host):
    inventory = inventory_dir(host)
    run = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), str(PROJECT_DIR / "playbooks" / "site.yml"),
         "--check", "--diff"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "ANSIBLE_ROLES_PATH": str(PROJECT_DIR / "roles"),
             "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json", "ANSIBLE_FORCE_COLOR": "0"},
    )
    # molecule's profile_tasks callback prints its timings around the JSON report.
    start = run.stdout.find("{")
    assert start >= 0, run.stdout[-3000:] + run.stderr[-3000:]
    report, _ = json.JSONDecoder().raw_decode(run.stdout[start:])
    stats = report["stats"]
    assert len(stats) >= 4, stats  # the four tiers' hosts (and localhost, when a play uses it)
    totals = {key: sum(host_stats[key] for host_stats in stats.values())
              for key in ("changed", "failures", "unreachable")}
    assert totals == {"changed": 0, "failures": 0, "unreachable": 0}, (
        f"{totals}:\n" + "\n".join(offending_tasks(report)))
    assert run.returncode == 0, run.stderr[-3000:]
