"""Sandbox isolation: each sandbox runs as its own unprivileged uid, in its own mount, pid, ipc, uts,
user and network namespaces (bubblewrap), inside its own cgroup (ember.sandbox.cgroups).

What a sandbox sees: its code read-only at /var/task, the runtime (the interpreter, its stdlib and
site-packages; /usr, /bin, /lib*, a few files of /etc) read-only, a private /tmp (tmpfs, capped at
`ephemeral_mb`), its own /proc, a minimal read-only /dev, and nothing else: not the data dir, not
other functions' code, not ember's files. Nothing outside /tmp is writable.

Network (docs/decisions/0006): every sandbox has a network namespace of its own with only a
loopback. ember creates the sandbox's Runtime API listener *inside* that namespace (setns on the
event loop thread, for the few microseconds a socket() and bind() take), at 127.0.0.1:9001 as in
Lambda. So a sandbox reaches its own Runtime API and nothing else: not ember's API port, not another
sandbox's Runtime API, not the host's services. The price: no outbound network from functions.

Modes, chosen at startup (`--isolation auto|bwrap|unshare|none`): `bwrap` when /usr/bin/bwrap works,
else `unshare` when util-linux's unshare(1) and setpriv(1) work (both need root): the same namespaces,
uid, view, seccomp filter and cgroups, built by a small python helper (`UNSHARE_HELPER`) instead of
bwrap, and no pool of pre-started runtimes; else `none`: a plain process with rlimits, a cgroup when
there is one, and a loud warning at startup and in /health.
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
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ember.sandbox.cgroups import Cgroup, Cgroups

if TYPE_CHECKING:
    from ember.sandbox.pool import Pool
    from ember.sandbox.process import SandboxProcess

log = logging.getLogger("ember.sandbox.isolation")

TASK_ROOT = "/var/task"
RUNTIME_API_PORT = 9001  # inside the sandbox's own network namespace, as in Lambda
UID_BASE = 200_000
UID_BLOCK = 4096  # uids per ember instance; instance k owns [UID_BASE + k*UID_BLOCK, +UID_BLOCK)
UID_BLOCKS = 1024
ETC_FILES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "hosts", "nsswitch.conf",
    "passwd", "group", "ssl", "ca-certificates", "mime.types", "protocols", "services", "os-release",
)  # fmt: skip
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(slots=True)
class IsolationConfig:
    mode: str = "auto"  # auto | bwrap | unshare | none
    pool: int = 2  # pre-started python runtimes kept ready (0: none)
    ephemeral_mb: int = 512  # the size of each sandbox's /tmp (Lambda's default ephemeral storage)
    pids_max: int = 1024  # processes and threads per sandbox (Lambda's limit)
    nofile: int = 1024  # open files per process (Lambda's limit)


class UidRange:
    """Unprivileged uids, one per live sandbox. Each ember instance locks a block of its own (flock on
    a file per block), so two embers on one host never hand out the same uid."""

    def __init__(self) -> None:
        self.base = -1
        self._lock_fd = -1
        self._free: list[int] = []
        self._next = 0
        lock_dir = Path("/run/ember") if os.access("/run", os.W_OK) else Path("/tmp/ember-uids")
        lock_dir.mkdir(parents=True, exist_ok=True)
        for k in range(UID_BLOCKS):
            fd = os.open(lock_dir / f"uids-{k}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.base, self._lock_fd = UID_BASE + k * UID_BLOCK, fd
            return
        raise RuntimeError("no free uid block for sandboxes")

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next >= UID_BLOCK:
            raise RuntimeError("all sandbox uids are in use")
        self._next += 1
        return self.base + self._next - 1

    def give_back(self, uid: int) -> None:
        self._free.append(uid)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in_netns(pid: int, port: int = RUNTIME_API_PORT) -> socket.socket:
    """A listening TCP socket at 127.0.0.1:`port` in the network namespace of `pid`. Synchronous on
    purpose: the thread is back in ember's namespace before anything else runs on it."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(128)
            sock.setblocking(False)
        finally:
            _setns(own)  # cannot fail for ember's own namespace; if it did, raising is right
    finally:
        os.close(own)
        os.close(target)
    return sock


_CLONE_NEWUSER = 0x10000000
_AUDIT_ARCH_X86_64 = 0xC000003E
_SYS_UNSHARE, _SYS_CLONE, _SYS_CLONE3 = 272, 56, 435
# Refused outright (x86_64 numbers): kernel interfaces a function has no use for and that widen what a
# sandbox can poke at: keyctl, add_key, request_key, bpf, perf_event_open, userfaultfd,
# open_by_handle_at, kexec_load, kexec_file_load, init_module, finit_module, delete_module, setns.
_DENIED = (250, 248, 249, 321, 298, 323, 304, 246, 320, 175, 313, 176, 308)


def seccomp_program() -> bytes:
    """A classic-BPF seccomp filter for bwrap's --seccomp: no new user namespaces (a sandbox uid
    could otherwise get capabilities over namespaces of its own), clone3 answers ENOSYS (its flags
    cannot be inspected; libc falls back to clone), and `_DENIED` answers EPERM. Other
    architectures than x86_64 pass unfiltered (the syscall numbers differ)."""
    import struct

    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    checks = [_SYS_UNSHARE, _SYS_CLONE, _SYS_CLONE3, *_DENIED]
    n = len(checks)
    # 0 ld arch | 1 jeq x86_64 else A | 2 ld nr | 3.. jeq nr | A ret allow | F ld args[0] low word
    # | F+1 jset CLONE_NEWUSER ? B : A2 | B ret EPERM | C ret ENOSYS | A2 ret allow (jumps go forward only)
    a_at = 3 + n
    f_at = a_at + 1
    b_at, c_at = f_at + 2, f_at + 3
    prog = [(ld, 0, 0, 4), (jeq, 0, a_at - 2, _AUDIT_ARCH_X86_64), (ld, 0, 0, 0)]
    for i, nr in enumerate(checks):
        at = 3 + i
        target = f_at if nr in (_SYS_UNSHARE, _SYS_CLONE) else c_at if nr == _SYS_CLONE3 else b_at
        prog.append((jeq, target - at - 1, 0, nr))
    prog += [(ret, 0, 0, allow), (ld, 0, 0, 16), (jset, 0, 2, _CLONE_NEWUSER)]
    prog += [(ret, 0, 0, eperm), (ret, 0, 0, enosys), (ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


# How a function's environment reaches its runtime, in every isolated mode: never in the environment of a
# process running as root (bwrap, unshare(1), UNSHARE_HELPER, setpriv before it drops the uid: a function's
# LD_PRELOAD, LD_LIBRARY_PATH, GCONV_PATH... would be honoured as root, with the function's code at a path it
# can predict), nor on a command line. The sandbox starts with stdin = `_env_file(env)` and stdout = the
# runtime's stdin (stderr is its output); root processes run with PATH only. Right before exec'ing the runtime,
# a shell running as the sandbox's uid (after setpriv) sources the file and moves stdin and stdout back, so
# the runtime gets exactly `env` and the usual fds 0, 1, 2. Only fds 0-2 can be placed at a known number in
# the child without a preexec_fn (Popen's stdio), and dash names no fd above 9: hence fd 0 and 1.
ENV_EXEC = ["/bin/sh", "-c", 'unset PATH PWD; . /dev/fd/0 || exit 126; exec "$@" 0<&1 1>&2', "sh"]
ENV_PATH = {"PATH": "/usr/bin:/bin"}  # all that root processes of a sandbox get


def _env_file(env: dict[str, str]) -> int:
    """`env` as a shell file to source (`export K='v'` lines) in a memfd (see ENV_EXEC); names a shell cannot
    export are left out (Lambda's own rule, [A-Za-z][A-Za-z0-9_]+, excludes them anyway)."""
    lines = [
        f"export {k}='" + v.replace("'", "'\\''") + "'\n"
        for k, v in env.items()
        if k.isascii() and (k[:1].isalpha() or k[:1] == "_") and k.replace("_", "a").isalnum()
    ]
    fd = os.memfd_create("ember-env", os.MFD_CLOEXEC)
    os.write(fd, "".join(lines).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _seccomp_fd(program: bytes) -> int:
    """A fresh fd holding the filter (bwrap reads it to the end, so one per sandbox)."""
    fd = os.memfd_create("ember-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# `--isolation unshare`: runs as root, as pid 1 of the sandbox's new pid namespace, inside the new mount,
# net, ipc, uts and cgroup namespaces unshare(1) made: `python -I -S -c UNSHARE_HELPER CONFIG_JSON`.
# It builds the sandbox's root on a tmpfs (the same view as bwrap's: CONFIG["ops"]), pivots into it,
# makes every mount but /tmp and /proc read-only, reports its host pid (the netns to open the Runtime
# API listener in) on the info fd, waits for ember's go-ahead on the block fd, sets no_new_privs and
# the seccomp filter, and execs a shell as pid 1 that starts `setpriv ... -- ENV_EXEC RUNTIME` (the sandbox's
# uid, no groups, no capabilities, empty bounding set) and exits with its status, as bwrap does.
UNSHARE_HELPER = r"""
import ctypes, json, os, re, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.syscall.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
def ok(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
def mount(src, dst, fstype, flags, data=None):
    enc = lambda v: v.encode() if v is not None else None
    ok(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount %s" % dst)
host_pid = int(os.readlink("/proc/self"))  # still the host's /proc: ember's view of this process
os.umask(0)
mount(None, "/", None, REC | PRIVATE)
root = cfg["root"]
mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "mode=0755,size=1m")
def at(path):
    return root + path
def parent(path):
    os.makedirs(os.path.dirname(at(path)), 0o755, exist_ok=True)
for op in cfg["ops"]:
    kind, args = op[0], op[1:]
    if kind == "dir":
        os.makedirs(at(args[0]), int(args[1], 8), exist_ok=True)
    elif kind == "symlink":
        parent(args[1])
        os.symlink(args[0], at(args[1]))
    elif kind in ("bind", "bind-try"):
        src, dst = args
        if kind == "bind-try" and not os.path.exists(src):
            continue
        if os.path.isdir(src):
            os.makedirs(at(dst), 0o755, exist_ok=True)
        else:
            parent(dst)
            os.close(os.open(at(dst), os.O_CREAT | os.O_WRONLY, 0o644))
        mount(src, at(dst), None, BIND | REC)
    elif kind == "tmpfs":
        os.makedirs(at(args[0]), 0o755, exist_ok=True)
        mount("tmpfs", at(args[0]), "tmpfs", NOSUID | NODEV, "size=%s,mode=%s" % (args[1], args[2]))
    elif kind == "proc":
        os.makedirs(at("/proc"), 0o755, exist_ok=True)
        mount("proc", at("/proc"), "proc", NOSUID | NODEV | NOEXEC)  # this pid namespace's
    elif kind == "dev":
        os.makedirs(at("/dev"), 0o755, exist_ok=True)
        mount("tmpfs", at("/dev"), "tmpfs", NOSUID, "mode=0755,size=64k")
        for name in ("null", "zero", "full", "random", "urandom", "tty"):
            os.close(os.open(at("/dev/" + name), os.O_CREAT | os.O_WRONLY, 0o666))
            mount("/dev/" + name, at("/dev/" + name), None, BIND)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, at("/dev/" + name))
        os.mkdir(at("/dev/shm"), 0o1777)
# everything read-only but /tmp and /proc (their own flags kept; nothing is setuid in here)
writable = (at("/tmp"), at("/proc"))
flag_of = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC}
for line in open("/proc/self/mountinfo").read().splitlines():
    fields = line.split()
    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 is a space
    if not (point == root or point.startswith(root + "/")):
        continue
    if any(point == w or point.startswith(w + "/") for w in writable):
        continue
    flags = REMOUNT | BIND | RDONLY | NOSUID
    for opt in fields[5].split(","):
        flags |= flag_of.get(opt, 0)
    mount(None, point, None, flags)
ok(libc.sethostname(b"sandbox", 7), "sethostname")
import fcntl, socket, struct
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the new netns's loopback starts down
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", 0x1 | 0x8 | 0x40))  # SIOCSIFFLAGS: UP LOOPBACK RUNNING
os.chdir(root)
ok(libc.syscall(cfg["pivot_root"], b".", b"."), "pivot_root")
ok(libc.umount2(b".", 2), "umount the host's root")  # MNT_DETACH
os.chdir("/var/task")
os.write(cfg["info_fd"], json.dumps({"child-pid": host_pid}).encode())
os.close(cfg["info_fd"])
if cfg["block_fd"] >= 0:
    if not os.read(cfg["block_fd"], 1):
        os._exit(1)  # ember gave up on this sandbox
    os.close(cfg["block_fd"])
ok(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
seccomp = bytes.fromhex(cfg["seccomp"])
if seccomp:
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(seccomp, len(seccomp))
    prog = Fprog(len(seccomp) // 8, ctypes.addressof(buf))
    ok(libc.prctl(22, 2, ctypes.addressof(prog), 0, 0), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
# fd 0 is the function's environment (an `_env_file`) and fd 1 the runtime's stdin, until the sandbox's uid
# sources the one and moves the other back (`ENV_EXEC`, cfg["runtime"]): nothing running as root here ever has
# the environment (LD_PRELOAD and the like), nor any command line. A shell's background command gets /dev/null
# as its stdin: it gets fd 0 on a spare fd (dash names fds 0-9), and pid 1 keeps none of it.
spare = min(set(range(3, 10)) - set(cfg["keep"]))
os.dup2(0, spare)
script = '"$@" 0<&%d %d<&- & exec 0</dev/null %d<&-; wait "$!"' % (spare, spare, spare)
argv = ["sh", "-c", script, "sh", *cfg["argv"], *cfg["runtime"], *sys.argv[2:]]
os.execve("/bin/sh", argv, {"PATH": "/usr/bin:/bin"})
"""
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def _enter(uid: int, cgroup_fds: list[int], pids_max: int, nofile: int, drop: bool, address_mb: int = 0) -> None:
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


_spawners: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    """Threads that fork sandboxes, living as long as ember: PR_SET_PDEATHSIG fires when the *thread*
    that forked a child ends, so these threads are never shut down."""
    global _spawners
    if _spawners is None:
        _spawners = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ember-spawn")
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

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


async def spawn_off_loop(argv: list[str], **kwargs: Any) -> SpawnedProcess:
    """subprocess.Popen on a spawner thread (the event loop only waits for the fork itself)."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_spawner(), functools.partial(subprocess.Popen, argv, **kwargs))
    try:
        popen = await asyncio.shield(fut)
    except asyncio.CancelledError:

        def reap(f: asyncio.Future[subprocess.Popen[bytes]]) -> None:
            if not f.cancelled() and f.exception() is None:
                process = SpawnedProcess(f.result(), loop)  # its exit is then reaped by the reader
                with contextlib.suppress(OSError):
                    if kwargs.get("start_new_session"):
                        os.killpg(process.pid, signal.SIGKILL)  # bwrap's pid 1 too (see Jail.pgid)
                    else:
                        process.kill()

        fut.add_done_callback(reap)
        raise
    return SpawnedProcess(popen, loop)


def die_with_ember(sig: int = signal.SIGKILL) -> None:
    """preexec_fn of ember's helper processes: `sig` when ember dies (the zygote takes SIGTERM, to
    stop its runtimes and reap them before it exits)."""
    _libc.prctl(_PR_SET_PDEATHSIG, int(sig))


INIT_EXIT_TIMEOUT_S = 5.0


async def _until_exited(pidfd: int, timeout_s: float, pid: int) -> bool:
    """Wait (bounded) until the process of `pidfd` has exited: the pidfd polls readable once it has."""
    if select.select([pidfd], [], [], 0)[0]:
        return True
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout_s)
        return True
    except TimeoutError:
        log.error("a sandbox's pid 1 did not exit", extra={"pid": pid})
        return False
    finally:
        loop.remove_reader(pidfd)


class Jail:
    """What one isolated sandbox holds on the host: a uid, a cgroup, maybe a directory; released
    exactly once, when the sandbox's process has exited."""

    def __init__(self, iso: Isolation, uid: int, cgroup: Cgroup | None, child_pid: int = 0) -> None:
        self.iso = iso
        self.uid = uid
        self.cgroup = cgroup
        self.child_pid = child_pid  # pid 1 of the sandbox's pid namespace (bwrap's child)
        self.task_dir: Path | None = None  # a pooled sandbox's /var/task on the host
        # a pidfd of bwrap's pid 1 when bwrap is not in the cgroup (ember.sandbox.zygote): killed with the rest
        # (killing bwrap alone does not end its pid 1, whatever --die-with-parent says)
        self.init_pidfd = -1
        # bwrap's process group when bwrap is not in the cgroup: its pid 1 waits for bwrap's go-ahead on an
        # eventfd, and stays stuck there if bwrap is killed first; the group outlives bwrap, not its pid 1
        self.pgid = -1
        self.oom = False
        self._released = False

    def kill(self) -> None:
        if self.pgid > 0:
            with contextlib.suppress(OSError):
                os.killpg(self.pgid, signal.SIGKILL)
        if self.init_pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)  # its pid namespace goes with it
        if self.cgroup is not None:
            self.cgroup.kill()

    def max_memory_mb(self) -> int:
        return self.cgroup.peak_mb() if self.cgroup is not None else 0

    async def exited(self, returncode: int) -> int:
        """The sandbox's main process is gone: kill what is left, note an OOM kill, release.
        Returns the status to report: bwrap exits 128+N when the runtime died of signal N."""
        if self.iso.mode in ("bwrap", "unshare") and returncode > 128 and returncode - 128 in (6, 9, 11, 15):
            returncode = -(returncode - 128)
        await self.release()
        return returncode

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self.init_pidfd >= 0 or self.pgid > 0:
            self.kill()
            self.pgid = -1
            if self.init_pidfd >= 0:
                # gone, not just killed: a dying pid 1 waits until everything in its pid namespace
                # has been reaped (a forked runtime is reaped by its keeper or the zygote, not by it)
                await _until_exited(self.init_pidfd, INIT_EXIT_TIMEOUT_S, self.child_pid)
                os.close(self.init_pidfd)
                self.init_pidfd = -1
        # bwrap's process group when bwrap is not in the cgroup: its pid 1 waits for bwrap's go-ahead on an
        # eventfd, and stays stuck there if bwrap is killed first; the group outlives bwrap, not its pid 1
        self.pgid = -1
        if self.cgroup is not None:
            self.oom = self.cgroup.oom_killed()
            for _ in range(1000):  # a fork bomb's last processes take a moment to exit
                if self.cgroup.remove(timeout_s=0):
                    break
                await asyncio.sleep(0.005)
            else:
                log.error("sandbox cgroup still busy", extra={"cgroup": str(self.cgroup.dirs)})
        if self.task_dir is not None:
            shutil.rmtree(self.task_dir, ignore_errors=True)
        if self.uid >= 0 and self.iso.uids is not None:
            self.iso.uids.give_back(self.uid)


class Isolation:
    """Starts sandboxes isolated, per the mode chosen at startup; owns the uid range, the cgroups
    and the pool of pre-started runtimes."""

    def __init__(self, cfg: IsolationConfig, data_dir: Path) -> None:
        self.cfg = cfg
        self.data_dir = data_dir.resolve()
        # EMBER_BWRAP / EMBER_UNSHARE: another binary (or a missing one, to test the fallbacks)
        self.bwrap = os.environ.get("EMBER_BWRAP") or shutil.which("bwrap") or ""
        self.unshare = os.environ.get("EMBER_UNSHARE") or shutil.which("unshare") or ""
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        self.root = os.geteuid() == 0
        self.mode = self._choose(cfg.mode)
        self.cgroups: Cgroups | None = None
        self.uids: UidRange | None = None
        self.pool: Pool | None = None
        self._static_args: list[str] = []
        self._seccomp = seccomp_program() if os.uname().machine == "x86_64" else b""
        self.warning = ""

    def _choose(self, wanted: str) -> str:
        if wanted not in ("auto", "bwrap", "unshare", "none"):
            raise ValueError(f"unknown isolation mode {wanted!r} (auto, bwrap, unshare or none)")
        if wanted == "none":
            return "none"
        if wanted in ("auto", "bwrap"):
            usable = bool(self.bwrap) and self.root and _bwrap_works(self.bwrap)
            if usable:
                return "bwrap"
            if wanted == "bwrap":
                raise RuntimeError("--isolation bwrap: bubblewrap is missing or unusable (or ember is not root)")
        usable = bool(self.unshare) and self.root and _unshare_works(self.unshare, self.setpriv)
        if usable and os.uname().machine in _PIVOT_ROOT:
            return "unshare"
        if wanted == "unshare":
            raise RuntimeError("--isolation unshare: unshare/setpriv are missing or unusable (or ember is not root)")
        return "none"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.root:
            self.cgroups = Cgroups.detect()
            if self.cgroups is not None:
                try:
                    self.cgroups.setup()
                except OSError as exc:
                    log.warning("cgroups unusable", extra={"error": str(exc)})
                    self.cgroups = None
            self.uids = UidRange()
        if self.mode in ("bwrap", "unshare"):
            self._prepare_bwrap()
        if self.mode == "unshare":
            self._prepare_unshare()
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
        if self.warning:
            log.warning(self.warning, extra={"isolation": self.describe()})
            print(f"ember: {self.warning} (isolation: {self.describe()})", file=sys.stderr, flush=True)
        if self.mode == "bwrap" and self.cfg.pool > 0:
            from ember.sandbox.pool import Pool

            self.pool = Pool(self, self.cfg.pool)
            await self.pool.start()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.cgroups is not None:
            self.cgroups.close()
        if self.uids is not None:
            self.uids.close()

    def describe(self) -> str:
        """For /health: e.g. `bwrap+cgroup-v1`, or `none (WARNING ...)`."""
        name = self.mode + (f"+{self.cgroups.name}" if self.cgroups is not None else "")
        return f"{name} ({self.warning})" if self.warning else name

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.describe(), "ephemeral_mb": self.cfg.ephemeral_mb}
        if self.pool is not None:
            out["pool"] = self.pool.stats()
        return out

    # ------------------------------------------------------------------ bwrap

    def _prepare_bwrap(self) -> None:
        """The part of every sandbox's view that is the same for all: system dirs, a few files of
        /etc, the interpreter (its prefix and the venv, wherever they are)."""
        args: list[str] = []
        for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for name in ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        runtime_dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
        # A runtime under /tmp (a checkout there) is bound elsewhere, so the sandbox's /tmp stays its
        # own and empty; argv naming it is rewritten in `spawn` (a venv finds itself from argv[0]).
        self._moved = {d: f"/opt/ember-runtime/{i}" for i, d in enumerate(sorted(runtime_dirs)) if _under_tmp(d)}
        if _under_tmp(sys.prefix) and sys.prefix not in self._moved:
            self._moved[sys.prefix] = self._moved.get(os.path.realpath(sys.prefix), "/opt/ember-runtime/venv")
        mounted = set()
        for d in sorted(runtime_dirs):
            if d == "/usr" or d.startswith("/usr/"):
                continue
            target = self._moved.get(d, d)
            args += ["--ro-bind", d, target]
            mounted.add(target)
        if os.path.realpath(sys.prefix) != sys.prefix and sys.prefix not in self._moved:
            args += ["--symlink", os.path.realpath(sys.prefix), sys.prefix]  # keep the venv's own path valid
        runtime_dirs = mounted
        # bwrap makes missing parents of mount points 0700 (root's): let the sandbox's uid pass through
        parents = {TASK_ROOT, "/etc", *runtime_dirs}
        ancestors = {str(a) for d in parents for a in Path(d).parents if str(a) != "/"}
        ancestors |= {"/etc"}
        dirs: list[str] = []
        for d in sorted(ancestors, key=lambda p: (p.count("/"), p)):
            dirs += ["--perms", "0755", "--dir", d]
        self._static_args = dirs + args

    def bwrap_argv(
        self, uid: int, task_dir: str, info_fd: int, block_fd: int | None, seccomp_fd: int = -1
    ) -> list[str]:
        """bwrap runs as root (so it can bind what only root can reach, and the sandbox's uid is a
        real host uid rather than a user-namespace mapping of root); it keeps only CAP_SETUID and
        CAP_SETGID, which setpriv uses to become `uid` and which that change of uid drops. bwrap sets
        no_new_privs: nothing inside can gain privileges again (setuid files are inert)."""
        argv = [
            self.bwrap,
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try",
            "--die-with-parent", "--hostname", "sandbox", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            # /tmp first: the interpreter or venv may live under /tmp (a checkout there), and binds
            # made after the tmpfs stay visible on top of it
            "--size", str(self.cfg.ephemeral_mb * 1024 * 1024), "--perms", "1777", "--tmpfs", "/tmp",
            *self._static_args,
            "--proc", "/proc",
            "--dev", "/dev",
            "--ro-bind", task_dir, TASK_ROOT,
            "--remount-ro", "/dev",
            "--remount-ro", "/",
            "--chdir", TASK_ROOT,
            "--info-fd", str(info_fd),
        ]  # fmt: skip
        if block_fd is not None:
            argv += ["--block-fd", str(block_fd)]
        if seccomp_fd >= 0:
            argv += ["--seccomp", str(seccomp_fd)]
        drop = [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all"]
        return [*argv, "--", *drop, "--", *ENV_EXEC]

    # ------------------------------------------------------------------ unshare

    def _prepare_unshare(self) -> None:
        """bwrap's static view (`_static_args`) as the helper's operations, and an empty directory to
        mount each sandbox's root tmpfs on (only inside the sandbox's own mount namespace)."""
        ops: list[list[str]] = []
        args, mode = self._static_args, "0755"
        i = 0
        while i < len(args):
            flag = args[i]
            if flag == "--perms":
                mode, i = args[i + 1], i + 2
                continue
            if flag == "--dir":
                ops.append(["dir", args[i + 1], mode])
                i += 2
            elif flag in ("--symlink", "--ro-bind", "--ro-bind-try"):
                kind = {"--symlink": "symlink", "--ro-bind": "bind", "--ro-bind-try": "bind-try"}[flag]
                ops.append([kind, args[i + 1], args[i + 2]])
                i += 3
            else:
                raise AssertionError(f"unexpected bwrap argument {flag}")
            mode = "0755"
        self._unshare_ops = ops
        base = Path("/run/ember") if os.access("/run", os.W_OK) else Path("/tmp/ember-uids")
        self._unshare_root = base / "sandbox-root"
        self._unshare_root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def unshare_argv(self, uid: int, task_dir: str, info_fd: int, block_fd: int, keep: tuple[int, ...]) -> list[str]:
        """unshare(1) makes the namespaces (it dies with ember: its parent-death signal is set before
        exec, and --kill-child takes the sandbox's pid 1 with it); UNSHARE_HELPER does the rest."""
        ops = [
            ["tmpfs", "/tmp", str(self.cfg.ephemeral_mb * 1024 * 1024), "1777"],  # first, as for bwrap
            *self._unshare_ops,
            ["proc"],
            ["dev"],
            ["bind", task_dir, TASK_ROOT],
        ]
        drop = [
            self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs", "--",
        ]  # fmt: skip
        cfg = {
            "root": str(self._unshare_root),
            "ops": ops,
            "pivot_root": _PIVOT_ROOT[os.uname().machine],
            "info_fd": info_fd,
            "block_fd": block_fd,
            "seccomp": self._seccomp.hex(),
            "keep": list(keep),
            "argv": drop,
            "runtime": ENV_EXEC,
        }
        return [
            self.unshare, "--mount", "--pid", "--fork", "--ipc", "--uts", "--net", "--cgroup", "--kill-child",
            "--propagation", "private", "--",
            sys.executable, "-I", "-S", "-c", UNSHARE_HELPER, orjson.dumps(cfg).decode(),
        ]  # fmt: skip

    def inside(self, argv: list[str]) -> list[str]:
        """argv as the sandbox sees paths: a runtime bound away from /tmp is named at its new place."""
        moved = getattr(self, "_moved", None)
        if not moved:
            return argv
        out = []
        for arg in argv:
            for src, dst in moved.items():
                if arg == src or arg.startswith(src + "/"):
                    arg = dst + arg[len(src) :]
                    break
            out.append(arg)
        return out

    async def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        task_dir: str,
        memory_mb: int,
        out_fd: int,
        stdin: int | None = None,
        extra_fds: tuple[int, ...] = (),
        block: bool = True,
        join_cgroup: bool = True,
    ) -> tuple[SpawnedProcess, Jail, int]:
        """Start `argv` in a new sandbox; returns the process, its jail, and (when `block`) the fd to
        write to let the runtime run (after its Runtime API listener exists), else -1. `join_cgroup`
        False: bwrap and `argv` stay out of the sandbox's cgroup (which is still made and limited), have
        no rlimits and do not die with ember themselves, for a payload that runs no function code and
        ends with its runtime (ember.sandbox.zygote: the runtime it forks goes into the cgroup, with the rlimits,
        and dies with its keeper, which dies with the zygote, which dies with ember)."""
        assert self.uids is not None
        uid = self.uids.take()
        cgroup = self.cgroups.create() if self.cgroups is not None else None
        jail = Jail(self, uid, cgroup)
        fds: list[int] = []
        block_w = -1
        try:
            if cgroup is not None:
                cgroup.limit(memory_mb, self.cfg.pids_max)
                if join_cgroup:
                    fds += cgroup.open_procs()
            info_r, info_w = os.pipe2(os.O_CLOEXEC)
            fds += [info_r, info_w]
            unshare = self.mode == "unshare"  # the helper takes the filter in its config, not as an fd
            seccomp_fd = _seccomp_fd(self._seccomp) if self._seccomp and not unshare else -1
            if seccomp_fd >= 0:
                fds.append(seccomp_fd)
            block_r = -1
            if block:
                block_r, block_w = os.pipe2(os.O_CLOEXEC)
                fds.append(block_r)
            env_fd = _env_file(env)  # to the sandbox's uid only: see ENV_EXEC
            fds.append(env_fd)
            if unshare:
                head = self.unshare_argv(uid, task_dir, info_w, block_r, extra_fds)
            else:
                head = self.bwrap_argv(uid, task_dir, info_w, block_r if block else None, seccomp_fd)
            process = await spawn_off_loop(
                [*head, *self.inside(argv)],
                cwd="/",
                env=dict(ENV_PATH),
                stdin=env_fd,
                stdout=stdin if stdin is not None else subprocess.DEVNULL,  # ENV_EXEC moves them back
                stderr=out_fd,
                start_new_session=True,
                pass_fds=tuple(fd for fd in (info_w, block_r, seccomp_fd, *extra_fds) if fd >= 0),
                # none when there is nothing to do in the child: Popen then uses vfork, and ember (a
                # large process) is neither copied nor write-faulted page by page afterwards
                preexec_fn=functools.partial(
                    _enter, uid, fds[: len(cgroup.dirs)] if cgroup else [], self.cfg.pids_max, self.cfg.nofile, False
                )
                if join_cgroup
                else None,
            )
            if not join_cgroup:
                jail.pgid = process.pid  # start_new_session: its own group
            for fd in fds:
                if fd != info_r:
                    os.close(fd)
            fds = [info_r]
            info = await _read_json(info_r)
            jail.child_pid = int(info.get("child-pid", 0))
            if not jail.child_pid:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                raise OSError(errno.ENOEXEC, "the sandbox failed to start")
            return process, jail, block_w
        except BaseException:
            if block_w >= 0:
                os.close(block_w)
            await jail.release()
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def spawn_plain(
        self, argv: list[str], env: dict[str, str], cwd: str, memory_mb: int, out_fd: int
    ) -> tuple[asyncio.subprocess.Process, Jail]:
        """No namespaces: a plain process with rlimits (and a cgroup where ember can), as ember's uid:
        without a mount namespace another uid could not even read the code."""
        cgroup = self.cgroups.create() if self.cgroups is not None else None
        jail = Jail(self, -1, cgroup)
        fds: list[int] = []
        try:
            if cgroup is not None:
                cgroup.limit(memory_mb, self.cfg.pids_max)
                fds = cgroup.open_procs()
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_fd,
                stderr=out_fd,
                start_new_session=True,
                preexec_fn=functools.partial(
                    _enter, -1, fds, self.cfg.pids_max, self.cfg.nofile, False, 0 if cgroup else memory_mb
                ),
            )
            return process, jail
        except BaseException:
            await jail.release()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    # ------------------------------------------------------------------ SandboxProcess

    async def launch(self, proc: SandboxProcess) -> None:
        """SandboxProcess.launch when isolation is on: a pooled runtime when one fits, else a new
        sandbox. Failures to start are init failures, as for an unisolated sandbox."""
        from aiohttp import web

        spec = proc.spec
        proc._web = web.Server(proc._handle, access_log=None)
        argv, env = _inside(spec.argv, spec.env, spec.cwd)
        env["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{RUNTIME_API_PORT}"
        proc.spawned_at = time.perf_counter()
        try:
            if self.mode == "none":
                await self._launch_plain(proc)
                return
            _open_to_sandboxes(spec.cwd)
            handler = _python_handler(spec.argv)
            poolable = handler is not None and not any(k.startswith("PYTHON") and k != "PYTHONPATH" for k in env)
            pooled = self.pool.take() if self.pool is not None and poolable else None
            if pooled is None and self.pool is not None and poolable:
                pooled = await self.pool.fork_now()
            if pooled is not None:
                assert handler is not None
                await pooled.specialise(proc, spec.cwd, handler, env)
                return
            _check_entrypoint(spec.argv[0], spec.cwd)
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            proc._out_fd = read_fd
            try:
                process, jail, release = await self.spawn(argv, env, spec.cwd, spec.memory_mb, write_fd)
            finally:
                os.close(write_fd)
            proc.jail = jail
            proc._proc = process
            proc.pid = process.pid
            try:
                sock = listen_in_netns(jail.child_pid)
                proc._server = await proc.loop.create_server(proc._web, sock=sock)
                proc.port = RUNTIME_API_PORT
                os.write(release, b"go")
            finally:
                os.close(release)
            proc.loop.add_reader(read_fd, proc._on_output)
            proc.loop.create_task(proc._watch())
        except OSError as exc:
            await proc.spawn_failed(exc)

    async def _launch_plain(self, proc: SandboxProcess) -> None:
        spec = proc.spec
        proc._server = await proc.loop.create_server(proc._web, "127.0.0.1", 0)
        proc.port = proc._server.sockets[0].getsockname()[1]
        env = dict(spec.env)
        env["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{proc.port}"
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        proc._out_fd = read_fd
        try:
            process, jail = await self.spawn_plain(spec.argv, env, spec.cwd, spec.memory_mb, write_fd)
        finally:
            os.close(write_fd)
        proc.jail, proc._proc, proc.pid = jail, process, process.pid
        proc.loop.add_reader(read_fd, proc._on_output)
        proc.loop.create_task(proc._watch())


def _inside(argv: list[str], env: dict[str, str], code_dir: str) -> tuple[list[str], dict[str, str]]:
    """The launch spec as seen from inside the sandbox: the code dir is /var/task."""
    prefix = code_dir.rstrip("/") + "/"

    def fix(value: str) -> str:
        if value == code_dir:
            return TASK_ROOT
        return TASK_ROOT + "/" + value[len(prefix) :] if value.startswith(prefix) else value

    return [fix(a) for a in argv], {k: fix(v) for k, v in env.items()}


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


async def _read_json(fd: int) -> dict[str, Any]:
    """Read one JSON object from a pipe (bwrap's --info-fd); {} on EOF before it is complete."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        buf.extend(data)
        if (not data or buf.rstrip().endswith(b"}")) and not done.done():
            done.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(done, 10.0)
    finally:
        loop.remove_reader(fd)
    try:
        doc = orjson.loads(bytes(buf))
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


@functools.cache
def _under_tmp(path: str) -> bool:
    return path == "/tmp" or path.startswith("/tmp/")


def _bwrap_works(bwrap: str) -> bool:
    """Check once that bubblewrap can make namespaces here (some container hosts forbid it)."""
    import subprocess

    try:
        done = subprocess.run(
            [bwrap, "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/", "--", "/bin/true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    if done.returncode != 0:
        log.warning("bubblewrap does not work here", extra={"stderr": done.stderr.decode(errors="replace")})
    return done.returncode == 0


def _unshare_works(unshare: str, setpriv: str) -> bool:
    """Check once that unshare(1) can make the sandbox's namespaces and setpriv(1) can drop to a uid."""
    check = [
        unshare, "--mount", "--pid", "--fork", "--ipc", "--uts", "--net", "--cgroup", "--kill-child", "--",
        setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all", "--inh-caps=-all",
        "--ambient-caps=-all", "--no-new-privs", "--", "/bin/true",
    ]  # fmt: skip
    try:
        done = subprocess.run(check, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    if done.returncode != 0:
        log.warning("unshare/setpriv do not work here", extra={"stderr": done.stderr.decode(errors="replace")})
    return done.returncode == 0
