"""One execution environment: an OS process that speaks only the Lambda Runtime API, on an endpoint
of its own (its own loopback port), so a sandbox can only ever receive its own invocations.

This is I/O: it spawns, talks HTTP, reads the process's output and reports what happened to its
owner (ember.sandbox.host) through `SandboxEvents`. It decides nothing about routing; the core does,
and nothing about the lifecycle; the host does. What the runtime's calls mean is the sans-IO
`Endpoint` (ember.sandbox.endpoint); this file only carries them over HTTP.

Runtime API (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html), base /2018-06-01:
  GET  /runtime/invocation/next            long poll; the first call means init is done
  POST /runtime/invocation/{id}/response   202; the invocation's result
  POST /runtime/invocation/{id}/error      202; a function error
  POST /runtime/init/error                 202; init failed, the process will exit
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson
from aiohttp import web

from ember.sandbox.endpoint import Endpoint, EState, Signal
from ember.sandbox.spawn import ChildProcess

log = logging.getLogger("ember.sandbox.process")
START_ERROR_CHARS = 1000  # of a failed sandbox's output, in its error message

API_PREFIX = "/2018-06-01/runtime/"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
MAX_ERROR_BYTES = 1024 * 1024
LOG_KEEP_BYTES = 64 * 1024  # per invocation; the tail is what callers ask for (4 KB)


class SandboxRef(NamedTuple):
    """What a sandbox knows of itself: its id, its function and the function's generation (revision)."""

    id: int
    function: str
    generation: int


@dataclass(slots=True)
class LaunchSpec:
    """How to start a sandbox: argv, working directory and the complete environment."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    function_arn: str
    memory_mb: int
    timeout_s: float


class Outcome:
    """How an invocation ended, as the caller will see it."""

    __slots__ = ("body", "error_type", "kind")

    OK = "ok"
    FUNCTION_ERROR = "error"  # /error from the runtime, or an ember-side runtime failure
    TIMEOUT = "timeout"
    EXIT = "exit"

    def __init__(self, kind: str, body: bytes, error_type: str | None = None) -> None:
        self.kind, self.body, self.error_type = kind, body, error_type

    @classmethod
    def runtime_error(cls, kind: str, error_type: str, message: str) -> Outcome:
        return cls(kind, orjson.dumps({"errorType": error_type, "errorMessage": message}), error_type)


@dataclass(slots=True, eq=False)
class Invocation:
    """A synchronous invocation on its way through a sandbox."""

    request_id: str
    payload: bytes
    future: asyncio.Future[Outcome]
    client_context: str | None = None
    deadline_ms: int = 0
    started: float = 0.0  # loop time when the runtime received it
    ended: float = 0.0
    log: bytearray = field(default_factory=bytearray)
    cold: bool = False
    init_duration_ms: float = 0.0
    want_tail: bool = False
    max_memory_mb: int = 0
    proc: Any = None  # the SandboxProcess it was handed to (metrics, function logs)


class SandboxEvents(Protocol):
    def sandbox_ready(self, proc: SandboxProcess) -> None: ...
    def sandbox_init_failed(self, proc: SandboxProcess, error: Outcome) -> None: ...
    def sandbox_result(self, proc: SandboxProcess, inv: Invocation, outcome: Outcome) -> None: ...
    def sandbox_exited(self, proc: SandboxProcess, returncode: int) -> None: ...


def _platform_error(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"errorType": error_type, "errorMessage": message}),
        content_type="application/json",
    )


_ACCEPTED = orjson.dumps({"status": "OK"})


PRELOADED_BODY = "ember.body"  # set by ember.api.auth, which reads (and hashes) the body first


async def read_bounded(request: web.BaseRequest, limit: int) -> bytes | None:
    """Read a request body of at most `limit` bytes; None when it is larger (the rest is drained)."""
    preloaded = request.get(PRELOADED_BODY)
    if preloaded is not None:
        return preloaded if len(preloaded) <= limit else None
    length = request.content_length
    if length is not None:
        if length > limit:
            while await request.content.readany():
                pass
            return None
        try:  # the common case: one read of a declared length
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:  # the peer went away mid-body
            return exc.partial
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            while await request.content.readany():
                pass
            return None
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class SandboxProcess:
    """The process, its Runtime API endpoint and its output pipe."""

    def __init__(self, ref: SandboxRef, spec: LaunchSpec, events: SandboxEvents, isolation: Any = None) -> None:
        self.ref = ref
        self.spec = spec
        self.events = events
        self.isolation = isolation  # ember.sandbox.isolation.Isolation: spawns it sandboxed (None: a plain process)
        self.jail: Any = None  # ember.sandbox.isolation.Jail: its uid, cgroup; set by the isolation
        self.loop = asyncio.get_running_loop()
        self.port = 0
        self.pid = 0
        self.endpoint = Endpoint()
        self.stopping = False
        self.exited = asyncio.Event()
        self.spawned_at = 0.0
        self.init_duration_ms = 0.0
        self.invocations = 0
        self._inv: Invocation | None = None  # assigned, until its outcome
        self.timer: asyncio.TimerHandle | None = None  # the running invocation's timeout (the host's)
        self.init_timer: asyncio.TimerHandle | None = None  # the init deadline (the host's)
        self.init_error: Outcome | None = None  # why init failed, once it did
        self._was_ready = False
        self._parked: asyncio.Future[Invocation] | None = None  # a /next waiting for work
        self._watcher: asyncio.Task[None] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None
        self._proc: ChildProcess | None = None  # asyncio's, or ember.sandbox.spawn.SpawnedProcess
        self._out_fd = -1
        self.init_log = bytearray()

    @property
    def ready(self) -> bool:
        """Init finished (the runtime asked for work at least once)."""
        return self._was_ready

    @property
    def resetting(self) -> bool:
        """It answered its invocation and has not asked for the next one yet."""
        return self.endpoint.answered

    @property
    def current(self) -> Invocation | None:
        """The invocation assigned here, until it has an outcome."""
        return self._inv

    # ------------------------------------------------------------------ lifecycle

    async def launch(self) -> None:
        """Open the endpoint, then spawn the runtime pointed at it. Failures are init failures."""
        if self.isolation is not None:
            await self.isolation.launch(self)
            return
        self._web = web.Server(self._handle, access_log=None)
        self._server = await self.loop.create_server(self._web, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        env = dict(self.spec.env)
        env["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{self.port}"
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._out_fd = read_fd
        self.spawned_at = time.perf_counter()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.spec.argv,
                cwd=self.spec.cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                start_new_session=True,
                preexec_fn=_die_with_ember,
            )
        except OSError as exc:
            os.close(write_fd)
            await self.spawn_failed(exc)
            return
        os.close(write_fd)
        self.pid = self._proc.pid
        self.loop.add_reader(read_fd, self._on_output)
        self.watch()

    def watch(self) -> None:
        """Start the task that waits for the process to exit (owned here: one per process)."""
        assert self._watcher is None, "watched twice"
        self._watcher = self.loop.create_task(self._watch())

    async def spawn_failed(self, exc: OSError) -> None:
        """The runtime could not be started at all (no bootstrap, not executable): an init failure
        that goes to the invoke that caused it, then the sandbox is gone. What the sandbox printed before
        it failed (the jail helper's stderr, say) is kept for the function's log, said in the error and
        logged in ember's log: a sandbox that cannot start always says why."""
        self._drain_output()
        self._close_output()
        why = exc.strerror or str(exc)
        printed = _last_lines(bytes(self.init_log))
        if printed:
            why = f"{why}: {printed}"
        log.warning(
            "a sandbox failed to start",
            extra={"function": self.spec.function_arn, "error": exc.strerror or str(exc), "output": printed},
        )
        await self._close_endpoint()
        if self.jail is not None:
            await self.jail.release()
        self.exited.set()
        error = Outcome.runtime_error(
            Outcome.FUNCTION_ERROR,
            "Runtime.InvalidEntrypoint",
            "RequestId: {request_id} Error: could not start the runtime: " + why,
        )
        self.events.sandbox_init_failed(self, error)
        self.events.sandbox_exited(self, -1)

    async def _watch(self) -> None:
        assert self._proc is not None
        returncode = await self._proc.wait()
        if self.jail is not None:
            returncode = await self.jail.exited(returncode)  # kills what is left, notes an OOM kill
        self._drain_output()
        self._close_output()
        self.endpoint.stop()
        if self._parked is not None and not self._parked.done():
            self._parked.cancel()
        await self._close_endpoint()
        self.exited.set()
        self.events.sandbox_exited(self, returncode)

    def kill(self) -> None:
        """Stop the sandbox now: every process of its session is killed (a runtime's children too)."""
        self.stopping = True
        self.endpoint.stop()
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.jail is not None:
            self.jail.kill()  # its cgroup: also what left the session

    async def _close_endpoint(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._web is not None:
            web_server, self._web = self._web, None
            await web_server.shutdown(0.1)

    def _close_output(self) -> None:
        if self._out_fd >= 0:
            self.loop.remove_reader(self._out_fd)
            os.close(self._out_fd)
            self._out_fd = -1

    def max_memory_mb(self) -> int:
        """Peak resident memory of the runtime process (VmHWM), for REPORT lines."""
        if self.jail is not None and self.jail.cgroup is not None:
            return self.jail.max_memory_mb()  # the sandbox's cgroup peak: self.pid is bwrap's
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        return max(1, int(line.split()[1]) // 1024)
        except (OSError, ValueError):
            pass
        return 0

    # ------------------------------------------------------------------ output capture

    def _on_output(self) -> None:
        self._read_output()

    def _drain_output(self) -> None:
        """Read what the process wrote so far, so it lands on the invocation that wrote it. Bounded
        (a runtime that never stops writing must not hold the loop): at most 1 MB here."""
        for _ in range(16):
            if not self._read_output():
                return

    def _read_output(self) -> bool:
        """One read of the output pipe; False when nothing was there (or the pipe closed)."""
        if self._out_fd < 0:
            return False
        try:
            data = os.read(self._out_fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._close_output()
            return False
        self._append_output(data)
        return True

    def _append_output(self, data: bytes) -> None:
        buf = self._inv.log if self._inv is not None else self.init_log
        buf += data
        if len(buf) > LOG_KEEP_BYTES:
            del buf[: len(buf) - LOG_KEEP_BYTES]

    # ------------------------------------------------------------------ invocations

    def deliver(self, inv: Invocation) -> None:
        """Hand an invocation to the runtime: to its parked /next, or to the next /next it makes."""
        assert self._inv is None, "a sandbox runs one invocation at a time"
        self.endpoint.deliver(inv.request_id)  # raises unless idle
        self._inv = inv
        if self.invocations == 0:
            inv.cold = True
            inv.init_duration_ms = self.init_duration_ms
        self.invocations += 1
        parked = self._parked
        if parked is not None and not parked.done():
            self._parked = None
            self.endpoint.take()
            parked.set_result(inv)

    def finish(self, inv: Invocation, outcome: Outcome) -> bool:
        """Resolve `inv` once; False when it already had an outcome (a late response after a timeout)."""
        if inv.future.done():
            return False
        if self._inv is inv:
            self._inv = None
        inv.ended = time.perf_counter()
        if inv.want_tail:
            inv.max_memory_mb = self.max_memory_mb()
        inv.future.set_result(outcome)
        return True

    # ------------------------------------------------------------------ the Runtime API endpoint

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if not path.startswith(API_PREFIX):
            return _platform_error(404, "NotFound", f"unknown path {path}")
        rest = path[len(API_PREFIX) :]
        method = request.method
        if rest == "invocation/next" and method == "GET":
            return await self._next()
        if rest.startswith("invocation/") and method == "POST":
            parts = rest.split("/")
            if len(parts) == 3 and parts[2] in ("response", "error"):
                return await self._post_result(request, parts[1], parts[2] == "error")
        if rest == "init/error" and method == "POST":
            return await self._init_error(request)
        return _platform_error(404, "NotFound", f"unknown path {method} {path}")

    async def _next(self) -> web.StreamResponse:
        signal_ = self.endpoint.next()
        if signal_ is Signal.REFUSE:
            return _platform_error(500, "Runtime.Stopping", "sandbox is stopping")
        if signal_ is Signal.READY:
            self._was_ready = True
            self.init_duration_ms = (time.perf_counter() - self.spawned_at) * 1000.0
            self.events.sandbox_ready(self)  # may deliver an invocation right away
        elif signal_ is Signal.RESET:
            self.events.sandbox_ready(self)  # back to idle, or straight to a waiting invocation
        elif signal_ is Signal.BROKEN and self._inv is not None:
            # Asking for more work without answering the current invocation: Lambda treats the
            # runtime as broken. Fail the invocation; the runtime is told so and usually exits.
            dropped = self._inv
            self.events.sandbox_result(
                self,
                dropped,
                Outcome.runtime_error(
                    Outcome.FUNCTION_ERROR,
                    "Runtime.InvalidStateTransition",
                    f"RequestId: {dropped.request_id} Error: runtime asked for the next invocation "
                    "before answering this one",
                ),
            )
        inv: Invocation | None
        if self.endpoint.state is EState.ASSIGNED:
            self.endpoint.take()
            inv = self._inv
        else:
            parked = self.loop.create_future()
            if self._parked is not None and not self._parked.done():
                self._parked.cancel()  # a runtime that asks twice: the older request gets nothing
            self._parked = parked
            try:
                inv = await parked
            except asyncio.CancelledError:
                return _platform_error(500, "Runtime.Stopping", "sandbox is stopping")
            finally:
                if self._parked is parked:
                    self._parked = None
        assert inv is not None
        inv.started = time.perf_counter()
        headers = {
            "Lambda-Runtime-Aws-Request-Id": inv.request_id,
            "Lambda-Runtime-Deadline-Ms": str(inv.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": self.spec.function_arn,
            "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-{inv.request_id.replace('-', '')[:24]}"
            ";Sampled=0",
            "Content-Type": "application/json",
        }
        if inv.client_context:
            headers["Lambda-Runtime-Client-Context"] = inv.client_context
        return web.Response(body=inv.payload, headers=headers)

    async def _post_result(self, request: web.BaseRequest, request_id: str, is_error: bool) -> web.Response:
        inv = self._inv
        if inv is None or not self.endpoint.result(request_id):
            await request.content.read()
            return _platform_error(400, "InvalidRequestID", f"no invocation {request_id} in progress")
        body = await read_bounded(request, MAX_ERROR_BYTES if is_error else MAX_RESPONSE_BYTES)
        self._drain_output()
        if body is None:
            outcome = Outcome.runtime_error(
                Outcome.FUNCTION_ERROR,
                "Function.ResponseSizeTooLarge",
                "Response payload size exceeded maximum allowed payload size (6291556 bytes).",
            )
            self.events.sandbox_result(self, inv, outcome)
            return _platform_error(413, "RequestEntityTooLarge", "response too large")
        if is_error:
            error_type = request.headers.get("Lambda-Runtime-Function-Error-Type") or _error_type(body)
            outcome = Outcome(Outcome.FUNCTION_ERROR, body or b"{}", error_type or "Unhandled")
        else:
            outcome = Outcome(Outcome.OK, body)
        self.events.sandbox_result(self, inv, outcome)
        return web.Response(status=202, body=_ACCEPTED, content_type="application/json")

    async def _init_error(self, request: web.BaseRequest) -> web.Response:
        body = await read_bounded(request, MAX_ERROR_BYTES) or b"{}"
        self._drain_output()
        if not self.endpoint.init_error():
            return _platform_error(403, "InvalidStateTransition", "init already finished")
        error_type = request.headers.get("Lambda-Runtime-Function-Error-Type") or _error_type(body)
        self.events.sandbox_init_failed(
            self, Outcome(Outcome.FUNCTION_ERROR, body, error_type or "Runtime.InitError")
        )
        return web.Response(status=202, body=_ACCEPTED, content_type="application/json")


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_ember() -> None:
    """In the child, before exec: if ember dies (even by SIGKILL), the kernel kills the sandbox."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _error_type(body: bytes) -> str | None:
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("errorType") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _last_lines(data: bytes, limit: int = START_ERROR_CHARS) -> str:
    """The end of what a sandbox printed, on one line (for an error message)."""
    text = " | ".join(line.strip() for line in data.decode(errors="replace").splitlines() if line.strip())
    return text if len(text) <= limit else "..." + text[-limit:]
