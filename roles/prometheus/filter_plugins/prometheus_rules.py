"""prometheus_alert_overrides: shorter (or longer) windows and `for:` of named alerts;
pipeline_names: the deployment's topic and group names in place of the shipped ones.

The rule files under files/rules/ and the console pages stay as shipped (promtool checks and
tests the rules with the default names); the role applies both while it copies them
(tasks/configure.yml).
"""

import copy
import re

from ansible.errors import AnsibleFilterError

# A range selector or subquery window, e.g. [10m] or [1h30m] (not [5m:1m], left alone).
_WINDOW = re.compile(r"\[(\d+[smhdwy])+\]")
_DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")


def prometheus_alert_overrides(rules, overrides):
    """Returns a copy of a rules file (dict with `groups`) where each alert named in `overrides`
    gets its `for` replaced, and every range window of its expression replaced by `window`.
    Names that match no alert of this file are ignored (tasks/configure.yml checks them all)."""
    result = copy.deepcopy(rules)
    for group in result.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert")
            if name not in overrides:
                continue
            for key, value in overrides[name].items():
                if key not in ("for", "window"):
                    raise AnsibleFilterError(
                        f"prometheus_alert_overrides[{name}]: unknown key {key!r} (for, window)"
                    )
                if not _DURATION.match(str(value)):
                    raise AnsibleFilterError(
                        f"prometheus_alert_overrides[{name}].{key}: {value!r} is not a duration"
                    )
            if "for" in overrides[name]:
                rule["for"] = str(overrides[name]["for"])
            if "window" in overrides[name]:
                rule["expr"] = _WINDOW.sub(f"[{overrides[name]['window']}]", rule["expr"])
    return result


def pipeline_names(text, names):
    """Replaces each shipped name (a key of `names`: iot-images, iot-inference, ...) by the
    deployment's (its value) wherever it stands as a whole name: quoted in a label matcher or
    alone in a console row, never as part of a longer one (iot-inference-consumer stays)."""
    for shipped, deployed in names.items():
        if not isinstance(deployed, str) or not deployed:
            raise AnsibleFilterError(f"pipeline_names: {shipped} maps to {deployed!r}")
        text = re.sub(rf"(?<![\w-]){re.escape(shipped)}(?![\w-])", lambda _, d=deployed: d, text)
    return text


class FilterModule:
    def filters(self):
        return {
            "prometheus_alert_overrides": prometheus_alert_overrides,
            "pipeline_names": pipeline_names,
        }
