"""The assignment service: which sandbox serves which invocation, and when sandboxes start and stop.

This is ember's brain, written sans-IO (like h11): no clocks, sockets, threads or asyncio in here.
Time comes in as an argument, events come in as method calls, and decisions come out either as the
return value (the hot path: a warm sandbox, a throttle) or as effects that the I/O shell drains with
`take_effects()` (start this sandbox, stop that one, hand this waiting request to that sandbox,
reject that waiting request). The server, the trace simulator and the model tests drive this code.

Rules (asserted here, checked by `Assigner.verify()`, which tests/test_core_model.py runs after every step):
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

Moves (R4): a sandbox is born STARTING (`_create`) and forgotten from any state when its process is
gone (`sandbox_exited`). In between, its state changes only in `_move`, and only along LEGAL_MOVES:
  STARTING  -> IDLE (ready, nothing waits), BUSY (ready and handed a waiter; or `occupy`), STOPPING
  IDLE      -> BUSY (acquire, `occupy`), STOPPING (expired, evicted, retired, deleted, exited)
  BUSY      -> RESETTING (`finish`), STOPPING (retired on finish, discarded, exited)
  RESETTING -> IDLE or BUSY (`sandbox_ready`), STOPPING (discarded, retired, deleted, exited)
  STOPPING  -> nothing (it only waits for `sandbox_exited`)
`_move` keeps every index derived from the states: `Function.starting`, `.resetting` and `.idle`, the
expiry buckets, the eviction heap, `Sandbox.request` (set exactly when BUSY, R1) and `memory_mb`.
`verify()` checks all of the rules above against the table (O(table)); `verify_each_step=True` runs
it after every public transition (the model tests, `simulate(verify=True)`; not for a server).

Cost: acquire and release are O(1): a dict pop/put and counter updates (plus a heap push under a
memory budget); idle expiry is indexed by whole seconds, so `tick` touches only what expires.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import NamedTuple

from ember.core.keepalive import FixedKeepAlive, KeepAlivePolicy
from ember.core.reasons import RejectReason, StopReason, ThrottleReason
from ember.core.table import Function, Sandbox, State, verify_after_each

__all__ = [
    "LEGAL_MOVES",
    "Assigner",
    "Dispatch",
    "Function",
    "Reject",
    "RejectReason",
    "Sandbox",
    "Start",
    "State",
    "Stop",
    "StopReason",
    "Throttle",
    "ThrottleReason",
]


S = State
LEGAL_MOVES: dict[State, frozenset[State]] = {
    S.STARTING: frozenset({S.IDLE, S.BUSY, S.STOPPING}),
    S.IDLE: frozenset({S.BUSY, S.STOPPING}),
    S.BUSY: frozenset({S.RESETTING, S.STOPPING}),
    S.RESETTING: frozenset({S.IDLE, S.BUSY, S.STOPPING}),
    S.STOPPING: frozenset(),
}
del S

# The members as plain module globals: `State.IDLE` is an attribute lookup on the enum class that costs
# several times a global's on Python 3.11, and the hot path compares states a few times per call.
_STARTING, _IDLE, _BUSY, _STOPPING, _RESETTING = (
    State.STARTING, State.IDLE, State.BUSY, State.STOPPING, State.RESETTING
)


class Throttle:
    """Why an invoke was refused at the door: an HTTP status, an error type and a reason.

    `kind` is the ThrottleReason; `reason` is its value as a plain str, because shells count throttles
    in dicts keyed by reason that orjson serialises (orjson refuses str subclasses as keys)."""

    __slots__ = ("error", "kind", "reason", "status")

    def __init__(self, status: int, error: str, reason: ThrottleReason) -> None:
        self.status, self.error, self.kind = status, error, ThrottleReason(reason)
        self.reason: str = self.kind.value

    def __repr__(self) -> str:
        return f"Throttle({self.reason})"


THROTTLE_RESERVED = Throttle(429, "TooManyRequestsException", ThrottleReason.RESERVED)
THROTTLE_ACCOUNT = Throttle(429, "TooManyRequestsException", ThrottleReason.ACCOUNT)
THROTTLE_QUEUE = Throttle(429, "TooManyRequestsException", ThrottleReason.QUEUE)
NOT_FOUND = Throttle(404, "ResourceNotFoundException", ThrottleReason.NOT_FOUND)


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
    reason: StopReason  # a StrEnum: equal to "expired", "evicted", "retired", "discarded", ...


class Dispatch(NamedTuple):
    request_id: str
    sandbox: Sandbox


class Reject(NamedTuple):
    request_id: str
    reason: RejectReason  # a StrEnum: equal to "queue-timeout", "init-failed" or "deleted"
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


VICTIM_HEAP_SLACK = 64  # the eviction heap is rebuilt when it holds more than 2 x sandboxes + this entries

# Public methods that change the table: with verify_each_step, verify() runs after each.
TRANSITIONS = (
    "acquire", "adopt", "cancel", "delete_function", "discard", "finish", "number_from", "occupy",
    "put_function", "release", "sandbox_exited", "sandbox_failed", "sandbox_ready", "set_account_limit",
    "set_reserved", "shutdown", "tick",
)


class Assigner:
    """The stateful load balancer of one node (or, in cluster mode, of one partition)."""

    def __init__(
        self,
        account_limit: int = 1000,
        max_starting: int = 4,
        max_waiting: int = 128,
        max_wait_s: float = 15.0,
        keep_alive: KeepAlivePolicy | None = None,
        verify_each_step: bool = False,
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
        # For verify() only (R2, R5): in-flight counts a lowered limit or a worker's report left above
        # the limit (they may only drain), and sandboxes adopted while STARTING (not started here).
        self._over_account = 0
        self._over_reserved: dict[Function, int] = {}
        self._adopted: set[int] = set()
        if verify_each_step:
            verify_after_each(self, TRANSITIONS)

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
        when their invocation ends. The keep-alive policy forgets what it learnt about it."""
        fn = self.functions.pop(name, None)
        if fn is None:
            return
        fn.deleted = True
        if fn.reserved is not None:
            self.reserved_total -= fn.reserved
        while fn.waiting:
            rid, _ = fn.waiting.popitem(last=False)
            self._finish(fn)
            self._effects.append(Reject(rid, RejectReason.DELETED))
        self._queued.discard(fn)
        self._retire(fn, now)
        forget = getattr(self.keep_alive, "forget", None)  # policies from elsewhere may not have it
        if forget is not None:
            forget(name)

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
        self._note_limits(fn)
        return None

    def set_account_limit(self, limit: int) -> None:
        assert limit >= 1
        self.account_limit = limit
        self._note_limits(None)

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
            sb = idle[next(reversed(idle))]  # most recently used first (R5)
            self._move(sb, _BUSY, request_id)
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
        if sb.state is _RESETTING:
            self.sandbox_ready(sb, now)

    def finish(self, sb: Sandbox, now: float) -> None:
        """The invocation on `sb` ended (its result is back): its concurrency is free, but the
        sandbox takes new work only once its runtime asks for it (`sandbox_ready`)."""
        assert sb.state is _BUSY and sb.request is not None, sb
        fn = sb.function
        self._finish(fn)
        sb.used_at = now
        if sb.generation != fn.generation or fn.deleted:
            self._stop(sb, StopReason.RETIRED)
            self._refill(fn, now)
        else:
            self._move(sb, _RESETTING)

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
        self._create(sb)  # adopted as starting, then moved to what its worker reported
        self._adopted.add(sid)
        if request is not None:
            self.occupy(sb, request)
        elif not starting:
            self.sandbox_ready(sb, now)
        return sb

    def occupy(self, sb: Sandbox, request: str) -> None:
        """The worker says `sb` runs `request` though this table thought it idle or starting (its READY
        was lost): count it busy."""
        assert sb.state is _IDLE or sb.state is _STARTING, sb
        self._move(sb, _BUSY, request)
        fn = sb.function
        fn.inflight += 1
        if fn.reserved is None:
            self.unreserved_inflight += 1
        self._note_limits(fn)

    # ----------------------------------------------------------------- sandbox lifecycle

    def sandbox_ready(self, sb: Sandbox, now: float) -> None:
        """A sandbox asks for work: its init is done (STARTING), or its last invocation is (RESETTING)."""
        if sb.state is not _STARTING and sb.state is not _RESETTING:
            return  # already told to stop (retired, deleted, shutdown)
        fn = sb.function
        sb.used_at = now
        if sb.generation != fn.generation or fn.deleted:
            self._stop(sb, StopReason.RETIRED)
            self._refill(fn, now)
        else:
            self._serve_or_idle(sb, now)

    def sandbox_failed(self, sb: Sandbox, now: float, error: object = None) -> None:
        """A sandbox's init failed (init error, init timeout): it is stopped, and the failure goes to
        the oldest waiter, the invoke that caused the start."""
        if sb.state is _STARTING:
            self._stop(sb, StopReason.INIT_FAILED)
            self._start_failed(sb.function, now, error)

    def discard(self, sb: Sandbox, now: float) -> None:
        """The sandbox must not be reused: its invocation timed out, its runtime broke the protocol,
        or it did not ask for more work within the timeout after answering. It is destroyed."""
        fn = sb.function
        if sb.state is _BUSY:
            self._finish(fn)
        else:
            assert sb.state is _RESETTING, sb
        self._stop(sb, StopReason.DISCARDED)
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
        self._adopted.discard(sb.id)
        state = sb.state
        lost = sb.request
        if state is _STOPPING:
            return None
        self._move(sb, _STOPPING)  # no Stop effect: it is gone already
        if state is _STARTING and init_failure:  # died before it was ready: an init failure
            self._start_failed(fn, now, None)
        elif state is _STARTING or state is _RESETTING:
            self._refill(fn, now)
        elif state is _BUSY:
            self._finish(fn)
            self._refill(fn, now)
            return lost
        return None

    def tick(self, now: float) -> None:
        """Advance time: evict idle sandboxes past their keep-alive, expire waiters past their deadline."""
        second = math.floor(now)
        expiry = self._expiry
        if second - self._swept_to > len(expiry):  # a long jump: visit the buckets, not the seconds
            due: Iterator[int] | range = iter(sorted(k for k in expiry if k <= second))
        else:
            due = range(self._swept_to + 1, second + 1)
        for s in due:
            bucket = expiry.get(s)
            if bucket is not None:
                for sb in list(bucket.values()):
                    self._stop(sb, StopReason.EXPIRED)
                del expiry[s]
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
                self._effects.append(Reject(rid, RejectReason.QUEUE_TIMEOUT))
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

    # ----------------------------------------------------------------- the rules, checked

    def verify(self) -> None:
        """Check every rule at the top of this module against the whole table, and every index
        against the states it is derived from. Raises AssertionError naming the broken rule. O(table):
        for tests, replay and debugging, not for a server's hot path."""

        def rule(ok: object, what: str, *about: object) -> None:
            if not ok:
                raise AssertionError(f"{what}: {', '.join(map(repr, about))}" if about else what)

        live: dict[int, Function] = {}
        for name, fn in self.functions.items():
            rule(fn.name == name and not fn.deleted, "functions: a live function is filed under its name", fn.name)
            live[id(fn)] = fn
        idle_total = 0
        memory = 0
        for sid, sb in self.sandboxes.items():
            fn = sb.function
            rule(sb.id == sid and fn.members.get(sid) is sb, "R4: a sandbox is a member of its function", sb)
            rule(fn.deleted or self.functions.get(fn.name) is fn, "R4: a sandbox of an unknown function", sb)
            live[id(fn)] = fn
            state = sb.state
            rule(state in LEGAL_MOVES, "R4: a sandbox is in exactly one known state", sb)
            rule((state is _BUSY) == (sb.request is not None), "R1: BUSY exactly when a request is set", sb)
            if state is not _STOPPING:
                memory += sb.memory_mb
            current = sb.generation == fn.generation and not fn.deleted
            if state is _IDLE or state is _RESETTING:
                rule(current, "R5: an idle or resetting sandbox of an older generation or a deleted function", sb)
            elif state is _STARTING and sid not in self._adopted:
                rule(current, "R5: a starting sandbox of an older generation or a deleted function", sb)
            if state is _IDLE:
                idle_total += 1
                rule(fn.idle.get(sid) is sb, "index: an IDLE sandbox is in its function's idle set", sb)
                rule(sb.expires > self._swept_to, "index: an IDLE sandbox's expiry second was swept", sb)
                bucket = self._expiry.get(sb.expires)
                rule(bucket is not None and bucket.get(sid) is sb, "index: an IDLE sandbox is in its expiry bucket", sb)
        unreserved = 0
        for fn in live.values():
            members = fn.members.values()
            rule(all(self.sandboxes.get(sb.id) is sb for sb in members), "R4: a member sandbox was forgotten", fn.name)
            n = {state: 0 for state in LEGAL_MOVES}
            own_starting = 0
            for sb in members:
                n[sb.state] += 1
                if sb.state is _STARTING and sb.id not in self._adopted:
                    own_starting += 1
            rule(fn.starting == n[_STARTING], "index: Function.starting counts STARTING sandboxes",
                 fn.name, fn.starting, n[_STARTING])
            rule(fn.resetting == n[_RESETTING], "index: Function.resetting counts RESETTING sandboxes",
                 fn.name, fn.resetting, n[_RESETTING])
            rule(len(fn.idle) == n[_IDLE] and all(sb.state is _IDLE for sb in fn.idle.values()),
                 "index: Function.idle is exactly the IDLE sandboxes", fn.name)
            rule(fn.inflight == len(fn.waiting) + n[_BUSY], "R2/R3: in flight = waiting + running",
                 fn.name, fn.inflight, len(fn.waiting), n[_BUSY])
            rule(own_starting <= self.max_starting, "R5: at most max_starting sandboxes start at once",
                 fn.name, own_starting)
            rule(len(fn.waiting) <= self.max_waiting, "R6: at most max_waiting waiters", fn.name, len(fn.waiting))
            rule(not fn.waiting or fn in self._queued, "R6: a function with waiters is swept for deadlines", fn.name)
            rule(not (fn.waiting and fn.deleted), "R3: a deleted function has no waiters", fn.name)
            if fn.waiting:
                rule(n[_STARTING] + n[_BUSY] + n[_RESETTING] > 0,
                     "R3: waiters with nothing coming to serve them", fn.name)
            if fn.reserved is not None:
                rule(fn.inflight <= max(fn.reserved, self._over_reserved.get(fn, 0)),
                     "R2: reserved concurrency exceeded", fn.name, fn.inflight, fn.reserved)
            else:
                unreserved += fn.inflight
        rule(memory == self.memory_mb, "R8: memory_mb is the memory of sandboxes not told to stop",
             memory, self.memory_mb)
        rule(sum(map(len, self._expiry.values())) == idle_total, "index: expiry buckets hold only IDLE sandboxes")
        rule(all(not fn.deleted for fn in self._queued), "R6: a deleted function is swept for deadlines")
        rule(unreserved == self.unreserved_inflight, "R2: unreserved_inflight counts unreserved functions' in flight",
             unreserved, self.unreserved_inflight)
        pool = self.account_limit - self.reserved_total
        rule(self.unreserved_inflight <= max(pool, self._over_account), "R2: account limit exceeded",
             self.unreserved_inflight, pool)
        if self._budget_mb is not None:
            ranked = {v[1] for v in self._victims if v[2].state is _IDLE and v[2].used_at == v[3]}
            rule(all(sid in ranked for fn in live.values() for sid in fn.idle),
                 "R8: every IDLE sandbox is ranked for eviction")

    # ----------------------------------------------------------------- internals

    def _move(self, sb: Sandbox, to: State, request: str | None = None, now: float = 0.0) -> None:
        """The one place a sandbox changes state (along LEGAL_MOVES), keeping every derived index:
        leaving a state undoes its index, entering one sets it. `request` is what a BUSY sandbox runs;
        `now` is when an IDLE one turned idle (its keep-alive deadline and eviction rank)."""
        frm = sb.state
        assert to in LEGAL_MOVES[frm], f"illegal move {frm.name} -> {to.name}: {sb}"
        fn = sb.function
        if frm is _IDLE:
            del fn.idle[sb.id]
            del self._expiry[sb.expires][sb.id]
        elif frm is _BUSY:
            sb.request = None
        elif frm is _STARTING:
            fn.starting -= 1
        else:  # RESETTING
            fn.resetting -= 1
        sb.state = to
        if to is _BUSY:
            assert request is not None, sb
            sb.request = request
        elif to is _IDLE:
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
                if len(victims) > 2 * len(self.sandboxes) + VICTIM_HEAP_SLACK:  # drop stale entries; amortised O(1)
                    victims = self._victims = [v for v in victims if v[2].state is _IDLE and v[2].used_at == v[3]]
                    heapq.heapify(victims)
                    assert len(victims) <= len(self.sandboxes), (len(victims), len(self.sandboxes))
        elif to is _RESETTING:
            fn.resetting += 1
        else:  # STOPPING
            self.memory_mb -= sb.memory_mb

    def _create(self, sb: Sandbox) -> None:
        """A sandbox is born STARTING: file it."""
        assert sb.state is _STARTING and sb.request is None, sb
        fn = sb.function
        self.sandboxes[sb.id] = sb
        fn.members[sb.id] = sb
        fn.starting += 1
        self.memory_mb += sb.memory_mb

    def _start(self, fn: Function, now: float) -> None:
        sb = Sandbox(self._next_id, fn, now)
        self._next_id += 1
        self._create(sb)
        if self._budget_mb is not None and self.memory_mb > self._budget_mb:
            self._make_room()
        self._effects.append(Start(sb))

    def _stop(self, sb: Sandbox, reason: StopReason) -> None:
        self._move(sb, _STOPPING)
        self._effects.append(Stop(sb, reason))

    def _make_room(self) -> None:
        """Evict idle sandboxes, lowest priority first, until the budget holds or none is left (R8)."""
        victims, budget = self._victims, self._budget_mb
        assert budget is not None
        while self.memory_mb > budget and victims:
            priority, _, sb, since = heapq.heappop(victims)
            if sb.state is _IDLE and sb.used_at == since:  # else a stale entry: it was reused
                self._stop(sb, StopReason.EVICTED)
                self.keep_alive.on_evict(sb.function, priority)

    def _finish(self, fn: Function) -> None:
        fn.inflight -= 1
        if fn.reserved is None:
            self.unreserved_inflight -= 1
        assert fn.inflight >= 0 and self.unreserved_inflight >= 0

    def _note_limits(self, fn: Function | None) -> None:
        """For verify() (R2): after a limit changed or a worker reported a run, remember how far in-flight
        counts stand above their limits (they may drain, never grow)."""
        pool = self.account_limit - self.reserved_total
        self._over_account = self.unreserved_inflight if self.unreserved_inflight > pool else 0
        if fn is not None:
            if fn.reserved is not None and fn.inflight > fn.reserved:
                self._over_reserved[fn] = fn.inflight
            else:
                self._over_reserved.pop(fn, None)

    def _serve_or_idle(self, sb: Sandbox, now: float) -> None:
        fn = sb.function
        waiting = fn.waiting
        if waiting:
            rid, _ = waiting.popitem(last=False)
            if not waiting:
                self._queued.discard(fn)
            self._move(sb, _BUSY, rid)
            self._effects.append(Dispatch(rid, sb))
            return
        self._move(sb, _IDLE, now=now)

    def _refill(self, fn: Function, now: float) -> None:
        """After a sandbox was lost, make sure waiters still have a sandbox coming (liveness)."""
        if fn.deleted:
            return
        waiting = len(fn.waiting)
        while fn.starting < self.max_starting and fn.starting + fn.resetting < waiting:
            self._start(fn, now)

    def _start_failed(self, fn: Function, now: float, error: object) -> None:
        """The sandbox started for the oldest waiter failed (it has left STARTING): reject that waiter."""
        if fn.waiting:
            rid, _ = fn.waiting.popitem(last=False)
            if not fn.waiting:
                self._queued.discard(fn)
            self._finish(fn)
            self._effects.append(Reject(rid, RejectReason.INIT_FAILED, error))
        self._refill(fn, now)

    def _retire(self, fn: Function, now: float) -> None:
        """Stop every idle or starting sandbox of `fn` not of its current generation (all of them, if
        deleted); busy ones stop when released."""
        reason = StopReason.DELETED if fn.deleted else StopReason.RETIRED
        for sb in list(fn.members.values()):
            if sb.generation == fn.generation and not fn.deleted:
                continue
            if sb.state is _IDLE or sb.state is _STARTING or sb.state is _RESETTING:
                self._stop(sb, reason)
        self._refill(fn, now)
