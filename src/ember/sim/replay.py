"""Trace replay: a discrete-event simulation that drives ember's real sans-IO core with a simulated clock.

The core (`ember.core.assignment.Assigner`) runs unmodified, with a keep-alive policy from
`ember.core.keepalive`, exactly as in the server; this module plays the I/O shell. Events are a heap
of (time, seq, kind, sandbox): an arrival calls `acquire` (a returned sandbox is a warm start, a WAIT
a cold start), a `Start` effect schedules `sandbox_ready` after the init time, a dispatch schedules
`release` after the invocation's duration, a `Stop` effect is the process exiting at once
(`sandbox_exited`), and `tick` runs every simulated second (idle expiry is indexed by whole seconds,
so evictions land exactly on time). Admission limits are set out of reach: replay measures keep-alive,
not throttling.

Memory time is accounted per sandbox from its start to its exit: busy (running an invocation), init
(starting) and idle; wasted memory time is init + idle, everything not spent running an invocation.
"""

from __future__ import annotations

import heapq
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ember.core.assignment import WAIT, Assigner, Dispatch, Reject, Sandbox, Start, State, Stop, StopReason
from ember.core.keepalive import KeepAlivePolicy, policy_from_name
from ember.sim.trace import Workload

__all__ = ["Result", "compare", "markdown_table", "percentile", "plot", "run", "simulate", "split"]

_READY, _END = 0, 1
_INF = float("inf")


@dataclass(slots=True)
class Result:
    """One policy over one workload. Memory figures are GB-seconds."""

    policy: str
    invocations: int
    cold_starts: int
    cold_start_pct: float
    p50_function_cold_start_pct: float
    p75_function_cold_start_pct: float
    p99_function_cold_start_pct: float
    wasted_memory_gb_s: float
    wasted_memory_vs_fixed_10m: float | None
    idle_memory_gb_s: float
    init_memory_gb_s: float
    busy_memory_gb_s: float
    sandboxes_started: int
    prewarm_starts: int
    evictions: int
    throttled: int
    functions: int
    sim_seconds: float
    wall_seconds: float
    per_function_cold: list[tuple[int, int]]  # (cold, invocations) per function, workload order

    def json_line(self) -> str:
        doc = asdict(self)
        del doc["per_function_cold"]
        return json.dumps(doc)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), p in [0, 100]."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def simulate(
    workload: Workload,
    policy: KeepAlivePolicy | str,
    init_s: float = 1.0,
    functions: Iterable[int] | None = None,
    verify: bool = False,
) -> Result:
    """Replay `workload` (or only the functions with the given indices) through a fresh Assigner.

    The core checks its own rules (`Assigner.verify`) at the end of the run, before and after the
    final shutdown; with `verify` after every step too (O(table) each: slow, for debugging)."""
    if isinstance(policy, str):
        policy = policy_from_name(policy, init_cost_s=init_s)
    wall0 = time.perf_counter()
    big = 10**9  # admission limits out of reach: no throttles in replay
    core = Assigner(
        account_limit=big, max_starting=big, max_waiting=big, max_wait_s=1e12, keep_alive=policy,
        verify_each_step=verify,
    )
    fns = workload.functions
    selected = set(range(len(fns))) if functions is None else set(functions)
    names = [fn.name for fn in fns]
    for i in selected:
        core.put_function(names[i], 1, fns[i].memory_mb)
    arrivals = workload.arrivals if functions is None else [a for a in workload.arrivals if a[1] in selected]

    cold = [0] * len(fns)
    calls = [0] * len(fns)
    started_at: dict[int, float] = {}
    ready_at: dict[int, float] = {}
    pending: dict[str, float] = {}  # waiting request id -> its duration
    events: list[tuple[float, int, int, Sandbox]] = []
    seq = 0
    lifetime = busy = init = 0.0  # MB-seconds
    starts = prewarms = evictions = throttled = 0
    acquire, release, ready, tick = core.acquire, core.release, core.sandbox_ready, core.tick
    take = core.take_effects
    push, pop = heapq.heappush, heapq.heappop

    def apply(now: float) -> int:
        """Play the core's effects at `now`; returns how many sandboxes were started."""
        nonlocal seq, lifetime, busy, init, starts, evictions
        started = 0
        for eff in take():
            if isinstance(eff, Dispatch):
                dur = pending.pop(eff.request_id)
                busy += dur * eff.sandbox.memory_mb
                seq += 1
                push(events, (now + dur, seq, _END, eff.sandbox))
            elif isinstance(eff, Start):
                sb = eff.sandbox
                started_at[sb.id] = now
                started += 1
                seq += 1
                push(events, (now + init_s, seq, _READY, sb))
            elif isinstance(eff, Stop):
                sb = eff.sandbox
                if eff.reason is StopReason.EVICTED:
                    evictions += 1
                core.sandbox_exited(sb, now)
                t0 = started_at.pop(sb.id)
                lifetime += (now - t0) * sb.memory_mb
                init += (ready_at.pop(sb.id, now) - t0) * sb.memory_mb
            else:
                assert isinstance(eff, Reject)
                raise AssertionError(f"replay rejected an invocation: {eff}")
        starts += started
        return started

    horizon = workload.horizon_s
    n = len(arrivals)
    i = 0
    next_tick = 0.0
    now = 0.0
    while True:
        t_arr = arrivals[i][0] if i < n else _INF
        t_evt = events[0][0] if events else _INF
        t_tick = next_tick if (next_tick <= horizon or i < n or events) else _INF
        if t_evt <= t_arr and t_evt <= t_tick:
            if t_evt == _INF:
                break
            now, _, kind, sb = pop(events)
            if kind is _END:
                release(sb, now)
            elif sb.state is State.STARTING:
                ready_at[sb.id] = now
                ready(sb, now)
        elif t_tick <= t_arr:
            now = t_tick
            tick(now)
            next_tick += 1.0
            if core.has_effects():
                prewarms += apply(now)  # the only starts a tick makes are pre-warms (R7)
                continue
        else:
            now, f, dur = arrivals[i]
            i += 1
            rid = str(i)
            calls[f] += 1
            res = acquire(rid, names[f], now)
            if res is WAIT:
                cold[f] += 1
                pending[rid] = dur
            elif isinstance(res, Sandbox):
                busy += dur * res.memory_mb
                seq += 1
                push(events, (now + dur, seq, _END, res))
            else:
                throttled += 1
        if core.has_effects():
            apply(now)
    end = max(now, horizon)
    core.verify()
    core.shutdown()
    apply(end)
    core.verify()
    assert not core.sandboxes and not pending, "replay left sandboxes or requests behind"
    per_fn = [(cold[j], calls[j]) for j in sorted(selected)]
    pcts = [100.0 * c / k for c, k in per_fn if k]
    total = sum(calls)
    idle = lifetime - busy - init
    gb = 1024.0
    return Result(
        policy=policy.name,
        invocations=total,
        cold_starts=sum(cold),
        cold_start_pct=100.0 * sum(cold) / total if total else 0.0,
        p50_function_cold_start_pct=percentile(pcts, 50),
        p75_function_cold_start_pct=percentile(pcts, 75),
        p99_function_cold_start_pct=percentile(pcts, 99),
        wasted_memory_gb_s=(idle + init) / gb,
        wasted_memory_vs_fixed_10m=None,
        idle_memory_gb_s=idle / gb,
        init_memory_gb_s=init / gb,
        busy_memory_gb_s=busy / gb,
        sandboxes_started=starts,
        prewarm_starts=prewarms,
        evictions=evictions,
        throttled=throttled,
        functions=len(per_fn),
        sim_seconds=end,
        wall_seconds=time.perf_counter() - wall0,
        per_function_cold=per_fn,
    )


def compare(
    workload: Workload,
    policies: Sequence[str],
    init_s: float = 1.0,
    functions: Iterable[int] | None = None,
    budget_gb: float | None = None,
    verify: bool = False,
) -> list[Result]:
    """Run each policy; normalise wasted memory to fixed-10m (always run, as the baseline).

    `greedy-dual` without a size gets `budget_gb`, by default the memory fixed-10m holds on average
    (idle + busy, rounded up to a whole GB): the same memory, spent as a cache instead.
    """
    subset = None if functions is None else list(functions)
    base = simulate(workload, "fixed-10m", init_s, subset, verify)
    if budget_gb is None:
        held = (base.wasted_memory_gb_s + base.busy_memory_gb_s) / max(base.sim_seconds, 1.0)
        budget_gb = max(1.0, float(math.ceil(held)))
    results: list[Result] = []
    for name in dict.fromkeys(policies):
        if name == "fixed-10m":
            results.append(base)
            continue
        pol = policy_from_name(name, init_cost_s=init_s, memory_budget_mb=budget_gb * 1024.0)
        results.append(simulate(workload, pol, init_s, subset, verify))
    for r in results:
        if base.wasted_memory_gb_s:
            r.wasted_memory_vs_fixed_10m = r.wasted_memory_gb_s / base.wasted_memory_gb_s
    return results


def split(workload: Workload, half: str) -> list[int] | None:
    """Cross-validation halves: `even` / `odd` functions by int(hash, 16) parity, or None for all."""
    if half == "all":
        return None
    parity = {"even": 0, "odd": 1}[half]
    return [i for i, fn in enumerate(workload.functions) if int(fn.name, 16) % 2 == parity]


def run(
    trace: Path,
    sample: str,
    policies: Sequence[str],
    out: Path,
    init_s: float = 1.0,
    seed: int = 1,
    half: str = "all",
    minutes: int | None = None,
    budget_gb: float | None = None,
) -> list[Result]:
    """Load, replay every policy, and write results.md, results.jsonl and tradeoff.png to `out`."""
    from ember.sim.trace import load_trace, synthesise

    workload = synthesise(load_trace(trace, sample), seed=seed, minutes=minutes)
    results = compare(workload, policies, init_s, split(workload, half), budget_gb)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(trace).name} sample {sample} ({half}), {workload.horizon_s / 3600:g} h, init {init_s:g} s"
    (out / "results.md").write_text(f"{title}\n\n" + markdown_table(results))
    (out / "results.jsonl").write_text("".join(r.json_line() + "\n" for r in results))
    try:
        plot(results, out / "tradeoff.png", title)
    except PlotUnavailable as exc:
        print(f"ember replay: {exc}; tradeoff.png not written", file=sys.stderr)
    return results


def markdown_table(results: Sequence[Result]) -> str:
    head = (
        "| policy | invocations | cold % | p50 fn cold % | p75 fn cold % | p99 fn cold % "
        "| wasted GB-s | wasted vs fixed-10m | sandboxes started |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r.policy} | {r.invocations} | {r.cold_start_pct:.2f} | {r.p50_function_cold_start_pct:.2f} "
        f"| {r.p75_function_cold_start_pct:.2f} | {r.p99_function_cold_start_pct:.2f} "
        f"| {r.wasted_memory_gb_s:,.0f} | {(r.wasted_memory_vs_fixed_10m or 0):.3f} | {r.sandboxes_started} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (it is the optional extra `ember[plot]`)."""


def plot(results: Sequence[Result], path: Path, title: str = "") -> None:
    """The trade-off: p75 per-function cold-start % against wasted memory (normalised to fixed-10m).
    Fixed keep-alives and Greedy-Dual budgets form curves; other policies are points."""
    try:
        import matplotlib
    except ImportError as e:  # an optional extra: the replay itself needs no plotting library
        raise PlotUnavailable("plotting needs matplotlib: pip install 'ember[plot]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    families: dict[str, list[Result]] = {}
    for r in results:
        fam = r.policy
        for family in ("fixed", "greedy-dual"):
            if r.policy.startswith(family + "-"):
                fam = family
        families.setdefault(fam, []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r.wasted_memory_vs_fixed_10m or 0)
        xs = [r.wasted_memory_vs_fixed_10m or 0 for r in rs]
        ys = [r.p75_function_cold_start_pct for r in rs]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(rs) > 1 else "none", label=fam)
        for r, x, y in zip(rs, xs, ys, strict=True):
            ax.annotate(r.policy, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("wasted memory time (normalised to fixed-10m)")
    ax.set_ylabel("75th-percentile per-function cold-start %")
    ax.set_title(title or "cold starts vs. wasted memory")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
