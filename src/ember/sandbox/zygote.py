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
from typing import Any

import orjson

from ember.sandbox.isolation import SpawnedProcess, spawn_off_loop

log = logging.getLogger("ember.sandbox.zygote")

# forks per zygote: how many sandboxes share one address-space layout and hash secret
RETIRE_AFTER = max(1, int(os.environ.get("EMBER_ZYGOTE_RETIRE_AFTER", "16")))
START_TIMEOUT_S = 15.0
# The sandbox's payload: waits for the runtime's exit status from its keeper and exits with it, so
# bwrap (ember's child) exits when the runtime does, with its status (128+N for signal N).
# Its stdin is a socket to the keeper: it first writes a byte on it (the sandbox is set up: bwrap
# reports pid 1 before it has mounted anything), then reads the status back.
WAITER = ["/bin/sh", "-c", 'printf R >&0; read -r c || exit 125; exit "$c"']

# Runs as `python -c SERVER SOCK_FD SECCOMP_HEX` in ember's namespaces, as root, cwd "/", with only
# GENERIC_ENV: no ember module is imported (nothing of ember's is in a runtime's memory).
SERVER = r"""
import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]  # `-c` puts the cwd first: imports as root come from the runtime's paths only
import os, json, signal, socket, ctypes, resource, select
import awslambdaric.__main__ as _main, awslambdaric.bootstrap as _bootstrap
import concurrent.futures.thread, awslambdaric.lambda_literals  # imported lazily on the way to /next

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_NS_RUNTIME = 0x00020000 | 0x40000000 | 0x08000000 | 0x04000000  # mnt net ipc uts
_NS_PID = 0x20000000
_NEWCGROUP = 0x02000000
_LAST_CAP = int(open("/proc/sys/kernel/cap_last_cap").read())
_SECCOMP = bytes.fromhex(sys.argv[2])


def _ok(rc):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _prctl(op, arg=0):
    _ok(_libc.prctl(op, arg, 0, 0, 0))


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop(uid, nofile, nproc):
    # as root: no capability can come back (bounding set, ambient), then the sandbox's uid and gid
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    for cap in range(_LAST_CAP + 1):
        _prctl(24, cap)  # PR_CAPBSET_DROP
    _ok(_libc.prctl(47, 4, 0, 0, 0))  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # clears the effective and permitted sets
    data = (_CapData * 2)()
    _ok(_libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data))  # and the inheritable set
    _prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    _prctl(4, 1)  # PR_SET_DUMPABLE, as after an execve
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with its keeper (set after the uid change)
    if _SECCOMP:
        buf = ctypes.create_string_buffer(_SECCOMP, len(_SECCOMP))
        prog = _Fprog(len(_SECCOMP) // 8, ctypes.addressof(buf))
        _ok(_libc.prctl(22, 2, ctypes.addressof(prog), 0, 0))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _runtime(req, pidfd, root, ctl, out, ready):
    try:
        _ok(_libc.setns(pidfd, _NS_RUNTIME))
        _ok(_libc.unshare(_NEWCGROUP))  # rooted at the sandbox's cgroup, which its keeper moved it to
        os.fchdir(root)
        os.chroot(".")
        os.chdir("/var/task")
        os.setsid()
        os.dup2(ctl, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(ready, 3)
        os.closerange(4, 65536)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _drop(req["uid"], req["nofile"], req["nproc"])
        if os.getuid() != req["uid"] or os.geteuid() != req["uid"] or os.getgroups():
            os._exit(126)
    except BaseException as exc:
        try:
            os.write(2, f"ember zygote: cannot enter the sandbox: {exc!r}\n".encode())
        finally:
            os._exit(126)
    try:
        _serve_one()
    except SystemExit as exc:
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _serve_one():
    try:
        os.write(3, b"R")  # EPIPE when ember took this runtime before it was ready: fine
    except OSError:
        pass
    os.close(3)
    line = sys.stdin.buffer.readline()
    if not line:
        os._exit(0)
    spec = json.loads(line)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(spec["env"])
    _bootstrap._AWS_LAMBDA_LOG_FORMAT = _bootstrap.LogFormat.from_str(os.environ.get("AWS_LAMBDA_LOG_FORMAT"))
    _bootstrap._AWS_LAMBDA_LOG_LEVEL = _bootstrap._get_log_level_from_env_var(os.environ.get("AWS_LAMBDA_LOG_LEVEL"))
    os.chdir("/var/task")
    sys.path.insert(0, "/var/task")  # as `python -m awslambdaric` run in /var/task has it
    sys.argv = ["awslambdaric", spec["handler"]]
    _main.main(sys.argv)


def _keeper(req, fds):
    # runs as root in ember's namespaces; stays out of the sandbox's, except its pid namespace for children
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the zygote blocks these around its forks
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the zygote (which dies with ember)
    if os.getppid() != _ZYGOTE:
        os._exit(1)
    pidfd, ctl, out, ready, status, *procs = fds
    code = 126
    try:
        # the sandbox's cgroup, every hierarchy (an RCU grace period on v1: while bwrap sets up); the
        # runtime is forked in it
        for fd in procs:
            os.write(fd, b"0")
            os.close(fd)
        if not select.select([status], [], [], 10.0)[0] or os.read(status, 1) != b"R":
            raise OSError("the sandbox did not come up")
        root = os.open("/proc/%d/root" % req["pid"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if select.select([pidfd], [], [], 0)[0]:  # the pidfd is readable once its process exited
            raise OSError("the sandbox is gone")
        _ok(_libc.setns(pidfd, _NS_PID))
        child = os.fork()
        if child == 0:
            _runtime(req, pidfd, root, ctl, out, ready)
        for fd in (pidfd, root, ctl, out, ready):
            os.close(fd)
        code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        code = code if code >= 0 else 128 - code
    except BaseException as exc:
        print(f"ember zygote: cannot start a runtime: {exc!r}", file=sys.stderr, flush=True)
    try:
        os.write(status, b"%d\n" % code)
    finally:
        os._exit(0)


_ZYGOTE = os.getpid()
_KEEPERS = set()  # live (or not yet reaped) keepers: children, so their pids are not reused
_STOPPING = False
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM}


def _reap(*_):
    # keepers, and the runtimes of keepers that were killed (this is their subreaper: see _main_loop)
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _KEEPERS.discard(pid)


def _stop(*_):
    # ember is gone (PR_SET_PDEATHSIG) or shutting down: every runtime goes now (with its keeper)
    global _STOPPING
    _STOPPING = True
    for pid in list(_KEEPERS):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _main_loop():
    sock = socket.socket(fileno=int(sys.argv[1]))
    # A keeper can be killed before it reaped its runtime (the sandbox's cgroup is killed, keeper
    # included): the runtime's zombie would then go to whichever subreaper is above ember (systemd,
    # tini, ...) or init, and the sandbox's pid 1 would wait for it to be reaped (its pid namespace
    # is not empty) for as long as that takes. As their subreaper, the zygote reaps them at once.
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, _stop)
    sock.send(b"R")
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, 64)
        except InterruptedError:
            continue
        if not msg:
            break
        if len(fds) < 5 or _STOPPING:
            for fd in fds:
                os.close(fd)
            continue
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # the keeper is in _KEEPERS before it can be reaped
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    sock.close()
                    _keeper(json.loads(msg), fds)
                finally:
                    os._exit(1)
            _KEEPERS.add(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        for fd in fds:
            os.close(fd)
    # retired (ember closed its end): stay the parent (and subreaper) of live keepers and their
    # runtimes until they are done; on SIGTERM (ember shutting down or gone), kill them first
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    if _STOPPING:
        _stop()
    while True:
        try:
            pid, _status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        _KEEPERS.discard(pid)
    os._exit(0)


_main_loop()
"""


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
                [sys.executable, "-c", SERVER, str(theirs.fileno()), self.seccomp.hex()],
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
            first = await asyncio.wait_for(loop.sock_recv(ours, 16), START_TIMEOUT_S)
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
        msg = orjson.dumps({"pid": pid, "uid": uid, "nofile": nofile, "nproc": nproc})
        socket.send_fds(self.sock, [msg], fds)
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
                await asyncio.wait_for(self.process.wait(), 5.0)
            except TimeoutError:
                log.error("the zygote did not stop: killing it", extra={"pid": self.process.pid})
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.process.wait(), 5.0)


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
