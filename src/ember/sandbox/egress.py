"""Outbound network for isolated sandboxes (docs/decisions/0008-sandbox-egress.md).

Each isolated sandbox has a network namespace of its own (ember.sandbox.jail). With `--network egress`
(the default) ember gives it, before anything of the runtime runs:
  - a tap interface driven by **slirp4netns** (a user-mode TCP/IP stack, one small process per sandbox,
    running in ember's namespaces): the sandbox is SANDBOX_ADDR in SLIRP_CIDR, its default route goes to
    slirp's gateway, and slirp turns each of its TCP connections and UDP flows into an ordinary socket
    of the host. `--disable-host-loopback`: slirp's gateway is not a way to the host's 127.0.0.1;
  - a resolver: DNS_ADDR, slirp's forwarder to the host's own nameservers (the sandbox's
    /etc/resolv.conf names it, RESOLV_CONF);
  - **prohibit routes** in the sandbox's namespace for every address it must not reach: every local and
    broadcast address of the host (ember's API, etcd, other sandboxes' Runtime APIs... whatever listens
    on the host), link-local 169.254.0.0/16 (instance metadata), multicast, and with `deny_private` also
    10/8, 172.16/12 and 192.168/16. connect() to them fails at once (EACCES) inside the sandbox, before
    a packet reaches slirp. The sandbox's uid has no capability in its namespace: it cannot change routes.

No firewall state is installed on the host and nothing outlives a sandbox: slirp4netns exits when its
exit pipe closes (ember releases the sandbox, or dies), and the tap device goes with it.
IPv4 only: the namespace has no IPv6 address or route.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

from ember.sandbox.spawn import SpawnedProcess, socket_in_netns, spawn_off_loop, until_loopback_up

log = logging.getLogger("ember.sandbox.egress")

NETWORK_MODES = ("egress", "none")
# A function's own choice (Environment.Variables): "none" takes it offline under an egress server; it
# cannot turn egress on when the operator said `--network none`.
NETWORK_ENV = "EMBER_NETWORK"
SLIRP_CIDR = "100.127.255.0/24"  # shared address space (RFC 6598): outside the private ranges denied by flag
SANDBOX_ADDR = "100.127.255.100"  # slirp's fixed guest address (.100), gateway .2
DNS_ADDR = "100.127.255.3"  # slirp's DNS forwarder (.3)
TAP_NAME = "eth0"
MTU = 65520
READY_TIMEOUT_S = 5.0
LINK_LOCAL = "169.254.0.0/16"
ALWAYS_DENIED = (LINK_LOCAL, "224.0.0.0/4", "240.0.0.0/4", "0.0.0.0/8")
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
FIB_TRIE = Path("/proc/net/fib_trie")

# rtnetlink: one RTM_NEWROUTE of type RTN_PROHIBIT per denied prefix
_RTM_NEWROUTE, _NLMSG_ERROR = 24, 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_RT_TABLE_MAIN, _RTPROT_STATIC, _RT_SCOPE_UNIVERSE, _RTN_PROHIBIT, _RTA_DST = 254, 4, 0, 8, 1


class EgressError(OSError):
    """The sandbox's network could not be set up (the message says why)."""


def host_addresses(fib_trie: str | None = None) -> list[str]:
    """Every local and broadcast IPv4 address of ember's network namespace (the host), from the kernel's
    FIB: what a `/32 host LOCAL` or `/32 link BROADCAST` leaf names. 127/8 is the sandbox's own loopback."""
    text = FIB_TRIE.read_text() if fib_trie is None else fib_trie
    found: set[str] = set()
    last = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|--") or s.startswith("+--"):
            last = s[3:].strip().split("/")[0]
        elif s.startswith("/32") and ("LOCAL" in s or "BROADCAST" in s) and last:
            found.add(last)
    return sorted(a for a in found if not a.startswith("127."))


def denied_prefixes(host: list[str], deny_private: bool) -> list[str]:
    """The prefixes a sandbox cannot reach, as CIDRs."""
    out = [f"{a}/32" for a in host if ipaddress.ip_address(a) not in ipaddress.ip_network(SLIRP_CIDR)]
    out += list(ALWAYS_DENIED)
    if deny_private:
        out += list(PRIVATE)
    return out


def prohibit_routes(prefixes: list[str], seq: int = 1) -> bytes:
    """rtnetlink requests adding a RTN_PROHIBIT route for each prefix to the main table."""
    msgs = []
    for i, cidr in enumerate(prefixes):
        net = ipaddress.ip_network(cidr)
        attr = struct.pack("=HH4s", 8, _RTA_DST, net.network_address.packed)
        rtm = struct.pack(
            "=BBBBBBBBI",
            socket.AF_INET, net.prefixlen, 0, 0, _RT_TABLE_MAIN, _RTPROT_STATIC, _RT_SCOPE_UNIVERSE, _RTN_PROHIBIT, 0,
        )  # fmt: skip
        body = rtm + attr
        flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
        msgs.append(struct.pack("=IHHII", 16 + len(body), _RTM_NEWROUTE, flags, seq + i, 0) + body)
    return b"".join(msgs)


def install_routes(pid: int, prefixes: list[str]) -> None:
    """Add the prohibit routes in the network namespace of `pid` (a netlink socket made inside it)."""
    sock = socket_in_netns(pid, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setblocking(True)
        sock.settimeout(READY_TIMEOUT_S)
        sock.sendall(prohibit_routes(prefixes))
        pending = len(prefixes)
        while pending:
            data = sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err:
                        raise EgressError(-err, f"adding a prohibit route: {os.strerror(-err)}")
                    pending -= 1
                off += max(16, (length + 3) & ~3)
    finally:
        sock.close()


class Link:
    """One sandbox's network: its slirp4netns process and the pipe whose closing stops it."""

    def __init__(self, process: SpawnedProcess, exit_w: int) -> None:
        self.process = process
        self._exit_w = exit_w

    def close(self) -> None:
        """slirp4netns exits on its own once the pipe is closed (the tap device goes with it)."""
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1


class Egress:
    """Gives sandboxes their network (see the module docstring): one per ember, shared by every sandbox."""

    def __init__(self, mode: str = "egress", deny_private: bool = False) -> None:
        if mode not in NETWORK_MODES:
            raise ValueError(f"unknown network mode {mode!r} (egress or none)")
        self.mode = mode
        self.deny_private = deny_private
        self.slirp = os.environ.get("EMBER_SLIRP4NETNS") or shutil.which("slirp4netns") or ""
        self.resolv_conf = Path()

    def usable(self) -> str | None:
        """Why egress cannot work here, or None."""
        if self.mode == "none":
            return None
        if not self.slirp or not os.access(self.slirp, os.X_OK):
            return "slirp4netns is not installed (Debian package slirp4netns)"
        return None

    def start(self, run_dir: Path) -> None:
        """Write the sandboxes' /etc/resolv.conf (bound read-only into each one with egress)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.resolv_conf = run_dir / "resolv.conf"
        tmp = run_dir / f".resolv.conf.{os.getpid()}"
        tmp.write_text(f"nameserver {DNS_ADDR}\noptions ndots:1 timeout:2 attempts:2\n")
        tmp.chmod(0o644)
        os.replace(tmp, self.resolv_conf)

    def wanted(self, env: dict[str, str]) -> bool:
        """Whether a sandbox with this function environment gets egress (see NETWORK_ENV)."""
        return self.mode == "egress" and env.get(NETWORK_ENV, "egress") != "none"

    async def attach(self, pid: int) -> Link:
        """Give the network namespace of `pid` its tap, route, resolver and denials; returns once the
        namespace is configured (slirp4netns's ready byte, then the routes)."""
        await _until_loopback_up(pid)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        exit_r, exit_w = os.pipe2(os.O_CLOEXEC)
        err_fd = os.memfd_create("ember-slirp-stderr", os.MFD_CLOEXEC)  # read back if it fails
        link: Link | None = None
        try:
            argv = [
                self.slirp, "--configure", f"--mtu={MTU}", "--disable-host-loopback", f"--cidr={SLIRP_CIDR}",
                "--enable-sandbox", "--enable-seccomp",
                f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", str(pid), TAP_NAME,
            ]  # fmt: skip
            process = await spawn_off_loop(
                argv,
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_fd,
                start_new_session=True,
                pass_fds=(ready_w, exit_r),
            )
            link = Link(process, exit_w)
            exit_w = -1
            os.close(ready_w)
            ready_w = -1
            os.close(exit_r)
            exit_r = -1
            if not await _read_byte(ready_r, READY_TIMEOUT_S):
                why = await _stderr_of(process, err_fd)
                raise EgressError(f"slirp4netns did not configure the sandbox's network: {why or 'no reason given'}")
            install_routes(pid, denied_prefixes(host_addresses(), self.deny_private))
            return link
        except BaseException:
            if link is not None:
                link.close()
                with contextlib.suppress(ProcessLookupError):
                    link.process.kill()
            raise
        finally:
            for fd in (ready_r, ready_w, exit_r, exit_w, err_fd):
                if fd >= 0:
                    os.close(fd)


async def _until_loopback_up(pid: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """bwrap reports the sandbox's pid before its child has set up the loopback (RTM_NEWADDR, then up),
    and fails if slirp4netns's --configure got there first. (The unshare helper brings it up before it
    reports.)"""
    try:
        await until_loopback_up(pid, timeout_s)
    except OSError as exc:
        raise EgressError(str(exc.strerror or exc)) from exc


async def _read_byte(fd: int, timeout_s: float) -> bool:
    """One byte on `fd` (True), or EOF / timeout (False)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    done: asyncio.Future[bool] = loop.create_future()

    def on_readable() -> None:
        try:
            data = os.read(fd, 16)
        except BlockingIOError:
            return
        if not done.done():
            done.set_result(bool(data))

    loop.add_reader(fd, on_readable)
    try:
        return await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def _stderr_of(process: SpawnedProcess, err_fd: int) -> str:
    """What a failed slirp4netns said (it is killed first if still running)."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(process.wait(), 2.0)
    try:
        return os.pread(err_fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""
