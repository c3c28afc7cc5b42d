"""One owner per default: role defaults, argument specs and the services' own defaults agree.

A setting exists up to three times: in a role's ``defaults/main.yml`` (its one owner), in the
role's ``meta/argument_specs.yml`` (which may repeat the default) and, for the Python services,
as the ``Option`` default of the environment variable the role writes into the unit's env file.
Someone running a service by hand (files/iot_pipeline/README.md) gets the Python default, so it
must equal what the roles deploy. These tests read all three and fail on any difference.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLES = ROOT / "roles"
ROLE_NAMES = sorted(p.parent.parent.name for p in ROLES.glob("*/defaults/main.yml"))

# Which service module each service role deploys (its env file feeds that module's OPTIONS).
SERVICE_MODULES = {
    "iot_simulator": "simulator",
    "inference_consumer": "inference_consumer",
    "db_consumer": "db_consumer",
    "ml_server": "ml_server",
}
# Settings that differ on purpose between a deployed unit and a run by hand, with the reason.
DIFFERENT_BY_DESIGN = {
    # The unit caches under the host layout (pipeline_app_cache_dir); a user under their home.
    ("iot_simulator", "IOT_SIM_CACHE_DIR"),
    # A host binds /metrics to every address behind the firewall (a fact-derived address breaks
    # on a rebuilt VM); a service run by hand stays on loopback.
    ("iot_simulator", "IOT_METRICS_ADDRESS"),
    ("inference_consumer", "IOT_METRICS_ADDRESS"),
    ("db_consumer", "IOT_METRICS_ADDRESS"),
}
# `{{ name }}`, optionally with a type filter: a plain reference to another variable.
REFERENCE = re.compile(r"^\{\{\s*([a-z_][a-z0-9_]*)\s*(?:\|\s*(?:int|string|bool|float)\s*)?\}\}$")
# `'IOT_X': some_var` inside a Jinja expression (vars built with combine()).
EXPR_ENTRY = re.compile(r"'((?:IOT|PG)_[A-Z0-9_]+)'\s*:\s*([a-z_][a-z0-9_]*)\b")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def role_defaults(role: str) -> dict[str, Any]:
    return _yaml(ROLES / role / "defaults" / "main.yml") or {}


def role_vars(role: str) -> dict[str, Any]:
    return _yaml(ROLES / role / "vars" / "main.yml") or {}


def spec_options(role: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(entry point, option, spec) of every option in the role's argument specs."""
    specs = (_yaml(ROLES / role / "meta" / "argument_specs.yml") or {}).get("argument_specs", {})
    return [(entry, name, spec or {})
            for entry, body in specs.items()
            for name, spec in (body.get("options") or {}).items()]


ALL_DEFAULTS: dict[str, Any] = {}
for _role in ROLE_NAMES:
    ALL_DEFAULTS.update(role_defaults(_role))
    ALL_DEFAULTS.update(role_vars(_role))


def resolve(value: Any, seen: frozenset[str] = frozenset()) -> Any:
    """Follow plain `{{ var }}` references through every role's defaults and vars."""
    if isinstance(value, str):
        match = REFERENCE.match(value.strip())
        if match and match.group(1) in ALL_DEFAULTS and match.group(1) not in seen:
            return resolve(ALL_DEFAULTS[match.group(1)], seen | {match.group(1)})
    return value


def literal(value: Any) -> bool:
    return not (isinstance(value, str) and ("{{" in value or "{%" in value))


# Written only with transport security on (pipeline_tls), not with the defaults.
CONDITIONAL = {"pipeline_app_kafka_security_environment"}


def env_entries(role: str) -> dict[str, Any]:
    """Environment variable -> the (unresolved) value the role writes into its env file."""
    entries: dict[str, Any] = {}
    for name, value in role_vars(role).items():
        if name in CONDITIONAL:
            continue
        if isinstance(value, dict):
            entries.update({k: v for k, v in value.items() if re.match(r"^(IOT|PG)_", str(k))})
        elif isinstance(value, str):
            entries.update({env: "{{ " + var + " }}" for env, var in EXPR_ENTRY.findall(value)})
    return entries


def normalise(value: Any) -> str:
    """How a value reads in an env file: None and "" both mean "not set"."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_argument_specs_repeat_the_defaults(role: str) -> None:
    defaults = role_defaults(role)
    owned = set(defaults) | set(role_vars(role))
    drift = []
    for entry, name, spec in spec_options(role):
        if "default" not in spec:
            continue
        if name not in defaults:
            drift.append(f"{entry}.{name}: spec default {spec['default']!r}, not in defaults/main.yml")
        elif spec["default"] != defaults[name]:
            drift.append(f"{entry}.{name}: spec default {spec['default']!r} != defaults/main.yml "
                         f"{defaults[name]!r}")
    specified = {name for _, name, _ in spec_options(role)}
    # Secrets are checked where they are used (no_log), not by every play that loads the role.
    undocumented = sorted(name for name, value in defaults.items()
                          if name not in specified and "undef(" not in str(value))
    unknown = sorted(name for name in specified if name not in owned and not name.startswith(role))
    assert not drift, f"roles/{role}: argument_specs and defaults disagree:\n" + "\n".join(drift)
    assert not undocumented, f"roles/{role}: defaults missing from argument_specs: {undocumented}"
    assert not unknown, f"roles/{role}: argument_specs options with no default owner: {unknown}"


def python_options(module: str) -> dict[str, Any]:
    """Environment variable -> Option default of one service module."""
    options = importlib.import_module(f"iot_pipeline.{module}").OPTIONS
    return {option.env: option.default for option in options}


def deployed(role: str) -> dict[str, Any]:
    """Environment variable -> literal value the role deploys (shared settings included)."""
    entries = env_entries("pipeline_app") | env_entries(role)
    values = {env: resolve(value) for env, value in entries.items()}
    return {env: value for env, value in values.items() if literal(value)}


@pytest.mark.parametrize("role", sorted(SERVICE_MODULES))
def test_python_defaults_equal_what_the_role_deploys(role: str) -> None:
    python = python_options(SERVICE_MODULES[role])
    values = deployed(role)
    compared = [env for env in values if env in python and (role, env) not in DIFFERENT_BY_DESIGN]
    drift = [f"{env}: role deploys {values[env]!r}, iot_pipeline.{SERVICE_MODULES[role]} "
             f"defaults to {python[env]!r}"
             for env in compared if normalise(values[env]) != normalise(python[env])]
    assert not drift, "Python defaults differ from the deployment:\n" + "\n".join(drift)
    # The comparison must have had something to compare: a renamed env dict would pass silently.
    assert len(compared) >= 3, f"only {compared} compared for {role}"


def test_the_comparison_sees_the_shared_settings() -> None:
    """The chain pipeline_app -> pipeline resolves to literals (else nothing shared is compared)."""
    shared = deployed("db_consumer")
    assert shared["IOT_IMAGES_TOPIC"] == "iot-images"
    assert normalise(shared["IOT_MAX_IMAGE_BYTES"]) == normalise(
        python_options("db_consumer")["IOT_MAX_IMAGE_BYTES"])
    assert "IOT_DB_BATCH_SIZE" in shared


def test_one_python_default_per_setting() -> None:
    """A setting every service reads has one default in every module that declares it."""
    modules = [*SERVICE_MODULES.values(), "accuracy", "lag_exporter"]
    seen: dict[str, dict[str, Any]] = {}
    for module in modules:
        try:
            options = python_options(module)
        except ModuleNotFoundError:
            continue
        for env, default in options.items():
            seen.setdefault(env, {})[module] = default
    # Per-service by design: each service has its own metrics port.
    per_service = {"IOT_METRICS_PORT"}
    drift = {env: found for env, found in seen.items()
             if env not in per_service and len({normalise(v) for v in found.values()}) > 1}
    assert not drift, f"one setting, several Python defaults: {drift}"
