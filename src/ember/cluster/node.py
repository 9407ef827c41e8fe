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
import signal
import socket
import uuid
from dataclasses import dataclass

from aiohttp import web

from ember.api import auth
from ember.api.control import ControlPlane, Settings
from ember.api.frontend import Frontend
from ember.cluster import layout
from ember.cluster.assigner import AssignerNode
from ember.cluster.catalog import Catalog
from ember.cluster.etcd import EtcdError, connect, dumps, loads
from ember.cluster.frontend import ClusterInvoker
from ember.cluster.leaders import LeaderMap
from ember.cluster.worker import WorkerNode
from ember.core.assignment import Assigner
from ember.core.keepalive import policy_from_name
from ember.sandbox.isolation import Isolation, IsolationConfig
from ember.server import ServeOptions
from ember.store import Store

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
    assert ro.role in ROLES, ro.role
    refusal = auth.bind_refusal(opts.host, bool(opts.credentials), opts.insecure)
    if refusal:
        raise SystemExit(refusal)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node_id = ro.node_id or f"{ro.role[0]}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    try:
        etcd = await connect(ro.etcd, prefix=ro.etcd_prefix)
        partitions = await ensure_partitions(etcd, ro.partitions)
    except EtcdError as exc:
        raise SystemExit(f"ember: {exc}") from None
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(opts.data_dir)
    core = Assigner(account_limit=opts.account_concurrency)  # the replica's; invokes never use it
    settings = Settings(region=opts.region, endpoint=f"http://{opts.host}:{opts.port}")
    control = ControlPlane(store, core, settings)
    catalog = Catalog(etcd, control, fetch_code=ro.role == "worker")
    await catalog.start()
    middlewares = [auth.middleware(auth.Verifier(opts.credentials))] if opts.credentials else []
    app = web.Application(client_max_size=80 * 1024 * 1024, middlewares=middlewares if ro.role == "frontend" else [])
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=opts.drain_s)
    isolation = None
    node: AssignerNode | WorkerNode | None = None
    leaders: LeaderMap | None = None
    invoker: ClusterInvoker | None = None
    if ro.role == "frontend":
        leaders = LeaderMap(etcd)
        await leaders.start()
        invoker = ClusterInvoker(leaders, partitions, max_wait_s=15.0)
        await invoker.start()
        frontend = Frontend(control, invoker)  # type: ignore[arg-type]
        frontend.on_change = catalog.publish
        frontend.on_unknown = catalog.fetch

        async def status(request: web.Request) -> web.Response:
            return web.json_response({"role": "frontend", "id": node_id, "pid": os.getpid(),
                                      "partitions": partitions, **invoker.stats()})

        app.router.add_get("/_cluster/status", status)
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
    elif ro.role == "worker":
        try:
            isolation = Isolation(
                IsolationConfig(mode=opts.isolation, pool=opts.pool, ephemeral_mb=opts.ephemeral_storage_mb),
                opts.data_dir,
            )
        except (ValueError, RuntimeError) as exc:
            raise SystemExit(f"ember: {exc}") from None
        await isolation.start()
        node = WorkerNode(etcd, node_id, "", control, catalog, isolation, partitions, ro.lease_ttl, ro.capacity_mb)
        node.routes(app)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port, backlog=1024, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"ember: cannot listen on {opts.host}:{opts.port}: {exc.strerror}") from None
    port = runner.addresses[0][1]
    url = f"http://{opts.host}:{port}"
    settings.endpoint = url
    if node is not None:
        node.url = url  # known once bound: it is what the node registers in etcd
        await node.start()
    keys = len(opts.credentials or ())
    auth_note = f"auth on: SigV4, {keys} key{'s' * (keys != 1)}" if keys else "auth off"
    print(f"ember {ro.role} listening on {url} (id {node_id}, {auth_note})", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if node is not None:
            await node.stop()
        if invoker is not None:
            await invoker.stop()
        if leaders is not None:
            await leaders.stop()
        if isolation is not None:
            await isolation.close()
        await catalog.stop()
        await etcd.close()
        store.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_role(opts: ServeOptions, ro: RoleOptions) -> None:
    import uvloop

    from ember.server import setup_logging

    setup_logging()
    uvloop.run(serve_role(opts, ro))


__all__ = ["ROLES", "RoleOptions", "run_role", "serve_role"]
