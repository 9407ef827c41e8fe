"""ember.sandbox.endpoint on its own: the Runtime API's states, every move checked against MOVES."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.sandbox.endpoint import MOVES, Endpoint, EState, IllegalMove, Signal


def test_a_whole_invocation_cycle() -> None:
    ep = Endpoint()
    assert ep.initialising
    assert ep.next() is Signal.READY and ep.state is EState.IDLE
    ep.deliver("r1")
    assert ep.state is EState.ASSIGNED and ep.request_id == "r1"
    assert ep.result("r1") is False, "a result for an invocation the runtime has not fetched is refused"
    assert ep.next() is Signal.NONE  # hand it over
    assert ep.take() == "r1" and ep.state is EState.RUNNING
    assert ep.result("other") is False and ep.state is EState.RUNNING
    assert ep.result("r1") is True and ep.answered and ep.request_id is None
    assert ep.result("r1") is False, "a second result for the same invocation is refused"
    assert ep.next() is Signal.RESET and ep.state is EState.IDLE


def test_next_without_answering_breaks_the_sandbox() -> None:
    ep = Endpoint()
    ep.next()
    ep.deliver("r1")
    ep.take()
    assert ep.next() is Signal.BROKEN and ep.done
    assert ep.result("r1") is False
    ep.stop()
    assert ep.next() is Signal.REFUSE


def test_init_error_only_during_init() -> None:
    ep = Endpoint()
    assert ep.init_error() is True and ep.state is EState.FAILED
    assert ep.next() is Signal.REFUSE
    ep2 = Endpoint()
    ep2.next()
    assert ep2.init_error() is False and ep2.state is EState.IDLE


def test_one_invocation_at_a_time() -> None:
    ep = Endpoint()
    ep.next()
    ep.deliver("r1")
    with pytest.raises(IllegalMove):
        ep.deliver("r2")
    with pytest.raises(IllegalMove):
        Endpoint().deliver("r0")  # not ready yet


def test_stop_is_final() -> None:
    ep = Endpoint()
    ep.stop()
    ep.stop()  # idempotent
    assert ep.state is EState.STOPPED and MOVES[EState.STOPPED] == frozenset()
    with pytest.raises(IllegalMove):
        ep.deliver("r1")


OPS = ["next", "deliver", "take", "result", "bad-result", "init_error", "stop"]


@given(st.lists(st.sampled_from(OPS), max_size=40))
def test_any_sequence_keeps_the_rules(ops: list[str]) -> None:
    """Whatever the runtime and ember do, the endpoint is only ever in a state MOVES allows from the
    last, holds a request id exactly while ASSIGNED or RUNNING, and an illegal ember call raises."""
    ep = Endpoint()
    n = 0
    for op in ops:
        before = ep.state
        try:
            if op == "next":
                ep.next()
            elif op == "deliver":
                n += 1
                ep.deliver(f"r{n}")
            elif op == "take":
                ep.take()
            elif op == "result":
                ep.result(ep.request_id or "none")
            elif op == "bad-result":
                assert ep.result("not-this-one") is False
            elif op == "init_error":
                ep.init_error()
            else:
                ep.stop()
        except IllegalMove:
            assert op in ("deliver", "take") and ep.state is before
            continue
        assert ep.state is before or ep.state in MOVES[before], (before, op, ep.state)
        assert (ep.request_id is not None) == (ep.state in (EState.ASSIGNED, EState.RUNNING))
