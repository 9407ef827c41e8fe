"""Bounds of the cluster roles, on real in-process components against a real etcd: the journal queue
of an assigner refuses new work with Lambda's 429 once it is backed up, and steps down rather than
drop an entry when it is full; a frontend refuses past its in-flight bound; every refusal is
counted and every role serves its counters at GET /metrics with a role label.

The assigner's journal writer is held (its fenced transaction waits on a gate, as if etcd were
slow), and the worker is a stub that answers SYNC with an empty inventory and START with nothing,
so the queue fills exactly as the test says. Limits are made small through constructor parameters."""

from __future__ import annotations

import asyncio
import os
import shutil
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ember.api.control import ControlPlane, Settings
from ember.api.errors import LambdaError
from ember.cluster import metrics
from ember.cluster.assigner import AssignerNode
from ember.cluster.etcd import Etcd, connect, dumps
from ember.cluster.frontend import ClusterInvoker
from ember.cluster.leaders import LeaderMap
from ember.core.assignment import Assigner
from ember.core.partition import Role
from ember.store import Store
from ember_devtools.etcdserver import EtcdServer

WAIT = 15.0  # bound on any single wait in these tests


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    if shutil.which("etcd") is None:
        reason = "etcd binary not found: run scripts/install-deps.sh (Debian package etcd-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with EtcdServer(tmp_path_factory.mktemp("etcd") / "data") as srv:
        yield srv


async def until(pred: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    """GET /metrics: {(sample name, role label): value}."""
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, sample.labels["role"])] = sample.value
    return out


def test_metrics_routes_serve_counters_and_gauges_with_the_role_label() -> None:
    counts = {"things_dropped": 0, "refusals": 0}

    async def body() -> None:
        app = web.Application()
        metrics.routes(app, "worker", lambda: dict(counts), lambda: {"queue_depth": 7})
        runner, url = await serve(app)
        try:
            async with aiohttp.ClientSession() as http:
                before = await scrape(http, url)
                counts["things_dropped"] += 3  # read at scrape time, not at registration
                after = await scrape(http, url)
        finally:
            await runner.cleanup()
        assert before[("ember_cluster_things_dropped_total", "worker")] == 0
        assert after[("ember_cluster_things_dropped_total", "worker")] == 3
        assert after[("ember_cluster_refusals_total", "worker")] == 0
        assert after[("ember_cluster_queue_depth", "worker")] == 7

    asyncio.run(body())


class StubWorker:
    """Answers SYNC with an empty inventory (so a leader reconciles at once) and START with nothing
    (its sandboxes stay STARTING); records what it was sent."""

    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()

        async def sync(request: web.Request) -> web.Response:
            b = await request.json()
            return web.json_response({"worker": "w1", "incarnation": 0, "epoch": b["epoch"],
                                      "probe": b.get("probe", 0), "sandboxes": {}})

        async def start(request: web.Request) -> web.Response:
            self.starts.append(await request.json())
            return web.json_response({"ok": True})

        async def other(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app.router.add_post("/_cluster/sync", sync)
        app.router.add_post("/_cluster/start", start)
        app.router.add_post("/_cluster/destroy", other)
        return app


async def assigner_on(etcd: Etcd, tmp_path: Path, **bounds: int) -> tuple[AssignerNode, web.AppRunner, Store]:
    store = Store(tmp_path / "data")
    control = ControlPlane(store, Assigner(), Settings())

    def make_assigner() -> Assigner:
        return Assigner(max_starting=100)

    node = AssignerNode(etcd, "a-test", "", control, 1, 2.0, make_assigner, max_wait_s=5.0, **bounds)
    app = web.Application()
    node.routes(app)
    metrics.routes(app, "assigner", node.counters, node.gauges)
    runner, url = await serve(app)
    node.url = url
    return node, runner, store


def test_the_journal_queue_pushes_back_with_429_and_steps_down_when_full(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    async def body() -> None:
        etcd = await connect(etcd_server.url, prefix=f"/test-{uuid.uuid4().hex[:8]}/")
        stub = StubWorker()
        stub_runner, stub_url = await serve(stub.app())
        await etcd.put("workers/w1", dumps({"url": stub_url, "capacity_mb": 4096}))
        node, runner, store = await assigner_on(etcd, tmp_path, journal_max=3, journal_backpressure=2)
        gate = asyncio.Event()  # the journal writer is stuck in etcd until the gate opens
        real_txn = etcd.fenced_txn

        async def slow_txn(*args: Any, **kw: Any) -> bool:
            await gate.wait()
            return await real_txn(*args, **kw)

        etcd.fenced_txn = slow_txn  # type: ignore[method-assign]
        part = node.parts[0]
        http = aiohttp.ClientSession()
        try:
            await node.start()
            await until(lambda: part.leader.role is Role.SERVING)
            first_epoch = part.leader.epoch
            part.leader.put_function("f", 1, 128, None, asyncio.get_running_loop().time())

            async def acquire(rid: str) -> tuple[int, dict[str, Any]]:
                body = orjson.dumps({"partition": 0, "request_id": rid, "function": "f", "revision": 0})
                async with http.post(f"{node.url}/_cluster/acquire", data=body) as resp:
                    return resp.status, await resp.json()

            # r1's Create is taken by the writer (stuck in etcd); r2 and r3 wait in the queue
            held = [asyncio.create_task(acquire("r1"))]
            await until(lambda: part.journal_q.qsize() == 0 and len(part.pending) == 1)
            held += [asyncio.create_task(acquire(rid)) for rid in ("r2", "r3")]
            await until(lambda: part.journal_q.qsize() == 2)
            assert stub.starts == []  # nothing is started before its record is durable

            status, doc = await acquire("r4")  # back-pressure: 2 of 3 queued
            assert status == 429, doc
            assert doc["type"] == "TooManyRequestsException" and doc["reason"], doc
            assert "journal" in doc["detail"]
            assert node.counters()["acquires_refused_journal_backlog"] == 1
            assert part.journal_q.qsize() == 2 and len(part.pending) == 3  # r4 was not taken on

            # the worker's session ends: 3 write-offs on top of 2 queued creates overflow the queue of
            # 3; the leader steps down instead of dropping one, and the held acquires hear not-leader
            await etcd.delete("workers/w1")
            answers = await asyncio.wait_for(asyncio.gather(*held), WAIT)
            assert [status for status, _ in answers] == [409, 409, 409], answers
            c = node.counters()
            assert c["journal_overflow_step_downs"] == 1
            assert c["journal_entries_discarded"] >= 3  # the 2 queued, and the one that did not fit
            assert part.journal_q.qsize() == 0 and not part.pending

            # and it campaigns again: a new leadership, with a larger epoch, reconciled from etcd
            await until(lambda: part.leader.role is Role.SERVING and part.leader.epoch > first_epoch)
            gate.set()
            seen = await scrape(http, node.url)
            assert seen[("ember_cluster_acquires_refused_journal_backlog_total", "assigner")] == 1
            assert seen[("ember_cluster_journal_overflow_step_downs_total", "assigner")] == 1
            assert seen[("ember_cluster_elections_total", "assigner")] >= 2
            assert ("ember_cluster_etcd_watch_overflows_total", "assigner") in seen
            assert seen[("ember_cluster_journal_queue_depth", "assigner")] == 0
        finally:
            gate.set()
            await http.close()
            await node.stop()
            await runner.cleanup()
            await stub_runner.cleanup()
            store.close()
            await etcd.close()

    asyncio.run(body())


def test_the_journal_queue_is_bounded_by_a_named_constant() -> None:
    """The default bound is the named constant, and back-pressure starts below it."""
    from ember.cluster import assigner

    async def body() -> None:
        part = assigner.Partition(0, None)  # type: ignore[arg-type]
        assert part.journal_q.maxsize == assigner.JOURNAL_QUEUE_MAX > 0
        assert 0 < assigner.JOURNAL_BACKPRESSURE < assigner.JOURNAL_QUEUE_MAX

    asyncio.run(body())


def test_a_frontend_refuses_past_its_in_flight_bound_and_counts_it(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        etcd = await connect(etcd_server.url, prefix=f"/test-{uuid.uuid4().hex[:8]}/")
        leaders = LeaderMap(etcd)
        await leaders.start()
        invoker = ClusterInvoker(leaders, 1, max_wait_s=1.0, max_in_flight=1)
        await invoker.start()
        app = web.Application()
        metrics.routes(app, "frontend", invoker.counters, invoker.gauges)
        runner, url = await serve(app)
        rec: Any = types.SimpleNamespace(name="f", revision=1, config={"Timeout": 3})
        # nobody leads partition 0: the first invoke waits for a leader (bounded), holding the one slot
        first = asyncio.create_task(invoker.invoke(rec, b"{}", "req-1"))
        try:
            await until(lambda: invoker.in_flight == 1)
            with pytest.raises(LambdaError) as refused:
                await invoker.invoke(rec, b"{}", "req-2")
            err = refused.value
            assert err.status == 429 and err.error_type == "TooManyRequestsException", vars(err)
            assert invoker.counters()["invokes_refused_in_flight"] == 1
            async with aiohttp.ClientSession() as http:
                seen = await scrape(http, url)
            assert seen[("ember_cluster_invokes_refused_in_flight_total", "frontend")] == 1
            assert seen[("ember_cluster_invokes_in_flight", "frontend")] == 1
            assert ("ember_cluster_leader_changes_total", "frontend") in seen
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            assert invoker.in_flight == 0
            await runner.cleanup()
            await invoker.stop()
            await leaders.stop()
            await etcd.close()

    asyncio.run(body())


