"""A cluster worker: hosts sandboxes for any partition's leader; `core.host.Host` decides what it accepts.

It registers `workers/<id>` with its etcd session; the key's create revision is its incarnation (F2).
Before serving it reads every partition's current epoch (F1). START, INVOKE, SYNC and DESTROY arrive
over HTTP and go through Host first; READY, RELEASE and GONE go to whoever leads the partition now
(read from a watch on `partitions/`), best effort: a lost one is repaired by the leader's probes.
When its session is lost it fences itself before etcd can expire it (H5): every sandbox is killed
(their invocations end with an error), and it registers again as a new incarnation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ember.api.control import ControlPlane
from ember.cluster.catalog import Catalog
from ember.cluster.etcd import Etcd, EtcdError, Session, SessionLost, dumps
from ember.cluster.leaders import LeaderMap
from ember.core.assignment import Function, Sandbox
from ember.core.host import Host, SlotState
from ember.invoke.local import INIT_TIMEOUT_S, _signame
from ember.sandbox.process import Invocation, Outcome, SandboxProcess

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
        self.host = Host(0)  # replaced by a registered incarnation in start()
        self.procs: dict[int, SandboxProcess] = {}
        self.leaders = LeaderMap(etcd)
        self.partition_of: dict[int, int] = {}  # sandbox -> partition
        self.init_errors: dict[int, Outcome] = {}  # sandbox -> why its init failed, until it exits
        self.session: Session | None = None
        self.http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._notifying = 0
        self.stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        await self.leaders.start()
        await self._register()
        self._tasks.append(asyncio.create_task(self._guard_session()))

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
            for proc in list(self.procs.values()):
                proc.kill()
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
            deadline = self.loop.time() + LEAVE_DRAIN_S
            while any(p.current is not None for p in self.procs.values()) and self.loop.time() < deadline:
                await asyncio.sleep(0.05)  # running invocations finish (bounded)
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        await self.leaders.stop()
        for proc in list(self.procs.values()):
            proc.kill()
        for proc in list(self.procs.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.exited.wait(), 5.0)
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
        self.loop.create_task(self._launch(sid, p, b["function"], int(b["revision"])))
        return web.json_response({"ok": True}, status=202)

    async def _launch(self, sid: int, p: int, name: str, revision: int) -> None:
        deadline = time.monotonic() + CATALOG_WAIT_S
        while True:
            rec = self.control.functions.get(name)
            if (rec is not None and rec.revision >= revision) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        spec = self.control.launch_spec(name, sid)
        if spec is None or sid not in self.host.slots:
            self.host.exited(sid)
            self._notify(p, "gone", sid, None)
            return
        fn = Function(name, revision, None, spec.memory_mb)
        proc = SandboxProcess(Sandbox(sid, fn, self.loop.time()), spec, self, self.isolation)
        self.partition_of[sid] = p
        self.procs[sid] = proc
        try:
            await proc.launch()
        except Exception:
            log.exception("sandbox launch failed", extra={"sandbox": sid})
            self.sandbox_exited(proc, -1)
            return
        self.loop.call_later(INIT_TIMEOUT_S, self._init_deadline, proc)

    def _init_deadline(self, proc: SandboxProcess) -> None:
        if not proc.ready and proc.sandbox.id in self.procs:
            proc.kill()

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
        inv.deadline_ms = int(time.time() * 1000 + proc.spec.timeout_s * 1000)
        inv.proc = proc
        proc.deliver(inv)
        proc.timer = self.loop.call_later(proc.spec.timeout_s, self._on_timeout, proc, inv)
        outcome: Outcome = await asyncio.shield(inv.future)
        headers = {"Content-Type": "application/json", "X-Ember-Cold": "1" if inv.cold else "0"}
        if outcome.kind is not Outcome.OK:
            headers["X-Amz-Function-Error"] = "Unhandled"
            if outcome.error_type:
                headers["X-Ember-Error-Type"] = outcome.error_type
        return web.Response(body=outcome.body, headers=headers)

    def _on_timeout(self, proc: SandboxProcess, inv: Invocation) -> None:
        proc.timer = None
        if inv.future.done() or proc.current is not inv:
            if proc.resetting:  # answered but never asked for more work
                proc.kill()
            return
        proc.finish(inv, Outcome.runtime_error(
            Outcome.TIMEOUT, "Sandbox.Timedout",
            f"RequestId: {inv.request_id} Error: Task timed out after {proc.spec.timeout_s:.2f} seconds"))
        proc.kill()

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
            proc = self.procs.get(sid)
            if proc is not None:
                proc.stopping = True
                proc.kill()
        return web.json_response({"ok": True})

    async def status(self, request: web.Request) -> web.Response:
        names = {SlotState.STARTING: "starting", SlotState.IDLE: "idle", SlotState.BUSY: "busy"}
        slots = [
            {"sandbox": sid, "partition": s.partition, "state": names[s.state], "request": s.request,
             "function": self.procs[sid].sandbox.function.name if sid in self.procs else None}
            for sid, s in sorted(self.host.slots.items())
        ]
        return web.json_response({
            "role": "worker", "id": self.id, "pid": os.getpid(), "url": self.url,
            "incarnation": self.host.incarnation, "epochs": {str(k): v for k, v in self.host.wmax.items()},
            "sandboxes": slots,
        })

    # ------------------------------------------------------------------ SandboxEvents

    def sandbox_ready(self, proc: SandboxProcess) -> None:
        if proc.timer is not None:
            proc.timer.cancel()
            proc.timer = None
        sid = proc.sandbox.id
        said = self.host.ready(sid)
        if said is not None:
            kind, rid = said
            self._notify(self.partition_of.get(sid, 0), kind, sid, rid)

    def sandbox_init_failed(self, proc: SandboxProcess, error: Outcome) -> None:
        self.init_errors[proc.sandbox.id] = error  # sent with GONE: the leader answers the waiting request
        proc.kill()

    def sandbox_result(self, proc: SandboxProcess, inv: Invocation, outcome: Outcome) -> None:
        if not proc.finish(inv, outcome):
            return
        if outcome.error_type == "Runtime.InvalidStateTransition":
            proc.kill()
        else:
            proc.resetting = True  # the slot stays BUSY until the runtime asks again (H2)

    def sandbox_exited(self, proc: SandboxProcess, returncode: int) -> None:
        sid = proc.sandbox.id
        self.procs.pop(sid, None)
        if proc.timer is not None:
            proc.timer.cancel()
            proc.timer = None
        slot = self.host.exited(sid)
        self.partition_of.pop(sid, None)
        inv = proc.current
        if inv is not None and not inv.future.done():
            status = f"signal: {_signame(-returncode)}" if returncode < 0 else f"exit status {returncode}"
            exit_type = "Runtime.ExitError"
            if proc.jail is not None and proc.jail.oom:
                exit_type, status = "Runtime.OutOfMemory", "signal: killed"
            proc.finish(inv, Outcome.runtime_error(
                Outcome.EXIT, exit_type, f"RequestId: {inv.request_id} Error: Runtime exited with error: {status}"))
        error = self.init_errors.pop(sid, None)
        if slot is not None:
            detail = None if error is None else {"body": error.body.decode(errors="replace"), "type": error.error_type}
            self._notify(slot.partition, "gone", sid, None, detail)

    # ------------------------------------------------------------------ to the leader

    def _notify(self, p: int, kind: str, sid: int, rid: str | None, init_error: dict[str, Any] | None = None) -> None:
        leader = self.leaders.get(p)
        if leader is None or self._notifying >= MAX_NOTIFY or self.http is None:
            return  # nobody leads, or too much in flight: the next leader's reconciliation repairs it
        url, epoch = leader
        body = {"partition": p, "epoch": epoch, "worker": self.id, "sandbox": sid, "request_id": rid,
                "init_error": init_error}
        self._notifying += 1
        self.loop.create_task(self._post(f"{url}/_cluster/{kind}", body))

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
