"""`ember serve --role frontend|assigner|worker --etcd URL`: one cluster role in this process.

Every role keeps a replica of the function catalog in its own data dir (SQLite and code, as in the
single-process server), fed from etcd. Startup prints one line, `ember <role> listening on
http://HOST:PORT (...)`, once the role serves. SIGTERM/SIGINT stop it: an assigner revokes its
session so followers take over at once; a worker kills its sandboxes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from aiohttp import web

from ember.api.control import ControlPlane, Settings
from ember.api.frontend import Frontend
from ember.boot import Boot
from ember.cluster import layout, metrics
from ember.cluster.assigner import AssignerNode
from ember.cluster.catalog import Catalog
from ember.cluster.etcd import EtcdError, connect, dumps, loads
from ember.cluster.frontend import ClusterInvoker
from ember.cluster.leaders import LeaderMap
from ember.cluster.worker import WorkerNode
from ember.core.assignment import Assigner
from ember.core.keepalive import policy_from_name
from ember.options import ServeOptions

log = logging.getLogger("ember.cluster.node")

ROLES = ("frontend", "assigner", "worker")


@dataclass(slots=True)
class RoleOptions:
    role: str
    etcd: str
    node_id: str = ""
    partitions: int = layout.DEFAULT_PARTITIONS
    lease_ttl: float = 2.0
    capacity_mb: int = 4096
    etcd_prefix: str = "/ember/"


async def ensure_partitions(etcd, wanted: int) -> int:
    """The partition count is fixed for the cluster's life: the first process writes it, all read it."""
    t = etcd.client.transactions
    key = etcd.full_key("config")
    await etcd._call("config", etcd.client.transaction(
        compare=[t.create(key) == 0], success=[t.put(key, dumps({"partitions": wanted}))], failure=[]))
    kv = await etcd.get("config")
    assert kv is not None
    return int(loads(kv.value)["partitions"])


async def serve_role(opts: ServeOptions, ro: RoleOptions, stop: asyncio.Event | None = None) -> None:
    """The composition root of one cluster role (start-up and shutdown are ember.boot's, as for serve)."""
    assert ro.role in ROLES, ro.role
    boot = Boot(opts, stop)
    boot.begin()
    node_id = ro.node_id or f"{ro.role[0]}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    try:
        etcd = await connect(ro.etcd, prefix=ro.etcd_prefix)
        partitions = await ensure_partitions(etcd, ro.partitions)
    except EtcdError as exc:
        await boot.close()
        raise SystemExit(f"ember: {exc}") from None
    boot.on_close(etcd.close)
    store = boot.store()
    settings = Settings.of(opts)
    control = ControlPlane(store, settings, account_limit=opts.account_concurrency)
    catalog = Catalog(etcd, control, fetch_code=ro.role == "worker")
    await catalog.start()
    boot.on_close(catalog.stop)
    app = boot.app(authenticate=ro.role == "frontend")  # internal roles: see docs/decisions/0004
    node: AssignerNode | WorkerNode | None = None
    if ro.role == "frontend":
        leaders = LeaderMap(etcd)
        await leaders.start()
        boot.on_close(leaders.stop)
        invoker = ClusterInvoker(leaders, partitions, max_wait_s=15.0)
        await invoker.start()
        boot.on_close(invoker.stop)
        frontend = Frontend(control, invoker)
        frontend.on_change = catalog.publish
        frontend.on_unknown = catalog.fetch

        async def status(request: web.Request) -> web.Response:
            return web.json_response({"role": "frontend", "id": node_id, "pid": os.getpid(),
                                      "partitions": partitions, **invoker.stats()})

        app.router.add_get("/_cluster/status", status)
        metrics.routes(app, "frontend", invoker.counters, invoker.gauges)
        frontend.routes(app)
    if ro.role == "assigner":
        keep_alive = opts.keep_alive
        share = opts.account_concurrency  # until the first usage exchange (AssignerNode._share), within 1 s

        def make_assigner() -> Assigner:
            return Assigner(account_limit=share, max_starting=opts.max_starting, max_waiting=opts.max_waiting,
                            keep_alive=policy_from_name(keep_alive))

        node = AssignerNode(etcd, node_id, "", control, partitions, ro.lease_ttl, make_assigner, max_wait_s=15.0,
                            account_limit=opts.account_concurrency)
        catalog.listeners.append(node.function_changed)
        node.routes(app)
        metrics.routes(app, "assigner", node.counters, node.gauges)
    elif ro.role == "worker":
        isolation = await boot.isolation()
        node = WorkerNode(etcd, node_id, "", control, catalog, isolation, partitions, ro.lease_ttl, ro.capacity_mb)
        node.routes(app)
        metrics.routes(app, "worker", node.counters)
    url = await boot.listen(app)
    settings.endpoint = url
    if node is not None:
        node.url = url  # known once bound: it is what the node registers in etcd
        await node.start()
        boot.on_close(node.stop)
    print(f"ember {ro.role} listening on {url} (id {node_id}, {boot.auth_note()})", flush=True)
    try:
        await boot.stop.wait()
    finally:
        await boot.close()


def run_role(opts: ServeOptions, ro: RoleOptions) -> None:
    import uvloop

    from ember.server import setup_logging

    setup_logging()
    uvloop.run(serve_role(opts, ro))


__all__ = ["ROLES", "RoleOptions", "run_role", "serve_role"]
