"""ember in one process: the frontend, the control plane, the core and this node's sandboxes.

Startup prints exactly one line, starting `ember listening on http://HOST:PORT`, once requests are
accepted, followed by whether authentication is on: ` (auth on: SigV4, N keys)` or ` (auth off)`.
SIGTERM or SIGINT: stop accepting, let in-flight invokes finish (bounded by `drain_s`), stop every
sandbox and wait for each process to be gone, then return (exit 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web

from ember.api import auth
from ember.api.control import ControlPlane, Settings
from ember.api.frontend import Frontend
from ember.core.assignment import Assigner
from ember.core.keepalive import policy_from_name
from ember.invoke.asyncq import AsyncInvoker
from ember.invoke.local import Worker
from ember.observe.ops import Operations
from ember.observe.reqctx import RequestIdFilter
from ember.sandbox.isolation import Isolation, IsolationConfig
from ember.store import Store

log = logging.getLogger("ember.server")


@dataclass(slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 9000
    data_dir: Path = Path(".ember")
    account_concurrency: int = 1000
    max_starting: int = 4
    max_waiting: int = 128
    keep_alive: str = "default"
    drain_s: float = 30.0
    region: str = "us-east-1"
    async_concurrency: int = 32
    async_delay_scale: float = 1.0
    credentials: dict[str, str] | None = None  # ACCESS_KEY_ID -> secret (ember.api.auth); None: auth off
    insecure: bool = False  # allow a non-loopback address without credentials
    isolation: str = "auto"  # auto | bwrap | none (ember.sandbox.isolation)
    pool: int = 2  # pre-started python runtimes (ember.sandbox.pool); 0: none
    ephemeral_storage_mb: int = 512  # each sandbox's /tmp


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
    refusal = auth.bind_refusal(opts.host, bool(opts.credentials), opts.insecure)
    if refusal:
        raise SystemExit(refusal)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(opts.data_dir)
    core = Assigner(
        account_limit=opts.account_concurrency,
        max_starting=opts.max_starting,
        max_waiting=opts.max_waiting,
        keep_alive=policy_from_name(opts.keep_alive),
    )
    settings = Settings(region=opts.region, endpoint=f"http://{opts.host}:{opts.port}")
    control = ControlPlane(store, core, settings)
    try:
        isolation = Isolation(
            IsolationConfig(mode=opts.isolation, pool=opts.pool, ephemeral_mb=opts.ephemeral_storage_mb),
            opts.data_dir,
        )
    except (ValueError, RuntimeError) as exc:
        store.close()
        raise SystemExit(f"ember: {exc}") from None
    await isolation.start()
    worker = Worker(core, control.launch_spec, isolation)
    worker.start()
    asyncq = AsyncInvoker(
        opts.data_dir,
        control.functions,
        worker.invoke,
        control.arn,
        control.retry_policy,
        max_inflight=opts.async_concurrency,
        delay_scale=opts.async_delay_scale,
    )
    await asyncq.start()
    frontend = Frontend(control, worker, asyncq)
    middlewares = [auth.middleware(auth.Verifier(opts.credentials))] if opts.credentials else []
    app = web.Application(client_max_size=80 * 1024 * 1024, middlewares=middlewares)
    ops = Operations(control, worker, opts.data_dir, asyncq)  # /metrics, /_ember/stats|logs, /dashboard
    ops.routes(app)  # before the frontend's catch-all route
    ops.start()
    frontend.routes(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=opts.drain_s)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port, backlog=1024, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await asyncq.stop()
        await worker.stop()
        await isolation.close()
        await ops.stop()
        store.close()
        raise SystemExit(f"ember: cannot listen on {opts.host}:{opts.port}: {exc.strerror}") from None
    port = runner.addresses[0][1]
    settings.endpoint = f"http://{opts.host}:{port}"
    keys = len(opts.credentials or ())
    auth_note = f"auth on: SigV4, {keys} key{'s' * (keys != 1)}" if keys else "auth off"
    print(f"ember listening on http://{opts.host}:{port} ({auth_note})", flush=True)
    log.info("started", extra={"data_dir": str(opts.data_dir), "functions": len(control.functions)})
    try:
        await stop.wait()
    finally:
        log.info("stopping: draining in-flight invokes", extra={"drain_s": opts.drain_s})
        frontend.accepting = False
        await runner.cleanup()  # stops listening, waits (bounded) for in-flight requests
        await asyncq.stop(drain_s=min(opts.drain_s, 5.0))  # running events finish or stay queued
        await worker.drain(1.0)
        await worker.stop()
        await isolation.close()  # the pool, then ember's cgroups
        await ops.stop()  # writes the function logs still buffered
        store.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")


def run(opts: ServeOptions) -> None:
    import uvloop

    setup_logging()
    uvloop.run(serve(opts))
