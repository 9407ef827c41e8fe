"""Sandbox isolation: how ember starts a SandboxProcess isolated. Each sandbox runs as its own unprivileged
uid, in its own mount, pid, ipc, uts, user and network namespaces, inside its own cgroup; the jail that
makes it so is ember.sandbox.jail (bubblewrap, or unshare(1) and a helper), pre-started python runtimes
are ember.sandbox.pool (forked by ember.sandbox.zygote), the process tools ember.sandbox.spawn. Imports run
one way: isolation -> pool -> zygote -> jail, spawn -> cgroups.

Network (docs/decisions/0006): every sandbox has a network namespace of its own with only a
loopback. ember creates the sandbox's Runtime API listener *inside* that namespace (setns on the
event loop thread, for the few microseconds a socket() and bind() take), at 127.0.0.1:9001 as in
Lambda. So a sandbox reaches its own Runtime API and none of the host's: not ember's API port, not another
sandbox's Runtime API, not the host's services. Outbound network (`--network egress`, the default;
docs/decisions/0008) is added per sandbox by ember.sandbox.egress: slirp4netns, a resolver, and prohibit
routes for every address of the host and 169.254.0.0/16.

Modes, chosen at startup (`--isolation auto|bwrap|unshare|none`): `bwrap` when /usr/bin/bwrap works,
else `unshare` when util-linux's unshare(1) and setpriv(1) work (both need root): the same namespaces,
uid, view, seccomp filter and cgroups, built by a small python helper (ember.sandbox.unshare_helper)
instead of bwrap, and no pool of pre-started runtimes; else `none`: a plain process with rlimits, a
cgroup when there is one, and a loud warning at startup and in /health.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ember.sandbox import runtimes
from ember.sandbox.cgroups import Cgroups
from ember.sandbox.jail import TASK_ROOT, IsolationConfig, Jailer, UidRange
from ember.sandbox.pool import Pool
from ember.sandbox.spawn import RUNTIME_API_PORT, listen_in_netns, until_loopback_up

if TYPE_CHECKING:
    from ember.sandbox.process import SandboxProcess

__all__ = ["Isolation", "IsolationConfig"]

log = logging.getLogger("ember.sandbox.isolation")


class Isolation:
    """Starts sandboxes isolated, per the mode chosen at startup; owns the jailer (uids, cgroups, the
    sandboxes' view) and the pool of pre-started runtimes."""

    def __init__(self, cfg: IsolationConfig, data_dir: Path) -> None:
        self.cfg = cfg
        self.data_dir = data_dir.resolve()
        self.jailer = Jailer(cfg)
        self.pool: Pool | None = None
        self.warning = ""

    @property
    def mode(self) -> str:
        return self.jailer.mode

    @property
    def cgroups(self) -> Cgroups | None:
        return self.jailer.cgroups

    @property
    def uids(self) -> UidRange | None:
        return self.jailer.uids

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.jailer.start()
        if self.mode == "none" or self.cgroups is None:
            self.warning = (
                "WARNING: sandboxes are NOT isolated from each other or from ember"
                if self.mode == "none"
                else "WARNING: no usable cgroups: memory and pids limits are not enforced"
            )
        elif self.mode == "unshare":
            self.warning = (
                "NOTE: no bubblewrap: sandboxes are isolated by unshare(1)+setpriv (same namespaces, uid, view, "
                "seccomp filter and cgroups) but without pre-started runtimes: every cold start starts an interpreter"
            )
        name = self.mode + (f"+{self.cgroups.name}" if self.cgroups is not None else "")
        for text in (self.warning, self.jailer.network_warning):
            if text:  # once, on stderr (ember's log); /health repeats it
                log.warning(text, extra={"isolation": name, "network": self.network})
        if self.mode == "bwrap" and self.cfg.pool > 0:
            self.pool = Pool(self.jailer, self.data_dir, self.cfg.pool)
            await self.pool.start()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        self.jailer.close()

    @property
    def network(self) -> str:
        """What isolated sandboxes get: `egress` (ember.sandbox.egress) or `none` (a loopback only)."""
        if self.mode == "none":
            return "host"  # a plain process: the host's network, unfiltered
        return self.jailer.egress.mode + ("+deny-private" if self.cfg.deny_private else "")

    def describe(self) -> str:
        """For /health: e.g. `bwrap+cgroup-v1`, or `none (WARNING ...)`."""
        name = self.mode + (f"+{self.cgroups.name}" if self.cgroups is not None else "")
        return f"{name} ({self.warning})" if self.warning else name

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.describe(), "ephemeral_mb": self.cfg.ephemeral_mb, "network": self.network}
        if self.jailer.network_warning:
            out["network_warning"] = self.jailer.network_warning
        if self.pool is not None:
            out["pool"] = self.pool.stats()
        return out

    # ------------------------------------------------------------------ SandboxProcess

    async def launch(self, proc: SandboxProcess) -> None:
        """SandboxProcess.launch when isolation is on: a pooled runtime when one fits, else a new
        sandbox. Failures to start are init failures, as for an unisolated sandbox."""
        spec = proc.spec
        server = proc._web = web.Server(proc._handle, access_log=None)
        argv, env = _inside(spec.argv, spec.env, spec.cwd)
        env["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{RUNTIME_API_PORT}"
        proc.spawned_at = time.perf_counter()
        try:
            if self.mode == "none":
                await self._launch_plain(proc, server)
                return
            _open_to_sandboxes(spec.cwd)
            handler = _python_handler(spec.argv)
            network = self.jailer.egress.wanted(env)
            poolable = handler is not None and not any(k.startswith("PYTHON") and k != "PYTHONPATH" for k in env)
            poolable = poolable and self.pool is not None and self.pool.network == network
            pooled = self.pool.take() if self.pool is not None and poolable else None
            if pooled is None and self.pool is not None and poolable:
                pooled = await self.pool.fork_now()
            if pooled is not None:
                assert handler is not None
                await pooled.specialise(proc, server, spec.cwd, handler, env)
                self._running(proc)
                return
            _check_entrypoint(spec.argv[0], spec.cwd)
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            proc._out_fd = read_fd
            try:
                process, jail, release = await self.jailer.spawn(
                    argv, env, spec.cwd, spec.memory_mb, write_fd, network=network
                )
            finally:
                os.close(write_fd)
            proc.jail = jail
            proc._proc = process
            proc.pid = process.pid
            try:
                await until_loopback_up(jail.child_pid)
                sock = listen_in_netns(jail.child_pid)
                proc._server = await proc.loop.create_server(server, sock=sock)
                proc.port = RUNTIME_API_PORT
                try:
                    await jail.network_ready()
                except OSError:
                    jail.kill()  # bwrap would go on at its block fd's EOF: the sandbox must not run
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    raise
                os.write(release, b"go")
            finally:
                os.close(release)
            self._running(proc)
        except OSError as exc:
            await proc.spawn_failed(exc)

    async def _launch_plain(self, proc: SandboxProcess, server: web.Server) -> None:
        spec = proc.spec
        proc._server = listener = await proc.loop.create_server(server, "127.0.0.1", 0)
        proc.port = listener.sockets[0].getsockname()[1]
        env = dict(spec.env)
        env["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{proc.port}"
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        proc._out_fd = read_fd
        try:
            process, jail = await self.jailer.spawn_plain(spec.argv, env, spec.cwd, spec.memory_mb, write_fd)
        finally:
            os.close(write_fd)
        proc.jail, proc._proc, proc.pid = jail, process, process.pid
        self._running(proc)

    def _running(self, proc: SandboxProcess) -> None:
        """The sandbox's process runs: read its output, and watch it until it exits."""
        proc.loop.add_reader(proc._out_fd, proc._on_output)
        proc.watch()  # the process owns its watcher


def _inside(argv: list[str], env: dict[str, str], code_dir: str) -> tuple[list[str], dict[str, str]]:
    """The launch spec as seen from inside the sandbox: the code dir is /var/task, node's runtime client
    /var/runtime."""
    moves = ((code_dir, TASK_ROOT), (runtimes.NODE_CLIENT_DIR, runtimes.IN_SANDBOX))

    def fix(value: str) -> str:
        for host, inside in moves:
            if value == host:
                return inside
            if value.startswith(host.rstrip("/") + "/"):
                return inside + value[len(host.rstrip("/")) :]
        return value

    # ember's lists of paths name the code dir in the middle too; every other value is left as it is
    # (a function's own LD_PRELOAD must reach its runtime exactly as configured)
    return [fix(a) for a in argv], {
        k: ":".join(map(fix, v.split(":"))) if k in _PATH_LISTS else fix(v) for k, v in env.items()
    }


_PATH_LISTS = frozenset({"LD_LIBRARY_PATH", "NODE_PATH"})


def _open_to_sandboxes(code_dir: str) -> None:
    """The code dir is extracted into a private temporary dir (mode 0700); sandbox uids must be able
    to enter it. Its parents need not be: it is bind-mounted by fd."""
    st = os.stat(code_dir)
    if st.st_mode & 0o005 != 0o005:
        os.chmod(code_dir, 0o755)


def _python_handler(argv: list[str]) -> str | None:
    """The handler when `argv` is ember's python runtime (`python -m awslambdaric HANDLER`)."""
    if len(argv) == 4 and argv[0] == sys.executable and argv[1:3] == ["-m", "awslambdaric"]:
        return argv[3]
    return None


def _check_entrypoint(program: str, code_dir: str) -> None:
    """bwrap would report a missing `bootstrap` only on the sandbox's output; say it the way an
    unisolated exec does (Runtime.InvalidEntrypoint)."""
    if not program.startswith(code_dir.rstrip("/") + "/"):
        return
    try:
        st = os.stat(program)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror) from None
    if not st.st_mode & 0o111:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
