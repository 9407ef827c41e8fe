"""Operating ember over HTTP: Prometheus metrics, the stats document behind `ember top` and the
dashboard, function logs, and the dashboard's static files.

Routes (registered before the Lambda API's catch-all):
  GET /metrics                              Prometheus text format (ember.observe.metrics)
  GET /_ember/stats[?window=S&series=1]     functions, sandboxes and account figures (JSON)
  GET /_ember/logs/{function}[?since=MS&stream=S&limit=N&follow=1]
                                            the function's log events, JSON lines, oldest first;
                                            with follow, the response stays open and streams new ones
  GET /_ember/logs/{function}/streams       the function's log streams (JSON)
  GET /dashboard                            the web dashboard (static files in ember/dashboard/)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from ember.api.control import ControlPlane
from ember.api.errors import invalid
from ember.api.frontend import api
from ember.observe import metrics
from ember.observe.funclogs import LogStore
from ember.sandbox.process import SandboxProcess

log = logging.getLogger("ember.observe.ops")

HEARTBEAT_S = 10.0
MAX_LOG_LIMIT = 100_000
DASHBOARD_FILES = {
    "index.html": "text/html",
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
}

_api = api  # the same wrapper as the Lambda API's: a request id, errors in Lambda's wire form


class Operations:
    def __init__(
        self,
        control: ControlPlane,
        observer: metrics.Observer,
        logs: LogStore,
        procs: Mapping[int, SandboxProcess],
        clock: Callable[[], float],
        asyncq: Any = None,
    ) -> None:
        self.control = control
        self.observer = observer
        self.logs = logs
        self.procs = procs  # this node's sandbox processes, by id (ember.sandbox.host)
        self.clock = clock  # the loop's clock, which the core's times are on
        self.registry = metrics.registry(observer, asyncq)
        self._closing = asyncio.Event()
        self._started = False

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/metrics", self.prometheus)
        r.add_get("/_ember/stats", _api(self.stats))
        r.add_get("/_ember/logs/{name}", _api(self.function_logs))
        r.add_get("/_ember/logs/{name}/streams", _api(self.log_streams))
        r.add_get("/dashboard", self.dashboard_redirect)
        r.add_get("/dashboard/", self.dashboard_file)
        r.add_get("/dashboard/{file}", self.dashboard_file)
        app.on_shutdown.append(self._on_shutdown)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.observer.start()
            self.logs.start()

    async def stop(self) -> None:
        """After the last invocation: stop sampling, write what is buffered."""
        self._closing.set()
        await self.observer.stop()
        await self.logs.stop()

    async def _on_shutdown(self, app: web.Application) -> None:
        self._closing.set()  # end `follow` streams, so the server does not wait for them to drain
        await self.logs.stop_following()

    # ------------------------------------------------------------------ metrics and stats

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stats(self, request: web.Request, request_id: str) -> web.StreamResponse:
        q = request.query
        try:
            window = float(q.get("window", metrics.DEFAULT_WINDOW_S))
        except ValueError:
            raise invalid("window must be a number of seconds") from None
        if not 1 <= window <= metrics.HISTORY:
            raise invalid(f"window must be between 1 and {metrics.HISTORY} seconds")
        series = q.get("series", "0") not in ("0", "false", "")
        doc = metrics.stats_document(self.observer, self.procs, self.clock(), window, series)
        return web.Response(
            body=orjson.dumps(doc),
            headers={
                "Content-Type": "application/json",
                "x-amzn-RequestId": request_id,
                "Cache-Control": "no-store",
            },
        )

    # ------------------------------------------------------------------ function logs

    def _function(self, request: web.Request) -> str:
        return self.control.resolve(request.match_info["name"]).name

    async def function_logs(self, request: web.Request, request_id: str) -> web.StreamResponse:
        name = self._function(request)
        q = request.query
        try:
            since = int(q.get("since", "0"))
            limit = int(q.get("limit", "10000"))
        except ValueError:
            raise invalid("since (epoch milliseconds) and limit must be integers") from None
        if not 0 <= limit <= MAX_LOG_LIMIT:
            raise invalid(f"limit must be between 0 and {MAX_LOG_LIMIT}")
        stream = q.get("stream") or None
        follow = q.get("follow", "0") not in ("0", "false", "")
        headers = {"Content-Type": "application/x-ndjson", "x-amzn-RequestId": request_id}
        if not follow:
            lines = await asyncio.to_thread(self.logs.read, name, since, stream, limit)
            return web.Response(body=b"".join(lines), headers=headers)
        history, queue = await self.logs.follow(name, since, stream, limit)
        resp = web.StreamResponse(headers=headers)
        try:
            await resp.prepare(request)
            if history:
                await resp.write(b"".join(history))
            while not self._closing.is_set():
                try:
                    line = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    await resp.write(b"\n")  # a blank line: keeps proxies open, finds a gone client
                    continue
                if line is None:
                    break
                if stream is not None and orjson.loads(line).get("stream") != stream:
                    continue
                await resp.write(line)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.logs.unfollow(name, queue)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp

    async def log_streams(self, request: web.Request, request_id: str) -> web.StreamResponse:
        name = self._function(request)
        streams = await asyncio.to_thread(self.logs.streams, name)
        return web.Response(
            body=orjson.dumps({"logGroupName": f"/aws/lambda/{name}", "logStreams": streams}),
            headers={"Content-Type": "application/json", "x-amzn-RequestId": request_id},
        )

    # ------------------------------------------------------------------ dashboard

    async def dashboard_redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard/")

    async def dashboard_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("file", "index.html") or "index.html"
        content_type = DASHBOARD_FILES.get(name)
        if content_type is None:
            raise web.HTTPNotFound()
        body = resources.files("ember").joinpath("dashboard", name).read_bytes()
        return web.Response(
            body=body, headers={"Content-Type": f"{content_type}; charset=utf-8", "Cache-Control": "no-cache"}
        )

