"""The Runtime API endpoint of one sandbox as a sans-IO state machine (in h11's style): what the
runtime may do next, and what each of its calls means, with no sockets, futures or clocks.

The runtime drives it with three calls (`/next`, a result POST, `/init/error`); ember drives it with
`deliver` (an invocation was assigned here), `take` (the parked or next `/next` receives it) and `stop`.
Every move goes through `_move`, which checks it against MOVES; an illegal move is a bug in ember and
raises, never a silent drift.

  INIT ──next──▶ IDLE ──deliver──▶ ASSIGNED ──take──▶ RUNNING ──result──▶ ANSWERED ──next──▶ IDLE
   │              ▲                                    │
   │ init_error   └─────────── (READY / RESET) ─────── │ next before answering: BROKEN (discarded)
   ▼                                                   ▼
  FAILED                    any state ──stop──▶ STOPPED

Rules:
  - The first `/next` ends init (READY). A `/next` after a result makes the sandbox idle again (RESET):
    Lambda counts the runtime's turn back to `/next` as part of the invocation.
  - A result is accepted only for the invocation the runtime was given (RUNNING, matching id);
    anything else is answered 400 and changes nothing.
  - `/next` while RUNNING means the runtime dropped its invocation: BROKEN; the host fails the
    invocation (Runtime.InvalidStateTransition) and discards the sandbox.
  - `/init/error` is accepted only during init (403 after).
  - Once STOPPED or FAILED nothing but `stop` moves it; `/next` is refused.
"""

from __future__ import annotations

from enum import StrEnum


class EState(StrEnum):
    INIT = "init"  # spawned, has not asked for work yet
    IDLE = "idle"  # ready, no invocation (a /next may be parked)
    ASSIGNED = "assigned"  # an invocation is here, the runtime has not fetched it yet
    RUNNING = "running"  # the runtime holds the invocation
    ANSWERED = "answered"  # it posted the result; the next /next makes it idle again
    BROKEN = "broken"  # asked for more work without answering: to be discarded
    FAILED = "failed"  # reported an init error: to be discarded
    STOPPED = "stopped"  # being killed, or gone


class Signal(StrEnum):
    """What a `/next` means for the sandbox's owner."""

    NONE = "none"  # nothing new: hand the assigned invocation, or park
    READY = "ready"  # init is over: the sandbox can take work
    RESET = "reset"  # the last invocation is fully over: idle again
    BROKEN = "broken"  # the running invocation was dropped by the runtime
    REFUSE = "refuse"  # stopping: answer 500 and let it exit


_DONE = frozenset({EState.BROKEN, EState.FAILED, EState.STOPPED})

MOVES: dict[EState, frozenset[EState]] = {
    EState.INIT: frozenset({EState.IDLE, EState.FAILED, EState.STOPPED}),
    EState.IDLE: frozenset({EState.ASSIGNED, EState.STOPPED}),
    EState.ASSIGNED: frozenset({EState.RUNNING, EState.STOPPED}),
    EState.RUNNING: frozenset({EState.ANSWERED, EState.BROKEN, EState.STOPPED}),
    EState.ANSWERED: frozenset({EState.IDLE, EState.STOPPED}),
    EState.BROKEN: frozenset({EState.STOPPED}),
    EState.FAILED: frozenset({EState.STOPPED}),
    EState.STOPPED: frozenset(),
}


class IllegalMove(AssertionError):
    """ember asked the endpoint for a move its rules forbid: a bug, not a runtime's misbehaviour."""


class Endpoint:
    """One sandbox's Runtime API state. `request_id` is the invocation it holds (ASSIGNED, RUNNING)."""

    __slots__ = ("request_id", "state")

    def __init__(self) -> None:
        self.state = EState.INIT
        self.request_id: str | None = None

    def _move(self, to: EState) -> None:
        if to not in MOVES[self.state]:
            raise IllegalMove(f"endpoint: {self.state} -> {to} is not a legal move")
        self.state = to

    # ------------------------------------------------------------------ the runtime's calls

    def next(self) -> Signal:
        """The runtime asked for work (`GET /next`)."""
        s = self.state
        if s is EState.INIT:
            self._move(EState.IDLE)
            return Signal.READY
        if s is EState.ANSWERED:
            self._move(EState.IDLE)
            return Signal.RESET
        if s is EState.RUNNING:
            self._move(EState.BROKEN)
            self.request_id = None
            return Signal.BROKEN
        if s is EState.STOPPED or s is EState.FAILED:
            return Signal.REFUSE
        return Signal.NONE  # IDLE (park again), ASSIGNED (hand it over), BROKEN (park until killed)

    def result(self, request_id: str) -> bool:
        """The runtime posted a response or an error for `request_id`; False: not its invocation (400)."""
        if self.state is not EState.RUNNING or self.request_id != request_id:
            return False
        self._move(EState.ANSWERED)
        self.request_id = None
        return True

    def init_error(self) -> bool:
        """The runtime reported that init failed; False: init was already over (403)."""
        if self.state is not EState.INIT:
            return False
        self._move(EState.FAILED)
        return True

    # ------------------------------------------------------------------ ember's calls

    def deliver(self, request_id: str) -> None:
        """An invocation was assigned to this sandbox (it must be idle: one at a time)."""
        self._move(EState.ASSIGNED)
        self.request_id = request_id

    def take(self) -> str:
        """A `/next` receives the assigned invocation."""
        self._move(EState.RUNNING)
        assert self.request_id is not None
        return self.request_id

    def stop(self) -> None:
        if self.state is not EState.STOPPED:
            self._move(EState.STOPPED)
        self.request_id = None

    # ------------------------------------------------------------------ questions

    @property
    def initialising(self) -> bool:
        return self.state is EState.INIT

    @property
    def answered(self) -> bool:
        return self.state is EState.ANSWERED

    @property
    def done(self) -> bool:
        return self.state in _DONE
