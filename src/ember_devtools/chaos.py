"""Fault injection under steady load: `ember cluster chaos`, and the cluster tests.

Each scenario starts a fresh local cluster (ember_devtools.localcluster), deploys a sink function that
appends every execution's request id (and whether it was the sandbox's first run, a cold start) to
a file, drives a steady load through the frontends, injects one fault a third of the way in, and
then reports one JSON object:
  scenario, outage_s        longest time the sink's partition served no invocation after the fault
  lost                      sync invocations that got no result: an error or no answer (not a throttle)
  throttled                 sync invocations refused with 429 (never run; SDKs retry these)
  duplicates                request ids the sink ran more than once
  leaked_sandboxes          after settling: sandboxes on workers without a journal record, plus
                            journal records without a sandbox on their worker
  warm_pct_after            share of executions, in the 10 s after service came back, that were warm
plus the counts behind them. The sink runs unisolated (it writes a host file), so the harness passes
--isolation none to the workers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import orjson

from ember.cluster import layout
from ember_devtools.localcluster import LocalCluster, status

SCENARIOS = ("leader-kill", "leader-pause", "worker-kill", "worker-cut", "frontend-kill", "etcd-restart")
SINK = "sink"
SETTLE_S = 8.0  # after the load: probes (1 s, every sandbox each 5 s) repair what the fault left
REQUEST_TIMEOUT_S = 40.0
MAX_INFLIGHT = 2000
MAX_WAITING = 1024  # per function: a failover's backlog (rate x outage) must fit, or it is throttled

SINK_CODE = """import os, time
_first = True
def handler(event, context):
    global _first
    cold, _first = _first, False
    line = f"{context.aws_request_id} {int(cold)} {time.time():.3f}\\n"
    fd = os.open(os.environ["SINK_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {"ok": True}
"""


def _zip() -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("sink.py", SINK_CODE)
    return base64.b64encode(buf.getvalue()).decode()


async def _deploy(http: aiohttp.ClientSession, frontend: str, sink_file: Path, memory: int = 128) -> None:
    body = {"FunctionName": SINK, "Runtime": "python3.11", "Role": "arn:aws:iam::000000000000:role/sink",
            "Handler": "sink.handler", "MemorySize": memory, "Timeout": 30, "Code": {"ZipFile": _zip()},
            "Environment": {"Variables": {"SINK_FILE": str(sink_file)}}}
    async with http.post(f"{frontend}/2015-03-31/functions", data=orjson.dumps(body)) as resp:
        if resp.status != 201:
            raise RuntimeError(f"deploying the sink failed: {resp.status} {await resp.text()}")


class Load:
    """A steady rate of sync invokes spread over the frontends; every request's fate is recorded."""

    def __init__(self, frontends: list[str], rate: float, duration: float, sleep_s: float) -> None:
        self.frontends = frontends
        self.rate = rate
        self.duration = duration
        self.sleep_s = sleep_s
        self.results: list[tuple[float, float, int, str]] = []  # (start, end, status, request id or error)
        self.shed = 0
        self.samples: list[str] = []  # a few error answers, to say what went wrong

    async def run(self) -> None:
        payload = orjson.dumps({"sleep": self.sleep_s})
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
            tasks: set[asyncio.Task[None]] = set()
            t0 = time.monotonic()
            n = int(self.rate * self.duration)
            for i in range(n):
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= MAX_INFLIGHT:
                    self.shed += 1
                    continue
                task = asyncio.create_task(self._one(http, i, payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)

    async def _one(self, http: aiohttp.ClientSession, i: int, payload: bytes) -> None:
        """Like a client behind a load balancer: a frontend that refuses the connection (the request
        was never sent) is skipped; a connection lost after sending is an error (it may have run)."""
        start = time.time()
        for k in range(len(self.frontends)):
            url = f"{self.frontends[(i + k) % len(self.frontends)]}/2015-03-31/functions/{SINK}/invocations"
            try:
                async with http.post(url, data=payload) as resp:
                    body = await resp.read()
                    rid = resp.headers.get("x-amzn-RequestId", "")
                    ok = resp.status == 200 and "X-Amz-Function-Error" not in resp.headers
                    self.results.append((start, time.time(), resp.status if ok else -resp.status, rid))
                    if not ok and len(self.samples) < 20:
                        self.samples.append(f"{resp.status} {body[:200].decode(errors='replace')}")
                    return
            except aiohttp.ClientConnectorError:
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.results.append((start, time.time(), 0, type(exc).__name__))
                return
        self.results.append((start, time.time(), 0, "NoFrontend"))


async def _inject(cluster: LocalCluster, scenario: str, at: float, fault_s: float) -> dict[str, Any]:
    """Wait until `at` (wall clock), inject the fault, and say what was hit."""
    await asyncio.sleep(max(0.0, at - time.time()))
    doc = await status(cluster.etcd_url)
    p = layout.partition_of(SINK, cluster.partitions)
    leader = doc["partitions"][p]["leader"]
    busiest = max(doc["workers"], key=lambda w: len(w.get("sandboxes", [])))["id"]
    hit: dict[str, Any] = {"fault_at": time.time()}
    if scenario == "leader-kill":
        cluster.signal(leader, signal.SIGKILL)
        hit["target"] = leader
    elif scenario == "leader-pause":
        cluster.signal(leader, signal.SIGSTOP)
        hit["target"] = leader
        await asyncio.sleep(fault_s)
        cluster.signal(leader, signal.SIGCONT)
    elif scenario == "worker-kill":
        cluster.signal(busiest, signal.SIGKILL)
        hit["target"] = busiest
        hit["removed_after_s"] = await _written_off(cluster, busiest, hit["fault_at"])
    elif scenario == "worker-cut":
        host = cluster.procs[busiest].host
        if host is None:
            raise RuntimeError("worker-cut needs the network-namespace fabric (run as root with iproute2)")
        host.cut()
        hit["target"] = busiest
        await asyncio.sleep(fault_s)
        host.restore()
    elif scenario == "frontend-kill":
        cluster.signal("f1", signal.SIGKILL)
        hit["target"] = "f1"
    elif scenario == "etcd-restart":
        assert cluster.etcd is not None
        await asyncio.to_thread(cluster.etcd.restart)
        hit["target"] = "etcd"
    else:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    hit["fault_end"] = time.time()
    return hit


async def _written_off(cluster: LocalCluster, worker: str, since: float, limit_s: float = 30.0) -> float | None:
    """Seconds from `since` until no journal record names `worker` (its sandboxes left the tables)."""
    from ember.cluster.etcd import connect, loads

    etcd = await connect(cluster.etcd_url)
    try:
        while time.time() - since < limit_s:
            journal, _ = await etcd.get_prefix("journal/")
            if not any(loads(v)["worker"] == worker for v in journal.values()):
                return round(time.time() - since, 3)
            await asyncio.sleep(0.05)
        return None
    finally:
        await etcd.close()


async def _leaks(cluster: LocalCluster) -> tuple[int, dict[str, Any]]:
    doc = await status(cluster.etcd_url)
    from ember.cluster.etcd import connect, loads

    etcd = await connect(cluster.etcd_url)
    try:
        journal, _ = await etcd.get_prefix("journal/")
    finally:
        await etcd.close()
    records = {int(k.rsplit("/", 1)[1]): loads(v) for k, v in journal.items()}
    on_workers: dict[int, str] = {}
    for w in doc["workers"]:
        for sb in w.get("sandboxes", []):
            on_workers[sb["sandbox"]] = w["id"]
    orphans = [s for s in on_workers if s not in records]
    ghosts = [s for s, r in records.items() if on_workers.get(s) != r["worker"]]
    return len(orphans) + len(ghosts), {"orphans": orphans, "ghosts": ghosts, "sandboxes": len(on_workers)}


def _report(scenario: str, load: Load, sink_file: Path, hit: dict[str, Any], leaks: tuple[int, dict[str, Any]],
            elapsed: float) -> dict[str, Any]:
    lines = sink_file.read_text().split() if sink_file.exists() else []
    runs = Counter(lines[0::3])
    cold = dict(zip(lines[0::3], lines[1::3], strict=True))
    at = dict(zip(lines[0::3], (float(x) for x in lines[2::3]), strict=True))
    ok = sorted((end, start) for start, end, st, _ in load.results if st == 200)
    statuses = Counter(str(st) if st else rid for _, _, st, rid in load.results if st != 200)
    fault = hit["fault_at"]
    # outage: the longest stretch after the fault with no successful completion
    prev, outage = fault, 0.0
    for end, _ in ok:
        if end < fault:
            continue
        outage = max(outage, end - prev)
        prev = end
    recovered = next((end for end, _ in ok if end >= hit["fault_end"]), None)
    after = [rid for rid, t in at.items() if recovered is not None and recovered <= t < recovered + 10.0]
    warm = sum(1 for rid in after if cold.get(rid) == "0")
    return {
        "scenario": scenario,
        "outage_s": round(outage, 3),
        "lost": sum(n for k, n in statuses.items() if k != "-429"),
        "throttled": statuses.get("-429", 0),
        "duplicates": sum(1 for n in runs.values() if n > 1),
        "leaked_sandboxes": leaks[0],
        "warm_pct_after": round(100.0 * warm / len(after), 2) if after else None,
        "requests": len(load.results) + load.shed,
        "ok": len(ok),
        "shed": load.shed,
        "errors": dict(statuses),
        "executions": sum(runs.values()),
        "target": hit.get("target"),
        "removed_after_s": hit.get("removed_after_s"),
        "leak_detail": leaks[1],
        "error_samples": load.samples[:5],
        "seconds": round(elapsed, 1),
    }


async def run_scenario(
    scenario: str, base: Path, duration: float = 30.0, rate: float = 200.0, lease_ttl: float = 2.0,
    fabric: Any = None, sleep_s: float = 0.0, workers: int = 3, assigners: int = 3, frontends: int = 2,
) -> dict[str, Any]:
    assert scenario in SCENARIOS, scenario
    t0 = time.time()
    cluster = LocalCluster(base, assigners=assigners, workers=workers, frontends=frontends, partitions=4,
                           lease_ttl=lease_ttl, isolation="none", pool=0, fabric=fabric,
                           extra=["--max-waiting", str(MAX_WAITING)])
    await asyncio.to_thread(cluster.start)
    try:
        sink_file = base / "sink.log"
        async with aiohttp.ClientSession() as http:
            await _deploy(http, cluster.frontend_urls()[0], sink_file)
            for _ in range(3):  # warm up: the first invokes start sandboxes
                async with http.post(f"{cluster.frontend_urls()[0]}/2015-03-31/functions/{SINK}/invocations",
                                     data=b"{}") as resp:
                    await resp.read()
        sink_file.write_text("")
        load = Load(cluster.frontend_urls(), rate, duration, sleep_s)
        fault_s = max(2.5 * lease_ttl, 5.0)
        inject = asyncio.create_task(_inject(cluster, scenario, time.time() + duration / 3, fault_s))
        await load.run()
        hit = await inject
        await asyncio.sleep(SETTLE_S)
        leaks = await _leaks(cluster)
        return _report(scenario, load, sink_file, hit, leaks, time.time() - t0)
    finally:
        await asyncio.to_thread(cluster.stop)


async def run(scenarios: list[str], duration: float, rate: float, use_netns: bool | None) -> list[dict[str, Any]]:
    from ember_devtools import netns

    fabric_mod: ModuleType | None = None
    if use_netns is not False:
        why = netns.available()
        if why and use_netns:
            raise RuntimeError(f"network namespaces unavailable: {why}")
        if not why:
            fabric_mod = netns
    out = []
    for scenario in scenarios:
        keep = os.environ.get("EMBER_CHAOS_KEEP")  # a directory: keep each scenario's logs there
        with contextlib.nullcontext(f"{keep}/{scenario}") if keep else tempfile.TemporaryDirectory(
                prefix=f"ember-chaos-{scenario}-") as tmp:
            fabric = fabric_mod.Fabric() if fabric_mod is not None else None
            try:
                out.append(await run_scenario(scenario, Path(tmp), duration, rate, fabric=fabric))
            except Exception as exc:  # one failed scenario still reports
                out.append({"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                if fabric is not None:
                    with contextlib.suppress(Exception):
                        fabric.close()
    return out
