"""Asynchronous invocations (`InvocationType: Event`) that are never lost.

202 means the event is on disk: it is written to DATA_DIR/queue.db (SQLite, WAL, synchronous=FULL)
and the write is committed (fsync) before the caller hears back. Writes are group-committed by one
writer thread: accepts that arrive while a commit is in flight share the next one, so the durable
accept rate follows the batch size, not the fsync latency.

Dispatchers drain the queue through the same load balancer path as synchronous invokes
(`LocalInvoker.invoke`), so reserved and account concurrency apply. What happens after a run (retry when,
finish how) is decided by the sans-IO `EventQueue` (core/eventqueue.py); this module persists each
decision before acting on it. Delivery is at least once: an event whose run was not yet recorded
when ember died runs again after the restart, with the same request id (handlers deduplicate on
`context.aws_request_id`).

Layout: docs/decisions/0005-async-queue.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ember.api.errors import LambdaError
from ember.core.eventqueue import Decision, Event, EventQueue, Outcome, RetryPolicy
from ember.sandbox.process import Outcome as RunOutcome

log = logging.getLogger("ember.invoke.asyncq")

MAX_ASYNC_PAYLOAD = 1024 * 1024  # Lambda's limit for an asynchronous invoke: 1 MB
MAX_PENDING_WRITES = 20_000  # accepts waiting for a commit; beyond this, 429 (tenet 3)
# Events accepted and not finished (ready, delayed, running), which the dispatcher keeps in memory
# (not their payloads: those stay on disk). Beyond this an accept gets 429. Only accepts are refused:
# events already stored (reloaded at start, destinations of finished events) are never dropped.
MAX_QUEUED_EVENTS = 500_000
MAX_BATCH = 2_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    function TEXT NOT NULL,
    payload BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    throttles INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL
);
"""
SCHEMA_VERSION = 1

Op = tuple[str, tuple[Any, ...]]


class _Writer:
    """One thread, one connection: batches of statements, one commit (fsync) per batch."""

    def __init__(self, path: Path) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-queue-writer")
        self.db: sqlite3.Connection | None = None
        self.pool.submit(self._open, path).result()

    def _open(self, path: Path) -> None:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(f"queue schema {row[0]} is newer than this ember ({SCHEMA_VERSION})")
        self.db = db

    def commit(self, groups: list[list[Op]]) -> None:
        db = self.db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            for ops in groups:
                for sql, args in ops:
                    db.execute(sql, args)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        def _close() -> None:
            if self.db is not None:
                self.db.close()

        self.pool.submit(_close).result()
        self.pool.shutdown()


class AsyncInvoker:
    """The durable queue, its writer and its dispatcher."""

    def __init__(
        self,
        data_dir: Path,
        functions: dict[str, Any],
        invoke: Callable[..., Any],
        arn: Callable[[str], str],
        policy_for: Callable[[str], tuple[RetryPolicy, dict[str, str]]],
        max_inflight: int = 32,
        delay_scale: float = 1.0,
        max_queued: int = MAX_QUEUED_EVENTS,
        max_pending_writes: int = MAX_PENDING_WRITES,
    ) -> None:
        assert max_queued >= 1 and max_pending_writes >= 1
        self.max_queued = max_queued
        self.max_pending_writes = max_pending_writes
        self.path = data_dir / "queue.db"
        self.functions = functions  # name -> FunctionRecord, the control plane's live view
        self.invoke = invoke  # LocalInvoker.invoke
        self.arn = arn
        self.policy_for = policy_for  # name -> (RetryPolicy, destinations: on_success/on_failure/dlq ARNs)
        self.core = EventQueue(max_inflight=max_inflight, delay_scale=delay_scale)
        self.loop = asyncio.get_running_loop()
        self.writer = _Writer(self.path)
        self.reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.reader.execute("PRAGMA query_only=1")
        self._ops: list[tuple[list[Op], asyncio.Future[None]]] = []  # groups commit atomically
        self._kick = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()  # runs and settles: owned, awaited by stop
        self._accepting = 0  # accepts waiting for their commit (not yet in core.depth)
        self._next_id = 1
        self._closing = False
        self.accepted = 0
        self.succeeded = 0
        self.dropped: dict[str, int] = {}  # function -> finished without success and nowhere to go
        self.delivered: dict[str, int] = {}  # destination deliveries by kind
        self.last_commit_error: str | None = None
        self.refused_writer_busy = 0  # 429: max_pending_writes writes already wait for a commit
        self.refused_queue_full = 0  # 429: max_queued events already queued
        self.commit_failures = 0  # commits that failed: their accepts heard 500, not 202

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        now = time.time()
        rows = self.reader.execute(
            "SELECT id, request_id, function, enqueued_at, attempts, throttles, not_before "
            "FROM events ORDER BY id"
        ).fetchall()
        for eid, rid, function, enqueued_at, attempts, throttles, not_before in rows:
            self.core.add(Event(eid, rid, function, enqueued_at, attempts, throttles, not_before), now)
            self._next_id = max(self._next_id, eid + 1)
        for name, rec in self.functions.items():
            self.core.set_cap(name, rec.reserved_concurrency)
        if rows:
            log.info("async queue reloaded", extra={"events": len(rows)})
        if self.core.depth >= self.max_queued:  # kept all the same: they were accepted
            log.warning("async queue is over its bound: accepts get 429 until it drains",
                        extra={"events": self.core.depth, "max_queued": self.max_queued})
        self._tasks = [
            self.loop.create_task(self._write_loop()),
            self.loop.create_task(self._dispatch_loop()),
            self.loop.create_task(self._tick_loop()),
        ]

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop dispatching; running events finish (bounded), and every pending write is committed."""
        self._closing = True
        self._wake.set()
        if self._running:
            await asyncio.wait(list(self._running), timeout=max(drain_s, 0.1))
        for task in self._tasks[1:]:
            task.cancel()
        await self._flush()
        self._tasks[0].cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.reader.close()
        self.writer.close()

    # ------------------------------------------------------------------ accept

    async def accept(self, function: str, payload: bytes, request_id: str) -> None:
        """Store the event durably; returns once it is committed. Raises LambdaError 429 when the
        writer is too far behind, or when max_queued events already wait (bounded queues, never an
        unbounded wait); every refusal is counted."""
        if len(self._ops) >= self.max_pending_writes:
            self.refused_writer_busy += 1
            raise _busy("Asynchronous invoke queue is busy; retry")
        if self.core.depth + self._accepting >= self.max_queued:
            self.refused_queue_full += 1
            raise _busy(f"Asynchronous invoke queue is full ({self.max_queued} events); retry")
        now = time.time()
        ev = Event(self._next_id, request_id, function, now, not_before=now)
        self._next_id += 1
        self._accepting += 1
        try:
            await self._write(
                (
                    "INSERT INTO events VALUES (?, ?, ?, ?, ?, 0, 0, ?)",
                    (ev.id, request_id, function, payload, now, now),
                )
            )
        finally:
            self._accepting -= 1
            assert self._accepting >= 0
        self.accepted += 1
        self.core.add(ev, time.time())
        self._wake.set()

    def function_changed(self, name: str, reserved: int | None) -> None:
        self.core.set_cap(name, reserved)
        self._wake.set()

    # ------------------------------------------------------------------ writes

    def _write(self, *ops: Op) -> asyncio.Future[None]:
        """Queue statements that must commit together; the future resolves once they are durable."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self._ops.append((list(ops), fut))
        self._kick.set()
        return fut

    async def _write_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._ops:
                await self._commit_batch()

    async def _commit_batch(self) -> None:
        batch, self._ops = self._ops[:MAX_BATCH], self._ops[MAX_BATCH:]
        try:
            await self.loop.run_in_executor(self.writer.pool, self.writer.commit, [ops for ops, _ in batch])
        except Exception as exc:  # the disk failed: nobody hears 202 for what was not stored
            self.last_commit_error = repr(exc)
            self.commit_failures += 1
            log.exception("queue commit failed", extra={"ops": len(batch)})
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(LambdaError(500, "ServiceException", "could not store the event"))
            return
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    async def _flush(self) -> None:
        while self._ops:
            await self._commit_batch()

    # ------------------------------------------------------------------ dispatch

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05 if self.core.delay_scale < 1 else 0.25)
            now = time.time()
            self.core.tick(now)
            for ev, decision in self.core.expire_paused(now, lambda name: self.policy_for(name)[0].max_age_s):
                self._own(self.loop.create_task(self._settle(ev, decision, None, None)))
            self._wake.set()

    async def _dispatch_loop(self) -> None:
        while not self._closing:
            ev = self.core.next_ready()
            if ev is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            self._own(self.loop.create_task(self._run(ev)))

    def _own(self, task: asyncio.Task[None]) -> None:
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, ev: Event) -> None:
        policy, dest = self.policy_for(ev.function)
        now = time.time()
        if self.core.expired(ev, now, policy):
            await self._settle(ev, self.core.drop(ev), None, None)
            return
        row = self.reader.execute("SELECT payload FROM events WHERE id=?", (ev.id,)).fetchone()
        if row is None:  # pragma: no cover - deleted under us; nothing to run
            self.core.drop(ev)
            return
        payload: bytes = row[0]
        rec = self.functions.get(ev.function)
        response: bytes | None = None
        function_error = False
        if rec is None:
            outcome = Outcome.GONE
        else:
            try:
                _, result = await self.invoke(rec, payload, ev.request_id)
            except LambdaError as err:
                outcome = (
                    Outcome.THROTTLED
                    if err.status == 429
                    else (Outcome.GONE if err.status == 404 else Outcome.SERVICE_ERROR)
                )
            except Exception:  # pragma: no cover - an ember bug must not lose the event
                log.exception("async dispatch failed", extra={"request_id": ev.request_id})
                outcome = Outcome.SERVICE_ERROR
            else:
                response = result.body
                function_error = result.kind is not RunOutcome.OK
                outcome = Outcome.FUNCTION_ERROR if function_error else Outcome.SUCCESS
        decision = self.core.finished(ev, outcome, time.time(), policy)
        self._wake.set()
        await self._settle(ev, decision, payload, response, function_error, dest)

    async def _settle(
        self,
        ev: Event,
        decision: Decision,
        payload: bytes | None,
        response: bytes | None,
        function_error: bool = False,
        dest: dict[str, str] | None = None,
    ) -> None:
        """Persist a decision: one transaction deletes the event and enqueues what it turns into."""
        if decision.retry:
            await self._write(
                (
                    "UPDATE events SET attempts=?, throttles=?, not_before=? WHERE id=?",
                    (ev.attempts, ev.throttles, ev.not_before, ev.id),
                )
            )
            return
        if dest is None:
            dest = self.policy_for(ev.function)[1]
        condition = decision.condition
        ops: list[Op] = [("DELETE FROM events WHERE id=?", (ev.id,))]
        followers: list[Event] = []
        if payload is None:
            row = self.reader.execute("SELECT payload FROM events WHERE id=?", (ev.id,)).fetchone()
            payload = row[0] if row else b"{}"
        targets: list[tuple[str, bytes]] = []
        if condition == "Success":
            self.succeeded += 1
            if dest.get("on_success"):
                targets.append((dest["on_success"], self._record(ev, condition, payload, response, False)))
        elif condition != "FunctionDeleted":
            if dest.get("on_failure"):
                targets.append(
                    (dest["on_failure"], self._record(ev, condition, payload, response, function_error))
                )
            if dest.get("dlq"):
                targets.append((dest["dlq"], payload))
        now = time.time()
        for arn, body in targets:
            target = arn.split(":")[6] if arn.startswith("arn:") else arn
            if target not in self.functions:
                log.warning("destination missing", extra={"request_id": ev.request_id, "destination": arn})
                continue
            follower = Event(self._next_id, _follow_id(ev.request_id, arn), target, now, not_before=now)
            self._next_id += 1
            ops.append(
                (
                    "INSERT INTO events VALUES (?, ?, ?, ?, ?, 0, 0, ?)",
                    (follower.id, follower.request_id, target, body, now, now),
                )
            )
            followers.append(follower)
            self.delivered[condition] = self.delivered.get(condition, 0) + 1
        if condition != "Success" and not followers:
            self.dropped[ev.function] = self.dropped.get(ev.function, 0) + 1
            log.warning(
                "async event dropped",
                extra={"request_id": ev.request_id, "function": ev.function, "condition": condition},
            )
        await self._write(*ops)
        for follower in followers:
            self.core.add(follower, time.time())
        if followers:
            self._wake.set()

    def _record(
        self, ev: Event, condition: str, payload: bytes, response: bytes | None, function_error: bool
    ) -> bytes:
        """Lambda's invocation record, what a destination function receives."""
        doc: dict[str, Any] = {
            "version": "1.0",
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "requestContext": {
                "requestId": ev.request_id,
                "functionArn": f"{self.arn(ev.function)}:$LATEST",
                "condition": condition,
                "approximateInvokeCount": ev.attempts + (1 if condition == "Success" else 0),
            },
            "requestPayload": _json_or_text(payload),
        }
        if response is not None:
            ctx: dict[str, Any] = {"statusCode": 200, "executedVersion": "$LATEST"}
            if function_error:
                ctx["functionError"] = "Unhandled"
            doc["responseContext"] = ctx
            doc["responsePayload"] = _json_or_text(response)
        return orjson.dumps(doc)

    # ------------------------------------------------------------------ views

    def summary(self) -> dict[str, int]:
        """O(1) totals, for /health."""
        return {
            "accepted": self.accepted,
            "depth": self.core.depth,
            "inflight": self.core.inflight,
            "retries": self.core.retries,
            "dropped": sum(self.dropped.values()),
        }

    def counters(self) -> dict[str, int]:
        """Monotonic counts for /metrics: what was accepted, finished, and refused or dropped at a bound."""
        return {
            "async_accepted": self.accepted,
            "async_succeeded": self.succeeded,
            "async_retries": self.core.retries,
            "async_dropped": sum(self.dropped.values()),
            "async_refused_writer_busy": self.refused_writer_busy,
            "async_refused_queue_full": self.refused_queue_full,
            "async_commit_failures": self.commit_failures,
        }

    def stats(self) -> dict[str, Any]:
        now = time.time()
        per_function = self.core.stats(now)
        for name, count in self.dropped.items():
            per_function.setdefault(name, {"ready": 0, "delayed": 0, "inflight": 0, "oldest_age_s": 0.0})
            per_function[name]["dropped"] = count
        for entry in per_function.values():
            entry.setdefault("dropped", 0)
        return {
            "accepted": self.accepted,
            "succeeded": self.succeeded,
            "retries": self.core.retries,
            "depth": self.core.depth,
            "inflight": self.core.inflight,
            "dropped": sum(self.dropped.values()),
            "destinations": dict(self.delivered),
            "functions": per_function,
        }


def _busy(message: str) -> LambdaError:
    """Lambda's 429 for an asynchronous invoke that cannot be queued now."""
    err = LambdaError(429, "TooManyRequestsException", message, Reason="CallerRateLimitExceeded")
    err.headers["Retry-After"] = "1"
    return err


def _follow_id(request_id: str, arn: str) -> str:
    """A destination's request id: derived, so a re-run after a crash yields the same id."""
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{request_id}->{arn}"))


def _json_or_text(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
