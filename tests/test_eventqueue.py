"""The asynchronous queue's sans-IO brain: retry schedule, fairness, caps, and that every event is
always in exactly one state (checked by a hypothesis state machine)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ember.core.eventqueue import Event, EventQueue, Outcome, RetryPolicy

POLICY = RetryPolicy()


def _event(q: EventQueue, eid: int, function: str = "f", now: float = 0.0) -> Event:
    ev = Event(eid, f"r{eid}", function, now, not_before=now)
    q.add(ev, now)
    return ev


def test_function_errors_retry_after_one_then_two_minutes_then_give_up() -> None:
    q = EventQueue()
    ev = _event(q, 1)
    assert q.next_ready() is ev
    d = q.finished(ev, Outcome.FUNCTION_ERROR, 10.0, POLICY)
    assert d.retry and d.at == 70.0
    q.tick(69.0)
    assert q.next_ready() is None
    q.tick(70.0)
    assert q.next_ready() is ev
    d = q.finished(ev, Outcome.FUNCTION_ERROR, 75.0, POLICY)
    assert d.retry and d.at == 195.0
    q.tick(195.0)
    assert q.next_ready() is ev
    d = q.finished(ev, Outcome.FUNCTION_ERROR, 200.0, POLICY)
    assert not d.retry and d.condition == "RetriesExhausted"
    assert q.depth == 0 and q.retries == 2


def test_max_retries_zero_gives_up_at_once() -> None:
    q = EventQueue()
    ev = _event(q, 1)
    q.next_ready()
    assert q.finished(ev, Outcome.FUNCTION_ERROR, 1.0, RetryPolicy(max_retries=0)).condition == "RetriesExhausted"


def test_throttles_back_off_from_one_second_doubling_to_five_minutes() -> None:
    q = EventQueue()
    ev = _event(q, 1)
    now, delays = 0.0, []
    for _ in range(12):
        assert q.next_ready() is ev
        d = q.finished(ev, Outcome.THROTTLED, now, POLICY)
        assert d.retry
        delays.append(d.at - now)
        now = d.at
        q.tick(now)
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert ev.attempts == 0  # throttles do not use up retries


def test_event_age_limit_ends_retries() -> None:
    q = EventQueue()
    ev = _event(q, 1, now=0.0)
    q.next_ready()
    d = q.finished(ev, Outcome.THROTTLED, 59.5, RetryPolicy(max_age_s=60))
    assert not d.retry and d.condition == "EventAgeExceeded"
    ev2 = _event(q, 2, now=0.0)
    assert q.expired(ev2, 61.0, RetryPolicy(max_age_s=60))


def test_delay_scale_shrinks_time_without_changing_the_logic() -> None:
    q = EventQueue(delay_scale=0.01)
    ev = _event(q, 1)
    q.next_ready()
    assert q.finished(ev, Outcome.FUNCTION_ERROR, 0.0, POLICY).at == 0.6
    assert q.expired(ev, 216.1, POLICY) and not q.expired(ev, 215.9, POLICY)


def test_a_backlog_does_not_delay_another_functions_fresh_event() -> None:
    q = EventQueue(max_inflight=4)
    for i in range(100_000):
        _event(q, i, "busy")
    running = [q.next_ready() for _ in range(4)]
    assert all(e is not None and e.function == "busy" for e in running)
    fresh = _event(q, 200_000, "quiet")
    assert q.next_ready() is None  # every slot is taken
    q.finished(running[0], Outcome.SUCCESS, 1.0, POLICY)  # type: ignore[arg-type]
    q.finished(running[1], Outcome.SUCCESS, 1.0, POLICY)  # type: ignore[arg-type]
    # within one turn of the backlog: one of the next two free slots, whatever the backlog's size
    assert fresh in (q.next_ready(), q.next_ready())


def test_round_robin_between_backlogs() -> None:
    q = EventQueue(max_inflight=1000)
    for i in range(6):
        _event(q, i, "a")
    for i in range(6, 9):
        _event(q, i, "b")
    order = [q.next_ready().function for _ in range(9)]  # type: ignore[union-attr]
    assert order == ["a", "b", "a", "b", "a", "b", "a", "a", "a"]


def test_reserved_concurrency_caps_in_flight_events() -> None:
    q = EventQueue(max_inflight=10)
    q.set_cap("f", 2)
    evs = [_event(q, i) for i in range(5)]
    got = [q.next_ready(), q.next_ready(), q.next_ready()]
    assert got[:2] == evs[:2] and got[2] is None
    q.finished(evs[0], Outcome.SUCCESS, 1.0, POLICY)
    assert q.next_ready() is evs[2]


class QueueMachine(RuleBasedStateMachine):
    """Q1: every accepted event is exactly one of ready, delayed, in flight or finished."""

    @initialize()
    def setup(self) -> None:
        self.q = EventQueue(max_inflight=3, delay_scale=0.5)
        self.now = 0.0
        self.next_id = 0
        self.inflight: dict[int, Event] = {}
        self.finished: set[int] = set()
        self.all: set[int] = set()

    @rule(function=st.sampled_from(["a", "b", "c"]))
    def accept(self, function: str) -> None:
        ev = Event(self.next_id, f"r{self.next_id}", function, self.now, not_before=self.now)
        self.next_id += 1
        self.all.add(ev.id)
        self.q.add(ev, self.now)

    @rule()
    def dispatch(self) -> None:
        ev = self.q.next_ready()
        if ev is not None:
            assert ev.id not in self.inflight and ev.id not in self.finished
            assert ev.not_before <= self.now + 1e-9
            self.inflight[ev.id] = ev
        assert len(self.inflight) <= 3

    @precondition(lambda self: bool(self.inflight))
    @rule(data=st.data(), outcome=st.sampled_from(list(Outcome)))
    def complete(self, data: st.DataObject, outcome: Outcome) -> None:
        eid = data.draw(st.sampled_from(sorted(self.inflight)))
        ev = self.inflight.pop(eid)
        d = self.q.finished(ev, outcome, self.now, RetryPolicy(max_retries=1, max_age_s=60))
        if not d.retry:
            self.finished.add(eid)
        else:
            assert outcome in (Outcome.FUNCTION_ERROR, Outcome.THROTTLED, Outcome.SERVICE_ERROR)
            assert d.at > self.now

    @rule(dt=st.sampled_from([0.5, 1.0, 10.0, 100.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.q.tick(self.now)

    @invariant()
    def every_event_in_exactly_one_state(self) -> None:
        ready = {e.id for q in self.q.queues.values() for e in q.ready}
        delayed = {e.id for _, _, e in self.q._delayed}
        inflight = set(self.inflight)
        assert not (ready & delayed) and not (ready & inflight) and not (delayed & inflight)
        assert ready | delayed | inflight | self.finished == self.all
        assert not (self.finished & (ready | delayed | inflight))
        assert self.q.depth == len(ready | delayed | inflight)
        assert self.q.inflight == len(inflight)

    def teardown(self) -> None:
        if not hasattr(self, "q"):
            return
        for _ in range(10_000):  # drain: everything finishes when runs succeed
            self.now += 400.0
            self.q.tick(self.now)
            ev = self.q.next_ready()
            for eid in list(self.inflight):
                e = self.inflight.pop(eid)
                assert not self.q.finished(e, Outcome.SUCCESS, self.now, POLICY).retry
                self.finished.add(eid)
            if ev is None and not self.inflight and self.q.depth == 0:
                break
            if ev is not None:
                self.inflight[ev.id] = ev
        assert self.finished == self.all and self.q.depth == 0


QueueMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestQueueMachine = QueueMachine.TestCase
