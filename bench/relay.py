"""The floor: the thinnest relay from Lambda's Invoke API to awslambdaric runtimes.

ember's warm path is judged against this: same framework (aiohttp on uvloop), same runtime client,
same function, but no bookkeeping, limits, logs or routing beyond "next idle runtime". Whatever
ember costs above this relay is ember's own overhead.

Invoke:   POST /2015-03-31/functions/{name}/invocations
Runtimes: GET  /2018-06-01/runtime/invocation/next          (long poll)
          POST /2018-06-01/runtime/invocation/{id}/response  (202)
          POST /2018-06-01/runtime/invocation/{id}/error     (202)

All N runtimes share the relay's one port. A runtime that dies while parked is not detected:
this is a bench floor, not a platform.

    python bench/relay.py --port 9000 --code bench/noop --handler app.handler --runtimes 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from types import TracebackType

from aiohttp import web
from proctools import die_with_parent

Item = tuple[str, bytes, str]  # request id, event body, function name
Result = tuple[bytes, bool]  # payload, is function error

_INVOKE_PREFIX, _INVOKE_SUFFIX = "/2015-03-31/functions/", "/invocations"
_NEXT = "/2018-06-01/runtime/invocation/next"
_RUNTIME_PREFIX = "/2018-06-01/runtime/invocation/"
_ACCEPTED = b'{"status":"OK"}'
_ARN = "arn:aws:lambda:us-east-1:000000000000:function:"
_TRACE = "Root=1-00000000-000000000000000000000000;Parent=0000000000000000;Sampled=0"


class Relay:
    """Invoke relay plus its runtime pool; `async with Relay(...) as url:` or start()/stop()."""

    def __init__(
        self,
        code: str | os.PathLike[str],
        handler: str = "app.handler",
        runtimes: int = 16,
        host: str = "127.0.0.1",
        port: int = 0,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        runtime_output: int | None = asyncio.subprocess.DEVNULL,
        runtime: str = "python3.12",
    ) -> None:
        self.code = Path(code).resolve()
        self.handler = handler
        self.runtimes = runtimes
        self.host = host
        self.port = port
        self.python = python
        self.extra_env = env or {}
        self.runtime_output = runtime_output
        self.runtime = runtime
        self.url = ""
        self._idle: deque[asyncio.Future[Item]] = deque()  # parked /next polls
        self._queued: deque[Item] = deque()  # invokes that found no idle runtime
        self._pending: dict[str, asyncio.Future[Result]] = {}
        self._ready = asyncio.Event()
        self._procs: list[asyncio.subprocess.Process] = []
        self._runner: web.ServerRunner | None = None

    # --- HTTP handlers -------------------------------------------------------------------------

    async def _dispatch(self, request: web.BaseRequest) -> web.Response:
        """Route by string prefix: aiohttp's low-level server, no router or middleware chain."""
        path, method = request.path, request.method
        if method == "POST" and path.startswith(_INVOKE_PREFIX) and path.endswith(_INVOKE_SUFFIX):
            return await self._invoke(request, path[len(_INVOKE_PREFIX) : -len(_INVOKE_SUFFIX)])
        if method == "GET" and path == _NEXT:
            return await self._next()
        if method == "POST" and path.startswith(_RUNTIME_PREFIX):
            rid, _, kind = path[len(_RUNTIME_PREFIX) :].partition("/")
            if kind in ("response", "error"):
                return await self._complete(request, rid, failed=kind == "error")
        return web.Response(status=404)

    async def _invoke(self, request: web.BaseRequest, name: str) -> web.Response:
        rid = str(uuid.uuid4())
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        item = (rid, await request.read(), name)
        idle = self._idle
        while idle:
            parked = idle.popleft()
            if not parked.done():
                parked.set_result(item)
                break
        else:
            self._queued.append(item)
        payload, failed = await fut
        headers = {
            "Content-Type": "application/json",
            "X-Amz-Executed-Version": "$LATEST",
            "x-amzn-RequestId": rid,
        }
        if failed:
            headers["X-Amz-Function-Error"] = "Unhandled"
        return web.Response(body=payload, headers=headers)

    async def _next(self) -> web.Response:
        if self._queued:
            rid, body, name = self._queued.popleft()
        else:
            fut: asyncio.Future[Item] = asyncio.get_running_loop().create_future()
            self._idle.append(fut)
            if not self._ready.is_set() and len(self._idle) >= self.runtimes:
                self._ready.set()
            rid, body, name = await fut
        return web.Response(
            body=body,
            headers={
                "Content-Type": "application/json",
                "Lambda-Runtime-Aws-Request-Id": rid,
                "Lambda-Runtime-Deadline-Ms": str(int(time.time() * 1000) + 900_000),
                "Lambda-Runtime-Invoked-Function-Arn": _ARN + name,
                "Lambda-Runtime-Trace-Id": _TRACE,
            },
        )

    async def _complete(self, request: web.BaseRequest, rid: str, failed: bool) -> web.Response:
        body = await request.read()
        fut = self._pending.pop(rid, None)
        if fut is None:
            return web.json_response({"errorMessage": "unknown request id"}, status=400)
        if not fut.done():
            fut.set_result((body, failed))
        return web.Response(status=202, body=_ACCEPTED, content_type="application/json")

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, ready_timeout: float = 60.0) -> str:
        """Serve, start the runtimes, and return the base URL once every runtime has polled /next."""
        server = web.Server(self._dispatch, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"http://{self.host}:{self.port}"
        try:
            # The environment Lambda (and ember) give a python3.12 runtime. AWS_EXECUTION_ENV matters
            # for speed: awslambdaric polls /next from a thread for python3.12+.
            env = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "LANG": "en_US.UTF-8",
                "TZ": ":UTC",
                "LAMBDA_TASK_ROOT": str(self.code),
                "_HANDLER": self.handler,
                "PYTHONPATH": str(self.code),
                "AWS_LAMBDA_RUNTIME_API": f"{self.host}:{self.port}",
                "AWS_EXECUTION_ENV": f"AWS_Lambda_{self.runtime}",
                "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_LAMBDA_FUNCTION_NAME": "relay",
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
                "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
                **self.extra_env,
            }
            for _ in range(self.runtimes):
                self._procs.append(
                    await asyncio.create_subprocess_exec(
                        self.python,
                        "-m",
                        "awslambdaric",
                        self.handler,
                        cwd=self.code,
                        env=env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=self.runtime_output,
                        stderr=self.runtime_output,
                        start_new_session=True,
                        preexec_fn=die_with_parent(signal.SIGKILL),
                    )
                )
            waiter = asyncio.ensure_future(self._ready.wait())
            exits = [asyncio.ensure_future(p.wait()) for p in self._procs]
            done, _ = await asyncio.wait([waiter, *exits], timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
            for f in (waiter, *exits):
                f.cancel()
            if waiter not in done:
                dead = sum(p.returncode is not None for p in self._procs)
                raise RuntimeError(f"runtimes not ready: {len(self._idle)}/{self.runtimes} polled, {dead} exited")
        except BaseException:
            await self.stop()
            raise
        return self.url

    async def stop(self) -> None:
        """Kill the runtimes, fail anything in flight, close the server. Safe to call twice."""
        procs, self._procs = self._procs, []
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for p in procs:
            await p.wait()
        for parked in self._idle:
            parked.cancel()
        self._idle.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result((b'{"errorMessage":"relay stopped"}', True))
        self._pending.clear()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _serve(args: argparse.Namespace) -> None:
    relay = Relay(
        args.code,
        args.handler,
        args.runtimes,
        args.host,
        args.port,
        env=dict(kv.split("=", 1) for kv in args.env),
        runtime_output=None if args.verbose else asyncio.subprocess.DEVNULL,
        runtime=args.runtime,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with relay as url:
        print(f"relay listening on {url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--code", default=str(Path(__file__).with_name("noop")), help="function code dir")
    p.add_argument("--handler", default="app.handler")
    p.add_argument("--runtimes", type=int, default=16, help="runtime processes (= max concurrency)")
    p.add_argument("--runtime", default="python3.12", help="Lambda runtime name, for AWS_EXECUTION_ENV")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra runtime env var")
    p.add_argument("--verbose", action="store_true", help="show the runtimes' stdout/stderr")
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
