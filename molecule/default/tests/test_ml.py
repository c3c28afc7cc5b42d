"""The ml host: the ML server (model loaded, port 8000) and the inference consumer."""

import json

import pytest
from helpers import APP_USER, ENV_DIR, MAX_EXPOSURE, exposure, unit_state

testinfra_hosts = ["ansible://ml"]

UNITS = ["iot-ml-server", "iot-inference-consumer"]


@pytest.mark.parametrize("unit", UNITS)
def test_service_enabled_and_active(host, unit):
    service = host.service(unit)
    assert service.is_enabled
    assert service.is_running


@pytest.mark.parametrize("unit", UNITS)
def test_service_runs_as_app_user(host, unit):
    state = unit_state(host, unit)
    assert state["User"] == APP_USER
    assert host.process.get(pid=int(state["MainPID"])).user == APP_USER


@pytest.mark.parametrize("unit", UNITS)
def test_env_file_root_only(host, unit):
    env = host.file(f"{ENV_DIR}/{unit}.env")
    assert env.user == "root"
    assert env.mode == 0o600


def test_ml_server_port_listening(host):
    assert host.socket("tcp://0.0.0.0:8000").is_listening


def test_ml_server_health(host):
    out = host.check_output(
        "python3 -c %s",
        "import urllib.request; "
        "r = urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=10); "
        "print(r.status); print(r.read().decode())",
    )
    status, _, body = out.partition("\n")
    assert status == "200"
    assert json.loads(body)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_sandboxed(host, unit):
    assert exposure(host, unit) <= MAX_EXPOSURE
