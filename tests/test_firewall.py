"""roles/firewall: each port open only to the hosts that use it, with the owners' port numbers.

The firewall runs on every host, where the roles owning the ports (kafka, zookeeper, ...) are not
loaded, so its defaults repeat their numbers as fallbacks; the first tests hold those equal to
the owners' defaults. The others render the role's table for throw-away inventories of loopback
hosts (the role loaded for its defaults and vars only, nothing applied) and check who may reach
which port, then let `nft -c` check the files in a network namespace of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLES = ROOT / "roles"
FIREWALL_DEFAULTS = ROLES / "firewall" / "defaults" / "main.yml"

# `{{ owner_var | default(1234) }}`: another role's port, with its fallback.
FALLBACK = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\|\s*default\((\d+)\)\s*\}\}")
# `{{ var }}`: a plain reference.
REFERENCE = re.compile(r"^\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}$")
# One accept rule of the generated table.
RULE = re.compile(r'^\s*(ip6?) saddr \{ (.+?) \} (tcp|udp) dport (\d+) accept comment "(.*)"$')

MONITORING = "127.0.0.15"
ANYWHERE = {"ip": {"0.0.0.0/0"}, "ip6": {"::/0"}}


def defaults(role: str) -> dict[str, Any]:
    path = ROLES / role / "defaults" / "main.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def owned_value(name: str) -> tuple[list[str], Any]:
    """(roles whose defaults define `name`, its value there, plain references followed)."""
    owners = [role.name for role in sorted(ROLES.iterdir())
              if role.name != "firewall" and name in defaults(role.name)]
    if len(owners) != 1:
        return owners, None
    value = defaults(owners[0])[name]
    match = REFERENCE.match(str(value).strip())
    return (owners, owned_value(match.group(1))[1]) if match else (owners, value)


def test_fallback_ports_equal_their_owners_defaults() -> None:
    fallbacks = FALLBACK.findall(FIREWALL_DEFAULTS.read_text())
    # A rule that lost its fallback would pass silently: every owned port must be found.
    assert {name for name, _ in fallbacks} >= {
        "kafka_controller_port", "kafka_internal_port", "kafka_jmx_exporter_port",
        "zookeeper_client_port", "zookeeper_peer_port", "zookeeper_election_port",
        "db_consumer_pg_port", "postgres_exporter_port", "db_consumer_metrics_port",
        "inference_consumer_metrics_port", "iot_simulator_metrics_port", "node_exporter_port",
        "lag_exporter_metrics_port", "prometheus_port"}
    drift = []
    for name, number in fallbacks:
        owners, value = owned_value(name)
        if len(owners) != 1:
            drift.append(f"{name}: defined by {owners or 'no role'}, expected exactly one owner")
        elif str(value) != number:
            drift.append(f"{name}: firewall falls back to {number}, roles/{owners[0]} defaults to {value!r}")
    assert not drift, "roles/firewall/defaults/main.yml:\n" + "\n".join(drift)


def test_ports_without_fallback_come_from_a_dependency() -> None:
    """A port named without a fallback must be defined wherever the role runs: its dependency."""
    meta = yaml.safe_load((ROLES / "firewall" / "meta" / "main.yml").read_text())
    loaded = set(defaults("firewall"))
    for dependency in meta["dependencies"]:
        loaded |= set(defaults(dependency["role"] if isinstance(dependency, dict) else dependency))
    ports = [str(rule["port"]) for rule in defaults("firewall")["firewall_rules"]]
    plain = [match.group(1) for port in ports if (match := REFERENCE.match(port.strip()))]
    assert plain, "expected the pipeline's ports as plain references"
    assert not [name for name in plain if name not in loaded]


# --- The generated table -----------------------------------------------------------------------

PLAYBOOK = """
- name: Render the firewall of every host
  hosts: all
  gather_facts: false
  roles:
    # Defaults and vars only (as playbooks/settings.yml does): "never" keeps its tasks from running;
    # its argument specs still check the inventory's values.
    - {role: firewall, tags: [never]}
  tasks:
    - name: Show the rendered files
      ansible.builtin.debug:
        msg:
          table: "{{ lookup('ansible.builtin.template', role_dir ~ '/templates/iot-pipeline.nft.j2') }}"
          unit: "{{ lookup('ansible.builtin.template', role_dir ~ '/templates/firewall.service.j2') }}"
          invalid: "{{ firewall_invalid_sources }}"
      tags: [always]
"""


def render(tmp: Path, inventory: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """host -> {table, unit, invalid}; each table is also written to tmp/HOST.nft for nft -c."""
    playbook = Path(sys.executable).with_name("ansible-playbook")
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp / "render.yml").write_text(PLAYBOOK)
    env = {**os.environ,
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
           "ANSIBLE_ROLES_PATH": str(ROLES),
           "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
           "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
    env.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    run = subprocess.run(
        [str(playbook), "-i", str(tmp / "hosts.yml"), str(tmp / "render.yml"),
         "-e", f"role_dir={ROLES / 'firewall'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    tasks = json.loads(run.stdout)["plays"][0]["tasks"]
    found = {host: result["msg"] for task in tasks if task["task"]["name"] == "Show the rendered files"
             for host, result in task["hosts"].items()}
    for host, files in found.items():
        (tmp / f"{host}.nft").write_text(files["table"])
    return found


def opened(table: str) -> dict[int, dict[str, set[str]]]:
    """port -> {"ip": sources, "ip6": sources} of the table's accept rules."""
    ports: dict[int, dict[str, set[str]]] = {}
    for line in table.splitlines():
        if match := RULE.match(line):
            family, sources, _, port, _ = match.groups()
            ports.setdefault(int(port), {"ip": set(), "ip6": set()})[family] |= set(sources.split(", "))
    return ports


def v4(*addresses: str) -> dict[str, set[str]]:
    return {"ip": set(addresses), "ip6": set()}


def nft_check(path: Path) -> None:
    """`nft -c` in a network namespace of its own: it parses and checks, applies nothing."""
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    unshare = shutil.which("unshare")
    assert nft and unshare, "nft or unshare is missing: make host-packages installs nftables"
    probe = subprocess.run([unshare, "-rn", nft, "list", "ruleset"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("no network namespace for nft -c: " + probe.stderr.decode()[-200:])
    run = subprocess.run([unshare, "-rn", nft, "-c", "-f", str(path)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"{path.name}: {run.stderr}"


PIPELINE = {"all": {
    "vars": {"ansible_connection": "local",
             "firewall_admin_sources": ["::1"],
             "firewall_extra_rules": [
                 {"name": "Grafana", "port": 3000, "open_on": ["monitoring"],
                  "sources": ["127.0.0.0/8", "::1/128"]},
                 # vm6 has no ansible_host: its name would end up in the table.
                 {"name": "By name", "port": 4000, "proto": "udp", "open_on": ["ungrouped"],
                  "groups": ["ungrouped"]}]},
    "hosts": {"vm6": {}},
    "children": {
        "simulator": {"hosts": {"vm1": {"ansible_host": "127.0.0.11"}}},
        "kafka": {"hosts": {"vm2": {"ansible_host": "127.0.0.12"}}},
        "database": {"hosts": {"vm3": {"ansible_host": "127.0.0.13"}}},
        "ml": {"hosts": {"vm4": {"ansible_host": "127.0.0.14"}}},
        "monitoring": {"hosts": {"vm5": {"ansible_host": MONITORING}}},
    }}}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("firewall")
    return tmp, render(tmp, PIPELINE)


def test_each_host_opens_exactly_its_ports(pipeline: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    _, hosts = pipeline
    every_host = {22: ANYWHERE, 9100: v4(MONITORING)}
    expected = {
        "vm1": {**every_host, 9101: v4(MONITORING)},
        "vm2": {**every_host,
                9092: v4("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14", MONITORING),
                9093: v4("127.0.0.12"), 9094: v4("127.0.0.12"), 7071: v4(MONITORING)},
        "vm3": {**every_host, 5432: v4("127.0.0.13"), 9187: v4(MONITORING), 9103: v4(MONITORING)},
        "vm4": {**every_host, 8000: v4("127.0.0.14", MONITORING), 9102: v4(MONITORING)},
        "vm5": {**every_host, 9104: v4(MONITORING), 9090: {"ip": set(), "ip6": {"::1"}},
                3000: {"ip": {"127.0.0.0/8"}, "ip6": {"::1/128"}}},
        "vm6": {**every_host, 4000: v4("vm6")},
    }
    assert {host: opened(files["table"]) for host, files in hosts.items()} == expected


def test_the_chain_refuses_the_rest(pipeline: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    _, hosts = pipeline
    tables = {host: files["table"] for host, files in hosts.items()}
    for table in tables.values():
        assert table.startswith("#")  # ansible_managed
        lines = [line.strip() for line in table.splitlines() if line.strip() and not line.strip().startswith("#")]
        assert not [line for line in lines if "flush" in line]
        assert "type filter hook input priority filter; policy drop;" in lines
        assert lines.index("ct state established,related accept") < lines.index("iif \"lo\" accept")
        assert lines[-4:] == ["meta l4proto tcp reject with tcp reset", "reject", "}", "}"]
        assert "chain forward" not in table and "chain output" not in table
    # Without a source a rule opens nothing, and says so.
    assert "# ZooKeeper" not in tables["vm2"]
    assert "Prometheus UI" not in tables["vm1"]


def test_names_are_refused(pipeline: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    _, hosts = pipeline
    invalid = {host: files["invalid"] for host, files in hosts.items()}
    assert invalid == {"vm1": [], "vm2": [], "vm3": [], "vm4": [], "vm5": [], "vm6": ["vm6"]}


def test_the_unit_loads_the_rules_file(pipeline: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    _, hosts = pipeline
    unit = hosts["vm1"]["unit"]
    assert "ExecStart=/usr/sbin/nft -f /etc/nftables.d/iot-pipeline.nft" in unit
    assert "ExecStop=-/usr/sbin/nft delete table inet iot_pipeline" in unit
    assert not [line for line in unit.splitlines() if "flush" in line and not line.startswith("#")]


def test_nft_accepts_the_tables(pipeline: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    tmp, hosts = pipeline
    for host in sorted(hosts):
        if host != "vm6":  # names are refused by the role before nft sees them
            nft_check(tmp / f"{host}.nft")


def test_zookeeper_mode_opens_the_ensemble(tmp_path: Path) -> None:
    """No zookeeper group: the ensemble runs on the kafka hosts; no monitoring host: no exporters."""
    inventory = {"all": {
        "vars": {"ansible_connection": "local"},
        "children": {
            "simulator": {"hosts": {"vm1": {"ansible_host": "127.0.0.11"}}},
            "kafka": {"hosts": {"vm2": {"ansible_host": "127.0.0.12"},
                                "vm3": {"ansible_host": "127.0.0.13"}},
                      "vars": {"kafka_metadata_mode": "zookeeper"}},
            "database": {"hosts": {"vm4": {"ansible_host": "127.0.0.14"}}},
            "ml": {"hosts": {"vm5": {"ansible_host": "127.0.0.15"}}},
        }}}
    tables = {host: files["table"] for host, files in render(tmp_path, inventory).items()}
    brokers = v4("127.0.0.12", "127.0.0.13")
    kafka = opened(tables["vm2"])
    assert {port: kafka[port] for port in (2181, 2888, 3888)} == {2181: brokers, 2888: brokers, 3888: brokers}
    assert kafka[9092] == v4("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14", "127.0.0.15")
    assert 7071 not in kafka and 9100 not in kafka
    assert set(opened(tables["vm1"])) == {22}
    assert "# Node exporter (tcp 9100): no source, not opened" in tables["vm1"]
    assert set(opened(tables["vm4"])) == {22, 5432}
    nft_check(tmp_path / "vm2.nft")
