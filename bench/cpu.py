"""CPU time of the local containers and of the systemd services in them, from cgroup counters.

Read on the controller (the local hosts are containers of this machine's Docker engine):

- per container: the container cgroup's CPU counter (cgroup v1 `cpuacct.usage`, v2 `cpu.stat`
  `usage_usec`): everything that ran in it, whatever started it;
- per service: the CPU time (utime + stime, and that of its reaped children) of every process in
  the unit's cgroup, from /proc. A process that exits between two readings loses its share
  there, so a container's `other` (total - its services) also holds short-lived commands.

`Meter.snapshot()` before and after a run; `Meter.delta(a, b)` gives CPU-seconds per container
and per service.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
TICKS = os.sysconf("SC_CLK_TCK")


def _container_ids(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["docker", "inspect", "-f", "{{.Name}} {{.Id}}", *names],
                         capture_output=True, text=True, check=True).stdout
    return {name.lstrip("/"): cid for name, cid in (line.split() for line in out.splitlines())}


def _first(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def _container_dirs(cid: str) -> tuple[Path, Path]:
    """(CPU accounting dir, systemd dir whose system.slice holds the container's units)."""
    v1 = _first([CGROUP / "cpuacct" / "docker" / cid, CGROUP / "cpu,cpuacct" / "docker" / cid,
                 CGROUP / "cpuacct" / "system.slice" / f"docker-{cid}.scope"])
    if v1 is not None:
        units = _first([CGROUP / "systemd" / "docker" / cid,
                        CGROUP / "systemd" / "system.slice" / f"docker-{cid}.scope"])
        return v1, units or v1
    v2 = _first([CGROUP / "docker" / cid, CGROUP / "system.slice" / f"docker-{cid}.scope"])
    if v2 is None:
        raise RuntimeError(f"no cgroup found for container {cid[:12]}")
    return v2, v2


def _usage_s(directory: Path) -> float:
    if (directory / "cpuacct.usage").exists():
        return int((directory / "cpuacct.usage").read_text()) / 1e9
    for line in (directory / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value) / 1e6
    raise RuntimeError(f"no CPU counter in {directory}")


def _processes_s(unit_dir: Path) -> float:
    total = 0
    for procs in unit_dir.rglob("cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue  # exited meanwhile
            fields = stat.rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


@dataclass
class Meter:
    containers: list[str]
    _dirs: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = _container_ids(self.containers)
        self._dirs = {name: _container_dirs(ids[name]) for name in self.containers}

    def snapshot(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, (usage, units) in self._dirs.items():
            entry = {"total": _usage_s(usage)}
            for unit in sorted((units / "system.slice").rglob("*.service")):
                entry[unit.name.removesuffix(".service")] = _processes_s(unit)
            out[name] = entry
        return out

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
        """CPU-seconds per container between two snapshots: its total, each service that used
        more than 0.01 s, and `other` (the total less those services)."""
        out = {}
        for name, now in after.items():
            then = before.get(name, {})
            entry = {"total": now["total"] - then.get("total", 0.0)}
            services = {unit: now[unit] - then.get(unit, 0.0) for unit in now if unit != "total"}
            entry.update({unit: s for unit, s in services.items() if s > 0.01})
            entry["other"] = entry["total"] - sum(s for s in services.values() if s > 0)
            out[name] = entry
        return out
