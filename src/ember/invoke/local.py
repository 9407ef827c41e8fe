"""The node's invoke path: drives the sans-IO core and carries out its decisions on real sandboxes.

Data flows one way: the frontend calls `invoke`; the core picks a sandbox (or queues, or throttles);
the worker delivers the payload to that sandbox's Runtime API; the sandbox's answer resolves the
invocation. Every lifecycle event of a sandbox (ready, init failure, result, exit) goes back into the
core first, and the core's effects (start, stop, dispatch, reject) are applied right after, so the
core's view and the processes never drift apart.

Waits are bounded: queued invokes by the core's queue deadline, running ones by the function's
timeout (a timer per invocation), inits by INIT_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ember.api.errors import LambdaError, not_found, throttled
from ember.core.assignment import (
    WAIT,
    Assigner,
    Dispatch,
    Reject,
    Sandbox,
    Start,
    State,
    Stop,
    Throttle,
)
from ember.observe.metrics import Observer
from ember.sandbox.process import Invocation, LaunchSpec, Outcome, SandboxProcess
from ember.store import FunctionRecord

log = logging.getLogger("ember.invoke.local")

INIT_TIMEOUT_S = 10.0  # Lambda's cap on the init phase
TICK_S = 0.5


class Worker:
    """Hosts this node's sandboxes and runs invocations on them, as the core decides."""

    def __init__(
        self, core: Assigner, launch_spec: Callable[[str, int], LaunchSpec | None], isolation: Any = None
    ) -> None:
        self.core = core
        self.isolation = isolation  # ember.sandbox.isolation.Isolation, or None: plain processes
        self.launch_spec = launch_spec  # (function, sandbox id) -> how to start it, per current config
        self.loop = asyncio.get_running_loop()
        self.procs: dict[int, SandboxProcess] = {}
        self.waiting: dict[str, Invocation] = {}  # queued in the core, keyed by request id
        self._tick_task: asyncio.Task[None] | None = None
        self.cold_starts = 0
        self.warm_starts = 0
        self.observer = Observer(core)  # metrics and function logs (ember.observe.metrics)

    def start(self) -> None:
        self._tick_task = self.loop.create_task(self._ticker())

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.core.tick(self.loop.time())
            self.apply_effects()

    # ------------------------------------------------------------------ the invoke path

    async def invoke(
        self,
        rec: FunctionRecord,
        payload: bytes,
        request_id: str,
        client_context: str | None = None,
        want_tail: bool = False,
    ) -> tuple[Invocation, Outcome]:
        """Run one synchronous invocation; raises LambdaError for throttles and queue rejections."""
        inv = Invocation(request_id, payload, self.loop.create_future(), client_context)
        inv.want_tail = want_tail
        res = self.core.acquire(request_id, rec.name, self.loop.time())
        if type(res) is Sandbox:
            self._dispatch(inv, res)
        elif res is WAIT:
            self.waiting[request_id] = inv
        else:
            assert isinstance(res, Throttle)
            if res.status == 404:
                raise not_found("Function", rec.name)
            self.observer.throttled(rec.name, res.reason)
            raise throttled(res.reason)
        if self.core.has_effects():
            self.apply_effects()
        try:
            outcome = await inv.future
        except asyncio.CancelledError:
            if self.waiting.pop(request_id, None) is not None:
                self.core.cancel(request_id, rec.name)
            raise
        except LambdaError as exc:  # rejected while it waited: a full queue's deadline is a throttle
            if exc.status == 429:
                self.observer.throttled(rec.name, exc.extra.get("Reason", ""))
            raise
        self.observer.invoked(rec.name, inv, outcome)
        return inv, outcome

    def _dispatch(self, inv: Invocation, sb: Sandbox) -> None:
        proc = self.procs[sb.id]
        spec = proc.spec
        inv.deadline_ms = int(time.time() * 1000 + spec.timeout_s * 1000)
        inv.proc = proc
        proc.deliver(inv)
        # The timeout covers the invocation and the runtime's turn back to /next (as in Lambda, work
        # after the response counts); it is cancelled when the runtime asks for more work.
        proc.timer = self.loop.call_later(spec.timeout_s, self._on_timeout, proc, inv)
        if inv.cold:
            self.cold_starts += 1
        else:
            self.warm_starts += 1

    def _on_timeout(self, proc: SandboxProcess, inv: Invocation) -> None:
        proc.timer = None
        sb = proc.sandbox
        if inv.future.done() or proc.current is not inv:
            if sb.state is State.RESETTING and proc.resetting:  # answered, but never asked for more
                log.warning(
                    "runtime did not ask for the next invocation within the timeout; sandbox discarded",
                    extra={"request_id": inv.request_id, "function": sb.function.name, "sandbox": sb.id},
                )
                self.core.discard(sb, self.loop.time())
                self.apply_effects()
            return
        log.info(
            "invocation timed out",
            extra={"request_id": inv.request_id, "function": sb.function.name, "sandbox": sb.id},
        )
        self.core.discard(sb, self.loop.time())
        proc.finish(
            inv,
            Outcome.runtime_error(
                Outcome.TIMEOUT,
                "Sandbox.Timedout",
                f"RequestId: {inv.request_id} Error: Task timed out after {proc.spec.timeout_s:.2f} seconds",
            ),
        )
        self.apply_effects()

    # ------------------------------------------------------------------ effects

    def apply_effects(self) -> None:
        """Carry out the core's decisions, in order."""
        for effect in self.core.take_effects():
            kind = type(effect)
            if kind is Dispatch:
                inv = self.waiting.pop(effect.request_id)
                self._dispatch(inv, effect.sandbox)
            elif kind is Start:
                self._launch(effect.sandbox)
            elif kind is Stop:
                proc = self.procs.get(effect.sandbox.id)
                if proc is not None:
                    proc.kill()
            elif kind is Reject:
                assert isinstance(effect, Reject)
                inv = self.waiting.pop(effect.request_id)
                self._reject(inv, effect)

    def _reject(self, inv: Invocation, effect: Reject) -> None:
        if effect.reason == "init-failed":
            detail = effect.detail
            if isinstance(detail, Outcome):
                body = detail.body.replace(b"{request_id}", inv.request_id.encode())
                inv.future.set_result(Outcome(Outcome.FUNCTION_ERROR, body, detail.error_type))
            else:
                inv.future.set_result(
                    Outcome.runtime_error(
                        Outcome.EXIT,
                        "Runtime.ExitError",
                        f"RequestId: {inv.request_id} Error: Runtime exited during init",
                    )
                )
        elif effect.reason == "deleted":
            inv.future.set_exception(not_found("Function", "(deleted while the invoke waited)"))
        else:  # queue-timeout: no sandbox freed up in time
            inv.future.set_exception(throttled("FunctionInvocationRateLimitExceeded"))

    def _launch(self, sb: Sandbox) -> None:
        spec = self.launch_spec(sb.function.name, sb.id)
        if spec is None:  # deleted meanwhile; the core is retiring it
            self.core.sandbox_failed(sb, self.loop.time(), None)
            self.core.sandbox_exited(sb, self.loop.time())
            return
        proc = SandboxProcess(sb, spec, self, self.isolation)
        self.procs[sb.id] = proc
        self.loop.create_task(self._launch_proc(proc))

    async def _launch_proc(self, proc: SandboxProcess) -> None:
        try:
            await proc.launch()
        except Exception:  # pragma: no cover - defensive: an ember-side failure to start
            log.exception("sandbox launch failed", extra={"sandbox": proc.sandbox.id})
            self.sandbox_init_failed(
                proc,
                Outcome.runtime_error(
                    Outcome.FUNCTION_ERROR, "ServiceException", "ember failed to start a sandbox"
                ),
            )
            self.sandbox_exited(proc, -1)
            return
        if proc.sandbox.state is not State.STARTING:
            proc.kill()  # retired while it was being spawned
            return
        self.loop.call_later(INIT_TIMEOUT_S, self._init_deadline, proc)

    def _init_deadline(self, proc: SandboxProcess) -> None:
        if not proc.ready and proc.sandbox.state is State.STARTING:
            self.sandbox_init_failed(
                proc,
                Outcome.runtime_error(
                    Outcome.TIMEOUT,
                    "Sandbox.Timedout",
                    f"RequestId: {{request_id}} Error: Init timed out after {INIT_TIMEOUT_S:.0f} seconds",
                ),
            )

    # ------------------------------------------------------------------ SandboxEvents

    def sandbox_ready(self, proc: SandboxProcess) -> None:
        timer = proc.timer
        if timer is not None:
            proc.timer = None
            timer.cancel()
        self.core.sandbox_ready(proc.sandbox, self.loop.time())
        if self.core.has_effects():
            self.apply_effects()

    def sandbox_init_failed(self, proc: SandboxProcess, error: Outcome) -> None:
        self.core.sandbox_failed(proc.sandbox, self.loop.time(), error)
        self.apply_effects()
        proc.kill()

    def sandbox_result(self, proc: SandboxProcess, inv: Invocation, outcome: Outcome) -> None:
        if not proc.finish(inv, outcome):
            return
        if outcome.error_type == "Runtime.InvalidStateTransition":
            self.core.discard(proc.sandbox, self.loop.time())
        else:
            self.core.finish(proc.sandbox, self.loop.time())  # ready again when the runtime asks
            proc.resetting = True
        if self.core.has_effects():
            self.apply_effects()

    def sandbox_exited(self, proc: SandboxProcess, returncode: int) -> None:
        sb = proc.sandbox
        now = self.loop.time()
        self.procs.pop(sb.id, None)
        status = f"signal: {_signame(-returncode)}" if returncode < 0 else f"exit status {returncode}"
        exit_type = "Runtime.ExitError"
        if proc.jail is not None and proc.jail.oom:  # its cgroup's OOM killer acted: Lambda's shape
            exit_type, status = "Runtime.OutOfMemory", "signal: killed"
        if sb.state is State.STARTING:
            self.core.sandbox_failed(
                sb,
                now,
                Outcome.runtime_error(
                    Outcome.EXIT,
                    exit_type,
                    f"RequestId: {{request_id}} Error: Runtime exited with error: {status}",
                ),
            )
        if proc.timer is not None:
            proc.timer.cancel()
            proc.timer = None
        self.core.sandbox_exited(sb, now)
        self.observer.sandbox_exited(sb.function.name, proc)
        inv = proc.current
        if inv is not None and not inv.future.done():
            if not proc.stopping:
                log.warning(
                    "sandbox exited during an invocation",
                    extra={"request_id": inv.request_id, "function": sb.function.name, "status": status},
                )
            proc.finish(
                inv,
                Outcome.runtime_error(
                    Outcome.EXIT,
                    exit_type,
                    f"RequestId: {inv.request_id} Error: Runtime exited with error: {status}",
                ),
            )
        self.apply_effects()

    # ------------------------------------------------------------------ shutdown

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for running and queued invocations to finish."""
        deadline = self.loop.time() + timeout_s
        while self.loop.time() < deadline:
            busy = any(p.current is not None for p in self.procs.values()) or self.waiting
            if not busy:
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop every sandbox and wait until every process is gone."""
        if self._tick_task is not None:
            self._tick_task.cancel()
        self.core.shutdown()
        self.apply_effects()
        for proc in list(self.procs.values()):
            proc.kill()
        for proc in list(self.procs.values()):
            try:
                await asyncio.wait_for(proc.exited.wait(), 5.0)
            except TimeoutError:  # pragma: no cover - SIGKILL does not fail
                log.error("sandbox did not exit", extra={"sandbox": proc.sandbox.id, "pid": proc.pid})

    def stats(self) -> dict[str, int]:
        return {
            "sandboxes": len(self.procs),
            "cold_starts": self.cold_starts,
            "warm_starts": self.warm_starts,
        }


_SIGNALS = {9: "killed", 15: "terminated", 11: "segmentation fault", 6: "aborted", 2: "interrupt"}


def _signame(num: int) -> str:
    """As Go's os.ProcessState says it, which is what Lambda's ExitError messages show."""
    return _SIGNALS.get(num, f"signal {num}")
