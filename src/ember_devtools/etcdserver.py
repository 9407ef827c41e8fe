"""A real single-member etcd for tests, `ember cluster up` and the chaos harness: not part of the product,
which only ever connects to an etcd someone runs (ember.cluster.etcd)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from ember.cluster.etcd import loads

log = logging.getLogger("ember_devtools.etcdserver")


class EtcdServerError(RuntimeError):
    """A local etcd process did not start or stop as asked. The message carries its log's tail."""


# ------------------------------------------------------------------------------------- a local server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """A real single-member etcd (on 127.0.0.1 unless `host` says otherwise), for tests, `ember cluster
    up` and the chaos harness.

    Ports are chosen free unless given and kept across `restart()`, like the data dir, so a
    restarted member is the same member with the same data. Sync API (usable as a context manager)
    because the tests and the CLI drive it from sync code; `start()` blocks until /health answers.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "ember",
        binary: str = "etcd",
        start_timeout: float = 15.0,
        log_path: Path | str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        assert self.client_port != self.peer_port
        self.name = name
        self.binary = binary
        self.start_timeout = start_timeout
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}.etcd.log"
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, http://HOST:PORT."""
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self.extra_args,
        ]  # fmt: skip

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Start etcd and wait (bounded by start_timeout) until it reports healthy."""
        assert not self.running, f"etcd at {self.url} already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            try:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            except FileNotFoundError as e:
                raise EtcdServerError(f"etcd binary {self.binary!r} not found (install etcd-server)") from e
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdServerError(f"etcd at {self.url} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.kill()
        raise EtcdServerError(f"etcd at {self.url} not healthy within {self.start_timeout}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """etcd's /health says true (it has a leader and serves)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as r:
                return bool(loads(r.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to timeout, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("etcd at %s ignored SIGTERM for %.1fs; killing", self.url, timeout)
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (no clean shutdown)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (or kill) if running, then start the same member: same name, data dir and ports."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
