"""The core checks itself: LEGAL_MOVES, Assigner.verify and Leader.verify catch broken tables; reasons
are StrEnums whose output is the old strings; keep-alive state and the pre-warm heap stay bounded;
the Leader counts what its bounds refuse or drop."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable

import orjson
import pytest

import ember.core.partition as partition
from ember.core.assignment import (
    LEGAL_MOVES,
    WAIT,
    Assigner,
    Dispatch,
    Reject,
    RejectReason,
    Sandbox,
    Start,
    State,
    Stop,
    StopReason,
    Throttle,
    ThrottleReason,
)
from ember.core.keepalive import (
    PREWARM_HEAP_SLACK,
    EmberKeepAlive,
    FixedKeepAlive,
    GreedyDualKeepAlive,
    HybridHistogramKeepAlive,
    KeepAlivePolicy,
    _FnState,
    _Prewarmer,
)
from ember.core.partition import Create, Grant, Leader, Role, Sync
from ember.core.placement import WorkerInfo
from ember.core.table import Function

# ---------------------------------------------------------------------- helpers


def warm_core(n: int = 2, **kw: object) -> tuple[Assigner, list[Sandbox]]:
    """An Assigner with function f and `n` idle sandboxes (their ids in the order they turned idle)."""
    core = Assigner(max_starting=n, **kw)  # type: ignore[arg-type]
    core.put_function("f", 1)
    for i in range(n):
        assert core.acquire(f"w{i}", "f", 0.0) is WAIT
    starts = [e.sandbox for e in core.take_effects() if isinstance(e, Start)]
    for sb in starts:
        core.sandbox_ready(sb, 0.0)
    for e in core.take_effects():
        assert isinstance(e, Dispatch)
        core.release(e.sandbox, 0.0)
    assert not core.take_effects()
    core.verify()
    return core, starts


def broken(core: Assigner | Leader, rule: str) -> None:
    with pytest.raises(AssertionError, match=rule):
        core.verify()


# ---------------------------------------------------------------------- LEGAL_MOVES and _move


def test_legal_moves_cover_every_state_and_stopping_is_final() -> None:
    assert set(LEGAL_MOVES) == set(State)
    assert LEGAL_MOVES[State.STOPPING] == frozenset()
    assert all(State.STOPPING in to for frm, to in LEGAL_MOVES.items() if frm is not State.STOPPING)
    assert State.RESETTING not in LEGAL_MOVES[State.IDLE] and State.IDLE not in LEGAL_MOVES[State.BUSY]


def test_an_illegal_move_is_refused() -> None:
    core, (a, b) = warm_core()
    with pytest.raises(AssertionError, match="illegal move IDLE -> RESETTING"):
        core._move(a, State.RESETTING)
    core.put_function("f", 2)  # retires both
    assert a.state is State.STOPPING
    with pytest.raises(AssertionError, match="illegal move STOPPING -> IDLE"):
        core._move(a, State.IDLE)
    with pytest.raises(AssertionError):  # the public path asserts too: finish of a non-busy sandbox
        core.finish(b, 1.0)


# ---------------------------------------------------------------------- Assigner.verify


CORRUPTIONS: dict[str, tuple[Callable[[Assigner, list[Sandbox]], None], str]] = {
    "starting count": (lambda c, s: setattr(c.functions["f"], "starting", 1), "Function.starting"),
    "resetting count": (lambda c, s: setattr(c.functions["f"], "resetting", 1), "Function.resetting"),
    "request on idle": (lambda c, s: setattr(s[0], "request", "x"), "R1"),
    "idle set": (lambda c, s: c.functions["f"].idle.pop(s[0].id), "idle set"),
    "expiry bucket": (lambda c, s: c._expiry[s[0].expires].pop(s[0].id), "expiry bucket"),
    "memory": (lambda c, s: setattr(c, "memory_mb", c.memory_mb + 1), "R8"),
    "inflight": (lambda c, s: setattr(c.functions["f"], "inflight", 1), "R2/R3"),
    "unreserved": (lambda c, s: setattr(c, "unreserved_inflight", 1), "unreserved_inflight"),
    "old generation idle": (lambda c, s: setattr(s[0], "generation", 0), "R5"),
    "forgotten member": (lambda c, s: c.sandboxes.pop(s[0].id), "R4"),
    "too many waiters": (lambda c, s: setattr(c, "max_waiting", -1), "R6"),
    "swept expiry": (lambda c, s: setattr(c, "_swept_to", 10**9), "swept"),
}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_verify_names_the_broken_rule(what: str) -> None:
    core, sandboxes = warm_core()
    corrupt, rule = CORRUPTIONS[what]
    corrupt(core, sandboxes)
    broken(core, rule)


def test_verify_catches_waiters_with_nothing_coming_and_limits() -> None:
    core, _ = warm_core()
    fn = core.functions["f"]
    fn.waiting["lost"] = 99.0  # a waiter nobody serves (and its in-flight count)
    fn.inflight += 1
    core.unreserved_inflight += 1
    core._queued.add(fn)
    broken(core, "nothing coming")
    core, _ = warm_core()
    core.set_reserved("f", 1)
    core.acquire("x", "f", 1.0)
    core.functions["f"].reserved = 0  # behind the assigner's back
    broken(core, "reserved concurrency exceeded")


def test_a_lowered_limit_may_drain_but_never_admits() -> None:
    core, _ = warm_core(3, account_limit=10)
    for rid in "xyz":
        assert isinstance(core.acquire(rid, "f", 1.0), Sandbox)
    core.set_reserved("f", 1)  # below the 3 in flight: legal, they drain
    core.verify()
    assert isinstance(core.acquire("late", "f", 1.0), Throttle)
    core.set_account_limit(1)
    core.set_reserved("f", None)  # 3 unreserved in flight over an account of 1
    core.verify()
    assert core.acquire("later", "f", 1.0) is not WAIT and not core.has_effects()


def test_verify_each_step_checks_after_every_transition() -> None:
    core, (a, _) = warm_core(verify_each_step=True)  # type: ignore[arg-type]
    core.acquire("x", "f", 1.0)  # fine
    a.request = "ghost"  # a's index broken behind the core's back (it is idle)
    with pytest.raises(AssertionError, match="R1"):
        core.tick(2.0)


# ---------------------------------------------------------------------- reasons


def test_reasons_are_the_old_strings_in_every_output() -> None:
    assert [r.value for r in StopReason] == ["expired", "evicted", "retired", "discarded", "init-failed", "deleted"]
    assert [r.value for r in RejectReason] == ["queue-timeout", "init-failed", "deleted"]
    core = Assigner(max_starting=1, max_wait_s=1.0)
    core.put_function("f", 1)
    core.acquire("r0", "f", 0.0)
    core.take_effects()
    core.tick(2.0)
    (rej,) = core.take_effects()
    assert rej == Reject("r0", "queue-timeout") and rej.reason is RejectReason.QUEUE_TIMEOUT
    assert f"{rej.reason}" == str(rej.reason) == "{}".format(rej.reason) == "queue-timeout"  # noqa: UP032
    assert json.dumps({"reason": rej.reason}) == '{"reason": "queue-timeout"}'
    assert orjson.dumps({"reason": rej.reason}) == b'{"reason":"queue-timeout"}'
    assert {"queue-timeout": 429}.get(rej.reason) == 429


def test_throttle_reasons_are_plain_strings_so_they_can_be_keys() -> None:
    core = Assigner()
    t = core.acquire("r", "nope", 0.0)
    assert isinstance(t, Throttle) and t.kind is ThrottleReason.NOT_FOUND
    assert type(t.reason) is str and t.reason == "FunctionNotFound"
    assert orjson.dumps({t.reason: 1}) == b'{"FunctionNotFound":1}'  # orjson refuses StrEnum keys
    assert repr(t) == "Throttle(FunctionNotFound)"
    assert partition.NOT_SERVING.reason == "PartitionReconciling" and type(partition.NO_WORKER.reason) is str


def test_keepalive_does_not_import_the_assigner() -> None:
    code = "import sys, ember.core.keepalive; assert 'ember.core.assignment' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- bounds: forget and the heap


def drive(core: Assigner, name: str, at: float) -> None:
    """One zero-length invocation of `name` at `at` (init takes no time)."""
    core.tick(at)
    for e in core.take_effects():
        if isinstance(e, Start):
            core.sandbox_ready(e.sandbox, at)
        elif isinstance(e, Stop):
            core.sandbox_exited(e.sandbox, at)
    res = core.acquire(f"{name}@{at}", name, at)
    if res is WAIT:
        for e in core.take_effects():
            if isinstance(e, Start):
                core.sandbox_ready(e.sandbox, at)
        res = next(sb for sb in core.sandboxes_of(name) if sb.state is State.BUSY)
    assert isinstance(res, Sandbox)
    core.release(res, at)
    for e in core.take_effects():
        if isinstance(e, Stop):
            core.sandbox_exited(e.sandbox, at)


@pytest.mark.parametrize("make", [EmberKeepAlive, HybridHistogramKeepAlive, lambda: GreedyDualKeepAlive(1024.0)])
def test_delete_function_makes_the_policy_forget_it(make: Callable[[], KeepAlivePolicy]) -> None:
    policy = make()
    core = Assigner(keep_alive=policy, verify_each_step=True)
    for name in ("f", "g"):
        core.put_function(name, 1)
    t = 0.0
    for _ in range(6):  # f and g wake together, every 30 minutes
        for name in ("f", "g"):
            drive(core, name, t)
            t += 1.0
        t += 1800.0
    learnt = [getattr(policy, "state", None), getattr(policy, "freq", None), getattr(policy, "co", None)]
    assert any(d and "f" in d for d in learnt)
    core.delete_function("f", t)
    for d in learnt:
        assert d is None or "f" not in d
    if isinstance(policy, EmberKeepAlive):
        assert all("f" not in partners for partners in policy.co.values())
        assert all(other != "f" for _, other in policy._recent) and "f" not in policy._fns
    prewarm = getattr(policy, "_prewarm", None)
    if prewarm is not None:  # what is still live belongs to g alone
        assert prewarm.live == policy.state["g"].queued  # type: ignore[attr-defined]
    core.put_function("f", 2)  # a new function under the old name starts from nothing
    drive(core, "f", t + 1)
    core.tick(t + 4 * 3600)
    core.verify()


def test_the_prewarm_heap_stays_bounded_and_pops_in_the_same_order() -> None:
    states: dict[str, _FnState] = {}
    heap = _Prewarmer(10.0, states)
    fns = [Function(f"f{i}", 1, None, 128) for i in range(20)]
    for fn in fns:
        states[fn.name] = _FnState(4)
    rnd = random.Random(7)
    expected: list[tuple[float, int, str]] = []  # (time, seq, name) of every live entry, by hand
    peak = 0
    for seq, step in enumerate(range(20_000), start=1):
        fn = rnd.choice(fns)
        st = states[fn.name]
        if rnd.random() < 0.6 and st.pending:  # churn: an arrival cancels whatever is pending for fn
            heap.cancel(st)
            expected = [e for e in expected if e[2] != fn.name]
        start = 1000.0 + rnd.random() * 1000.0
        heap.schedule(start, start + 10_000.0, fn, st)
        expected.append((start - 10.0, seq, fn.name))
        assert heap.live == len(expected)
        assert len(heap) <= 2 * heap.live + PREWARM_HEAP_SLACK, step
        peak = max(peak, len(heap))
    assert peak < 20_000 // 4  # without rebuilds it would hold every entry ever scheduled
    due = [fn.name for fn in heap.due(10_000.0, states)]
    assert due == [name for _, _, name in sorted(expected)]
    assert heap.live == 0 == len(heap)


def test_the_prewarm_heap_stays_bounded_under_churn_through_the_assigner() -> None:
    policy = EmberKeepAlive()
    core = Assigner(keep_alive=policy)
    names = [f"f{i}" for i in range(30)]
    for name in names:
        core.put_function(name, 1)
    t = 0.0
    for _ in range(4):  # every function learns a 3-hour gap: going idle plans a pre-warm 3 hours out
        for name in names:
            drive(core, name, t)
        t += 3 * 3600.0
    rnd = random.Random(3)
    scheduled = policy._prewarm._seq
    peak = 0
    for _ in range(3000):  # churn: each arrival cancels the plan its last idle made, time barely moves
        t += rnd.choice([1.0, 2.0, 5.0])
        drive(core, rnd.choice(names), t)
        prewarm = policy._prewarm
        assert len(prewarm) <= 2 * prewarm.live + PREWARM_HEAP_SLACK
        live = sum(1 for e in prewarm._heap if prewarm._is_live(e))
        assert live == prewarm.live == sum(st.queued for st in policy.state.values())
        peak = max(peak, len(prewarm))
    scheduled = policy._prewarm._seq - scheduled
    assert scheduled > 3000 and peak < scheduled // 10  # without rebuilds it would hold nearly all of them
    core.verify()


# ---------------------------------------------------------------------- Leader


def reconciling_leader(verify: bool = False) -> Leader:
    def make() -> Assigner:
        return Assigner(keep_alive=FixedKeepAlive(60.0), verify_each_step=verify)

    leader = Leader(0, make, verify_each_step=verify)
    leader.put_function("f", 1, 128, None, 0.0)
    leader.elected(1, [], {"w0": WorkerInfo("w0", 1)}, 0.0)
    assert leader.role is Role.RECONCILING and leader.take_effects() == [Sync("w0", 1)]
    return leader


def test_leader_counts_what_its_bounds_refuse_and_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition, "MAX_PARKED", 5)
    leader = reconciling_leader()
    out = [leader.acquire(f"r{i}", "f", 0.0) for i in range(8)]
    assert out[:5] == [None] * 5 and all(o is not None and o.reason == "reconciling" for o in out[5:])
    assert leader.refused_parked == 3
    for i in range(7):
        leader.ready("w0", 100 + i, 0.0)
    assert len(leader.held) == 5 and leader.dropped_held == 2
    leader.verify()
    leader.step_down()  # counters are the process's, not the term's
    assert (leader.refused_parked, leader.dropped_held) == (3, 2)


def test_leader_verify_each_step_through_a_term() -> None:
    leader = reconciling_leader(verify=True)
    assert leader.acquire("r0", "f", 0.0) is None  # parked
    leader.inventory("w0", 1, {}, 0.0)
    assert leader.role is Role.SERVING
    (create,) = [e for e in leader.take_effects() if isinstance(e, Create)]
    sid = create.record.sandbox
    leader.ready("w0", sid, 0.1)
    assert [e for e in leader.take_effects() if isinstance(e, Grant)] == [Grant("r0", sid, "w0", 1)]
    leader.release("w0", sid, "r0", 0.2)
    leader.timed_out(1.0, every=True)
    leader.inventory("w0", 1, {sid: ("idle", None)}, 1.1, probe=leader.probes)
    leader.tick(100.0)  # expires: written off
    assert not leader.journal and leader.core is not None and not leader.core.sandboxes
    leader.delete_function("f", 101.0)
    leader.verify()


def test_leader_verify_names_the_broken_rule() -> None:
    leader = reconciling_leader()
    leader.inventory("w0", 1, {}, 0.0)
    leader.acquire("r0", "f", 0.0)
    leader.take_effects()
    leader.verify()
    sid = next(iter(leader.journal))
    leader.workers["w0"].used_mb += 1
    broken(leader, "placement")
    leader.workers["w0"].used_mb -= 1
    rec = leader.journal.pop(sid)
    leader.workers["w0"].remove(rec.function, rec.memory_mb)  # as if written off, but still in the table
    broken(leader, "R5/R7")
    leader.workers["w0"].add(rec.function, rec.memory_mb)
    leader.journal[sid] = rec._replace(generation=7)
    broken(leader, "R7")
    leader.journal[sid] = rec
    leader.pmask[sid] = 99
    broken(leader, "R11")
    del leader.pmask[sid]
    leader.held.append(("ready", "w0", sid, None))
    broken(leader, "R4")
