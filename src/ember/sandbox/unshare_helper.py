"""`--isolation unshare`: the program that builds a sandbox after unshare(1) made its namespaces.

Not imported by ember: ember.sandbox.jail reads this file as text and runs it as
`python -I -S -c TEXT CONFIG_JSON RUNTIME_ARGS...`, as root, as pid 1 of the sandbox's new pid namespace,
inside the new mount, net, ipc, uts and cgroup namespaces unshare(1) made. So it imports nothing but the
standard library (no site, no ember). It builds the sandbox's root on a tmpfs (the same view as bwrap's:
CONFIG["ops"]), pivots into it, makes every mount but /tmp and /proc read-only, reports its host pid (the
netns to open the Runtime API listener in) on the info fd, waits for ember's go-ahead on the block fd, sets
no_new_privs and the seccomp filter, and execs a shell as pid 1 that starts `setpriv ... -- ENV_EXEC RUNTIME`
(the sandbox's uid, no groups, no capabilities, empty bounding set) and exits with its status, as bwrap does.

fd 0 is the function's environment (an env file) and fd 1 the runtime's stdin, until the sandbox's uid sources
the one and moves the other back (ENV_EXEC, CONFIG["runtime"]): nothing running as root here ever has the
environment (LD_PRELOAD and the like), nor any command line.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import socket
import struct
import sys

TYPE_CHECKING = False  # no `typing` import at run time: this starts every sandbox
if TYPE_CHECKING:
    from typing import Any

RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
ROOT_TMPFS = "mode=0755,size=1m"  # the new root: only mount points and symlinks live on it
DEV_TMPFS = "mode=0755,size=64k"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"))  # fmt: skip
WRITABLE = ("/tmp", "/proc")  # every other mount of the sandbox is made read-only
FLAG_OF = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC}  # mount options a read-only remount keeps
SPARE_FDS = range(3, 10)  # dash names fds 0-9 only
CONFIG_KEYS = {"root": str, "ops": list, "pivot_root": int, "info_fd": int, "block_fd": int, "seccomp": str,
               "keep": list, "argv": list, "runtime": list}  # fmt: skip
OPS = {"dir": 2, "symlink": 2, "bind": 2, "bind-try": 2, "tmpfs": 3, "proc": 0, "dev": 0}  # kind: arguments
# the shell that stays pid 1: the runtime runs in the background with fd 0 back from the spare fd
PID1_SCRIPT = '"$@" 0<&%d %d<&- & exec 0</dev/null %d<&-; wait "$!"'
ROOT_ENV = {"PATH": "/usr/bin:/bin"}


def parse_config(text: str) -> dict[str, Any]:
    """CONFIG_JSON, checked: every key of the right type, every op a known kind with its arguments."""
    cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise ValueError("the config is not an object")
    for key, kind in CONFIG_KEYS.items():
        if not isinstance(cfg.get(key), kind) or isinstance(cfg.get(key), bool):
            raise ValueError(f"config {key!r}: expected {kind.__name__}")
    for op in cfg["ops"]:
        if not (isinstance(op, list) and op and OPS.get(op[0]) == len(op) - 1):
            raise ValueError(f"bad op {op!r}")
        if not all(isinstance(arg, str) for arg in op):
            raise ValueError(f"bad op {op!r}")
    if not cfg["root"].startswith("/") or cfg["root"] == "/":
        raise ValueError("the root must be an absolute directory other than /")
    return cfg


def unescape(field: str) -> str:
    """A mount point as /proc/self/mountinfo writes it (\\040 is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def remounts(mountinfo: str, root: str, writable: tuple[str, ...] = WRITABLE) -> list[tuple[str, int]]:
    """The read-only remounts to make: every mount at or under `root` but those under `writable` (relative
    to root: their own flags kept), keeping nosuid, nodev and noexec, adding nosuid (nothing is setuid in
    here)."""
    keep = tuple(root + w for w in writable)
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        point = unescape(fields[4])
        if not under(point, root) or any(under(point, w) for w in keep):
            continue
        flags = REMOUNT | BIND | RDONLY | NOSUID
        for opt in fields[5].split(","):
            flags |= FLAG_OF.get(opt, 0)
        out.append((point, flags))
    return out


def spare_fd(keep: list[int]) -> int:
    """A free fd a shell can name, for fd 0 while pid 1 runs."""
    return min(set(SPARE_FDS) - set(keep))


def pid1_argv(cfg: dict[str, Any], runtime_args: list[str], spare: int) -> list[str]:
    """What pid 1 execs (/bin/sh): the runtime started by setpriv and ENV_EXEC, waited for."""
    script = PID1_SCRIPT % (spare, spare, spare)
    return ["sh", "-c", script, "sh", *cfg["argv"], *cfg["runtime"], *runtime_args]


def loopback_up_request() -> bytes:
    """SIOCSIFFLAGS's struct ifreq: lo UP LOOPBACK RUNNING (a new netns's loopback starts down)."""
    return struct.pack("16sH14x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING)


class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Sys:
    """The few libc calls the helper makes, each raising OSError on failure."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        libc.syscall.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]
        self.libc = libc

    @staticmethod
    def ok(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        def enc(v: str | None) -> bytes | None:
            return v.encode() if v is not None else None

        self.ok(self.libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {dst}")

    def sethostname(self, name: bytes) -> None:
        self.ok(self.libc.sethostname(name, len(name)), "sethostname")

    def pivot_root(self, nr: int) -> None:
        self.ok(self.libc.syscall(nr, b".", b"."), "pivot_root")

    def umount_detach(self, path: bytes) -> None:
        self.ok(self.libc.umount2(path, MNT_DETACH), "umount the host's root")

    def prctl(self, op: int, arg: int, what: str) -> None:
        self.ok(self.libc.prctl(op, arg, 0, 0, 0), what)


def build_root(sys_: Sys, root: str, ops: list[list[str]]) -> None:
    """The sandbox's view under `root` (a fresh tmpfs), op by op (ember.sandbox.jail: bwrap's static view)."""

    def at(path: str) -> str:
        return root + path

    def parent(path: str) -> None:
        os.makedirs(os.path.dirname(at(path)), 0o755, exist_ok=True)

    sys_.mount("tmpfs", root, "tmpfs", NOSUID | NODEV, ROOT_TMPFS)
    for op in ops:
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
            sys_.mount(src, at(dst), None, BIND | REC)
        elif kind == "tmpfs":
            os.makedirs(at(args[0]), 0o755, exist_ok=True)
            sys_.mount("tmpfs", at(args[0]), "tmpfs", NOSUID | NODEV, f"size={args[1]},mode={args[2]}")
        elif kind == "proc":
            os.makedirs(at("/proc"), 0o755, exist_ok=True)
            sys_.mount("proc", at("/proc"), "proc", NOSUID | NODEV | NOEXEC)  # this pid namespace's
        elif kind == "dev":
            os.makedirs(at("/dev"), 0o755, exist_ok=True)
            sys_.mount("tmpfs", at("/dev"), "tmpfs", NOSUID, DEV_TMPFS)
            for name in DEV_NODES:
                os.close(os.open(at("/dev/" + name), os.O_CREAT | os.O_WRONLY, 0o666))
                sys_.mount("/dev/" + name, at("/dev/" + name), None, BIND)
            for name, target in DEV_LINKS:
                os.symlink(target, at("/dev/" + name))
            os.mkdir(at("/dev/shm"), 0o1777)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv[1])
    sys_ = Sys()
    host_pid = int(os.readlink("/proc/self"))  # still the host's /proc: ember's view of this process
    os.umask(0)
    sys_.mount(None, "/", None, REC | PRIVATE)
    root = cfg["root"]
    build_root(sys_, root, cfg["ops"])
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    for point, flags in remounts(mountinfo, root):
        sys_.mount(None, point, None, flags)
    sys_.sethostname(b"sandbox")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, loopback_up_request())
    os.chdir(root)
    sys_.pivot_root(cfg["pivot_root"])
    sys_.umount_detach(b".")
    os.chdir("/var/task")
    os.write(cfg["info_fd"], json.dumps({"child-pid": host_pid}).encode())
    os.close(cfg["info_fd"])
    if cfg["block_fd"] >= 0:
        if not os.read(cfg["block_fd"], 1):
            os._exit(1)  # ember gave up on this sandbox
        os.close(cfg["block_fd"])
    sys_.prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
    seccomp = bytes.fromhex(cfg["seccomp"])
    if seccomp:
        buf = ctypes.create_string_buffer(seccomp, len(seccomp))
        prog = Fprog(len(seccomp) // 8, ctypes.addressof(buf))
        sys_.ok(sys_.libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0), "seccomp")
    # A shell's background command gets /dev/null as its stdin: it gets fd 0 on a spare fd, and pid 1
    # keeps none of it.
    spare = spare_fd(cfg["keep"])
    os.dup2(0, spare)
    os.execve("/bin/sh", pid1_argv(cfg, argv[2:], spare), ROOT_ENV)


if __name__ == "__main__":
    main(sys.argv)
