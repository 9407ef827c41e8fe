"""The start-up and shutdown every entry point shares (`ember serve` and each cluster role): refuse an
unauthenticated public bind, handle SIGTERM/SIGINT, open the data dir's store, set up isolation,
build the app, listen, print the one listening line, and on stop undo it all in reverse order.

What runs in between (the composition: which frontend, invoker, core) is the entry point's own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ember.api import auth
from ember.options import ServeOptions
from ember.sandbox.isolation import Isolation, IsolationConfig
from ember.store import Store

log = logging.getLogger("ember.boot")

MAX_BODY_BYTES = 80 * 1024 * 1024  # a 50 MB zip, base64-encoded in JSON
BACKLOG = 1024

Closer = Callable[[], Awaitable[Any] | None]


class Boot:
    def __init__(self, opts: ServeOptions, stop: asyncio.Event | None = None) -> None:
        self.opts = opts
        self.stop = stop or asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._closers: list[Closer] = []  # run last-first on close
        self._signals = False

    def begin(self) -> None:
        """Checks that need nothing yet, then the signal handlers."""
        opts = self.opts
        refusal = auth.bind_refusal(opts.host, bool(opts.credentials), opts.insecure)
        if refusal:
            raise SystemExit(refusal)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop.set)
        self._signals = True

    def on_close(self, closer: Closer) -> None:
        self._closers.append(closer)

    def store(self) -> Store:
        self.opts.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(self.opts.data_dir)
        self.on_close(store.close)
        return store

    async def isolation(self) -> Isolation:
        opts = self.opts
        try:
            isolation = Isolation(
                IsolationConfig(
                    mode=opts.isolation,
                    pool=opts.pool,
                    ephemeral_mb=opts.ephemeral_storage_mb,
                    network=opts.network,
                    deny_private=opts.deny_private,
                ),
                opts.data_dir,
            )
        except (ValueError, RuntimeError) as exc:
            await self.close()
            raise SystemExit(f"ember: {exc}") from None
        await isolation.start()
        self.on_close(isolation.close)  # the pool, then ember's cgroups
        return isolation

    def app(self, authenticate: bool = True) -> web.Application:
        creds = self.opts.credentials
        middlewares = [auth.middleware(auth.Verifier(creds))] if creds and authenticate else []
        return web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)

    def auth_note(self) -> str:
        keys = len(self.opts.credentials or ())
        return f"auth on: SigV4, {keys} key{'s' * (keys != 1)}" if keys else "auth off"

    async def listen(self, app: web.Application) -> str:
        """Serve `app`; returns its URL. A port that cannot be bound ends ember with the reason."""
        opts = self.opts
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=opts.drain_s)
        await runner.setup()
        site = web.TCPSite(runner, opts.host, opts.port, backlog=BACKLOG, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self.close()
            raise SystemExit(f"ember: cannot listen on {opts.host}:{opts.port}: {exc.strerror}") from None
        self.runner = runner
        self.port = runner.addresses[0][1]
        return f"http://{opts.host}:{self.port}"

    async def close(self) -> None:
        """Stop listening (in-flight requests finish, bounded by drain_s), then undo the rest last-first."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()
        while self._closers:
            result = self._closers.pop()()
            if result is not None:
                await result
        if self._signals:
            self._signals = False
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.remove_signal_handler(sig)
