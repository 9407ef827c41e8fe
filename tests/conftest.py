"""Fixtures that run the real `ember serve` in a subprocess and talk to it with real clients."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
EMBER = [sys.executable, "-m", "ember.cli"]
ROLE = "arn:aws:iam::000000000000:role/ember-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmberServer:
    """One `ember serve` process on a free port with its own data dir."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = data_dir.parent / f"ember-{self.port}.log"

    def start(self) -> EmberServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*EMBER, "serve", "--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.ready_line = line.strip()
        if self.ready_line.partition(" (")[0] != f"ember listening on {self.url}":
            self.proc.kill()
            raise RuntimeError(f"ember did not start: {line!r}\n{self.log_path.read_text()}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def client(self, **config: object):
        return boto3.client(
            "lambda",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="AKIDEXAMPLE",
            aws_secret_access_key="secret",
            config=Config(
                retries={"max_attempts": 0},
                read_timeout=60,
                max_pool_connections=64,
                **config,  # type: ignore[arg-type]
            ),
        )

    def stderr(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmberServer]:
    srv = EmberServer(tmp_path / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def lam(server: EmberServer):
    return server.client()


def make_zip(files: dict[str, str], modes: dict[str, int] | None = None) -> bytes:
    """A zip of `files` (name -> source, dedented); `modes` sets unix permissions per name."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, body in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = ((modes or {}).get(name, 0o644) | 0o100000) << 16
            z.writestr(info, textwrap.dedent(body.lstrip("\n")))
    return buf.getvalue()


def create(lam, name: str, source: str, **kw: object) -> dict:
    """Create a python3.12 function whose app.py is `source`."""
    args: dict[str, object] = {
        "FunctionName": name,
        "Runtime": "python3.12",
        "Handler": "app.handler",
        "Role": ROLE,
        "Code": {"ZipFile": make_zip({"app.py": source})},
    }
    args.update(kw)
    return lam.create_function(**args)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
