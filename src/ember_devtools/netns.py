"""Network namespaces for the cluster's fault-injection harness: one namespace per process, one bridge.

A `Fabric` is a Linux bridge in the root namespace plus one namespace per cluster process (`Host`),
each joined to the bridge by a veth pair. etcd stays in the root namespace and listens on the bridge
address; `Host.cut()` partitions one process from everyone else and `Host.restore()` heals it.

Addresses: the issue asked for "loopback-range addresses only", but 127.0.0.0/8 cannot be used on a
veth: the kernel treats it as martian on any interface but `lo` (dropped unless `route_localnet` is
switched on in every namespace, which also loosens the root namespace). 169.254.0.0/16 (link-local,
RFC 3927) is the closest thing: routers never forward it, so nothing leaves the machine; each fabric
takes one 169.254.X.0/24 (bridge .1, hosts .2 and up). Hosts get a default route via the bridge
address but the root namespace does not forward for them, so they reach only the fabric.

Cut semantics: a real partition drops packets silently, so TCP must HANG (retransmit, time out), not
fail fast. Setting the veth down or dropping every frame does not do that: ARP then fails and the
kernel reports EHOSTUNREACH to connect() after ~3 s (measured). netem is not always built in (it is
not on our test VMs). So `cut()` attaches a tc filter (clsact + classic BPF, direct action) to the
root-side veth, both directions, that drops IPv4 and IPv6 and lets ARP through: connects and
established connections hang, and after `restore()` the same connections carry on (TCP retransmits).

Leftovers: every link carries an alias naming its fabric and owner process (pid + start time);
`cleanup_stale()` removes whatever belongs to owners that are gone. Creation runs under a file lock
so a cleanup never sees a half-labelled fabric.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["Fabric", "Host", "NetnsError", "available", "cleanup_stale"]

DEFAULT_FAMILY = "emb"
ALIAS_TAG = "ember-netns"
HOST_IFNAME = "eth0"
READY_TIMEOUT = 5.0  # bound on waiting for a new bridge port to forward
COMMAND_TIMEOUT = 30.0
BRIDGE_NF_CALL_IPTABLES = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")

# Classic BPF for `tc filter ... bpf da bytecode`: A = skb->protocol; IPv4 or IPv6 -> TC_ACT_SHOT (2),
# anything else (ARP) -> TC_ACT_UNSPEC (-1, continue as if unfiltered). Needs only cls_bpf + clsact.
_SKF_AD_PROTOCOL = 0xFFFFF000
DROP_IP_BYTECODE = ",".join(
    [
        "5",
        f"40 0 0 {_SKF_AD_PROTOCOL}",  # ldh skb->protocol
        "21 2 0 2048",  # jeq 0x0800 -> drop
        "21 1 0 34525",  # jeq 0x86dd -> drop
        "6 0 0 4294967295",  # ret TC_ACT_UNSPEC
        "6 0 0 2",  # drop: ret TC_ACT_SHOT
    ]
)

_FAMILY_RE = re.compile(r"[a-z]{1,6}")
_FABRIC_RE = re.compile(r"[a-z]{1,6}[0-9a-f]{4}")
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_NOT_FOUND = ("Cannot find device", "No such file or directory", "Cannot find specified qdisc", "does not exist")


class NetnsError(RuntimeError):
    """A command failed (the message has the command and its stderr), or this machine cannot do it."""


def _run(argv: Sequence[str], *, ok_if: Sequence[str] = ()) -> str:
    """Run one command; raise NetnsError naming it unless it succeeded or failed with an `ok_if` message."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]}: not found ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"`{' '.join(argv)}` did not finish in {COMMAND_TIMEOUT:.0f} s") from exc
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if any(s in err for s in ok_if):
            return ""
        raise NetnsError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {err or proc.stdout.strip()}")
    return proc.stdout


def _ip(*args: str, ok_if: Sequence[str] = ()) -> str:
    return _run([_tool("ip"), *args], ok_if=ok_if)


def _tc(*args: str, ok_if: Sequence[str] = ()) -> str:
    return _run([_tool("tc"), *args], ok_if=ok_if)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise NetnsError(f"`{name}` not found: install iproute2")
    return path


def _basic_reason() -> str | None:
    if not os.path.exists("/proc/self/ns/net"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (creating namespaces, veths and bridges requires CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "tc"):
        try:
            _tool(tool)
        except NetnsError as exc:
            return str(exc)
    return None


def available() -> str | None:
    """Why fabrics cannot work here (not root, no iproute2, no netns/veth/bridge/cls_bpf support), or None.

    Builds a one-host fabric and cuts it, so whatever the kernel lacks shows up here and not mid-test.
    """
    if reason := _basic_reason():
        return reason
    try:
        with Fabric() as fabric:
            host = fabric.add_host("probe")
            host.cut()
            host.restore()
    except (NetnsError, OSError) as exc:
        return f"network namespace fabric unavailable: {exc}"
    return None


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialise creation and stale cleanup across processes, so cleanup never sees an unlabelled link."""
    directory = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/run")
    with open(directory / "ember-netns.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after "pid (comm)"


def _owner_token() -> str:
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _owner_alive(token: str) -> bool:
    pid, _, start = token.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == start


def _alias(fabric: str) -> str:
    return f"{ALIAS_TAG} fabric={fabric} owner={_owner_token()}"


def _parse_alias(alias: str) -> tuple[str, str] | None:
    """(fabric, owner token) from one of our aliases."""
    if not alias.startswith(ALIAS_TAG + " "):
        return None
    fields = dict(kv.partition("=")[::2] for kv in alias.split()[1:])
    if "fabric" not in fields or "owner" not in fields:
        return None
    return fields["fabric"], fields["owner"]


def _links() -> list[dict]:
    return json.loads(_ip("-j", "-d", "link", "show") or "[]")


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _kill_netns_processes(ns: str) -> None:
    """SIGKILL what still runs inside: it would keep the namespace alive, cut off and forgotten."""
    out = _ip("netns", "pids", ns, ok_if=_NOT_FOUND)
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _iptables() -> str | None:
    """iptables, when bridged frames pass through it here (bridge-nf-call-iptables=1) and it works."""
    path = shutil.which("iptables") or shutil.which("iptables", path="/usr/sbin:/sbin")
    if path is None:
        return None
    try:
        if BRIDGE_NF_CALL_IPTABLES.read_text().strip() != "1":
            return None
    except OSError:
        return None  # br_netfilter not loaded: bridged frames skip iptables
    try:
        _run([path, "-w", "-S", "FORWARD"])
    except NetnsError:
        return None  # no usable iptables: nothing there can filter the bridge either
    return path


def _forward_rule(bridge: str) -> list[str]:
    return ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]


class Host:
    """One namespace on the fabric: where one cluster process runs, with its own link to cut."""

    def __init__(self, fabric: Fabric, name: str, netns: str, ip: str, veth: str) -> None:
        self.fabric = fabric
        self.name = name
        self.netns = netns
        self.ip = ip
        self.veth = veth  # root-namespace end of the pair; the namespace end is `eth0`
        self.is_cut = False
        self._made: set[str] = set()  # "netns", "veth": what close() may remove

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, ip={self.ip!r}, cut={self.is_cut})"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this namespace (`ip netns exec`), for subprocess.Popen and friends."""
        return [_tool("ip"), "netns", "exec", self.netns, *argv]

    def cut(self) -> None:
        """Silently drop all IP traffic to and from this host (ARP still passes): TCP hangs, never resets."""
        self.fabric._check_open()
        _tc("qdisc", "add", "dev", self.veth, "clsact", ok_if=("File exists", "Exclusivity flag on"))
        for direction in ("ingress", "egress"):
            filt = ("pref", "1", "handle", "1", "bpf", "da", "bytecode", DROP_IP_BYTECODE)
            _tc("filter", "replace", "dev", self.veth, direction, *filt)
        self.is_cut = True

    def restore(self) -> None:
        """Undo `cut()`; connections that hung continue once TCP retransmits."""
        self.fabric._check_open()
        _tc("qdisc", "del", "dev", self.veth, "clsact", ok_if=(*_NOT_FOUND, "Invalid handle"))
        self.is_cut = False


class Fabric:
    """A bridge in the root namespace and one namespace per host on 169.254.X.0/24; close() removes all.

    `subnet` picks X (1..254, not 169: cloud metadata lives at 169.254.169.254); by default a random
    one that no address or route in the root namespace uses, so fabrics of concurrent runs do not
    clash. `family` prefixes every name (bridge `<family><4 hex>`, veths `<bridge>_<n>`, namespaces `<bridge>-<host>`).
    """

    def __init__(self, subnet: int | None = None, *, family: str = DEFAULT_FAMILY) -> None:
        if reason := _basic_reason():
            raise NetnsError(reason)
        if not _FAMILY_RE.fullmatch(family):
            raise ValueError(f"family must be 1-6 lowercase letters, not {family!r}")
        self.hosts: dict[str, Host] = {}
        self._made_hosts: list[Host] = []  # includes half-made ones whose removal failed: close() retries
        self._closed = False
        self._created_bridge = False
        self._iptables: str | None = None
        self._next_index = 0
        with _lock():
            self.prefix = self.bridge = self._unused_prefix(family)
            x = self._choose_subnet(subnet)
            self.network = ipaddress.IPv4Network(f"169.254.{x}.0/24")
            self.ip = str(self.network.network_address + 1)
            try:
                self._create_bridge()
            except BaseException:
                self.close()
                raise

    @property
    def bridge_ip(self) -> str:
        """The root namespace's address on the fabric (same as `ip`): where etcd listens."""
        return self.ip

    # -- setup

    @staticmethod
    def _unused_prefix(family: str) -> str:
        names = {link["ifname"] for link in _links()} | set(_netns_names())
        for _ in range(100):
            prefix = f"{family}{secrets.token_hex(2)}"
            if not any(n == prefix or n.startswith((prefix + "_", prefix + "-")) for n in names):
                return prefix
        raise NetnsError(f"no unused name prefix for family {family!r}")

    @staticmethod
    def _choose_subnet(subnet: int | None) -> int:
        used: set[int] = {169}  # 169.254.169.254 is the cloud metadata service
        link_local = ipaddress.IPv4Network("169.254.0.0/16")
        for entry in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
            for addr in entry.get("addr_info", []):
                ip = ipaddress.IPv4Address(addr["local"])
                if ip in link_local:
                    used.add(ip.packed[2])
        for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
            with contextlib.suppress(ValueError):
                net = ipaddress.IPv4Network(route.get("dst", ""), strict=False)
                if net.prefixlen >= 24 and net.subnet_of(link_local):
                    used.add(net.network_address.packed[2])
        if subnet is not None:
            if not 1 <= subnet <= 254:
                raise ValueError(f"subnet must be in 1..254 (169.254.X.0/24), not {subnet}")
            if subnet in used:
                raise ValueError(f"169.254.{subnet}.0/24 is already in use on this machine (or reserved)")
            return subnet
        free = [x for x in range(1, 255) if x not in used]
        if not free:
            raise NetnsError("every 169.254.X.0/24 is in use")
        return random.choice(free)

    def _create_bridge(self) -> None:
        mac = "02:" + ":".join(secrets.token_hex(1) for _ in range(5))  # fixed: a port must not change it
        _ip("link", "add", self.bridge, "address", mac, "type", "bridge")
        self._created_bridge = True
        _ip("link", "set", "dev", self.bridge, "alias", _alias(self.prefix))
        _ip("addr", "add", f"{self.ip}/{self.network.prefixlen}", "dev", self.bridge)
        _ip("link", "set", "dev", self.bridge, "up")
        # Docker sets FORWARD's policy to DROP, and with br_netfilter bridged frames traverse FORWARD.
        if (iptables := _iptables()) is not None:
            _run([iptables, "-w", "-I", *_forward_rule(self.bridge)])
            self._iptables = iptables

    def add_host(self, name: str) -> Host:
        """A new namespace `<prefix>-<name>` with eth0 at the next address, lo up, default route via the bridge."""
        self._check_open()
        if not _HOST_RE.fullmatch(name):
            raise ValueError(f"host name must match {_HOST_RE.pattern}, not {name!r}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists on this fabric")
        index = self._next_index
        ip = self.network.network_address + 2 + index
        if ip >= self.network.broadcast_address:
            raise NetnsError(f"fabric {self.prefix} is full ({index} hosts)")
        self._next_index += 1
        host = Host(self, name, f"{self.prefix}-{name}", str(ip), f"{self.prefix}_{index}")
        self._made_hosts.append(host)  # before creating anything, so close() can remove a half-made host
        try:
            with _lock():
                _ip("netns", "add", host.netns)
                host._made.add("netns")
                _ip("link", "add", host.veth, "type", "veth", "peer", "name", HOST_IFNAME, "netns", host.netns)
                host._made.add("veth")
                _ip("link", "set", "dev", host.veth, "alias", _alias(self.prefix))
            _ip("link", "set", "dev", host.veth, "master", self.bridge, "up")
            _ip("-n", host.netns, "link", "set", "dev", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/{self.network.prefixlen}", "dev", HOST_IFNAME)
            _ip("-n", host.netns, "link", "set", "dev", HOST_IFNAME, "up")
            _ip("-n", host.netns, "route", "add", "default", "via", self.ip)
            self._wait_forwarding(host.veth)
        except BaseException:
            self._remove_host(host, [])
            if not host._made:
                self._made_hosts.remove(host)
            raise
        self.hosts[name] = host
        return host

    def _wait_forwarding(self, veth: str) -> None:
        """The bridge enables a port asynchronously (carrier events): wait so the host is usable on return."""
        deadline = time.monotonic() + READY_TIMEOUT
        state = "?"
        while time.monotonic() < deadline:
            link = json.loads(_ip("-j", "-d", "link", "show", "dev", veth))[0]
            state = link.get("linkinfo", {}).get("info_slave_data", {}).get("state", "?")
            if link.get("operstate") == "UP" and state == "forwarding":
                return
            time.sleep(0.02)
        raise NetnsError(f"bridge port {veth} not forwarding after {READY_TIMEOUT:.0f} s (state {state})")

    # -- teardown

    def _check_open(self) -> None:
        if self._closed:
            raise NetnsError(f"fabric {self.prefix} is closed")

    @staticmethod
    def _remove_host(host: Host, errors: list[str]) -> None:
        """Remove what add_host made (only that): processes inside, the veth pair, the namespace.

        The root-side veth goes explicitly: a deleted namespace frees its devices asynchronously, and not
        at all while a process still holds it.
        """
        if "netns" in host._made:
            _attempt(errors, lambda: _kill_netns_processes(host.netns))
        if "veth" in host._made and _attempt(errors, lambda: _ip("link", "del", "dev", host.veth, ok_if=_NOT_FOUND)):
            host._made.discard("veth")
        if "netns" in host._made and _attempt(errors, lambda: _ip("netns", "del", host.netns, ok_if=_NOT_FOUND)):
            host._made.discard("netns")

    def close(self) -> None:
        """Remove every namespace (killing processes left inside), veth, iptables rule and the bridge.

        Keeps going past failures and raises one NetnsError listing them at the end; calling it again
        retries only what is left, and is a no-op once everything is gone.
        """
        self._closed = True
        errors: list[str] = []
        for host in self._made_hosts:
            self._remove_host(host, errors)
        self._made_hosts = [host for host in self._made_hosts if host._made]
        if (iptables := self._iptables) is not None:
            rule = _forward_rule(self.bridge)
            if _attempt(errors, lambda: _run([iptables, "-w", "-D", *rule], ok_if=("Bad rule", "does a matching"))):
                self._iptables = None
        if self._created_bridge and _attempt(errors, lambda: _ip("link", "del", "dev", self.bridge, ok_if=_NOT_FOUND)):
            self._created_bridge = False
        if errors:
            raise NetnsError(f"closing fabric {self.prefix}: " + "; ".join(errors))

    def __enter__(self) -> Fabric:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Fabric({self.prefix!r}, {self.network}, hosts={list(self.hosts)}, closed={self._closed})"


def _attempt(errors: list[str], step: Callable[[], object]) -> bool:
    """Run one teardown step; on failure note it and carry on with the rest."""
    try:
        step()
    except NetnsError as exc:
        errors.append(str(exc))
        return False
    return True


def _fabric_of(name: str) -> str | None:
    """The fabric id in a bridge (`emb1a2b`), veth (`emb1a2b_3`) or namespace (`emb1a2b-worker`) name."""
    fabric = re.split(r"[-_]", name, maxsplit=1)[0]
    return fabric if _FABRIC_RE.fullmatch(fabric) else None


def cleanup_stale(prefix: str = DEFAULT_FAMILY) -> list[str]:
    """Remove fabrics whose names start with `prefix` and whose owner process is gone; return what went.

    Fabrics of live processes (this one's included) are left alone, so concurrent runs can call it.
    """
    if reason := _basic_reason():
        raise NetnsError(reason)
    removed: list[str] = []
    with _lock():
        links = _links()
        live: set[str] = set()
        for link in links:
            parsed = _parse_alias(link.get("ifalias", ""))
            if parsed and _owner_alive(parsed[1]):
                live.add(parsed[0])

        def stale(name: str) -> bool:
            fabric = _fabric_of(name)
            return fabric is not None and fabric.startswith(prefix) and fabric not in live

        for ns in _netns_names():
            if stale(ns):
                _kill_netns_processes(ns)
                _ip("netns", "del", ns, ok_if=_NOT_FOUND)
                removed.append(f"netns {ns}")
        ours = [link for link in links if link.get("linkinfo", {}).get("info_kind") in ("veth", "bridge")]
        for link in sorted(ours, key=lambda lk: lk.get("linkinfo", {}).get("info_kind") == "bridge"):  # bridges last
            name = link["ifname"]
            parsed = _parse_alias(link.get("ifalias", ""))
            if parsed is not None and (parsed[0] in live or not parsed[0].startswith(prefix)):
                continue
            if stale(name):
                _ip("link", "del", "dev", name, ok_if=_NOT_FOUND)
                removed.append(f"link {name}")
        if (iptables := _iptables()) is not None:
            for line in _run([iptables, "-w", "-S", "FORWARD"]).splitlines():
                m = re.fullmatch(r"-A FORWARD -i (\S+) -o (\S+) -j ACCEPT", line.strip())
                if m and m[1] == m[2] and stale(m[1]):
                    _run([iptables, "-w", "-D", *_forward_rule(m[1])], ok_if=("Bad rule", "does a matching"))
                    removed.append(f"iptables rule for {m[1]}")
    return removed
