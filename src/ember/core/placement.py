"""Placement: which worker gets a new sandbox. A pure function over what the leader knows of workers.

Rules, in order: never a worker that is leaving or unhealthy; never one without room for the
sandbox's memory; then spread a function's sandboxes (fewest of this function first, so losing one
worker loses as few of them as possible); then most free memory; then the lowest id (deterministic,
like the model's tie break).
"""

from __future__ import annotations

__all__ = ["WorkerInfo", "place"]


class WorkerInfo:
    """A leader's view of one worker: its session's incarnation, capacity and what is placed on it."""

    __slots__ = (
        "capacity_mb", "healthy", "id", "incarnation", "leaving", "per_function", "reported_free_mb", "used_mb",
    )

    def __init__(self, wid: str, incarnation: int, capacity_mb: int = 4096) -> None:
        self.id = wid
        self.incarnation = incarnation
        self.capacity_mb = capacity_mb
        self.reported_free_mb = capacity_mb  # what the worker last said it has free (all partitions)
        self.used_mb = 0  # memory of this leader's sandboxes on it
        self.per_function: dict[str, int] = {}
        self.leaving = False
        self.healthy = True

    @property
    def free_mb(self) -> int:
        return min(self.capacity_mb - self.used_mb, self.reported_free_mb)

    def add(self, function: str, memory_mb: int) -> None:
        self.used_mb += memory_mb
        self.per_function[function] = self.per_function.get(function, 0) + 1

    def remove(self, function: str, memory_mb: int) -> None:
        self.used_mb -= memory_mb
        n = self.per_function.get(function, 0) - 1
        assert n >= 0 and self.used_mb >= 0, (self.id, function)
        if n:
            self.per_function[function] = n
        else:
            self.per_function.pop(function, None)


def place(workers: dict[str, WorkerInfo], function: str, memory_mb: int) -> WorkerInfo | None:
    """The worker for a new sandbox of `function`, or None when no worker can take it."""
    best: WorkerInfo | None = None
    best_key: tuple[int, int, str] | None = None
    for w in workers.values():
        if w.leaving or not w.healthy or w.free_mb < memory_mb:
            continue
        key = (w.per_function.get(function, 0), -w.free_mb, w.id)
        if best_key is None or key < best_key:
            best, best_key = w, key
    return best
