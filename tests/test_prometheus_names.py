"""Renaming a topic or consumer group in the inventory moves every alert rule and console row
with it: the prometheus role installs its shipped rule files and console pages with the
deployment's names (prometheus_pipeline_names), which promtool still accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles" / "prometheus"
RENAMED = {
    "pipeline_images_topic": "cam-images",
    "pipeline_results_topic": "cam-results",
    "pipeline_dlq_topic": "cam-dlq",
    "pipeline_inference_group_id": "cam-inference",
    "pipeline_db_group_id": "cam-db-writer",
}
SHIPPED = ["iot-images", "iot-results", "iot-dead-letter", "iot-inference", "iot-db-writer"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The role's rule files (its template) and console pages (its copy expression) rendered on
    localhost with the renamed topics and groups, the role loaded for its defaults only."""
    out = tmp_path_factory.mktemp("prometheus")
    playbook = out / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Render the rules and consoles",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "roles": [{"role": "prometheus", "tags": ["never"]}],
        "tasks": [
            {"name": "Rules", "ansible.builtin.template": {
                "src": str(ROLE / "templates" / "rules.yml.j2"),
                "dest": f"{out}/{{{{ prometheus_rule_file | basename }}}}", "mode": "0644"},
             "loop": "{{ query('ansible.builtin.fileglob', prometheus_rules_src ~ '/*.rules.yml') }}",
             "loop_control": {"loop_var": "prometheus_rule_file"}},
            {"name": "Consoles", "ansible.builtin.copy": {
                "content": "{{ lookup('ansible.builtin.file', item)"
                           " | pipeline_names(prometheus_pipeline_names) }}\n",
                "dest": f"{out}/{{{{ item | basename }}}}", "mode": "0644"},
             "loop": "{{ query('ansible.builtin.fileglob', prometheus_consoles_src ~ '/*.html') }}"},
        ],
    }]))
    inventory = out / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"localhost": {
        "ansible_python_interpreter": sys.executable, **RENAMED,
        # role_path exists only inside the role's own tasks.
        "prometheus_rules_src": str(ROLE / "files" / "rules"),
        "prometheus_consoles_src": str(ROLE / "files" / "consoles")}}}}))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    env.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    run = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory), str(playbook)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_the_no_rows_alert_watches_the_renamed_images_topic(rendered: Path) -> None:
    rules = yaml.safe_load((rendered / "pipeline.rules.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert 'topic="cam-images"' in alerts["IotNoRowsStored"]["expr"]


@pytest.mark.parametrize("name", ["pipeline.rules.yml", "pipeline.html"])
def test_no_shipped_name_is_left(rendered: Path, name: str) -> None:
    text = (rendered / name).read_text()
    left = [shipped for shipped in SHIPPED if shipped in text]
    assert not left, f"{name} still names {left}"


def test_the_console_rows_follow_the_names(rendered: Path) -> None:
    page = (rendered / "pipeline.html").read_text()
    assert "topic='cam-images'" in page
    assert "Lag cam-inference" in page and "group='cam-db-writer'" in page
    # Go template syntax reaches the page untouched (Jinja never renders it).
    assert '{{ template "prom_query_drilldown"' in page


def test_longer_names_stay(rendered: Path) -> None:
    """Only whole names change: the units and the rule group keep theirs."""
    rules = (rendered / "pipeline.rules.yml").read_text()
    assert "iot-db-consumer" in rules and "iot-lag-exporter" in rules and "iot-pipeline" in rules


def test_promtool_accepts_the_renamed_rules(rendered: Path) -> None:
    assert shutil.which("promtool"), "promtool is missing: make host-packages installs it"
    files = sorted(str(p) for p in rendered.glob("*.rules.yml"))
    assert len(files) >= 5
    run = subprocess.run(["promtool", "check", "rules", *files], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
