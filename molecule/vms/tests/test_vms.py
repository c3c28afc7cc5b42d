"""What only VMs reached over SSH show: the inventory names resolve on every host (the deployment
wrote them), the firewall lets through exactly what it should, every scrape target is up from the
monitoring host, and SSH takes the deploy user's key only (root and passwords refused)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import unit_state

testinfra_hosts = ["ansible://monitoring"]

NAMES = ["vm1", "vm2", "vm3", "vm4", "vm5"]
SSH_DIR = Path(os.path.expanduser("~/.cache/iot-pipeline/molecule-vms"))

# Connects to argv[1]:argv[2] and prints OPEN, REFUSED (the firewall's reset, or nothing
# listening) or TIMEOUT (a drop would hang: the firewall rejects, so this must never show).
PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("OPEN")
except ConnectionRefusedError:
    print("REFUSED")
except OSError as exc:
    print("TIMEOUT", exc)
"""

# (client, server, port, expected): each server port from a host that uses it and from one that
# does not. Every server port here has its service listening, so REFUSED means the firewall.
MATRIX = [
    ("vm3", "vm2", 9092, "OPEN"),  # the database writer reads Kafka
    ("vm1", "vm2", 9092, "OPEN"),  # the simulator writes to it
    ("vm1", "vm2", 9093, "REFUSED"),  # the controller port is for brokers only
    ("vm4", "vm2", 9094, "REFUSED"),  # so is the brokers' internal listener
    ("vm5", "vm2", 7071, "OPEN"),  # Kafka's JMX exporter, for Prometheus
    ("vm1", "vm2", 7071, "REFUSED"),
    ("vm1", "vm3", 5432, "REFUSED"),  # PostgreSQL: the database writer's host only
    ("vm4", "vm3", 5432, "REFUSED"),
    ("vm5", "vm3", 9187, "OPEN"),  # the PostgreSQL exporter
    ("vm1", "vm3", 9187, "REFUSED"),
    ("vm5", "vm4", 8000, "OPEN"),  # the ML server's /metrics
    ("vm1", "vm4", 8000, "REFUSED"),  # /predict is the inference consumer's, on vm4 itself
    ("vm3", "vm4", 8000, "REFUSED"),
    ("vm5", "vm4", 9102, "OPEN"),  # the inference consumer's /metrics
    ("vm2", "vm4", 9102, "REFUSED"),
    ("vm5", "vm1", 9100, "OPEN"),  # node exporter on every host, for the monitoring host
    ("vm2", "vm1", 9100, "REFUSED"),
    ("vm1", "vm5", 9090, "REFUSED"),  # Prometheus's UI: an SSH tunnel, not the network
    ("vm1", "vm5", 22, "OPEN"),  # SSH from anywhere
]


def tier(host, name):
    return host.get_hosts([f"ansible://{name}"], ansible_inventory=host.backend.ansible_inventory,
                          sudo=host.backend.sudo)[0]


@pytest.mark.parametrize("name", NAMES)
def test_every_host_resolves_every_inventory_name(host, name):
    machine = tier(host, name)
    hosts = machine.check_output("getent hosts " + " ".join(["%s"] * len(NAMES)), *NAMES).splitlines()
    resolved = {line.split()[1]: line.split()[0] for line in hosts}
    assert sorted(resolved) == NAMES, hosts
    assert resolved[name] == machine.ansible.get_variables()["ansible_host"], resolved


@pytest.mark.parametrize(("client", "server", "port", "expected"), MATRIX)
def test_firewall_opens_each_port_to_its_users_only(host, client, server, port, expected):
    result = tier(host, client).run("python3 -c %s %s %s", PROBE, server, str(port))
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == expected, f"{client} -> {server}:{port}: {result.stdout}"


def test_every_scrape_target_up_from_the_monitoring_host(host):
    simulator = tier(host, "vm1")
    get = ("import sys, urllib.request\n"
           "print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())")
    deadline = time.monotonic() + 120
    while True:
        body = json.loads(host.check_output(
            "python3 -c %s %s", get, "http://127.0.0.1:9090/api/v1/targets?state=active"))
        targets = body["data"]["activeTargets"]
        # A finite simulator run takes its endpoint down with it when the unit exits.
        finished = unit_state(simulator, "iot-simulator")["SubState"] == "exited"
        down = [(t["labels"]["job"], t["scrapeUrl"], t["lastError"]) for t in targets
                if t["health"] != "up" and not (t["labels"]["job"] == "simulator" and finished)]
        if targets and not down:
            break
        assert time.monotonic() < deadline, down
        print(f"down: {down}")
        time.sleep(5)
    assert len(targets) >= 12, [t["scrapeUrl"] for t in targets]


def ssh(user, *options):
    """ssh USER@vm1 true from the controller, with the scenario's key and known_hosts."""
    address = "172.30.213.11"
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={SSH_DIR / 'known_hosts'}",
         "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10", *options,
         f"{user}@{address}", "true"],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_ssh_takes_the_deploy_users_key():
    run = ssh("deploy", "-i", str(SSH_DIR / "id_ed25519"), "-o", "IdentitiesOnly=yes")
    assert run.returncode == 0, run.stderr


def test_ssh_refuses_root_even_with_the_key(host):
    # The same key placed in root's authorized_keys too: sshd itself must refuse root.
    vm1 = tier(host, "vm1")
    key = (SSH_DIR / "id_ed25519.pub").read_text()
    vm1.run("install -d -m 0700 /root/.ssh && printf '%%s' %s > /root/.ssh/authorized_keys", key)
    try:
        run = ssh("root", "-i", str(SSH_DIR / "id_ed25519"), "-o", "IdentitiesOnly=yes")
    finally:
        vm1.run("rm -f /root/.ssh/authorized_keys")
    assert run.returncode == 255 and "Permission denied" in run.stderr, run.stderr


def test_ssh_offers_no_password_login():
    run = ssh("deploy", "-o", "PreferredAuthentications=password,keyboard-interactive",
              "-o", "PubkeyAuthentication=no")
    assert run.returncode == 255, run.stderr
    assert "Permission denied (publickey)" in run.stderr, run.stderr


# The mixed fleet of molecule.yml: each host on its release, with that release's packages.
RELEASES = {"vm1": "12", "vm2": "13", "vm3": "13", "vm4": "13", "vm5": "13"}


@pytest.mark.parametrize(("name", "release"), sorted(RELEASES.items()))
def test_each_host_runs_its_debian_release(host, name, release):
    os_release = tier(host, name).file("/etc/os-release").content_string
    assert f'VERSION_ID="{release}"' in os_release, os_release


def test_the_release_decides_postgresql_java_and_python(host):
    db, kafka, ml = tier(host, "vm3"), tier(host, "vm2"), tier(host, "vm4")
    assert db.check_output("ls /etc/postgresql") == "17"
    assert "openjdk-21-jre-headless" in kafka.check_output("dpkg-query -W -f '${Package}\\n' 'openjdk-*'")
    # The ML host's services run Python 3.13, from wheels made for it.
    version = ml.check_output("/opt/iot-pipeline/venv/bin/python -c %s",
                              "import sys; print('%d.%d' % sys.version_info[:2])")
    assert version == "3.13"
    assert ml.file("/opt/iot-pipeline/wheelhouse/cp313-ml").is_directory
