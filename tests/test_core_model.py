"""Stateful property tests of the sans-IO core against a simple reference model.

Hypothesis drives the real `Assigner` through random interleavings of invokes, sandbox starts and
failures, releases, timeouts, crashes, cancellations, code updates, reservation changes, deletions
and the passage of time, while a minimal "shell" carries out the core's effects the way the server
does. After every step (and, with `verify_each_step`, after every call into the core) the core checks
the rules stated at the top of ember/core/assignment.py itself (`Assigner.verify`); this test adds
what only the shell knows (its processes, what it runs, what each request's outcome was):
  - no sandbox holds two invocations;
  - no limit is exceeded (reserved, account, herd bound, queue bound);
  - every accepted invoke ends with exactly one outcome (checked at the end, after quiescing);
  - no sandbox is forgotten (each is starting, idle, busy or stopping, and has a process);
  - idle sandboxes are reused most recently used first, and never from an older generation.
"""

from __future__ import annotations

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ember.core.assignment import (
    WAIT,
    Assigner,
    Dispatch,
    Function,
    Reject,
    Sandbox,
    Start,
    State,
    Stop,
    Throttle,
)
from ember.core.keepalive import FixedKeepAlive

NAMES = ("a", "b", "c")
ACCOUNT = 6
MAX_STARTING = 2
MAX_WAITING = 3


class CoreMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.core = Assigner(
            account_limit=ACCOUNT,
            max_starting=MAX_STARTING,
            max_waiting=MAX_WAITING,
            max_wait_s=5.0,
            keep_alive=FixedKeepAlive(30.0),
            verify_each_step=True,
        )
        self.now = 0.0
        self.generation = 0
        self.next_rid = 0
        self.procs: dict[int, Sandbox] = {}  # the shell's live processes
        self.stopping: set[int] = set()  # processes told to stop, not yet exited
        self.running: dict[str, Sandbox] = {}
        self.waiting: set[str] = set()
        self.accepted: set[str] = set()
        self.outcomes: dict[str, str] = {}
        self.idle_order: dict[int, list[int]] = {}  # id(Function) -> sandbox ids, least to most recent
        self.all_functions: list[Function] = []
        for name in NAMES[:2]:
            self._put(name)

    # ------------------------------------------------------------------ helpers

    def _put(self, name: str) -> None:
        self.generation += 1
        fn = self.core.put_function(name, self.generation, now=self.now)
        if fn not in self.all_functions:
            self.all_functions.append(fn)
        self._effects()

    def _outcome(self, rid: str, what: str) -> None:
        assert rid in self.accepted, rid
        assert rid not in self.outcomes, f"{rid} ended twice: {self.outcomes[rid]} then {what}"
        self.outcomes[rid] = what

    def _effects(self) -> None:
        for effect in self.core.take_effects():
            if isinstance(effect, Start):
                sb = effect.sandbox
                assert sb.id not in self.procs and sb.state is State.STARTING
                assert sb.function.starting <= MAX_STARTING, "herd bound"
                self.procs[sb.id] = sb
            elif isinstance(effect, Stop):
                sb = effect.sandbox
                assert sb.id in self.procs and sb.state is State.STOPPING
                assert sb.request is None, "a busy sandbox is never stopped while it runs"
                self.stopping.add(sb.id)
            elif isinstance(effect, Dispatch):
                rid, sb = effect.request_id, effect.sandbox
                assert rid in self.waiting, f"dispatch of {rid}, which was not waiting"
                self.waiting.discard(rid)
                assert sb.state is State.BUSY and sb.request == rid
                assert sb.generation == sb.function.generation and not sb.function.deleted
                assert all(other is not sb for other in self.running.values()), "two invocations on one sandbox"
                self.running[rid] = sb
            elif isinstance(effect, Reject):
                assert effect.request_id in self.waiting
                self.waiting.discard(effect.request_id)
                self._outcome(effect.request_id, f"rejected:{effect.reason}")
            else:  # pragma: no cover
                raise AssertionError(effect)
        self._track_idle()

    def _track_idle(self) -> None:
        for fn in self.all_functions:
            order = self.idle_order.setdefault(id(fn), [])
            now_idle = {sb.id for sb in fn.idle.values()}
            order[:] = [sid for sid in order if sid in now_idle]
            order += sorted(now_idle - set(order))  # at most one turns idle per step

    def _limit_ok_before(self, fn: Function) -> bool:
        if fn.reserved is not None:
            return fn.inflight < fn.reserved
        return self.core.unreserved_inflight < self.core.account_limit - self.core.reserved_total

    # ------------------------------------------------------------------ rules

    @rule(i=st.integers(0, len(NAMES) - 1))
    def invoke(self, i: int) -> None:
        name = NAMES[i]
        fn = self.core.functions.get(name)
        rid = f"r{self.next_rid}"
        self.next_rid += 1
        expected_mru = None
        if fn is not None and self.idle_order.get(id(fn)):
            expected_mru = self.idle_order[id(fn)][-1]
        allowed = fn is not None and self._limit_ok_before(fn)
        queue_full = fn is not None and not fn.idle and len(fn.waiting) >= MAX_WAITING
        res = self.core.acquire(rid, name, self.now)
        if isinstance(res, Throttle):
            if fn is None:
                assert res.status == 404
            else:
                assert not allowed or queue_full, f"throttled without cause: {res}"
            assert not self.core.has_effects()
            return
        assert fn is not None and allowed, "admitted past a limit"
        self.accepted.add(rid)
        if res is WAIT:
            assert expected_mru is None, "queued although a sandbox was idle"
            self.waiting.add(rid)
        else:
            assert isinstance(res, Sandbox)
            assert res.id == expected_mru, "not the most recently used idle sandbox"
            assert res.state is State.BUSY and res.request == rid
            assert res.generation == fn.generation
            self.running[rid] = res
        self._effects()

    @precondition(lambda self: any(sb.state is State.STARTING for sb in self.procs.values()))
    @rule(data=st.data())
    def sandbox_ready(self, data: st.DataObject) -> None:
        sb = data.draw(st.sampled_from([s for s in self.procs.values() if s.state is State.STARTING]))
        self.core.sandbox_ready(sb, self.now)
        self._effects()

    @precondition(lambda self: any(sb.state is State.STARTING for sb in self.procs.values()))
    @rule(data=st.data())
    def sandbox_init_fails(self, data: st.DataObject) -> None:
        sb = data.draw(st.sampled_from([s for s in self.procs.values() if s.state is State.STARTING]))
        self.core.sandbox_failed(sb, self.now, "init error")
        self._effects()

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def invocation_ends(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.running)))
        sb = self.running.pop(rid)
        self._outcome(rid, "result")
        self.core.release(sb, self.now)
        self._effects()

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def invocation_answers(self, data: st.DataObject) -> None:
        """The server's path: the result is back; the sandbox is reusable once its runtime asks."""
        rid = data.draw(st.sampled_from(sorted(self.running)))
        sb = self.running.pop(rid)
        self._outcome(rid, "result")
        self.core.finish(sb, self.now)
        assert sb.state in (State.RESETTING, State.STOPPING)
        self._effects()

    @precondition(lambda self: any(sb.state is State.RESETTING for sb in self.procs.values()))
    @rule(data=st.data(), hang=st.booleans())
    def runtime_asks_for_more(self, data: st.DataObject, hang: bool) -> None:
        """The runtime calls /next again, or hangs until the timeout discards its sandbox."""
        sb = data.draw(st.sampled_from([s for s in self.procs.values() if s.state is State.RESETTING]))
        if hang:
            self.core.discard(sb, self.now)
        else:
            self.core.sandbox_ready(sb, self.now)
        self._effects()

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def invocation_times_out(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.running)))
        sb = self.running.pop(rid)
        self._outcome(rid, "timeout")
        self.core.discard(sb, self.now)
        self._effects()

    @precondition(lambda self: bool(self.procs))
    @rule(data=st.data())
    def process_exits(self, data: st.DataObject) -> None:
        """A sandbox's process ends: a crash, or the end of a stop the core asked for."""
        sid = data.draw(st.sampled_from(sorted(self.procs)))
        sb = self.procs.pop(sid)
        self.stopping.discard(sid)
        running_rid = next((r for r, s in self.running.items() if s is sb), None)
        lost = self.core.sandbox_exited(sb, self.now)
        assert lost == running_rid, "the core and the shell disagree on what the sandbox ran"
        if lost is not None:
            del self.running[lost]
            self._outcome(lost, "crashed")
        assert sid not in self.core.sandboxes
        self._effects()

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def caller_gives_up(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.waiting)))
        name = next(fn.name for fn in self.all_functions if rid in fn.waiting)
        assert self.core.cancel(rid, name)
        self.waiting.discard(rid)
        self._outcome(rid, "cancelled")
        self._effects()

    @rule(dt=st.sampled_from([0.5, 1.0, 4.0, 31.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.core.tick(self.now)
        self._effects()
        for fn in self.core.functions.values():
            for deadline in fn.waiting.values():
                assert deadline > self.now, "a waiter outlived its deadline"
            for sb in fn.idle.values():
                assert sb.expires >= self.now - 1, "an idle sandbox outlived its keep-alive"

    @rule(i=st.integers(0, len(NAMES) - 1))
    def deploy(self, i: int) -> None:
        """Create the function, or update its code or configuration (a new generation)."""
        self._put(NAMES[i])
        fn = self.core.functions[NAMES[i]]
        for sb in self.procs.values():
            if sb.function is fn and sb.generation != fn.generation:
                assert sb.state in (State.BUSY, State.STOPPING), "an old-generation sandbox stays usable"

    @rule(i=st.integers(0, len(NAMES) - 1), value=st.one_of(st.none(), st.integers(0, 4)))
    def reserve(self, i: int, value: int | None) -> None:
        fn = self.core.functions.get(NAMES[i])
        assume(fn is not None)
        assert fn is not None
        assume(value is None or value >= fn.inflight)  # lowering below in-flight is a separate story
        core = self.core
        new_total = core.reserved_total - (fn.reserved or 0) + (value or 0)
        new_unreserved = core.unreserved_inflight + (fn.inflight if fn.reserved is not None else 0)
        new_unreserved -= fn.inflight if value is not None and fn.reserved is None else 0
        if value is None and fn.reserved is not None:
            pass
        assume(new_unreserved <= core.account_limit - new_total)
        error = core.set_reserved(fn.name, value)
        if error is None:
            assert fn.reserved == value
        else:
            assert value is not None and core.account_limit - new_total < core.min_unreserved

    @rule(i=st.integers(0, len(NAMES) - 1))
    def delete(self, i: int) -> None:
        self.core.delete_function(NAMES[i], self.now)
        self._effects()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def rules_hold(self) -> None:
        core = self.core
        core.verify()  # R1-R8 and every index, from the core's own table
        assert core.max_starting == MAX_STARTING and core.max_waiting == MAX_WAITING
        assert set(core.sandboxes) == set(self.procs), "a sandbox without a process, or a process forgotten"
        sandboxes = [id(sb) for sb in self.running.values()]
        assert len(sandboxes) == len(set(sandboxes)), "one sandbox runs two invocations"
        for rid, sb in self.running.items():
            assert sb.request == rid and sb.state is State.BUSY

    def teardown(self) -> None:
        """Quiesce: every accepted invoke must end with exactly one outcome, and every sandbox stop."""
        if not hasattr(self, "core"):
            return
        for _ in range(200):
            progressed = False
            for sb in [s for s in self.procs.values() if s.state in (State.STARTING, State.RESETTING)]:
                self.core.sandbox_ready(sb, self.now)
                self._effects()
                progressed = True
            for rid in sorted(self.running):
                sb = self.running.pop(rid)
                self._outcome(rid, "result")
                self.core.release(sb, self.now)
                self._effects()
                progressed = True
            if not progressed:
                break
        for name in NAMES:
            self.core.delete_function(name, self.now)
            self._effects()
        for sid in sorted(self.stopping):
            sb = self.procs.pop(sid)
            assert self.core.sandbox_exited(sb, self.now) is None
            self._effects()
        assert not self.waiting and not self.running
        assert self.accepted == set(self.outcomes), "an accepted invoke never ended"
        assert not self.core.sandboxes and not self.procs, "a sandbox outlived its function"
        assert self.core.unreserved_inflight == 0


CoreMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCore = CoreMachine.TestCase


def test_herd_of_fifty_starts_at_most_k() -> None:
    core = Assigner(max_starting=4, max_waiting=100)
    core.put_function("f", 1)
    results = [core.acquire(f"r{i}", "f", 0.0) for i in range(50)]
    assert all(r is WAIT for r in results)
    starts = [e for e in core.take_effects() if isinstance(e, Start)]
    assert len(starts) == 4
    for e in starts:
        core.sandbox_ready(e.sandbox, 0.1)
    dispatched = [e for e in core.take_effects() if isinstance(e, Dispatch)]
    assert [d.request_id for d in dispatched] == ["r0", "r1", "r2", "r3"]  # FIFO


def test_idle_expiry_follows_the_keep_alive() -> None:
    core = Assigner(keep_alive=FixedKeepAlive(600.0))
    core.put_function("f", 1)
    core.acquire("r0", "f", 0.0)
    (start,) = core.take_effects()
    core.sandbox_ready(start.sandbox, 0.0)
    (dispatch,) = core.take_effects()
    core.release(dispatch.sandbox, 10.0)
    core.tick(609.0)
    assert core.take_effects() == []
    core.tick(611.0)
    assert core.take_effects() == [Stop(dispatch.sandbox, "expired")]


def test_a_clock_jump_does_not_walk_every_second() -> None:
    core = Assigner(keep_alive=FixedKeepAlive(60.0))
    core.put_function("f", 1)
    core.tick(1.0)
    core.acquire("r0", "f", 1.0)
    (start,) = core.take_effects()
    core.sandbox_ready(start.sandbox, 1.0)
    core.take_effects()
    core.release(start.sandbox, 1.0)
    core.tick(1e12)  # returns at once: it visits buckets, not seconds
    assert core.take_effects() == [Stop(start.sandbox, "expired")]


def _warm(core: Assigner, name: str, n: int, now: float) -> list[Sandbox]:
    """Start n sandboxes of `name` and leave them idle; returns them in the order they turned idle."""
    rids = [f"warm-{name}-{i}" for i in range(n)]
    for rid in rids:
        assert core.acquire(rid, name, now) is WAIT
    starts = [e.sandbox for e in core.take_effects() if isinstance(e, Start)]
    assert len(starts) == n
    for sb in starts:
        core.sandbox_ready(sb, now)
    running = [e.sandbox for e in core.take_effects() if isinstance(e, Dispatch)]
    for sb in running:
        core.release(sb, now)
    assert not core.take_effects()
    return running


def test_reuse_is_most_recently_used_first() -> None:
    core = Assigner(max_starting=3)
    core.put_function("f", 1)
    _first, second, third = _warm(core, "f", 3, 0.0)
    assert core.acquire("x", "f", 1.0) is third
    assert core.acquire("y", "f", 1.0) is second
    core.release(third, 2.0)
    assert core.acquire("z", "f", 3.0) is third


def test_waiters_time_out_with_a_reject_and_free_their_slot() -> None:
    core = Assigner(max_starting=1, max_wait_s=5.0)
    core.put_function("f", 1)
    assert core.acquire("r0", "f", 0.0) is WAIT
    assert core.acquire("r1", "f", 1.0) is WAIT
    core.take_effects()
    core.tick(5.5)
    assert core.take_effects() == [Reject("r0", "queue-timeout")]
    assert core.functions["f"].inflight == 1 and core.unreserved_inflight == 1
    assert core.cancel("r1", "f") and not core.cancel("r1", "f")
    assert core.unreserved_inflight == 0


def test_update_retires_idle_sandboxes_and_never_hands_out_old_ones() -> None:
    core = Assigner(max_starting=2)
    core.put_function("f", 1)
    a, b = _warm(core, "f", 2, 0.0)
    busy = core.acquire("r", "f", 1.0)
    assert busy is b
    core.put_function("f", 2, now=1.0)
    assert core.take_effects() == [Stop(a, "retired")]
    assert core.acquire("new", "f", 1.0) is WAIT  # not `a`, not `b`
    core.release(b, 2.0)
    effects = core.take_effects()
    assert Stop(b, "retired") in effects and not any(isinstance(e, Dispatch) for e in effects)
