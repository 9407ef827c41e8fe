"""Trace conformance: the cluster's sans-IO core driven through random schedules, checked against the
model's invariants (spec/ember.pml) after every step.

A deterministic simulation wires the real core objects the way the model wires its processes:
2 assigners (`Leader`, each over its own `Assigner`), 2 workers (`Host`), frontends (`Call`), etcd as
a few atomic variables (leader key holder `ld`, epoch `ep`, the journal, worker incarnations `winc`)
and an unordered network bag. Hypothesis picks every step: which message is delivered (any order),
which process moves, and faults: leader crash, leader pause (deposed but unaware), worker crash,
lost messages, and timers firing at any moment. After every step the model's safety properties are
checked as Python predicates over the model's own names:
  (a) running[s] <= 1            a sandbox never runs two invocations at once;
  (b) nrun <= RC                 the function never runs more than its reserved concurrency;
  (c) runs[r] <= 1, outcomes[r] <= 1;
  (d) lease_epoch >= serving_ep  no worker starts anything under a deposed leader's lease;
  (f)/(h) a write-off (eviction included) never hits a sandbox that runs an invocation, or one with a
      lease outstanding (a GRANT whose frontend still waits, or an INVOKE, the worker would accept);
  (g) a DESTROY never ends a running invocation (no invocation vanishes with its sandbox);
  (i) the herd bound: no leader has more than max_starting sandboxes starting.
With `churn` the leaders' keep-alive policy evicts every idle sandbox at each tick (Assigner.tick,
keep-alive 0) and pre-warms whenever R7 allows, and ticks are ordinary actions (the policy acts at any
moment), the model's a_evict and a_prewarm (R13, R14).
Then faults stop and the system runs to quiescence, fairly; then liveness (every request answered)
and (e) no leak (journal, workers and the current leader's table agree on every sandbox) must hold.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.core.assignment import Assigner, State
from ember.core.call import Call, Phase
from ember.core.host import Host, SlotState
from ember.core.keepalive import FixedKeepAlive
from ember.core.partition import Create, Destroy, Grant, Leader, Record, Refuse, Role, Sync, WriteOff
from ember.core.placement import WorkerInfo

NA, NW, RC = 2, 2, 2
P = 0  # the one partition
FN = "f"
WORKERS = ("w0", "w1")
TIMERS = ("resync", "timed_out", "fe_timer", "tick")
MAX_STARTING = 2  # the herd bound in churn worlds (the model's MAX_STARTING)


class ChurnPolicy(FixedKeepAlive):
    """Keep-alive 0 (every tick evicts what is idle) and a pre-warm asked for at every tick."""

    prewarms = True

    def __init__(self) -> None:
        super().__init__(0.0)
        self.core: Assigner | None = None

    def due_prewarms(self, now: float) -> list:
        return list(self.core.functions.values()) if self.core is not None else []


@dataclass
class Msg:
    kind: str  # ACQ GRANT FAIL RESULT INVOKE START READY RELEASE SYNC INV DESTROY
    to: object  # assigner index, worker id, or request id
    epoch: int = 0
    sandbox: int = 0
    request: str = ""
    worker: str = ""
    incarnation: int = 0
    throttled: bool = False
    inventory: dict = field(default_factory=dict)
    probe: int = 0
    lease: str = ""  # INVOKE: the grant's lease id (the acquire id), which the worker's slot holds


class World:
    """The model's globals and processes, with the real core inside."""

    def __init__(self, nreq: int, max_faults: int, mutant: str = "", max_early: int = 0,
                 churn: bool = False, check_h: bool = True) -> None:
        self.mutant = mutant
        self.churn = churn
        self.check_h = check_h  # (h): off only where F7 (README) is known to break it
        self.now = 0.0
        # etcd (R1)
        self.ld: int | None = 0
        self.ep = 1
        self.journal: dict[int, Record] = {}
        self.winc = {w: 1 for w in WORKERS}
        # assigners
        self.leaders = [Leader(P, self._assigner, probe_after_s=0.0) for _ in range(NA)]
        for a in self.leaders:
            a.put_function(FN, 1, 128, RC, self.now)
        # workers
        self.hosts = {w: Host(1, {P: 1}) for w in WORKERS}
        self.net: list[Msg] = []
        # frontends
        self.calls = {f"r{i}": Call(f"r{i}", max_retries=2) for i in range(nreq)}
        self.unsent = list(self.calls)
        # faults
        self.faults_left = max_faults
        self.early_left = max_early
        # ghosts
        self.running: dict[int, int] = {}
        self.nrun = 0
        self.runs: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self.serving_ep = 0
        self.finished: list[tuple[str, int]] = []  # (worker, sandbox) whose invocation is done, runtime not back
        # start settled: assigner 0 leads epoch 1 and has reconciled (as the model's init)
        self.leaders[0].elected(1, [], self._workers(), self.now)
        self._effects(0)
        for _ in range(len(WORKERS)):
            self._deliver_kind("SYNC")
        while any(m.kind == "INV" for m in self.net):
            self._deliver_kind("INV")
        assert self.leaders[0].role is Role.SERVING
        self._check()

    def _assigner(self) -> Assigner:
        if self.churn:
            policy = ChurnPolicy()
            core = Assigner(account_limit=1000, max_starting=MAX_STARTING, max_waiting=8, max_wait_s=30.0,
                            keep_alive=policy)
            policy.core = core
            return core
        return Assigner(account_limit=1000, max_starting=4, max_waiting=8, max_wait_s=30.0,
                        keep_alive=FixedKeepAlive(50.0))

    def _lease_out(self, w: str, sid: int) -> bool:
        """A lease for `sid` may still start an invocation on `w`: a GRANT whose frontend still waits
        for one, or an INVOKE, under an epoch the worker does not fence."""
        host = self.hosts[w]
        for m in self.net:
            if m.sandbox != sid or host.fenced(P, m.epoch):
                continue
            if m.kind == "INVOKE" and m.to == w:
                return True
            if m.kind == "GRANT" and m.worker == w and self.calls[m.to.split("/")[0]].phase is Phase.ACQUIRING:
                return True
        return False

    def _write_off_check(self, sid: int, evicting: bool) -> None:
        """(f) and (h), at the fenced journal delete: not running, no lease outstanding. Without
        `check_h`, an eviction is not checked (F7), the other write-offs are for (f)."""
        if evicting and not self.check_h:
            return
        rec = self.journal.get(sid)
        if rec is None:
            return
        host = self.hosts[rec.worker]
        slot = host.slots.get(sid)
        if host.incarnation != rec.incarnation or slot is None:
            return
        running = slot.state is SlotState.BUSY and self.running.get(sid, 0) and (rec.worker, sid) not in self.finished
        assert not running, f"(f)/(h) sandbox {sid} written off while it runs {slot.request}"
        if self.check_h:
            assert not self._lease_out(rec.worker, sid), f"(h) sandbox {sid} written off with a lease outstanding"

    def _workers(self) -> dict[str, WorkerInfo]:
        return {w: WorkerInfo(w, self.winc[w]) for w in WORKERS}

    # ------------------------------------------------------------------ helpers

    def send(self, m: Msg) -> None:
        assert len(self.net) < 256, "network bound"
        self.net.append(m)

    def _deliver_kind(self, kind: str) -> None:
        i = next(i for i, m in enumerate(self.net) if m.kind == kind)
        self.deliver(i)

    def _outcome(self, rid: str) -> None:
        self.outcomes[rid] = self.outcomes.get(rid, 0) + 1
        assert self.outcomes[rid] <= 1, f"(c) {rid} answered twice"

    def _txn_ok(self, a: int, epoch: int) -> bool:
        """R3: the journal transaction compares the leader key's revision."""
        return self.mutant == "unfenced-journal" or (self.ld == a and self.ep == epoch)

    def _effects(self, a: int) -> None:
        leader = self.leaders[a]
        effects = leader.take_effects()
        for n, eff in enumerate(effects):
            if isinstance(eff, Grant):
                self.send(Msg("GRANT", eff.request_id, eff.epoch, eff.sandbox, eff.request_id, eff.worker))
            elif isinstance(eff, Refuse):
                self.send(Msg("FAIL", eff.request_id, request=eff.request_id, throttled=eff.throttle is not None))
            elif isinstance(eff, Create):
                if not self._txn_ok(a, eff.epoch):
                    leader.deposed()
                    return
                r = eff.record
                self.journal[r.sandbox] = r
                self.send(Msg("START", r.worker, eff.epoch, r.sandbox, incarnation=r.incarnation))
            elif isinstance(eff, WriteOff):
                if not self._txn_ok(a, eff.epoch):
                    leader.deposed()
                    return
                after = effects[n + 1] if n + 1 < len(effects) else None  # an eviction: WriteOff, Destroy
                self._write_off_check(eff.sandbox, isinstance(after, Destroy) and after.sandbox == eff.sandbox)
                self.journal.pop(eff.sandbox, None)
            elif isinstance(eff, Destroy):
                self.send(Msg("DESTROY", eff.worker, eff.epoch, eff.sandbox))
            elif isinstance(eff, Sync):
                self.send(Msg("SYNC", eff.worker, eff.epoch, worker=str(a), probe=eff.probe))

    # ------------------------------------------------------------------ actions

    def deliver(self, i: int) -> None:
        m = self.net.pop(i)
        k = m.kind
        if k in ("ACQ", "READY", "RELEASE", "INV"):
            a = m.to
            leader = self.leaders[a]
            if leader.role is Role.FOLLOWER or m.epoch != leader.epoch:
                return  # a_discard_stale
            if k == "ACQ":
                out = leader.acquire(m.request, FN, self.now)
                if isinstance(out, Grant):
                    self.send(Msg("GRANT", out.request_id, out.epoch, out.sandbox, out.request_id, out.worker))
                elif isinstance(out, Refuse):
                    self.send(Msg("FAIL", out.request_id, request=out.request_id, throttled=out.throttle is not None))
            elif k == "READY":
                leader.ready(m.worker, m.sandbox, self.now)
            elif k == "RELEASE":
                leader.release(m.worker, m.sandbox, m.request, self.now)
            else:
                was = leader.role
                leader.inventory(m.worker, m.epoch, m.inventory, self.now, m.probe)
                if was is Role.RECONCILING and leader.role is Role.SERVING:
                    self.serving_ep = max(self.serving_ep, leader.epoch)  # a_start_serving
            self._effects(a)
        elif k in ("GRANT", "FAIL", "RESULT", "REJECT"):
            call = self.calls[m.to.split("/")[0]]
            if k == "REJECT":
                what = call.on_refused()
                if what == "retry" and self.ld is not None:
                    self.send(Msg("ACQ", self.ld, self.ep, request=call.lease_id))
                elif what == "give-up":
                    self._outcome(call.request_id)
            elif k == "GRANT":
                if call.on_grant():  # fe_on_grant: send the payload, once
                    self.send(Msg("INVOKE", m.worker, m.epoch, m.sandbox, call.request_id, lease=m.request))
            elif k == "FAIL":
                if call.on_fail(m.throttled):
                    self._outcome(call.request_id)
            elif call.on_result():
                self._outcome(call.request_id)
        else:
            host = self.hosts[m.to]
            if k == "INVOKE":
                if self.mutant == "no-fencing":
                    host.wmax[P] = 0
                why = host.invoke(m.sandbox, P, m.epoch, m.lease)
                if why is None:  # w_accept
                    self.running[m.sandbox] = self.running.get(m.sandbox, 0) + 1
                    self.nrun += 1
                    self.runs[m.request] = self.runs.get(m.request, 0) + 1
                    assert self.running[m.sandbox] <= 1, "(a) two invocations in one sandbox"
                    assert self.nrun <= RC, "(b) reserved concurrency exceeded"
                    assert self.runs[m.request] <= 1, f"(c) {m.request} ran twice"
                    assert m.epoch >= self.serving_ep, "(d) a deposed leader's lease was accepted"
                else:  # w_reject: not run, the frontend may acquire again (C4)
                    self.send(Msg("REJECT", m.request, request=m.request))
            elif k == "START":
                host.start(m.sandbox, P, m.epoch, m.incarnation)  # w_start / w_start_fenced
            elif k == "SYNC":
                inv = host.sync(P, m.epoch, m.probe)  # w_sync
                if inv is not None:
                    self.send(Msg("INV", int(m.worker), inv.epoch, worker=m.to, inventory=inv.sandboxes,
                                  probe=inv.probe))
            elif k == "DESTROY":
                slot = host.slots.get(m.sandbox)
                running = (slot is not None and slot.state is SlotState.BUSY and self.running.get(m.sandbox, 0)
                           and (m.to, m.sandbox) not in self.finished)
                if host.destroy(m.sandbox, P, m.epoch) and running:  # w_destroy
                    self.running[m.sandbox] -= 1
                    self.nrun -= 1
                    raise AssertionError(f"(g) the invocation in sandbox {m.sandbox} vanished with its sandbox")

    def runtime_ready(self, w: str, sid: int) -> None:
        """The sandbox's runtime asks for work: READY after a start, RELEASE after an invocation, to
        whoever leads now."""
        said = self.hosts[w].ready(sid)
        if said is not None and self.ld is not None:
            kind, rid = said
            self.send(Msg("READY" if kind == "ready" else "RELEASE", self.ld, self.ep, sid, rid or "", w))

    def finish(self, w: str, sid: int) -> None:
        """w_finish: the invocation ends; the result goes straight to the frontend."""
        slot = self.hosts[w].slots[sid]
        self.running[sid] -= 1
        self.nrun -= 1
        self.finished.append((w, sid))
        self.send(Msg("RESULT", slot.request, request=slot.request))

    def campaign(self, a: int) -> None:
        self.ep += 1
        self.ld = a
        leader = self.leaders[a]
        leader.elected(self.ep, list(self.journal.values()), self._workers(), self.now)
        if self.mutant == "no-reconcile":
            leader.synced = set(WORKERS)
            leader._maybe_serve(self.now)
        if leader.role is Role.SERVING:
            self.serving_ep = max(self.serving_ep, leader.epoch)
        self._effects(a)

    def worker_crash(self, w: str) -> None:
        host = self.hosts[w]
        for sid, slot in host.slots.items():
            if slot.state is SlotState.BUSY and self.running.get(sid, 0):
                self.running[sid] -= 1
                self.nrun -= 1
        self.finished = [(x, s) for x, s in self.finished if x != w]
        self.winc[w] += 1
        self.hosts[w] = Host(self.winc[w], {P: self.ep})  # F1: read the epoch first

    def running_slots(self) -> list[tuple[str, int]]:
        return [(w, sid) for w, h in self.hosts.items() for sid, s in h.slots.items()
                if s.state is SlotState.BUSY and self.running.get(sid, 0) and (w, sid) not in self.finished]

    def enabled(self, faults: bool) -> list[tuple]:
        acts: list[tuple] = [("deliver", i) for i in range(len(self.net))]
        if self.unsent and self.ld is not None:
            acts.append(("send_acquire",))
        for w, h in self.hosts.items():
            for sid, s in h.slots.items():
                if s.state is SlotState.STARTING or (w, sid) in self.finished:
                    acts.append(("runtime_ready", w, sid))
        acts += [("finish", w, sid) for w, sid in self.running_slots()]
        for a, leader in enumerate(self.leaders):
            if self.ld is None and leader.role is Role.FOLLOWER:
                acts.append(("campaign", a))
            if leader.role is not Role.FOLLOWER and not (self.ld == a and self.ep == leader.epoch):
                acts.append(("step_down", a))
            if leader.role is not Role.FOLLOWER and any(
                    w in leader.workers and leader.workers[w].incarnation != self.winc[w] for w in WORKERS):
                acts.append(("worker_restarted", a))
        timers: list[tuple] = []
        for a, leader in enumerate(self.leaders):
            if leader.role is Role.RECONCILING:
                timers.append(("resync", a))
            if leader.role is Role.SERVING:
                timers += [("timed_out", a, False), ("timed_out", a, True)]
        timers += [("fe_timer", r) for r, c in self.calls.items() if r not in self.unsent and not c.done]
        timers.append(("tick",))
        # R11: a timer fires when nothing else can move ("a long time passed"), or early, a bounded
        # number of times per schedule (the model's MAX_EARLY)
        if not acts or (self.early_left > 0 and len(self.net) < 32):  # early timers: not faster than the network
            acts += timers
        elif self.churn:  # the policy evicts and pre-warms at any moment (R13, R14)
            acts.append(("tick",))
        if faults and self.faults_left > 0:
            if self.ld is not None:
                acts += [("leader_crash",), ("leader_pause",)]
            acts += [("worker_crash", w) for w in WORKERS]
            acts += [("drop", i) for i in range(len(self.net))]
        return acts

    def quiet(self) -> bool:
        return not any(a[0] not in TIMERS for a in self.enabled(faults=False))

    def step(self, act: tuple) -> None:
        kind = act[0]
        if kind in TIMERS and not (kind == "tick" and self.churn) and not self.quiet():
            assert self.early_left > 0
            self.early_left -= 1
        if kind == "deliver":
            self.deliver(act[1])
        elif kind == "send_acquire":  # fe_send_acquire
            rid = self.unsent.pop(0)
            self.send(Msg("ACQ", self.ld, self.ep, request=self.calls[rid].lease_id))
        elif kind == "runtime_ready":
            _, w, sid = act
            if (w, sid) in self.finished:
                self.finished.remove((w, sid))
            self.runtime_ready(w, sid)
        elif kind == "finish":
            self.finish(act[1], act[2])
        elif kind == "campaign":
            self.campaign(act[1])
        elif kind == "step_down":
            self.leaders[act[1]].step_down()
        elif kind == "worker_restarted":
            a = act[1]
            leader = self.leaders[a]
            for w in WORKERS:
                if w in leader.workers and leader.workers[w].incarnation != self.winc[w]:
                    leader.worker_joined(WorkerInfo(w, self.winc[w]), self.now)
                    break
            self._effects(a)
        elif kind == "resync":
            self.leaders[act[1]].resync()
            self._effects(act[1])
        elif kind == "timed_out":
            self.leaders[act[1]].timed_out(self.now, act[2])
            self._effects(act[1])
        elif kind == "fe_timer":
            rid = act[1]
            what = self.calls[rid].on_timer()
            if what == "retry" and self.ld is not None:  # fe_retry_acquire
                self.send(Msg("ACQ", self.ld, self.ep, request=self.calls[rid].lease_id))
            elif what == "give-up":  # fe_give_up
                self._outcome(rid)
        elif kind == "tick":
            self.now += 1.0
            for a, leader in enumerate(self.leaders):
                leader.tick(self.now)
                self._effects(a)
        elif kind == "leader_crash":
            self.faults_left -= 1
            self.leaders[self.ld].step_down()
            self.ld = None
        elif kind == "leader_pause":
            self.faults_left -= 1
            self.ld = None
        elif kind == "worker_crash":
            self.faults_left -= 1
            self.worker_crash(act[1])
        elif kind == "drop":
            self.faults_left -= 1
            self.net.pop(act[1])
        self._check()

    # ------------------------------------------------------------------ invariants

    def _check(self) -> None:
        assert all(v <= 1 for v in self.running.values()), "(a)"
        assert self.nrun <= RC, "(b)"
        assert all(v <= 1 for v in self.runs.values()) and all(v <= 1 for v in self.outcomes.values()), "(c)"
        for leader in self.leaders:
            if leader.core is not None:  # (i) the herd bound, before the Assigner's own check of it
                starting = sum(1 for sb in leader.core.sandboxes.values() if sb.state is State.STARTING)
                assert starting <= leader.core.max_starting, f"(i) {starting} sandboxes starting at once"
        for leader in self.leaders:  # the Leader's rules, and its Assigner's, hold inside every leader
            leader.verify()

    def quiesce(self) -> None:
        """Faults are over: run fairly (messages in order, then processes, timers only when quiet)."""
        self.early_left = 0
        full_probe = False
        for _ in range(5000):
            if self.net:
                self.step(("deliver", 0))
                continue
            acts = [x for x in self.enabled(faults=False) if x[0] not in TIMERS]
            if acts:
                self.step(acts[0])
                continue
            leader = self.leaders[self.ld] if self.ld is not None else None
            core = leader.core if leader is not None else None
            if leader is not None and leader.role is Role.RECONCILING:
                self.step(("resync", self.ld))
            elif core is not None and any(sb.state in (State.BUSY, State.STARTING) for sb in core.sandboxes.values()):
                self.step(("timed_out", self.ld, False))
            else:
                pending = [r for r, c in self.calls.items() if not c.done and r not in self.unsent]
                if pending:
                    self.step(("fe_timer", pending[0]))
                elif not full_probe:  # the periodic full probe comes round (F5)
                    full_probe = True
                    self.step(("timed_out", self.ld, True))
                else:
                    return
        raise AssertionError("did not quiesce")

    def consistent(self) -> None:
        """(e): one serving leader; journal, workers and its table agree on every sandbox."""
        assert self.ld is not None
        leader = self.leaders[self.ld]
        assert leader.role is Role.SERVING and leader.epoch == self.ep
        core = leader.core
        assert core is not None
        on_workers = {sid: (w, s) for w, h in self.hosts.items() for sid, s in h.slots.items()}
        for sid in set(self.journal) | set(on_workers) | set(core.sandboxes):
            live = sid in self.journal
            ws = on_workers.get(sid)
            sb = core.sandboxes.get(sid)
            if live:
                rec = self.journal[sid]
                assert ws is not None and ws[0] == rec.worker, f"journaled {sid} is not on {rec.worker}"
                assert ws[1].state is SlotState.IDLE and sb is not None and sb.state is State.IDLE, (sid, ws, sb)
            else:
                assert ws is None, f"orphan {sid} on {ws[0]}"
                assert sb is None, f"ghost {sid} in the table"


KINDS = ("deliver:ACQ", "deliver:GRANT", "deliver:FAIL", "deliver:RESULT", "deliver:INVOKE", "deliver:START",
         "deliver:READY", "deliver:RELEASE", "deliver:SYNC", "deliver:INV", "deliver:DESTROY", "deliver:REJECT",
         "runtime_ready",
         "finish", "step_down", "worker_restarted", "resync", "timed_out", "fe_timer", "tick", "leader_crash",
         "leader_pause", "worker_crash", "drop")


def kind_of(world: World, act: tuple) -> str:
    return f"deliver:{world.net[act[1]].kind}" if act[0] == "deliver" else act[0]


def choose(world: World, acts: list[tuple], muted: frozenset[str], pick: int) -> tuple:
    """Swarm testing: each schedule mutes some kinds of action (a message kind held back, a process
    that stays slow), which reaches deep interleavings (a grant outliving a failover) far more often
    than a uniform choice. Muted kinds still move when nothing else can."""
    by_kind: dict[str, list[tuple]] = {}
    for a in acts:
        by_kind.setdefault(kind_of(world, a), []).append(a)
    kinds = [k for k in by_kind if k not in muted] or list(by_kind)
    if pick & 15 == 0:  # now and then a slow kind moves anyway
        kinds = list(by_kind)
    options = by_kind[kinds[(pick >> 4) % len(kinds)]]  # a kind first, so rare kinds are not drowned
    return options[(pick >> 12) % len(options)]


def run(data: st.DataObject, nreq: int, max_faults: int, steps: int, mutant: str = "", churn: bool = False,
        early: tuple[int, ...] = (0, 1, 2, 3, 1000), check_h: bool = True) -> World:
    world = World(nreq, max_faults, mutant, max_early=data.draw(st.sampled_from(early)), churn=churn,
                  check_h=check_h)
    muted = frozenset(data.draw(st.sets(st.sampled_from(KINDS), max_size=8)))
    calm = data.draw(st.integers(0, steps))  # faults begin after some steps: they find a busier system
    for i in range(steps):
        acts = world.enabled(faults=i >= calm)
        world.step(choose(world, acts, muted, data.draw(st.integers(0, 1 << 24))))
    world.quiesce()
    assert all(c.done for c in world.calls.values()), "liveness: a request was never answered"
    assert all(world.outcomes.get(r) == 1 for r in world.calls), "every request got exactly one outcome"
    world.consistent()
    return world


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_schedules_keep_the_models_invariants(data: st.DataObject) -> None:
    run(data, nreq=4, max_faults=3, steps=data.draw(st.integers(10, 120)))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fault_free_schedules_answer_every_request_without_errors(data: st.DataObject) -> None:
    world = run(data, nreq=3, max_faults=0, steps=data.draw(st.integers(10, 80)))
    # live-ok: early timers may still give up on a request, but nothing runs twice or leaks
    assert sum(1 for c in world.calls.values() if c.phase is Phase.OK) + sum(
        1 for c in world.calls.values() if c.phase in (Phase.ERROR, Phase.THROTTLED)) == 3


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_eviction_and_prewarm_keep_the_models_invariants(data: st.DataObject) -> None:
    """R13/R14 with the model's bounds for (h): the policy evicts and pre-warms at any moment, racing
    grants, READY/RELEASE, failovers, worker crashes and drops; timers fire only when quiet."""
    run(data, nreq=3, max_faults=3, steps=data.draw(st.integers(10, 120)), churn=True, early=(0,))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_eviction_with_early_timers_keeps_everything_but_h(data: st.DataObject) -> None:
    """Early timers too (the model's safety-nr2-early-evict): DESTROYs race INVOKEs, and (g) must hold.
    (h) is left out: an early probe breaks it (F7, the strict xfail below)."""
    run(data, nreq=2, max_faults=3, steps=data.draw(st.integers(10, 120)), churn=True, early=(1, 2, 3, 1000),
        check_h=False)


def f7_schedule(world: World) -> None:
    """The model's finding-f7 trail, step by step on the real core: an early probe's stale "idle"
    releases a sandbox whose INVOKE is in flight; the INVOKE runs; the keep-alive policy evicts it."""
    def deliver(kind: str) -> None:
        world.step(("deliver", next(i for i, m in enumerate(world.net) if m.kind == kind)))

    def ready() -> None:
        w, sid = next((w, sid) for w, h in world.hosts.items() for sid in h.slots)
        world.step(("runtime_ready", w, sid))

    world.step(("send_acquire",))  # r0: cold start, runs, is released: the sandbox is IDLE
    for kind in ("ACQ", "START"):
        deliver(kind)
    ready()
    for kind in ("READY", "GRANT", "INVOKE"):
        deliver(kind)
    w, sid = world.running_slots()[0]
    world.step(("finish", w, sid))
    deliver("RESULT")
    ready()
    deliver("RELEASE")
    world.step(("send_acquire",))  # r1 is granted the idle sandbox; its INVOKE is in flight
    deliver("ACQ")
    deliver("GRANT")
    world.step(("timed_out", 0, False))  # early: the probe covers the busy sandbox
    deliver("SYNC")  # the worker answers "idle": the INVOKE has not arrived
    deliver("INVOKE")  # now it runs
    deliver("INV")  # the stale "idle" is the latest probe's answer (F3, F4 allow it): released
    world.step(("tick",))  # the policy evicts the idle sandbox: written off while it runs


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="F7 (spec/README.md): open; an eviction after an early probe's stale "
                   "'idle' writes off a running sandbox")
def test_f7_no_eviction_of_a_running_sandbox_after_an_early_probe() -> None:
    world = World(2, 0, max_early=1, churn=True)
    f7_schedule(world)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="F7 (spec/README.md): open; the evicted sandbox's slot is given away while "
                   "it runs, and two more requests exceed reserved concurrency")
def test_f7_reserved_concurrency_after_an_eviction_of_a_running_sandbox() -> None:
    """The model's finding-f7-concurrency on the real core: after the F7 schedule two more requests
    come; a pre-warm and a cold start serve them while r1 still runs in the evicted sandbox."""
    world = World(4, 0, max_early=1, churn=True, check_h=False)
    f7_schedule(world)
    world.step(("send_acquire",))
    world.step(("send_acquire",))
    for _ in range(40):
        acts = [a for a in world.enabled(faults=False) if a[0] in ("deliver", "runtime_ready")]
        if not acts:
            break
        world.step(acts[0])


# ---------------------------------------------------------------------- the checks can fail
def _mutate(monkeypatch, mutant: str) -> None:
    if mutant == "accept-busy":
        real = Host.invoke

        def invoke(self, sandbox, partition, epoch, request):
            slot = self.slots.get(sandbox)
            if slot is not None and slot.state is SlotState.BUSY:
                slot.state = SlotState.IDLE
            return real(self, sandbox, partition, epoch, request)
        monkeypatch.setattr(Host, "invoke", invoke)
    elif mutant == "no-incarnation":
        real_start = Host.start
        monkeypatch.setattr(Host, "start", lambda self, s, p, e, inc: real_start(self, s, p, e, self.incarnation))
    elif mutant == "resend-payload":
        def on_timer(self):
            if self.phase is Phase.SENT and self.retries < self.max_retries:
                self.retries += 1
                self.phase = Phase.ACQUIRING
                return "retry"
            return Call.__dict__["_real_on_timer"](self)
        monkeypatch.setattr(Call, "_real_on_timer", Call.on_timer, raising=False)
        monkeypatch.setattr(Call, "on_timer", on_timer)
    elif mutant == "stale-probe":  # F3/F4 removed: every probe answer overrides the table
        real_inventory = Leader.inventory

        def inventory(self, worker, epoch, sandboxes, now, probe=0):
            if probe:
                for sid, rec in self.journal.items():
                    if rec.worker == worker:
                        self.pmask[sid] = probe
            return real_inventory(self, worker, epoch, sandboxes, now, probe)
        monkeypatch.setattr(Leader, "inventory", inventory)
    elif mutant == "no-probe":
        monkeypatch.setattr(Leader, "timed_out", lambda self, now, every=False: None)
    elif mutant == "destroy-any":  # H4 removed: a DESTROY stops the sandbox whatever its state
        def destroy(self, sandbox, partition, epoch):
            slot = self.slots.get(sandbox)
            if slot is None or slot.partition != partition or self.fenced(partition, epoch):
                return False
            del self.slots[sandbox]
            return True
        monkeypatch.setattr(Host, "destroy", destroy)
    elif mutant in ("evict-granted", "prewarm-herd"):
        real_tick = Assigner.tick

        def tick(self, now):
            real_tick(self, now)
            if mutant == "evict-granted":  # the policy also evicts sandboxes it has granted (BUSY)
                for sb in [sb for sb in self.sandboxes.values() if sb.state is State.BUSY]:
                    self.discard(sb, now)
            elif self._prewarms:  # a pre-warm whatever is starting, idle or in flight
                for fn in self.keep_alive.due_prewarms(now):
                    if not fn.deleted:
                        self._start(fn, now)
        monkeypatch.setattr(Assigner, "tick", tick)


MUTANTS = ("no-fencing", "accept-busy", "no-reconcile", "unfenced-journal", "resend-payload", "no-incarnation",
           "stale-probe", "no-probe", "destroy-any", "evict-granted", "prewarm-herd")
# The R13/R14 mutants run in churn worlds: (requests, early-timer choices, check (h)), as the model's runs.
CHURN = {
    "destroy-any": (2, (1, 2, 3, 1000), False),  # needs a DESTROY racing an INVOKE: an early probe (F7)
    "evict-granted": (3, (0,), True),
    "prewarm-herd": (3, (0,), True),
    # F7 (README), on the real core: (h), and the (b) it leads to with 3 requests
    "f7": (2, (1, 2, 3, 1000), True),
    "f7-concurrency": (3, (1, 2, 3, 1000), False),
}

# For each mutant, a schedule (a seed of the same random generator) on which it breaks a property.
# Found by `python tests/test_cluster_conformance.py --find-seeds`, which also prints how often a
# random schedule catches each mutant. Rerun it when the core's behaviour changes.
# Measured on 2026-11-26 (first seed; 3 hits found within N schedules): no-fencing 248, accept-busy 1432,
# no-reconcile 115, unfenced-journal 254, resend-payload 38, no-incarnation 16224, stale-probe 7955,
# no-probe 7. The real core failed none of them, nor any of 30,000 other seeded schedules.
MUTANT_SEEDS: dict[str, int] = {
    "no-fencing": 70,
    "accept-busy": 126,
    "no-reconcile": 5,
    "unfenced-journal": 145,
    "resend-payload": 27,
    "no-incarnation": 1088,
    "stale-probe": 293,
    "no-probe": 1,
    # churn worlds (CHURN), measured on 2026-12-03: destroy-any 821 (3 hits in 1087 schedules),
    # evict-granted 2 (3 in 5), prewarm-herd 0 (3 in 3)
    "destroy-any": 821,
    "evict-granted": 2,
    "prewarm-herd": 0,
}


def seeded_run(seed: int, mutant: str = "", churn: str = "") -> World:
    """The generator of `run`, driven by a seeded PRNG instead of hypothesis: a replayable schedule.
    With `churn` (a key of CHURN) the world evicts and pre-warms, with that entry's bounds."""
    import random

    rng = random.Random(seed)
    if churn:
        nreq, early, check_h = CHURN[churn]
        world = World(nreq, 3, mutant, max_early=rng.choice(early), churn=True, check_h=check_h)
    else:
        world = World(4, 3, mutant, max_early=rng.choice([0, 1, 2, 3, 1000]))
    muted = frozenset(rng.sample(KINDS, rng.randint(0, 12)))
    steps = rng.randint(10, 160)
    calm = rng.randint(0, steps)
    for i in range(steps):
        world.step(choose(world, world.enabled(faults=i >= calm), muted, rng.randrange(1 << 24)))
    world.quiesce()
    assert all(c.done for c in world.calls.values()), "liveness: a request was never answered"
    assert all(world.outcomes.get(r) == 1 for r in world.calls), "every request got exactly one outcome"
    world.consistent()
    return world


def test_every_mutant_breaks_a_property_the_real_core_keeps(monkeypatch) -> None:
    """Each rule the model's mutants remove is needed here too: on a recorded schedule the mutated core
    violates a property, and on the very same schedule the real core does not."""
    import pytest

    assert set(MUTANT_SEEDS) == set(MUTANTS)
    for mutant, seed in MUTANT_SEEDS.items():
        churn = mutant if mutant in CHURN else ""
        seeded_run(seed, churn=churn)  # the real core keeps every property on this schedule
        with monkeypatch.context() as m:
            _mutate(m, mutant)
            with pytest.raises(AssertionError):
                seeded_run(seed, mutant, churn=churn)


def _find_seeds(budget: int = 20000) -> None:
    from _pytest.monkeypatch import MonkeyPatch

    only = [m for m in sys.argv[2:] if m in MUTANTS]
    for mutant in only or MUTANTS:
        churn = mutant if mutant in CHURN else ""
        mp = MonkeyPatch()
        _mutate(mp, mutant)
        first, hits = None, 0
        for seed in range(budget):
            try:
                seeded_run(seed, mutant, churn=churn)
            except AssertionError:
                mp.undo()
                try:
                    seeded_run(seed, churn=churn)
                except AssertionError:
                    print(f"seed {seed}: the REAL core fails too")
                    raise
                _mutate(mp, mutant)
                hits += 1
                if first is None:
                    first = seed
                if hits >= 3:
                    break
        mp.undo()
        print(f'    "{mutant}": {first},  # {hits} hits in {seed + 1} schedules')


if __name__ == "__main__":
    if "--find-seeds" in sys.argv:
        _find_seeds()
