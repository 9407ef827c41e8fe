"""Pre-started python runtimes, so a cold start costs a specialisation, not a sandbox + interpreter start.

A pooled runtime is a complete sandbox (ember.isolation: fresh uid, cgroup, namespaces, an empty
/var/task) whose interpreter has already imported awslambdaric and now blocks reading one line on
its stdin. Specialising it to a function, on a cold start:
  1. the function's code is hard-linked into the sandbox's task dir (the host directory that is its
     read-only /var/task: the same inodes as DATA_DIR/code/<sha256>, owned by root, not writable);
  2. the cgroup gets the function's MemorySize;
  3. ember opens the Runtime API listener inside the sandbox's network namespace;
  4. ember writes the function's environment and handler; the runtime sets them, imports the handler
     and calls awslambdaric's bootstrap, which asks /next: the sandbox is ready.
A pooled runtime serves exactly one function for its whole life and is never returned to the pool,
so nothing carries from one function to another. Python runtimes only (every python3.x runtime runs
on ember's interpreter); a `provided` bootstrap is an arbitrary executable and cannot be pre-started.
A function whose environment sets PYTHON* variables (read by the interpreter at start) starts fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ember.isolation import RUNTIME_API_PORT, Isolation, Jail, listen_in_netns

if TYPE_CHECKING:
    from ember.sandbox import SandboxProcess

log = logging.getLogger("ember.pool")

POOL_MEMORY_MB = 128  # the cgroup limit while pooled (Lambda's smallest MemorySize); set per function later
REFILL_DELAY_S = 0.1  # spawning forks ember, on the event loop: not while a cold start is under way

# Runs inside the sandbox as `python -c ZYGOTE READY_FD`. Kept as a string so no ember file needs to
# be visible in the sandbox.
ZYGOTE = r"""
import os, sys, json
import awslambdaric.__main__ as _main, awslambdaric.bootstrap as _bootstrap
import concurrent.futures.thread, awslambdaric.lambda_literals  # imported lazily on the way to /next
_ready = int(sys.argv[1])
try:
    os.write(_ready, b"R")  # EPIPE when ember took this runtime before it was ready: fine
except OSError:
    pass
os.close(_ready)
_line = sys.stdin.buffer.readline()
if not _line:
    os._exit(0)
_spec = json.loads(_line)
_null = os.open("/dev/null", os.O_RDONLY); os.dup2(_null, 0); os.close(_null)
os.environ.clear(); os.environ.update(_spec["env"])
_bootstrap._AWS_LAMBDA_LOG_FORMAT = _bootstrap.LogFormat.from_str(os.environ.get("AWS_LAMBDA_LOG_FORMAT"))
_bootstrap._AWS_LAMBDA_LOG_LEVEL = _bootstrap._get_log_level_from_env_var(os.environ.get("AWS_LAMBDA_LOG_LEVEL"))
os.chdir("/var/task")
sys.path[0] = "/var/task"
sys.argv = ["awslambdaric", _spec["handler"]]
_main.main(sys.argv)
"""

GENERIC_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "en_US.UTF-8", "TZ": ":UTC"}


class Pooled:
    """One pre-started runtime, waiting to be specialised."""

    def __init__(
        self, process: asyncio.subprocess.Process, jail: Jail, out_fd: int, ctl_fd: int, ready_fd: int
    ) -> None:
        self.process = process
        self.jail = jail
        self.out_fd = out_fd  # its stdout/stderr; adopted by the SandboxProcess
        self.ctl_fd = ctl_fd  # its stdin: one line of JSON specialises it
        self.ready_fd = ready_fd
        self.ready = False
        self.taken = False

    async def specialise(self, proc: SandboxProcess, code_dir: str, handler: str, env: dict[str, str]) -> None:
        """Turn this runtime into `proc`'s sandbox (see the module docstring)."""
        jail = self.jail
        assert jail.task_dir is not None
        proc.jail, proc._proc, proc.pid, proc._out_fd = jail, self.process, self.process.pid, self.out_fd
        self.out_fd = -1
        try:
            _link_tree(Path(code_dir), jail.task_dir)
            if jail.cgroup is not None and proc.spec.memory_mb != POOL_MEMORY_MB:
                # a cgroup write can wait on the kernel's cgroup locks: not on the event loop
                await asyncio.to_thread(jail.cgroup.limit, proc.spec.memory_mb, jail.iso.cfg.pids_max)
            sock = listen_in_netns(jail.child_pid)
            proc._server = await proc.loop.create_server(proc._web, sock=sock)
            proc.port = RUNTIME_API_PORT
            os.write(self.ctl_fd, orjson.dumps({"env": env, "handler": handler}) + b"\n")
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
            raise
        finally:
            os.close(self.ctl_fd)
            self.ctl_fd = -1
        proc.loop.add_reader(proc._out_fd, proc._on_output)
        proc.loop.create_task(proc._watch())

    def close_fds(self) -> None:
        for fd in (self.out_fd, self.ctl_fd, self.ready_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.out_fd = self.ctl_fd = self.ready_fd = -1


class Pool:
    """At most `size` pre-started python runtimes, refilled in the background shortly after one is
    taken (spawning forks ember on the event loop: not during the cold start that took it)."""

    def __init__(self, iso: Isolation, size: int) -> None:
        self.iso = iso
        self.size = size
        self.loop = asyncio.get_running_loop()
        self.dir = iso.data_dir / "sandboxes"
        self.idle: list[Pooled] = []
        self.spawning = 0
        self.taken = 0
        self.missed = 0
        self._fill_task: asyncio.Task[None] | None = None
        self._seq = 0
        self._closed = False
        self.failures = 0  # pre-started runtimes in a row that died before they were ready (backoff)

    def start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # task dirs of a previous run
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.refill()

    def take(self) -> Pooled | None:
        """A ready runtime if there is one (else one still importing, else None); never given back."""
        best = None
        for p in self.idle:
            if p.process.returncode is None and (best is None or (p.ready and not best.ready)):
                best = p
        if best is None:
            self.missed += 1
            self.refill()
            return None
        self.idle.remove(best)
        best.taken = True
        self.taken += 1
        if best.ready_fd >= 0:
            self.loop.remove_reader(best.ready_fd)
            os.close(best.ready_fd)
            best.ready_fd = -1
        self.loop.call_later(REFILL_DELAY_S, self.refill)
        return best

    def refill(self) -> None:
        if not self._closed and (self._fill_task is None or self._fill_task.done()):
            self._fill_task = self.loop.create_task(self._fill())

    async def _fill(self) -> None:
        while not self._closed and len(self.idle) + self.spawning < self.size:
            self.spawning += 1
            try:
                pooled = await self._spawn()
            except Exception:
                log.exception("could not pre-start a runtime")
                await asyncio.sleep(1.0)
                continue
            finally:
                self.spawning -= 1
            if self._closed:
                await _discard(pooled)
                return
            self.idle.append(pooled)
            self.loop.create_task(self._until_ready(pooled))  # imports overlap: a drained pool refills fast

    async def _spawn(self) -> Pooled:
        self._seq += 1
        task_dir = self.dir / str(self._seq)
        task_dir.mkdir(mode=0o755)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(out_r, False)
        os.set_blocking(ready_r, False)
        try:
            process, jail, _ = await self.iso.spawn(
                [sys.executable, "-c", ZYGOTE, str(ready_w)],
                dict(GENERIC_ENV),
                str(task_dir),
                POOL_MEMORY_MB,
                out_w,
                stdin=ctl_r,
                extra_fds=(ready_w,),
                block=False,
            )
        except BaseException:
            for fd in (out_r, ctl_w, ready_r):
                os.close(fd)
            shutil.rmtree(task_dir, ignore_errors=True)
            raise
        finally:
            for fd in (out_w, ctl_r, ready_w):
                os.close(fd)
        jail.task_dir = task_dir
        pooled = Pooled(process, jail, out_r, ctl_w, ready_r)
        self.loop.create_task(self._watch(pooled))
        return pooled

    async def _until_ready(self, pooled: Pooled) -> None:
        """Note the runtime's "imported" byte: `take` prefers runtimes that are ready."""
        done: asyncio.Future[None] = self.loop.create_future()

        def on_ready() -> None:
            try:
                data = os.read(pooled.ready_fd, 16)
            except BlockingIOError:
                return
            pooled.ready = bool(data)
            if pooled.ready:
                self.failures = 0
            self.loop.remove_reader(pooled.ready_fd)
            os.close(pooled.ready_fd)
            pooled.ready_fd = -1
            if not done.done():
                done.set_result(None)

        if pooled.ready_fd < 0:
            return
        self.loop.add_reader(pooled.ready_fd, on_ready)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), 15.0)

    async def _watch(self, pooled: Pooled) -> None:
        """A pooled runtime that dies before it is taken is cleaned up and replaced."""
        await pooled.process.wait()
        if pooled.taken:
            return
        if pooled in self.idle:
            self.idle.remove(pooled)
        if pooled.ready_fd >= 0:
            self.loop.remove_reader(pooled.ready_fd)
        pooled.close_fds()
        await pooled.jail.release()
        if not self._closed:
            # A runtime that cannot start must not become a crash loop (tenet 3): back off, doubling
            # from 0.1 s to a minute, until one comes up ready again.
            self.failures += 1
            delay = min(60.0, 0.1 * 2 ** min(self.failures, 10))
            log.warning(
                "a pre-started runtime exited",
                extra={"returncode": pooled.process.returncode, "failures": self.failures, "retry_in_s": delay},
            )
            self.loop.call_later(delay, self.refill)

    async def close(self) -> None:
        self._closed = True
        if self._fill_task is not None:
            self._fill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fill_task
        idle, self.idle = self.idle, []
        for pooled in idle:
            if pooled.ready_fd >= 0:
                self.loop.remove_reader(pooled.ready_fd)
            await _discard(pooled)
        shutil.rmtree(self.dir, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "idle": len(self.idle),
            "ready": sum(p.ready for p in self.idle),
            "taken": self.taken,
            "missed": self.missed,
        }


async def _discard(pooled: Pooled) -> None:
    pooled.jail.kill()
    with contextlib.suppress(ProcessLookupError):
        pooled.process.kill()
    await pooled.process.wait()
    pooled.close_fds()
    await pooled.jail.release()


def _link_tree(src: Path, dest: Path) -> None:
    """Hard-link a code tree into an (empty) task dir; copies when the two are on different filesystems."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM):
                raise
            shutil.copy2(s, d)

    shutil.copytree(src, dest, symlinks=True, copy_function=link, dirs_exist_ok=True)
