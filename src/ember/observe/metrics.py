"""What ember counts about the functions it runs, and how it shows it: Prometheus text at `/metrics`
and one JSON document for `ember top` and the dashboard (`/_ember/stats`).

The invoke path pays a few integer operations per invocation and nothing else: `Observer.invoked`
bumps plain counters and one bucket of a fixed-bucket histogram in the function's `FunctionStats`.
Everything else happens off the hot path:
  - a Prometheus scrape turns those integers into metric families (a custom Collector), reading the
    core for what is a state rather than an event (sandboxes by state, concurrency);
  - a sampler, once a second, snapshots each function's counters into a short ring, from which
    rates and latency percentiles over a recent window, and the dashboard's time series, are derived.

Names follow Lambda's CloudWatch metrics (see README, "Operating ember"). Labels are bounded: the
function name (live functions only: a deleted function's series disappear), a throttle reason (three
values) and a sandbox state (four values). Never a request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from ember.core.assignment import Assigner, Function, State
from ember.sandbox.process import Invocation, Outcome, SandboxProcess

if TYPE_CHECKING:
    from ember.observe.funclogs import LogStore

# Upper bounds (seconds) of the duration histogram's buckets; the last bucket is +Inf. Fine enough
# below a second for useful percentiles, and up to Lambda's 900 s timeout.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0,
)  # fmt: skip
INIT_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip
THROTTLE_REASONS = (
    "ReservedFunctionConcurrentInvocationLimitExceeded",
    "ConcurrentInvocationLimitExceeded",
    "FunctionInvocationRateLimitExceeded",
)
SAMPLE_S = 1.0  # the sampler's period
HISTORY = 300  # samples kept per function (five minutes at one a second)
DEFAULT_WINDOW_S = 10

_OK = Outcome.OK


class FunctionStats:
    """Cumulative counters of one function (one incarnation: a re-created function starts anew)."""

    __slots__ = (
        "cold",
        "dur_buckets",
        "dur_sum",
        "errors",
        "fn",
        "history",
        "init_buckets",
        "init_sum",
        "invocations",
        "name",
        "throttles",
        "warm",
    )

    def __init__(self, name: str, fn: Function | None) -> None:
        self.name = name
        self.fn = fn  # the core's Function this counts for; a different one means re-created
        self.invocations = 0
        self.errors = 0
        self.cold = 0
        self.warm = 0
        self.throttles: dict[str, int] = dict.fromkeys(THROTTLE_REASONS, 0)
        self.dur_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.dur_sum = 0.0
        self.init_buckets = [0] * (len(INIT_BUCKETS) + 1)
        self.init_sum = 0.0
        self.history: deque[Sample] = deque(maxlen=HISTORY)
        # a zero sample at birth, so the first interval's invocations count in rates and series
        self.history.append(self.snapshot(time.time(), (0, 0, 0)))

    def snapshot(self, t: float, sandboxes: tuple[int, int, int]) -> Sample:
        return Sample(
            t,
            self.invocations,
            self.errors,
            sum(self.throttles.values()),
            self.cold,
            self.warm,
            tuple(self.dur_buckets),
            sandboxes,
        )


class Sample:
    """One function's cumulative counters at wall-clock time `t`, with its sandboxes then."""

    __slots__ = ("buckets", "cold", "errors", "invocations", "sandboxes", "t", "throttles", "warm")

    def __init__(
        self,
        t: float,
        invocations: int,
        errors: int,
        throttles: int,
        cold: int,
        warm: int,
        buckets: tuple[int, ...],
        sandboxes: tuple[int, int, int],
    ) -> None:
        self.t = t
        self.invocations = invocations
        self.errors = errors
        self.throttles = throttles
        self.cold = cold
        self.warm = warm
        self.buckets = buckets
        self.sandboxes = sandboxes  # (idle, busy, starting)


class Observer:
    """Hears about every invocation from the worker; owns the counters and the function logs' feed."""

    def __init__(self, core: Assigner, logs: LogStore | None = None) -> None:
        self.core = core
        self.functions: dict[str, FunctionStats] = {}
        # account totals, deleted functions included (counters never go down)
        self.invocations = 0
        self.errors = 0
        self.throttles = 0
        self.cold = 0
        self.warm = 0
        self.logs = logs
        self._sampler: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the hot path

    def stats(self, name: str) -> FunctionStats:
        st = self.functions.get(name)
        fn = self.core.functions.get(name)
        if st is None or st.fn is not fn:
            st = self.functions[name] = FunctionStats(name, fn)
        return st

    def invoked(self, name: str, inv: Invocation, outcome: Outcome) -> None:
        """An accepted invocation ended (a result, a function error, a timeout, a crash or an init
        failure). A few integer operations, and a reference handed to the log buffer."""
        st = self.stats(name)
        st.invocations += 1
        self.invocations += 1
        if outcome.kind is not _OK:
            st.errors += 1
            self.errors += 1
        if inv.started:
            d = inv.ended - inv.started
            st.dur_buckets[bisect_left(DURATION_BUCKETS, d)] += 1
            st.dur_sum += d
        if inv.proc is not None:  # it reached a sandbox (an init failure does not)
            if inv.cold:
                st.cold += 1
                self.cold += 1
                i = inv.init_duration_ms / 1000.0
                st.init_buckets[bisect_left(INIT_BUCKETS, i)] += 1
                st.init_sum += i
            else:
                st.warm += 1
                self.warm += 1
        logs = self.logs
        if logs is not None:
            logs.record(name, inv)

    def sandbox_exited(self, name: str, proc: SandboxProcess) -> None:
        logs = self.logs
        if logs is not None:
            logs.sandbox_exited(name, proc)

    def throttled(self, name: str, reason: str) -> None:
        st = self.stats(name)
        st.throttles[reason] = st.throttles.get(reason, 0) + 1
        self.throttles += 1

    # ------------------------------------------------------------------ off the hot path

    def live(self) -> Iterator[tuple[Function, FunctionStats]]:
        """Live functions with their stats (a function never invoked gets empty stats)."""
        for name, fn in self.core.functions.items():
            st = self.functions.get(name)
            if st is None or st.fn is not fn:
                st = self.functions[name] = FunctionStats(name, fn)
            yield fn, st

    def prune(self) -> None:
        """Forget the stats of deleted functions."""
        core_functions = self.core.functions
        for name in [n for n, st in self.functions.items() if core_functions.get(n) is not st.fn]:
            del self.functions[name]

    def start(self) -> None:
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    async def _sample_forever(self) -> None:
        while True:
            self.sample(time.time())
            await asyncio.sleep(SAMPLE_S)

    def sample(self, t: float) -> None:
        self.prune()
        for fn, st in self.live():
            st.history.append(st.snapshot(t, (len(fn.idle), fn.busy, fn.starting)))


# ---------------------------------------------------------------------- derived figures


def percentile(
    buckets: Iterable[int], q: float, bounds: tuple[float, ...] = DURATION_BUCKETS
) -> float | None:
    """The q-quantile (0..1) of a bucketed distribution, interpolated linearly inside its bucket, as
    Prometheus's histogram_quantile does. None when the distribution is empty."""
    counts = list(buckets)
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo = bounds[i - 1] if i > 0 else 0.0
            if i >= len(bounds):  # the +Inf bucket: the best we can say is its lower bound
                return bounds[-1]
            hi = bounds[i]
            return lo + (hi - lo) * max(0.0, rank - seen) / c
        seen += c
    return bounds[-1]


def _delta(a: tuple[int, ...], b: tuple[int, ...]) -> list[int]:
    return [y - x for x, y in zip(a, b, strict=True)]


def function_view(fn: Function, st: FunctionStats, now: float, window_s: float) -> dict[str, Any]:
    """One function's line in `ember top` / the dashboard: totals, and rates and latency over the
    last `window_s` seconds (from the sampler's ring plus the live counters)."""
    current = st.snapshot(now, (len(fn.idle), fn.busy, fn.starting))
    base = None
    for s in reversed(st.history):
        base = s
        if now - s.t >= window_s:
            break
    if base is None or base.t >= now:
        span = 0.0
        d_inv = d_err = d_thr = d_cold = d_warm = 0
        d_buckets = [0] * len(current.buckets)
    else:
        span = now - base.t
        d_inv = current.invocations - base.invocations
        d_err = current.errors - base.errors
        d_thr = current.throttles - base.throttles
        d_cold = current.cold - base.cold
        d_warm = current.warm - base.warm
        d_buckets = _delta(base.buckets, current.buckets)
    p50 = percentile(d_buckets, 0.50)
    p99 = percentile(d_buckets, 0.99)
    starts = d_cold + d_warm
    return {
        "name": fn.name,
        "invocations": st.invocations,
        "errors": st.errors,
        "throttles": sum(st.throttles.values()),
        "throttles_by_reason": {k: v for k, v in st.throttles.items() if v},
        "cold_starts": st.cold,
        "warm_starts": st.warm,
        "window_s": round(span, 3),
        "rps": round(d_inv / span, 3) if span > 0 else 0.0,
        "errors_per_s": round(d_err / span, 3) if span > 0 else 0.0,
        "throttles_per_s": round(d_thr / span, 3) if span > 0 else 0.0,
        "warm_pct": round(100.0 * d_warm / starts, 1) if starts else None,
        "p50_ms": None if p50 is None else round(p50 * 1000, 3),
        "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        "mean_ms": round(1000 * st.dur_sum / sum(st.dur_buckets), 3) if sum(st.dur_buckets) else None,
        "sandboxes": {"idle": len(fn.idle), "busy": fn.busy, "starting": fn.starting},
        "waiting": len(fn.waiting),
        "concurrent": fn.busy,
        "reserved": fn.reserved,
        "memory_mb": fn.memory_mb,
    }


def function_series(st: FunctionStats) -> list[dict[str, Any]]:
    """Per-second points from the sampler's ring: invocations, cold starts, errors and throttles in
    each interval, latency percentiles of the invocations that ended in it, and sandboxes."""
    out: list[dict[str, Any]] = []
    hist = list(st.history)
    for prev, cur in pairwise(hist):
        span = cur.t - prev.t
        if span <= 0:
            continue
        d = _delta(prev.buckets, cur.buckets)
        p50 = percentile(d, 0.50)
        p99 = percentile(d, 0.99)
        out.append(
            {
                "t": round(cur.t, 3),
                "inv": round((cur.invocations - prev.invocations) / span, 3),
                "cold": round((cur.cold - prev.cold) / span, 3),
                "err": round((cur.errors - prev.errors) / span, 3),
                "thr": round((cur.throttles - prev.throttles) / span, 3),
                "p50": None if p50 is None else round(p50 * 1000, 3),
                "p99": None if p99 is None else round(p99 * 1000, 3),
                "idle": cur.sandboxes[0],
                "busy": cur.sandboxes[1],
                "starting": cur.sandboxes[2],
            }
        )
    return out


def stats_document(
    observer: Observer,
    procs: Mapping[int, SandboxProcess],
    mono: float,
    window_s: float = DEFAULT_WINDOW_S,
    series: bool = False,
) -> dict[str, Any]:
    """GET /_ember/stats: what `ember top` and the dashboard show (`mono`: the loop's clock now)."""
    now = time.time()
    core = observer.core
    observer.prune()
    functions = []
    series_out: dict[str, list[dict[str, Any]]] = {}
    for fn, st in observer.live():
        functions.append(function_view(fn, st, now, window_s))
        if series:
            series_out[fn.name] = function_series(st)
    sandboxes = []
    for sb in core.sandboxes.values():
        proc = procs.get(sb.id)
        sandboxes.append(
            {
                "id": sb.id,
                "function": sb.function.name,
                "state": sb.state.name.lower(),
                "age_s": round(max(0.0, mono - sb.started_at), 3),
                "idle_s": round(max(0.0, mono - sb.used_at), 3) if sb.state is State.IDLE else None,
                "request_id": sb.request,
                "invocations": proc.invocations if proc is not None else 0,
                "pid": proc.pid if proc is not None else None,
                "init_ms": round(proc.init_duration_ms, 3) if proc is not None and proc.ready else None,
                "current": sb.generation == sb.function.generation,
            }
        )
    busy = sum(fn.busy for fn in core.functions.values())
    doc: dict[str, Any] = {
        "time": round(now, 3),
        "window_s": window_s,
        "account": {
            "invocations": observer.invocations,
            "errors": observer.errors,
            "throttles": observer.throttles,
            "cold_starts": observer.cold,
            "warm_starts": observer.warm,
            "concurrent": busy,
            "concurrency_limit": core.account_limit,
            "unreserved_inflight": core.unreserved_inflight,
            "sandboxes": len(core.sandboxes),
        },
        "functions": functions,
        "sandboxes": sandboxes,
    }
    if series:
        doc["series"] = series_out
    return doc


# ---------------------------------------------------------------------- Prometheus


class PrometheusCollector:
    """Turns the observer's integers and the core's state into metric families at scrape time."""

    def __init__(self, observer: Observer, asyncq: Any = None) -> None:
        self.observer = observer
        self.asyncq = asyncq  # ember.invoke.asyncq.AsyncInvoker: its queues, read at scrape time

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families vary with the functions

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        obs = self.observer
        core = obs.core
        obs.prune()
        live = list(obs.live())

        def counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels if labels is not None else ["function"])

        inv = counter(
            "ember_invocations", "Invocations that ran, successful or not (CloudWatch Invocations)."
        )
        err = counter(
            "ember_errors", "Invocations that ended in a function error, timeout or crash (Errors)."
        )
        thr = counter(
            "ember_throttles",
            "Invoke requests refused with 429, by reason (Throttles).",
            ["function", "reason"],
        )
        cold = counter("ember_cold_starts", "Invocations that started a new sandbox (a cold start).")
        warm = counter("ember_warm_starts", "Invocations served by an already initialised sandbox.")
        dur = HistogramMetricFamily(
            "ember_duration_seconds",
            "Time the function's code spent on an invocation (Duration).",
            labels=["function"],
        )
        init = HistogramMetricFamily(
            "ember_init_duration_seconds",
            "Init (cold start) duration of the sandbox that served a cold invocation (InitDuration).",
            labels=["function"],
        )
        conc = GaugeMetricFamily(
            "ember_concurrent_executions",
            "Invocations running now (ConcurrentExecutions).",
            labels=["function"],
        )
        queued = GaugeMetricFamily(
            "ember_queued_invocations",
            "Synchronous invocations waiting for a sandbox now.",
            labels=["function"],
        )
        reserved = GaugeMetricFamily(
            "ember_reserved_concurrency",
            "Reserved concurrency of functions that have one (ReservedConcurrentExecutions).",
            labels=["function"],
        )
        sandboxes = GaugeMetricFamily(
            "ember_sandboxes", "Sandboxes (execution environments) by state.", labels=["function", "state"]
        )
        for fn, st in live:
            label = [fn.name]
            inv.add_metric(label, st.invocations)
            err.add_metric(label, st.errors)
            for reason, n in st.throttles.items():
                thr.add_metric([fn.name, reason], n)
            cold.add_metric(label, st.cold)
            warm.add_metric(label, st.warm)
            dur.add_metric(label, _cumulative(st.dur_buckets, DURATION_BUCKETS), st.dur_sum)
            init.add_metric(label, _cumulative(st.init_buckets, INIT_BUCKETS), st.init_sum)
            conc.add_metric(label, fn.busy)
            queued.add_metric(label, len(fn.waiting))
            if fn.reserved is not None:
                reserved.add_metric(label, fn.reserved)
            by_state = dict.fromkeys(("starting", "idle", "busy", "resetting", "stopping"), 0)
            for sb in fn.members.values():
                by_state[sb.state.name.lower()] += 1
            for state, n in by_state.items():
                sandboxes.add_metric([fn.name, state], n)
        yield from (inv, err, thr, cold, warm, dur, init, conc, queued, reserved, sandboxes)

        if self.asyncq is not None:
            depth = GaugeMetricFamily(
                "ember_async_events_queued",
                "Asynchronous (Event) invocations queued and not yet run.",
                labels=["function"],
            )
            age = GaugeMetricFamily(
                "ember_async_event_age_seconds",
                "Age of the oldest queued asynchronous event (AsyncEventAge).",
                labels=["function"],
            )
            for name, (n, oldest) in sorted(async_depths(self.asyncq).items()):
                depth.add_metric([name], n)
                age.add_metric([name], oldest)
            yield depth
            yield age
            dropped = counter(
                "ember_async_events_dropped", "Asynchronous events dropped (AsyncEventsDropped)."
            )
            for name, n in sorted(async_dropped(self.asyncq).items()):
                dropped.add_metric([name], n)
            yield dropped
            if hasattr(self.asyncq, "counters"):
                c = self.asyncq.counters()
                refused = counter(
                    "ember_async_events_refused",
                    "Event invocations refused at a bound (429), by why: queue_full, writer_busy.",
                    ["reason"],
                )
                refused.add_metric(["queue_full"], c["async_refused_queue_full"])
                refused.add_metric(["writer_busy"], c["async_refused_writer_busy"])
                yield refused
                failures = counter("ember_async_commit_failures", "Group commits of the event queue that failed.", [])
                failures.add_metric([], c["async_commit_failures"])
                yield failures

        yield CounterMetricFamily(
            "ember_account_invocations",
            "Invocations of every function, deleted ones included.",
            value=obs.invocations,
        )
        yield CounterMetricFamily(
            "ember_account_errors", "Errors of every function, deleted ones included.", value=obs.errors
        )
        yield CounterMetricFamily(
            "ember_account_throttles",
            "Throttles of every function, deleted ones included.",
            value=obs.throttles,
        )
        yield CounterMetricFamily(
            "ember_account_cold_starts", "Cold starts of every function.", value=obs.cold
        )
        yield CounterMetricFamily(
            "ember_account_warm_starts", "Warm starts of every function.", value=obs.warm
        )
        yield GaugeMetricFamily(
            "ember_account_concurrent_executions",
            "Invocations running now across all functions (ConcurrentExecutions).",
            value=sum(fn.busy for fn, _ in live),
        )
        yield GaugeMetricFamily(
            "ember_account_unreserved_concurrent_executions",
            "Accepted invocations (running or waiting) of functions without reserved concurrency "
            "(UnreservedConcurrentExecutions).",
            value=core.unreserved_inflight,
        )
        yield GaugeMetricFamily(
            "ember_account_concurrency_limit", "The account concurrency limit.", value=core.account_limit
        )
        yield GaugeMetricFamily("ember_functions", "Functions defined.", value=len(live))
        yield GaugeMetricFamily(
            "ember_account_sandboxes", "Sandboxes of all functions.", value=len(core.sandboxes)
        )
        logs = obs.logs
        if logs is not None:
            yield CounterMetricFamily(
                "ember_function_log_events_dropped",
                "Function log events dropped because the write buffer was full.",
                value=logs.dropped,
            )
            yield GaugeMetricFamily(
                "ember_function_log_bytes",
                "Bytes of function logs kept in the data dir.",
                value=logs.total_bytes(),
            )


def _cumulative(counts: list[int], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, c in zip(bounds, counts, strict=False):
        running += c
        out.append((_fmt_bound(bound), running))
    running += counts[-1]
    out.append(("+Inf", running))
    return out


def _fmt_bound(b: float) -> str:
    return repr(float(b))


def async_depths(asyncq: Any) -> dict[str, tuple[int, float]]:
    """function -> (events queued, age in seconds of the oldest)."""
    out = {}
    for name, e in asyncq.stats().get("functions", {}).items():
        out[name] = (int(e.get("ready", 0)) + int(e.get("delayed", 0)), float(e.get("oldest_age_s", 0.0)))
    return out


def async_dropped(asyncq: Any) -> dict[str, int]:
    return {name: int(e.get("dropped", 0)) for name, e in asyncq.stats().get("functions", {}).items()}


def registry(observer: Observer, asyncq: Any = None) -> Any:
    """A registry of ember's own (not the process-global one): the observer, plus process metrics."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(PrometheusCollector(observer, asyncq))
    ProcessCollector(registry=reg)
    return reg
