"""The asynchronous invocation queue's brain: which event goes next, and what happens after it ran.

Sans-IO, like the assigner: events and time go in, decisions come out; the shell (ember.invoke.asyncq)
persists every decision before it acts on it, so a crash loses nothing (tenet 1).

Rules (checked by tests/test_eventqueue.py):
  Q1  Every accepted event is, at every moment, exactly one of: ready, delayed (retry at a time),
      in flight, or finished (deleted, delivered to a destination, or dropped and counted).
  Q2  Functions are served fairly: round-robin over functions that have ready events, so one
      function's backlog never delays another function's fresh events by more than one turn.
  Q3  At most `max_inflight` events are in flight in all, and at most `cap(function)` per function
      (its reserved concurrency, when it has one), so the dispatcher does not throttle itself. A
      function reserved at 0 is paused: its events wait, and expire at their maximum age (Q4).
  Q4  A function error is retried `MaximumRetryAttempts` times (default 2) after 1 min, then 2 min;
      a throttle or an ember-side error puts the event back with backoff from 1 s doubling to 5 min;
      either way an event older than `MaximumEventAgeInSeconds` (default 6 h) is not run again.
      All delays and ages are multiplied by `delay_scale` (tests shrink time; the logic stays).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

FUNCTION_ERROR_DELAYS = (60.0, 120.0)
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 300.0
DEFAULT_MAX_RETRIES = 2
DEFAULT_MAX_AGE_S = 21600


class Outcome(Enum):
    SUCCESS = "success"
    FUNCTION_ERROR = "function-error"  # the handler failed, timed out or crashed
    THROTTLED = "throttled"  # 429 from the load balancer
    SERVICE_ERROR = "service-error"  # ember could not run it (e.g. function being updated)
    GONE = "gone"  # the function no longer exists


@dataclass(slots=True)
class RetryPolicy:
    """A function's event invoke configuration, as far as the queue needs it."""

    max_retries: int = DEFAULT_MAX_RETRIES
    max_age_s: float = DEFAULT_MAX_AGE_S


class Event:
    """An accepted asynchronous invocation. The payload stays on disk; only this is in memory."""

    __slots__ = ("attempts", "enqueued_at", "function", "id", "not_before", "request_id", "throttles")

    def __init__(
        self,
        eid: int,
        request_id: str,
        function: str,
        enqueued_at: float,
        attempts: int = 0,
        throttles: int = 0,
        not_before: float = 0.0,
    ) -> None:
        self.id = eid
        self.request_id = request_id
        self.function = function
        self.enqueued_at = enqueued_at
        self.attempts = attempts  # runs that ended in a function error
        self.throttles = throttles  # times put back for a throttle or ember-side error
        self.not_before = not_before

    def __repr__(self) -> str:
        return f"Event({self.id}, {self.function!r}, attempts={self.attempts}, throttles={self.throttles})"


class Decision:
    """What to do with an event after a run: finish it (with a condition) or retry it at a time."""

    __slots__ = ("at", "condition", "retry")

    def __init__(self, retry: bool, condition: str = "", at: float = 0.0) -> None:
        self.retry, self.condition, self.at = retry, condition, at

    def __repr__(self) -> str:
        return f"Decision(retry at {self.at})" if self.retry else f"Decision({self.condition})"


class _Queue:
    __slots__ = ("inflight", "ready")

    def __init__(self) -> None:
        self.ready: deque[Event] = deque()
        self.inflight = 0


class EventQueue:
    def __init__(self, max_inflight: int = 32, delay_scale: float = 1.0) -> None:
        assert max_inflight >= 1 and delay_scale > 0
        self.max_inflight = max_inflight
        self.delay_scale = delay_scale
        self.queues: dict[str, _Queue] = {}
        self.caps: dict[str, int] = {}  # per-function in-flight cap (reserved concurrency)
        self._turns: OrderedDict[str, None] = OrderedDict()  # functions with ready events, in turn order
        self._delayed: list[tuple[float, int, Event]] = []
        self.inflight = 0
        self.retries = 0
        self.depth = 0  # events not finished: ready + delayed + in flight

    def _queue(self, function: str) -> _Queue:
        q = self.queues.get(function)
        if q is None:
            q = self.queues[function] = _Queue()
        return q

    # ------------------------------------------------------------------ input

    def add(self, ev: Event, now: float) -> None:
        """An event accepted (or reloaded after a restart: in flight then means ready again)."""
        self.depth += 1
        if ev.not_before > now:
            heapq.heappush(self._delayed, (ev.not_before, ev.id, ev))
        else:
            self._make_ready(ev)

    def set_cap(self, function: str, cap: int | None) -> None:
        if cap is None:
            self.caps.pop(function, None)
        else:
            self.caps[function] = cap
        if function in self.queues and self.queues[function].ready:
            self._turns[function] = None

    def tick(self, now: float) -> None:
        """Delayed events whose time has come become ready."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, _, ev = heapq.heappop(delayed)
            self._make_ready(ev)

    # ------------------------------------------------------------------ output

    def next_ready(self) -> Event | None:
        """The next event to run, taking functions in turn (Q2) within the in-flight caps (Q3)."""
        if self.inflight >= self.max_inflight:
            return None
        turns = self._turns
        for _ in range(len(turns)):
            function, _ = turns.popitem(last=False)
            q = self.queues[function]
            if not q.ready:
                continue
            cap = self.caps.get(function)
            if cap is not None and q.inflight >= cap:
                continue  # not its turn until something of it finishes (finished() re-queues it)
            ev = q.ready.popleft()
            if q.ready:
                turns[function] = None  # to the back of the line
            q.inflight += 1
            self.inflight += 1
            return ev
        return None

    def finished(self, ev: Event, outcome: Outcome, now: float, policy: RetryPolicy) -> Decision:
        """Decide an event's fate after a run (Q4). The shell persists the decision."""
        q = self._queue(ev.function)
        q.inflight -= 1
        self.inflight -= 1
        assert q.inflight >= 0 and self.inflight >= 0
        if q.ready:
            self._turns[ev.function] = None
        if outcome is Outcome.SUCCESS:
            return self._done(ev, "Success")
        if outcome is Outcome.GONE:
            return self._done(ev, "FunctionDeleted")
        expires = ev.enqueued_at + policy.max_age_s * self.delay_scale
        if outcome is Outcome.FUNCTION_ERROR:
            ev.attempts += 1
            if ev.attempts > policy.max_retries:
                return self._done(ev, "RetriesExhausted")
            delay = FUNCTION_ERROR_DELAYS[min(ev.attempts, len(FUNCTION_ERROR_DELAYS)) - 1]
        else:
            delay = min(BACKOFF_FIRST_S * (2**ev.throttles), BACKOFF_MAX_S)
            ev.throttles += 1
        at = now + delay * self.delay_scale
        if at > expires:
            return self._done(ev, "EventAgeExceeded")
        ev.not_before = at
        self.retries += 1
        heapq.heappush(self._delayed, (at, ev.id, ev))
        return Decision(True, at=at)

    def expired(self, ev: Event, now: float, policy: RetryPolicy) -> bool:
        """Checked before a run: an event past its maximum age is not run (Q4)."""
        return now - ev.enqueued_at > policy.max_age_s * self.delay_scale

    def drop(self, ev: Event) -> Decision:
        """An event taken by next_ready that will not run (expired before its turn)."""
        q = self._queue(ev.function)
        q.inflight -= 1
        self.inflight -= 1
        if q.ready:
            self._turns[ev.function] = None
        return self._done(ev, "EventAgeExceeded")

    def expire_paused(self, now: float, max_age_s: Callable[[str], float]) -> list[tuple[Event, Decision]]:
        """Events of paused functions (cap 0) that reached their maximum age, taken out (Q4)."""
        out: list[tuple[Event, Decision]] = []
        for function, cap in self.caps.items():
            q = self.queues.get(function)
            if cap != 0 or q is None or not q.ready:
                continue
            limit = max_age_s(function) * self.delay_scale
            while q.ready and now - q.ready[0].enqueued_at > limit:
                ev = q.ready.popleft()
                out.append((ev, self._done(ev, "EventAgeExceeded")))
        return out

    # ------------------------------------------------------------------ views

    def stats(self, now: float) -> dict[str, dict[str, float]]:
        """Per function: ready, delayed and in-flight events, and the age of the oldest."""
        out: dict[str, dict[str, float]] = {}
        oldest: dict[str, float] = {}
        delayed: dict[str, int] = {}
        for _, _, ev in self._delayed:
            delayed[ev.function] = delayed.get(ev.function, 0) + 1
            if ev.enqueued_at < oldest.get(ev.function, now):
                oldest[ev.function] = ev.enqueued_at
        for function, q in self.queues.items():
            if q.ready and q.ready[0].enqueued_at < oldest.get(function, now):
                oldest[function] = q.ready[0].enqueued_at
            out[function] = {
                "ready": len(q.ready),
                "delayed": delayed.get(function, 0),
                "inflight": q.inflight,
                "oldest_age_s": round(now - oldest[function], 3) if function in oldest else 0.0,
            }
        return out

    # ------------------------------------------------------------------ internals

    def _make_ready(self, ev: Event) -> None:
        q = self._queue(ev.function)
        q.ready.append(ev)
        self._turns[ev.function] = None

    def _done(self, ev: Event, condition: str) -> Decision:
        self.depth -= 1
        return Decision(False, condition=condition)
