"""Keep-alive policies: how long an idle sandbox stays warm, and when to pre-warm one.

The assigner asks a policy once per sandbox that turns idle (`idle_until`), so that answer lands on
the release path and must be O(1)-ish. Policies that learn from arrivals (histograms of idle times)
set `observes_arrivals` and get `on_arrival` for each invoke. Policies that pre-warm set `prewarms`
and hand out due functions from `due_prewarms` (called by `Assigner.tick`); the sandbox started for
one turns idle through `idle_until` like any other. Policies with a `memory_budget_mb` rank idle
sandboxes by `priority` and learn of evictions through `on_evict`. `forget` drops what a policy learnt
about a deleted function, so its state is bounded by the live functions. Everything is sans-IO: time comes
in as `now`. The same objects drive the server (`ember serve --keep-alive NAME`) and the trace
simulator (`ember replay`). See docs/keepalive.md for the papers and the measured trade-offs.

Idle time (IT), as in Serverless in the Wild: the time from the end of a function's last invocation
to its next arrival, 0 when the function was still running something when the invoke arrived.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from itertools import accumulate
from typing import Protocol

from ember.core.table import Function

__all__ = [
    "EmberKeepAlive",
    "FixedKeepAlive",
    "GreedyDualKeepAlive",
    "HybridHistogramKeepAlive",
    "KeepAlivePolicy",
    "policy_from_name",
]

FOREVER_S = 1e9  # "until evicted": an idle deadline no replay or server uptime reaches
PREWARM_HEAP_SLACK = 64  # the pre-warm heap is rebuilt when it holds more than 2 x live + this entries


class KeepAlivePolicy(Protocol):
    name: str
    observes_arrivals: bool
    prewarms: bool
    memory_budget_mb: float | None

    def on_arrival(self, fn: Function, now: float) -> None:
        """An invoke of `fn` arrived (before admission)."""
        ...

    def idle_until(self, fn: Function, now: float) -> float:
        """When a sandbox of `fn` that turns idle at `now` should be evicted."""
        ...

    def due_prewarms(self, now: float) -> list[Function]:
        """Functions whose pre-warm time has come: the assigner starts one sandbox for each (R7)."""
        ...

    def priority(self, fn: Function, now: float) -> float:
        """Eviction rank of a sandbox of `fn` turning idle at `now` (lowest evicted first, R8)."""
        ...

    def on_evict(self, fn: Function, priority: float) -> None:
        """An idle sandbox of `fn` ranked `priority` was evicted to make room."""
        ...

    def forget(self, name: str) -> None:
        """Function `name` was deleted: drop everything learnt about it (a new one may take the name)."""
        ...


class _Policy:
    """Defaults: no arrival tracking, no pre-warming, no memory budget."""

    name = "policy"
    observes_arrivals = False
    prewarms = False
    memory_budget_mb: float | None = None

    def on_arrival(self, fn: Function, now: float) -> None:
        pass

    def idle_until(self, fn: Function, now: float) -> float:  # pragma: no cover - every policy overrides
        return now

    def due_prewarms(self, now: float) -> list[Function]:
        return []

    def priority(self, fn: Function, now: float) -> float:
        return 0.0

    def on_evict(self, fn: Function, priority: float) -> None:
        pass

    def forget(self, name: str) -> None:
        pass


class FixedKeepAlive(_Policy):
    """AWS-style fixed keep-alive (AWS: 10 minutes, Azure: 20): every idle sandbox lives `seconds`
    after its last use."""

    def __init__(self, seconds: float = 600.0) -> None:
        assert seconds >= 0
        self.seconds = seconds
        self.name = f"fixed-{seconds / 60:g}m"

    def idle_until(self, fn: Function, now: float) -> float:
        return now + self.seconds


class _Prewarmer:
    """A heap of pending pre-warms. An entry is live only while its function's token is unchanged and
    its state is the function's current one (not forgotten), so an arrival cancels whatever is pending
    in O(1) by bumping the token (`cancel`, only if something was scheduled under it: `pending`). A
    due entry sets the function's warm window (`until`) and, for a plan of several windows, schedules
    the next one. Cancelled entries stay in the heap until due; `live` counts the others, and the heap
    is rebuilt from them when it holds more than 2 x live + PREWARM_HEAP_SLACK (amortised O(1))."""

    def __init__(self, lead_s: float, states: dict[str, _FnState]) -> None:
        self.lead_s = lead_s  # start this early so the init is done by the window's start
        self._states = states
        self._heap: list[tuple[float, int, Function, _FnState, int, float, int]] = []
        self._seq = 0
        self.live = 0  # entries neither cancelled nor forgotten

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, start: float, until: float, fn: Function, st: _FnState, step: int = -1) -> None:
        """Warm `fn` over [start, until); `step` indexes `st.plan` to continue from (-1: no plan)."""
        self._seq += 1
        st.pending = True
        st.queued += 1
        self.live += 1
        heap = self._heap
        heapq.heappush(heap, (start - self.lead_s, self._seq, fn, st, st.token, until, step))
        if len(heap) > 2 * self.live + PREWARM_HEAP_SLACK:
            self._rebuild()

    def cancel(self, st: _FnState) -> None:
        """Cancel every entry pending under `st`'s token (an arrival, or `st` is forgotten)."""
        st.token += 1
        st.pending = False
        self.live -= st.queued
        st.queued = 0

    def _is_live(self, entry: tuple[float, int, Function, _FnState, int, float, int]) -> bool:
        _, _, fn, st, token, _, _ = entry
        return st.token == token and self._states.get(fn.name) is st

    def _rebuild(self) -> None:
        """Drop cancelled and forgotten entries. Entries are ordered by (time, seq) and seq is unique,
        so the live ones come out in exactly the order they would have."""
        heap = self._heap  # in place: `due` may be popping from it
        heap[:] = [e for e in heap if self._is_live(e)]
        heapq.heapify(heap)
        assert len(heap) == self.live, (len(heap), self.live)

    def due(self, now: float, states: dict[str, _FnState]) -> list[Function]:
        heap, out = self._heap, []
        while heap and heap[0][0] <= now:
            _, _, fn, st_at, token, until, step = heapq.heappop(heap)
            st = states.get(fn.name)
            if st is not st_at or st.token != token:
                continue
            st.queued -= 1
            self.live -= 1
            st.until = max(st.until, until)
            if 0 <= step < len(st.plan) - 1:
                start, end = st.plan[step + 1]
                base = st.base
                self.schedule(base + start, base + end, fn, st, step + 1)
            if until > now:
                out.append(fn)
        return out


class _FnState:
    """Per-function learning state of the histogram policies."""

    __slots__ = (
        "active", "ar", "base", "bins", "computed_at", "dirty", "first", "folded", "fresh", "in_range", "it_sum",
        "last_end", "oob", "pending", "plan", "prewarm_step", "queued", "seen", "sq", "token", "top", "until",
        "wakes", "windows",
    )

    def __init__(self, n_bins: int) -> None:
        self.bins = [0] * n_bins
        self.in_range = 0  # observations inside the histogram range
        self.oob = 0  # observations beyond it
        self.seen = 0  # observations: in_range + oob (+ ITs in bin 0 not yet `folded` into them)
        self.folded = 0  # observations counted in bins, in_range and oob (EmberKeepAlive defers bin 0's)
        self.top = -1  # highest bin with an observation
        self.sq = 0  # sum of squared bin counts (for the hybrid's CV, O(1) per update)
        self.last_end: float | None = None  # when the last invocation ended
        self.active = False  # an invoke arrived since the function last went idle
        self.token = 0  # bumped to cancel pending pre-warms
        self.pending = False  # pre-warms were scheduled under the current token
        self.queued = 0  # pre-warm heap entries under the current token, not yet due
        self.until = 0.0  # end of the current warm window (what a pre-warmed sandbox is kept to)
        self.plan: tuple[tuple[float, float], ...] = ()  # warm windows after the last idle, offsets from
        self.base = 0.0  # ... this time (when the function last went idle)
        self.dirty = True  # observations since `windows` was last brought up to date
        self.fresh = False  # `windows` are exact, and an IT in bin 0 leaves them so (EmberKeepAlive)
        self.computed_at = -1  # observations when `windows` was last brought up to date
        self.windows: tuple[tuple[float, float], ...] = ()  # warm windows, offsets from going idle
        self.first = 0.0  # how long the sandbox that turns idle stays warm: windows[0] if it starts at 0
        self.prewarm_step = -1  # index in `windows` of the first pre-warm, -1 if none
        self.ar: list[float] = [0.0] * 6  # hybrid's AR(1) sums over ITs: n, Σx, Σy, Σxy, Σx², last
        self.wakes = 0  # arrivals after at least a bin of idleness (or the first)
        self.it_sum = 0.0  # sum of observed idle times (their mean sets the function's pace)

    def observe(self, it_s: float, bin_s: float) -> int:
        """Count one idle time; returns its bin (>= len(bins): out of range)."""
        i = int(it_s // bin_s)
        bins = self.bins
        if i < len(bins):
            bins[i] += 1
            self.in_range += 1
            if i > self.top:
                self.top = i
        else:
            self.oob += 1
        self.seen += 1
        self.folded += 1
        self.it_sum += it_s
        self.dirty = True
        return i

    def fold(self) -> None:
        """Count the deferred ITs of bin 0 (`seen` - `folded`) in the histogram."""
        pending = self.seen - self.folded
        if pending:
            self.bins[0] += pending
            self.in_range += pending
            self.folded = self.seen

    def set_windows(self, wins: tuple[tuple[float, float], ...]) -> None:
        self.windows = wins
        self.first = wins[0][1] if wins and wins[0][0] <= 0 else 0.0
        step = 1 if self.first > 0 else 0
        self.prewarm_step = step if step < len(wins) else -1


def _percentile_bin(bins: list[int], total: int, p: float) -> int:
    """Smallest bin whose cumulative count reaches fraction `p` of `total`."""
    need = p * total
    acc = 0
    for i, c in enumerate(bins):
        acc += c
        if acc >= need:
            return i
    return len(bins) - 1


class _HistogramPolicy(_Policy):
    """Shared machinery: per-function idle-time histograms and plans of warm windows.

    When a function goes idle (its last running invocation ends), `windows` gives the offsets
    [(start, end), ...] during which it should be warm. A window starting at 0 keeps the sandbox that
    just turned idle; later windows are pre-warms, started one after the other. Any arrival cancels
    the rest of the plan. A sandbox released while others still run gets the first window only.

    Windows are brought up to date when the histogram grew by 1/32 (at least one observation): a
    smaller change barely moves a window, and this keeps the release path amortised O(1) for busy
    functions. A policy may also prove that an observation leaves its windows exactly as they are
    (`fresh` stays True); then bringing them up to date costs nothing.
    """

    observes_arrivals = True
    prewarms = True

    def __init__(self, range_s: float, bin_s: float, lead_s: float) -> None:
        self.range_s, self.bin_s = range_s, bin_s
        self.n_bins = round(range_s / bin_s)
        self.state: dict[str, _FnState] = {}
        self._prewarm = _Prewarmer(lead_s, self.state)

    def _st(self, fn: Function) -> _FnState:
        st = self.state.get(fn.name)
        if st is None:
            st = self.state[fn.name] = _FnState(self.n_bins)
        return st

    def _observe(self, st: _FnState, it_s: float) -> None:
        st.observe(it_s, self.bin_s)
        st.fresh = False

    def _refresh(self, st: _FnState) -> None:
        """Recompute `st.windows` from the histogram."""
        st.set_windows(self.windows(st))

    def on_arrival(self, fn: Function, now: float) -> None:
        st = self._st(fn)
        if st.last_end is not None:
            self._observe(st, max(0.0, now - st.last_end) if fn.inflight == 0 else 0.0)
        st.active = True
        if st.pending:  # cancel the rest of the plan
            self._prewarm.cancel(st)

    def windows(self, st: _FnState) -> tuple[tuple[float, float], ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _windows(self, st: _FnState) -> tuple[tuple[float, float], ...]:
        """`st.windows`, brought up to date if the histogram grew by 1/32 (at least one observation)."""
        if st.dirty:
            seen = st.seen
            if seen - st.computed_at >= (seen >> 5 or 1):
                if not st.fresh:
                    self._refresh(st)
                st.computed_at = seen
                st.dirty = False
        return st.windows

    def idle_until(self, fn: Function, now: float) -> float:
        st = self.state.get(fn.name)
        if st is None:
            st = self._st(fn)
        inflight = fn.inflight
        if not (st.active or inflight):  # a pre-warmed sandbox became ready
            until = st.until
            return until if until >= now else now
        st.last_end = now
        if st.dirty:  # self._windows(st), inlined
            seen = st.seen
            if seen - st.computed_at >= (seen >> 5 or 1):
                if not st.fresh:
                    self._refresh(st)
                st.computed_at = seen
                st.dirty = False
        if inflight:  # others still run: this sandbox gets the first window only
            return now + st.first
        st.active = False
        if st.pending:
            self._prewarm.cancel(st)
        wins = st.plan = st.windows
        st.base = now
        until = st.until = now + st.first
        step = st.prewarm_step
        if step >= 0:
            start, end = wins[step]
            self._prewarm.schedule(now + start, now + end, fn, st, step)
        return until

    def due_prewarms(self, now: float) -> list[Function]:
        return self._prewarm.due(now, self.state)

    def forget(self, name: str) -> None:
        st = self.state.pop(name, None)
        if st is not None:
            self._prewarm.cancel(st)  # its pending pre-warms are dead: no longer counted live


class HybridHistogramKeepAlive(_HistogramPolicy):
    """The hybrid histogram policy of Serverless in the Wild (Shahrad et al., USENIX ATC'20).

    Per function, a range-limited histogram of idle times (1-minute bins over 4 hours):
    - representative (CV of the bin counts >= 2): after an execution the sandbox is unloaded, one is
      pre-warmed at the 5th-percentile IT minus 10% and kept until the 99th-percentile IT plus 10%
      (if the head is 0, the sandbox is simply kept until then);
    - not representative (CV < 2, including no data yet): standard keep-alive for the whole range;
    - mostly out of range (>= 50% of ITs beyond 4 hours): a time-series forecast of the next IT,
      pre-warmed at forecast minus 15%, kept until forecast plus 15%. The paper uses ARIMA; this uses
      its AR(1) special case, fitted online by least squares over the function's ITs (O(1) per IT).
    Percentiles follow the paper's bin edges: the head is the bin's lower edge, the tail its upper.
    """

    def __init__(
        self,
        range_s: float = 4 * 3600.0,
        bin_s: float = 60.0,
        head: float = 0.05,
        tail: float = 0.99,
        margin: float = 0.10,
        cv_threshold: float = 2.0,
        oob_threshold: float = 0.5,
        forecast_margin: float = 0.15,
    ) -> None:
        super().__init__(range_s, bin_s, lead_s=0.0)
        self.name = "hybrid"
        self.head, self.tail, self.margin = head, tail, margin
        self.cv_threshold, self.oob_threshold = cv_threshold, oob_threshold
        self.forecast_margin = forecast_margin

    def _observe(self, st: _FnState, it_s: float) -> None:
        i = st.observe(it_s, self.bin_s)
        if i < self.n_bins:
            st.sq += 2 * st.bins[i] - 1  # (c + 1)² - c²
        ar = st.ar
        if st.seen > 1:  # a (previous IT, this IT) pair for the AR(1) fit
            x = ar[5]
            ar[0] += 1
            ar[1] += x
            ar[2] += it_s
            ar[3] += x * it_s
            ar[4] += x * x
        ar[5] = it_s

    def cv(self, st: _FnState) -> float:
        n, total = self.n_bins, st.in_range
        if total == 0:
            return 0.0
        mean = total / n
        var = max(0.0, (st.sq - n * mean * mean) / (n - 1))
        return math.sqrt(var) / mean

    def windows(self, st: _FnState) -> tuple[tuple[float, float], ...]:
        """One window: (pre-warm offset, warm-until offset) from the end of the last execution."""
        seen = st.in_range + st.oob
        if seen and st.oob / seen >= self.oob_threshold:
            n, sx, sy, sxy, sxx, last = st.ar
            forecast = last  # one IT seen: it is the forecast
            if n >= 2 and n * sxx - sx * sx > 1e-9:  # y = a + b·x over (previous IT, IT) pairs
                slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
                forecast = (sy - slope * sx) / n + slope * last
            elif n >= 1:
                forecast = sy / n
            forecast = max(forecast, 0.0)
            return ((forecast * (1 - self.forecast_margin), forecast * (1 + self.forecast_margin)),)
        if self.cv(st) < self.cv_threshold:
            return ((0.0, self.range_s),)
        h = _percentile_bin(st.bins, st.in_range, self.head)
        t = _percentile_bin(st.bins, st.in_range, self.tail)
        return ((h * self.bin_s * (1 - self.margin), (t + 1) * self.bin_s * (1 + self.margin)),)


class GreedyDualKeepAlive(_Policy):
    """Greedy-Dual keep-alive of FaasCache (Fuerst and Sharma, ASPLOS'21).

    Idle sandboxes are a cache under a memory budget: none expires; when a start would exceed the
    budget, the idle sandbox of lowest priority is evicted, with
        priority = clock + frequency * cost / size
    where frequency counts the function's invocations while it has sandboxes (reset when it has none),
    cost is the cold-start (init) time it saves and size its memory. `clock` becomes the priority of
    each evicted sandbox, so recently useful sandboxes outrank long-idle ones (aging).
    """

    observes_arrivals = True

    def __init__(self, memory_budget_mb: float, init_cost_s: float = 1.0) -> None:
        assert memory_budget_mb > 0 and init_cost_s >= 0  # replay allows --init-s 0
        self.memory_budget_mb = memory_budget_mb
        self.init_cost_s = init_cost_s
        self.name = f"greedy-dual-{memory_budget_mb / 1024:g}g"
        self.clock = 0.0
        self.freq: dict[str, int] = {}

    def on_arrival(self, fn: Function, now: float) -> None:
        self.freq[fn.name] = (self.freq.get(fn.name, 0) if fn.members else 0) + 1

    def idle_until(self, fn: Function, now: float) -> float:
        return now + FOREVER_S

    def priority(self, fn: Function, now: float) -> float:
        return self.clock + self.freq.get(fn.name, 1) * self.init_cost_s / max(fn.memory_mb, 1)

    def on_evict(self, fn: Function, priority: float) -> None:
        self.clock = max(self.clock, priority)

    def forget(self, name: str) -> None:
        self.freq.pop(name, None)


class EmberKeepAlive(_HistogramPolicy):
    """ember's default: warm exactly the minutes in which an arrival is likely, and pre-warm the
    functions that habitually wake up together.

    1. Hazard windows. Per function, a histogram of idle times (1-minute bins over 4 hours, as in
       ATC'20). After the function goes idle, minute i is kept warm iff the chance that the next
       arrival falls in it, given none came before, reaches a threshold:
           smoothed count[i] / (count[i] + count[i+1] + ... + out_of_range + prior)
               >= hazard * min(1, 1 minute / mean IT)
       Warming minute i costs a memory-minute only if nothing arrived earlier and saves a cold start
       with exactly that conditional probability, so one threshold on it is the optimal exchange rate
       for any idle-time distribution: short gaps are kept, periodic ones pre-warmed, long stretches
       in between skipped. The threshold is paced by the function's mean IT because the target is the
       per-function cold-start % (every function counts the same, as in ATC'20): a cold start of a
       rare function costs it more percent, and warming it costs little memory per day. Counts are
       averaged over ±max(1 bin, `spread` of the offset), as ITs are known to a minute and sparse
       histograms have holes; `prior` pseudo-counts make a few observations count for less; with
       fewer than `min_obs` ITs a plain `fallback_s` keep-alive applies.
    2. Co-wake pre-warming (SPES, ICDE'24, pre-loads functions correlated with others). A function
       wakes when invoked after at least a minute without running (or first seen). Wakes within
       `window_s` of each other are counted per pair; when a function wakes, each idle partner that
       woke with it in at least `co_share` of its wakes is pre-warmed for 2 x `window_s`.
    Pre-warms start `lead_s` early so the sandbox's init is done in time.
    """

    def __init__(
        self,
        hazard: float = 0.2,
        prior: float = 1.0,
        min_obs: int = 2,
        fallback_s: float = 600.0,
        window_s: float = 60.0,
        co_share: float = 0.5,
        spread: float = 0.1,
        range_s: float = 4 * 3600.0,
        bin_s: float = 60.0,
        lead_s: float = 10.0,
        recent_max: int = 256,
    ) -> None:
        super().__init__(range_s, bin_s, lead_s)
        self.name = "default"
        self.hazard, self.prior, self.min_obs, self.fallback_s = hazard, prior, min_obs, fallback_s
        self.window_s, self.co_share, self.spread = window_s, co_share, spread
        self.co: dict[str, dict[str, int]] = {}  # function -> partner -> co-wakes
        self._recent: deque[tuple[float, str]] = deque(maxlen=recent_max)
        self._fns: dict[str, Function] = {}
        # Smoothing window [lo, hi) of each bin: ±max(1 bin, spread of the offset).
        n = self.n_bins
        radius = [max(1, int(spread * i)) for i in range(n)]
        self._lo = [max(0, i - r) for i, r in enumerate(radius)]
        self._hi = [min(n, i + r + 1) for i, r in enumerate(radius)]
        self._width = [hi - lo for lo, hi in zip(self._lo, self._hi, strict=True)]
        # Windows keeping at least this much warm from 0 are unchanged by an IT in bin 0 (`on_arrival`).
        self._two_bins = 2 * bin_s if spread < 1 and hazard <= 0.5 and n >= 3 else math.inf

    def windows(self, st: _FnState) -> tuple[tuple[float, float], ...]:
        st.fold()
        seen = st.seen
        if seen < self.min_obs:
            return ((0.0, self.fallback_s),)
        wins: list[tuple[float, float]] = []
        bins, n, top, spread = st.bins, len(st.bins), st.top, self.spread
        if top < 0:  # every idle time was out of range: nothing worth keeping warm
            return ()
        prefix = [0, *accumulate(bins[: top + 1])]
        # Past bin `end` the smoothing window lies wholly above `top`: no mass, nothing warm.
        end = min(n, int((top + 1) / (1 - spread)) + 2) if spread < 1 else n
        left = seen + self.prior  # arrivals not yet come, at the start of bin i (plus the prior)
        bin_s, start = self.bin_s, -1
        need = self.hazard * min(1.0, bin_s * seen / max(st.it_sum, 1e-9))  # paced by the mean IT
        cap = top + 1
        los, his, widths = self._lo, self._hi, self._width
        for i in range(end):
            lo, hi = los[i], his[i]
            mass = (prefix[hi if hi < cap else cap] - prefix[lo if lo < cap else cap]) / widths[i]
            warm = mass > 0 and mass >= need * left
            if warm:
                if start < 0:
                    start = i
            elif start >= 0:
                wins.append((start * bin_s, i * bin_s))
                start = -1
            if i <= top:
                left -= bins[i]
        if start >= 0:
            wins.append((start * bin_s, end * bin_s))
        return tuple(wins)

    def _refresh(self, st: _FnState) -> None:
        st.set_windows(self.windows(st))
        st.fresh = st.seen >= self.min_obs and st.first >= self._two_bins  # see on_arrival

    def on_arrival(self, fn: Function, now: float) -> None:
        st = self.state.get(fn.name)
        if st is None:
            st = self._st(fn)
        last = st.last_end
        if last is None:
            woke = True
        else:
            bin_s = self.bin_s
            if fn.inflight:
                it, woke = 0.0, False
            else:
                it = now - last
                woke = it >= bin_s
                if it < 0.0:
                    it = 0.0
            seen = st.seen
            it_sum = st.it_sum + it
            if it < bin_s and st.fresh and it_sum <= bin_s * seen:
                # The windows are exact for the histogram so far, they are hazard windows (computed
                # with seen >= min_obs) and keep bins 0 and 1 warm (`_refresh`). An IT in bin 0
                # raises bin 0's smoothed count by 1/2 and the arrivals to come there by 1 (a net gain,
                # as need <= hazard <= 1/2), raises bin 1's count by 1/3, and enters no other bin's
                # smoothing window nor its arrivals to come (spread < 1). With the mean IT at most a
                # bin before and after, `need` stays at `hazard`: no bin can turn cold, so the windows
                # stay exactly as they are. The IT is counted in bin 0 later (`fold`): here it only
                # counts in `seen`, which keeps this path to one counter.
                pass
            else:  # st.observe(it, bin_s), inlined: this runs on every invoke
                st.fresh = False
                st.fold()
                st.folded = seen + 1
                i = int(it // bin_s)
                bins = st.bins
                if i < len(bins):
                    bins[i] += 1
                    st.in_range += 1
                    if i > st.top:
                        st.top = i
                else:
                    st.oob += 1
            st.seen = seen + 1
            if it:
                st.it_sum = it_sum
            st.dirty = True
        st.active = True
        if st.pending:  # cancel the rest of the plan
            self._prewarm.cancel(st)
        if woke:
            self._wake(fn, st, now)

    def forget(self, name: str) -> None:
        super().forget(name)
        self._fns.pop(name, None)
        self.co.pop(name, None)
        for partners in self.co.values():
            partners.pop(name, None)
        recent = self._recent
        if any(other == name for _, other in recent):
            kept = [(t, other) for t, other in recent if other != name]
            recent.clear()
            recent.extend(kept)

    def _wake(self, fn: Function, st: _FnState, now: float) -> None:
        name = fn.name
        self._fns[name] = fn
        st.wakes += 1
        recent, co, horizon = self._recent, self.co, now - self.window_s
        while recent and recent[0][0] < horizon:
            recent.popleft()
        mine = co.setdefault(name, {})
        woken = set()
        for _, other in recent:
            if other != name and other not in woken:
                woken.add(other)
                mine[other] = mine.get(other, 0) + 1
                theirs = co.setdefault(other, {})
                theirs[name] = theirs.get(name, 0) + 1
        recent.append((now, name))
        need = self.co_share * st.wakes
        until = now + 2 * self.window_s
        for other, count in mine.items():
            if count >= need and other not in woken:
                ost = self.state.get(other)
                ofn = self._fns.get(other)
                if ost is not None and ofn is not None and not ost.active:
                    self._prewarm.schedule(now + self._prewarm.lead_s, until, ofn, ost)


DEFAULT_GREEDY_DUAL_BUDGET_MB = 4096.0


def policy_from_name(
    name: str, init_cost_s: float = 1.0, memory_budget_mb: float = DEFAULT_GREEDY_DUAL_BUDGET_MB
) -> KeepAlivePolicy:
    """`fixed-<N>m`, `fixed-<N>s`, `hybrid`, `greedy-dual` (budget `memory_budget_mb`),
    `greedy-dual-<N>g`, or `default` (ember's own policy)."""
    if name == "default":
        return EmberKeepAlive()
    if name == "hybrid":
        return HybridHistogramKeepAlive()
    if name == "greedy-dual":
        return GreedyDualKeepAlive(memory_budget_mb, init_cost_s)
    if name.startswith("greedy-dual-") and name.endswith("g"):
        try:
            gb = float(name[len("greedy-dual-"):-1])
        except ValueError:
            gb = -1.0
        if gb > 0:
            return GreedyDualKeepAlive(gb * 1024.0, init_cost_s)
    if name.startswith("fixed-"):
        spec = name[len("fixed-"):]
        unit = {"m": 60.0, "s": 1.0}.get(spec[-1:])
        try:
            value = float(spec[:-1])
        except ValueError:
            value = -1.0
        if unit is not None and value >= 0:
            return FixedKeepAlive(value * unit)
    raise ValueError(
        f"unknown keep-alive policy {name!r} (expected default, hybrid, greedy-dual, greedy-dual-<N>g, "
        "fixed-<N>m or fixed-<N>s)"
    )
