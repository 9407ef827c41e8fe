"""A whole cluster on this machine: etcd plus frontends, assigners and workers, one process each.

`ember cluster up` uses it to let you try cluster mode; the chaos harness uses it to kill, pause and
restart processes (and, with a `netns` fabric, to cut their links). Each process is `ember serve
--role ...` with its own data dir under `base`, its output in `<name>.log`; it counts as started
when it prints its `listening on URL` line.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ember_devtools.etcdserver import EtcdServer

START_TIMEOUT_S = 30.0
LISTEN_RE = re.compile(rb"listening on (http://\S+)")


@dataclass
class Proc:
    name: str  # a1, w2, f1 ...
    role: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    url: str = ""
    host: Any = None  # a netns host, when the cluster runs on a fabric

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else 0

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class LocalCluster:
    base: Path
    assigners: int = 3
    workers: int = 3
    frontends: int = 2
    partitions: int = 4
    lease_ttl: float = 2.0
    isolation: str = "auto"
    pool: int = 2
    fabric: Any = None  # ember_devtools.netns fabric: each process in its own namespace
    extra: list[str] = field(default_factory=list)
    etcd: EtcdServer | None = None
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def etcd_url(self) -> str:
        assert self.etcd is not None
        return self.etcd.url

    def frontend_urls(self) -> list[str]:
        return [p.url for p in self.procs.values() if p.role == "frontend"]

    def start(self) -> LocalCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        host = self.fabric.bridge_ip if self.fabric is not None else "127.0.0.1"
        self.etcd = EtcdServer(self.base / "etcd")
        self.etcd.host = host  # on a fabric, etcd listens on the bridge: reachable from every namespace
        self.etcd.start()
        try:
            for role, n in (("assigner", self.assigners), ("worker", self.workers), ("frontend", self.frontends)):
                for i in range(1, n + 1):
                    self.add(role, f"{role[0]}{i}")
            for proc in self.procs.values():
                self.wait_started(proc)
        except BaseException:
            self.stop()
            raise
        return self

    def add(self, role: str, name: str) -> Proc:
        """Define a process (not started until `launch`)."""
        ip = "127.0.0.1"
        host = None
        if self.fabric is not None:
            host = self.fabric.add_host(name)
            ip = host.ip
        argv = [
            sys.executable, "-m", "ember.cli", "serve", "--role", role, "--etcd", self.etcd_url,
            "--host", ip, "--port", "0", "--data-dir", str(self.base / name), "--node-id", name,
            "--partitions", str(self.partitions), "--lease-ttl", str(self.lease_ttl),
            "--isolation", self.isolation, "--pool", str(self.pool if role == "worker" else 0), *self.extra,
        ]
        if ip != "127.0.0.1":
            argv.append("--insecure")  # cluster-internal addresses on a private fabric
        if host is not None:
            argv = host.exec_argv(argv)
        proc = Proc(name, role, argv, self.base / f"{name}.log", host=host)
        self.procs[name] = proc
        self.launch(proc)
        return proc

    def launch(self, proc: Proc) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(proc.log, "ab") as logf:
            proc.popen = subprocess.Popen(proc.argv, stdout=subprocess.PIPE, stderr=logf, env=env,
                                          start_new_session=True)
        proc.url = ""

    def wait_started(self, proc: Proc, timeout: float = START_TIMEOUT_S) -> str:
        """Read the process's stdout until its `listening on URL` line (bounded); the rest goes to its log."""
        assert proc.popen is not None and proc.popen.stdout is not None
        deadline = time.monotonic() + timeout
        out = proc.popen.stdout
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], 0.2)
            if not ready:
                if proc.popen.poll() is not None:
                    break
                continue
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            m = LISTEN_RE.search(buf)
            if m:
                proc.url = m.group(1).decode()
                with open(proc.log, "ab") as logf:
                    logf.write(buf)
                return proc.url
        tail = proc.log.read_bytes()[-2000:].decode(errors="replace") if proc.log.exists() else ""
        raise RuntimeError(f"{proc.name} ({proc.role}) did not start within {timeout:.0f}s: {buf!r} {tail}")

    def restart(self, name: str) -> Proc:
        proc = self.procs[name]
        self.signal(name, signal.SIGKILL)
        self.reap(name)
        self.launch(proc)
        self.wait_started(proc)
        return proc

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    def reap(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs[name]
        if proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for proc in self.procs.values():
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
        if self.etcd is not None:
            self.etcd.stop()
        if self.fabric is not None:
            self.fabric.close()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- status


async def status(etcd_url: str, prefix: str = "/ember/") -> dict[str, Any]:
    """Leaders with their process ids and epochs, workers, sandboxes: read from etcd and the roles."""
    import aiohttp

    from ember.cluster.etcd import connect, loads

    etcd = await connect(etcd_url, prefix=prefix)
    try:
        cfg = await etcd.get("config")
        partitions = int(loads(cfg.value)["partitions"]) if cfg is not None else 0
        leaders = []
        for p in range(partitions):
            kv = await etcd.get(f"partitions/{p}/leader")
            doc = loads(kv.value) if kv is not None else None
            leaders.append({"partition": p, "leader": doc and doc["id"], "pid": doc and doc.get("pid"),
                            "url": doc and doc["url"], "epoch": kv.create_revision if kv is not None else None})
        members: dict[str, list[dict[str, Any]]] = {"assigners": [], "workers": []}
        for kind in members:
            docs, _ = await etcd.get_prefix(f"{kind}/")
            for key, value in sorted(docs.items()):
                kv = await etcd.get(key)
                members[kind].append({"id": key.split("/", 1)[1], **loads(value),
                                      "incarnation": kv.mod_revision if kv is not None else None})
        journal, _ = await etcd.get_prefix("journal/")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            for w in members["workers"]:
                try:
                    async with http.get(f"{w['url']}/_cluster/status") as resp:
                        w["sandboxes"] = (orjson.loads(await resp.read()))["sandboxes"]
                except (aiohttp.ClientError, TimeoutError) as exc:
                    w["error"] = f"{type(exc).__name__}: {exc}"
        return {"etcd": etcd_url, "partitions": leaders, **members, "journaled_sandboxes": len(journal)}
    finally:
        await etcd.close()
