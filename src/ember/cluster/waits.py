"""Event waits instead of poll loops, for the cluster's I/O shells."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class Signal:
    """Wakes every waiter at each `notify()`. A waiter reads the state, then waits (bounded) on the
    event current at that moment, so a notify between the two is never missed; no poll loop."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `done()` (re-checked at every notify), at most timeout_s. True if it holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done():
            left = deadline - loop.time()
            if left <= 0:
                return False
            event = self._event
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await event.wait()
        return True
