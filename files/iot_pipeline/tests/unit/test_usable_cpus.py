"""usable_cpus: the model's thread count follows the cpuset and the cgroup CPU quota, not the
host's core count."""

import os

import pytest

from iot_pipeline.runtime import usable_cpus


@pytest.fixture
def affinity(monkeypatch):
    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(n)))
    set_cores(8)
    return set_cores


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_quota_on_an_ancestor_caps_the_cores(tmp_path, affinity):
    # docker --cpus 0.3 sets the quota on /docker/<id>; the service runs in a child cgroup.
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "cgroup", "3:cpuset:/docker/abc\n1:cpu:/docker/abc/system.slice/ml.service\n")
    leaf = fs / "cpu" / "docker" / "abc" / "system.slice" / "ml.service"
    write(leaf / "cpu.cfs_quota_us", "-1\n")
    write(leaf / "cpu.cfs_period_us", "100000\n")
    write(fs / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "30000\n")
    write(fs / "cpu" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    write(fs / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(fs / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert usable_cpus(proc, fs) == 1


def test_v1_combined_controller_mount_and_rounding_up(tmp_path, affinity):
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "cgroup", "2:cpu,cpuacct:/svc\n")
    write(fs / "cpu,cpuacct" / "svc" / "cpu.cfs_quota_us", "250000\n")
    write(fs / "cpu,cpuacct" / "svc" / "cpu.cfs_period_us", "100000\n")
    assert usable_cpus(proc, fs) == 3


def test_v2_cpu_max_tightest_of_the_path(tmp_path, affinity):
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "cgroup", "0::/system.slice/ml.service\n")
    write(fs / "system.slice" / "ml.service" / "cpu.max", "150000 100000\n")
    write(fs / "system.slice" / "cpu.max", "400000 100000\n")
    assert usable_cpus(proc, fs) == 2


def test_affinity_below_the_quota_wins(tmp_path, affinity):
    affinity(2)
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "cgroup", "0::/a\n")
    write(fs / "a" / "cpu.max", "600000 100000\n")
    assert usable_cpus(proc, fs) == 2


@pytest.mark.parametrize(("cgroup_file", "files"), [
    (None, {}),                                         # no /proc/self/cgroup
    ("0::/a\n", {"a/cpu.max": "max 100000\n"}),         # v2, unlimited
    ("1:cpu:/a\n", {"cpu/a/cpu.cfs_quota_us": "-1\n",   # v1, unlimited
                    "cpu/a/cpu.cfs_period_us": "100000\n"}),
    ("0::/a\n", {"a/cpu.max": "garbage\n"}),            # unreadable: no cap
])
def test_no_quota_leaves_the_affinity(tmp_path, affinity, cgroup_file, files):
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    fs.mkdir()
    if cgroup_file is not None:
        write(proc / "cgroup", cgroup_file)
    for name, text in files.items():
        write(fs / name, text)
    assert usable_cpus(proc, fs) == 8


def test_this_process_gets_at_least_one_core():
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
