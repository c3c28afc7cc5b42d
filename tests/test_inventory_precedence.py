"""An inventory's settings reach the hosts: role defaults < group_vars < host_vars < extra vars.

Runs playbooks/settings.yml (the roles' defaults and vars, as the tier playbooks load them, with
nothing executed on any host) against a throw-away inventory that sets what a user would, and
checks each host's resolved variables and the environment files its services would get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOKS = ROOT / "playbooks"

SECRETS = {
    "vault_postgresql_app_password": "app-secret",
    "vault_postgresql_owner_password": "owner-secret",
    "vault_pki_ca_passphrase": "ca-passphrase-0123456789",
    "vault_kafka_simulator_password": "sim-secret",
    "vault_kafka_inference_password": "inf-secret",
    "vault_kafka_db_writer_password": "db-secret",
}


def write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))


def settings(inventory: Path, *extra: str) -> dict[str, dict[str, Any]]:
    """host -> the `msg` of playbooks/settings.yml for that host (json callback)."""
    env = {**os.environ,
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
           "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
           "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_VAULT_PASSWORD_FILE": "",
           "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
    env.pop("ANSIBLE_VAULT_PASSWORD_FILE")
    run = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory / "hosts.yml"),
         str(PLAYBOOKS / "settings.yml"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(run.stdout)
    found: dict[str, dict[str, Any]] = {}
    for play in report["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"] == "Show the resolved settings":
                for host, result in task["hosts"].items():
                    found[host] = result["msg"]
    return found


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    inventory = tmp_path_factory.mktemp("inventory")
    write(inventory / "hosts.yml", {"all": {"children": {
        "kafka": {"hosts": {"k1": None}},
        "database": {"hosts": {"d1": None}},
        "ml": {"hosts": {"m1": None, "m2": None}},
        "simulator": {"hosts": {"s1": None}},
    }}})
    write(inventory / "group_vars" / "all" / "vault.yml", SECRETS)
    write(inventory / "group_vars" / "all" / "main.yml", {"pipeline_images_topic": "my-images"})
    write(inventory / "group_vars" / "kafka.yml", {
        "kafka_topic_default_partitions": 6,
        "kafka_topics": [{"name": "my-images", "partitions": 12}, {"name": "iot-results"}],
    })
    write(inventory / "group_vars" / "ml.yml", {
        "ml_server_weights": "imagenet",
        "ml_server_workers": 2,
        "inference_consumer_batch_size": 16,
    })
    write(inventory / "host_vars" / "m2.yml", {"ml_server_workers": 3})
    return settings(inventory, "-e", "inference_consumer_batch_timeout_ms=5")


def test_nothing_beside_the_playbooks_outranks_the_inventory() -> None:
    assert not (PLAYBOOKS / "group_vars").exists()
    assert not (PLAYBOOKS / "host_vars").exists()


def test_every_host_is_reported(resolved: dict[str, dict[str, Any]]) -> None:
    assert set(resolved) == {"k1", "d1", "m1", "m2", "s1"}


def test_group_vars_win_over_role_defaults(resolved: dict[str, dict[str, Any]]) -> None:
    ml = resolved["m1"]
    assert ml["settings"]["ml_server_weights"] == "imagenet"
    assert ml["environment"]["iot-ml-server"]["IOT_ML_WEIGHTS"] == "imagenet"
    assert ml["settings"]["inference_consumer_batch_size"] == 16
    assert str(ml["environment"]["iot-inference-consumer"]["IOT_INFER_BATCH_SIZE"]) == "16"
    kafka = resolved["k1"]["settings"]
    assert kafka["kafka_topic_default_partitions"] == 6
    assert kafka["kafka_topics"][0] == {"name": "my-images", "partitions": 12}


def test_group_all_reaches_every_service(resolved: dict[str, dict[str, Any]]) -> None:
    assert resolved["s1"]["environment"]["iot-simulator"]["IOT_IMAGES_TOPIC"] == "my-images"
    assert resolved["d1"]["environment"]["iot-db-consumer"]["IOT_IMAGES_TOPIC"] == "my-images"


def test_host_vars_win_over_group_vars(resolved: dict[str, dict[str, Any]]) -> None:
    assert resolved["m1"]["settings"]["ml_server_workers"] == 2
    assert resolved["m2"]["settings"]["ml_server_workers"] == 3
    assert "--workers=3" in resolved["m2"]["environment"]["iot-ml-server"]["GUNICORN_CMD_ARGS"]


def test_extra_vars_win_over_everything(resolved: dict[str, dict[str, Any]]) -> None:
    env = resolved["m1"]["environment"]["iot-inference-consumer"]
    assert str(env["IOT_INFER_BATCH_TIMEOUT_MS"]) == "5"


def test_unset_values_are_the_role_defaults(resolved: dict[str, dict[str, Any]]) -> None:
    db = resolved["d1"]
    assert db["settings"]["db_consumer_batch_size"] == 500
    assert str(db["environment"]["iot-db-consumer"]["IOT_DB_BATCH_SIZE"]) == "500"
    assert db["environment"]["iot-db-consumer"]["PGPASSWORD"] == "(vault)"
    assert "app-secret" not in json.dumps(resolved)
