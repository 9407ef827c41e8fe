"""Who leads each partition now, from a watch on `partitions/`: for frontends (acquires) and workers
(READY, RELEASE, GONE go to whoever leads now). Waiters can sleep until the leader of a partition
changes, which is how a frontend notices a failover without polling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from ember.cluster.etcd import Etcd, WatchEvent, loads, prefix_end

log = logging.getLogger("ember.cluster.leaders")


class LeaderMap:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.leaders: dict[int, tuple[str, int]] = {}  # partition -> (url, epoch)
        self._changed: dict[int, asyncio.Event] = {}
        self._deadlines: dict[int, set[asyncio.Timeout]] = {}  # attempts to cut short at a change
        self._task: asyncio.Task[None] | None = None
        self.leader_changes = 0  # changes of some partition's leader seen (a failover, a first election)
        self.attempts_interrupted = 0  # acquires in flight cut short by a leader change

    def counters(self) -> dict[str, int]:
        return {"leader_changes": self.leader_changes, "acquires_interrupted": self.attempts_interrupted}

    def get(self, p: int) -> tuple[str, int] | None:
        return self.leaders.get(p)

    def changed(self, p: int) -> asyncio.Event:
        """An event set at the next change of partition p's leader (a fresh one after each change)."""
        ev = self._changed.get(p)
        if ev is None:
            ev = self._changed[p] = asyncio.Event()
        return ev

    @contextlib.contextmanager
    def interrupting(self, p: int, deadline: asyncio.Timeout) -> Iterator[None]:
        """While inside, a change of partition p's leader moves `deadline` to now: the attempt ends."""
        waiting = self._deadlines.setdefault(p, set())
        waiting.add(deadline)
        try:
            yield
        finally:
            waiting.discard(deadline)

    async def start(self) -> None:
        revision = await self._snapshot()
        self._task = asyncio.create_task(
            self.etcd.follow("partitions/", prefix_end("partitions/"), self._snapshot, self._on_event, revision))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _snapshot(self) -> int:
        docs, rev = await self.etcd.get_prefix("partitions/")
        fresh: dict[int, tuple[str, int]] = {}
        for key in docs:
            p = _partition(key)
            kv = await self.etcd.get(key)
            if p is not None and kv is not None:
                fresh[p] = (loads(kv.value)["url"], kv.create_revision)
        for p in set(fresh) | set(self.leaders):
            self._set(p, fresh.get(p))
        return rev

    def _set(self, p: int, leader: tuple[str, int] | None) -> None:
        if self.leaders.get(p) == leader:
            return
        if leader is None:
            self.leaders.pop(p, None)
        else:
            self.leaders[p] = leader
        self.leader_changes += 1
        ev = self._changed.pop(p, None)
        if ev is not None:
            ev.set()
        waiting = self._deadlines.get(p)
        if waiting:
            now = asyncio.get_running_loop().time()
            for deadline in waiting:
                deadline.reschedule(now)
            self.attempts_interrupted += len(waiting)

    def _on_event(self, ev: WatchEvent) -> None:
        p = _partition(ev.key)
        if p is None:
            return
        if ev.type == "put" and ev.value is not None:
            self._set(p, (loads(ev.value)["url"], ev.revision))  # created: mod == create revision
        else:
            self._set(p, None)


def _partition(key: str) -> int | None:
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "partitions" and parts[2] == "leader":
        return int(parts[1])
    return None
