"""A cluster assigner: campaigns for every partition and, where it leads, runs `core.partition.Leader`.

The shell only carries messages and effects: acquires from frontends (HTTP, held until the grant),
READY/RELEASE/GONE from workers, SYNC/START/DESTROY to workers, fenced journal transactions to etcd.
Effects of one partition are applied in order; a Create is journaled (fenced, R3) before its START
is sent, and a failed fenced transaction deposes the leader at once. Timers: `tick` (keep-alive,
queue deadlines), `resync` while reconciling, `timed_out` probes while serving (every fifth probe
covers every sandbox: F5).

Bounds (nothing unbounded on the invoke path; every refusal and drop is counted in `counters()`):
- the journal queue of a partition holds at most `journal_max` (JOURNAL_QUEUE_MAX) writes. From
  `journal_backpressure` (JOURNAL_BACKPRESSURE) on, new acquires get 429 TooManyRequestsException
  (back-pressure: the journal writer is behind). If it is full anyway (a burst of write-offs), the
  leader cannot make progress without losing a journal entry, so it steps down instead: it answers
  every held acquire "not-leader" (the frontend acquires again, same lease id, on the next leader;
  nothing had been sent to a worker), resigns, and campaigns again; the next leader rebuilds from
  the durable journal and the workers' inventories (R4). Nothing is written that was not decided,
  and no accepted invocation is lost: its payload is only sent after a GRANT.
- acquires held per partition: MAX_PENDING (then 429); catalog waits: MAX_CATALOG_WAITERS, each at
  most CATALOG_WAIT_S; messages to workers in flight: MAX_WORKER_MESSAGES, each at most RPC_TIMEOUT_S;
  past it a message is dropped and counted (the protocol tolerates any lost message: f_drop).
- waits are on events signalled when the state advances (the journal tail, the catalog, the end of
  a leadership), each bounded; no sleep-polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ember.api.control import ControlPlane
from ember.cluster import layout
from ember.cluster.etcd import Etcd, EtcdError, Session, SessionLost, WatchEvent, dumps, loads, prefix_end
from ember.cluster.waits import Signal
from ember.core.assignment import Assigner, Throttle
from ember.core.partition import Create, Destroy, Grant, Leader, Refuse, Role, Sync, WriteOff
from ember.core.placement import WorkerInfo
from ember.core.reasons import ThrottleReason

log = logging.getLogger("ember.cluster.assigner")

RPC_TIMEOUT_S = 2.0
MAX_PENDING = 8192  # acquires held per partition
TICK_S = 0.25
PROBE_EVERY_S = 1.0
FULL_PROBE_EVERY = 5
CATALOG_WAIT_S = 3.0
SHARE_EVERY_S = 1.0
TAIL_WAIT_S = 1.0
# Journal writes (Create/WriteOff) queued per partition. It must exceed the largest journal of a
# partition, or the write-offs of a reconciliation could overflow it at every election: records are
# at most the partition's share of worker memory / 128 MB (65,536 records: 8 TiB).
JOURNAL_QUEUE_MAX = 65_536
JOURNAL_BACKPRESSURE = JOURNAL_QUEUE_MAX // 2  # from here on, new acquires get 429
MAX_CATALOG_WAITERS = 1024  # acquires waiting for this process to apply a newer catalog
MAX_WORKER_MESSAGES = 4096  # START/SYNC/DESTROY in flight (the connector sends 512 at a time)
LEADER_CHECK_S = 1.0  # a leadership's end is signalled; this bounds each wait for it anyway
JOURNAL_BACKLOG = Throttle(429, "TooManyRequestsException", ThrottleReason.QUEUE)

COUNTERS = (
    "acquires_refused_journal_backlog",  # 429: the journal queue is past JOURNAL_BACKPRESSURE
    "acquires_refused_pending_full",  # 429: MAX_PENDING acquires already held in the partition
    "acquires_refused_catalog_waiters",  # 429: MAX_CATALOG_WAITERS acquires already wait for the catalog
    "acquires_refused_queue_timeout",  # 429: not granted within the leader's wait bound
    "acquires_refused_not_leader",  # 409: this process does not lead the partition
    "catalog_wait_timeouts",  # the catalog did not reach the frontend's revision within CATALOG_WAIT_S
    "journal_overflow_step_downs",  # the journal queue was full: stepped down rather than lose an entry
    "journal_entries_discarded",  # queued journal writes never written: their leadership ended first
    "effects_discarded",  # effects after an overflow, of a leadership that had ended
    "journal_write_failures",  # a journal write failed (etcd): stepped down
    "journal_fenced",  # a fenced journal write was refused: someone else leads (R3)
    "worker_messages_dropped",  # not sent: MAX_WORKER_MESSAGES already in flight
    "worker_messages_lost",  # sent, no answer (timeout, connection error, non-200)
    "worker_messages_stale",  # READY/RELEASE/GONE of another epoch, dropped (a_discard_stale)
    "step_downs",
)


class Partition:
    """One partition as this assigner sees it: the core Leader plus the acquires it holds."""

    def __init__(self, p: int, leader: Leader, journal_max: int = JOURNAL_QUEUE_MAX) -> None:
        assert journal_max >= 1
        self.p = p
        self.leader = leader
        self.pending: dict[str, asyncio.Future[Grant | Refuse]] = {}
        self.journal_q: asyncio.Queue[Create | WriteOff] = asyncio.Queue(maxsize=journal_max)
        self.ended = Signal()  # notified when a leadership of this partition ends (step down, deposed)
        self.key = layout.leader_key(p)


class AssignerNode:
    def __init__(
        self, etcd: Etcd, aid: str, url: str, control: ControlPlane, partitions: int, ttl: float,
        make_assigner: Callable[[], Assigner], max_wait_s: float, account_limit: int = 1000,
        journal_max: int = JOURNAL_QUEUE_MAX, journal_backpressure: int | None = None,
        max_pending: int = MAX_PENDING, max_worker_messages: int = MAX_WORKER_MESSAGES,
    ) -> None:
        if journal_backpressure is None:
            journal_backpressure = max(1, journal_max * JOURNAL_BACKPRESSURE // JOURNAL_QUEUE_MAX)
        assert 1 <= journal_backpressure <= journal_max, (journal_backpressure, journal_max)
        assert max_pending >= 1 and max_worker_messages >= 1
        self.journal_backpressure = journal_backpressure
        self.max_pending = max_pending
        self.max_worker_messages = max_worker_messages
        self.account_limit = account_limit
        self.etcd = etcd
        self.id = aid
        self.url = url
        self.control = control
        self.ttl = ttl
        self.max_wait_s = max_wait_s
        self.loop = asyncio.get_running_loop()
        self.parts = [Partition(p, Leader(p, make_assigner), journal_max) for p in range(partitions)]
        self.worker_urls: dict[str, str] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self.session: Session | None = None
        self.http: aiohttp.ClientSession | None = None
        self.stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._messages: set[asyncio.Task[Any]] = set()  # to workers, in flight (at most max_worker_messages)
        self.counted: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.tail_advanced = Signal()  # tail_rev moved
        self.catalog_changed = Signal()  # a function's record was applied
        self.catalog_waiters = 0
        self.elections = 0
        self.tailed: dict[int, dict[int, bytes]] = {}  # partition -> sandbox -> record: the journal's tail
        self.tail_rev = 0
        self.tail_hits = 0  # elections served from the tail

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        for name in self.control.functions:
            self.function_changed(name)
        revision = await self._workers_snapshot()
        self._tasks.append(asyncio.create_task(self.etcd.follow(
            "workers/", prefix_end("workers/"), self._workers_snapshot, self._worker_event, revision)))
        # Followers tail the journal. One ordered watch covers `journal/` and `partitions/`, so once it
        # has shown our own leader key's creation (revision = our epoch), every journal write of earlier
        # leaders (all fenced below that revision) is in `tailed`.
        revision = await self._journal_snapshot()
        self._tasks.append(asyncio.create_task(self.etcd.follow(
            "journal/", prefix_end("partitions/"), self._journal_snapshot, self._journal_event, revision)))
        self._tasks.append(asyncio.create_task(self._lead()))
        self._tasks.append(asyncio.create_task(self._timers()))
        self._tasks.append(asyncio.create_task(self._share()))

    async def stop(self) -> None:
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._messages):
            task.cancel()
        await asyncio.gather(*self._messages, return_exceptions=True)
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.close()  # revokes the lease: the keys go at once, followers take over
        if self.http is not None:
            await self.http.close()

    def function_changed(self, name: str) -> None:
        """The catalog changed `name`: tell its partition's leader (leader or not: it keeps the list)."""
        part = self.parts[layout.partition_of(name, len(self.parts))]
        rec = self.control.functions.get(name)
        now = self.loop.time()
        if rec is None:
            part.leader.delete_function(name, now)
        else:
            part.leader.put_function(name, rec.revision, int(rec.config["MemorySize"]), rec.reserved_concurrency, now)
        self._apply(part)
        self.catalog_changed.notify()

    def counters(self) -> dict[str, int]:
        """What this assigner refused, dropped or gave up on at its bounds, and its elections (for
        /metrics: ember.cluster.metrics). Counters only grow."""
        return {**self.counted, "elections": self.elections, "elections_from_tail": self.tail_hits,
                "leader_refused_parked": sum(part.leader.refused_parked for part in self.parts),
                "leader_dropped_held": sum(part.leader.dropped_held for part in self.parts),
                **self.etcd.counters()}

    def gauges(self) -> dict[str, int]:
        """Current depths against their bounds."""
        serving = [part for part in self.parts if part.leader.role is not Role.FOLLOWER]
        return {"partitions_led": len(serving),
                "journal_queue_depth": sum(part.journal_q.qsize() for part in self.parts),
                "journal_queue_depth_max": max((part.journal_q.qsize() for part in self.parts), default=0),
                "acquires_held": sum(len(part.pending) for part in self.parts),
                "worker_messages_in_flight": len(self._messages),
                "catalog_waiters": self.catalog_waiters}

    # ------------------------------------------------------------------ membership and leadership

    def _worker_put(self, key: str, value: bytes, incarnation: int) -> None:
        wid = key.removeprefix("workers/")
        doc = loads(value)
        self.worker_urls[wid] = doc["url"]
        incarnation = int(doc.get("incarnation") or incarnation)  # a later update names its incarnation
        info = WorkerInfo(wid, incarnation, int(doc.get("capacity_mb", 4096)))
        info.leaving = bool(doc.get("leaving"))
        self.workers[wid] = info
        for part in self.parts:
            mine = WorkerInfo(wid, incarnation, info.capacity_mb)
            mine.leaving = info.leaving
            part.leader.worker_joined(mine, self.loop.time())
            self._apply(part)

    async def _workers_snapshot(self) -> int:
        docs, rev = await self.etcd.get_prefix("workers/")
        for key in docs:
            kv = await self.etcd.get(key)
            if kv is not None:
                self._worker_put(key, kv.value, kv.mod_revision)  # the registering put's revision
        for wid in set(self.workers) - {k.removeprefix("workers/") for k in docs}:
            self._worker_gone(wid)
        return rev

    def _worker_event(self, ev: WatchEvent) -> None:
        if ev.type == "put" and ev.value is not None:
            self._worker_put(ev.key, ev.value, ev.revision)
        else:
            self._worker_gone(ev.key.removeprefix("workers/"))

    def _worker_gone(self, wid: str) -> None:
        self.workers.pop(wid, None)
        for part in self.parts:
            part.leader.worker_left(wid, self.loop.time())
            self._apply(part)

    async def _journal_snapshot(self) -> int:
        docs, rev = await self.etcd.get_prefix("journal/")
        self.tailed.clear()
        for key, value in docs.items():
            self._journal_put(key, value)
        self.tail_rev = rev
        self.tail_advanced.notify()
        return rev

    def _journal_event(self, ev: WatchEvent) -> None:
        self._journal_put(ev.key, ev.value if ev.type == "put" else None)
        self.tail_rev = ev.revision
        self.tail_advanced.notify()

    def _journal_put(self, key: str, value: bytes | None) -> None:
        parts = key.split("/")
        if parts[0] != "journal" or len(parts) != 3:
            return  # a leader key: it only moves tail_rev
        records = self.tailed.setdefault(int(parts[1]), {})
        if value is not None:
            records[int(parts[2])] = value
        else:
            records.pop(int(parts[2]), None)

    async def _journal_at(self, p: int, epoch: int) -> list[bytes]:
        """The journal of partition p as a new leader with `epoch` must see it: from the tail once it
        has caught up to the election, else (bounded wait) with one range read."""
        if await self.tail_advanced.wait_until(lambda: self.tail_rev >= epoch, TAIL_WAIT_S):
            self.tail_hits += 1
            return list(self.tailed.get(p, {}).values())
        docs, _ = await self.etcd.get_prefix(layout.journal_prefix(p))
        return list(docs.values())

    async def _lead(self) -> None:
        """One session at a time; with it, campaign for every partition. A lost session deposes all."""
        while not self.stopping:
            try:
                session = await Session(self.etcd, self.ttl).start()
                await session.register(f"assigners/{self.id}", dumps({"url": self.url, "pid": os.getpid()}))
            except (EtcdError, SessionLost) as exc:
                log.warning("assigner session failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            self.session = session
            campaigns = [asyncio.create_task(self._campaign(part, session)) for part in self.parts]
            await session.lost.wait()
            log.warning("assigner session lost: stepping down everywhere", extra={"reason": session.lost_reason})
            for task in campaigns:
                task.cancel()
            await asyncio.gather(*campaigns, return_exceptions=True)
            for part in self.parts:
                self._step_down(part)
            with contextlib.suppress(Exception):
                await session.close()

    async def _campaign(self, part: Partition, session: Session) -> None:
        election = self.etcd.election(part.key)
        value = dumps({"id": self.id, "url": self.url, "pid": os.getpid()})
        journal_task: asyncio.Task[None] | None = None
        try:
            while session.alive:
                try:
                    epoch = await election.campaign(session, value)
                    journal = await self._journal_at(part.p, epoch)
                except (EtcdError, SessionLost) as exc:
                    log.info("campaign failed", extra={"partition": part.p, "error": str(exc)})
                    await asyncio.sleep(0.2)
                    continue
                self.elections += 1
                records = [layout.record_from_json(loads(v)) for v in journal]
                workers = {w: WorkerInfo(w, i.incarnation, i.capacity_mb) for w, i in self.workers.items()}
                log.info("elected", extra={"partition": part.p, "epoch": epoch, "journal": len(records)})
                part.leader.elected(epoch, records, workers, self.loop.time())
                journal_task = asyncio.create_task(self._journal(part, epoch))
                self._apply(part)

                def ended(epoch: int = epoch) -> bool:  # deposed, stepped down (overflow), or re-elected
                    return part.leader.role is Role.FOLLOWER or part.leader.epoch != epoch

                while not await part.ended.wait_until(ended, LEADER_CHECK_S):
                    pass
                await _cancel(journal_task)  # no write of this epoch in flight once we resign
                journal_task = None
                self._step_down(part)
                with contextlib.suppress(EtcdError):
                    await election.resign()
        finally:
            if journal_task is not None:
                await _cancel(journal_task)

    def _step_down(self, part: Partition) -> None:
        """Forget the leadership: held acquires are answered "not-leader" (the frontend asks the next
        leader, same lease id: nothing was sent to a worker yet), queued journal writes are discarded
        (counted; the next leader reconciles from the durable journal and the workers, R4)."""
        if part.leader.role is not Role.FOLLOWER:
            log.info("stepping down", extra={"partition": part.p, "epoch": part.leader.epoch})
            self.counted["step_downs"] += 1
        part.leader.step_down()
        for fut in part.pending.values():
            if not fut.done():
                fut.set_result(Refuse("", None, "not-leader"))
        part.pending.clear()
        discarded = part.journal_q.qsize()
        while not part.journal_q.empty():
            part.journal_q.get_nowait()
        self.counted["journal_entries_discarded"] += discarded
        assert part.journal_q.empty()
        part.ended.notify()

    def _depose(self, part: Partition) -> None:
        """R3: a fenced journal write failed; someone else leads (or may). The campaign steps down."""
        part.leader.deposed()
        part.ended.notify()

    def _journal_overflow(self, part: Partition, left: int) -> None:
        """The journal queue is full: this leader cannot record what it decided. Step down rather than
        drop a journal entry; `left` effects of the ended leadership are not carried out."""
        log.error("journal queue full: stepping down", extra={
            "partition": part.p, "epoch": part.leader.epoch, "queued": part.journal_q.qsize()})
        self.counted["journal_overflow_step_downs"] += 1
        self.counted["journal_entries_discarded"] += 1  # the one that did not fit
        self.counted["effects_discarded"] += left
        self._step_down(part)

    async def _journal(self, part: Partition, epoch: int) -> None:
        """Fenced journal writes, in order; a Create's START goes out only after its record is durable."""
        key = part.key
        while True:
            eff = await part.journal_q.get()
            try:
                if isinstance(eff, Create):
                    r = eff.record
                    ok = await self.etcd.fenced_txn(
                        key, epoch, puts={layout.journal_key(part.p, r.sandbox): dumps(layout.record_to_json(r))})
                    if ok:
                        self._send(r.worker, "start", {
                            "partition": part.p, "epoch": epoch, "sandbox": r.sandbox, "incarnation": r.incarnation,
                            "function": r.function, "revision": r.generation})
                else:
                    ok = await self.etcd.fenced_txn(key, epoch, deletes=[layout.journal_key(part.p, eff.sandbox)])
            except EtcdError as exc:
                log.warning("journal write failed: stepping down", extra={"partition": part.p, "error": str(exc)})
                self.counted["journal_write_failures"] += 1
                self._depose(part)
                return
            if not ok:
                self.counted["journal_fenced"] += 1
                self._depose(part)  # R3: someone else leads now
                return

    # ------------------------------------------------------------------ effects

    def _apply(self, part: Partition) -> None:
        leader = part.leader
        effects = leader.take_effects()
        for i, eff in enumerate(effects):
            if isinstance(eff, Grant | Refuse):
                fut = part.pending.pop(eff.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(eff)
            elif isinstance(eff, Create | WriteOff):
                try:
                    part.journal_q.put_nowait(eff)
                except asyncio.QueueFull:
                    self._journal_overflow(part, len(effects) - i - 1)
                    return
            elif isinstance(eff, Destroy):
                self._send(eff.worker, "destroy", {"partition": part.p, "epoch": eff.epoch, "sandbox": eff.sandbox})
            elif isinstance(eff, Sync):
                self._spawn(self._sync(part, eff))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a message to a worker in the background, owned (cancelled and awaited by stop), bounded:
        past max_worker_messages in flight it is dropped and counted. Dropping is safe: the protocol
        survives the loss of any message (START: the probe writes the sandbox off; SYNC: resync or the
        next probe; DESTROY: the full probe finds the orphan)."""
        if len(self._messages) >= self.max_worker_messages:
            coro.close()
            self.counted["worker_messages_dropped"] += 1
            return
        task = self.loop.create_task(coro)
        self._messages.add(task)
        task.add_done_callback(self._messages.discard)

    def _send(self, worker: str, what: str, body: dict[str, Any]) -> None:
        url = self.worker_urls.get(worker)
        if url is not None:
            self._spawn(self._post(f"{url}/_cluster/{what}", body))

    async def _post(self, url: str, body: dict[str, Any]) -> Any:
        assert self.http is not None
        try:
            async with self.http.post(url, data=orjson.dumps(body), timeout=aiohttp.ClientTimeout(RPC_TIMEOUT_S),
                                      headers={"Content-Type": "application/json"}) as resp:
                data = await resp.read()
                if resp.status == 200:
                    return orjson.loads(data)
                self.counted["worker_messages_lost"] += 1
                return None
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            log.info("message to worker lost", extra={"url": url, "error": str(exc)})
            self.counted["worker_messages_lost"] += 1
            return None

    async def _sync(self, part: Partition, eff: Sync) -> None:
        url = self.worker_urls.get(eff.worker)
        if url is None:
            return
        ans = await self._post(f"{url}/_cluster/sync", {"partition": part.p, "epoch": eff.epoch, "probe": eff.probe})
        if ans is None:
            return  # the resync or the next probe asks again
        inv = {int(k): (v[0], v[1]) for k, v in ans["sandboxes"].items()}
        part.leader.inventory(eff.worker, int(ans["epoch"]), inv, self.loop.time(), int(ans.get("probe", 0)))
        self._apply(part)

    async def _share(self) -> None:
        """Account concurrency across partitions (issue item 4): every second each leader publishes its
        partition's in-flight count (`usage/<p>`, bound to its session) and takes what the others leave
        (`Leader.share_account`). Slack: what other partitions gained within one interval."""
        while True:
            await asyncio.sleep(SHARE_EVERY_S)
            session = self.session
            if session is None or not session.alive:
                continue
            serving = [part for part in self.parts if part.leader.role is Role.SERVING]
            try:
                for part in serving:
                    doc = {"inflight": part.leader.in_flight(), "epoch": part.leader.epoch}
                    await session.register(f"usage/{part.p}", dumps(doc))
                docs, _ = await self.etcd.get_prefix("usage/")
            except (EtcdError, SessionLost):
                continue
            usage = {int(k.split("/")[1]): int(loads(v)["inflight"]) for k, v in docs.items()}
            for part in serving:
                others = sum(n for p, n in usage.items() if p != part.p)
                part.leader.share_account(self.account_limit, others, len(self.parts))

    async def _timers(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(TICK_S)
            n += 1
            now = self.loop.time()
            probe = n % int(PROBE_EVERY_S / TICK_S) == 0
            full = n % int(FULL_PROBE_EVERY * PROBE_EVERY_S / TICK_S) == 0
            for part in self.parts:
                leader = part.leader
                if leader.role is Role.SERVING:
                    leader.tick(now)
                    if probe:
                        leader.timed_out(now, every=full)
                elif leader.role is Role.RECONCILING and n % 2 == 0:
                    leader.resync()
                self._apply(part)

    # ------------------------------------------------------------------ HTTP

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/_cluster/acquire", self.acquire)
        r.add_post("/_cluster/ready", self.worker_message)
        r.add_post("/_cluster/release", self.worker_message)
        r.add_post("/_cluster/gone", self.worker_message)
        r.add_get("/_cluster/status", self.status)

    async def acquire(self, request: web.Request) -> web.Response:
        b = await request.json(loads=orjson.loads)
        part = self.parts[int(b["partition"])]
        rid, name = b["request_id"], b["function"]
        leader = part.leader
        if leader.role is Role.FOLLOWER:
            self.counted["acquires_refused_not_leader"] += 1
            return web.json_response({"refused": "not-leader"}, status=409)
        if rid not in part.pending and part.journal_q.qsize() >= self.journal_backpressure:
            # back-pressure: the journal writer is behind; new work waits at the client, not here
            self.counted["acquires_refused_journal_backlog"] += 1
            return _refusal(Refuse(rid, JOURNAL_BACKLOG, "journal-backlog",
                                   f"{part.journal_q.qsize()} journal writes pending in partition {part.p}"))
        revision = int(b.get("revision", 0))

        def current() -> bool:
            return leader.functions.get(name, (0,))[0] >= revision

        if not current():  # the frontend saw a newer catalog than this process has applied
            if self.catalog_waiters >= MAX_CATALOG_WAITERS:
                self.counted["acquires_refused_catalog_waiters"] += 1
                return _refusal(Refuse(rid, None, "queue-full", "too many acquires wait for the catalog"))
            self.catalog_waiters += 1
            try:
                if not await self.catalog_changed.wait_until(current, CATALOG_WAIT_S):
                    self.counted["catalog_wait_timeouts"] += 1  # go on with the copy we have
            finally:
                self.catalog_waiters -= 1
            if leader.role is Role.FOLLOWER:  # stepped down meanwhile
                self.counted["acquires_refused_not_leader"] += 1
                return web.json_response({"refused": "not-leader"}, status=409)
        fut = part.pending.get(rid)
        if fut is None:
            out = leader.acquire(rid, name, self.loop.time())
            if out is None:
                if len(part.pending) >= self.max_pending:
                    leader.cancel(rid, name)
                    self._apply(part)
                    self.counted["acquires_refused_pending_full"] += 1
                    return _refusal(Refuse(rid, None, "queue-full"))
                fut = part.pending[rid] = self.loop.create_future()
            self._apply(part)
            if out is not None:
                return _answer(out, self.worker_urls)
        assert fut is not None
        try:
            res = await asyncio.wait_for(asyncio.shield(fut), self.max_wait_s + 1.0)
        except TimeoutError:
            part.pending.pop(rid, None)
            leader.cancel(rid, name)
            self._apply(part)
            self.counted["acquires_refused_queue_timeout"] += 1
            return _refusal(Refuse(rid, None, "queue-timeout"))
        return _answer(res, self.worker_urls)

    async def worker_message(self, request: web.Request) -> web.Response:
        kind = request.path.rsplit("/", 1)[1]
        b = await request.json(loads=orjson.loads)
        part = self.parts[int(b["partition"])]
        leader = part.leader
        if leader.role is Role.FOLLOWER or int(b["epoch"]) != leader.epoch:
            self.counted["worker_messages_stale"] += 1
            return web.json_response({"refused": "stale"}, status=409)  # a_discard_stale
        now, worker, sid = self.loop.time(), b["worker"], int(b["sandbox"])
        if kind == "ready":
            leader.ready(worker, sid, now)
        elif kind == "release":
            leader.release(worker, sid, b.get("request_id"), now)
        else:
            leader.gone(sid, now, b.get("init_error"))
        self._apply(part)
        return _json({"ok": True})

    async def status(self, request: web.Request) -> web.Response:
        parts = []
        for part in self.parts:
            leader = part.leader
            entry: dict[str, Any] = {"partition": part.p, "role": leader.role.name.lower(), "epoch": leader.epoch}
            if leader.core is not None and leader.role is not Role.FOLLOWER:
                states: dict[str, int] = {}
                for sb in leader.core.sandboxes.values():
                    states[sb.state.name.lower()] = states.get(sb.state.name.lower(), 0) + 1
                entry["sandboxes"] = states
                entry["journal"] = len(leader.journal)
                entry["waiting"] = len(part.pending)
            parts.append(entry)
        return web.json_response({"role": "assigner", "id": self.id, "pid": os.getpid(), "url": self.url,
                                  "elections": self.elections, "elections_from_tail": self.tail_hits,
                                  "tail_revision": self.tail_rev, "partitions": parts})


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a task this component owns and wait until it has ended."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _json(doc: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def _answer(res: Grant | Refuse, worker_urls: dict[str, str]) -> web.Response:
    if isinstance(res, Grant):
        url = worker_urls.get(res.worker)
        if url is None:
            return _refusal(Refuse(res.request_id, None, "worker-unknown"))
        return _json({"sandbox": res.sandbox, "worker": res.worker, "worker_url": url, "epoch": res.epoch})
    return _refusal(res)


def _refusal(res: Refuse) -> web.Response:
    t = res.throttle
    if t is not None:
        doc: dict[str, Any] = {"status": t.status, "type": t.error, "reason": t.reason}
        if res.detail:
            doc["detail"] = str(res.detail)
        return _json(doc, status=t.status)
    status = {"not-leader": 409, "queue-timeout": 429, "queue-full": 429, "deleted": 404}.get(res.reason, 502)
    detail = res.detail if isinstance(res.detail, dict) else str(res.detail or "")
    return _json({"status": status, "reason": res.reason, "detail": detail}, status=status)
