"""prometheus_alert_overrides: shorter (or longer) windows and `for:` of named alerts.

The rule files under files/rules/ stay plain Prometheus YAML, so promtool checks and tests them
as shipped; the role applies the overrides while it copies them (tasks/configure.yml).
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


class FilterModule:
    def filters(self):
        return {"prometheus_alert_overrides": prometheus_alert_overrides}
