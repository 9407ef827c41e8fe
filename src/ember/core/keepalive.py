"""Keep-alive policies: how long an idle sandbox stays warm before it is evicted.

A policy is asked once per sandbox that turns idle (`idle_until`), so its cost lands on the release
path and must be O(1). Policies that learn from arrivals (histograms of idle times) set
`observes_arrivals` and get `on_arrival` for each accepted invoke. The same policy objects drive the
server and the trace simulator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ember.core.assignment import Function


class KeepAlivePolicy(Protocol):
    name: str
    observes_arrivals: bool

    def on_arrival(self, fn: Function, now: float) -> None: ...

    def idle_until(self, fn: Function, now: float) -> float:
        """When a sandbox of `fn` that turns idle at `now` should be evicted."""
        ...


class FixedKeepAlive:
    """AWS-style fixed keep-alive: every idle sandbox lives `seconds` after its last use."""

    observes_arrivals = False

    def __init__(self, seconds: float = 600.0) -> None:
        assert seconds >= 0
        self.seconds = seconds
        self.name = f"fixed-{seconds / 60:g}m"

    def on_arrival(self, fn: Function, now: float) -> None:  # pragma: no cover - not observed
        pass

    def idle_until(self, fn: Function, now: float) -> float:
        return now + self.seconds


def policy_from_name(name: str) -> KeepAlivePolicy:
    """`fixed-<N>m` or `fixed-<N>s`; `default` is fixed 10 minutes until a smarter policy lands."""
    if name == "default":
        return FixedKeepAlive(600.0)
    if name.startswith("fixed-"):
        spec = name[len("fixed-"):]
        unit = {"m": 60.0, "s": 1.0}.get(spec[-1:])
        try:
            value = float(spec[:-1])
        except ValueError:
            value = -1.0
        if unit is not None and value >= 0:
            return FixedKeepAlive(value * unit)
    raise ValueError(f"unknown keep-alive policy {name!r} (expected fixed-<N>m, fixed-<N>s or default)")
