"""The ml_server role refuses a weights file its model card does not describe, and a missing
one, naming the file: run against the ml host into a scratch directory (the service is left as
it is)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import inventory_dir

testinfra_hosts = ["ansible://ml"]

PROJECT_DIR = Path(
    os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3])
)
MODELS = PROJECT_DIR / "files" / "models"
PLAY = """
- hosts: ml
  gather_facts: false
  become: true
  tasks:
    - ansible.builtin.include_role:
        name: ml_server
        tasks_from: model.yml
"""


def install_model(host, tmp_path, weights):
    play = tmp_path / "model.yml"
    play.write_text(PLAY)
    run = subprocess.run(
        ["ansible-playbook", "-i", str(inventory_dir(host)), str(play),
         "-e", f"ml_server_weights_src={weights}", "-e", "ml_server_model_dir=/tmp/model-check"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "ANSIBLE_ROLES_PATH": str(PROJECT_DIR / "roles")},
    )
    return run.returncode, run.stdout + run.stderr


@pytest.fixture
def copy_of_model(tmp_path):
    card = json.loads((MODELS / "resnet50-cifar100.card.json").read_text())
    shutil.copy(MODELS / "resnet50-cifar100.card.json", tmp_path / "mine.card.json")
    weights = tmp_path / "mine.weights.npz"
    shutil.copy(MODELS / card["weights"], weights)
    return weights


def test_the_repo_model_is_deployed_and_checked(host):
    card = json.loads((MODELS / "resnet50-cifar100.card.json").read_text())
    weights = host.file(f"/var/lib/iot-pipeline/models/{card['weights']}")
    assert weights.exists
    assert weights.sha256sum == card["sha256"]
    assert host.file("/var/lib/iot-pipeline/models/resnet50-cifar100.card.json").exists
    env = host.file("/etc/iot-pipeline/iot-ml-server.env").content_string
    assert 'IOT_ML_WEIGHTS="/var/lib/iot-pipeline/models/resnet50-cifar100.card.json"' in env


def test_weights_that_differ_from_their_card_fail_the_deploy(host, tmp_path, copy_of_model):
    with copy_of_model.open("r+b") as handle:  # one flipped byte
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    rc, out = install_model(host, tmp_path, copy_of_model)
    assert rc != 0
    assert f"model weights {copy_of_model} have sha256" in out
    assert "not the one the card describes" in out
    assert not host.file(f"/tmp/model-check/{copy_of_model.name}").exists


def test_a_missing_weights_file_or_card_fails_the_deploy(host, tmp_path, copy_of_model):
    rc, out = install_model(host, tmp_path, tmp_path / "absent.weights.npz")
    assert rc != 0
    assert f"model weights {tmp_path / 'absent.weights.npz'} do not exist" in out
    (tmp_path / "mine.card.json").unlink()
    rc, out = install_model(host, tmp_path, copy_of_model)
    assert rc != 0
    assert f"model card {tmp_path / 'mine.card.json'} is missing" in out


def test_a_users_own_weights_with_their_card_install(host, tmp_path, copy_of_model):
    rc, out = install_model(host, tmp_path, copy_of_model)
    assert rc == 0, out[-3000:]
    assert host.file(f"/tmp/model-check/{copy_of_model.name}").sha256sum == \
        json.loads((tmp_path / "mine.card.json").read_text())["sha256"]
    host.run("rm -rf /tmp/model-check")
