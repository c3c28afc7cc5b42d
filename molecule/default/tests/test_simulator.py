"""The simulator host: a finite run that exited cleanly and stays active (exited)."""

from helpers import APP_USER, ENV_DIR, MAX_EXPOSURE, exposure, unit_state

testinfra_hosts = ["ansible://simulator"]


def test_simulator_enabled(host):
    assert host.service("iot-simulator").is_enabled


def test_simulator_unit_runs_as_app_user(host):
    assert unit_state(host, "iot-simulator")["User"] == APP_USER


def test_env_file_root_only(host):
    env = host.file(f"{ENV_DIR}/iot-simulator.env")
    assert env.user == "root"
    assert env.mode == 0o600
    assert 'IOT_SIM_COUNT="200"' in env.content_string


def test_dataset_copied(host):
    assert host.file("/var/lib/iot-pipeline/dataset/test.npz").is_file
    assert host.file("/var/lib/iot-pipeline/dataset/meta.json").is_file


def test_simulator_unit_sandboxed(host):
    assert exposure(host, "iot-simulator") <= MAX_EXPOSURE
