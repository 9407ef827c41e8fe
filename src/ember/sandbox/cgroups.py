"""Per-sandbox control groups: a hard memory limit, a pids limit and a CPU share, on cgroup v2 where
the host has it and on v1 where it has only that (hybrid hosts mount v1 controllers plus an empty
v2 hierarchy; the choice is made at runtime, from what is mounted and which controllers it offers).

Layout: ember nests its cgroups under the one it was started in (respecting whoever delegated it):
`<own cgroup>/ember-<pid>/sb-<n>` in each controller (v1: memory, pids, cpu), or in the unified
hierarchy (v2). Only the sandboxes' leaves hold processes. A cgroup left by an ember that died
(its pid gone) is swept at startup.

Why cgroups and not rlimits alone: RLIMIT_AS counts address space, not memory; RLIMIT_NPROC counts a
uid's processes in every namespace. A cgroup's counts are exact, and it is how every process of a
sandbox, however it forked or re-parented, is found and killed when the sandbox ends.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("ember.sandbox.cgroups")

V1_CONTROLLERS = ("memory", "pids", "cpu")
V2_CONTROLLERS = ("memory", "pids", "cpu")
MB = 1024 * 1024
VCPU_MB = 1769  # Lambda: a function with 1,769 MB has the equivalent of one vCPU


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Cgroup:
    """One sandbox's cgroup: the same leaf in every hierarchy that matters (one dir on v2)."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs  # v1: controller -> dir; v2: {"unified": dir}
        self._removed = False

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs.values()]

    def open_procs(self) -> list[int]:
        """Write-only fds of every cgroup.procs, so a forked child can join with a bare write("0")."""
        return [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in self.procs_files]

    def limit(self, memory_mb: int, pids_max: int) -> None:
        """MemorySize as a hard limit (no swap beyond it), pids, and a CPU share that grows with memory
        as Lambda's does (a share, not a cap: idle CPU is not wasted on a small function)."""
        mem = str(memory_mb * MB)
        if self.version == 2:
            d = self.dirs["unified"]
            _write(d / "memory.max", mem)
            with contextlib.suppress(OSError):
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(pids_max))
            with contextlib.suppress(OSError):
                _write(d / "cpu.weight", str(max(1, min(10000, memory_mb * 100 // VCPU_MB))))
            return
        m = self.dirs["memory"]
        memsw = m / "memory.memsw.limit_in_bytes"
        # memsw must stay >= the limit: raising sets memsw first, lowering sets the limit first
        order = [memsw, m / "memory.limit_in_bytes"]
        try:
            for f in order:
                if f.exists():
                    _write(f, mem)
        except OSError:
            for f in reversed(order):
                if f.exists():
                    _write(f, mem)
        if "pids" in self.dirs:
            _write(self.dirs["pids"] / "pids.max", str(pids_max))
        if "cpu" in self.dirs:
            with contextlib.suppress(OSError):
                _write(self.dirs["cpu"] / "cpu.shares", str(max(2, memory_mb * 1024 // VCPU_MB)))

    def pids(self) -> list[int]:
        d = self.dirs.get("unified") or self.dirs.get("pids") or next(iter(self.dirs.values()))
        out = []
        for tok in _read(d / "cgroup.procs").split():
            with contextlib.suppress(ValueError):
                out.append(int(tok))
        return out

    def kill(self) -> None:
        """SIGKILL every process in it (v2: cgroup.kill, atomic even against a fork bomb)."""
        if self.version == 2:
            kill_file = self.dirs["unified"] / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
                    return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer acted inside this cgroup (memory limit reached)."""
        if self.version == 2:
            text = _read(self.dirs["unified"] / "memory.events")
        else:
            text = _read(self.dirs["memory"] / "memory.oom_control")
            if "oom_kill " not in text:  # kernels before 4.13: failcnt is the best sign
                return _read(self.dirs["memory"] / "memory.failcnt").strip() not in ("", "0")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return value.strip() not in ("", "0")
        return False

    def peak_mb(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        d = self.dirs.get("unified") or self.dirs["memory"]
        raw = _read(d / name).strip()
        if not raw:  # v2 before 5.19 has no memory.peak
            raw = _read(d / "memory.current").strip()
        try:
            return max(1, int(raw) // MB)
        except ValueError:
            return 0

    def remove(self, timeout_s: float = 5.0) -> bool:
        """Kill what is left and remove the cgroup; False when it could not be removed in time."""
        if self._removed:
            return True
        deadline = time.monotonic() + timeout_s
        while True:
            self.kill()
            busy = False
            for d in self.dirs.values():
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    busy = True
            if not busy:
                self._removed = True
                return True
            if time.monotonic() >= deadline:
                if timeout_s > 0:
                    log.error("cgroup still busy", extra={"cgroup": str(next(iter(self.dirs.values())))})
                return False
            time.sleep(0.005)


class Cgroups:
    """The host's cgroup hierarchy, as ember uses it: v2 where usable, else v1."""

    def __init__(self, version: int, parents: dict[str, Path]) -> None:
        self.version = version
        self.parents = parents  # where ember's own `ember-<pid>` dirs go, per controller/hierarchy
        self.mine: dict[str, Path] = {k: p / f"ember-{os.getpid()}" for k, p in parents.items()}
        self._seq = 0

    @property
    def name(self) -> str:
        return f"cgroup-v{self.version}"

    @classmethod
    def detect(cls, mounts: str = "/proc/self/mounts", own: str = "/proc/self/cgroup") -> Cgroups | None:
        """v2 when a cgroup2 mount offers memory and pids; else v1 when memory and pids are mounted."""
        v1: dict[str, Path] = {}
        v2: Path | None = None
        for line in _read(Path(mounts)).splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            where, fstype, opts = Path(parts[1]), parts[2], parts[3].split(",")
            if fstype == "cgroup2":
                ctrls = _read(where / "cgroup.controllers").split()
                if {"memory", "pids"} <= set(ctrls):
                    v2 = where
            elif fstype == "cgroup":
                for c in V1_CONTROLLERS:
                    if c in opts:
                        v1.setdefault(c, where)
        paths: dict[str, str] = {}
        for line in _read(Path(own)).splitlines():
            num, _, rest = line.partition(":")
            names, _, path = rest.partition(":")
            if num == "0" and not names:
                paths["unified"] = path
            for c in names.split(","):
                if c:
                    paths[c] = path
        if v2 is not None:
            return cls(2, {"unified": v2 / paths.get("unified", "/").lstrip("/")})
        if "memory" in v1 and "pids" in v1:
            return cls(1, {c: m / paths.get(c, "/").lstrip("/") for c, m in v1.items()})
        return None

    def setup(self) -> None:
        """Make ember's own parent cgroups (sweeping ones left by dead embers)."""
        for key, parent in self.parents.items():
            for stale in parent.glob("ember-*"):
                pid = stale.name.removeprefix("ember-")
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    for leaf in stale.glob("sb-*"):
                        Cgroup(self.version, {key: leaf}).remove(1.0)
                    with contextlib.suppress(OSError):
                        os.rmdir(stale)
            self.mine[key].mkdir(exist_ok=True)
        if self.version == 2:
            self._enable_v2()
        self._weigh_parent()

    def _weigh_parent(self) -> None:
        """All sandboxes together weigh as much as one process per CPU, not as one process: under
        contention, runtimes are not starved by ember's own loop (a relay's runtimes, each its own
        process, would get that much), while among themselves they share by memory (Lambda's rule)."""
        cpus = os.cpu_count() or 1
        with contextlib.suppress(OSError, KeyError):
            if self.version == 1:
                _write(self.mine["cpu"] / "cpu.shares", str(1024 * cpus))
            else:
                _write(self.mine["unified"] / "cpu.weight", str(min(10000, 100 * cpus)))

    def _enable_v2(self) -> None:
        """Controllers must be enabled top-down; a cgroup holding processes cannot delegate (the
        no-internal-process rule), so when ember sits in a non-root cgroup it moves itself into a leaf."""
        parent = self.parents["unified"]
        want = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in _read(parent / "cgroup.controllers").split())
        try:
            _write(parent / "cgroup.subtree_control", want)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            leaf = parent / f"ember-{os.getpid()}.self"
            leaf.mkdir(exist_ok=True)
            for pid in _read(parent / "cgroup.procs").split():
                with contextlib.suppress(OSError):
                    _write(leaf / "cgroup.procs", pid)
            _write(parent / "cgroup.subtree_control", want)
        _write(self.mine["unified"] / "cgroup.subtree_control", want)

    def create(self) -> Cgroup:
        self._seq += 1
        dirs = {k: p / f"sb-{self._seq}" for k, p in self.mine.items()}
        for d in dirs.values():
            d.mkdir()
        return Cgroup(self.version, dirs)

    def close(self) -> None:
        for key, d in self.mine.items():
            for leaf in d.glob("sb-*"):
                Cgroup(self.version, {key: leaf}).remove(1.0)
            with contextlib.suppress(OSError):
                os.rmdir(d)
