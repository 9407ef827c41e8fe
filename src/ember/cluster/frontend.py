"""The cluster frontend's invoke path: acquire from the partition's leader, send the payload once to the
worker, answer the client. `core.call.Call` makes the decisions (R10: retry the acquire, never the
payload); this shell adds the waits. It stands in for `ember.invoke.local.Worker` under `ember.api.frontend`,
so the Lambda API is the single-process server's, unchanged.

Waits are bounded: the whole acquire (retries included) by ACQUIRE_BUDGET_S, each attempt by the
leader's queue deadline, the invocation by the function's timeout plus INVOKE_SLACK_S. An attempt
also ends when the partition's leader changes (a failover), so a paused leader holds nobody up.
Invocations in flight on this frontend (acquiring, retrying through a failover, or running) are at
most `max_in_flight` (MAX_IN_FLIGHT); past it an invoke gets 429 TooManyRequestsException at once.
Every refusal is counted in `counters()` (GET /metrics, ember.cluster.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import orjson

from ember.api.errors import LambdaError, not_found, throttled
from ember.cluster import layout
from ember.cluster.leaders import LeaderMap
from ember.core.call import Call
from ember.sandbox.process import Invocation, Outcome
from ember.store import FunctionRecord

log = logging.getLogger("ember.cluster.frontend")

ACQUIRE_BUDGET_S = 20.0
MAX_ACQUIRE_RETRIES = 400  # each retry waits for a leader change or RETRY_PAUSE_S: the budget binds first
RETRY_PAUSE_S = 0.05
INVOKE_SLACK_S = 5.0
CONNECT_TIMEOUT_S = 1.0  # a worker cut off: not connected means not sent, so the acquire is retried (C4)
# Invocations in flight on one frontend. During a failover every new invoke waits here (up to
# ACQUIRE_BUDGET_S) for the next leader; this bounds how many (and the connections they hold).
MAX_IN_FLIGHT = 10_000


class ClusterInvoker:
    """The cluster's `Invoker` (ember.invoke.protocol): acquires a sandbox from the function's
    partition leader and sends the invocation to the worker that holds it."""

    def __init__(self, leaders: LeaderMap, partitions: int, max_wait_s: float,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        assert max_in_flight >= 1
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.leaders = leaders
        self.partitions = partitions
        self.max_wait_s = max_wait_s
        self.http: aiohttp.ClientSession | None = None
        self.cold_starts = 0
        self.warm_starts = 0
        self.acquire_retries = 0
        self.refused = 0
        self.refused_in_flight = 0  # 429 here: max_in_flight invocations already in flight
        self.throttled = 0  # 429 from the leader (throttles, back-pressure, its queue bounds)
        self.no_leader = 0  # 503: no leader answered within ACQUIRE_BUDGET_S
        self.not_run = 0  # 503: the worker refused it or was not reached (not run), retries used up
        self.lost = 0  # 502: the payload was sent and no result came back (it may have run)

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()

    def stats(self) -> dict[str, int]:
        return {"cold_starts": self.cold_starts, "warm_starts": self.warm_starts,
                "acquire_retries": self.acquire_retries, "refused_by_worker": self.refused}

    def health(self) -> dict[str, int]:
        return self.stats()

    def counters(self) -> dict[str, int]:
        """This frontend's counters for /metrics (ember.cluster.metrics): its invoke path, its view of
        the leaders and its etcd client. Counters only grow."""
        return {**self.stats(), "invokes_refused_in_flight": self.refused_in_flight,
                "acquires_throttled": self.throttled, "acquires_no_leader": self.no_leader,
                "invokes_not_run": self.not_run, "invokes_lost_after_send": self.lost,
                **self.leaders.counters(), **self.leaders.etcd.counters()}

    def gauges(self) -> dict[str, int]:
        return {"invokes_in_flight": self.in_flight, "invokes_in_flight_max": self.max_in_flight}

    async def invoke(
        self, rec: FunctionRecord, payload: bytes, request_id: str, client_context: str | None = None,
        want_tail: bool = False,
    ) -> tuple[Invocation, Outcome]:
        if self.in_flight >= self.max_in_flight:
            self.refused_in_flight += 1
            raise throttled("CallerRateLimitExceeded")
        self.in_flight += 1
        try:
            return await self._invoke(rec, payload, request_id, client_context)
        finally:
            self.in_flight -= 1
            assert self.in_flight >= 0

    async def _invoke(
        self, rec: FunctionRecord, payload: bytes, request_id: str, client_context: str | None,
    ) -> tuple[Invocation, Outcome]:
        loop = asyncio.get_running_loop()
        inv = Invocation(request_id, payload, loop.create_future(), client_context)
        p = layout.partition_of(rec.name, self.partitions)
        call = Call(request_id, MAX_ACQUIRE_RETRIES)
        while True:
            try:
                grant = await self._acquire(call, p, rec.name, rec.revision)
            except InitFailed as exc:  # the function's init failed: Lambda answers it as a function error
                return inv, exc.outcome
            if not call.on_grant():  # pragma: no cover - one grant is awaited at a time
                raise LambdaError(500, "ServiceException", "duplicate grant")
            outcome = await self._send(call, grant, p, payload, inv, float(rec.config["Timeout"]))
            if outcome is not None:
                return inv, outcome
            self.refused += 1  # C4: the worker did not run it; acquire again

    async def _acquire(self, call: Call, p: int, name: str, revision: int) -> dict[str, Any]:
        assert self.http is not None
        deadline = time.monotonic() + ACQUIRE_BUDGET_S
        body = orjson.dumps({"partition": p, "request_id": call.lease_id, "function": name, "revision": revision})
        while True:
            leader = self.leaders.get(p)
            changed = self.leaders.changed(p)
            status, doc = 0, None
            if leader is not None:
                status, doc = await self._post_acquire(p, leader[0], body)
            if status == 200:
                return doc  # type: ignore[return-value]
            if status not in (0, 409):  # the leader's answer: throttled, unknown, or an error
                call.on_fail(status == 429)
                detail = (doc or {}).get("detail")
                if (doc or {}).get("reason") == "init-failed" and isinstance(detail, dict):
                    body = detail.get("body", "").replace("{request_id}", call.request_id).encode()
                    raise InitFailed(Outcome(Outcome.FUNCTION_ERROR, body, detail.get("type")))
                if status == 429:
                    self.throttled += 1
                raise _refused(doc or {}, status, name, call.request_id)
            # no answer, no leader, or not the leader (any more): retry on whoever leads next
            self.acquire_retries += 1
            left = deadline - time.monotonic()
            if call.on_timer() == "give-up" or left <= 0:
                self.no_leader += 1
                raise LambdaError(503, "ServiceException",
                                  f"no leader answered for partition {p} within {ACQUIRE_BUDGET_S:.0f}s; retry")
            if not changed.is_set():  # wake at the failover, or back off while the same leader fails
                pause = min(left, RETRY_PAUSE_S * 2 ** min(call.retries, 5))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), pause)

    async def _post_acquire(self, p: int, url: str, body: bytes) -> tuple[int, Any]:
        """One attempt: (status, answer), or (0, None) if no answer came before the leader changed
        (the LeaderMap moves this attempt's deadline to now) or within the bound."""
        assert self.http is not None
        try:
            async with asyncio.timeout(self.max_wait_s + 3.0) as deadline:
                with self.leaders.interrupting(p, deadline):
                    async with self.http.post(f"{url}/_cluster/acquire", data=body,
                                              headers={"Content-Type": "application/json"}) as resp:
                        data = await resp.read()
                        return resp.status, orjson.loads(data) if data else None
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return 0, None

    async def _send(self, call: Call, grant: dict[str, Any], p: int, payload: bytes, inv: Invocation,
                    timeout_s: float) -> Outcome | None:
        """The payload goes to the worker once (R10); without a result the client gets an error. None: the
        worker refused it without running it (C4)."""
        assert self.http is not None
        q = {"partition": p, "epoch": grant["epoch"], "sandbox": grant["sandbox"], "request_id": call.request_id,
             "lease": call.lease_id}
        headers = {"Content-Type": "application/json"}
        if inv.client_context:
            headers["X-Amz-Client-Context"] = inv.client_context
        url = f"{grant['worker_url']}/_cluster/invoke"
        try:
            async with self.http.post(url, params={k: str(v) for k, v in q.items()}, data=payload, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=timeout_s + INVOKE_SLACK_S,
                                                                    sock_connect=CONNECT_TIMEOUT_S)) as resp:
                data = await resp.read()
                status = resp.status
                error = resp.headers.get("X-Amz-Function-Error")
                error_type = resp.headers.get("X-Ember-Error-Type")
                cold = resp.headers.get("X-Ember-Cold") == "1"
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:  # never connected: not sent
            if call.on_refused() == "retry":
                return None
            self.not_run += 1
            raise LambdaError(503, "ServiceException", f"cannot reach the worker ({exc}); retry") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            call.on_timer()  # fe_give_up: never re-send
            self.lost += 1
            raise LambdaError(
                502, "ServiceException",
                f"lost the worker running request {call.request_id} ({type(exc).__name__}); it may or may not "
                "have run") from None
        if status == 409:  # w_reject: the worker did not run it
            if call.on_refused() == "retry":
                return None
            self.not_run += 1
            reason = orjson.loads(data).get("refused", "") if data else ""
            raise LambdaError(503, "ServiceException", f"the worker refused the sandbox ({reason}); retry")
        call.on_result()
        inv.cold = cold
        if cold:
            self.cold_starts += 1
        else:
            self.warm_starts += 1
        kind = Outcome.OK if error is None else Outcome.FUNCTION_ERROR
        return Outcome(kind, data, error_type)


class InitFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


def _refused(doc: dict[str, Any], status: int, name: str, request_id: str) -> LambdaError:
    reason = doc.get("reason", "")
    if status == 404:
        return not_found("Function", name)
    if status == 429:
        return throttled(reason or "FunctionInvocationRateLimitExceeded")
    if reason == "init-failed":
        return LambdaError(502, "ServiceException", f"RequestId: {request_id} Error: Runtime exited during init")
    return LambdaError(status if status >= 400 else 502, doc.get("type", "ServiceException"),
                       f"{reason or 'refused'}{': ' + doc['detail'] if doc.get('detail') else ''}")
