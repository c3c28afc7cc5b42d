"""site.yml's preflight refuses a bad inventory before any host is contacted, naming the cause.

Runs playbooks/site.yml against throw-away copies of inventory/production whose hosts all point at
127.0.0.1 and a port of this test's. Where the run must stop before any host, a socket listens on
that port and counts the connections it was offered: "no host contacted" is checked on the wire,
not read from the output. Nothing here leaves the loopback address.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "playbooks" / "site.yml"

SECRETS = {
    "vault_postgresql_app_password": "app-secret",
    "vault_postgresql_owner_password": "owner-secret",
    "vault_postgresql_monitor_password": "monitor-secret",
    "vault_pki_ca_passphrase": "ca-passphrase-0123456789",
    "vault_kafka_simulator_password": "sim-secret",
    "vault_kafka_inference_password": "inf-secret",
    "vault_kafka_db_writer_password": "db-secret",
}

Hosts = dict[str, Any]


class Listener:
    """A loopback port that counts the connections made to it (the kernel queues them unaccepted)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]

    def connections(self) -> int:
        self.sock.setblocking(False)
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


@pytest.fixture
def listener() -> Iterator[Listener]:
    port = Listener()
    yield port
    port.sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def each_host(hosts: Hosts) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, its vars, its group's hosts mapping) of every host in a hosts.yml tree."""
    stack = [hosts["all"]]
    while stack:
        group = stack.pop() or {}
        members = group.get("hosts") or {}
        for name in list(members):
            members[name] = members[name] or {}
            yield name, members[name], members
        stack.extend((group.get("children") or {}).values())


def production_copy(tmp_path: Path, port: int, secrets: dict[str, str],
                    edit: Callable[[Hosts], None] | None = None) -> Path:
    """inventory/production with every host at 127.0.0.1:port and these vault values."""
    inventory = tmp_path / "inventory"
    shutil.copytree(ROOT / "inventory" / "production", inventory)
    hosts_file = inventory / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    for _, host_vars, _ in each_host(hosts):
        host_vars.update(ansible_host="127.0.0.1", ansible_port=port)
    if edit:
        edit(hosts)
    hosts_file.write_text(yaml.safe_dump(hosts))
    (inventory / "group_vars" / "all" / "vault.yml").write_text(yaml.safe_dump(secrets))
    return inventory


def site(inventory: Path, tmp_path: Path) -> tuple[int, dict[str, Any]]:
    """Exit status and json report of site.yml on this inventory."""
    env = {**os.environ,
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
           "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
           "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(tmp_path / "facts"),
           "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
    env.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    run = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory), str(SITE),
         "-e", "pipeline_connect_timeout_s=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        pytest.fail(run.stdout[-4000:] + run.stderr[-4000:])
    return run.returncode, report


def results(report: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(play, task, host, result) of every task result, loop items each on their own."""
    for play in report["plays"]:
        for task in play["tasks"]:
            for host, result in task["hosts"].items():
                for one in result.get("results") or [result]:
                    yield play["play"]["name"], task["task"]["name"], host, one


def failures(report: dict[str, Any]) -> list[str]:
    return [f"{host}: {result.get('msg')}" for _, _, host, result in results(report)
            if result.get("failed") or result.get("unreachable")]


def assert_stopped_in_preflight(code: int, report: dict[str, Any], listener: Listener) -> None:
    assert code != 0
    plays = {play for play, _, _, _ in results(report)}
    assert plays and all(play.startswith("Preflight") for play in plays), plays
    assert listener.connections() == 0, "a host was contacted"


def site_roles() -> set[str]:
    """The roles of site.yml's playbooks (the preflight's aside), their dependencies, and pki,
    which they include with pipeline_tls (on in inventory/production)."""
    names = {"pki"}
    for entry in yaml.safe_load(SITE.read_text()):
        playbook = entry["ansible.builtin.import_playbook"]
        if playbook != "preflight.yml":
            for play in yaml.safe_load((SITE.parent / playbook).read_text()):
                names |= {role["role"] if isinstance(role, dict) else role for role in play.get("roles", [])}
    found: set[str] = set()
    while names:
        role = names.pop()
        found.add(role)
        meta = yaml.safe_load((ROOT / "roles" / role / "meta" / "main.yml").read_text()) or {}
        names |= {dep["role"] if isinstance(dep, dict) else dep for dep in meta.get("dependencies") or []} - found
    return found


def test_a_missing_secret_stops_the_run_naming_it(tmp_path: Path, listener: Listener) -> None:
    secrets = {k: v for k, v in SECRETS.items() if k != "vault_postgresql_app_password"}
    code, report = site(production_copy(tmp_path, listener.port, secrets), tmp_path)
    assert_stopped_in_preflight(code, report, listener)
    failed = failures(report)
    assert failed and all("vault_postgresql_app_password" in msg for msg in failed), failed
    assert "app-secret" not in json.dumps(report)


def test_a_misspelt_group_is_refused_by_name(tmp_path: Path, listener: Listener) -> None:
    def misspell(hosts: Hosts) -> None:
        children = hosts["all"]["children"]
        children["databse"] = children.pop("database")

    code, report = site(production_copy(tmp_path, listener.port, SECRETS, misspell), tmp_path)
    assert_stopped_in_preflight(code, report, listener)
    assert any("group 'databse' is not one of" in msg for msg in failures(report)), failures(report)


def test_two_tiers_on_one_port_of_a_host_are_refused(tmp_path: Path, listener: Listener) -> None:
    """vm3 runs the database writer and an inference consumer, both with metrics on 9102."""
    def share_a_port(hosts: Hosts) -> None:
        children = hosts["all"]["children"]
        vm3 = children["database"]["hosts"]["vm3"]
        vm3["db_consumer_metrics_port"] = 9102
        children["ml"]["hosts"]["vm3"] = vm3

    code, report = site(production_copy(tmp_path, listener.port, SECRETS, share_a_port), tmp_path)
    assert_stopped_in_preflight(code, report, listener)
    failed = failures(report)
    assert any("vm3: port 9102" in msg and "ml (inference_consumer_metrics_port)" in msg
               and "database (db_consumer_metrics_port)" in msg for msg in failed), failed


def test_a_host_name_as_ansible_host_is_refused(tmp_path: Path, listener: Listener) -> None:
    """/etc/hosts and the firewall rules are written from ansible_host: it must be an address."""
    def name_vm1(hosts: Hosts) -> None:
        for name, host_vars, _ in each_host(hosts):
            if name == "vm1":
                host_vars["ansible_host"] = "localhost"

    code, report = site(production_copy(tmp_path, listener.port, SECRETS, name_vm1), tmp_path)
    assert_stopped_in_preflight(code, report, listener)
    assert any("vm1: ansible_host is 'localhost', not an IP address" in msg
               for msg in failures(report)), failures(report)


def test_a_valid_inventory_passes_every_check_until_the_hosts_must_answer(tmp_path: Path) -> None:
    """The shipped production inventory with its vault: only "nothing answers" stops the run."""
    port = closed_port()
    inventory = production_copy(tmp_path, port, SECRETS)
    code, report = site(inventory, tmp_path)
    assert code != 0
    hosts = {name for name, _, _ in each_host(yaml.safe_load((inventory / "hosts.yml").read_text()))}
    assert sorted(failures(report)) == sorted(
        f"{host}: {host} (127.0.0.1): nothing answers on port {port}" for host in hosts)
    # Every role site.yml runs had its argument spec checked with the inventory's values.
    validated = {result["validate_args_context"]["name"] for _, _, _, result in results(report)
                 if "validate_args_context" in result and not result.get("skipped")}
    assert site_roles() <= validated, site_roles() - validated


def test_an_unsupported_os_is_refused_naming_the_host(tmp_path: Path, listener: Listener) -> None:
    """The host checks on this machine itself (local connection, read only): told that only
    "Debian 11" is supported, the preflight refuses every host by name and its release, and no
    play after the preflight starts."""
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines()
                   if "=" in line)
    distribution = release["NAME"].strip('"').split()[0]

    def local(hosts: Hosts) -> None:
        hosts["all"]["vars"].update(pipeline_supported_os=["Debian 11"])
        for _, host_vars, _ in each_host(hosts):
            # Already root here: no sudo (connection variables outrank the plays' become).
            host_vars.update(ansible_connection="local", ansible_become=False)

    code, report = site(production_copy(tmp_path, listener.port, SECRETS, local), tmp_path)
    assert_stopped_in_preflight(code, report, listener)
    failed = failures(report)
    assert failed, report["stats"]
    for name in ("vm1", "vm2", "vm3", "vm4", "vm5"):
        assert any(msg.startswith(f"{name}: {name} runs {distribution} ")
                   and msg.endswith("this repo supports Debian 11") for msg in failed), failed
