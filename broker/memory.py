"""How much memory the process may use, for the default `--memory-budget` (issue 12): the
least of its cgroup's limit (v2 `memory.max`, or v1 `memory.limit_in_bytes`, of the group
/proc/self/cgroup names or any parent, up to the mount's root) and the memory the system has
available (`/proc/meminfo` MemAvailable, else physical pages from `sysconf`).
Pure functions over injectable paths, so tests can hand in their own files."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory", "cgroup_limit", "default_memory_budget", "meminfo_available"]

FALLBACK = 1 << 30  # bytes assumed when nothing can be read (a budget of 256 MiB)
# A v1 cgroup without a limit reports a huge number (about 2**63 rounded to a page).
_UNLIMITED = 1 << 60


def _read_limit(path: Path) -> int | None:
    """One cgroup limit file: its bytes, or None (no file, `max`, or v1's "no limit")."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        value = int(text)
    except ValueError:
        return None  # `max`
    return value if 0 < value < _UNLIMITED else None


def _own_groups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """The process's cgroup paths from /proc/self/cgroup: (v2, v1 memory controller)."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: Path, group: str | None) -> list[Path]:
    """`base/group` and each parent up to `base` (a limit on any of them applies)."""
    if group is None:
        return [base]
    parts = [part for part in group.split("/") if part]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def cgroup_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The tightest memory limit, in bytes, of the process's cgroup and its parents (v2
    `memory.max`, v1 `memory/memory.limit_in_bytes`); None: no limit, or nothing to read."""
    v2, v1 = _own_groups(proc_cgroup)
    files = [d / "memory.max" for d in _ancestors(root, v2)]
    files += [d / "memory.limit_in_bytes" for d in _ancestors(root / "memory", v1)]
    limits = [value for path in files if (value := _read_limit(path)) is not None]
    return min(limits) if limits else None


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None if it cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            fields = rest.split()
            if fields and fields[0].isdigit():
                unit = fields[1].lower() if len(fields) > 1 else ""
                return int(fields[0]) * (1024 if unit == "kb" else 1)
    return None


def _sysconf_memory() -> int | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def available_memory(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int:
    """The memory available to the process: the least of what is known, else `FALLBACK`."""
    system = meminfo_available(meminfo)
    if system is None:
        system = _sysconf_memory()
    limit = cgroup_limit(cgroup_root, proc_cgroup)
    known = [value for value in (limit, system) if value is not None]
    return min(known) if known else FALLBACK


def default_memory_budget(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int:
    """A quarter of `available_memory`: what queued messages may hold in memory in all."""
    return max(1, available_memory(cgroup_root, meminfo, proc_cgroup) // 4)
