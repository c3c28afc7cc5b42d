"""The vms scenario tests the production example as shipped: its inventory differs from
inventory/production only where a user's copy would (addresses, SSH key and known_hosts, offline
sources), plus the one count the verifier needs, and its group_vars are the production files."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "inventory" / "production"
VMS = ROOT / "molecule" / "vms" / "inventory"

# Keys the scenario may set or change in `all: vars:`, and why.
ALLOWED_VARS = {
    "ansible_ssh_private_key_file",  # the scenario's key pair (create.yml)
    "ansible_ssh_common_args",  # its known_hosts, checked strictly
    "pipeline_app_wheelhouse",  # offline hosts: wheels from the controller
    "iot_simulator_count",  # the verifier counts exactly this many rows
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def without_addresses(inventory: dict) -> dict:
    """The groups and hosts, with each host's ansible_host blanked."""
    groups = {}
    for name, group in inventory["all"]["children"].items():
        hosts = {}
        for host, host_vars in (group.get("hosts") or {}).items():
            assert "ansible_host" in host_vars, f"{host}: no ansible_host"
            hosts[host] = {k: v for k, v in host_vars.items() if k != "ansible_host"}
        groups[name] = hosts
    return groups


def test_same_groups_and_hosts_as_production():
    assert without_addresses(load(VMS / "hosts.yml")) == without_addresses(
        load(PRODUCTION / "hosts.yml"))


def test_only_the_allowed_vars_differ():
    production = load(PRODUCTION / "hosts.yml")["all"]["vars"]
    vms = load(VMS / "hosts.yml")["all"]["vars"]
    differ = {key for key in production.keys() | vms.keys()
              if production.get(key) != vms.get(key)}
    assert differ <= ALLOWED_VARS, sorted(differ - ALLOWED_VARS)


def test_group_vars_are_the_production_files():
    linked = sorted(p.relative_to(VMS / "group_vars") for p in (VMS / "group_vars").rglob("*.yml"))
    shipped = sorted(p.relative_to(PRODUCTION / "group_vars")
                     for p in (PRODUCTION / "group_vars").rglob("*.yml"))
    # The production example ships no vault (only vault.yml.example); the scenario links the
    # local one (make vault) in its place.
    assert sorted(set(linked) - {Path("all/vault.yml")}) == shipped
    for rel in shipped:
        link = VMS / "group_vars" / rel
        assert link.is_symlink() and link.resolve() == (PRODUCTION / "group_vars" / rel).resolve()
