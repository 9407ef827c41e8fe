"""Jails: what makes a sandbox a sandbox. Each runs as its own unprivileged uid, in its own mount, pid,
ipc, uts, user and network namespaces, inside its own cgroup (ember.sandbox.cgroups), behind a seccomp
filter; this module builds the commands that make it so (bubblewrap's, or unshare(1)'s with the helper
ember.sandbox.unshare_helper) and the view each sandbox gets, starts them, and holds what each sandbox
owns on the host (a `Jail`: its uid, cgroup and directories) until it is released.

What a sandbox sees: its code read-only at /var/task, the runtime (the interpreter, its stdlib and
site-packages; /usr, /bin, /lib*, a few files of /etc) read-only, a private /tmp (tmpfs, capped at
`ephemeral_mb`), its own /proc, a minimal read-only /dev, and nothing else: not the data dir, not
other functions' code, not ember's files. Nothing outside /tmp is writable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import orjson

from ember.sandbox import runtimes
from ember.sandbox.cgroups import Cgroup, Cgroups
from ember.sandbox.egress import Egress, Link
from ember.sandbox.spawn import ChildProcess, SpawnedProcess, enter, read_json, spawn_off_loop, until_exited

log = logging.getLogger("ember.sandbox.jail")

TASK_ROOT = "/var/task"
UID_BASE = 200_000
UID_BLOCK = 4096  # uids per ember instance; instance k owns [UID_BASE + k*UID_BLOCK, +UID_BLOCK)
UID_BLOCKS = 1024
ETC_FILES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "hosts", "nsswitch.conf",
    "passwd", "group", "ssl", "ca-certificates", "mime.types", "protocols", "services", "os-release",
)  # fmt: skip
INIT_EXIT_TIMEOUT_S = 5.0
CHECK_TIMEOUT_S = 10.0  # the one-off checks that bwrap or unshare(1) work here
# `--isolation unshare`: the program that builds the sandbox (see the module); run as text, not imported
UNSHARE_HELPER = resources.files("ember.sandbox").joinpath("unshare_helper.py").read_text(encoding="utf-8")
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


@dataclass(slots=True)
class IsolationConfig:
    mode: str = "auto"  # auto | bwrap | unshare | none
    pool: int = 2  # pre-started python runtimes kept ready (0: none)
    ephemeral_mb: int = 512  # the size of each sandbox's /tmp (Lambda's default ephemeral storage)
    pids_max: int = 1024  # processes and threads per sandbox (Lambda's limit)
    nofile: int = 1024  # open files per process (Lambda's limit)
    network: str = "egress"  # egress | none (ember.sandbox.egress)
    deny_private: bool = False  # egress: also deny 10/8, 172.16/12, 192.168/16


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


class Jail:
    """What one isolated sandbox holds on the host: a uid, a cgroup, maybe a directory; released
    exactly once, when the sandbox's process has exited."""

    def __init__(self, jailer: Jailer, uid: int, cgroup: Cgroup | None, child_pid: int = 0) -> None:
        self.jailer = jailer
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
        self.link: Link | None = None  # its outbound network (ember.sandbox.egress), if it has one
        # setting that network up, while the runtime starts (see `network_ready`)
        self._attaching: asyncio.Task[Link] | None = None
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

    def attach_network(self, egress: Egress) -> None:
        """Start giving the sandbox its network (ember.sandbox.egress) in the background: it overlaps the
        runtime's start, and `network_ready` must be awaited before any function code may run."""
        self._attaching = asyncio.get_running_loop().create_task(egress.attach(self.child_pid))

    async def network_ready(self) -> None:
        """The sandbox's network is set up (its denials in place), or EgressError saying why not."""
        if self._attaching is not None:
            self.link = await asyncio.shield(self._attaching)

    def max_memory_mb(self) -> int:
        return self.cgroup.peak_mb() if self.cgroup is not None else 0

    async def exited(self, returncode: int) -> int:
        """The sandbox's main process is gone: kill what is left, note an OOM kill, release.
        Returns the status to report: bwrap exits 128+N when the runtime died of signal N."""
        if self.jailer.mode in ("bwrap", "unshare") and returncode > 128 and returncode - 128 in (6, 9, 11, 15):
            returncode = -(returncode - 128)
        await self.release()
        return returncode

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._attaching is not None:
            if not self._attaching.done():
                self._attaching.cancel()
                with contextlib.suppress(BaseException):
                    await self._attaching
            elif not self._attaching.cancelled() and self._attaching.exception() is None:
                self.link = self._attaching.result()
            self._attaching = None
        if self.link is not None:
            self.link.close()  # slirp4netns exits, its tap goes
            self.link = None
        if self.init_pidfd >= 0 or self.pgid > 0:
            self.kill()
            self.pgid = -1
            if self.init_pidfd >= 0:
                # gone, not just killed: a dying pid 1 waits until everything in its pid namespace
                # has been reaped (a forked runtime is reaped by its keeper or the zygote, not by it)
                await until_exited(self.init_pidfd, INIT_EXIT_TIMEOUT_S, self.child_pid)
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
        if self.uid >= 0 and self.jailer.uids is not None:
            self.jailer.uids.give_back(self.uid)


class Jailer:
    """Makes jails, per the mode chosen at startup (bwrap, unshare or none): owns the uid range, the
    cgroups, the seccomp filter and the view every sandbox shares."""

    def __init__(self, cfg: IsolationConfig) -> None:
        self.cfg = cfg
        # EMBER_BWRAP / EMBER_UNSHARE: another binary (or a missing one, to test the fallbacks)
        self.bwrap = os.environ.get("EMBER_BWRAP") or shutil.which("bwrap") or ""
        self.unshare = os.environ.get("EMBER_UNSHARE") or shutil.which("unshare") or ""
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        self.root = os.geteuid() == 0
        self.mode = self._choose(cfg.mode)
        self.cgroups: Cgroups | None = None
        self.uids: UidRange | None = None
        self._static_args: list[str] = []
        self._moved: dict[str, str] = {}  # runtime dirs under /tmp -> where the sandbox sees them
        self._unshare_ops: list[list[str]] = []
        self._unshare_root = Path()
        self.seccomp = seccomp_program() if os.uname().machine == "x86_64" else b""
        self.egress = Egress(cfg.network, cfg.deny_private)
        self.network_warning = ""

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

    def start(self) -> None:
        """ember's cgroups and uid block (as root), and the shared view of the sandboxes."""
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
            why = self.egress.usable()
            if why:
                self.network_warning = f"WARNING: --network egress but {why}: sandboxes have no network"
                self.egress.mode = "none"
            self.egress.start(_run_dir())
            self._prepare_bwrap()
        if self.mode == "unshare":
            self._prepare_unshare()

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()
        if self.uids is not None:
            self.uids.close()

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
        runtime_dirs |= runtimes.node_prefix_outside_usr()  # a node installed elsewhere, at its own path
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
        # node's runtime client (ember.sandbox.runtimes) where Lambda keeps its runtime: not ember's source dir
        args += ["--ro-bind", runtimes.NODE_CLIENT_DIR, runtimes.IN_SANDBOX]
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
        self, uid: int, task_dir: str, info_fd: int, block_fd: int | None, seccomp_fd: int = -1, network: bool = False
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
            *(["--ro-bind", str(self.egress.resolv_conf), "/etc/resolv.conf"] if network else []),
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
        self._unshare_root = _run_dir() / "sandbox-root"
        self._unshare_root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def unshare_argv(
        self, uid: int, task_dir: str, info_fd: int, block_fd: int, keep: tuple[int, ...], network: bool = False
    ) -> list[str]:
        """unshare(1) makes the namespaces (it dies with ember: its parent-death signal is set before
        exec, and --kill-child takes the sandbox's pid 1 with it); UNSHARE_HELPER does the rest."""
        ops = [
            ["tmpfs", "/tmp", str(self.cfg.ephemeral_mb * 1024 * 1024), "1777"],  # first, as for bwrap
            *self._unshare_ops,
            ["proc"],
            ["dev"],
            ["bind", task_dir, TASK_ROOT],
            *([["bind", str(self.egress.resolv_conf), "/etc/resolv.conf"]] if network else []),
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
            "seccomp": self.seccomp.hex(),
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
        moved = self._moved
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
        network: bool = False,
    ) -> tuple[SpawnedProcess, Jail, int]:
        """Start `argv` in a new sandbox; returns the process, its jail, and (when `block`) the fd to
        write to let the runtime run (after its Runtime API listener exists), else -1. `join_cgroup`
        False: bwrap and `argv` stay out of the sandbox's cgroup (which is still made and limited), have
        no rlimits and do not die with ember themselves, for a payload that runs no function code and
        ends with its runtime (ember.sandbox.zygote: the runtime it forks goes into the cgroup, with the rlimits,
        and dies with its keeper, which dies with the zygote, which dies with ember). `network`: outbound
        network (ember.sandbox.egress), set up before the runtime may run."""
        assert self.uids is not None
        network = network and self.egress.mode == "egress"
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
            seccomp_fd = _seccomp_fd(self.seccomp) if self.seccomp and not unshare else -1
            if seccomp_fd >= 0:
                fds.append(seccomp_fd)
            block_r = -1
            if block:
                block_r, block_w = os.pipe2(os.O_CLOEXEC)
                fds.append(block_r)
            env_fd = _env_file(env)  # to the sandbox's uid only: see ENV_EXEC
            fds.append(env_fd)
            if unshare:
                head = self.unshare_argv(uid, task_dir, info_w, block_r, extra_fds, network)
            else:
                head = self.bwrap_argv(uid, task_dir, info_w, block_r if block else None, seccomp_fd, network)
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
                    enter, uid, fds[: len(cgroup.dirs)] if cgroup else [], self.cfg.pids_max, self.cfg.nofile, False
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
            info = await read_json(info_r)
            jail.child_pid = int(info.get("child-pid", 0))
            if not jail.child_pid:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                raise OSError(errno.ENOEXEC, "the sandbox failed to start")
            if network:
                jail.attach_network(self.egress)  # awaited (network_ready) before function code runs
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
    ) -> tuple[ChildProcess, Jail]:
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
                    enter, -1, fds, self.cfg.pids_max, self.cfg.nofile, False, 0 if cgroup else memory_mb
                ),
            )
            return process, jail
        except BaseException:
            await jail.release()
            raise
        finally:
            for fd in fds:
                os.close(fd)


def _run_dir() -> Path:
    """Where ember keeps host-side files of its sandboxes (outside any data dir)."""
    return Path("/run/ember") if os.access("/run", os.W_OK) else Path("/tmp/ember-uids")


@functools.cache
def _under_tmp(path: str) -> bool:
    return path == "/tmp" or path.startswith("/tmp/")


def _bwrap_works(bwrap: str) -> bool:
    """Check once that bubblewrap can make namespaces here (some container hosts forbid it)."""
    try:
        done = subprocess.run(
            [bwrap, "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/", "--", "/bin/true"],
            capture_output=True,
            timeout=CHECK_TIMEOUT_S,
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
        done = subprocess.run(check, capture_output=True, timeout=CHECK_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return False
    if done.returncode != 0:
        log.warning("unshare/setpriv do not work here", extra={"stderr": done.stderr.decode(errors="replace")})
    return done.returncode == 0
