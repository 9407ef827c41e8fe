"""The sandbox host: every sandbox's lifecycle, written once, for both modes.

A mode (the single node's `LocalInvoker`, the cluster's `WorkerNode`) says *which* sandboxes to start
and which invocation goes where; the host does the rest and reports back through `HostEvents`:

  start(ref, spec)   spawn (a task the host owns), then the init deadline (INIT_TIMEOUT_S)
  dispatch(ref, inv) deliver to the Runtime API and arm the invocation's timeout
  kill(ref)          SIGKILL now; `exited` follows once the process is gone

Outcomes the host decides, the same in both modes (Lambda's shapes):
  - an invocation past its timeout ends `Sandbox.Timedout` and the sandbox is discarded;
  - a runtime that answers but never asks for more work within the timeout is discarded;
  - a runtime that asks for work without answering ends its invocation
    `Runtime.InvalidStateTransition` and is discarded;
  - a process that exits (or is OOM-killed in its cgroup) ends the running invocation
    `Runtime.ExitError` / `Runtime.OutOfMemory`, or, during init, fails the init with that error;
  - init past INIT_TIMEOUT_S fails with `Sandbox.Timedout`, a spawn that cannot start with
    `Runtime.InvalidEntrypoint`.
"Discarded" means `HostEvents.discarded` is told, then the process is killed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from ember.sandbox.process import Invocation, LaunchSpec, Outcome, SandboxProcess, SandboxRef

log = logging.getLogger("ember.sandbox.host")

INIT_TIMEOUT_S = 10.0  # Lambda's cap on the init phase
STOP_WAIT_S = 5.0  # per process, after SIGKILL, before ember gives up waiting (never seen)

_SIGNALS = {9: "killed", 15: "terminated", 11: "segmentation fault", 6: "aborted", 2: "interrupt"}


def signame(num: int) -> str:
    """As Go's os.ProcessState says it, which is what Lambda's ExitError messages show."""
    return _SIGNALS.get(num, f"signal {num}")


def init_failure(error: object, request_id: str) -> Outcome:
    """What the invocation that waited for a sandbox sees when that sandbox's init failed: the
    host's error (`HostEvents.init_failed`) for this request, or, when none is known, an exit."""
    if isinstance(error, Outcome):
        body = error.body.replace(b"{request_id}", request_id.encode())
        return Outcome(Outcome.FUNCTION_ERROR, body, error.error_type)
    return Outcome.runtime_error(
        Outcome.EXIT, "Runtime.ExitError", f"RequestId: {request_id} Error: Runtime exited during init"
    )


class HostEvents(Protocol):
    """What a mode hears from the host. Each call happens once per sandbox (per invocation for
    `finished`), in this order: ready? finished* (init_failed | discarded)? exited."""

    def wanted(self, ref: SandboxRef) -> bool:
        """Asked once the process is spawned: False kills it (it was retired meanwhile)."""
        ...

    def ready(self, ref: SandboxRef) -> None:
        """Init is over, or the last invocation fully ended: it can take work."""
        ...

    def init_failed(self, ref: SandboxRef, error: Outcome) -> None:
        """Init failed (error body holds `{request_id}` for the invocation that will see it)."""
        ...

    def finished(self, ref: SandboxRef, inv: Invocation, outcome: Outcome) -> None:
        """An invocation ended normally (a result or a function error); the sandbox is resetting."""
        ...

    def discarded(self, ref: SandboxRef) -> None:
        """The host gave up on this sandbox (see the module docstring); it is being killed."""
        ...

    def exited(self, ref: SandboxRef, proc: SandboxProcess) -> None:
        """The process is gone; `proc.init_error` says why init failed, when it did."""
        ...


class SandboxHost:
    """This process's sandboxes, by id. Implements the processes' `SandboxEvents`."""

    def __init__(self, events: HostEvents, isolation: Any = None) -> None:
        self.events = events
        self.isolation = isolation  # ember.sandbox.isolation.Isolation, or None: plain processes
        self.loop = asyncio.get_running_loop()
        self.procs: dict[int, SandboxProcess] = {}
        self.cold_starts = 0
        self.warm_starts = 0
        self._tasks: set[asyncio.Task[None]] = set()  # launches in progress
        self._changed = asyncio.Event()  # an invocation ended or a process exited (drain waits on it)

    # ------------------------------------------------------------------ what a mode asks

    def start(self, ref: SandboxRef, spec: LaunchSpec) -> SandboxProcess:
        assert ref.id not in self.procs, f"sandbox {ref.id} started twice"
        proc = SandboxProcess(ref, spec, self, self.isolation)
        self.procs[ref.id] = proc
        task = self.loop.create_task(self._launch(proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return proc

    def get(self, sid: int) -> SandboxProcess | None:
        return self.procs.get(sid)

    def dispatch(self, proc: SandboxProcess, inv: Invocation) -> None:
        """Hand `inv` to the sandbox's runtime; its timeout runs from now."""
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

    def kill(self, sid: int) -> None:
        proc = self.procs.get(sid)
        if proc is not None:
            proc.kill()

    def kill_all(self) -> None:
        for proc in list(self.procs.values()):
            proc.kill()

    def busy(self) -> bool:
        return any(p.current is not None for p in self.procs.values())

    async def drain(self, timeout_s: float, more: Any = None) -> None:
        """Wait (bounded) until no sandbox runs an invocation and `more()` (the mode's queue) is false."""
        deadline = self.loop.time() + timeout_s
        while self.busy() or (more is not None and more()):
            left = deadline - self.loop.time()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return

    def poke(self) -> None:
        """Wake drain: something the mode waits on changed."""
        self._changed.set()

    async def stop(self) -> None:
        """Kill every sandbox and wait until every process is gone (bounded per process)."""
        if self._tasks:  # launches under way finish first (bounded), so that what they spawn is killed
            await asyncio.wait(list(self._tasks), timeout=STOP_WAIT_S)
        self.kill_all()
        for proc in list(self.procs.values()):
            try:
                await asyncio.wait_for(proc.exited.wait(), STOP_WAIT_S)
            except TimeoutError:  # pragma: no cover - SIGKILL does not fail
                log.error("sandbox did not exit", extra={"sandbox": proc.ref.id, "pid": proc.pid})

    def stats(self) -> dict[str, int]:
        return {"sandboxes": len(self.procs), "cold_starts": self.cold_starts, "warm_starts": self.warm_starts}

    # ------------------------------------------------------------------ launch and init

    async def _launch(self, proc: SandboxProcess) -> None:
        try:
            await proc.launch()
        except Exception:  # pragma: no cover - defensive: an ember-side failure to start
            log.exception("sandbox launch failed", extra={"sandbox": proc.ref.id})
            self.sandbox_init_failed(
                proc,
                Outcome.runtime_error(Outcome.FUNCTION_ERROR, "ServiceException", "ember failed to start a sandbox"),
            )
            self.sandbox_exited(proc, -1)
            return
        if proc.exited.is_set():
            return  # could not be spawned (already reported)
        if not self.events.wanted(proc.ref):
            proc.kill()  # retired while it was being spawned
            return
        if proc.endpoint.initialising:
            proc.init_timer = self.loop.call_later(INIT_TIMEOUT_S, self._init_deadline, proc)

    def _init_deadline(self, proc: SandboxProcess) -> None:
        proc.init_timer = None
        if proc.endpoint.initialising and not proc.exited.is_set():
            self.sandbox_init_failed(
                proc,
                Outcome.runtime_error(
                    Outcome.TIMEOUT,
                    "Sandbox.Timedout",
                    f"RequestId: {{request_id}} Error: Init timed out after {INIT_TIMEOUT_S:.0f} seconds",
                ),
            )

    # ------------------------------------------------------------------ invocation timeouts

    def _on_timeout(self, proc: SandboxProcess, inv: Invocation) -> None:
        proc.timer = None
        ref = proc.ref
        if inv.future.done() or proc.current is not inv:
            if proc.resetting:  # answered, but never asked for more
                log.warning(
                    "runtime did not ask for the next invocation within the timeout; sandbox discarded",
                    extra={"request_id": inv.request_id, "function": ref.function, "sandbox": ref.id},
                )
                self._discard(proc)
            return
        log.info(
            "invocation timed out", extra={"request_id": inv.request_id, "function": ref.function, "sandbox": ref.id}
        )
        self._finish(
            proc,
            inv,
            Outcome.runtime_error(
                Outcome.TIMEOUT,
                "Sandbox.Timedout",
                f"RequestId: {inv.request_id} Error: Task timed out after {proc.spec.timeout_s:.2f} seconds",
            ),
        )
        self._discard(proc)

    def _discard(self, proc: SandboxProcess) -> None:
        self.events.discarded(proc.ref)
        proc.kill()

    def _finish(self, proc: SandboxProcess, inv: Invocation, outcome: Outcome) -> bool:
        if not proc.finish(inv, outcome):
            return False
        self._changed.set()
        return True

    # ------------------------------------------------------------------ SandboxEvents (from the process)

    def sandbox_ready(self, proc: SandboxProcess) -> None:
        timer = proc.timer
        if timer is not None:
            proc.timer = None
            timer.cancel()
        if proc.init_timer is not None:
            proc.init_timer.cancel()
            proc.init_timer = None
        self.events.ready(proc.ref)

    def sandbox_init_failed(self, proc: SandboxProcess, error: Outcome) -> None:
        if self._init_failed(proc, error):
            proc.kill()

    def _init_failed(self, proc: SandboxProcess, error: Outcome) -> bool:
        if proc.init_error is not None:
            return False  # once
        proc.init_error = error
        self.events.init_failed(proc.ref, error)
        return True

    def sandbox_result(self, proc: SandboxProcess, inv: Invocation, outcome: Outcome) -> None:
        if not self._finish(proc, inv, outcome):
            return
        if outcome.error_type == "Runtime.InvalidStateTransition":
            self._discard(proc)
        else:
            self.events.finished(proc.ref, inv, outcome)  # ready again when the runtime asks

    def sandbox_exited(self, proc: SandboxProcess, returncode: int) -> None:
        ref = proc.ref
        if self.procs.get(ref.id) is proc:
            del self.procs[ref.id]
        for timer in (proc.timer, proc.init_timer):
            if timer is not None:
                timer.cancel()
        proc.timer = proc.init_timer = None
        status = f"signal: {signame(-returncode)}" if returncode < 0 else f"exit status {returncode}"
        exit_type = "Runtime.ExitError"
        if proc.jail is not None and proc.jail.oom:  # its cgroup's OOM killer acted: Lambda's shape
            exit_type, status = "Runtime.OutOfMemory", "signal: killed"
        if not proc.ready:
            self._init_failed(
                proc,
                Outcome.runtime_error(
                    Outcome.EXIT, exit_type, f"RequestId: {{request_id}} Error: Runtime exited with error: {status}"
                ),
            )
        inv = proc.current
        if inv is not None and not inv.future.done():
            if not proc.stopping:
                log.warning(
                    "sandbox exited during an invocation",
                    extra={"request_id": inv.request_id, "function": ref.function, "status": status},
                )
            self._finish(
                proc,
                inv,
                Outcome.runtime_error(
                    Outcome.EXIT, exit_type, f"RequestId: {inv.request_id} Error: Runtime exited with error: {status}"
                ),
            )
        self._changed.set()
        self.events.exited(ref, proc)
