"""ember in one process: the frontend, the control plane, the core and this node's sandboxes.

Startup prints exactly one line, starting `ember listening on http://HOST:PORT`, once requests are
accepted, followed by whether authentication is on: ` (auth on: SigV4, N keys)` or ` (auth off)`.
SIGTERM or SIGINT: stop accepting, let in-flight invokes finish (bounded by `drain_s`), stop every
sandbox and wait for each process to be gone, then return (exit 0).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import orjson

from ember.api.control import ControlPlane, Settings
from ember.api.cwlogs import CloudWatchLogs
from ember.api.frontend import Frontend
from ember.boot import Boot
from ember.core.assignment import Assigner
from ember.core.keepalive import policy_from_name
from ember.invoke.asyncq import AsyncInvoker
from ember.invoke.local import LocalInvoker
from ember.observe.funclogs import LogStore
from ember.observe.metrics import Observer
from ember.observe.ops import Operations
from ember.observe.reqctx import RequestIdFilter
from ember.options import ServeOptions

__all__ = ["JsonFormatter", "ServeOptions", "run", "serve", "setup_logging"]

log = logging.getLogger("ember.server")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and any context (request_id, ...)."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._skip:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if not sys.stderr.isatty():
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RequestIdFilter())  # request-scoped lines carry request_id
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(opts: ServeOptions, stop: asyncio.Event | None = None) -> None:
    """The composition root of the single node: every part is built here and handed what it uses."""
    boot = Boot(opts, stop)
    boot.begin()
    store = boot.store()
    core = Assigner(
        account_limit=opts.account_concurrency,
        max_starting=opts.max_starting,
        max_waiting=opts.max_waiting,
        keep_alive=policy_from_name(opts.keep_alive),
        verify_each_step=opts.debug_verify,
    )
    settings = Settings.of(opts)
    control = ControlPlane(store, settings, account_limit=opts.account_concurrency)
    isolation = await boot.isolation()
    logs = LogStore(opts.data_dir / "logs", lambda: list(control.functions))
    observer = Observer(core, logs)
    invoker = LocalInvoker(core, control.launch_spec, observer, isolation)
    control.subscribe(invoker)
    invoker.start()
    asyncq = AsyncInvoker(
        opts.data_dir,
        control.functions,
        invoker.invoke,
        control.arn,
        control.retry_policy,
        max_inflight=opts.async_concurrency,
        delay_scale=opts.async_delay_scale,
    )
    await asyncq.start()
    frontend = Frontend(control, invoker, asyncq)
    app = boot.app()
    ops = Operations(control, observer, logs, invoker.procs, invoker.loop.time, asyncq)
    ops.routes(app)  # /metrics, /_ember/stats|logs, /dashboard: before the frontend's catch-all route
    ops.start()
    CloudWatchLogs(control, logs).routes(app)  # POST / with X-Amz-Target Logs_20140328.*: before the catch-all
    frontend.routes(app)

    async def stop_invoking() -> None:
        await invoker.drain(1.0)
        await invoker.stop()

    boot.on_close(ops.stop)  # writes the function logs still buffered
    boot.on_close(stop_invoking)
    boot.on_close(lambda: asyncq.stop(drain_s=min(opts.drain_s, 5.0)))  # running events finish or stay queued
    url = await boot.listen(app)
    settings.endpoint = url
    print(f"ember listening on {url} ({boot.auth_note()})", flush=True)
    log.info("started", extra={"data_dir": str(opts.data_dir), "functions": len(control.functions)})
    try:
        await boot.stop.wait()
    finally:
        log.info("stopping: draining in-flight invokes", extra={"drain_s": opts.drain_s})
        frontend.accepting = False
        await boot.close()
        log.info("stopped")


def run(opts: ServeOptions) -> None:
    import uvloop

    setup_logging()
    uvloop.run(serve(opts))
