"""Pre-started python runtimes, so a cold start costs a specialisation, not a sandbox + interpreter start.

A pooled runtime is a complete sandbox (ember.sandbox.isolation: fresh uid, cgroup, namespaces, an empty
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
import functools
import logging
import os
import shutil
import signal
import socket
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ember.sandbox.jail import Jail, Jailer
from ember.sandbox.spawn import (
    RUNTIME_API_PORT,
    SpawnedProcess,
    Tasks,
    die_with_ember,
    listen_in_netns,
    until_loopback_up,
)
from ember.sandbox.zygote import RETIRE_AFTER, WAITER, Zygote, sandbox_pidfd

if TYPE_CHECKING:
    from aiohttp import web

    from ember.sandbox.process import SandboxProcess

log = logging.getLogger("ember.sandbox.pool")

POOL_MEMORY_MB = 128  # the cgroup limit while pooled (Lambda's smallest MemorySize); set per function later
USE_ZYGOTE = os.environ.get("EMBER_ZYGOTE", "1") != "0"  # 0: every pooled runtime is a fresh interpreter
START_FILL_S = 10.0
BOOST_DECAY_S = 30.0
# a refill costs ember little (bwrap is vfork'ed off the event loop), but it runs while the cold start
# that took a runtime finishes: not at the same moment
REFILL_DELAY_S = float(os.environ.get("EMBER_REFILL_DELAY", "0.01"))
FILL_RETRY_S = 1.0  # after a round of pre-starts of which some failed
READY_TIMEOUT_S = 15.0  # for a pre-started runtime's "imported" byte
READY_READ_BYTES = 16
ZYGOTE_RETRY_S = 10.0  # at most one zygote start per this, after one failed
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 60.0  # pre-started runtimes that keep dying: doubling delays

# Runs inside the sandbox as `python -c ZYGOTE READY_FD` when the zygote is off: a real module
# (ember/sandbox/fresh_runtime.py), passed as text so no ember file needs to be visible in the sandbox.
ZYGOTE = resources.files("ember.sandbox").joinpath("fresh_runtime.py").read_text(encoding="utf-8")

GENERIC_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "en_US.UTF-8", "TZ": ":UTC"}


class Pooled:
    """One pre-started runtime, waiting to be specialised."""

    def __init__(self, process: SpawnedProcess, jail: Jail, out_fd: int, ctl_fd: int, ready_fd: int) -> None:
        self.process = process
        self.jail = jail
        self.out_fd = out_fd  # its stdout/stderr; adopted by the SandboxProcess
        self.ctl_fd = ctl_fd  # its stdin: one line of JSON specialises it
        self.ready_fd = ready_fd
        self.ready = False
        self.taken = False

    async def specialise(
        self, proc: SandboxProcess, server: web.Server, code_dir: str, handler: str, env: dict[str, str]
    ) -> None:
        """Turn this runtime into `proc`'s sandbox (see the module docstring), its Runtime API served by
        `server`; the caller then reads its output and watches it."""
        jail = self.jail
        assert jail.task_dir is not None
        proc.jail, proc._proc, proc.pid, proc._out_fd = jail, self.process, self.process.pid, self.out_fd
        self.out_fd = -1
        try:
            _link_tree(Path(code_dir), jail.task_dir)
            if jail.cgroup is not None and proc.spec.memory_mb != POOL_MEMORY_MB:
                # a cgroup write can wait on the kernel's cgroup locks: not on the event loop
                await asyncio.to_thread(jail.cgroup.limit, proc.spec.memory_mb, jail.jailer.cfg.pids_max)
            await until_loopback_up(jail.child_pid)  # one ioctl when it is (the usual case: pre-started)
            sock = listen_in_netns(jail.child_pid)
            proc._server = await proc.loop.create_server(server, sock=sock)
            proc.port = RUNTIME_API_PORT
            await jail.network_ready()  # set up while the runtime started; done by now, unless it was just forked
            os.write(self.ctl_fd, specialisation(env, handler))
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
            raise
        finally:
            os.close(self.ctl_fd)
            self.ctl_fd = -1

    def close_fds(self) -> None:
        for fd in (self.out_fd, self.ctl_fd, self.ready_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.out_fd = self.ctl_fd = self.ready_fd = -1


class Pool:
    """At most `size` pre-started python runtimes, refilled in the background shortly after one is
    taken (spawning forks ember on the event loop: not during the cold start that took it)."""

    def __init__(self, jailer: Jailer, data_dir: Path, size: int) -> None:
        self.jailer = jailer
        self.size = size
        self.network = jailer.egress.mode == "egress"  # every pooled sandbox has egress, or none has
        self.boost = 0  # extra runtimes kept while cold starts come faster than refills (pool misses)
        self.max_boost = max(2, size)
        self._last_miss = -1e9
        self.loop = asyncio.get_running_loop()
        self.dir = data_dir / "sandboxes"
        self.idle: list[Pooled] = []
        self.spawning = 0
        self.taken = 0
        self.missed = 0
        self._tasks = Tasks("pool")  # fill, zygote replacement, readiness and exit watchers: cancelled on close
        self._cleanups = Tasks("pool cleanup")  # discarded runtimes: finished on close
        self._fill_task: asyncio.Task[None] | None = None
        self._seq = 0
        self._closed = False
        self.failures = 0  # pre-started runtimes in a row that died before they were ready (backoff)
        self.zygote: Zygote | None = None  # forks runtimes into new sandboxes (ember.sandbox.zygote); None: fresh ones
        self._next_zygote: asyncio.Task[None] | None = None
        # still the parents of runtimes they forked; stopped on close. Bounded by the live sandboxes: pruned
        # of exited zygotes on each retirement, and a zygote exits once its last runtime is gone
        self._retired: list[Zygote] = []
        self._zygote_failed_at = -1e9
        self.forked = 0  # pooled runtimes that came from a zygote
        self.forked_on_demand = 0  # of which, forked for a cold start that found the pool empty
        self.zygotes = 0  # zygotes started (one per RETIRE_AFTER forks)
        self.fresh = 0  # pooled runtimes started as a new interpreter (no zygote)

    async def start(self) -> None:
        """Start the zygote and fill the pool before ember says it is listening (bounded: a pool that
        cannot fill goes on filling in the background)."""
        shutil.rmtree(self.dir, ignore_errors=True)  # task dirs of a previous run
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.refill()
        assert self._fill_task is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._fill_task), START_FILL_S)

    def take(self) -> Pooled | None:
        """A ready runtime if there is one (else one still importing, else None); never given back."""
        best = None
        for p in self.idle:
            if p.process.returncode is None and (best is None or (p.ready and not best.ready)):
                best = p
        if best is None:
            self.missed += 1
            self._missed()
            return None
        self.idle.remove(best)
        best.taken = True
        self.taken += 1
        if best.ready_fd >= 0:
            self.loop.remove_reader(best.ready_fd)
            os.close(best.ready_fd)
            best.ready_fd = -1
        if not best.ready:  # it will make this cold start wait: the pool is running behind
            self._missed()
        self.loop.call_later(REFILL_DELAY_S, self.refill)
        return best

    async def fork_now(self) -> Pooled | None:
        """On a pool miss: a runtime forked by the zygote into a new sandbox for this cold start (a few
        ms: what a refill costs), rather than a fresh interpreter; None when there is no zygote."""
        if self._closed or self.zygote is None or not self.zygote.alive:
            return None
        try:
            pooled = await self._spawn_forked()
        except OSError as exc:
            log.warning("the zygote could not start a runtime", extra={"error": str(exc)})
            return None
        pooled.taken = True
        self.forked_on_demand += 1
        if pooled.ready_fd >= 0:
            os.close(pooled.ready_fd)
            pooled.ready_fd = -1
        return pooled

    @property
    def target(self) -> int:
        return self.size + self.boost

    def _missed(self) -> None:
        """Cold starts outran the refills: keep one more runtime ready (up to `max_boost` more), until
        BOOST_DECAY_S pass without a miss."""
        self._last_miss = self.loop.time()
        if self.boost < self.max_boost:
            if self.boost == 0:
                self.loop.call_later(BOOST_DECAY_S, self._decay)
            self.boost += 1
        self.refill()

    def _decay(self) -> None:
        if self._closed or self.boost == 0:
            return
        idle_for = self.loop.time() - self._last_miss
        if idle_for < BOOST_DECAY_S:
            self.loop.call_later(BOOST_DECAY_S - idle_for, self._decay)
            return
        self.boost -= 1
        if len(self.idle) > self.target:  # the oldest extra runtime goes (a uid, a cgroup, a few MB)
            extra = self.idle.pop(0)
            extra.taken = True  # not a failure: its watcher must not count it as one
            if extra.ready_fd >= 0:
                self.loop.remove_reader(extra.ready_fd)
            self._cleanups.start(_discard(extra), name="discard an extra runtime")
        if self.boost > 0:
            self.loop.call_later(BOOST_DECAY_S, self._decay)

    def refill(self) -> None:
        if not self._closed and (self._fill_task is None or self._fill_task.done()):
            self._fill_task = self._tasks.start(self._fill(), name="pool fill")

    async def _fill(self) -> None:
        """Start what is missing all at once: each start mostly waits (bwrap, a cgroup move), in parallel."""
        while not self._closed and len(self.idle) + self.spawning < self.target:
            need = self.target - len(self.idle) - self.spawning
            started = await asyncio.gather(*(self._add_one() for _ in range(need)))
            if not all(started):
                await asyncio.sleep(FILL_RETRY_S)

    async def _add_one(self) -> bool:
        self.spawning += 1
        try:
            pooled = await self._spawn()
        except Exception:
            log.exception("could not pre-start a runtime")
            return False
        finally:
            self.spawning -= 1
        if self._closed:
            await _discard(pooled)
            return True
        self.idle.append(pooled)
        self._tasks.start(self._until_ready(pooled), name="pooled runtime ready")  # imports overlap: refills fast
        return True

    async def _spawn(self) -> Pooled:
        if await self._zygote() is not None:
            try:
                return await self._spawn_forked()
            except OSError as exc:
                log.warning("the zygote could not start a runtime; starting a fresh one", extra={"error": str(exc)})
        return await self._spawn_fresh()

    async def _zygote(self) -> Zygote | None:
        """The current zygote, started on first use (and again, at most every 10 s, after a failure);
        replaced in the background once it has forked RETIRE_AFTER runtimes."""
        if not USE_ZYGOTE:
            return None
        z = self.zygote
        if z is not None and not z.alive:
            if z.process is not None and z.process.returncode is None:
                z.close()  # retired: it exits once its runtimes are gone (killing it would kill them)
                self._retire(z)
            else:
                await z.kill()
            z = self.zygote = None
        if z is None:
            if self.loop.time() - self._zygote_failed_at < ZYGOTE_RETRY_S:
                return None
            try:
                z = await self._new_zygote()
            except OSError as exc:
                self._zygote_failed_at = self.loop.time()
                log.warning("no zygote: pooled runtimes start fresh", extra={"error": str(exc)})
                return None
            if self._closed:
                await z.kill()
                return None
            self.zygote = z
        if z.forks >= RETIRE_AFTER and (self._next_zygote is None or self._next_zygote.done()):
            self._next_zygote = self._tasks.start(self._replace_zygote(z), name="replace the zygote")
        return z

    async def _new_zygote(self) -> Zygote:
        z = Zygote(self.jailer.seccomp, dict(GENERIC_ENV), functools.partial(die_with_ember, signal.SIGTERM))
        await z.start()
        self.zygotes += 1
        return z

    async def _replace_zygote(self, old: Zygote) -> None:
        """The old zygote serves until its successor is ready, then retires (it exits once the runtimes
        it forked are gone)."""
        try:
            new = await self._new_zygote()
        except OSError as exc:
            log.warning("could not start a new zygote", extra={"error": str(exc)})
            if old.forks >= 2 * RETIRE_AFTER:  # never share one layout too widely: start fresh instead
                old.close()
            return
        if self._closed or self.zygote is not old:
            await new.kill()
            return
        self.zygote = new
        old.close()
        self._retire(old)

    def _retire(self, z: Zygote) -> None:
        self._retired = [r for r in self._retired if r.process is not None and r.process.returncode is None]
        if z not in self._retired:
            self._retired.append(z)

    async def _spawn_forked(self) -> Pooled:
        """A new sandbox whose payload waits for a runtime the zygote forks into it (ember.sandbox.zygote)."""
        self._seq += 1
        task_dir = self.dir / str(self._seq)
        task_dir.mkdir(mode=0o755)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        keeper_end, payload_end = (s.detach() for s in socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
        os.set_blocking(out_r, False)
        os.set_blocking(ready_r, False)
        theirs = [out_w, ctl_r, ready_w, keeper_end, payload_end]
        process: SpawnedProcess | None = None
        jail: Jail | None = None
        try:
            process, jail, _ = await self.jailer.spawn(
                list(WAITER),
                dict(GENERIC_ENV),
                str(task_dir),
                POOL_MEMORY_MB,
                out_w,
                stdin=payload_end,
                block=False,
                join_cgroup=False,  # only the runtime goes there (its keeper moves it): one cgroup move, not two
                network=self.network,
            )
            os.close(payload_end)
            theirs.remove(payload_end)
            pidfd = sandbox_pidfd(jail.child_pid, process)
            theirs.append(pidfd)
            jail.init_pidfd = os.dup(pidfd)
            procs = jail.cgroup.open_procs() if jail.cgroup is not None else []
            theirs += procs
            cfg = self.jailer.cfg
            zygote = self.zygote  # the current one: it may have been replaced while bwrap started
            if zygote is None:
                raise OSError("no zygote")
            zygote.fork(
                jail.child_pid,
                jail.uid,
                cfg.nofile,
                cfg.pids_max,
                [pidfd, ctl_r, out_w, ready_w, keeper_end, *procs],
            )
        except BaseException:
            for fd in (out_r, ctl_w, ready_r):
                os.close(fd)
            if process is not None and jail is not None:
                jail.kill()
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                await jail.release()
            shutil.rmtree(task_dir, ignore_errors=True)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        jail.task_dir = task_dir
        self.forked += 1
        pooled = Pooled(process, jail, out_r, ctl_w, ready_r)
        self._tasks.start(self._watch(pooled), name="pooled runtime watcher")
        return pooled

    async def _spawn_fresh(self) -> Pooled:
        """A new sandbox with a new interpreter that imports the runtime itself (no zygote)."""
        self.fresh += 1
        self._seq += 1
        task_dir = self.dir / str(self._seq)
        task_dir.mkdir(mode=0o755)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(out_r, False)
        os.set_blocking(ready_r, False)
        try:
            process, jail, _ = await self.jailer.spawn(
                [sys.executable, "-c", ZYGOTE, str(ready_w)],
                dict(GENERIC_ENV),
                str(task_dir),
                POOL_MEMORY_MB,
                out_w,
                stdin=ctl_r,
                extra_fds=(ready_w,),
                block=False,
                network=self.network,
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
        self._tasks.start(self._watch(pooled), name="pooled runtime watcher")
        return pooled

    async def _until_ready(self, pooled: Pooled) -> None:
        """Note the runtime's "imported" byte: `take` prefers runtimes that are ready."""
        done: asyncio.Future[None] = self.loop.create_future()

        def on_ready() -> None:
            try:
                data = os.read(pooled.ready_fd, READY_READ_BYTES)
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
            await asyncio.wait_for(asyncio.shield(done), READY_TIMEOUT_S)
        try:
            await pooled.jail.network_ready()
        except OSError as exc:  # useless: its watcher replaces it (with the usual backoff)
            log.warning("a pre-started runtime got no network", extra={"error": str(exc)})
            if not pooled.taken:
                with contextlib.suppress(ProcessLookupError):
                    pooled.process.kill()

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
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(self.failures, 10))
            log.warning(
                "a pre-started runtime exited",
                extra={"returncode": pooled.process.returncode, "failures": self.failures, "retry_in_s": delay},
            )
            self.loop.call_later(delay, self.refill)

    async def close(self) -> None:
        self._closed = True
        await self._tasks.close()  # the fill, a zygote being replaced, the watchers (idle runtimes go below)
        idle, self.idle = self.idle, []
        for pooled in idle:
            if pooled.ready_fd >= 0:
                self.loop.remove_reader(pooled.ready_fd)
            await _discard(pooled)
        await self._cleanups.drain()
        # each zygote kills the runtimes it forked that are still there and reaps them before it exits
        zygotes = [z for z in (self.zygote, *self._retired) if z is not None]
        self.zygote, self._retired = None, []
        await asyncio.gather(*(z.kill() for z in zygotes))
        shutil.rmtree(self.dir, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "target": self.target,
            "idle": len(self.idle),
            "ready": sum(p.ready for p in self.idle),
            "taken": self.taken,
            "missed": self.missed,
            "forked": self.forked,
            "forked_on_demand": self.forked_on_demand,
            "zygotes": self.zygotes,
            "fresh": self.fresh,
        }


def specialisation(env: dict[str, str], handler: str) -> bytes:
    """The line that specialises a pooled runtime (read by ZYGOTE, and by zygote_server.parse_spec)."""
    return orjson.dumps({"env": env, "handler": handler}) + b"\n"


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
