"""Where the roles put the package on the hosts: pipeline_app's defaults (its service account,
virtualenv, configuration and state directories), overridden by whatever the local inventory sets
for them (`ansible-inventory --host`), so `make bench` and `make chaos` follow an inventory that
moves them instead of typing the paths again."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parent.parent
DEFAULTS = REPO / "roles" / "pipeline_app" / "defaults" / "main.yml"
KEYS = ("user", "group", "home", "venv", "config_dir", "state_dir")


@dataclass(frozen=True)
class Layout:
    user: str
    group: str
    home: str
    venv: str
    config_dir: str
    state_dir: str

    @property
    def python(self) -> str:
        return f"{self.venv}/bin/python"

    def script(self, name: str) -> str:
        return f"{self.venv}/bin/{name}"

    def env_file(self, service: str) -> str:
        return f"{self.config_dir}/{service}.env"

    def run_as(self, service: str) -> list[str]:
        """systemd-run properties that run a command as the deployed service runs."""
        return ["-p", f"EnvironmentFile={self.env_file(service)}", "-p", f"User={self.user}",
                "-p", f"Group={self.group}", "-p", f"WorkingDirectory={self.state_dir}"]


def _render(values: dict[str, str]) -> dict[str, str]:
    """Resolves the `{{ pipeline_app_x }}` references between these variables (the only templating
    their defaults use); anything else is left as it is."""
    out = dict(values)
    for _ in range(len(out)):
        for key, value in out.items():
            out[key] = re.sub(r"\{\{\s*(pipeline_app_\w+)\s*\}\}",
                              lambda m: str(out.get(m.group(1), m.group(0))), str(value))
    return out


@cache
def host_vars(host: str, inventory: str | None = None) -> dict:
    """The variables the inventory sets for ``host`` (`ansible-inventory --host`); {} when it
    cannot be read (a warning says so)."""
    inventory = inventory or str(REPO / "inventory" / "local")
    try:
        proc = subprocess.run(["ansible-inventory", "-i", inventory, "--host", host],
                              capture_output=True, text=True, timeout=120, check=True,
                              env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")})
        return json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
        log.warning("inventory %s not read for %s (%s): role defaults only", inventory, host, exc)
        return {}


def setting(role: str, name: str, host: str, inventory: str | None = None):
    """One role variable as ``host`` gets it: the inventory's value, else the role's default."""
    found = host_vars(host, inventory)
    if name in found:
        return found[name]
    return yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())[name]


@cache
def layout(host: str = "iot-simulator", inventory: str | None = None) -> Layout:
    values = {k: v for k, v in yaml.safe_load(DEFAULTS.read_text()).items()
              if k.removeprefix("pipeline_app_") in KEYS}
    found = host_vars(host, inventory)
    values.update({k: v for k, v in found.items() if k in values})
    values = _render(values)
    return Layout(**{k.removeprefix("pipeline_app_"): v for k, v in values.items()})
