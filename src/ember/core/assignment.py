"""The assignment service: which sandbox serves which invocation, and when sandboxes start and stop.

This is ember's brain, written sans-IO (like h11): no clocks, sockets, threads or asyncio in here.
Time comes in as an argument, events come in as method calls, and decisions come out either as the
return value (the hot path: a warm sandbox, a throttle) or as effects that the I/O shell drains with
`take_effects()` (start this sandbox, stop that one, hand this waiting request to that sandbox,
reject that waiting request). The server, the trace simulator and the model tests drive this code.

Rules (asserted here, and checked after every step by tests/test_core_model.py):
  R1  A sandbox holds at most one invocation: it is BUSY exactly when `request` is set.
  R2  Accepted, unfinished invocations of a function (waiting + running) never exceed its reserved
      concurrency; those of unreserved functions never exceed the account's unreserved pool
      (account limit minus all reservations).
  R3  Every accepted request ends exactly once: handed to a sandbox and later released, discarded
      (timeout) or lost with its sandbox; or rejected while it waited (queue deadline, init failure, deletion).
  R4  Every sandbox is in exactly one state, STARTING, IDLE, BUSY, RESETTING or STOPPING, until the
      shell reports its process gone (`sandbox_exited`); then it is forgotten. RESETTING is the time
      between an invocation's end (`finish`: its concurrency is free) and the runtime asking for the
      next one (`sandbox_ready`): the sandbox is not handed out before it can take work at once.
  R5  An invocation takes an idle sandbox of the function's current generation, most recently used
      first. Only when none is idle does a sandbox start, and at most `max_starting` start at once
      per function. A sandbox of an older generation (code or configuration) is never handed out.
  R6  Every queue is bounded: at most `max_waiting` waiters per function, each with a deadline.
  R7  A pre-warm (asked for by a policy that `prewarms`, in `tick`) starts a sandbox only for a live
      function with nothing idle, starting or in flight; it then idles like any other sandbox.
  R8  With a policy `memory_budget_mb`, starting a sandbox first evicts idle sandboxes, lowest policy
      priority first, while the memory of sandboxes not told to stop exceeds the budget. Busy and
      starting sandboxes are never evicted, so the budget is soft: invokes are never refused for it.

Cost: acquire and release are O(1): a dict pop/put and counter updates (plus a heap push under a
memory budget); idle expiry is indexed by whole seconds, so `tick` touches only what expires.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterator
from enum import IntEnum
from typing import NamedTuple

from ember.core.keepalive import FixedKeepAlive, KeepAlivePolicy

__all__ = [
    "Assigner",
    "Dispatch",
    "Function",
    "Reject",
    "Sandbox",
    "Start",
    "State",
    "Stop",
    "Throttle",
]


class State(IntEnum):
    STARTING = 1
    IDLE = 2
    BUSY = 3
    STOPPING = 4
    RESETTING = 5  # its invocation ended; the runtime has not asked for the next one yet


class Function:
    """One function's routing state. `generation` changes whenever code or configuration changes."""

    __slots__ = (
        "deleted",
        "generation",
        "idle",
        "inflight",
        "members",
        "memory_mb",
        "name",
        "reserved",
        "resetting",
        "starting",
        "waiting",
    )

    def __init__(self, name: str, generation: int, reserved: int | None, memory_mb: int) -> None:
        self.name = name
        self.generation = generation
        self.reserved = reserved
        self.memory_mb = memory_mb
        self.inflight = 0  # accepted and unfinished: waiting + running (R2)
        self.starting = 0  # sandboxes in STARTING of the current generation
        self.resetting = 0  # sandboxes in RESETTING: about to be idle, not yet ready
        self.idle: dict[int, Sandbox] = {}  # insertion order = least to most recently used
        self.waiting: OrderedDict[str, float] = OrderedDict()  # request id -> deadline, FIFO
        self.members: dict[int, Sandbox] = {}  # every sandbox of this function not yet exited
        self.deleted = False

    @property
    def busy(self) -> int:
        return self.inflight - len(self.waiting)


class Sandbox:
    """One execution environment: one process, one function generation, one invocation at a time."""

    __slots__ = (
        "expires", "function", "generation", "id", "memory_mb", "request", "started_at", "state", "used_at",
    )

    def __init__(self, sid: int, function: Function, now: float) -> None:
        self.id = sid
        self.function = function
        self.generation = function.generation
        self.memory_mb = function.memory_mb  # fixed at start: what this process holds (R8)
        self.state = State.STARTING
        self.request: str | None = None
        self.started_at = now
        self.used_at = now
        self.expires = 0  # whole second of its idle deadline, when IDLE

    def __repr__(self) -> str:
        return f"Sandbox({self.id}, {self.function.name!r}, {self.state.name}, {self.request!r})"


class Throttle:
    """Why an invoke was refused at the door: an HTTP status, an error type and a reason."""

    __slots__ = ("error", "reason", "status")

    def __init__(self, status: int, error: str, reason: str) -> None:
        self.status, self.error, self.reason = status, error, reason

    def __repr__(self) -> str:
        return f"Throttle({self.reason})"


THROTTLE_RESERVED = Throttle(429, "TooManyRequestsException", "ReservedFunctionConcurrentInvocationLimitExceeded")
THROTTLE_ACCOUNT = Throttle(429, "TooManyRequestsException", "ConcurrentInvocationLimitExceeded")
THROTTLE_QUEUE = Throttle(429, "TooManyRequestsException", "FunctionInvocationRateLimitExceeded")
NOT_FOUND = Throttle(404, "ResourceNotFoundException", "FunctionNotFound")


class Waiting:
    """Returned by acquire when the request was queued: a Dispatch or Reject effect will follow."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "WAIT"


WAIT = Waiting()


# Effects: what the shell must do. Plain tuples: cheap, and easy to log or compare in tests.
class Start(NamedTuple):
    sandbox: Sandbox


class Stop(NamedTuple):
    sandbox: Sandbox
    reason: str  # "expired" | "evicted" | "retired" | "discarded" | "init-failed" | "deleted"


class Dispatch(NamedTuple):
    request_id: str
    sandbox: Sandbox


class Reject(NamedTuple):
    request_id: str
    reason: str  # "queue-timeout" | "init-failed" | "deleted"
    detail: object = None


Effect = Start | Stop | Dispatch | Reject


def min_unreserved(account_limit: int) -> int:
    """Lambda keeps 100 of 1000 unreserved; scaled down for small accounts."""
    return min(100, account_limit // 10)


def reservation_error(account_limit: int, reserved_total: int) -> str | None:
    """Why reserving `reserved_total` in all would be refused: it leaves too little unreserved."""
    floor = min_unreserved(account_limit)
    if account_limit - reserved_total < floor:
        return (
            f"Specified ReservedConcurrentExecutions for function decreases account's "
            f"UnreservedConcurrentExecution below its minimum value of [{floor}]."
        )
    return None


class Assigner:
    """The stateful load balancer of one node (or, in cluster mode, of one partition)."""

    def __init__(
        self,
        account_limit: int = 1000,
        max_starting: int = 4,
        max_waiting: int = 128,
        max_wait_s: float = 15.0,
        keep_alive: KeepAlivePolicy | None = None,
    ) -> None:
        assert account_limit >= 1 and max_starting >= 1 and max_waiting >= 0 and max_wait_s > 0
        self.account_limit = account_limit
        self.max_starting = max_starting
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.keep_alive: KeepAlivePolicy = keep_alive or FixedKeepAlive(600.0)
        self._observe = self.keep_alive.observes_arrivals
        self._prewarms: bool = getattr(self.keep_alive, "prewarms", False)
        self._budget_mb: float | None = getattr(self.keep_alive, "memory_budget_mb", None)
        self.memory_mb = 0  # memory of sandboxes not yet told to stop (R8)
        self._victims: list[tuple[float, int, Sandbox, float]] = []  # (priority, id, sandbox, idle since)
        self.functions: dict[str, Function] = {}
        self.sandboxes: dict[int, Sandbox] = {}
        self.reserved_total = 0
        self.unreserved_inflight = 0
        self._next_id = 1
        self._effects: list[Effect] = []
        self._expiry: dict[int, dict[int, Sandbox]] = {}  # whole second -> idle sandboxes expiring then
        self._swept_to = -1  # every expiry second <= this has been processed
        self._queued: set[Function] = set()  # functions with waiters, for deadline sweeps

    # ----------------------------------------------------------------- configuration

    @property
    def min_unreserved(self) -> int:
        return min_unreserved(self.account_limit)

    def put_function(self, name: str, generation: int, memory_mb: int = 128, now: float = 0.0) -> Function:
        """Create a function, or move it to a new generation: older sandboxes are retired (R5)."""
        fn = self.functions.get(name)
        if fn is None:
            fn = Function(name, generation, None, memory_mb)
            self.functions[name] = fn
            return fn
        fn.memory_mb = memory_mb
        if fn.generation != generation:
            fn.generation = generation
            self._retire(fn, now)
        return fn

    def delete_function(self, name: str, now: float = 0.0) -> None:
        """Forget a function: waiters are rejected, idle and starting sandboxes stop, busy ones stop
        when their invocation ends."""
        fn = self.functions.pop(name, None)
        if fn is None:
            return
        fn.deleted = True
        if fn.reserved is not None:
            self.reserved_total -= fn.reserved
        while fn.waiting:
            rid, _ = fn.waiting.popitem(last=False)
            self._finish(fn)
            self._effects.append(Reject(rid, "deleted"))
        self._queued.discard(fn)
        self._retire(fn, now)

    def set_reserved(self, name: str, reserved: int | None) -> str | None:
        """Reserve concurrency for a function (None removes it). Returns an error message when the
        reservation would leave less than `min_unreserved` for everyone else."""
        fn = self.functions[name]
        assert reserved is None or reserved >= 0
        new_total = self.reserved_total - (fn.reserved or 0) + (reserved or 0)
        if reserved is not None and (error := reservation_error(self.account_limit, new_total)) is not None:
            return error
        if fn.reserved is None and reserved is not None:
            self.unreserved_inflight -= fn.inflight
        elif fn.reserved is not None and reserved is None:
            self.unreserved_inflight += fn.inflight
        self.reserved_total = new_total
        fn.reserved = reserved
        return None

    def set_account_limit(self, limit: int) -> None:
        assert limit >= 1
        self.account_limit = limit

    # ----------------------------------------------------------------- the invoke path

    def acquire(self, request_id: str, name: str, now: float) -> Sandbox | Throttle | Waiting:
        """Admit request `request_id` and give it a warm sandbox, queue it, or refuse it.

        A Sandbox: dispatch now. WAIT: a Dispatch or Reject effect for this id comes later.
        A Throttle: refused, nothing was taken.
        """
        fn = self.functions.get(name)
        if fn is None:
            return NOT_FOUND
        if self._observe:
            self.keep_alive.on_arrival(fn, now)
        reserved = fn.reserved
        if reserved is None:
            if self.unreserved_inflight >= self.account_limit - self.reserved_total:
                return THROTTLE_ACCOUNT
        elif fn.inflight >= reserved:
            return THROTTLE_RESERVED
        idle = fn.idle
        if idle:
            _, sb = idle.popitem()  # most recently used first (R5)
            del self._expiry[sb.expires][sb.id]
            sb.state = State.BUSY
            sb.request = request_id
            sb.used_at = now
        elif len(fn.waiting) >= self.max_waiting:
            return THROTTLE_QUEUE
        else:
            fn.waiting[request_id] = now + self.max_wait_s
            self._queued.add(fn)
            sb = None
            if fn.starting < self.max_starting and fn.starting + fn.resetting < len(fn.waiting):
                self._start(fn, now)
        fn.inflight += 1
        if reserved is None:
            self.unreserved_inflight += 1
        return WAIT if sb is None else sb

    def release(self, sb: Sandbox, now: float) -> None:
        """`finish` and `sandbox_ready` at once: for drivers whose runtimes are ready the moment they
        answer (the trace simulator, the model tests)."""
        self.finish(sb, now)
        if sb.state is State.RESETTING:
            self.sandbox_ready(sb, now)

    def finish(self, sb: Sandbox, now: float) -> None:
        """The invocation on `sb` ended (its result is back): its concurrency is free, but the
        sandbox takes new work only once its runtime asks for it (`sandbox_ready`)."""
        assert sb.state is State.BUSY and sb.request is not None, sb
        fn = sb.function
        self._finish(fn)
        sb.request = None
        sb.used_at = now
        if sb.generation != fn.generation or fn.deleted:
            self._stop(sb, "retired")
            self._refill(fn, now)
        else:
            sb.state = State.RESETTING
            fn.resetting += 1

    def cancel(self, request_id: str, name: str) -> bool:
        """A waiting request gave up (its caller went away). True when it was still waiting."""
        fn = self.functions.get(name)
        if fn is None or fn.waiting.pop(request_id, None) is None:
            return False
        self._finish(fn)
        return True

    # ----------------------------------------------------------------- cluster: adoption

    def number_from(self, first_id: int) -> None:
        """Number new sandboxes from `first_id` (a cluster leader makes ids unique across epochs)."""
        assert first_id >= self._next_id
        self._next_id = first_id

    def adopt(
        self, sid: int, name: str, generation: int, memory_mb: int, request: str | None, now: float,
        starting: bool = False,
    ) -> Sandbox:
        """Take over a sandbox this Assigner did not start (a new cluster leader rebuilding its table
        from the journal and the workers' inventories): STARTING, IDLE, or BUSY with `request`."""
        fn = self.functions[name]
        assert sid not in self.sandboxes, sid
        sb = Sandbox(sid, fn, now)
        sb.generation = generation
        sb.memory_mb = memory_mb
        self.sandboxes[sid] = sb
        fn.members[sid] = sb
        self.memory_mb += memory_mb
        fn.starting += 1  # adopted as starting, then moved to what its worker reported
        if request is not None:
            self.occupy(sb, request)
        elif not starting:
            self.sandbox_ready(sb, now)
        return sb

    def occupy(self, sb: Sandbox, request: str) -> None:
        """The worker says `sb` runs `request` though this table thought it idle or starting (its READY
        was lost): count it busy."""
        fn = sb.function
        if sb.state is State.IDLE:
            del fn.idle[sb.id]
            del self._expiry[sb.expires][sb.id]
        else:
            assert sb.state is State.STARTING, sb
            fn.starting -= 1
        sb.state = State.BUSY
        sb.request = request
        fn.inflight += 1
        if fn.reserved is None:
            self.unreserved_inflight += 1

    # ----------------------------------------------------------------- sandbox lifecycle

    def sandbox_ready(self, sb: Sandbox, now: float) -> None:
        """A sandbox asks for work: its init is done (STARTING), or its last invocation is (RESETTING)."""
        fn = sb.function
        if sb.state is State.STARTING:
            fn.starting -= 1
        elif sb.state is State.RESETTING:
            fn.resetting -= 1
        else:  # already told to stop (retired, deleted, shutdown)
            return
        sb.used_at = now
        if sb.generation != fn.generation or fn.deleted:
            self._stop(sb, "retired")
            self._refill(fn, now)
        else:
            self._serve_or_idle(sb, now)

    def sandbox_failed(self, sb: Sandbox, now: float, error: object = None) -> None:
        """A sandbox's init failed (init error, init timeout): it is stopped, and the failure goes to
        the oldest waiter, the invoke that caused the start."""
        if sb.state is State.STARTING:
            self._stop(sb, "init-failed")
            self._start_failed(sb.function, now, error)

    def discard(self, sb: Sandbox, now: float) -> None:
        """The sandbox must not be reused: its invocation timed out, its runtime broke the protocol,
        or it did not ask for more work within the timeout after answering. It is destroyed."""
        fn = sb.function
        if sb.state is State.BUSY:
            self._finish(fn)
            sb.request = None
        else:
            assert sb.state is State.RESETTING, sb
            fn.resetting -= 1
        self._stop(sb, "discarded")
        self._refill(fn, now)

    def sandbox_exited(self, sb: Sandbox, now: float, init_failure: bool = True) -> str | None:
        """The sandbox's process is gone. Returns the request it was running, if any (that invocation
        ends with an error the shell answers). After this the sandbox is forgotten (R4).
        A STARTING sandbox's death fails the oldest waiter, unless `init_failure` is False (a cluster
        leader lost it with its worker: the waiters wait on for another sandbox)."""
        if self.sandboxes.pop(sb.id, None) is None:
            return None
        fn = sb.function
        del fn.members[sb.id]
        state = sb.state
        sb.state = State.STOPPING
        lost = None
        if state is not State.STOPPING:
            self.memory_mb -= sb.memory_mb
        if state is State.STARTING and init_failure:  # died before it was ready: an init failure
            self._start_failed(fn, now, None)
        elif state is State.STARTING:
            fn.starting -= 1
            self._refill(fn, now)
        elif state is State.RESETTING:
            fn.resetting -= 1
            self._refill(fn, now)
        elif state is State.IDLE:
            del fn.idle[sb.id]
            del self._expiry[sb.expires][sb.id]
        elif state is State.BUSY:
            lost = sb.request
            sb.request = None
            self._finish(fn)
            self._refill(fn, now)
        return lost

    def tick(self, now: float) -> None:
        """Advance time: evict idle sandboxes past their keep-alive, expire waiters past their deadline."""
        second = math.floor(now)
        expiry = self._expiry
        if second - self._swept_to > len(expiry):  # a long jump: visit the buckets, not the seconds
            due: Iterator[int] | range = iter(sorted(k for k in expiry if k <= second))
        else:
            due = range(self._swept_to + 1, second + 1)
        for s in due:
            bucket = expiry.pop(s, None)
            if bucket:
                for sb in list(bucket.values()):
                    del sb.function.idle[sb.id]
                    self._stop(sb, "expired")
        self._swept_to = max(self._swept_to, second)
        if self._prewarms:
            for fn in self.keep_alive.due_prewarms(now):  # R7
                if not (fn.deleted or fn.idle or fn.starting or fn.inflight or fn.resetting):
                    self._start(fn, now)
        for fn in list(self._queued):
            waiting = fn.waiting
            while waiting:
                rid, deadline = next(iter(waiting.items()))
                if deadline > now:
                    break
                waiting.popitem(last=False)
                self._finish(fn)
                self._effects.append(Reject(rid, "queue-timeout"))
            if not waiting:
                self._queued.discard(fn)

    def shutdown(self) -> None:
        """Stop every sandbox that is not busy; busy ones stop as they finish (their functions are
        marked deleted so nothing new is handed out)."""
        for name in list(self.functions):
            self.delete_function(name)

    # ----------------------------------------------------------------- effects and views

    def take_effects(self) -> list[Effect]:
        """Drain the decisions made since the last call, in the order they were made."""
        effects = self._effects
        if effects:
            self._effects = []
        return effects

    def has_effects(self) -> bool:
        return bool(self._effects)

    def sandboxes_of(self, name: str) -> list[Sandbox]:
        fn = self.functions.get(name)
        return [] if fn is None else list(fn.members.values())

    def counts(self, name: str) -> dict[str, int]:
        fn = self.functions[name]
        return {
            "idle": len(fn.idle),
            "busy": fn.busy,
            "starting": fn.starting,
            "waiting": len(fn.waiting),
            "inflight": fn.inflight,
            "sandboxes": len(fn.members),
        }

    # ----------------------------------------------------------------- internals

    def _start(self, fn: Function, now: float) -> None:
        sb = Sandbox(self._next_id, fn, now)
        self._next_id += 1
        self.sandboxes[sb.id] = sb
        fn.members[sb.id] = sb
        fn.starting += 1
        self.memory_mb += sb.memory_mb
        if self._budget_mb is not None and self.memory_mb > self._budget_mb:
            self._make_room()
        self._effects.append(Start(sb))

    def _stop(self, sb: Sandbox, reason: str) -> None:
        sb.state = State.STOPPING
        self.memory_mb -= sb.memory_mb
        self._effects.append(Stop(sb, reason))

    def _make_room(self) -> None:
        """Evict idle sandboxes, lowest priority first, until the budget holds or none is left (R8)."""
        victims, budget = self._victims, self._budget_mb
        assert budget is not None
        while self.memory_mb > budget and victims:
            priority, _, sb, since = heapq.heappop(victims)
            if sb.state is State.IDLE and sb.used_at == since:  # else a stale entry: it was reused
                del sb.function.idle[sb.id]
                del self._expiry[sb.expires][sb.id]
                self._stop(sb, "evicted")
                self.keep_alive.on_evict(sb.function, priority)

    def _finish(self, fn: Function) -> None:
        fn.inflight -= 1
        if fn.reserved is None:
            self.unreserved_inflight -= 1
        assert fn.inflight >= 0 and self.unreserved_inflight >= 0

    def _serve_or_idle(self, sb: Sandbox, now: float) -> None:
        fn = sb.function
        waiting = fn.waiting
        if waiting:
            rid, _ = waiting.popitem(last=False)
            if not waiting:
                self._queued.discard(fn)
            sb.state = State.BUSY
            sb.request = rid
            self._effects.append(Dispatch(rid, sb))
            return
        sb.state = State.IDLE
        fn.idle[sb.id] = sb
        until = self.keep_alive.idle_until(fn, now)
        second = max(math.ceil(until), self._swept_to + 1)
        sb.expires = second
        bucket = self._expiry.get(second)
        if bucket is None:
            self._expiry[second] = {sb.id: sb}
        else:
            bucket[sb.id] = sb
        if self._budget_mb is not None:
            victims = self._victims
            heapq.heappush(victims, (self.keep_alive.priority(fn, now), sb.id, sb, now))
            if len(victims) > 2 * len(self.sandboxes) + 64:  # drop stale entries; amortised O(1)
                self._victims = [v for v in victims if v[2].state is State.IDLE and v[2].used_at == v[3]]
                heapq.heapify(self._victims)

    def _refill(self, fn: Function, now: float) -> None:
        """After a sandbox was lost, make sure waiters still have a sandbox coming (liveness)."""
        if fn.deleted:
            return
        waiting = len(fn.waiting)
        while fn.starting < self.max_starting and fn.starting + fn.resetting < waiting:
            self._start(fn, now)

    def _start_failed(self, fn: Function, now: float, error: object) -> None:
        fn.starting -= 1
        if fn.waiting:
            rid, _ = fn.waiting.popitem(last=False)
            if not fn.waiting:
                self._queued.discard(fn)
            self._finish(fn)
            self._effects.append(Reject(rid, "init-failed", error))
        self._refill(fn, now)

    def _retire(self, fn: Function, now: float) -> None:
        """Stop every idle or starting sandbox of `fn` not of its current generation (all of them, if
        deleted); busy ones stop when released."""
        reason = "deleted" if fn.deleted else "retired"
        for sb in list(fn.members.values()):
            if sb.generation == fn.generation and not fn.deleted:
                continue
            if sb.state is State.IDLE:
                del fn.idle[sb.id]
                del self._expiry[sb.expires][sb.id]
                self._stop(sb, reason)
            elif sb.state is State.STARTING:
                fn.starting -= 1
                self._stop(sb, reason)
            elif sb.state is State.RESETTING:
                fn.resetting -= 1
                self._stop(sb, reason)
        self._refill(fn, now)
