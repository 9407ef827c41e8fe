"""Starting ember's children off the event loop, and the small process-level tools every sandbox mode
uses: a listener in a sandbox's network namespace, the preexec step that puts a child in its cgroup
and under its rlimits, a parent-death signal, bounded reads of a child's report, and the set of tasks
a component owns.

Nothing here knows about bubblewrap or sandboxes' views (ember.sandbox.jail) or about pooled runtimes
(ember.sandbox.pool): it imports nothing of ember's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import resource
import select
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Protocol, TypeVar

import orjson

log = logging.getLogger("ember.sandbox.spawn")

RUNTIME_API_PORT = 9001  # inside the sandbox's own network namespace, as in Lambda
LISTEN_BACKLOG = 128  # a sandbox's Runtime API listener: one runtime, a few connections at most
SPAWN_THREADS = 2  # threads that fork sandboxes (see _spawner)
INFO_MAX_BYTES = 64 * 1024  # a child's JSON report on its info fd (bwrap's --info-fd: ~100 bytes)
INFO_READ_BYTES = 4096
INFO_TIMEOUT_S = 10.0
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")
# what subprocess.Popen takes as stdin/stdout/stderr
_Stdio = int | IO[Any] | None


class ChildProcess(Protocol):
    """What ember uses of a child process: an asyncio.subprocess.Process or a SpawnedProcess."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int, /) -> None: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in_netns(pid: int, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket made in the network namespace of `pid` (it stays bound to that namespace). Synchronous on
    purpose: the thread is back in ember's namespace before anything else runs on it."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            return socket.socket(family, kind, proto)
        finally:
            _setns(own)  # cannot fail for ember's own namespace; if it did, raising is right
    finally:
        os.close(own)
        os.close(target)


LOOPBACK_WAIT_S = 5.0  # bwrap sets up the sandbox's loopback a moment after it reports the pid
LOOPBACK_POLL_S = 0.0005
_SIOCGIFFLAGS, _IFF_UP = 0x8913, 0x1
_IFREQ_LO = struct.pack("16sH22x", b"lo", 0)


async def until_loopback_up(pid: int, timeout_s: float = LOOPBACK_WAIT_S) -> None:
    """Wait until the network namespace of `pid` has its loopback up (bwrap adds 127.0.0.1, then sets
    the link up, a moment after it reports the sandbox's pid): binding the Runtime API's 127.0.0.1
    before that fails with EADDRNOTAVAIL. Bounded; raises OSError when it does not come up."""
    sock = socket_in_netns(pid, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            flags = struct.unpack_from("=H", fcntl.ioctl(sock, _SIOCGIFFLAGS, _IFREQ_LO), 16)[0]
            if flags & _IFF_UP:
                return
            if loop.time() > deadline:
                raise OSError(errno.EADDRNOTAVAIL, "the sandbox's loopback did not come up")
            await asyncio.sleep(LOOPBACK_POLL_S)
    finally:
        sock.close()


def listen_in_netns(pid: int, port: int = RUNTIME_API_PORT) -> socket.socket:
    """A listening TCP socket at 127.0.0.1:`port` in the network namespace of `pid`."""
    sock = socket_in_netns(pid, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def enter(uid: int, cgroup_fds: list[int], pids_max: int, nofile: int, drop: bool, address_mb: int = 0) -> None:
    """In the forked child, before exec: join the cgroup, cap open files and processes, become the
    sandbox's uid (no groups), and die with ember (set after the uid change, which clears it).
    `address_mb`: without a cgroup, an address-space cap is the only memory limit there is."""
    for fd in cgroup_fds:
        os.write(fd, b"0")
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_NPROC, (pids_max, pids_max))  # per uid; root ignores it
    if address_mb:
        cap = (address_mb + 512) * 1024 * 1024  # slack: thread stacks and mappings are not memory
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if drop:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_ember(sig: int = signal.SIGKILL) -> None:
    """preexec_fn of ember's helper processes: `sig` when ember dies (the zygote takes SIGTERM, to
    stop its runtimes and reap them before it exits)."""
    _libc.prctl(_PR_SET_PDEATHSIG, int(sig))


_spawners: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    """Threads that fork sandboxes, living as long as ember: PR_SET_PDEATHSIG fires when the *thread*
    that forked a child ends, so these threads are never shut down."""
    global _spawners
    if _spawners is None:
        _spawners = ThreadPoolExecutor(max_workers=SPAWN_THREADS, thread_name_prefix="ember-spawn")
    return _spawners


class SpawnedProcess:
    """What ember uses of an asyncio.subprocess.Process (pid, returncode, wait, kill), for a child
    spawned off the event loop: starting a sandbox waits in the child for the cgroup moves (an RCU grace
    period each on cgroup v1) and the exec, ~5-20 ms during which the event loop would stand still."""

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self._loop = loop
        self.pid = popen.pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(self.pid)
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = self._popen.wait()  # it has exited: reaps at once
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int, /) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _popen(
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    stdin: _Stdio,
    stdout: _Stdio,
    stderr: _Stdio,
    start_new_session: bool,
    pass_fds: Sequence[int],
    preexec_fn: Callable[[], Any] | None,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=start_new_session,
        pass_fds=pass_fds,
        preexec_fn=preexec_fn,
    )


async def spawn_off_loop(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    stdin: _Stdio = None,
    stdout: _Stdio = None,
    stderr: _Stdio = None,
    start_new_session: bool = False,
    pass_fds: Sequence[int] = (),
    preexec_fn: Callable[[], Any] | None = None,
) -> SpawnedProcess:
    """subprocess.Popen on a spawner thread (the event loop only waits for the fork itself)."""
    loop = asyncio.get_running_loop()
    start = functools.partial(
        _popen, argv, cwd, env, stdin, stdout, stderr, start_new_session, tuple(pass_fds), preexec_fn
    )
    fut = loop.run_in_executor(_spawner(), start)
    try:
        popen = await asyncio.shield(fut)
    except asyncio.CancelledError:

        def reap(f: asyncio.Future[subprocess.Popen[bytes]]) -> None:
            if not f.cancelled() and f.exception() is None:
                process = SpawnedProcess(f.result(), loop)  # its exit is then reaped by the reader
                with contextlib.suppress(OSError):
                    if start_new_session:
                        os.killpg(process.pid, signal.SIGKILL)  # bwrap's pid 1 too (see Jail.pgid)
                    else:
                        process.kill()

        fut.add_done_callback(reap)
        raise
    return SpawnedProcess(popen, loop)


async def until_exited(pidfd: int, timeout_s: float, pid: int) -> bool:
    """Wait (bounded) until the process of `pidfd` has exited: the pidfd polls readable once it has."""
    if select.select([pidfd], [], [], 0)[0]:
        return True
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        await asyncio.wait_for(gone, timeout_s)
        return True
    except TimeoutError:
        log.error("a sandbox's pid 1 did not exit", extra={"pid": pid})
        return False
    finally:
        loop.remove_reader(pidfd)


async def read_json(fd: int, timeout_s: float = INFO_TIMEOUT_S, limit: int = INFO_MAX_BYTES) -> dict[str, Any]:
    """Read one JSON object from a pipe (bwrap's --info-fd); {} on EOF before it is complete, or past
    `limit` bytes."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        try:
            data = os.read(fd, INFO_READ_BYTES)
        except BlockingIOError:
            return
        buf.extend(data)
        ended = not data or buf.rstrip().endswith(b"}") or len(buf) > limit
        if ended and not done.done():
            done.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(done, timeout_s)
    finally:
        loop.remove_reader(fd)
    if len(buf) > limit:
        return {}
    try:
        doc = orjson.loads(bytes(buf))
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


class Tasks:
    """The background tasks one component owns: each is referenced until it is done (an exception it
    ends with is logged, not lost), and those still running are cancelled and awaited on `close`."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "a background task failed",
                extra={"owner": self.owner, "task": task.get_name()},
                exc_info=task.exception(),
            )

    async def drain(self) -> None:
        """Wait for every task to end by itself (for tasks that must finish: a sandbox's cleanup)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel every task and wait until each has ended."""
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
