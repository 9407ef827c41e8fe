"""The routing table's records: a function, a sandbox and a sandbox's state.

Both the assigner (ember.core.assignment, which owns the table and moves sandboxes between states)
and the keep-alive policies (ember.core.keepalive, which read a function's counters) need these, so
they live here and imports go one way: table <- keepalive <- assignment.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from enum import IntEnum
from functools import wraps
from typing import Any

__all__ = ["Function", "Sandbox", "State"]


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
        self.starting = 0  # sandboxes in STARTING
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


def verify_after_each(obj: Any, transitions: tuple[str, ...]) -> None:
    """Wrap `obj`'s public transitions so that `obj.verify()` runs after each outermost one (a transition
    may call others: release calls finish). For tests, replay and `--debug-verify`; off, it costs nothing."""
    depth = 0

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(method)
        def step(*args: Any, **kwargs: Any) -> Any:
            nonlocal depth
            depth += 1
            try:
                out = method(*args, **kwargs)
            finally:
                depth -= 1
            if not depth:
                obj.verify()
            return out

        return step

    for name in transitions:
        setattr(obj, name, wrap(getattr(obj, name)))
