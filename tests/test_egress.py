"""Sandbox egress (ember.sandbox.egress, docs/decisions/0008): with isolation on, a function reaches the
outside (TCP, UDP, DNS) but none of the host's addresses, nor 169.254.0.0/16, nor (by flag) private ranges;
`--network none` and a function's EMBER_NETWORK=none keep today's loopback-only sandbox.

"The outside" is a test network namespace joined to the root namespace by a veth pair: the root side is
198.51.100.1 (a host address, like any other of the host's), the namespace holds 198.51.100.2 (TEST-NET-2:
public, never routed on the internet), 10.99.0.2 (private) and 169.254.77.77 (link-local), with an HTTP
server on each and a DNS server that answers every A query with 198.51.100.2. ember runs in a mount
namespace of its own whose /etc/resolv.conf names that DNS server, so slirp4netns's forwarder uses it.
Nothing here talks to an address outside this machine. In CI (CI=true) nothing skips."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EMBER, EmberServer, create, wait_for

NEEDS = ("bwrap", "unshare", "setpriv", "slirp4netns", "ip")
MISSING = [b for b in NEEDS if not shutil.which(b)]
pytestmark = pytest.mark.skipif(
    (os.geteuid() != 0 or bool(MISSING)) and os.environ.get("CI") != "true",
    reason=f"needs root and {', '.join(NEEDS)} (missing: {MISSING}; CI must have them)",
)

HOST_SIDE, OUTSIDE, PRIVATE, LINK_LOCAL = "198.51.100.1", "198.51.100.2", "10.99.0.2", "169.254.77.77"
HTTP_PORT = 8080

SERVER = r"""
import http.server, socket, socketserver, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("outside " + self.server.server_address[0]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
for addr in sys.argv[2:]:
    s = S((addr, int(sys.argv[1])), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()
def dns():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 53))
    while True:
        q, peer = u.recvfrom(512)
        end = q.index(b"\0", 12) + 5
        answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(sys.argv[2])
        u.sendto(q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x01\x00\x00\x00\x00" + q[12:end] + answer, peer)
threading.Thread(target=dns, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

PROBE = """
import json, socket, urllib.request
def try_(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        err = getattr(exc, "reason", exc)
        return {"ok": False, "error": type(err).__name__, "errno": getattr(err, "errno", None), "msg": str(err)}
def get(url):
    return urllib.request.urlopen(url, timeout=3).read().decode()
def connect(host, port):
    socket.create_connection((host, port), 2).close()
    return "connected"
def handler(event, context):
    out = {}
    for url in event.get("get", []):
        out["get " + url] = try_(lambda u=url: get(u))
    for host, port in event.get("connect", []):
        out["connect %s:%d" % (host, port)] = try_(lambda h=host, p=port: connect(h, p))
    for name in event.get("resolve", []):
        out["resolve " + name] = try_(lambda n=name: socket.gethostbyname(n))
    try:
        out["resolv.conf"] = open("/etc/resolv.conf").read()
    except OSError as exc:
        out["resolv.conf"] = None
    return out
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Outside:
    """The test's "internet": a namespace behind a veth, with HTTP and DNS servers (see the module)."""

    def __init__(self, base: Path) -> None:
        tag = secrets.token_hex(3)
        self.ns, self.veth = f"embeg{tag}", f"embeg{tag}"
        self.resolv = base / "resolv.conf"
        self.resolv.write_text(f"nameserver {OUTSIDE}\n")
        self.server: subprocess.Popen[str] | None = None

    def __enter__(self) -> Outside:
        try:
            _ip("netns", "add", self.ns)
            _ip("link", "add", self.veth, "type", "veth", "peer", "name", "peer0", "netns", self.ns)
            _ip("addr", "add", f"{HOST_SIDE}/24", "dev", self.veth)
            _ip("link", "set", self.veth, "up")
            for route in (PRIVATE, LINK_LOCAL):  # only these /32s: nothing of the host's own routing changes
                _ip("route", "add", f"{route}/32", "dev", self.veth)
            n = ["-n", self.ns]
            _ip(*n, "link", "set", "lo", "up")
            for addr in (f"{OUTSIDE}/24", f"{PRIVATE}/32", f"{LINK_LOCAL}/32"):
                _ip(*n, "addr", "add", addr, "dev", "peer0")
            _ip(*n, "link", "set", "peer0", "up")
            _ip(*n, "route", "add", "default", "dev", "peer0")
            self.server = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-c", SERVER, str(HTTP_PORT), OUTSIDE, PRIVATE,
                 LINK_LOCAL],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert self.server.stdout is not None
            assert self.server.stdout.readline().strip() == "ready"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class HostListener:
    """A service of the host on every address (as etcd or ember with --host 0.0.0.0 would be)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()


class ResolvServer(EmberServer):
    """`ember serve` in a mount namespace of its own whose /etc/resolv.conf is `resolv` (the test's DNS)."""

    def __init__(self, data_dir: Path, resolv: Path, *extra: str) -> None:
        super().__init__(data_dir, *extra)
        self.resolv = resolv

    def start(self) -> ResolvServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        wrap = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", wrap, str(self.resolv),
             *EMBER, "serve", "--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.ready_line = line.strip()
        if self.ready_line.partition(" (")[0] != f"ember listening on {self.url}":
            self.proc.kill()
            raise RuntimeError(f"ember did not start: {line!r}\n{self.log_path.read_text()}")
        return self


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    with Outside(tmp_path_factory.mktemp("outside")) as out:
        yield out


@pytest.fixture(scope="module")
def host_listener() -> HostListener:
    return HostListener()


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[3].split("/")[0] for line in out.splitlines()} - {"127.0.0.1"})


def probe(srv: EmberServer, name: str, event: dict, **kw: object) -> dict:
    lam = srv.client()
    create(lam, name, PROBE, Timeout=30, **kw)
    resp = lam.invoke(FunctionName=name, Payload=json.dumps(event))
    assert "FunctionError" not in resp, resp["Payload"].read()
    return json.loads(resp["Payload"].read())


CONFIGS = {
    "bwrap+pool": ["--isolation", "bwrap", "--pool", "2"],
    "bwrap": ["--isolation", "bwrap", "--pool", "0"],
    "unshare": ["--isolation", "unshare"],
}


@pytest.mark.parametrize("config", CONFIGS)
def test_egress_reaches_the_outside_and_nothing_of_the_host(
    config: str, outside: Outside, host_listener: HostListener, tmp_path: Path
) -> None:
    srv = ResolvServer(tmp_path / "data", outside.resolv, *CONFIGS[config]).start()
    try:
        health = json.loads(urllib.request.urlopen(srv.url + "/health").read())["isolation"]
        assert health["network"] == "egress", health
        hosts = host_addresses()
        assert HOST_SIDE in hosts
        for addr in hosts:  # the host's service is there for anyone on the host...
            socket.create_connection((addr, host_listener.port), 2).close()
        socket.create_connection((LINK_LOCAL, HTTP_PORT), 2).close()  # ...and so is the link-local server
        event = {
            "get": [
                f"http://{OUTSIDE}:{HTTP_PORT}/",
                f"http://{PRIVATE}:{HTTP_PORT}/",
                f"http://outside.test:{HTTP_PORT}/",
            ],
            "connect": [[a, host_listener.port] for a in hosts]
            + [[a, srv.port] for a in hosts]
            + [["127.0.0.1", srv.port], [LINK_LOCAL, HTTP_PORT], ["169.254.169.254", 80]]
            + [[f"100.127.255.{i}", host_listener.port] for i in (2, 3, 50)],  # slirp's own network
            "resolve": ["outside.test"],
        }
        out = probe(srv, "egress", event)
        assert out[f"get http://{OUTSIDE}:{HTTP_PORT}/"] == {"ok": True, "value": f"outside {OUTSIDE}"}, out
        assert out[f"get http://{PRIVATE}:{HTTP_PORT}/"] == {"ok": True, "value": f"outside {PRIVATE}"}, out
        assert out["resolve outside.test"] == {"ok": True, "value": OUTSIDE}, out
        assert out[f"get http://outside.test:{HTTP_PORT}/"]["ok"], out
        assert "nameserver 100.127.255.3" in out["resolv.conf"], out
        for addr in hosts:  # every address of the host: denied in the sandbox (EACCES: a prohibit route)
            for port in (host_listener.port, srv.port):
                got = out[f"connect {addr}:{port}"]
                assert not got["ok"] and got["errno"] == 13, (addr, port, got)
        assert not out[f"connect 127.0.0.1:{srv.port}"]["ok"], out  # the sandbox's own loopback
        for addr, port in ((LINK_LOCAL, HTTP_PORT), ("169.254.169.254", 80)):
            got = out[f"connect {addr}:{port}"]
            assert not got["ok"] and got["errno"] == 13, (addr, got)
        for i in (2, 3, 50):  # slirp's gateway is not a way to the host's loopback, nor anything else there
            assert not out[f"connect 100.127.255.{i}:{host_listener.port}"]["ok"], out
        # the Runtime API is unchanged: a second invoke of the same sandbox works
        assert "resolv.conf" in json.loads(srv.client().invoke(FunctionName="egress", Payload="{}")["Payload"].read())
        # a function that opts out has no network at all
        out = probe(
            srv, "offline", {"get": [f"http://{OUTSIDE}:{HTTP_PORT}/"]},
            Environment={"Variables": {"EMBER_NETWORK": "none"}},
        )  # fmt: skip
        assert not out[f"get http://{OUTSIDE}:{HTTP_PORT}/"]["ok"], out
        assert out["resolv.conf"] is None, out
    finally:
        srv.stop()
    assert wait_for(lambda: not _slirps_of(srv), 5), "slirp4netns left running"


def _slirps_of(srv: EmberServer) -> list[int]:
    """slirp4netns processes still running whose parent was `srv` (none once it stopped)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "slirp4netns":
                found.append(int(pid))
        except OSError:
            continue
    assert srv.proc is not None
    return [p for p in found if _ppid(p) == srv.proc.pid]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_deny_private_and_network_none(outside: Outside, tmp_path: Path) -> None:
    event = {"get": [f"http://{OUTSIDE}:{HTTP_PORT}/", f"http://{PRIVATE}:{HTTP_PORT}/"]}
    srv = EmberServer(tmp_path / "private", "--isolation", "bwrap", "--deny-private").start()
    try:
        out = probe(srv, "private", event)
        assert out[f"get http://{OUTSIDE}:{HTTP_PORT}/"]["ok"], out
        got = out[f"get http://{PRIVATE}:{HTTP_PORT}/"]
        assert not got["ok"] and got["errno"] == 13, out
    finally:
        srv.stop()
    for config in ("bwrap+pool", "unshare"):
        srv = EmberServer(tmp_path / f"none-{config}", *CONFIGS[config], "--network", "none").start()
        try:
            health = json.loads(urllib.request.urlopen(srv.url + "/health").read())["isolation"]
            assert health["network"] == "none", health
            out = probe(srv, "none", event, Environment={"Variables": {"EMBER_NETWORK": "egress"}})  # cannot opt in
            for url in event["get"]:
                assert not out["get " + url]["ok"], out
            assert out["resolv.conf"] is None, out
        finally:
            srv.stop()
