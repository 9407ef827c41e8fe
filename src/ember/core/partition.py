"""One partition's leader in cluster mode: epochs, the journal, reconciliation and probes. Sans-IO.

This is the `Assigner` process of spec/ember.pml: every public method is one of the model's `a_*`
actions (named in its docstring), and busy/idle lives in the same `Assigner` the single-process
server uses, so no routing logic is written twice. The I/O shell (ember.cluster) carries effects out:
a `Create` is a fenced journal put followed by START, a `WriteOff` a fenced journal delete; when a
fenced transaction fails the shell calls `deposed()`.

Rules (the model's numbering):
  R3  Every journal write is an etcd transaction guarded by "the leader key still has my epoch".
  R4  A new leader rebuilds busy/idle from every worker's inventory before it serves; acquires that
      arrive meanwhile are parked (bounded) and served when it does.
  R5  Busy/idle is in memory only; the journal holds sandbox creation and destruction.
  R6  acquire is idempotent per request id; reserved concurrency is enforced by the Assigner.
  R7  A new sandbox is journaled bound to its worker's incarnation (F2) before START is sent.
  R11 `timed_out` probes the workers of sandboxes believed BUSY or STARTING for a while; their
      answer overrides only sandboxes this leader has not changed since it sent the probe (F3), and
      only the answer to the latest probe that covered the sandbox (F4: found by the trace test,
      tests/test_cluster_conformance.py: with two probes in flight, the older answer, taken before
      a START arrived, said "absent" and wrote off a running sandbox). Now and then a probe covers
      every sandbox on every worker (F5, also found by that test: a lost READY after a write-off
      left an idle orphan that no probe of busy sandboxes ever visits).
  R12 A worker's new incarnation (restart, or lost session) writes off its older sandboxes.
Ids: sandboxes are numbered from epoch << 20, so ids are never reused across leaders (the model's
"ids are never reused").

`Leader.verify()` checks these rules (and the Assigner's, `Assigner.verify`) against the leader's state;
tests/test_cluster_conformance.py calls it after every step. What the R4 bound (MAX_PARKED) turns away
is counted for the shell to export: `refused_parked` (acquires answered 429) and `dropped_held`
(READY/RELEASE messages dropped; the probes of R11 recover what they said).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from ember.core.assignment import (
    Assigner,
    Dispatch,
    Reject,
    Sandbox,
    Start,
    State,
    Stop,
    Throttle,
)
from ember.core.placement import WorkerInfo, place
from ember.core.reasons import ThrottleReason
from ember.core.table import verify_after_each

__all__ = [
    "Create",
    "Destroy",
    "Grant",
    "Leader",
    "Record",
    "Refuse",
    "Role",
    "Sync",
    "WriteOff",
]

ID_SHIFT = 20  # sandbox ids: epoch << 20 | n; a leader starts at most 2**20 sandboxes per epoch
MAX_PARKED = 4096  # acquires held while reconciling (R4); beyond that: 429


class Role(IntEnum):
    FOLLOWER = 0
    RECONCILING = 1
    SERVING = 2


class Record(NamedTuple):
    """A journal record: sandbox `sandbox` of `function` is LIVE on `worker` (its `incarnation`)."""

    sandbox: int
    function: str
    generation: int
    memory_mb: int
    worker: str
    incarnation: int


# Effects.
class Grant(NamedTuple):  # GRANT: to the frontend that asked
    request_id: str
    sandbox: int
    worker: str
    epoch: int


class Refuse(NamedTuple):  # FAIL: throttled (a Throttle) or an error (reason, detail)
    request_id: str
    throttle: Throttle | None
    reason: str
    detail: object = None


class Create(NamedTuple):  # fenced journal put of `record`, then START(sandbox, epoch, incarnation)
    record: Record
    epoch: int


class WriteOff(NamedTuple):  # fenced journal delete: the sandbox is dead
    sandbox: int
    epoch: int


class Destroy(NamedTuple):  # DESTROY(sandbox, epoch) to the worker
    worker: str
    sandbox: int
    epoch: int


class Sync(NamedTuple):  # SYNC(epoch, probe) to the worker; the answer is `inventory`
    worker: str
    epoch: int
    probe: int = 0  # 0 while reconciling; else the probe's number, echoed in the answer (F4)


Effect = Grant | Refuse | Create | WriteOff | Destroy | Sync

NO_WORKER = Throttle(503, "ServiceException", ThrottleReason.NO_WORKER)
NOT_SERVING = Throttle(429, "TooManyRequestsException", ThrottleReason.RECONCILING)

# Public methods that change the leader's state: with verify_each_step, verify() runs after each.
TRANSITIONS = (
    "acquire", "cancel", "delete_function", "deposed", "elected", "gone", "inventory", "put_function", "ready",
    "release", "resync", "share_account", "step_down", "tick", "timed_out", "worker_joined", "worker_left",
)


class Leader:
    """The leader (or candidate) of one partition."""

    def __init__(
        self, partition: int, make_assigner: Callable[[], Assigner], probe_after_s: float = 2.0,
        verify_each_step: bool = False,
    ) -> None:
        self.partition = partition
        self.make_assigner = make_assigner
        self.probe_after_s = probe_after_s
        self.functions: dict[str, tuple[int, int, int | None]] = {}  # name -> (generation, memory, reserved)
        self._effects: list[Effect] = []
        # Counters for the shell to export; they survive elections (monotonic for the process).
        self.refused_parked = 0  # acquires refused while reconciling because MAX_PARKED were parked
        self.dropped_held = 0  # READY/RELEASE messages dropped while reconciling: MAX_PARKED were held
        self._wipe()
        if verify_each_step:
            verify_after_each(self, TRANSITIONS)

    def _wipe(self) -> None:
        self.role = Role.FOLLOWER
        self.epoch = 0
        self.core: Assigner | None = None
        self.journal: dict[int, Record] = {}  # LIVE records, as this leader last wrote or read them
        self.workers: dict[str, WorkerInfo] = {}  # wseen: incarnations (and capacity) known
        self.synced: set[str] = set()
        self.pmask: dict[int, int] = {}  # F3/F4: sandbox -> latest probe covering it, untouched since
        self.leases: dict[str, Sandbox] = {}  # lease id -> the sandbox granted to it: R6 in O(1)
        self.probes = 0
        self.held: list[tuple[str, str, int, str | None]] = []  # READY/RELEASE while reconciling (R4)
        self.seen: dict[int, tuple[str, str | None]] = {}  # reconciling: inventories gathered
        self.parked: list[tuple[str, str, float]] = []  # reconciling: acquires to serve later (R4)

    # ------------------------------------------------------------------ functions (from etcd)

    def put_function(self, name: str, generation: int, memory_mb: int, reserved: int | None, now: float) -> None:
        self.functions[name] = (generation, memory_mb, reserved)
        if self.core is not None:
            self.core.put_function(name, generation, memory_mb, now)
            self.core.set_reserved(name, reserved)
            self._drain(now)

    def delete_function(self, name: str, now: float) -> None:
        self.functions.pop(name, None)
        if self.core is not None:
            self.core.delete_function(name, now)
            self._drain(now)

    # ------------------------------------------------------------------ leadership

    def elected(self, epoch: int, journal: list[Record], workers: dict[str, WorkerInfo], now: float) -> None:
        """a_campaign: this assigner won the leader key with `epoch` and read the journal and the worker
        sessions; it reconciles (R4) by sending SYNC to every worker."""
        assert epoch > 0
        self._wipe()
        self.role = Role.RECONCILING
        self.epoch = epoch
        self.journal = {r.sandbox: r for r in journal}
        self.workers = workers
        for r in journal:
            w = workers.get(r.worker)
            if w is not None and w.incarnation == r.incarnation:
                w.add(r.function, r.memory_mb)
        core = self.make_assigner()
        core.number_from(epoch << ID_SHIFT)
        for name, (gen, mem, reserved) in self.functions.items():
            core.put_function(name, gen, mem, now)
            core.set_reserved(name, reserved)
        self.core = core
        for wid in sorted(workers):
            self._effects.append(Sync(wid, epoch))
        # R12 for sessions that changed before the election: records of other incarnations are dead
        for r in journal:
            w = workers.get(r.worker)
            if w is None or w.incarnation != r.incarnation:
                self._write_off(r.sandbox, now)
        self._maybe_serve(now)

    def step_down(self) -> None:
        """a_step_down: the lease is lost (keepalive failed, or the key has another holder): forget all."""
        self._wipe()

    def deposed(self) -> None:
        """A fenced journal transaction failed: someone else leads (the model's `wipe()` on !TXN_OK)."""
        self._wipe()

    def resync(self) -> None:
        """a_resync: reconciliation timer; SYNC again the workers that have not answered."""
        if self.role is Role.RECONCILING:
            for wid in sorted(self.workers):
                if wid not in self.synced:
                    self._effects.append(Sync(wid, self.epoch))

    def inventory(
        self, worker: str, epoch: int, sandboxes: dict[int, tuple[str, str | None]], now: float, probe: int = 0,
    ) -> None:
        """a_inventory: a worker's answer to SYNC. While reconciling it rebuilds busy/idle; while serving
        it is a probe answer and overrides only sandboxes still in the probe (F3)."""
        if self.role is Role.FOLLOWER or epoch != self.epoch or worker not in self.workers:
            return  # a_discard_stale
        for sid, (state, _) in sandboxes.items():
            rec = self.journal.get(sid)
            if (rec is None or rec.worker != worker) and state != "busy":
                self._effects.append(Destroy(worker, sid, self.epoch))  # orphan on the worker
        if self.role is Role.RECONCILING:
            for sid, rec in list(self.journal.items()):
                if rec.worker != worker:
                    continue
                if sid in sandboxes:
                    self.seen[sid] = sandboxes[sid]
                else:
                    self._write_off(sid, now)
            self.synced.add(worker)
            self._maybe_serve(now)
            return
        core = self.core
        assert core is not None
        for sid, rec in list(self.journal.items()):
            if rec.worker != worker or probe == 0 or self.pmask.get(sid) != probe:
                continue
            del self.pmask[sid]
            sb = core.sandboxes.get(sid)
            state, rid = sandboxes.get(sid, ("absent", None))
            if state == "absent":
                self._write_off(sid, now)
            elif sb is None:
                continue
            elif state == "idle":
                if sb.state is State.STARTING:  # READY was lost
                    core.sandbox_ready(sb, now)
                elif sb.state is State.BUSY:  # RELEASE was lost
                    core.release(sb, now)
            elif state == "busy" and sb.state in (State.IDLE, State.STARTING):
                lease = rid or f"reconciled-{sid}"
                core.occupy(sb, lease)
                self.leases[lease] = sb
        self._drain(now)

    def _maybe_serve(self, now: float) -> None:
        """a_start_serving: every worker answered; adopt the live sandboxes and serve parked acquires."""
        if self.role is not Role.RECONCILING or not self.synced.issuperset(self.workers):
            return
        core = self.core
        assert core is not None
        self.role = Role.SERVING
        for sid, rec in sorted(self.journal.items()):
            state, rid = self.seen.get(sid, ("idle", None))
            if rec.function not in core.functions:  # deleted while it ran: stop it
                self._effects.append(Destroy(rec.worker, sid, self.epoch))
                self._write_off(sid, now)
                continue
            busy = (rid or f"reconciled-{sid}") if state == "busy" else None
            sb = core.adopt(sid, rec.function, rec.generation, rec.memory_mb, busy, now, starting=state == "starting")
            if busy is not None:
                self.leases[busy] = sb
        self.seen = {}
        held, self.held = self.held, []
        for kind, worker, sid, rid in held:
            if kind == "ready":
                self.ready(worker, sid, now)
            else:
                self.release(worker, sid, rid, now)
        parked, self.parked = self.parked, []
        for rid, name, _ in parked:
            out = self.acquire(rid, name, now)
            if out is not None:
                self._effects.append(out)
        self._drain(now)

    # ------------------------------------------------------------------ the invoke path

    def acquire(self, request_id: str, name: str, now: float) -> Grant | Refuse | None:
        """a_acquire_again, a_throttle, a_grant_idle, a_cold_start, a_no_capacity. A Grant or Refuse is
        the answer now; None means it follows as an effect (after a cold start, or reconciliation)."""
        if self.role is Role.RECONCILING:
            if len(self.parked) >= MAX_PARKED:
                self.refused_parked += 1
                return Refuse(request_id, NOT_SERVING, "reconciling")
            self.parked.append((request_id, name, now))
            return None
        if self.role is Role.FOLLOWER:
            return Refuse(request_id, None, "not-leader")
        core = self.core
        assert core is not None
        held = self.leases.get(request_id)  # R6: idempotent per request id
        if held is not None and held.request == request_id and held.state is State.BUSY:
            return Grant(request_id, held.id, self.journal[held.id].worker, self.epoch)
        fn = core.functions.get(name)
        if fn is not None and request_id in fn.waiting:
            return None
        out = core.acquire(request_id, name, now)
        if isinstance(out, Throttle):
            return Refuse(request_id, out, out.reason)
        if isinstance(out, Sandbox):
            self.pmask.pop(out.id, None)
            self.leases[request_id] = out
            self._drain(now)
            return Grant(request_id, out.id, self.journal[out.id].worker, self.epoch)
        self._drain(now)
        return None

    def ready(self, worker: str, sandbox: int, now: float) -> None:
        """a_sandbox_ready (STARTING to BUSY or IDLE), or a_destroy_orphan: READY for a sandbox that has
        no journal record (written off while its START was in flight)."""
        sb = self._reported(("ready", worker, sandbox, None))
        if sb is not None and sb.state is State.STARTING:
            self.pmask.pop(sandbox, None)
            assert self.core is not None
            self.core.sandbox_ready(sb, now)
            self._drain(now)

    def release(self, worker: str, sandbox: int, request_id: str | None, now: float) -> None:
        """a_release: the worker says the sandbox ended `request_id` and asks for more: BUSY to IDLE."""
        sb = self._reported(("release", worker, sandbox, request_id))
        if sb is None or sb.state is not State.BUSY or sb.request is None:
            return
        if request_id is not None and sb.request != request_id and not sb.request.startswith("reconciled-"):
            return
        self.pmask.pop(sandbox, None)
        self.leases.pop(sb.request, None)
        assert self.core is not None
        self.core.release(sb, now)
        self._drain(now)

    def _reported(self, msg: tuple[str, str, int, str | None]) -> Sandbox | None:
        """The sandbox a worker's READY or RELEASE is about, while serving. While reconciling the
        message is held for later (R4); an unknown sandbox is an orphan (a_destroy_orphan)."""
        _, worker, sandbox, _ = msg
        if self.role is not Role.SERVING:
            if self.role is Role.RECONCILING:
                if len(self.held) < MAX_PARKED:
                    self.held.append(msg)
                else:
                    self.dropped_held += 1  # lost: the probes (R11) find what it would have said
            return None
        assert self.core is not None
        sb = self.core.sandboxes.get(sandbox)
        if sb is None:
            self._orphan(worker, sandbox)
        return sb

    def _orphan(self, worker: str, sandbox: int) -> None:
        if sandbox not in self.journal and worker in self.workers:
            self._effects.append(Destroy(worker, sandbox, self.epoch))

    def gone(self, sandbox: int, now: float, init_error: object = None) -> None:
        """The worker says the sandbox's process is gone (crash, timeout, OOM). Ids are never reused, so
        unlike a probe's "absent" this cannot be stale: write it off. With `init_error` its init failed:
        the waiter that caused the start gets that error, as on one node."""
        if self.role is Role.SERVING and sandbox in self.journal:
            core = self.core
            assert core is not None
            sb = core.sandboxes.get(sandbox)
            if init_error is not None and sb is not None and sb.state is State.STARTING:
                core.sandbox_failed(sb, now, init_error)
            self._write_off(sandbox, now)
            self._drain(now)

    def cancel(self, request_id: str, name: str) -> None:
        """The frontend gave up on a waiting acquire."""
        if self.core is not None:
            self.core.cancel(request_id, name)

    # ------------------------------------------------------------------ time and membership

    def tick(self, now: float) -> None:
        """Keep-alive expiry and waiter deadlines (Assigner.tick)."""
        if self.role is Role.SERVING:
            assert self.core is not None
            self.core.tick(now)
            self._drain(now)

    def timed_out(self, now: float, every: bool = False) -> None:
        """a_timed_out: probe the workers of sandboxes BUSY or STARTING for over `probe_after_s`.
        With `every` (the shell does it now and then: anti-entropy, F5) probe every worker about every
        sandbox: an idle orphan whose READY was lost after a write-off is found only this way."""
        if self.role is not Role.SERVING:
            return
        assert self.core is not None
        targets: set[str] = set(self.workers) if every else set()
        self.probes += 1
        for sb in self.core.sandboxes.values():
            if every or (sb.state in (State.BUSY, State.STARTING) and now - sb.used_at >= self.probe_after_s):
                rec = self.journal.get(sb.id)
                if rec is not None:
                    self.pmask[sb.id] = self.probes
                    targets.add(rec.worker)
        for wid in sorted(targets):
            self._effects.append(Sync(wid, self.epoch, self.probes))

    def in_flight(self) -> int:
        """The account concurrency this partition uses: its accepted, unfinished invocations."""
        core = self.core
        if core is None or self.role is not Role.SERVING:
            return 0
        return core.unreserved_inflight + sum(fn.inflight for fn in core.functions.values() if fn.reserved is not None)

    def share_account(self, account_limit: int, others: int, partitions: int) -> None:
        """Take as this partition's account limit what the other partitions leave (never below a floor
        of a quarter of an equal share, so a partition is never shut out by stale figures)."""
        if self.core is not None and self.role is Role.SERVING:
            floor = max(1, account_limit // (4 * partitions))
            self.core.set_account_limit(max(floor, account_limit - others))

    def worker_joined(self, info: WorkerInfo, now: float) -> None:
        """A worker's session key appeared or changed. A new incarnation of a known worker means it
        restarted empty: a_worker_restarted writes off its older sandboxes (R12)."""
        if self.role is Role.FOLLOWER:
            return
        old = self.workers.get(info.id)
        if old is not None and old.incarnation == info.incarnation:
            old.reported_free_mb = info.reported_free_mb
            old.leaving = info.leaving
            return
        self.workers[info.id] = info
        self._write_off_worker(info.id, info.incarnation, now)
        if self.role is Role.RECONCILING:
            self.synced.discard(info.id)
            self._effects.append(Sync(info.id, self.epoch))
        else:
            self.synced.add(info.id)  # a new incarnation starts empty: nothing to reconcile

    def worker_left(self, worker: str, now: float) -> None:
        """A worker's session expired. It fences itself and kills its sandboxes when it cannot renew
        its session (H5), so this is the model's worker crash: write off everything on it."""
        if self.role is Role.FOLLOWER or worker not in self.workers:
            return
        self._write_off_worker(worker, None, now)
        del self.workers[worker]
        self.synced.discard(worker)
        self._maybe_serve(now)

    def _write_off_worker(self, worker: str, keep: int | None, now: float) -> None:
        for sid, rec in list(self.journal.items()):
            if rec.worker == worker and rec.incarnation != keep:
                self._write_off(sid, now)
        self._drain(now)

    # ------------------------------------------------------------------ the rules, checked

    def verify(self) -> None:
        """Check the leader's rules (and its Assigner's, `Assigner.verify`) against its state; raises
        AssertionError naming the broken rule. Meant to hold after every public method returns."""

        def rule(ok: object, what: str, *about: object) -> None:
            if not ok:
                raise AssertionError(f"{what}: {', '.join(map(repr, about))}" if about else what)

        role, core = self.role, self.core
        rule((role is Role.FOLLOWER) == (core is None), "roles: a leader or candidate has a table, a follower none",
             role)
        rule(len(self.parked) <= MAX_PARKED and len(self.held) <= MAX_PARKED, "R4: parked and held are bounded")
        rule(role is Role.RECONCILING or not (self.parked or self.held or self.seen),
             "R4: acquires, READY/RELEASE and inventories are kept only while reconciling")
        rule(self.synced <= set(self.workers), "R4: only known workers have answered", self.synced)
        if core is None:
            rule(self.epoch == 0 and not (self.journal or self.workers or self.leases or self.pmask),
                 "roles: a follower knows no journal, workers or leases")
            return
        core.verify()
        rule(not core.has_effects(), "effects: the table's decisions are all carried out")
        rule(self.epoch > 0, "R3: a leader has an epoch", self.epoch)
        for w in self.workers.values():  # placement's view of each worker matches the journal
            mine = [r for r in self.journal.values() if r.worker == w.id and r.incarnation == w.incarnation]
            per_function: dict[str, int] = {}
            for r in mine:
                per_function[r.function] = per_function.get(r.function, 0) + 1
            rule(w.used_mb == sum(r.memory_mb for r in mine) and w.per_function == per_function,
                 "placement: a worker's load is its journaled sandboxes", w.id, w.used_mb, w.per_function)
        rule(self.pmask.keys() <= self.journal.keys(), "R11: only journaled sandboxes are probed")
        rule(all(0 < p <= self.probes for p in self.pmask.values()), "R11: a probe mark names a probe sent")
        if role is Role.RECONCILING:
            rule(not core.sandboxes and not self.leases and not self.pmask,
                 "R4: busy/idle is rebuilt only once every worker answered")
            return
        rule(self.journal.keys() == core.sandboxes.keys(), "R5/R7: the table holds exactly the journaled sandboxes",
             sorted(self.journal.keys() ^ core.sandboxes.keys()))
        for sid, sb in core.sandboxes.items():
            rec = self.journal[sid]
            rule((rec.function, rec.generation, rec.memory_mb) == (sb.function.name, sb.generation, sb.memory_mb),
                 "R7: a sandbox is what its journal record says", rec, sb)
            rule(sb.state is not State.STOPPING, "R5: a stopped sandbox is written off at once", sb)
            if sb.state is State.BUSY:
                rule(self.leases.get(sb.request or "") is sb, "R6: a busy sandbox is found by its lease", sb)

    # ------------------------------------------------------------------ effects

    def take_effects(self) -> list[Effect]:
        effects = self._effects
        if effects:
            self._effects = []
        return effects

    def _write_off(self, sid: int, now: float) -> None:
        """sandbox_dead: journal it dead (fenced) and drop it from the table; a request waiting on its
        start gets an error (the Assigner's init-failed path)."""
        rec = self.journal.pop(sid, None)
        if rec is None:
            return
        self._effects.append(WriteOff(sid, self.epoch))
        w = self.workers.get(rec.worker)
        if w is not None and w.incarnation == rec.incarnation:
            w.remove(rec.function, rec.memory_mb)
        self.pmask.pop(sid, None)
        core = self.core
        if core is not None:
            sb = core.sandboxes.get(sid)
            if sb is not None:
                if sb.request is not None:
                    self.leases.pop(sb.request, None)
                core.sandbox_exited(sb, now, init_failure=False)  # lost, not failed: its waiters wait on

    def _drain(self, now: float) -> None:
        """Turn the Assigner's effects into protocol effects (placement and the journal for a Start)."""
        core = self.core
        if core is None:
            return
        while core.has_effects():
            for eff in core.take_effects():
                if isinstance(eff, Dispatch):
                    sb = eff.sandbox
                    self.pmask.pop(sb.id, None)
                    self.leases[eff.request_id] = sb
                    self._effects.append(Grant(eff.request_id, sb.id, self.journal[sb.id].worker, self.epoch))
                elif isinstance(eff, Reject):
                    self._effects.append(Refuse(eff.request_id, None, eff.reason, eff.detail))
                elif isinstance(eff, Start):
                    sb = eff.sandbox
                    fn = sb.function
                    w = place(self.workers, fn.name, sb.memory_mb)
                    if w is None:
                        core.sandbox_failed(sb, now, NO_WORKER)
                        core.sandbox_exited(sb, now)
                        continue
                    rec = Record(sb.id, fn.name, sb.generation, sb.memory_mb, w.id, w.incarnation)
                    self.journal[sb.id] = rec
                    w.add(fn.name, sb.memory_mb)
                    self._effects.append(Create(rec, self.epoch))
                elif isinstance(eff, Stop):
                    sb = eff.sandbox
                    live = self.journal.pop(sb.id, None)
                    if live is not None:
                        self._effects.append(WriteOff(sb.id, self.epoch))
                        self._effects.append(Destroy(live.worker, sb.id, self.epoch))
                        w = self.workers.get(live.worker)
                        if w is not None and w.incarnation == live.incarnation:
                            w.remove(live.function, live.memory_mb)
                    self.pmask.pop(sb.id, None)
                    core.sandbox_exited(sb, now)
