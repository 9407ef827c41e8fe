"""A fork server ("zygote") for pooled python runtimes: an interpreter that has imported awslambdaric
once, and forks a copy of itself into each new sandbox. A pooled runtime then costs a bwrap (a few
ms) and a fork (~1 ms), not a fresh interpreter plus ~30 ms of imports.

Isolation stays bubblewrap's. ember first starts the sandbox exactly as for any runtime (ember.sandbox.isolation:
own uid, cgroup, mount/pid/net/ipc/uts/cgroup namespaces, seccomp), but its payload is a small shell
that waits for the runtime's exit status. ember then hands the zygote a pidfd of that sandbox's pid 1
(checked to be in the sandbox's own cgroup, and alive) with the runtime's pipes. The zygote forks:
  - the "keeper" (root, host namespaces) joins the sandbox's cgroup, sets its pid namespace for
    children (setns), forks the runtime, waits for it and writes its exit status to the shell, which
    exits with it (so bwrap reports it as before; the pid namespace then dies with everything in it);
  - the runtime joins every other namespace of the sandbox by the pidfd (atomically: no pid reuse
    race), takes the sandbox's root (chroot to its pid 1's root), drops every capability and the
    bounding set, becomes the sandbox's uid (no groups), sets no_new_privs and the same seccomp
    filter bwrap applies, the same rlimits, and dies with its keeper. It is then what a runtime
    started by bwrap would be, with awslambdaric already imported.
The zygote itself never runs function code and never receives function data: a forked runtime
carries the zygote's imports and nothing from any other function. What forked runtimes do share is
process-wide randomness fixed at the zygote's start: the address-space layout and the str hash
secret (`random` is reseeded at fork). So a zygote is retired after `RETIRE_AFTER` forks (the next
one is started in the background), which bounds how many sandboxes share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import subprocess
import sys
from importlib import resources
from typing import Any

import orjson

from ember.sandbox.spawn import SpawnedProcess, spawn_off_loop

log = logging.getLogger("ember.sandbox.zygote")

# forks per zygote: how many sandboxes share one address-space layout and hash secret
RETIRE_AFTER = max(1, int(os.environ.get("EMBER_ZYGOTE_RETIRE_AFTER", "16")))
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0  # for SIGTERM to stop a zygote (and its runtimes), then for SIGKILL
# The sandbox's payload: waits for the runtime's exit status from its keeper and exits with it, so
# bwrap (ember's child) exits when the runtime does, with its status (128+N for signal N).
# Its stdin is a socket to the keeper: it first writes a byte on it (the sandbox is set up: bwrap
# reports pid 1 before it has mounted anything), then reads the status back.
WAITER = ["/bin/sh", "-c", 'printf R >&0; read -r c || exit 125; exit "$c"']

# The fork server (ember.sandbox.zygote_server), run as text, not imported: `python -c SERVER SOCK_FD
# SECCOMP_HEX` in ember's namespaces, as root, cwd "/", with only GENERIC_ENV: no ember module is imported
# (nothing of ember's is in a runtime's memory).
SERVER = resources.files("ember.sandbox").joinpath("zygote_server.py").read_text(encoding="utf-8")
HELLO_MAX_BYTES = 16  # the zygote's first message: b"R" once it has imported the runtime


def server_argv(sock_fd: int, seccomp: bytes) -> list[str]:
    """The zygote's command line."""
    return [sys.executable, "-c", SERVER, str(sock_fd), seccomp.hex()]


def fork_request(pid: int, uid: int, nofile: int, nproc: int) -> bytes:
    """One fork request (zygote_server.parse_request reads it; its fds travel with it)."""
    return orjson.dumps({"pid": pid, "uid": uid, "nofile": nofile, "nproc": nproc})


class Zygote:
    """ember's end of one fork server."""

    def __init__(self, seccomp: bytes, env: dict[str, str], preexec: Any) -> None:
        self.seccomp = seccomp
        self.env = env
        self.preexec = preexec  # dies with ember
        self.process: SpawnedProcess | None = None
        self.sock: socket.socket | None = None
        self.forks = 0
        self.ready = False

    async def start(self) -> None:
        """Start it and wait (bounded) until it has imported the runtime."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = await spawn_off_loop(
                server_argv(theirs.fileno(), self.seccomp),
                cwd="/", env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), preexec_fn=self.preexec,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        ours.setblocking(False)
        try:
            first = await asyncio.wait_for(loop.sock_recv(ours, HELLO_MAX_BYTES), START_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            self.close()
            raise OSError(f"the zygote did not start: {exc!r}") from None
        if first != b"R":
            self.close()
            raise OSError("the zygote did not start (exited)")
        self.ready = True

    @property
    def alive(self) -> bool:
        return self.ready and self.sock is not None and self.process is not None and self.process.returncode is None

    def fork(self, pid: int, uid: int, nofile: int, nproc: int, fds: list[int]) -> None:
        """Ask for a runtime in the sandbox whose pid 1 is `pid` (`fds`: its pidfd, stdin, output and
        ready pipes, the socket to its payload (WAITER), then its cgroup.procs files). Never blocks: a
        full socket is an error."""
        if not self.alive:
            raise OSError("the zygote is not running")
        assert self.sock is not None
        socket.send_fds(self.sock, [fork_request(pid, uid, nofile, nproc)], fds)
        self.forks += 1

    def close(self) -> None:
        """Retire it: it exits once the runtimes it forked are gone (their keepers are its children)."""
        self.ready = False
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def kill(self) -> None:
        """Stop it and every runtime it forked: SIGTERM makes it kill its keepers (so their runtimes) and
        reap them all before it exits (a runtime left to another reaper keeps its sandbox's pid 1
        alive); SIGKILL only if it does not exit in time."""
        self.close()
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.error("the zygote did not stop: killing it", extra={"pid": self.process.pid})
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)


def sandbox_pidfd(pid: int, bwrap: Any) -> int:
    """A pidfd for the sandbox's pid 1, checked to be the right process: the child of `bwrap` (ember's
    child, not yet reaped, so its pid is not reused), still alive after the check."""
    fd = os.pidfd_open(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        if ppid != bwrap.pid or bwrap.returncode is not None:
            raise OSError(f"pid {pid} is not the sandbox's")
        if select.select([fd], [], [], 0)[0]:
            raise OSError(f"pid {pid} exited")
        return fd
    except BaseException:
        os.close(fd)
        raise
