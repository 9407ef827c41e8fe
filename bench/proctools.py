"""Child-process hygiene shared by the bench scripts.

A benchmark that leaves servers or runtimes behind poisons the next run on a 2-core machine, so
every child is started in its own session (Ctrl-C reaches only the orchestrator, which then stops
children in order) and with a parent-death signal (a SIGKILLed parent still takes its children).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """Return a preexec_fn that makes the child receive `sig` when its parent dies."""

    def _preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return _preexec


def become_subreaper() -> None:
    """Adopt orphaned descendants, so grandchildren that outlive a child can be found and killed."""
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def adopted_children() -> list[int]:
    """PIDs whose parent is this process (after become_subreaper: includes orphaned descendants)."""
    me = os.getpid()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the ppid; the command name (field 2) may hold spaces, so split after ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == me:
            found.append(int(entry.name))
    return found


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def reap_leftovers() -> list[int]:
    """SIGKILL and reap every remaining child; return the PIDs that were still alive. Zombies (dead
    processes orphaned to us as the subreaper, e.g. a sandbox whose bwrap parent exited first) are
    reaped but not counted: nothing of them is left running."""
    children = adopted_children()
    left = [pid for pid in children if not _is_zombie(pid)]
    for pid in children:
        if pid not in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in left:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return left


def free_port() -> int:
    """A port that was free a moment ago (the race with other binders is acceptable for a bench)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_line(proc: asyncio.subprocess.Process, log: Path, needle: str, timeout: float) -> str:
    """Wait until `needle` appears in the child's log file; fail fast if the child exits."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            if needle in line:
                return line
        if proc.returncode is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before ready:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {timeout:.0f} s (waiting for {needle!r}):\n{tail(log)}")
        await asyncio.sleep(0.02)


def tail(log: Path, lines: int = 30) -> str:
    """Last lines of a child's log, for error messages."""
    if not log.exists():
        return "(no output)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL the child's whole process group."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    # The child leads its own session: anything it started and left in its group goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()  # fields from 3 (state) on


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """User+system CPU seconds of `pid` (and, with tree, of its live descendants).

    CPU per request is far less sensitive to a noisy neighbour than requests per second: a
    server that is descheduled loses throughput but does not burn more CPU per invoke.
    """
    pids = [pid]
    if tree:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
        stack = [pid]
        while stack:
            for child in children.get(stack.pop(), []):
                pids.append(child)
                stack.append(child)
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = _stat_fields(p)
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15)
    return total / _CLK_TCK


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds summed over all CPUs since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    return (sum(f[:8]) - idle) / _CLK_TCK, idle / _CLK_TCK  # user..steal; guest is inside user


def reaped_children_cpu_seconds() -> float:
    """CPU seconds of this process's waited-for children (how wrk's own cost is measured)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
