"""The single node's invoke path: drives the sans-IO core (Assigner) and carries out its decisions on
this process's sandboxes (ember.sandbox.host).

Data flows one way: the frontend calls `invoke`; the core picks a sandbox (or queues, or throttles);
the host delivers the payload to that sandbox's Runtime API; the sandbox's answer resolves the
invocation. Every lifecycle event the host reports (ready, init failure, result, discard, exit) goes
into the core first, and the core's effects (start, stop, dispatch, reject) are applied right after,
so the core's view and the processes never drift apart. Function changes arrive from the control
plane as a listener (`function_put`, `function_deleted`).

Waits are bounded: queued invokes by the core's queue deadline, running ones by the host's timers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ember.api.errors import LambdaError, not_found, throttled
from ember.core.assignment import WAIT, Assigner, Dispatch, Reject, Sandbox, Start, State, Stop, Throttle
from ember.observe.metrics import Observer
from ember.sandbox.host import SandboxHost, init_failure
from ember.sandbox.process import Invocation, LaunchSpec, Outcome, SandboxProcess, SandboxRef
from ember.store import FunctionRecord

log = logging.getLogger("ember.invoke.local")

TICK_S = 0.5


class LocalInvoker:
    """Runs invocations on this node's sandboxes, as the core decides. An `Invoker` and the host's sink."""

    def __init__(
        self,
        core: Assigner,
        launch_spec: Callable[[str, int], LaunchSpec | None],
        observer: Observer,
        isolation: Any = None,
    ) -> None:
        self.core = core
        self.launch_spec = launch_spec  # (function, sandbox id) -> how to start it, per current config
        self.observer = observer
        self.isolation = isolation
        self.loop = asyncio.get_running_loop()
        self.sandboxes = SandboxHost(self, isolation)
        self.waiting: dict[str, Invocation] = {}  # queued in the core, keyed by request id
        self._tick_task: asyncio.Task[None] | None = None

    @property
    def procs(self) -> dict[int, SandboxProcess]:
        return self.sandboxes.procs

    def start(self) -> None:
        self._tick_task = self.loop.create_task(self._ticker())

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.core.tick(self.loop.time())
            self.apply_effects()

    # ------------------------------------------------------------------ control-plane listener

    def function_put(self, rec: FunctionRecord) -> None:
        """A function was created or changed: a new revision retires older sandboxes."""
        core = self.core
        core.put_function(rec.name, rec.revision, int(rec.config["MemorySize"]), self.loop.time())
        if core.functions[rec.name].reserved != rec.reserved_concurrency:
            error = core.set_reserved(rec.name, rec.reserved_concurrency)
            assert error is None, error  # the control plane validated it against the same limit
        self.apply_effects()

    def function_deleted(self, name: str) -> None:
        core = self.core
        fn = core.functions.get(name)
        if fn is None:
            return
        if fn.reserved is not None:
            core.set_reserved(name, None)
        core.delete_function(name, self.loop.time())
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
                self.sandboxes.poke()
            raise
        except LambdaError as exc:  # rejected while it waited: a full queue's deadline is a throttle
            if exc.status == 429:
                self.observer.throttled(rec.name, exc.extra.get("Reason", ""))
            raise
        self.observer.invoked(rec.name, inv, outcome)
        return inv, outcome

    def _dispatch(self, inv: Invocation, sb: Sandbox) -> None:
        proc = self.sandboxes.get(sb.id)
        assert proc is not None, f"the core dispatched to sandbox {sb.id}, which the host does not hold"
        self.sandboxes.dispatch(proc, inv)

    # ------------------------------------------------------------------ effects

    def apply_effects(self) -> None:
        """Carry out the core's decisions, in order."""
        for effect in self.core.take_effects():
            if isinstance(effect, Dispatch):
                self._dispatch(self.waiting.pop(effect.request_id), effect.sandbox)
            elif isinstance(effect, Start):
                self._launch(effect.sandbox)
            elif isinstance(effect, Stop):
                self.sandboxes.kill(effect.sandbox.id)
            elif isinstance(effect, Reject):
                self._reject(self.waiting.pop(effect.request_id), effect)

    def _reject(self, inv: Invocation, effect: Reject) -> None:
        self.sandboxes.poke()
        if effect.reason == "init-failed":
            inv.future.set_result(init_failure(effect.detail, inv.request_id))
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
        self.sandboxes.start(SandboxRef(sb.id, sb.function.name, sb.generation), spec)

    # ------------------------------------------------------------------ HostEvents

    def wanted(self, ref: SandboxRef) -> bool:
        sb = self.core.sandboxes.get(ref.id)
        return sb is not None and sb.state is not State.STOPPING  # not retired while it was spawned

    def ready(self, ref: SandboxRef) -> None:
        sb = self.core.sandboxes.get(ref.id)
        if sb is not None:
            self.core.sandbox_ready(sb, self.loop.time())
            if self.core.has_effects():
                self.apply_effects()

    def init_failed(self, ref: SandboxRef, error: Outcome) -> None:
        sb = self.core.sandboxes.get(ref.id)
        if sb is not None and sb.state is State.STARTING:
            self.core.sandbox_failed(sb, self.loop.time(), error)
            self.apply_effects()

    def finished(self, ref: SandboxRef, inv: Invocation, outcome: Outcome) -> None:
        sb = self.core.sandboxes.get(ref.id)
        if sb is not None:
            self.core.finish(sb, self.loop.time())  # ready again when the runtime asks
            if self.core.has_effects():
                self.apply_effects()

    def discarded(self, ref: SandboxRef) -> None:
        sb = self.core.sandboxes.get(ref.id)
        if sb is not None and sb.state in (State.BUSY, State.RESETTING):  # else already told to stop
            self.core.discard(sb, self.loop.time())
            self.apply_effects()

    def exited(self, ref: SandboxRef, proc: SandboxProcess) -> None:
        sb = self.core.sandboxes.get(ref.id)
        if sb is not None:
            self.core.sandbox_exited(sb, self.loop.time())
        self.observer.sandbox_exited(ref.function, proc)
        self.apply_effects()

    # ------------------------------------------------------------------ health and shutdown

    def health(self) -> dict[str, Any]:
        core = self.core
        body: dict[str, Any] = {
            "sandboxes": len(core.sandboxes),
            "account_concurrency": core.account_limit,
            "unreserved_inflight": core.unreserved_inflight,
            **self.sandboxes.stats(),
        }
        if self.isolation is not None:
            body["isolation"] = self.isolation.health()  # mode; a loud WARNING when not isolated
        return body

    def stats(self) -> dict[str, int]:
        return self.sandboxes.stats()

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for running and queued invocations to finish."""
        await self.sandboxes.drain(timeout_s, lambda: bool(self.waiting))

    async def stop(self) -> None:
        """Stop every sandbox and wait until every process is gone."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            await asyncio.gather(self._tick_task, return_exceptions=True)
        self.core.shutdown()
        self.apply_effects()
        await self.sandboxes.stop()
