"""The zygote: a fork server for pooled python runtimes (ember.sandbox.zygote says how it is used).

Not imported by ember: ember.sandbox.zygote reads this file as text and runs it as
`python -c TEXT SOCK_FD SECCOMP_HEX` in ember's namespaces, as root, cwd "/", with only the pool's generic
environment. It imports no ember module (nothing of ember's is in a runtime's memory): the standard
library and awslambdaric only, which it imports once so that every runtime it forks has them already.

Protocol on SOCK_FD (a SOCK_SEQPACKET socket to ember): the zygote sends b"R" once it has imported the
runtime; then each message from ember is one fork request, a JSON object {"pid", "uid", "nofile",
"nproc"} with its fds attached (FD_NAMES, then the sandbox's cgroup.procs files). A message with fewer
fds, or any message after SIGTERM, is dropped (its fds closed). EOF retires the zygote.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.path and sys.path[0] == "":
    del sys.path[0]  # `-c` puts the cwd first: imports as root come from the runtime's paths only

import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import socket

TYPE_CHECKING = False  # no `typing` import at run time: nothing a runtime does not need
if TYPE_CHECKING:
    from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_NS_RUNTIME = 0x00020000 | 0x40000000 | 0x08000000 | 0x04000000  # mnt net ipc uts
_NS_PID = 0x20000000
_NEWCGROUP = 0x02000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER = 1, 4, 24, 36
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAP_AMBIENT = 38, 22, 47
SECCOMP_MODE_FILTER, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
MSG_MAX_BYTES = 65536  # one fork request (~80 bytes of JSON)
MSG_MAX_FDS = 64  # its fds: FD_NAMES and a few cgroup.procs files
FD_NAMES = ("pidfd", "ctl", "out", "ready", "status")  # then the cgroup.procs files
REQUEST_KEYS = ("pid", "uid", "nofile", "nproc")
SPEC_MAX_BYTES = 1 << 20  # the specialisation line: a function's environment and handler
UP_TIMEOUT_S = 10.0  # for the sandbox's payload to report it is set up
FIRST_FD_CLOSED = 4  # a runtime keeps fds 0-3 (ctl, out, out, ready) and nothing else
FD_LIMIT = 65536
EXIT_CANNOT_ENTER = 126

_ZYGOTE = -1  # this zygote's pid, once running (a keeper checks it is still its parent)
_SECCOMP = b""
_LAST_CAP = -1  # read at the zygote's start (on the host's /proc)
_KEEPERS: set[int] = set()  # live (or not yet reaped) keepers: children, so their pids are not reused
_STOPPING = False
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM}
_main: Any = None  # awslambdaric.__main__, once preloaded
_bootstrap: Any = None  # awslambdaric.bootstrap


def parse_args(argv: list[str]) -> tuple[int, bytes]:
    """SOCK_FD SECCOMP_HEX: the socket to ember and the seccomp filter (empty: none)."""
    if len(argv) != 3:
        raise ValueError("usage: zygote SOCK_FD SECCOMP_HEX")
    fd = int(argv[1])
    if fd < 0:
        raise ValueError("bad socket fd")
    seccomp = bytes.fromhex(argv[2])
    if len(seccomp) % 8:
        raise ValueError("a seccomp filter is a whole number of 8-byte instructions")
    return fd, seccomp


def parse_request(msg: bytes) -> dict[str, int]:
    """One fork request: the sandbox's pid 1 (host pid), its uid and its rlimits, each a non-negative int."""
    req = json.loads(msg)
    if not isinstance(req, dict):
        raise ValueError("a request is an object")
    out = {}
    for key in REQUEST_KEYS:
        value = req.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"request {key!r}: expected a non-negative integer")
        out[key] = value
    return out


def split_fds(fds: list[int]) -> tuple[list[int], list[int]]:
    """A request's fds: FD_NAMES in order, then the cgroup.procs files."""
    if len(fds) < len(FD_NAMES):
        raise ValueError(f"a request carries at least {len(FD_NAMES)} fds")
    return fds[: len(FD_NAMES)], fds[len(FD_NAMES) :]


def parse_spec(line: bytes) -> tuple[dict[str, str], str]:
    """The specialisation line ember writes to a pooled runtime: its environment and handler."""
    spec = json.loads(line)
    if not isinstance(spec, dict):
        raise ValueError("a specialisation is an object")
    env, handler = spec.get("env"), spec.get("handler")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("env: expected an object of strings")
    if not isinstance(handler, str):
        raise ValueError("handler: expected a string")
    return env, handler


def exit_code(wait_status: int) -> int:
    """A runtime's wait status as its sandbox's payload exits with it: 128+N for signal N (bwrap's way)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


def _preload() -> None:
    """Import the runtime once: every forked runtime has it already."""
    global _main, _bootstrap
    import concurrent.futures.thread  # noqa: F401 (imported lazily on the way to /next)

    import awslambdaric.__main__ as main
    import awslambdaric.bootstrap as bootstrap
    import awslambdaric.lambda_literals  # noqa: F401 (the same)

    _main, _bootstrap = main, bootstrap


def _ok(rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _prctl(op: int, arg: int = 0) -> None:
    _ok(_libc.prctl(op, arg, 0, 0, 0))


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop(uid: int, nofile: int, nproc: int) -> None:
    # as root: no capability can come back (bounding set, ambient), then the sandbox's uid and gid
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    for cap in range(_LAST_CAP + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    _ok(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # clears the effective and permitted sets
    data = (_CapData * 2)()
    _ok(_libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data))  # and the inheritable set
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 1)  # as after an execve
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with its keeper (set after the uid change)
    if _SECCOMP:
        buf = ctypes.create_string_buffer(_SECCOMP, len(_SECCOMP))
        prog = _Fprog(len(_SECCOMP) // 8, ctypes.addressof(buf))
        _ok(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0))


def _runtime(req: dict[str, int], pidfd: int, root: int, ctl: int, out: int, ready: int) -> None:
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
        os.closerange(FIRST_FD_CLOSED, FD_LIMIT)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _drop(req["uid"], req["nofile"], req["nproc"])
        if os.getuid() != req["uid"] or os.geteuid() != req["uid"] or os.getgroups():
            os._exit(EXIT_CANNOT_ENTER)
    except BaseException as exc:
        try:
            os.write(2, f"ember zygote: cannot enter the sandbox: {exc!r}\n".encode())
        finally:
            os._exit(EXIT_CANNOT_ENTER)
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


def _serve_one() -> None:
    with contextlib.suppress(OSError):
        os.write(3, b"R")  # EPIPE when ember took this runtime before it was ready: fine
    os.close(3)
    line = sys.stdin.buffer.readline(SPEC_MAX_BYTES)
    if not line:
        os._exit(0)
    env, handler = parse_spec(line)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(env)
    _bootstrap._AWS_LAMBDA_LOG_FORMAT = _bootstrap.LogFormat.from_str(os.environ.get("AWS_LAMBDA_LOG_FORMAT"))
    _bootstrap._AWS_LAMBDA_LOG_LEVEL = _bootstrap._get_log_level_from_env_var(os.environ.get("AWS_LAMBDA_LOG_LEVEL"))
    os.chdir("/var/task")
    sys.path.insert(0, "/var/task")  # as `python -m awslambdaric` run in /var/task has it
    sys.argv = ["awslambdaric", handler]
    _main.main(sys.argv)


def _keeper(msg: bytes, fds: list[int]) -> None:
    # runs as root in ember's namespaces; stays out of the sandbox's, except its pid namespace for children
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the zygote blocks these around its forks
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the zygote (which dies with ember)
    if os.getppid() != _ZYGOTE:
        os._exit(1)
    (pidfd, ctl, out, ready, status), procs = split_fds(fds)
    code = EXIT_CANNOT_ENTER
    try:
        req = parse_request(msg)
        # the sandbox's cgroup, every hierarchy (an RCU grace period on v1: while bwrap sets up); the
        # runtime is forked in it
        for fd in procs:
            os.write(fd, b"0")
            os.close(fd)
        if not select.select([status], [], [], UP_TIMEOUT_S)[0] or os.read(status, 1) != b"R":
            raise OSError("the sandbox did not come up")
        root = os.open(f"/proc/{req['pid']}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if select.select([pidfd], [], [], 0)[0]:  # the pidfd is readable once its process exited
            raise OSError("the sandbox is gone")
        _ok(_libc.setns(pidfd, _NS_PID))
        child = os.fork()
        if child == 0:
            _runtime(req, pidfd, root, ctl, out, ready)
        for fd in (pidfd, root, ctl, out, ready):
            os.close(fd)
        code = exit_code(os.waitpid(child, 0)[1])
    except BaseException as exc:
        print(f"ember zygote: cannot start a runtime: {exc!r}", file=sys.stderr, flush=True)
    try:
        os.write(status, b"%d\n" % code)
    finally:
        os._exit(0)


def _reap(*_: object) -> None:
    # keepers, and the runtimes of keepers that were killed (this is their subreaper: see _main_loop)
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _KEEPERS.discard(pid)


def _stop(*_: object) -> None:
    # ember is gone (PR_SET_PDEATHSIG) or shutting down: every runtime goes now (with its keeper)
    global _STOPPING
    _STOPPING = True
    for pid in list(_KEEPERS):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _main_loop() -> None:
    global _ZYGOTE, _SECCOMP, _LAST_CAP
    sock_fd, _SECCOMP = parse_args(sys.argv)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        _LAST_CAP = int(f.read())
    _preload()
    _ZYGOTE = os.getpid()
    sock = socket.socket(fileno=sock_fd)
    # A keeper can be killed before it reaped its runtime (the sandbox's cgroup is killed, keeper
    # included): the runtime's zombie would then go to whichever subreaper is above ember (systemd,
    # tini, ...) or init, and the sandbox's pid 1 would wait for it to be reaped (its pid namespace
    # is not empty) for as long as that takes. As their subreaper, the zygote reaps them at once.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, _stop)
    sock.send(b"R")
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MSG_MAX_BYTES, MSG_MAX_FDS)
        except InterruptedError:
            continue
        if not msg:
            break
        if len(fds) < len(FD_NAMES) or _STOPPING:
            for fd in fds:
                os.close(fd)
            continue
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # the keeper is in _KEEPERS before it can be reaped
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    sock.close()
                    _keeper(msg, fds)
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


if __name__ == "__main__":
    _main_loop()
