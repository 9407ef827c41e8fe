"""Keep-alive policies on small hand-made traces, driven through the real Assigner."""

from __future__ import annotations

import pytest

from ember.core.assignment import Assigner, Sandbox, Start, State, Stop
from ember.core.keepalive import (
    EmberKeepAlive,
    FixedKeepAlive,
    GreedyDualKeepAlive,
    HybridHistogramKeepAlive,
    KeepAlivePolicy,
    policy_from_name,
)


def core_with(policy: KeepAlivePolicy, *names: str, memory_mb: int = 128) -> Assigner:
    core = Assigner(account_limit=1000, max_starting=100, max_waiting=100, keep_alive=policy)
    for name in names:
        core.put_function(name, 1, memory_mb)
    return core


class Shell:
    """A minimal I/O shell: init takes no time, and processes exit the moment they are stopped."""

    def __init__(self, core: Assigner) -> None:
        self.core = core
        self.started: list[Sandbox] = []
        self.stopped: list[tuple[Sandbox, str]] = []
        self.n = 0

    def apply(self, now: float) -> None:
        for eff in self.core.take_effects():
            if isinstance(eff, Start):
                self.started.append(eff.sandbox)
                self.core.sandbox_ready(eff.sandbox, now)
            elif isinstance(eff, Stop):
                self.stopped.append((eff.sandbox, eff.reason))
                self.core.sandbox_exited(eff.sandbox, now)

    def invoke(self, name: str, at: float, duration: float = 0.0) -> bool:
        """One invocation; True when it was warm."""
        self.tick(at)
        self.n += 1
        res = self.core.acquire(f"r{self.n}", name, at)
        warm = isinstance(res, Sandbox)
        self.apply(at)
        sb = res if warm else next(s for s in self.core.sandboxes_of(name) if s.state is State.BUSY)
        assert isinstance(sb, Sandbox)
        self.tick(at + duration)
        self.core.release(sb, at + duration)
        self.apply(at + duration)
        return warm

    def tick(self, now: float) -> None:
        self.core.tick(now)
        self.apply(now)


def test_policy_names() -> None:
    assert isinstance(policy_from_name("fixed-10m"), FixedKeepAlive)
    assert policy_from_name("fixed-20m").idle_until(None, 5.0) == 5.0 + 1200  # type: ignore[arg-type]
    assert policy_from_name("fixed-30s").idle_until(None, 0.0) == 30.0  # type: ignore[arg-type]
    assert isinstance(policy_from_name("hybrid"), HybridHistogramKeepAlive)
    gd = policy_from_name("greedy-dual-2g")
    assert isinstance(gd, GreedyDualKeepAlive) and gd.memory_budget_mb == 2048
    assert policy_from_name("greedy-dual", memory_budget_mb=512).memory_budget_mb == 512
    default = policy_from_name("default")
    assert isinstance(default, EmberKeepAlive) and default.name == "default"
    for bad in ("fixed-", "fixed-10", "fixed-xm", "greedy-dual-0g", "lru", ""):
        with pytest.raises(ValueError):
            policy_from_name(bad)


def test_fixed_keeps_for_exactly_its_window() -> None:
    shell = Shell(core_with(FixedKeepAlive(600.0), "f"))
    assert not shell.invoke("f", 10.0, 1.0)  # first: cold
    assert shell.invoke("f", 10.0 + 1.0 + 599.0)  # 599 s idle: warm
    assert not shell.invoke("f", 611.0 + 601.0 + 1.0)  # 601+ s idle: expired, cold
    assert [r for _, r in shell.stopped] == ["expired"]


def test_hybrid_windows_follow_the_paper() -> None:
    pol = HybridHistogramKeepAlive()
    shell = Shell(core_with(pol, "f"))
    st = pol._st(shell.core.functions["f"])
    assert pol.windows(st) == ((0.0, 4 * 3600.0),)  # no data: not representative, keep the range
    t = 0.0
    for _ in range(4):  # idle times of exactly 30 minutes: bin 30 of 240, CV far above 2
        shell.invoke("f", t)
        t += 1800.0
    head, until = pol.windows(st)[0]
    assert head == pytest.approx(30 * 60 * 0.9)  # 5th percentile bin's lower edge minus 10%
    assert until == pytest.approx(31 * 60 * 1.1)  # 99th percentile bin's upper edge plus 10%
    # After the last execution the sandbox is unloaded and one pre-warmed at head, kept until `until`.
    end = t - 1800.0
    n_started = len(shell.started)
    shell.tick(end + 1.0)
    assert shell.core.counts("f")["sandboxes"] == 0
    shell.tick(end + head - 1.0)
    assert len(shell.started) == n_started
    shell.tick(end + head + 0.5)
    assert len(shell.started) == n_started + 1
    assert shell.invoke("f", t)  # the next arrival, 30 minutes on, is warm


def test_hybrid_out_of_range_uses_the_forecast() -> None:
    pol = HybridHistogramKeepAlive()
    shell = Shell(core_with(pol, "f"))
    for k in range(3):
        shell.invoke("f", k * 5 * 3600.0)  # every 5 h: beyond the 4 h range
    st = pol._st(shell.core.functions["f"])
    start, until = pol.windows(st)[0]
    assert start == pytest.approx(5 * 3600 * 0.85) and until == pytest.approx(5 * 3600 * 1.15)


def test_greedy_dual_evicts_the_lowest_priority_under_its_budget() -> None:
    pol = GreedyDualKeepAlive(memory_budget_mb=1024.0, init_cost_s=1.0)
    shell = Shell(core_with(pol, "hot", "cold", "new", memory_mb=512))
    for k in range(5):
        shell.invoke("hot", float(k))
    shell.invoke("cold", 10.0)
    assert shell.core.memory_mb == 1024 and not shell.stopped  # never expires on its own
    shell.tick(1e6)
    assert not shell.stopped
    shell.invoke("new", 1e6 + 1)  # needs 512 MB more: the 1-use sandbox goes, not the 5-use one
    assert [(sb.function.name, r) for sb, r in shell.stopped] == [("cold", "evicted")]
    assert pol.clock == pytest.approx(1 * 1.0 / 512)
    assert shell.invoke("hot", 1e6 + 2)


def test_greedy_dual_never_evicts_busy_sandboxes() -> None:
    core = core_with(GreedyDualKeepAlive(memory_budget_mb=256.0), "f", memory_mb=128)
    shell = Shell(core)
    for i in range(4):  # four concurrent invocations: the budget is soft, nothing busy is evicted
        core.acquire(f"c{i}", "f", 0.0)
        shell.apply(0.0)
    assert core.counts("f")["busy"] == 4 and not shell.stopped and core.memory_mb == 512


def test_default_pre_warms_a_periodic_function() -> None:
    pol = EmberKeepAlive()
    shell = Shell(core_with(pol, "f"))
    st = pol._st(shell.core.functions["f"])
    assert pol.windows(st) == ((0.0, 600.0),)  # too few idle times: the fallback keep-alive
    t = 0.0
    for _ in range(6):  # every 15 minutes: five idle times of 900 s, all in bin 15
        shell.invoke("f", t)
        t += 900.0
    # Bins 14..16 are warm (counts averaged over ±1 bin); bin 13 and 17 see no arrivals at all.
    assert pol.windows(st) == ((14 * 60.0, 17 * 60.0),)
    end = t - 900.0
    n_started = len(shell.started)
    shell.tick(end + 1.0)
    assert shell.core.counts("f")["sandboxes"] == 0  # unloaded right after the execution
    shell.tick(end + 14 * 60 - 11.0)
    assert len(shell.started) == n_started
    shell.tick(end + 14 * 60 - 10.0)  # pre-warmed lead_s (10 s) before the window
    assert len(shell.started) == n_started + 1
    assert shell.invoke("f", t)
    assert pol.windows(st) == ((14 * 60.0, 17 * 60.0),)


def test_default_prewarm_is_evicted_after_its_window() -> None:
    pol = EmberKeepAlive()
    shell = Shell(core_with(pol, "f"))
    for k in range(6):
        shell.invoke("f", k * 900.0)
    end = 5 * 900.0
    shell.tick(end + 14 * 60)
    assert shell.core.counts("f")["idle"] == 1
    shell.tick(end + 17 * 60 + 1)  # nobody came: evicted at the window's end
    assert shell.core.counts("f")["sandboxes"] == 0
    assert shell.stopped[-1][1] == "expired"


def test_default_co_wake_pre_warms_partners() -> None:
    pol = EmberKeepAlive()
    shell = Shell(core_with(pol, "a", "b"))
    for day in range(3):  # a and b are always invoked together, a few seconds apart, hours apart
        t = day * 6 * 3600.0
        shell.invoke("a", t)
        shell.invoke("b", t + 5.0)
    assert pol.co["a"]["b"] == 3 and pol.co["b"]["a"] == 3
    t = 3 * 6 * 3600.0
    shell.tick(t - 1)
    assert shell.core.counts("b")["sandboxes"] == 0
    n_started = len(shell.started)
    assert not shell.invoke("a", t)  # a wakes cold; b is pre-warmed on the next tick
    shell.tick(t + 1.0)
    assert len(shell.started) == n_started + 2 and shell.started[-1].function.name == "b"
    assert shell.invoke("b", t + 30.0)


def test_prewarm_skips_functions_that_are_already_warm() -> None:
    pol = EmberKeepAlive()
    core = core_with(pol, "f")
    shell = Shell(core)
    fn = core.functions["f"]
    shell.invoke("f", 0.0)  # fallback: kept idle 600 s
    st = pol._st(fn)
    pol._prewarm.schedule(100.0, 200.0, fn, st)
    n_started = len(shell.started)
    shell.tick(150.0)
    assert len(shell.started) == n_started and core.counts("f")["idle"] == 1  # R7


def test_memory_accounting_returns_to_zero() -> None:
    core = core_with(EmberKeepAlive(), "f", "g", memory_mb=256)
    shell = Shell(core)
    for k in range(10):
        shell.invoke("f" if k % 3 else "g", k * 120.0, 1.0)
    assert core.memory_mb == 256 * len(core.sandboxes)
    core.shutdown()
    shell.apply(2000.0)
    assert core.memory_mb == 0 and not core.sandboxes
