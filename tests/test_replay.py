"""The trace simulator: hand-computed counts, conservation of invocations and memory time, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ember.cli.app import app
from ember.sim.replay import compare, percentile, simulate, split
from ember.sim.trace import FunctionTrace, Workload, load_trace, synthesise

TRACES = Path("/work/shared/traces/azure2019")
POLICIES = ["fixed-10m", "fixed-20m", "hybrid", "greedy-dual-1g", "default"]


def fn(name: str, memory_mb: int = 1024) -> FunctionTrace:
    return FunctionTrace(name, [], (1000.0,) * 7, memory_mb)


def test_fixed_keep_alive_by_hand() -> None:
    # One 1 GB function; 1 s invocations at 10, 20 and 700 s; 1 s init; fixed 10 minutes; 800 s horizon.
    w = Workload([fn("f")], [(10.0, 0, 1.0), (20.0, 0, 1.0), (700.0, 0, 1.0)], 800.0)
    r = simulate(w, "fixed-10m", init_s=1.0)
    assert (r.invocations, r.cold_starts, r.sandboxes_started) == (3, 2, 2)
    # Sandbox 1 lives 10..621 (idle from 21 s, expiring at 621), sandbox 2 lives 700..800 (the end).
    assert r.busy_memory_gb_s == pytest.approx(3.0)
    assert r.init_memory_gb_s == pytest.approx(2.0)
    assert r.idle_memory_gb_s == pytest.approx((621 - 10) + (800 - 700) - 3 - 2)
    assert r.wasted_memory_gb_s == pytest.approx(r.idle_memory_gb_s + r.init_memory_gb_s)
    assert r.p50_function_cold_start_pct == pytest.approx(200 / 3)


def test_concurrent_arrivals_each_start_a_sandbox() -> None:
    w = Workload([fn("f", 512)], [(0.0, 0, 5.0), (0.5, 0, 5.0), (1.0, 0, 5.0), (20.0, 0, 1.0)], 60.0)
    r = simulate(w, "fixed-1m", init_s=1.0)
    assert (r.cold_starts, r.sandboxes_started) == (3, 3)
    assert r.throttled == 0


def test_percentile_is_linear_interpolation() -> None:
    assert percentile([0, 100], 75) == 75
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([], 75) == 0.0


arrivals = st.lists(
    st.tuples(st.floats(0, 3600), st.integers(0, 3), st.floats(0.001, 120)), min_size=1, max_size=60
)


@settings(max_examples=25, deadline=None)
@given(arrivals, st.sampled_from(POLICIES), st.floats(0.0, 5.0))
def test_every_invocation_is_warm_or_cold_once_and_memory_adds_up(
    arr: list[tuple[float, int, float]], policy: str, init_s: float
) -> None:
    functions = [fn(f"f{i}", 128 * (i + 1)) for i in range(4)]
    w = Workload(functions, sorted(arr), 3600.0)
    r = simulate(w, policy, init_s=init_s)
    assert r.invocations == len(arr) == sum(k for _, k in r.per_function_cold)
    assert r.cold_starts == sum(c for c, _ in r.per_function_cold) <= r.invocations
    assert r.throttled == 0
    busy = sum(d * functions[f].memory_mb for _, f, d in arr) / 1024
    assert r.busy_memory_gb_s == pytest.approx(busy)
    assert r.idle_memory_gb_s >= -1e-6 and r.init_memory_gb_s >= 0
    assert r.init_memory_gb_s <= r.sandboxes_started * init_s * 4 * 128 / 1024 + 1e-9
    first_calls = {f for _, f, _ in arr}
    assert r.cold_starts >= len(first_calls)  # nothing is warm before its first invocation


def test_replay_of_the_100_sample_is_consistent() -> None:
    workload = synthesise(load_trace(TRACES, 100), seed=1, minutes=180)
    total = sum(sum(f.per_minute[:180]) for f in workload.functions)
    results = compare(workload, ["fixed-10m", "hybrid", "greedy-dual", "default"])
    assert results[0].policy == "fixed-10m" and results[2].policy.startswith("greedy-dual-")
    assert results[0].wasted_memory_vs_fixed_10m == 1.0
    busy = {round(r.busy_memory_gb_s, 6) for r in results}
    assert len(busy) == 1  # same workload, same running time, whatever the policy
    for r in results:
        assert r.invocations == total and r.throttled == 0
        assert 0 < r.cold_starts <= total
        assert r.p50_function_cold_start_pct <= r.p75_function_cold_start_pct <= r.p99_function_cold_start_pct
        doc = json.loads(r.json_line())
        assert doc["policy"] == r.policy and doc["invocations"] == total


def test_subsets_and_seeds_are_stable() -> None:
    small = synthesise(load_trace(TRACES, 100), seed=7, minutes=30)
    big = synthesise(load_trace(TRACES, 200), seed=7, minutes=30)
    name = small.functions[0].name
    i, j = (next(k for k, f in enumerate(w.functions) if f.name == name) for w in (small, big))
    assert [(t, d) for t, f, d in small.arrivals if f == i] == [(t, d) for t, f, d in big.arrivals if f == j]
    halves = [split(small, h) or [] for h in ("even", "odd")]
    assert sorted(halves[0] + halves[1]) == list(range(len(small.functions)))


def test_cli_replay_writes_table_json_and_plot(tmp_path: Path) -> None:
    args = ["replay", "--trace", str(TRACES), "--sample", "100", "--minutes", "30", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--policy", "fixed-10m", "--policy", "default", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [d["policy"] for d in lines] == ["fixed-10m", "default"]
    keys = ["invocations", "cold_start_pct", "wasted_memory_gb_s", "wasted_memory_vs_fixed_10m"]
    keys += ["sandboxes_started", "policy"]
    keys += [f"p{p}_function_cold_start_pct" for p in (50, 75, 99)]
    assert all(key in lines[0] for key in keys)
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert "| default |" in (tmp_path / "results.md").read_text()
    bad = CliRunner().invoke(app, [*args, "--policy", "lru"])
    assert bad.exit_code != 0


@pytest.mark.parametrize("policy", POLICIES)
def test_replay_verifying_every_step_changes_nothing(policy: str) -> None:
    functions = [fn(f"f{i}", 256 * (i + 1)) for i in range(3)]
    arr = [(float(t), t % 3, 0.5 + (t % 7)) for t in range(0, 3000, 13)]
    w = Workload(functions, arr, 3600.0)
    plain, checked = simulate(w, policy), simulate(w, policy, verify=True)
    plain.wall_seconds = checked.wall_seconds = 0.0
    assert plain == checked
