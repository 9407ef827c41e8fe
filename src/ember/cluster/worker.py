"""A cluster worker: hosts sandboxes for any partition's leader; `core.host.Host` decides what it accepts.

It registers `workers/<id>` with its etcd session; the key's create revision is its incarnation (F2).
Before serving it reads every partition's current epoch (F1). START, INVOKE, SYNC and DESTROY arrive
over HTTP and go through Host first; READY, RELEASE and GONE go to whoever leads the partition now
(read from a watch on `partitions/`), best effort: a lost one is repaired by the leader's probes.
When its session is lost it fences itself before etcd can expire it (H5): every sandbox is killed
(their invocations end with an error), and it registers again as a new incarnation.

The sandboxes' lifecycle (timeouts, exits, init deadline, discards) is ember.sandbox.host's, the
same as the single node's; this file is the host's sink for the cluster: it turns what the host
reports into Host (slot table) moves and READY/RELEASE/GONE messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ember.api.control import ControlPlane
from ember.cluster.catalog import Catalog
from ember.cluster.etcd import Etcd, EtcdError, Session, SessionLost, dumps
from ember.cluster.leaders import LeaderMap
from ember.cluster.waits import Signal
from ember.core.host import Host, SlotState
from ember.sandbox.host import SandboxHost
from ember.sandbox.process import Invocation, Outcome, SandboxProcess, SandboxRef

log = logging.getLogger("ember.cluster.worker")

NOTIFY_TIMEOUT_S = 1.0
MAX_NOTIFY = 256  # READY/RELEASE/GONE messages in flight; beyond that they are dropped (probes repair)
CATALOG_WAIT_S = 5.0  # a START for a function revision this worker has not seen yet waits this long
LEAVE_DRAIN_S = 5.0  # on SIGTERM, how long running invocations may finish before sandboxes are killed


class WorkerNode:
    def __init__(
        self, etcd: Etcd, wid: str, url: str, control: ControlPlane, catalog: Catalog, isolation: Any,
        partitions: int, ttl: float, capacity_mb: int,
    ) -> None:
        self.etcd = etcd
        self.id = wid
        self.url = url
        self.control = control
        self.catalog = catalog
        self.isolation = isolation
        self.partitions = partitions
        self.ttl = ttl
        self.capacity_mb = capacity_mb
        self.loop = asyncio.get_running_loop()
        self.host = Host(0)  # the slot table (sans-IO); replaced by a registered incarnation in start()
        self.sandboxes = SandboxHost(self, isolation)  # the processes
        self.leaders = LeaderMap(etcd)
        self.partition_of: dict[int, int] = {}  # sandbox -> partition
        self.session: Session | None = None
        self.http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._notifying = 0
        self.notify_dropped = 0  # READY/RELEASE/GONE not sent (no leader known, or MAX_NOTIFY in flight)
        self.stopping = False
        self.catalog_changed = Signal()  # a function's record was applied (START may wait for it)
        catalog.listeners.append(lambda name: self.catalog_changed.notify())

    @property
    def procs(self) -> dict[int, SandboxProcess]:
        return self.sandboxes.procs

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def counters(self) -> dict[str, int]:
        """For /metrics (ember.cluster.metrics)."""
        return {
            "sandboxes": len(self.procs), "notify_dropped": self.notify_dropped,
            "notify_in_flight": self._notifying, **self.sandboxes.stats(), **self.etcd.counters(),
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        await self.leaders.start()
        await self._register()
        self._spawn(self._guard_session())

    async def _register(self) -> None:
        session = await Session(self.etcd, self.ttl).start()
        doc = {"url": self.url, "capacity_mb": self.capacity_mb, "free_mb": self.capacity_mb, "pid": os.getpid()}
        incarnation = await session.register(f"workers/{self.id}", dumps(doc))
        epochs = {}  # F1: the current epochs before serving anything
        docs, _ = await self.etcd.get_prefix("partitions/")
        for key in docs:
            kv = await self.etcd.get(key)
            if kv is not None:
                epochs[int(key.split("/")[1])] = kv.create_revision
        self.host = Host(incarnation, epochs)
        self.session = session
        log.info("worker registered", extra={"worker": self.id, "incarnation": incarnation})

    async def _guard_session(self) -> None:
        """H5: a lost session means etcd will (or did) declare this incarnation dead: kill everything
        first, then come back as a new incarnation."""
        while not self.stopping:
            session = self.session
            assert session is not None
            await session.lost.wait()
            if self.stopping:
                return
            log.warning("worker session lost: fencing itself", extra={"reason": session.lost_reason})
            self.host = Host(0)  # accepts nothing until registered again
            self.sandboxes.kill_all()
            with contextlib.suppress(Exception):
                await session.close()
            while not self.stopping:
                try:
                    await self._register()
                    break
                except (EtcdError, SessionLost) as exc:
                    log.warning("worker re-registration failed", extra={"error": str(exc)})
                    await asyncio.sleep(0.5)

    async def stop(self) -> None:
        session = self.session
        if session is not None and session.alive:  # say we are leaving: placement avoids us from now on
            doc = {"url": self.url, "capacity_mb": self.capacity_mb, "free_mb": 0, "pid": os.getpid(),
                   "incarnation": self.host.incarnation, "leaving": True}
            with contextlib.suppress(EtcdError, SessionLost):
                await session.register(f"workers/{self.id}", dumps(doc))
            await self.sandboxes.drain(LEAVE_DRAIN_S)  # running invocations finish (bounded)
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.leaders.stop()
        await self.sandboxes.stop()
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.close()
        if self.http is not None:
            await self.http.close()

    # ------------------------------------------------------------------ HTTP

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/_cluster/start", self.start_sandbox)
        r.add_post("/_cluster/invoke", self.invoke)
        r.add_post("/_cluster/sync", self.sync)
        r.add_post("/_cluster/destroy", self.destroy)
        r.add_get("/_cluster/status", self.status)

    async def start_sandbox(self, request: web.Request) -> web.Response:
        """START(sandbox, epoch, incarnation) for a function revision (w_start / w_start_fenced)."""
        b = await request.json(loads=orjson.loads)
        p, epoch, sid = int(b["partition"]), int(b["epoch"]), int(b["sandbox"])
        if not self.host.start(sid, p, epoch, int(b["incarnation"])):
            return web.json_response({"refused": "fenced"}, status=409)
        self._spawn(self._launch(sid, p, b["function"], int(b["revision"])))
        return web.json_response({"ok": True}, status=202)

    async def _launch(self, sid: int, p: int, name: str, revision: int) -> None:
        def seen() -> bool:
            rec = self.control.functions.get(name)
            return rec is not None and rec.revision >= revision

        await self.catalog_changed.wait_until(seen, CATALOG_WAIT_S)  # bounded: then it starts what it has
        spec = self.control.launch_spec(name, sid)
        if spec is None or sid not in self.host.slots:
            self.host.exited(sid)
            self._notify(p, "gone", sid, None)
            return
        self.partition_of[sid] = p
        self.sandboxes.start(SandboxRef(sid, name, revision), spec)

    async def invoke(self, request: web.Request) -> web.Response:
        """INVOKE(sandbox, lease epoch, request): w_accept runs it and answers the outcome; w_reject: 409."""
        q = request.query
        p, epoch, sid, rid = int(q["partition"]), int(q["epoch"]), int(q["sandbox"]), q["request_id"]
        payload = await request.read()
        why = self.host.invoke(sid, p, epoch, q.get("lease", rid))
        proc = self.procs.get(sid)
        if why is None and proc is None:  # accepted by the table but the process just went away
            self.host.exited(sid)
            why = "absent"
        if why is not None:
            return web.json_response({"refused": why}, status=409)
        assert proc is not None
        inv = Invocation(rid, payload, self.loop.create_future(), request.headers.get("X-Amz-Client-Context"))
        inv.want_tail = request.headers.get("X-Ember-Tail") == "1"
        self.sandboxes.dispatch(proc, inv)
        outcome: Outcome = await asyncio.shield(inv.future)
        headers = {"Content-Type": "application/json", "X-Ember-Cold": "1" if inv.cold else "0"}
        if outcome.kind is not Outcome.OK:
            headers["X-Amz-Function-Error"] = "Unhandled"
            if outcome.error_type:
                headers["X-Ember-Error-Type"] = outcome.error_type
        return web.Response(body=outcome.body, headers=headers)

    async def sync(self, request: web.Request) -> web.Response:
        """SYNC(epoch, probe): raise the fence, answer the partition's inventory (w_sync)."""
        b = await request.json(loads=orjson.loads)
        inv = self.host.sync(int(b["partition"]), int(b["epoch"]), int(b.get("probe", 0)))
        if inv is None:
            return web.json_response({"refused": "fenced"}, status=409)
        return web.json_response({
            "worker": self.id, "incarnation": inv.incarnation, "epoch": inv.epoch, "probe": inv.probe,
            "sandboxes": {str(k): list(v) for k, v in inv.sandboxes.items()},
        }, dumps=lambda o: orjson.dumps(o).decode())

    async def destroy(self, request: web.Request) -> web.Response:
        b = await request.json(loads=orjson.loads)
        sid = int(b["sandbox"])
        if self.host.destroy(sid, int(b["partition"]), int(b["epoch"])):
            self.sandboxes.kill(sid)
        return web.json_response({"ok": True})

    async def status(self, request: web.Request) -> web.Response:
        names = {SlotState.STARTING: "starting", SlotState.IDLE: "idle", SlotState.BUSY: "busy"}
        slots = [
            {"sandbox": sid, "partition": s.partition, "state": names[s.state], "request": s.request,
             "function": self.procs[sid].ref.function if sid in self.procs else None}
            for sid, s in sorted(self.host.slots.items())
        ]
        return web.json_response({
            "role": "worker", "id": self.id, "pid": os.getpid(), "url": self.url,
            "incarnation": self.host.incarnation, "epochs": {str(k): v for k, v in self.host.wmax.items()},
            "sandboxes": slots,
        })

    # ------------------------------------------------------------------ HostEvents

    def wanted(self, ref: SandboxRef) -> bool:
        return ref.id in self.host.slots

    def ready(self, ref: SandboxRef) -> None:
        said = self.host.ready(ref.id)
        if said is not None:
            kind, rid = said
            self._notify(self.partition_of.get(ref.id, 0), kind, ref.id, rid)

    def init_failed(self, ref: SandboxRef, error: Outcome) -> None:
        """Nothing to do yet: the error goes with GONE once the process is gone (the leader answers
        the waiting request with it)."""

    def finished(self, ref: SandboxRef, inv: Invocation, outcome: Outcome) -> None:
        """The slot stays BUSY until the runtime asks again (H2): READY/RELEASE are sent then."""

    def discarded(self, ref: SandboxRef) -> None:
        """The kill that follows ends in GONE: the leader forgets the sandbox then."""

    def exited(self, ref: SandboxRef, proc: SandboxProcess) -> None:
        slot = self.host.exited(ref.id)
        self.partition_of.pop(ref.id, None)
        error = proc.init_error
        if slot is not None:
            detail = None if error is None else {"body": error.body.decode(errors="replace"), "type": error.error_type}
            self._notify(slot.partition, "gone", ref.id, None, detail)

    # ------------------------------------------------------------------ to the leader

    def _notify(self, p: int, kind: str, sid: int, rid: str | None, init_error: dict[str, Any] | None = None) -> None:
        leader = self.leaders.get(p)
        if leader is None or self._notifying >= MAX_NOTIFY or self.http is None:
            self.notify_dropped += 1
            return  # nobody leads, or too much in flight: the next leader's reconciliation repairs it
        url, epoch = leader
        body = {"partition": p, "epoch": epoch, "worker": self.id, "sandbox": sid, "request_id": rid,
                "init_error": init_error}
        self._notifying += 1
        self._spawn(self._post(f"{url}/_cluster/{kind}", body))

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        assert self.http is not None
        try:
            async with self.http.post(url, data=orjson.dumps(body), timeout=aiohttp.ClientTimeout(NOTIFY_TIMEOUT_S),
                                      headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("leader notification lost", extra={"url": url, "error": str(exc)})
        finally:
            self._notifying -= 1
