"""ember_devtools.netns: hosts on a fabric reach each other and the root namespace; a cut host's TCP
connections hang (time out) instead of failing fast, and come back after restore; close() and
cleanup_stale() leave nothing behind. Needs root and iproute2; in CI nothing skips.
No timing assertions: every wait is bounded and checks an outcome."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember_devtools import netns
from ember_devtools.netns import Fabric, Host, NetnsError, available, cleanup_stale

REASON = available()
pytestmark = pytest.mark.skipif(
    REASON is not None and os.environ.get("CI") != "true", reason=f"netns fabric unavailable: {REASON}"
)

PORT = 8080  # each host has its own namespace, so a fixed port cannot clash
# Longer than the ~3 s after which a failed ARP turns into EHOSTUNREACH: a "timeout" outcome within
# this window really is a silent drop, not a slow error.
HANG = 4.0
WAIT = 15.0  # bound on anything that should succeed

# Line echo server: one thread per connection, so an established connection can outlive a cut.
SERVER = f"""
import socket, threading
def serve(c):
    with c:
        f = c.makefile("rb")
        for line in f:
            c.sendall(line)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen()
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

# One connection attempt: prints ok, timeout, or error:<errno name>.
PROBE = """
import errno, socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.sendall(b"ping\\n")
        print("ok" if c.makefile("rb").readline() == b"ping\\n" else "bad reply")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print("error:" + errno.errorcode.get(exc.errno, str(exc)))
"""


def probe_argv(ip: str, port: int, timeout: float, host: Host | None = None) -> list[str]:
    argv = [sys.executable, "-c", PROBE, ip, str(port), str(timeout)]
    return host.exec_argv(argv) if host is not None else argv


def probe(ip: str, port: int, timeout: float = WAIT, host: Host | None = None) -> str:
    """Outcome of one connection from `host` (None: the root namespace) to ip:port."""
    out = subprocess.run(probe_argv(ip, port, timeout, host), capture_output=True, text=True, timeout=timeout + WAIT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


class RootEcho:
    """A line echo server in the root namespace on the bridge address, where etcd will listen."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.create_server((ip, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            for line in f:
                conn.sendall(line)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Net:
    fabric: Fabric
    a: Host
    b: Host
    c: Host
    root: RootEcho


def names() -> tuple[list[str], list[str]]:
    """(namespaces, root-namespace interfaces) on the machine now."""

    def run(*argv: str) -> list[str]:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()

    ns = [line.split()[0] for line in run("ip", "netns", "list") if line.strip()]
    return ns, [line.split(":")[1].strip().split("@")[0] for line in run("ip", "-o", "link", "show")]


def leftovers(prefix: str) -> list[str]:
    ns, links = names()
    return [n for n in ns + links if n == prefix or n.startswith((prefix + "-", prefix + "_"))]


@pytest.fixture(autouse=True)
def _required() -> None:
    if REASON is not None:
        pytest.fail(f"CI=true and the netns fabric is unavailable: {REASON}")


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    if REASON is not None:
        pytest.fail(f"netns fabric unavailable: {REASON}")
    cleanup_stale()
    with Fabric() as fabric:
        a, b, c = (fabric.add_host(n) for n in ("a", "b", "c"))
        server = subprocess.Popen(a.exec_argv([sys.executable, "-c", SERVER]), stdout=subprocess.PIPE, text=True)
        root = RootEcho(fabric.ip)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            yield Net(fabric, a, b, c, root)
        finally:
            root.close()
            server.kill()
            server.wait(WAIT)
    assert leftovers(fabric.prefix) == []


def flush_neighbours(net: Net) -> None:
    """Forget learned MAC addresses, so connections made during a cut must ARP first."""
    subprocess.run(["ip", "neigh", "flush", "dev", net.fabric.bridge], check=True)
    for host in (net.a, net.b, net.c):
        subprocess.run(["ip", "-n", host.netns, "neigh", "flush", "all"], check=True)


def read_line(sock: socket.socket) -> bytes:
    """One line from a raw socket (a makefile() reader is unusable after one timeout)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_hosts_reach_each_other_and_the_root_namespace(net: Net) -> None:
    assert probe(net.a.ip, PORT, host=net.b) == "ok"
    assert probe(net.a.ip, PORT) == "ok"  # root namespace -> host
    assert probe(net.fabric.ip, net.root.port, host=net.c) == "ok"  # host -> bridge address (etcd's)
    assert probe(net.fabric.ip, net.root.port, host=net.a) == "ok"


def test_cut_hangs_connections_and_restore_heals_them(net: Net) -> None:
    established = socket.create_connection((net.a.ip, PORT), timeout=WAIT)
    with established:
        established.sendall(b"before\n")
        assert read_line(established) == b"before\n"
        flush_neighbours(net)

        net.a.cut()
        try:
            attempts = {
                "b->a": subprocess.Popen(probe_argv(net.a.ip, PORT, HANG, net.b), stdout=subprocess.PIPE, text=True),
                "root->a": subprocess.Popen(probe_argv(net.a.ip, PORT, HANG), stdout=subprocess.PIPE, text=True),
                "a->root": subprocess.Popen(
                    probe_argv(net.fabric.ip, net.root.port, HANG, net.a), stdout=subprocess.PIPE, text=True
                ),
                "c->root": subprocess.Popen(
                    probe_argv(net.fabric.ip, net.root.port, HANG, net.c), stdout=subprocess.PIPE, text=True
                ),
            }
            established.settimeout(HANG)
            established.sendall(b"during\n")
            with pytest.raises(TimeoutError):
                read_line(established)
            outcomes = {k: p.communicate(timeout=HANG + WAIT)[0].strip() for k, p in attempts.items()}
        finally:
            net.a.restore()
        assert outcomes == {"b->a": "timeout", "root->a": "timeout", "a->root": "timeout", "c->root": "ok"}

        # The partition healed: the same connection delivers what was sent during the cut (TCP
        # retransmitted it), and new connections work.
        established.settimeout(WAIT)
        assert read_line(established) == b"during\n"
    assert probe(net.a.ip, PORT, host=net.b) == "ok"
    assert probe(net.a.ip, PORT) == "ok"
    assert probe(net.fabric.ip, net.root.port, host=net.a) == "ok"


def test_close_removes_everything_even_with_processes_inside() -> None:
    fabric = Fabric()
    x, y = fabric.add_host("x"), fabric.add_host("y")
    sleeper = subprocess.Popen(x.exec_argv(["sleep", "60"]))
    y.cut()
    assert len(leftovers(fabric.prefix)) == 5  # bridge, 2 veths, 2 namespaces
    fabric.close()
    assert sleeper.wait(WAIT) == -signal.SIGKILL
    assert leftovers(fabric.prefix) == []
    fabric.close()  # idempotent
    with pytest.raises(NetnsError, match="closed"):
        fabric.add_host("z")
    with pytest.raises(NetnsError, match="closed"):
        y.restore()


CRASHER = """
import time
from ember_devtools.netns import Fabric
f = Fabric()
f.add_host("w").cut()
f.add_host("v")
print(f.prefix, flush=True)
time.sleep(60)
"""


def test_cleanup_stale_removes_a_crashed_run_and_spares_live_ones(net: Net) -> None:
    crasher = subprocess.Popen([sys.executable, "-c", CRASHER], stdout=subprocess.PIPE, text=True)
    assert crasher.stdout is not None
    prefix = crasher.stdout.readline().strip()
    assert prefix and len(leftovers(prefix)) == 5
    assert not [r for r in cleanup_stale() if prefix in r]  # its owner is alive: nothing of it goes
    assert len(leftovers(prefix)) == 5
    crasher.kill()
    crasher.wait(WAIT)

    removed = [r for r in cleanup_stale() if prefix in r]  # (a concurrent run's crash may go too)
    assert sorted(removed) == sorted(
        [f"netns {prefix}-w", f"netns {prefix}-v", f"link {prefix}_0", f"link {prefix}_1", f"link {prefix}"]
    )
    assert leftovers(prefix) == []
    assert not [r for r in cleanup_stale() if prefix in r]
    assert len(leftovers(net.fabric.prefix)) == 7  # this process's fabric is untouched...
    assert probe(net.a.ip, PORT, host=net.b) == "ok"  # ...and works


def test_iptables_forward_rule_added_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where br_netfilter sends bridged frames through iptables (Docker's FORWARD DROP), the fabric adds
    an ACCEPT rule scoped to its bridge and removes it; stale ones go too. A fake iptables records calls."""
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "iptables"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in *-S*) printf -- "-P FORWARD DROP\\n-A FORWARD -i embdead -o embdead -j ACCEPT\\n";; esac\n'
    )
    fake.chmod(0o755)
    nf_call = tmp_path / "bridge-nf-call-iptables"
    nf_call.write_text("1\n")
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(netns, "BRIDGE_NF_CALL_IPTABLES", nf_call)

    with Fabric() as fabric:
        assert f"-w -I FORWARD -i {fabric.bridge} -o {fabric.bridge} -j ACCEPT" in log.read_text().splitlines()
    assert f"-w -D FORWARD -i {fabric.bridge} -o {fabric.bridge} -j ACCEPT" in log.read_text().splitlines()
    assert "iptables rule for embdead" in cleanup_stale()
    assert "-w -D FORWARD -i embdead -o embdead -j ACCEPT" in log.read_text().splitlines()

    nf_call.write_text("0\n")  # bridged frames skip iptables: no rule at all
    log.unlink()
    with Fabric():
        pass
    assert not log.exists()


def test_errors_are_clear(net: Net) -> None:
    with pytest.raises(ValueError, match="already exists"):
        net.fabric.add_host("a")
    with pytest.raises(ValueError, match="host name"):
        net.fabric.add_host("no/slash")
    with pytest.raises(ValueError, match="in use"):
        Fabric(subnet=net.fabric.network.network_address.packed[2])
    with pytest.raises(NetnsError, match=r"`\S*ip link del dev emb-nonexistent` failed \(exit \d+\): .*Cannot find"):
        netns._ip("link", "del", "dev", "emb-nonexistent")


def test_partial_failures_are_cleaned_up_and_close_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    real_ip = netns._ip
    failing: list[str] = []

    def flaky_ip(*args: str, ok_if: tuple[str, ...] = ()) -> str:
        if failing and re.search(failing[0], " ".join(args)):
            raise NetnsError(f"injected failure: {' '.join(args)}")
        return real_ip(*args, ok_if=ok_if)

    monkeypatch.setattr(netns, "_ip", flaky_ip)
    fabric = Fabric()
    failing.append(r"route add default")
    with pytest.raises(NetnsError, match="injected"):
        fabric.add_host("half")
    assert leftovers(fabric.prefix) == [fabric.bridge]  # the half-made host is gone
    failing.clear()
    fabric.add_host("whole")
    assert "half" not in fabric.hosts

    failing.append(rf"^link del dev {fabric.bridge}$")
    with pytest.raises(NetnsError, match=f"closing fabric {fabric.prefix}: injected"):
        fabric.close()
    assert leftovers(fabric.prefix) == [fabric.bridge]  # everything else went
    failing.clear()
    fabric.close()  # retries what is left
    assert leftovers(fabric.prefix) == []
